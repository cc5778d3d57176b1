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
//! out/events.out.tfevents.*  TensorBoard scalars (with `report_to: ["tensorboard"]`)

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::checkpoint::{RunState, save_checkpoint};
pub use super::config::{GradStatsConfig, ReportTo, RunConfig};
use super::grad_stats::GradStatsRecorder;
use super::resume::{Resume, resume_from};
use super::step::count_scored;
use super::trainer::{StepReport, Trainer};
use crate::data::dataset::{
    DataPosition, DataReport, Example, HostBatch, Loader, load_examples, pad_id,
};
use crate::data::features::FeatureCache;
use crate::data::image::Preprocess;
use crate::methods::adapter::{
    AdapterMeta, FORMAT, adapter_tensors, fingerprint, read_adapter_for, save_adapter, set_tensors,
};
use crate::model::mllm::Mllm;
use crate::util::dist::Comm;
use crate::util::files::{FolderLock, read_text, write_json};
use crate::util::median;
use crate::util::plot::{Chart, Series};
use crate::util::process::peak_rss_mib;
use crate::util::progress::progress_bar;
use crate::util::tensorboard::{EVENT_FILE_PREFIX, EventWriter};

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
    /// the data-parallel ranks of the run: each reads its shard of every batch, rank 0
    /// alone writes the folder
    pub comm: Rc<Comm>,
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
    let comm = output.comm.clone();
    let root = comm.is_root();
    let (out, resume, progress) = (output.dir, output.resume, output.progress && root);
    check_ranks(cfg, &comm)?;
    // rank 0 writes the folder; the others only read (a resumed checkpoint)
    let _lock = if root {
        Some(FolderLock::acquire(out)?)
    } else {
        None
    };
    if resume.is_none() && root {
        clear_for_fresh_run(out, output.overwrite)?;
    }
    let mut model = Mllm::load(&cfg.model, cfg.dtype.dtype(), device)?;
    let base_fp = fingerprint(&mut model)?;
    let init_names = apply_init_adapter(cfg, &mut model, &base_fp)?;
    let cfg = cfg.resolved(&model);
    let preprocess = cfg.image.preprocess(&model)?;
    let (examples, report) = load_examples(&model, &cfg.example_spec(&cfg.data, &preprocess))?;
    if root {
        eprintln!("data: {}", report.summary());
    }
    let (total, warmup) = cfg.step_counts(examples.len());
    let mut trainer = Trainer::new(&mut model, &cfg.method, cfg.trainer_config(total, warmup))?;
    trainer.comm = comm.clone();
    let metrics_path = out.join("metrics.jsonl");
    let (start, mut reports) = match resume {
        Some(r) => {
            let from = Resume {
                dir: r,
                cfg: &cfg,
                base_fp: &base_fp,
                init_names: &init_names,
                writer: root,
            };
            resume_from(&from, &metrics_path, &mut model, &mut trainer, device)?
        }
        None => (DataPosition { epoch: 0, index: 0 }, Vec::new()),
    };
    let n_total = total_params(&model);
    if root {
        write_json(&out.join("config.json"), &cfg)?;
        eprintln!(
            "training {} of {} parameters ({:.3}%), {} steps of {} x {} examples{}, lr {:e}, warmup {warmup}",
            trainer.setup.n_trainable(),
            n_total,
            100.0 * trainer.setup.n_trainable() as f64 / n_total as f64,
            total,
            cfg.batch,
            cfg.grad_accum,
            if comm.size() > 1 {
                format!(" over {} ranks", comm.size())
            } else {
                String::new()
            },
            cfg.peak_lr()
        );
    }
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
        (comm.rank(), comm.size()),
    );
    if let Some(dir) = &cfg.feature_dir
        && model.vision.is_some()
    {
        cache.attach_disk(dir, &model, &preprocess, &base_fp)?;
    }
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
    let mut metrics = match root {
        true => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .with_context(|| format!("{}: cannot open", metrics_path.display()))?,
        ),
        false => None,
    };
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
    let mut events = match root && cfg.report_to.contains(&ReportTo::Tensorboard) {
        true => Some(EventWriter::create(out)?),
        false => None,
    };
    while trainer.step < total {
        let (pos, micro) = loader.next()?;
        let r = train_step(
            &mut trainer,
            &mut model,
            &micro,
            cache,
            grad_stats.as_mut(),
            metrics.as_mut(),
            device,
        )?;
        if let Some(ev) = events.as_mut() {
            ev.scalars(
                r.0.step as u64,
                &[
                    ("train/loss", r.0.loss),
                    ("train/learning_rate", r.0.lr),
                    ("train/grad_norm", r.0.grad_norm),
                    ("train/tokens_per_s", r.1),
                ],
            )?;
        }
        bar.set_message(format!("loss {:.4} | {:.0} tok/s", r.0.loss, r.1));
        bar.inc(1);
        reports.push(r.0);
        if let Some(every) = cfg.save_every
            && root
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
    if !root {
        return Ok(RunResult {
            reports,
            adapter_dir,
            data: report,
            wall_s: t0.elapsed().as_secs_f64(),
        });
    }
    let tensors = adapter_tensors(&mut model, &trainer.setup, &init_names)?;
    let m = AdapterMeta {
        tensors: tensors.iter().map(|(n, _)| n.clone()).collect(),
        step: trainer.step,
        ..meta
    };
    save_adapter(&adapter_dir, &tensors, &m)?;
    plot_loss(&reports, &out.join("loss.png"), &loss_title)?;
    let val_loss = validation_loss(&cfg, &model, &preprocess, cache)?;
    if let (Some(ev), Some(v)) = (events.as_mut(), val_loss) {
        ev.scalars(trainer.step as u64, &[("eval/loss", v)])?;
    }
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

/// What a data-parallel run needs of its config: every micro-batch splits evenly over the
/// ranks, and nothing that is measured per process (gradient statistics).
fn check_ranks(cfg: &RunConfig, comm: &Comm) -> Result<()> {
    let n = comm.size();
    if n == 1 {
        return Ok(());
    }
    if !cfg.batch.is_multiple_of(n) {
        bail!(
            "--batch {} does not split over {n} ranks: each rank takes batch / ranks examples of every micro-batch",
            cfg.batch
        );
    }
    if cfg.grad_stats.is_some() {
        bail!("--log-grad-stats measures one process's micro-batches: run it without mpirun");
    }
    Ok(())
}

/// Sets the init adapter's tensors (checked against the base); returns their names, which
/// every adapter of the run stores too.
fn apply_init_adapter(cfg: &RunConfig, model: &mut Mllm, base_fp: &str) -> Result<Vec<String>> {
    let Some(dir) = &cfg.init_adapter else {
        return Ok(vec![]);
    };
    if crate::methods::peft::is_peft_dir(dir) {
        // PEFT records no fingerprint of its base: names and shapes are what is checked
        let (method, tensors) = crate::methods::peft::read_peft(dir, model)?;
        if method.method == crate::methods::Method::Lora {
            bail!(
                "--init-adapter {}: a PEFT LORA adapter's factors have no place before the run's own LoRA exists; merge it with `lntune export hf` and train on the merged model",
                dir.display()
            );
        }
        let file = dir.join("adapter_model.safetensors");
        let mut store = crate::io::store::Store::new(&Device::Cpu);
        store.add_owned(&file, tensors)?;
        return set_tensors(model, &store, &file);
    }
    let (_, store) = read_adapter_for(dir, base_fp)?;
    set_tensors(model, &store, &dir.join("adapter.safetensors"))
}

/// A fresh run starts in a folder without another run's files: it refuses one that holds
/// a run, unless `overwrite`, which removes the run's files (and only those).
fn clear_for_fresh_run(out: &Path, overwrite: bool) -> Result<()> {
    let events: Vec<String> = std::fs::read_dir(out)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(EVENT_FILE_PREFIX))
                .collect()
        })
        .unwrap_or_default();
    let found: Vec<&str> = RUN_FILES
        .iter()
        .copied()
        .filter(|f| out.join(f).exists())
        .chain(events.iter().map(|s| s.as_str()))
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
        } else {
            // a resumed run: the steps logged past the checkpoint are logged again
            super::resume::keep_jsonl_up_to(&path, trainer.step, true)?;
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
    metrics: Option<&mut File>,
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
    // the whole step's token counts over the ranks (each rank read its shard)
    let mut counts = [real_tokens as f64, padded_tokens as f64];
    trainer.comm.sum_f64(&mut counts)?;
    let rank_tokens = real_tokens;
    let (real_tokens, padded_tokens) = (counts[0] as usize, counts[1] as usize);
    let dt = ts.elapsed().as_secs_f64();
    r.step += 1; // report the step count after the update
    let mut line = serde_json::json!({
        "step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
        "tokens": real_tokens, "padded_tokens": padded_tokens, "tokens_per_s": real_tokens as f64 / dt, "step_s": dt,
    });
    if trainer.comm.size() > 1 {
        line["ranks"] = trainer.comm.size().into();
        line["rank0_tokens"] = rank_tokens.into();
        let (secs, bytes) = trainer.last_exchange.get();
        line["allreduce_s"] = secs.into();
        line["allreduce_bytes"] = bytes.into();
    }
    // a failed write (a full disk) stops the run; a cut last line is dropped on resume
    if let Some(metrics) = metrics {
        writeln!(metrics, "{line}")
            .and_then(|_| metrics.flush())
            .context("metrics.jsonl: cannot append")?;
    }
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
                intervals: vec![],
            },
            Series {
                label: "mean of 10".into(),
                points: avg,
                scatter: false,
                intervals: vec![],
            },
        ],
        log_x: false,
        x_names: vec![],
    }
    .save_png(path)
}
