//! A training run, as `lntune train` and `lntune demo` use it: data in, adapter, checkpoints,
//! metrics and a loss curve out.
//!
//! out/config.json       the run's configuration (written first)
//! out/metrics.jsonl     one line per optimizer step: step, loss, lr, grad_norm, tokens/s
//! out/loss.png          the loss curve
//! out/checkpoints/step-NNNNNN/  adapter + optimizer moments + data position (every N steps)
//! out/adapter/          the trained tensors and adapter.json (at the end)

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::AdamWConfig;
use super::schedule::Schedule;
use super::trainer::{StepReport, Trainer, TrainerConfig};
use super::{DEFAULT_ACTIVATION_BUDGET, Recompute};
use crate::data::dataset::{DataPosition, DataReport, Example, HostBatch, Loader, Prep};
use crate::data::image::Preprocess;
use crate::data::llava::{DataSource, load_mixture};
use crate::data::template::{Template, TemplateName};
use crate::io::adapter::{
    AdapterMeta, FORMAT, RunState, adapter_tensors, fingerprint, latest_checkpoint, read_adapter,
    read_checkpoint, save_adapter, save_checkpoint, set_tensors,
};
use crate::methods::MethodConfig;
use crate::model::mllm::Mllm;
use crate::plot::{Chart, Series};

/// Everything that defines a run (written to out/config.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub model: PathBuf,
    pub data: Vec<DataSource>,
    pub images: Option<PathBuf>,
    pub method: MethodConfig,
    pub template: TemplateName,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub warmup_steps: Option<usize>,
    pub min_lr_ratio: f64,
    pub epochs: f64,
    pub steps: Option<usize>,
    pub batch: usize,
    pub grad_accum: usize,
    pub max_grad_norm: Option<f64>,
    pub max_length: usize,
    pub seed: u64,
    pub optim: AdamWConfig,
    pub init_adapter: Option<PathBuf>,
    pub save_every: Option<usize>,
    pub bf16: bool,
    pub recompute: Recompute,
    pub preprocess: Preprocess,
    /// compute each image's (frozen) tower features once and reuse them
    pub cache_features: bool,
    /// batch examples of similar length together (LLaVA's group_by_modality_length)
    pub group_by_length: bool,
    /// record gradient-variance statistics in grad_stats.jsonl
    #[serde(default)]
    pub grad_stats: Option<GradStatsConfig>,
    /// held-out data whose loss is measured after training (summary.json `val_loss`)
    #[serde(default)]
    pub val_data: Vec<DataSource>,
}

impl RunConfig {
    /// LLaVA-recipe defaults for everything but the model; callers set what they need.
    pub fn minimal(model: &Path) -> Self {
        Self {
            model: model.to_path_buf(),
            data: vec![],
            images: None,
            method: MethodConfig::new(crate::methods::Method::Ln),
            template: TemplateName::Plain,
            lr: 5e-4,
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
            bf16: false,
            recompute: Recompute::Auto,
            preprocess: Preprocess::clip(224),
            cache_features: true,
            group_by_length: true,
            grad_stats: None,
            val_data: vec![],
        }
    }
}

/// What `--log-grad-stats` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GradStatsConfig {
    /// `trainable` (every trained tensor) or a checkpoint-name prefix (e.g. the projector's,
    /// to compare methods on a subset they all train)
    pub subset: String,
    /// steps per window of the across-steps variance
    pub window: usize,
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

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub struct RunResult {
    pub reports: Vec<StepReport>,
    pub adapter_dir: PathBuf,
    pub data: DataReport,
    pub wall_s: f64,
}

/// The frozen vision tower's features per image file, computed once.
#[derive(Default)]
pub struct FeatureCache {
    map: HashMap<PathBuf, Tensor>,
    pub enabled: bool,
}

impl FeatureCache {
    pub fn new(enabled: bool) -> Self {
        Self {
            map: HashMap::new(),
            enabled,
        }
    }

    /// Images whose features are held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Drops every held feature.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Tower features (P, Dv) of image files, computed in chunks for those not cached yet.
    pub fn for_paths(
        &mut self,
        model: &Mllm,
        paths: &[PathBuf],
        pre: &Preprocess,
        dev: &Device,
        progress: bool,
    ) -> Result<Vec<Tensor>> {
        let v = model
            .vision
            .as_ref()
            .context("images given but the model has no vision tower")?;
        let mut missing: Vec<&PathBuf> = paths
            .iter()
            .filter(|p| !self.map.contains_key(*p))
            .collect();
        missing.sort();
        missing.dedup();
        let bar = progress_bar(
            missing.len() as u64,
            0,
            progress && missing.len() > 16,
            "image features",
        );
        for chunk in missing.chunks(16) {
            let mut px = Vec::new();
            let mut hw = (0, 0);
            for p in chunk {
                let (v, h, w) = pre.load(p)?;
                hw = (h, w);
                px.extend(v);
            }
            let t = Tensor::from_vec(px, (chunk.len(), 3, hw.0, hw.1), dev)?;
            let f = v.tower.features(&t, &v.select)?;
            for (k, p) in chunk.iter().enumerate() {
                self.map.insert((*p).clone(), f.get(k)?);
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(paths.iter().map(|p| self.map[p].clone()).collect())
    }

    /// Tower features (N, P, Dv) of a host batch's images, or None without images.
    pub fn features(
        &mut self,
        model: &Mllm,
        hb: &HostBatch,
        dev: &Device,
    ) -> Result<Option<Tensor>> {
        if hb.images.is_empty() {
            return Ok(None);
        }
        let v = model
            .vision
            .as_ref()
            .context("the data has images but the model has no vision tower")?;
        let (h, w) = hb.hw;
        let per = 3 * h * w;
        let missing: Vec<usize> = (0..hb.images.len())
            .filter(|&i| !self.enabled || !self.map.contains_key(&hb.images[i]))
            .collect();
        let mut fresh = HashMap::new();
        if !missing.is_empty() {
            let mut px = Vec::with_capacity(missing.len() * per);
            for &i in &missing {
                px.extend_from_slice(&hb.pixels[i * per..(i + 1) * per]);
            }
            let px = Tensor::from_vec(px, (missing.len(), 3, h, w), dev)?;
            let f = v.tower.features(&px, &v.select)?;
            for (k, &i) in missing.iter().enumerate() {
                fresh.insert(i, f.get(k)?);
            }
        }
        let mut rows = Vec::with_capacity(hb.images.len());
        for (i, p) in hb.images.iter().enumerate() {
            let t = match fresh.remove(&i) {
                Some(t) => {
                    if self.enabled {
                        self.map.insert(p.clone(), t.clone());
                    }
                    t
                }
                None => self.map[p].clone(),
            };
            rows.push(t);
        }
        Ok(Some(Tensor::stack(&rows, 0)?))
    }
}

/// The text side of a run: examples and what made them.
pub fn prepare_examples(cfg: &RunConfig, model: &Mllm) -> Result<(Vec<Example>, DataReport)> {
    let tools = model
        .text
        .as_ref()
        .context("the model has no tokenizer (tokenizer.json or GGUF metadata)")?;
    let template = Template::new(cfg.template, Some(tools))?;
    let (image_token_id, tokens_per_image) = match &model.vision {
        Some(v) => {
            let (h, w) = cfg.preprocess.crop.unwrap_or((224, 224));
            (v.image_token_id, v.tokens_per_image(h, w))
        }
        None => (u32::MAX, 0),
    };
    let samples = load_mixture(&cfg.data, cfg.seed)?;
    let prep = Prep {
        template: &template,
        tools,
        image_token_id,
        tokens_per_image,
        max_length: cfg.max_length,
        image_root: cfg.images.as_deref(),
        add_special: true,
    };
    let (ex, report) = prep.examples(&samples);
    if ex.is_empty() {
        bail!("no usable training example: {}", report.summary());
    }
    Ok((ex, report))
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
        let tokens = crate::train::step::count_scored(&b)?;
        if tokens == 0 {
            continue;
        }
        let logits = model.forward(&b)?;
        let labels = b.labels.as_ref().context("examples without labels")?;
        let loss = Mllm::loss(&logits, labels)?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        sum += loss * tokens as f64;
        n += tokens;
    }
    if n == 0 {
        bail!("the validation data has no supervised token");
    }
    Ok(sum / n as f64)
}

fn pad_id(model: &Mllm) -> u32 {
    model.text.as_ref().and_then(|t| t.eos_id).unwrap_or(0)
}

/// Runs training to the end (or to the first error). `resume`: a run directory or a
/// checkpoint directory to continue from.
pub fn train_run(
    cfg: &RunConfig,
    out: &Path,
    resume: Option<&Path>,
    progress: bool,
    cache: &mut FeatureCache,
) -> Result<RunResult> {
    let t0 = Instant::now();
    let dev = Device::Cpu;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let dtype = if cfg.bf16 { DType::BF16 } else { DType::F32 };
    let mut model = Mllm::load(&cfg.model, dtype, &dev)?;
    let base_fp = fingerprint(&mut model)?;
    let mut init_names = Vec::new();
    if let Some(dir) = &cfg.init_adapter {
        let (meta, store) = read_adapter(dir)?;
        if meta.base_fingerprint != base_fp {
            bail!(
                "{}: the init adapter was trained on another base model",
                dir.display()
            );
        }
        init_names = set_tensors(&mut model, &store, &dir.join("adapter.safetensors"))?;
    }
    let (examples, report) = prepare_examples(cfg, &model)?;
    eprintln!("data: {}", report.summary());
    let n = examples.len();
    let per_step = cfg.batch * cfg.grad_accum;
    let total = cfg
        .steps
        .unwrap_or_else(|| ((cfg.epochs * n as f64) / per_step as f64).ceil().max(1.0) as usize);
    let warmup = cfg
        .warmup_steps
        .unwrap_or_else(|| (cfg.warmup_ratio * total as f64).ceil() as usize);
    let tcfg = TrainerConfig {
        optim: cfg.optim,
        schedule: Schedule {
            lr: cfg.lr,
            warmup_steps: warmup,
            total_steps: total,
            min_lr_ratio: cfg.min_lr_ratio,
        },
        max_grad_norm: cfg.max_grad_norm,
        seed: cfg.seed,
        recompute: cfg.recompute,
        activation_budget: DEFAULT_ACTIVATION_BUDGET,
    };
    let mut trainer = Trainer::new(&mut model, &cfg.method, tcfg)?;
    let mut start = DataPosition { epoch: 0, index: 0 };
    let metrics_path = out.join("metrics.jsonl");
    let mut reports: Vec<StepReport> = Vec::new();
    if let Some(r) = resume {
        let ck = latest_checkpoint(r)?;
        let (_, store) = read_adapter(&ck)?;
        set_tensors(&mut model, &store, &ck.join("adapter.safetensors"))?;
        let (moments, t, state) = read_checkpoint(&ck, &dev)?;
        trainer.opt.state = moments;
        trainer.opt.t = t;
        trainer.step = state.step;
        start = DataPosition {
            epoch: state.epoch,
            index: state.index,
        };
        // the metrics of the steps being redone are dropped
        if let Ok(text) = std::fs::read_to_string(&metrics_path) {
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| (s as usize) <= state.step)
                })
                .collect();
            for l in &kept {
                if let Ok(r) = serde_json::from_str::<StepReport>(l) {
                    reports.push(r);
                }
            }
            std::fs::write(
                &metrics_path,
                kept.iter().map(|l| format!("{l}\n")).collect::<String>(),
            )?;
        }
        eprintln!("resuming from {} (step {})", ck.display(), state.step);
    } else {
        let _ = std::fs::remove_file(&metrics_path);
    }
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(cfg)?)?;
    eprintln!(
        "training {} of {} parameters ({:.3}%), {} steps of {} x {} examples, lr {:e}, warmup {warmup}",
        trainer.setup.n_trainable(),
        model.param_specs().iter().map(|s| s.numel()).sum::<usize>() + model.vision_param_count(),
        100.0 * trainer.setup.n_trainable() as f64
            / (model.param_specs().iter().map(|s| s.numel()).sum::<usize>()
                + model.vision_param_count()) as f64,
        total,
        cfg.batch,
        cfg.grad_accum,
        cfg.lr
    );

    let examples = Arc::new(examples);
    let loader = Loader::spawn(
        examples.clone(),
        cfg.batch,
        cfg.grad_accum,
        cfg.seed,
        start,
        pad_id(&model),
        cfg.preprocess.clone(),
        cfg.group_by_length,
    );
    // The tower is frozen, so each image's features can be computed once. They are all
    // computed up front, in sorted path order with fixed chunks, so that a value never
    // depends on which batch an image first appeared in (a resumed run sees the same bits).
    // Skipped when they would not fit in memory; then each batch runs the tower.
    let mut image_paths: Vec<PathBuf> = examples
        .iter()
        .flat_map(|e| e.images.iter().cloned())
        .collect();
    image_paths.sort();
    image_paths.dedup();
    let feature_bytes = match &model.vision {
        Some(v) => {
            let (h, w) = cfg.preprocess.crop.unwrap_or((224, 224));
            4 * v.tokens_per_image(h, w) * v.tower.hidden_size() * v.select.layers.len()
        }
        None => 0,
    };
    cache.enabled = cfg.cache_features && image_paths.len() * feature_bytes <= 2 << 30;
    if cache.enabled && !image_paths.is_empty() {
        cache.for_paths(&model, &image_paths, &cfg.preprocess, &dev, progress)?;
    }
    let n_total =
        model.param_specs().iter().map(|s| s.numel()).sum::<usize>() + model.vision_param_count();
    // gradient statistics: the tensors of the chosen subset, in name order
    let mut grad_stats = match &cfg.grad_stats {
        Some(gs) => {
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
                anyhow::bail!(
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
            Some((
                names,
                crate::analyze::gradvar::GradStatsRecorder::new(&gs.subset, dim, gs.window),
                file,
            ))
        }
        None => None,
    };
    let bar = progress_bar(total as u64, trainer.step as u64, progress, "train");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("{}: cannot open", metrics_path.display()))?;
    let meta = |step: usize| AdapterMeta {
        format: FORMAT.into(),
        method: cfg.method.clone(),
        base_fingerprint: base_fp.clone(),
        base_source: cfg.model.display().to_string(),
        tensors: vec![],
        step,
    };
    while trainer.step < total {
        let (pos, micro) = loader.next()?;
        let ts = Instant::now();
        let mut batches = Vec::with_capacity(micro.len());
        let mut real_tokens = 0usize;
        let mut padded_tokens = 0usize;
        for hb in &micro {
            padded_tokens +=
                hb.input_ids.len() * hb.input_ids.first().map(|r| r.len()).unwrap_or(0);
            let mut b = hb.to_batch(&dev)?;
            b.vision_features = cache.features(&model, hb, &dev)?;
            b.pixel_values = None;
            real_tokens += hb.attention_mask.iter().flatten().filter(|&&m| m).count();
            batches.push(b);
        }
        let mut r = match &mut grad_stats {
            None => trainer.step(&mut model, &batches)?,
            Some((names, rec, file)) => {
                let (grads, loss, tokens, micro) =
                    trainer.gradients_detailed(&model, &batches, Some(names))?;
                let whole = grads.flatten(names, 1.0)?;
                let line = rec.record(trainer.step + 1, &whole, &micro);
                writeln!(file, "{}", serde_json::to_string(&line)?)?;
                trainer.apply(&mut model, grads, loss, tokens)?
            }
        };
        let dt = ts.elapsed().as_secs_f64();
        r.step += 1; // report the step count after the update
        let line = serde_json::json!({
            "step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
            "tokens": real_tokens, "padded_tokens": padded_tokens, "tokens_per_s": real_tokens as f64 / dt, "step_s": dt,
        });
        writeln!(metrics, "{line}")?;
        metrics.flush()?;
        bar.set_message(format!(
            "loss {:.4} | {:.0} tok/s",
            r.loss,
            real_tokens as f64 / dt
        ));
        bar.inc(1);
        reports.push(r);
        if let Some(every) = cfg.save_every
            && trainer.step % every == 0
            && trainer.step < total
        {
            let ck = out
                .join("checkpoints")
                .join(format!("step-{:06}", trainer.step));
            let tensors = adapter_tensors(&mut model, &trainer.setup, &init_names)?;
            let mut m = meta(trainer.step);
            m.tensors = tensors.iter().map(|(n, _)| n.clone()).collect();
            let state = RunState {
                step: trainer.step,
                epoch: pos.epoch,
                index: pos.index,
                seed: cfg.seed,
            };
            save_checkpoint(&ck, &tensors, &m, &trainer.opt.state, trainer.opt.t, &state)?;
            plot_loss(
                &reports,
                &out.join("loss.png"),
                &format!("{} loss", cfg.method.method.name()),
            )?;
        }
    }
    bar.finish_and_clear();
    let adapter_dir = out.join("adapter");
    let tensors = adapter_tensors(&mut model, &trainer.setup, &init_names)?;
    let mut m = meta(trainer.step);
    m.tensors = tensors.iter().map(|(n, _)| n.clone()).collect();
    save_adapter(&adapter_dir, &tensors, &m)?;
    plot_loss(
        &reports,
        &out.join("loss.png"),
        &format!("{} loss", cfg.method.method.name()),
    )?;
    let val_loss = if cfg.val_data.is_empty() {
        None
    } else {
        let vcfg = RunConfig {
            data: cfg.val_data.clone(),
            ..cfg.clone()
        };
        let (val, rep) = prepare_examples(&vcfg, &model)?;
        eprintln!("validation {}", rep.summary());
        let v = eval_loss(&model, &val, cfg.batch, &cfg.preprocess, cache)?;
        eprintln!("validation loss {v:.4}");
        Some(v)
    };
    // the steps of this process (a resumed run's earlier steps have no timing here)
    let timed: Vec<serde_json::Value> = std::fs::read_to_string(&metrics_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let last: Vec<f64> = reports.iter().rev().take(10).map(|r| r.loss).collect();
    let summary = RunSummary {
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
        peak_rss_mib: crate::cli::bench::peak_rss_mib(),
        val_loss,
        wall_s: t0.elapsed().as_secs_f64(),
    };
    crate::eval::bench::write_atomically(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(RunResult {
        reports,
        adapter_dir,
        data: report,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}

/// A progress bar with rate and ETA on stderr (hidden when `show` is false).
pub fn progress_bar(len: u64, pos: u64, show: bool, what: &str) -> indicatif::ProgressBar {
    let bar = if show {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} {{per_sec}} ETA {{eta}} {{msg}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(pos);
    bar
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
