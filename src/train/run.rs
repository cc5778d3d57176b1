//! A training run, as `lntune train`, `lntune demo` and `lntune compare` use it: a
//! `RunConfig` and data in; adapter, checkpoints, metrics and a loss curve out.
//!
//! out/config.json       the run's configuration, defaults resolved (written first); `lntune
//!                       train --config out/config.json` runs it again
//! out/metrics.jsonl     one line per optimizer step: step, loss, lr, grad_norm, tokens/s
//! out/loss.png          the loss curve
//! out/checkpoints/step-NNNNNN/  adapter + optimizer moments + data position (every N steps)
//! out/adapter/          the trained tensors and adapter.json (at the end)
//! out/summary.json      the run's headline numbers
//! out/grad_stats.jsonl  gradient-variance statistics (with `grad_stats`)

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::checkpoint::{RunState, latest_checkpoint, read_checkpoint, save_checkpoint};
use super::grad_stats::GradStatsRecorder;
use super::optim::AdamWConfig;
use super::schedule::Schedule;
use super::step::count_scored;
use super::trainer::{StepReport, Trainer, TrainerConfig};
use super::{DEFAULT_ACTIVATION_BUDGET, Recompute};
use crate::data::dataset::{
    DataPosition, DataReport, Example, ExampleSpec, HostBatch, Loader, load_examples, pad_id,
};
use crate::data::features::FeatureCache;
use crate::data::image::{ImageProcessing, Preprocess};
use crate::data::llava::DataSource;
use crate::data::template::TemplateName;
use crate::methods::MethodConfig;
use crate::methods::adapter::{
    AdapterMeta, FORMAT, adapter_tensors, fingerprint, read_adapter_for, save_adapter, set_tensors,
};
use crate::model::mllm::Mllm;
use crate::util::device::WeightDtype;
use crate::util::files::{FolderLock, read_json, read_text, write_atomically, write_json};
use crate::util::plot::{Chart, Series};
use crate::util::process::peak_rss_mib;
use crate::util::progress::progress_bar;
use crate::util::{checks, median};

/// Everything that defines a run. `lntune train --config FILE` reads one (fields left out
/// keep these defaults, LLaVA's recipe), flags override its fields, and the run writes it to
/// `out/config.json` with every default resolved.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// llava-hf directory, directory with compose.json, HF LLM directory or .gguf file
    pub model: PathBuf,
    /// LLaVA JSON files, each with an optional sample budget
    pub data: Vec<DataSource>,
    /// held-out data whose loss is measured after training (summary.json `val_loss`)
    pub val_data: Vec<DataSource>,
    /// the folder image paths in the data are relative to
    pub images: Option<PathBuf>,
    pub method: MethodConfig,
    /// the model's own chat template if it has one, else vicuna_v1, when not given
    pub template: Option<TemplateName>,
    /// peak learning rate; the method's default (`Method::default_lr`) when not given
    pub lr: Option<f64>,
    /// linear warmup as a fraction of the steps (LLaVA: 0.03)
    pub warmup_ratio: f64,
    /// linear warmup steps (overrides `warmup_ratio`)
    pub warmup_steps: Option<usize>,
    /// cosine decay floor as a fraction of the peak learning rate
    pub min_lr_ratio: f64,
    /// epochs over the data (ignored when `steps` is given)
    pub epochs: f64,
    /// optimizer steps
    pub steps: Option<usize>,
    /// examples per micro-batch
    pub batch: usize,
    /// micro-batches per optimizer step
    pub grad_accum: usize,
    /// clip the global gradient norm to this (None: no clipping)
    pub max_grad_norm: Option<f64>,
    /// tokens per example, image tokens included; longer examples are cut (and counted)
    pub max_length: usize,
    pub seed: u64,
    pub optim: AdamWConfig,
    /// start from this adapter's tensors (stage 2 from a stage-1 adapter)
    pub init_adapter: Option<PathBuf>,
    /// write a checkpoint every N steps
    pub save_every: Option<usize>,
    /// storage dtype of the frozen weights
    pub dtype: WeightDtype,
    pub recompute: Recompute,
    pub image: ImageProcessing,
    /// compute each image's (frozen) tower features once and reuse them
    pub cache_features: bool,
    /// batch examples of similar length together (LLaVA's group_by_modality_length)
    pub group_by_length: bool,
    /// accept absolute image paths and paths with `..` in the data (else a sample whose
    /// image path leaves `images` is skipped and counted)
    pub allow_any_image_path: bool,
    /// record gradient-variance statistics in grad_stats.jsonl
    pub grad_stats: Option<GradStatsConfig>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            data: vec![],
            val_data: vec![],
            images: None,
            method: MethodConfig::default(),
            template: None,
            lr: None,
            warmup_ratio: 0.03,
            warmup_steps: None,
            min_lr_ratio: 0.0,
            epochs: 1.0,
            steps: None,
            batch: 8,
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            max_length: 2048,
            seed: 0,
            optim: AdamWConfig::default(),
            init_adapter: None,
            save_every: None,
            dtype: WeightDtype::F32,
            recompute: Recompute::Auto,
            image: ImageProcessing::default(),
            cache_features: true,
            group_by_length: true,
            allow_any_image_path: false,
            grad_stats: None,
        }
    }
}

/// What `--log-grad-stats` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradStatsConfig {
    /// `trainable` (every trained tensor), `projector`, or a checkpoint-name prefix (to
    /// compare methods on a subset they all train)
    #[serde(default = "default_grad_stats_subset")]
    pub subset: String,
    /// steps per window of the across-steps variance
    #[serde(default = "default_grad_stats_window")]
    pub window: usize,
}

fn default_grad_stats_subset() -> String {
    "trainable".into()
}

fn default_grad_stats_window() -> usize {
    10
}

impl RunConfig {
    /// Reads a run config file (JSON; fields left out keep their defaults).
    pub fn read(path: &Path) -> Result<Self> {
        read_json(path)
    }

    /// Checks what the file format cannot: a model, data, and every number in its range
    /// (each error names the flag; the run config's field has the same name with `_`).
    pub fn validate(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() {
            bail!("no model: give --model or `model` in the run config");
        }
        if self.data.is_empty() {
            bail!("no data: give --data or `data` in the run config");
        }
        if self.batch == 0 || self.grad_accum == 0 {
            bail!("--batch and --grad-accum must be positive");
        }
        checks::positive("--max-length", self.max_length)?;
        checks::positive_if_set("--steps", self.steps)?;
        checks::positive_if_set("--save-every", self.save_every)?;
        checks::positive_if_set("--image-size", self.image.size)?;
        if let Some(lr) = self.lr {
            checks::finite_positive("--lr", lr)?;
        }
        if self.steps.is_none() {
            checks::finite_positive("--epochs", self.epochs)?;
        }
        checks::within("--warmup-ratio", self.warmup_ratio, 0.0, 1.0)?;
        checks::within("--min-lr-ratio", self.min_lr_ratio, 0.0, 1.0)?;
        if let Some(n) = self.max_grad_norm {
            checks::finite_positive("--max-grad-norm", n)?;
        }
        let o = &self.optim;
        checks::within("--weight-decay", o.weight_decay, 0.0, 1e6)?;
        checks::within("optim.beta1", o.beta1, 0.0, 1.0 - f64::EPSILON)?;
        checks::within("optim.beta2", o.beta2, 0.0, 1.0 - f64::EPSILON)?;
        checks::finite_positive("optim.eps", o.eps)?;
        if self.method.method == crate::methods::Method::Lora {
            self.method.lora.validate()?;
        }
        if let Some(gs) = &self.grad_stats {
            checks::positive("--grad-stats-window", gs.window)?;
        }
        Ok(())
    }

    /// The peak learning rate: the given one, else the method's default.
    pub fn peak_lr(&self) -> f64 {
        self.lr.unwrap_or_else(|| self.method.method.default_lr())
    }

    /// The config with every default that depends on the model or the method filled in, as
    /// `out/config.json` records it.
    pub fn resolved(&self, model: &Mllm) -> Self {
        let mut c = self.clone();
        c.lr = Some(self.peak_lr());
        c.template = Some(
            self.template
                .unwrap_or_else(|| TemplateName::default_for(model.tokenizer.as_ref())),
        );
        c
    }

    /// How this run's examples are made from its data (or `data` in its place).
    fn example_spec<'a>(
        &'a self,
        data: &'a [DataSource],
        preprocess: &'a Preprocess,
    ) -> ExampleSpec<'a> {
        ExampleSpec {
            data,
            images: self.images.as_deref(),
            template: self.template.unwrap_or(TemplateName::VicunaV1),
            preprocess,
            max_length: self.max_length,
            seed: self.seed,
            allow_any_image_path: self.allow_any_image_path,
        }
    }

    /// (optimizer steps, warmup steps) for `n` examples.
    fn step_counts(&self, n: usize) -> (usize, usize) {
        let per_step = self.batch * self.grad_accum;
        let total = self.steps.unwrap_or_else(|| {
            ((self.epochs * n as f64) / per_step as f64).ceil().max(1.0) as usize
        });
        let warmup = self
            .warmup_steps
            .unwrap_or_else(|| (self.warmup_ratio * total as f64).ceil() as usize);
        (total, warmup)
    }

    fn trainer_config(&self, total: usize, warmup: usize) -> TrainerConfig {
        TrainerConfig {
            optim: self.optim,
            schedule: Schedule {
                lr: self.peak_lr(),
                warmup_steps: warmup,
                total_steps: total,
                min_lr_ratio: self.min_lr_ratio,
            },
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            recompute: self.recompute,
            activation_budget: DEFAULT_ACTIVATION_BUDGET,
        }
    }
}

/// A run's headline numbers, written to `summary.json` (what `lntune compare` tabulates).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub method: String,
    pub trainable_params: usize,
    pub total_params: usize,
    pub trainable_percent: f64,
    pub steps: usize,
    pub median_step_s: f64,
    pub median_tokens_per_s: f64,
    /// mean loss of the last 10 steps
    pub final_loss: f64,
    /// the process's peak resident memory (VmHWM) when the run ended, MiB
    pub peak_rss_mib: f64,
    /// token-mean loss on the validation data after training
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    pub wall_s: f64,
}

pub struct RunResult {
    pub reports: Vec<StepReport>,
    pub adapter_dir: PathBuf,
    pub data: DataReport,
    pub wall_s: f64,
}

/// Token-mean loss of `examples` (forward only, in batches of `batch`).
pub fn eval_loss(
    model: &Mllm,
    examples: &[Example],
    batch: usize,
    pre: &Preprocess,
    cache: &mut FeatureCache,
) -> Result<f64> {
    let dev = model.llm.embed_tokens.device().clone();
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let hb = HostBatch::collate(&refs, pad_id(model), pre)?;
        let mut b = hb.to_batch(&dev)?;
        b.vision_features = cache.features(model, &hb, &dev)?;
        b.pixel_values = None;
        let tokens = count_scored(&b)?;
        if tokens == 0 {
            continue;
        }
        let logits = model.forward(&b)?;
        let labels = b.labels.as_ref().context("examples without labels")?;
        let loss = Mllm::loss(&logits, labels)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        sum += loss * tokens as f64;
        n += tokens;
    }
    if n == 0 {
        bail!("the validation data has no supervised token");
    }
    Ok(sum / n as f64)
}

/// Where a run writes and how it treats what is there.
pub struct RunOutput<'a> {
    /// the run folder (locked for the run: one writer at a time)
    pub dir: &'a Path,
    /// a run folder or a checkpoint folder to continue from
    pub resume: Option<&'a Path>,
    /// a fresh run replaces a run the folder holds (else it refuses)
    pub overwrite: bool,
    pub progress: bool,
}

/// The files of a run folder (`overwrite` removes exactly these).
const RUN_FILES: [&str; 7] = [
    "config.json",
    "metrics.jsonl",
    "grad_stats.jsonl",
    "summary.json",
    "loss.png",
    "checkpoints",
    "adapter",
];

/// Runs training to the end (or to the first error). `cache` keeps the tower's features
/// across runs of one process (the demo's two stages and evaluations).
pub fn train_run(
    cfg: &RunConfig,
    output: &RunOutput,
    cache: &mut FeatureCache,
    device: &Device,
) -> Result<RunResult> {
    let t0 = Instant::now();
    cfg.validate()?;
    let (out, resume, progress) = (output.dir, output.resume, output.progress);
    let _lock = FolderLock::acquire(out)?;
    if resume.is_none() {
        clear_for_fresh_run(out, output.overwrite)?;
    }
    let mut model = Mllm::load(&cfg.model, cfg.dtype.dtype(), device)?;
    let base_fp = fingerprint(&mut model)?;
    let init_names = apply_init_adapter(cfg, &mut model, &base_fp)?;
    let cfg = cfg.resolved(&model);
    let preprocess = cfg.image.preprocess(&model)?;
    let (examples, report) = load_examples(&model, &cfg.example_spec(&cfg.data, &preprocess))?;
    eprintln!("data: {}", report.summary());
    let (total, warmup) = cfg.step_counts(examples.len());
    let mut trainer = Trainer::new(&mut model, &cfg.method, cfg.trainer_config(total, warmup))?;
    let metrics_path = out.join("metrics.jsonl");
    let (start, mut reports) = match resume {
        Some(r) => {
            let from = Resume {
                dir: r,
                cfg: &cfg,
                base_fp: &base_fp,
                init_names: &init_names,
            };
            resume_from(&from, &metrics_path, &mut model, &mut trainer, device)?
        }
        None => (DataPosition { epoch: 0, index: 0 }, Vec::new()),
    };
    write_json(&out.join("config.json"), &cfg)?;
    let n_total = total_params(&model);
    eprintln!(
        "training {} of {} parameters ({:.3}%), {} steps of {} x {} examples, lr {:e}, warmup {warmup}",
        trainer.setup.n_trainable(),
        n_total,
        100.0 * trainer.setup.n_trainable() as f64 / n_total as f64,
        total,
        cfg.batch,
        cfg.grad_accum,
        cfg.peak_lr()
    );
    let examples = Arc::new(examples);
    let loader = Loader::spawn(
        examples.clone(),
        cfg.batch,
        cfg.grad_accum,
        cfg.seed,
        start,
        pad_id(&model),
        preprocess.clone(),
        cfg.group_by_length,
    );
    precompute_features(
        &cfg,
        &model,
        &examples,
        &preprocess,
        cache,
        device,
        progress,
    )?;
    let mut grad_stats = match &cfg.grad_stats {
        Some(gs) => Some(GradStatsLog::open(gs, &trainer, &model, out)?),
        None => None,
    };
    let bar = progress_bar(total as u64, trainer.step as u64, progress, "train");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("{}: cannot open", metrics_path.display()))?;
    let meta = AdapterMeta {
        format: FORMAT.into(),
        method: cfg.method.clone(),
        base_fingerprint: base_fp.clone(),
        base_source: cfg.model.display().to_string(),
        tensors: vec![],
        step: 0,
        init_tensors: init_names.clone(),
    };
    let loss_title = format!("{} loss", cfg.method.method.name());
    while trainer.step < total {
        let (pos, micro) = loader.next()?;
        let r = train_step(
            &mut trainer,
            &mut model,
            &micro,
            cache,
            grad_stats.as_mut(),
            &mut metrics,
            device,
        )?;
        bar.set_message(format!("loss {:.4} | {:.0} tok/s", r.0.loss, r.1));
        bar.inc(1);
        reports.push(r.0);
        if let Some(every) = cfg.save_every
            && trainer.step % every == 0
            && trainer.step < total
        {
            let state = RunState {
                step: trainer.step,
                epoch: pos.epoch,
                index: pos.index,
                seed: cfg.seed,
            };
            let tensors = adapter_tensors(&mut model, &trainer.setup, &init_names)?;
            write_checkpoint(out, &trainer, &tensors, &meta, &state, &cfg)?;
            plot_loss(&reports, &out.join("loss.png"), &loss_title)?;
        }
    }
    bar.finish_and_clear();
    let adapter_dir = out.join("adapter");
    let tensors = adapter_tensors(&mut model, &trainer.setup, &init_names)?;
    let m = AdapterMeta {
        tensors: tensors.iter().map(|(n, _)| n.clone()).collect(),
        step: trainer.step,
        ..meta
    };
    save_adapter(&adapter_dir, &tensors, &m)?;
    plot_loss(&reports, &out.join("loss.png"), &loss_title)?;
    let val_loss = validation_loss(&cfg, &model, &preprocess, cache)?;
    let summary = summarize(
        &cfg,
        &trainer,
        &reports,
        &metrics_path,
        n_total,
        val_loss,
        t0.elapsed().as_secs_f64(),
    );
    write_json(&out.join("summary.json"), &summary)?;
    Ok(RunResult {
        reports,
        adapter_dir,
        data: report,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}

/// Writes `out/checkpoints/step-NNNNNN`: the adapter tensors, the optimizer moments and the
/// data position.
fn write_checkpoint(
    out: &Path,
    trainer: &Trainer,
    tensors: &[(String, candle_core::Tensor)],
    meta: &AdapterMeta,
    state: &RunState,
    cfg: &RunConfig,
) -> Result<()> {
    let ck = out
        .join("checkpoints")
        .join(format!("step-{:06}", trainer.step));
    let m = AdapterMeta {
        tensors: tensors.iter().map(|(n, _)| n.clone()).collect(),
        step: trainer.step,
        ..meta.clone()
    };
    save_checkpoint(
        &ck,
        tensors,
        &m,
        &trainer.opt.state,
        trainer.opt.t,
        state,
        cfg,
    )
}

/// Sets the init adapter's tensors (checked against the base); returns their names, which
/// every adapter of the run stores too.
fn apply_init_adapter(cfg: &RunConfig, model: &mut Mllm, base_fp: &str) -> Result<Vec<String>> {
    let Some(dir) = &cfg.init_adapter else {
        return Ok(vec![]);
    };
    let (_, store) = read_adapter_for(dir, base_fp)?;
    set_tensors(model, &store, &dir.join("adapter.safetensors"))
}

/// A fresh run starts in a folder without another run's files: it refuses one that holds
/// a run, unless `overwrite`, which removes the run's files (and only those).
fn clear_for_fresh_run(out: &Path, overwrite: bool) -> Result<()> {
    let found: Vec<&str> = RUN_FILES
        .iter()
        .copied()
        .filter(|f| out.join(f).exists())
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    if !overwrite {
        bail!(
            "{}: holds a training run ({}); continue it with --resume, replace it with --overwrite, or choose another --out",
            out.display(),
            found.join(", ")
        );
    }
    for f in found {
        let p = out.join(f);
        if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        }
        .with_context(|| format!("{}: cannot remove", p.display()))?;
    }
    Ok(())
}

/// What a resume must match: the run being continued.
struct Resume<'a> {
    /// the run or checkpoint folder given with --resume
    dir: &'a Path,
    /// this run's resolved config
    cfg: &'a RunConfig,
    base_fp: &'a str,
    /// tensors the init adapter set (every adapter of the run stores them too)
    init_names: &'a [String],
}

/// Settings a resumed run may change: they decide how long it runs and what it records,
/// not the math of the steps already taken (a new total of steps reshapes the schedule
/// from here on).
const RESUME_MAY_CHANGE: [&str; 8] = [
    "model",
    "steps",
    "epochs",
    "save_every",
    "recompute",
    "cache_features",
    "grad_stats",
    "val_data",
];

/// Restores the newest checkpoint of `from.dir` into the model and trainer, after checking
/// that it belongs to this run: the same base model (fingerprint), every setting that
/// changes the math equal (those that may change are printed), exactly the run's trainable
/// tensors with moments of their shapes. Keeps the metrics of the steps up to it (those
/// after it are redone). Returns the data position and the kept step reports.
fn resume_from(
    from: &Resume,
    metrics_path: &Path,
    model: &mut Mllm,
    trainer: &mut Trainer,
    device: &Device,
) -> Result<(DataPosition, Vec<StepReport>)> {
    let ck = latest_checkpoint(from.dir)?;
    check_same_run(&ck, from.cfg)?;
    let (_, store) = read_adapter_for(&ck, from.base_fp)?;
    let trainable: BTreeMap<String, usize> = trainer
        .setup
        .trainable_specs()
        .map(|s| (s.name.clone(), s.numel()))
        .collect();
    for name in store.keys() {
        if !trainable.contains_key(&name) && !from.init_names.contains(&name) {
            bail!(
                "{}: tensor `{name}` is not trained by this run's method",
                ck.join("adapter.safetensors").display()
            );
        }
    }
    set_tensors(model, &store, &ck.join("adapter.safetensors"))?;
    let (moments, t, state) = read_checkpoint(&ck, device)?;
    for (name, m) in &moments {
        match trainable.get(name) {
            Some(&n) if m.dims() == [2, n] => {}
            Some(&n) => bail!(
                "{}: the moments of `{name}` have shape {:?}, expected [2, {n}]",
                ck.join("optimizer.safetensors").display(),
                m.dims()
            ),
            None => bail!(
                "{}: moments of `{name}`, which this run does not train",
                ck.join("optimizer.safetensors").display()
            ),
        }
    }
    trainer.opt.state = moments;
    trainer.opt.t = t;
    trainer.step = state.step;
    let reports = keep_metrics_up_to(metrics_path, state.step)?;
    eprintln!("resuming from {} (step {})", ck.display(), state.step);
    Ok((
        DataPosition {
            epoch: state.epoch,
            index: state.index,
        },
        reports,
    ))
}

/// Compares the checkpoint's `run_config.json` with this run's config, field by field.
fn check_same_run(ck: &Path, cfg: &RunConfig) -> Result<()> {
    let path = ck.join("run_config.json");
    let then: serde_json::Value = read_json(&path)?;
    let now = serde_json::to_value(cfg)?;
    let (Some(then), Some(now)) = (then.as_object(), now.as_object()) else {
        bail!("{}: not a run config", path.display());
    };
    let mut differ = Vec::new();
    let mut changed = Vec::new();
    for (k, v) in now {
        let old = then.get(k).cloned().unwrap_or(serde_json::Value::Null);
        if &old == v {
            continue;
        }
        let line = format!("`{k}` was {old}, now {v}");
        if RESUME_MAY_CHANGE.contains(&k.as_str()) {
            changed.push(line);
        } else {
            differ.push(line);
        }
    }
    if !differ.is_empty() {
        bail!(
            "{}: this checkpoint belongs to another run: {}",
            ck.display(),
            differ.join("; ")
        );
    }
    for c in changed {
        eprintln!("resume: {c}");
    }
    Ok(())
}

/// Keeps the lines of `metrics.jsonl` up to `step` (rewritten atomically) and returns their
/// reports.
fn keep_metrics_up_to(metrics_path: &Path, step: usize) -> Result<Vec<StepReport>> {
    let mut reports = Vec::new();
    if let Ok(text) = std::fs::read_to_string(metrics_path) {
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| (s as usize) <= step)
            })
            .collect();
        for l in &kept {
            if let Ok(r) = serde_json::from_str::<StepReport>(l) {
                reports.push(r);
            }
        }
        write_atomically(
            metrics_path,
            kept.iter()
                .map(|l| format!("{l}\n"))
                .collect::<String>()
                .as_bytes(),
        )?;
    }
    Ok(reports)
}

/// Every parameter of the model, the frozen tower included.
fn total_params(model: &Mllm) -> usize {
    model.param_specs().iter().map(|s| s.numel()).sum::<usize>() + model.vision_param_count()
}

/// The tower is frozen, so each image's features can be computed once. They are all
/// computed up front, in sorted path order with fixed chunks, so that a value never depends
/// on which batch an image first appeared in (a resumed run sees the same bits). Skipped
/// when they would not fit in 2 GiB; then each batch runs the tower.
fn precompute_features(
    cfg: &RunConfig,
    model: &Mllm,
    examples: &[Example],
    preprocess: &Preprocess,
    cache: &mut FeatureCache,
    device: &Device,
    progress: bool,
) -> Result<()> {
    let mut image_paths: Vec<PathBuf> = examples
        .iter()
        .flat_map(|e| e.images.iter().cloned())
        .collect();
    image_paths.sort();
    image_paths.dedup();
    let feature_bytes = match &model.vision {
        Some(v) => {
            let (h, w) = preprocess.crop.unwrap_or((224, 224));
            4 * v.tokens_per_image(h, w) * v.tower.hidden_size() * v.select.layers.len()
        }
        None => 0,
    };
    cache.enabled = cfg.cache_features && image_paths.len() * feature_bytes <= 2 << 30;
    if cache.enabled && !image_paths.is_empty() {
        cache.for_paths(model, &image_paths, preprocess, device, progress)?;
    }
    Ok(())
}

/// `grad_stats.jsonl` and the recorder behind it: the tensors of the chosen subset, in name
/// order.
struct GradStatsLog {
    names: Vec<String>,
    recorder: GradStatsRecorder,
    file: File,
}

impl GradStatsLog {
    fn open(gs: &GradStatsConfig, trainer: &Trainer, model: &Mllm, out: &Path) -> Result<Self> {
        let mut names: Vec<String> = trainer
            .setup
            .trainable_specs()
            .filter(|s| match gs.subset.as_str() {
                "trainable" => true,
                "projector" => s.name.starts_with(&format!("{}.", model.keys.projector)),
                prefix => s.name.starts_with(prefix),
            })
            .map(|s| s.name.clone())
            .collect();
        names.sort();
        if names.is_empty() {
            bail!(
                "--grad-stats-subset `{}`: no trainable tensor of this method matches",
                gs.subset
            );
        }
        let dim: usize = trainer
            .setup
            .trainable_specs()
            .filter(|s| names.contains(&s.name))
            .map(|s| s.numel())
            .sum();
        let path = out.join("grad_stats.jsonl");
        if trainer.step == 0 {
            let _ = std::fs::remove_file(&path);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(Self {
            names,
            recorder: GradStatsRecorder::new(&gs.subset, dim, gs.window),
            file,
        })
    }
}

/// One optimizer step over the micro-batches of a loader item, logged to metrics.jsonl
/// (and grad_stats.jsonl). Returns the step's report (its `step` counted after the update)
/// and its tokens per second.
fn train_step(
    trainer: &mut Trainer,
    model: &mut Mllm,
    micro: &[HostBatch],
    cache: &mut FeatureCache,
    grad_stats: Option<&mut GradStatsLog>,
    metrics: &mut File,
    device: &Device,
) -> Result<(StepReport, f64)> {
    let ts = Instant::now();
    let data_span = crate::util::profile::span(crate::util::profile::Kind::Data);
    let mut batches = Vec::with_capacity(micro.len());
    let mut real_tokens = 0usize;
    let mut padded_tokens = 0usize;
    for hb in micro {
        padded_tokens += hb.input_ids.len() * hb.input_ids.first().map(|r| r.len()).unwrap_or(0);
        let mut b = hb.to_batch(device)?;
        b.vision_features = cache.features(model, hb, device)?;
        b.pixel_values = None;
        real_tokens += hb.attention_mask.iter().flatten().filter(|&&m| m).count();
        batches.push(b);
    }
    drop(data_span);
    let mut r = match grad_stats {
        None => trainer.step(model, &batches)?,
        Some(log) => {
            let (grads, loss, tokens, micro) =
                trainer.gradients_detailed(model, &batches, Some(&log.names))?;
            let whole = grads.flatten(&log.names, 1.0)?;
            let line = log.recorder.record(trainer.step + 1, &whole, &micro);
            writeln!(log.file, "{}", serde_json::to_string(&line)?)
                .context("grad_stats.jsonl: cannot append")?;
            trainer.apply(model, grads, loss, tokens)?
        }
    };
    let dt = ts.elapsed().as_secs_f64();
    r.step += 1; // report the step count after the update
    let line = serde_json::json!({
        "step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
        "tokens": real_tokens, "padded_tokens": padded_tokens, "tokens_per_s": real_tokens as f64 / dt, "step_s": dt,
    });
    // a failed write (a full disk) stops the run; a cut last line is dropped on resume
    writeln!(metrics, "{line}")
        .and_then(|_| metrics.flush())
        .context("metrics.jsonl: cannot append")?;
    Ok((r, real_tokens as f64 / dt))
}

/// The loss on `val_data` after training, when the run has some.
fn validation_loss(
    cfg: &RunConfig,
    model: &Mllm,
    preprocess: &Preprocess,
    cache: &mut FeatureCache,
) -> Result<Option<f64>> {
    if cfg.val_data.is_empty() {
        return Ok(None);
    }
    let (val, rep) = load_examples(model, &cfg.example_spec(&cfg.val_data, preprocess))?;
    eprintln!("validation {}", rep.summary());
    let v = eval_loss(model, &val, cfg.batch, preprocess, cache)?;
    eprintln!("validation loss {v:.4}");
    Ok(Some(v))
}

/// The run's summary; step times and tokens/s are those of this process's steps (a resumed
/// run's earlier steps have no timing here).
fn summarize(
    cfg: &RunConfig,
    trainer: &Trainer,
    reports: &[StepReport],
    metrics_path: &Path,
    n_total: usize,
    val_loss: Option<f64>,
    wall_s: f64,
) -> RunSummary {
    let timed: Vec<serde_json::Value> = read_text(metrics_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let last: Vec<f64> = reports.iter().rev().take(10).map(|r| r.loss).collect();
    RunSummary {
        method: cfg.method.method.name().to_string(),
        trainable_params: trainer.setup.n_trainable(),
        total_params: n_total,
        trainable_percent: 100.0 * trainer.setup.n_trainable() as f64 / n_total as f64,
        steps: trainer.step,
        median_step_s: median(timed.iter().filter_map(|v| v["step_s"].as_f64()).collect()),
        median_tokens_per_s: median(
            timed
                .iter()
                .filter_map(|v| v["tokens_per_s"].as_f64())
                .collect(),
        ),
        final_loss: last.iter().sum::<f64>() / last.len().max(1) as f64,
        peak_rss_mib: peak_rss_mib(),
        val_loss,
        wall_s,
    }
}

/// The loss curve (raw and a 10-step moving average) as PNG.
pub fn plot_loss(reports: &[StepReport], path: &Path, title: &str) -> Result<()> {
    let raw: Vec<(f64, f64)> = reports.iter().map(|r| (r.step as f64, r.loss)).collect();
    let avg: Vec<(f64, f64)> = raw
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let lo = i.saturating_sub(9);
            let w = &raw[lo..=i];
            (x, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect();
    Chart {
        title: title.into(),
        x_label: "step".into(),
        y_label: "loss".into(),
        series: vec![
            Series {
                label: "loss".into(),
                points: raw,
                scatter: false,
            },
            Series {
                label: "mean of 10".into(),
                points: avg,
                scatter: false,
            },
        ],
        log_x: false,
    }
    .save_png(path)
}
