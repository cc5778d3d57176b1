//! `RunConfig`: everything that defines a training run, as `lntune train --config`, the
//! run's `config.json` and the jobs that build runs (demo, compare) hold it.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::optim::AdamWConfig;
use super::schedule::Schedule;
use super::trainer::TrainerConfig;
use super::{DEFAULT_ACTIVATION_BUDGET, Recompute};
use crate::data::dataset::ExampleSpec;
use crate::data::image::{ImageProcessing, Preprocess};
use crate::data::llava::DataSource;
use crate::data::template::TemplateName;
use crate::methods::MethodConfig;
use crate::model::mllm::Mllm;
use crate::util::checks;
use crate::util::device::WeightDtype;
use crate::util::files::{read_json, read_text};

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
    /// also keep them on disk here, shared with other runs of the same base model (compare
    /// points every arm's training and evaluation at one store)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature_dir: Option<PathBuf>,
    /// batch examples of similar length together (LLaVA's group_by_modality_length)
    pub group_by_length: bool,
    /// accept absolute image paths and paths with `..` in the data (else a sample whose
    /// image path leaves `images` is skipped and counted)
    pub allow_any_image_path: bool,
    /// record gradient-variance statistics in grad_stats.jsonl
    pub grad_stats: Option<GradStatsConfig>,
    /// where else the metrics go: `tensorboard` (event files beside metrics.jsonl)
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub report_to: Vec<ReportTo>,
}

/// A metrics sink beside metrics.jsonl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    /// TensorBoard event files (`out/events.out.tfevents.*`)
    Tensorboard,
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
            feature_dir: None,
            group_by_length: true,
            allow_any_image_path: false,
            grad_stats: None,
            report_to: vec![],
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
    /// Reads a run config file, JSON or YAML by its extension (`.yaml`, `.yml`); fields
    /// left out keep their defaults, unknown fields are refused.
    pub fn read(path: &Path) -> Result<Self> {
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        if !yaml {
            return read_json(path);
        }
        // YAML's parser holds the whole document: a run config is small, a large file is a
        // wrong path
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if size > 1 << 20 {
            bail!(
                "{}: {size} bytes, more than a run config (1 MiB)",
                path.display()
            );
        }
        let text = read_text(path)?;
        yaml_serde::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
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
    pub(super) fn example_spec<'a>(
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
    pub(super) fn step_counts(&self, n: usize) -> (usize, usize) {
        let per_step = self.batch * self.grad_accum;
        let total = self.steps.unwrap_or_else(|| {
            ((self.epochs * n as f64) / per_step as f64).ceil().max(1.0) as usize
        });
        let warmup = self
            .warmup_steps
            .unwrap_or_else(|| (self.warmup_ratio * total as f64).ceil() as usize);
        (total, warmup)
    }

    pub(super) fn trainer_config(&self, total: usize, warmup: usize) -> TrainerConfig {
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
            compute: self.dtype,
        }
    }
}
