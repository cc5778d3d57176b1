//! `lntune train`: finetune a model on LLaVA-format data with one of the methods.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use super::method_args::MethodArgs;
use super::{DTypeArg, ImageProcessorArgs};
use crate::data::llava::DataSource;
use crate::data::template::TemplateName;
use crate::methods::Method;
use crate::train::Recompute;
use crate::train::optim::AdamWConfig;
use crate::train::run::{RunConfig, train_run};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Model: llava-hf directory, directory with compose.json, HF LLM directory or .gguf file
    #[arg(long)]
    pub model: PathBuf,
    /// LLaVA JSON files, comma separated, each with an optional sample budget: a.json:20000,b.json
    #[arg(long)]
    pub data: String,
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
    /// 1: feature alignment (projector, plain template); 2: instruction tuning
    #[arg(long, default_value_t = 2)]
    pub stage: u8,
    /// Output directory (adapter, checkpoints, metrics.jsonl, loss.png)
    #[arg(long)]
    pub out: PathBuf,
    /// Peak learning rate [default: 2e-3 for projector, 2e-5 for full, 2e-4 for lora, 5e-4 otherwise]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup as a fraction of the steps (LLaVA: 0.03)
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// Linear warmup steps (overrides --warmup-ratio)
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Cosine decay floor as a fraction of the peak learning rate
    #[arg(long, default_value_t = 0.0)]
    pub min_lr_ratio: f64,
    /// Epochs over the data (ignored with --steps)
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Optimizer steps
    #[arg(long)]
    pub steps: Option<usize>,
    /// Examples per micro-batch
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Micro-batches per optimizer step
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip the global gradient norm (0 turns clipping off)
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Tokens per example, image tokens included; longer examples are cut (and counted)
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// AdamW weight decay (LLaVA: 0)
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Apply weight decay to norm scales and biases too
    #[arg(long)]
    pub decay_norms: bool,
    /// Start from this adapter's tensors (stage 2 from a stage-1 adapter)
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Write a checkpoint every N steps
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Continue a run from its newest checkpoint (a run directory or a checkpoint directory)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Storage dtype of the frozen weights
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    #[arg(long, value_enum, default_value = "auto")]
    pub recompute: Recompute,
    #[command(flatten)]
    pub image: ImageProcessorArgs,
    /// Run the vision tower on every step instead of caching each image's features
    #[arg(long)]
    pub no_feature_cache: bool,
    /// Batch examples in random order instead of grouping similar lengths
    #[arg(long)]
    pub no_group_by_length: bool,
    /// Record gradient-variance statistics in grad_stats.jsonl (across steps in windows, and
    /// across micro-batches at fixed weights when --grad-accum is 2 or more); `lntune analyze
    /// gradvar` plots them
    #[arg(long)]
    pub log_grad_stats: bool,
    /// Which gradient: `trainable`, `projector`, or a checkpoint-name prefix
    #[arg(long, default_value = "trainable")]
    pub grad_stats_subset: String,
    /// Steps per window of the across-steps variance
    #[arg(long, default_value_t = 10)]
    pub grad_stats_window: usize,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
}

/// The paper-recipe default learning rate of a method.
pub fn default_lr(m: Method) -> f64 {
    match m {
        Method::Projector => 2e-3,
        Method::Full => 2e-5,
        Method::Lora => 2e-4,
        _ => 5e-4,
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    if args.stage != 1 && args.stage != 2 {
        bail!("--stage must be 1 or 2, got {}", args.stage);
    }
    if args.batch == 0 || args.grad_accum == 0 {
        bail!("--batch and --grad-accum must be positive");
    }
    let method = args.method.config_or(if args.stage == 1 {
        Method::Projector
    } else {
        Method::Ln
    })?;
    let model =
        crate::model::mllm::Mllm::load(&args.model, args.dtype.dtype(), &candle_core::Device::Cpu)?;
    let template = match args.template {
        Some(t) => t,
        None if args.stage == 1 => TemplateName::Plain,
        None if model
            .text
            .as_ref()
            .is_some_and(|t| t.chat_template.is_some()) =>
        {
            TemplateName::Model
        }
        None => TemplateName::VicunaV1,
    };
    let preprocess = args.image.preprocess(&model)?;
    drop(model);
    let cfg = RunConfig {
        model: args.model.clone(),
        data: DataSource::parse_list(&args.data)?,
        images: args.images.clone(),
        lr: args.lr.unwrap_or(default_lr(method.method)),
        method,
        template,
        warmup_ratio: args.warmup_ratio,
        warmup_steps: args.warmup_steps,
        min_lr_ratio: args.min_lr_ratio,
        epochs: args.epochs,
        steps: args.steps,
        batch: args.batch,
        grad_accum: args.grad_accum,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        max_length: args.max_length,
        seed: args.seed,
        optim: AdamWConfig {
            weight_decay: args.weight_decay,
            decay_all: args.decay_norms,
            ..Default::default()
        },
        init_adapter: args.init_adapter.clone(),
        save_every: args.save_every,
        bf16: args.dtype == DTypeArg::Bf16,
        recompute: args.recompute,
        preprocess,
        cache_features: !args.no_feature_cache,
        group_by_length: !args.no_group_by_length,
        val_data: match &args.val_data {
            Some(v) => DataSource::parse_list(v)?,
            None => vec![],
        },
        grad_stats: args
            .log_grad_stats
            .then(|| crate::train::run::GradStatsConfig {
                subset: args.grad_stats_subset.clone(),
                window: args.grad_stats_window,
            }),
    };
    let mut cache = crate::train::run::FeatureCache::new(!args.no_feature_cache);
    let r = train_run(
        &cfg,
        &args.out,
        args.resume.as_deref(),
        !args.quiet,
        &mut cache,
    )?;
    let last = r.reports.last().map(|r| r.loss).unwrap_or(f64::NAN);
    println!(
        "trained {} steps in {:.1}s, final loss {last:.4}; adapter: {}",
        r.reports.len(),
        r.wall_s,
        r.adapter_dir.display()
    );
    Ok(())
}
