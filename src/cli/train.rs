//! `lntune train`: flags (or a run config file, which flags override) to a `RunConfig`.

use std::path::PathBuf;
use std::rc::Rc;

use anyhow::{Result, bail};
use clap::Args;

use super::args::{DeviceArgs, ImageArgs, MethodArgs};
use crate::data::features::FeatureCache;
use crate::data::llava::DataSource;
use crate::data::template::TemplateName;
use crate::methods::Method;
use crate::train::Recompute;
use crate::train::config::ReportTo;
use crate::train::run::{GradStatsConfig, RunConfig, RunOutput, train_run};
use crate::util::device::WeightDtype;
use crate::util::dist::Comm;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Run config, JSON (e.g. a run's own config.json) or YAML (`.yaml`, `.yml`), with the
    /// fields of config.json; the flags given override its fields
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model: llava-hf directory, directory with compose.json, HF LLM directory or .gguf file
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// LLaVA JSON files, comma separated, each with an optional sample budget: a.json:20000,b.json
    #[arg(long)]
    pub data: Option<String>,
    /// Held-out LLaVA JSON data (same syntax as --data) whose loss is measured after
    /// training and written to summary.json
    #[arg(long)]
    pub val_data: Option<String>,
    /// Directory that image paths in the data are relative to
    #[arg(long)]
    pub images: Option<PathBuf>,
    #[command(flatten)]
    pub method: MethodArgs,
    /// Conversation template [default: plain for --stage 1, else the model's chat template if
    /// it has one, else vicuna_v1]
    #[arg(long, value_enum)]
    pub template: Option<TemplateName>,
    /// 1: feature alignment (projector, plain template by default); 2: instruction tuning
    #[arg(long)]
    pub stage: Option<u8>,
    /// Output directory (config.json, adapter, checkpoints, metrics.jsonl, loss.png)
    #[arg(long)]
    pub out: PathBuf,
    /// Peak learning rate [default: 2e-3 for projector, 2e-5 for full, 2e-4 for lora, 5e-4 otherwise]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup as a fraction of the steps [default: 0.03, LLaVA's]
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Linear warmup steps (overrides --warmup-ratio)
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Cosine decay floor as a fraction of the peak learning rate [default: 0]
    #[arg(long)]
    pub min_lr_ratio: Option<f64>,
    /// Epochs over the data (ignored with --steps) [default: 1]
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Optimizer steps
    #[arg(long)]
    pub steps: Option<usize>,
    /// Examples per micro-batch [default: 8]
    #[arg(long)]
    pub batch: Option<usize>,
    /// Micro-batches per optimizer step [default: 1]
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Clip the global gradient norm (0 turns clipping off) [default: 1]
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Tokens per example, image tokens included; longer examples are cut (and counted)
    /// [default: 2048]
    #[arg(long)]
    pub max_length: Option<usize>,
    /// [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// AdamW weight decay [default: 0, LLaVA's]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Apply weight decay to norm scales and biases too
    #[arg(long)]
    pub decay_norms: bool,
    /// Start from this adapter's tensors (stage 2 from a stage-1 adapter): an lntune adapter
    /// or a PEFT LN_TUNING directory
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Write a checkpoint every N steps
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Continue a run from its newest checkpoint (a run directory or a checkpoint
    /// directory); the checkpoint must belong to this run (same base model, method, data
    /// and every setting that changes the math)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Replace the run --out holds (its config, metrics, checkpoints, adapter); without it a
    /// fresh run into a folder that holds a run is refused
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Storage dtype of the frozen weights [default: f32]
    #[arg(long, value_enum)]
    pub dtype: Option<WeightDtype>,
    /// What the forward keeps for the backward [default: auto]
    #[arg(long, value_enum)]
    pub recompute: Option<Recompute>,
    #[command(flatten)]
    pub image: ImageArgs,
    /// Run the vision tower on every step instead of caching each image's features
    #[arg(long)]
    pub no_feature_cache: bool,
    /// Batch examples in random order instead of grouping similar lengths
    #[arg(long)]
    pub no_group_by_length: bool,
    /// Accept image paths in the data that are absolute or climb out of --images with `..`
    /// (else such a sample is skipped and counted)
    #[arg(long)]
    pub allow_any_image_path: bool,
    /// Record gradient-variance statistics in grad_stats.jsonl (across steps in windows, and
    /// across micro-batches at fixed weights when --grad-accum is 2 or more); `lntune analyze
    /// gradvar` plots them
    #[arg(long)]
    pub log_grad_stats: bool,
    /// Which gradient: `trainable`, `projector`, or a checkpoint-name prefix [default: trainable]
    #[arg(long)]
    pub grad_stats_subset: Option<String>,
    /// Steps per window of the across-steps variance [default: 10]
    #[arg(long)]
    pub grad_stats_window: Option<usize>,
    /// Also log to `tensorboard`: event files beside metrics.jsonl (loss, learning rate,
    /// gradient norm, tokens/s; the validation loss at the end)
    #[arg(long, value_enum)]
    pub report_to: Vec<ReportTo>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
}

/// Sets `field` to the flag's value when the flag was given.
fn set<T: Clone>(field: &mut T, flag: &Option<T>) {
    if let Some(v) = flag {
        *field = v.clone();
    }
}

impl TrainArgs {
    /// The run: the config file (or the defaults), then every flag given.
    pub fn run_config(&self) -> Result<RunConfig> {
        let mut c = match &self.config {
            Some(p) => RunConfig::read(p)?,
            None => RunConfig::default(),
        };
        match self.stage {
            None | Some(2) => {}
            // stage 1 pretrains the projector on captions, unless the flags say otherwise
            Some(1) => {
                c.method = crate::methods::MethodConfig::new(Method::Projector);
                c.template = Some(self.template.unwrap_or(TemplateName::Plain));
            }
            Some(s) => bail!("--stage must be 1 or 2, got {s}"),
        }
        set(&mut c.model, &self.model);
        if let Some(d) = &self.data {
            c.data = DataSource::parse_list(d)?;
        }
        if let Some(v) = &self.val_data {
            c.val_data = DataSource::parse_list(v)?;
        }
        if self.images.is_some() {
            c.images = self.images.clone();
        }
        c.method = self.method.apply(c.method)?;
        if self.template.is_some() {
            c.template = self.template;
        }
        if self.lr.is_some() {
            c.lr = self.lr;
        }
        set(&mut c.warmup_ratio, &self.warmup_ratio);
        if self.warmup_steps.is_some() {
            c.warmup_steps = self.warmup_steps;
        }
        set(&mut c.min_lr_ratio, &self.min_lr_ratio);
        set(&mut c.epochs, &self.epochs);
        if self.steps.is_some() {
            c.steps = self.steps;
        }
        set(&mut c.batch, &self.batch);
        set(&mut c.grad_accum, &self.grad_accum);
        if let Some(n) = self.max_grad_norm {
            // 0 turns clipping off; anything else is checked by `validate`
            c.max_grad_norm = (n != 0.0).then_some(n);
        }
        set(&mut c.max_length, &self.max_length);
        set(&mut c.seed, &self.seed);
        set(&mut c.optim.weight_decay, &self.weight_decay);
        c.optim.decay_all |= self.decay_norms;
        if self.init_adapter.is_some() {
            c.init_adapter = self.init_adapter.clone();
        }
        if self.save_every.is_some() {
            c.save_every = self.save_every;
        }
        set(&mut c.dtype, &self.dtype);
        set(&mut c.recompute, &self.recompute);
        self.image.override_in(&mut c.image);
        c.cache_features &= !self.no_feature_cache;
        c.group_by_length &= !self.no_group_by_length;
        c.allow_any_image_path |= self.allow_any_image_path;
        for r in &self.report_to {
            if !c.report_to.contains(r) {
                c.report_to.push(*r);
            }
        }
        if self.log_grad_stats && c.grad_stats.is_none() {
            c.grad_stats = Some(GradStatsConfig {
                subset: "trainable".into(),
                window: 10,
            });
        }
        if let Some(gs) = &mut c.grad_stats {
            set(&mut gs.subset, &self.grad_stats_subset);
            set(&mut gs.window, &self.grad_stats_window);
        }
        c.validate()?;
        Ok(c)
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    // under mpirun, one of several data-parallel ranks (see util::dist)
    let comm = Rc::new(Comm::from_launcher()?);
    let result = run_rank(args, comm.clone());
    if let Err(e) = &result
        && comm.size() > 1
    {
        // the other ranks wait in their next all-reduce: end them all now
        // one write, so that the launcher's own messages cannot cut the line
        let line = format!("error: rank {} of {}: {e:#}\n", comm.rank(), comm.size());
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        comm.abort(1);
    }
    result
}

fn run_rank(args: TrainArgs, comm: Rc<Comm>) -> Result<()> {
    let cfg = args.run_config()?;
    let device = args.device.device.device()?;
    let mut cache = FeatureCache::new(cfg.cache_features);
    let output = RunOutput {
        dir: &args.out,
        resume: args.resume.as_deref(),
        overwrite: args.overwrite,
        progress: !args.quiet,
        comm: comm.clone(),
    };
    let r = train_run(&cfg, &output, &mut cache, &device)?;
    if !comm.is_root() {
        return Ok(());
    }
    let last = r.reports.last().map(|r| r.loss).unwrap_or(f64::NAN);
    println!(
        "trained {} steps in {:.1}s, final loss {last:.4}; adapter: {}",
        r.reports.len(),
        r.wall_s,
        r.adapter_dir.display()
    );
    Ok(())
}
