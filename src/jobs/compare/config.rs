//! What a comparison is given (`lntune compare`'s flags, typed).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::image::ImageProcessing;
use crate::data::llava::DataSource;
use crate::data::template::TemplateName;
use crate::eval::run::EvalConfig;
use crate::methods::Method;
use crate::util::device::DeviceChoice;

/// The ablations `--ablation` adds.
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ablation {
    /// LayerNorm + connector, LayerNorm only, connector only
    Connector,
    /// LN tuning on equal-size subsets of conversation, detail, reasoning and mixed data
    DataType,
}

/// Everything a comparison needs.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    pub model: PathBuf,
    /// the stage-1 adapter every arm starts from
    pub init_adapter: Option<PathBuf>,
    /// stage-2 data
    pub data: Vec<DataSource>,
    pub images: Option<PathBuf>,
    pub methods: Vec<Method>,
    /// learning rates given per method (the others keep their defaults)
    pub lrs: Vec<(Method, f64)>,
    /// try each method's rate times each sweep factor on a held-out split
    pub lr_sweep: bool,
    pub sweep_factors: Vec<f64>,
    /// samples held out from the data as the sweep's validation split
    pub val_samples: usize,
    pub steps: Option<usize>,
    pub batch: usize,
    pub grad_accum: usize,
    pub max_length: usize,
    /// the first of `seeds`: the sweep's, the ablations' and the data split's
    pub seed: u64,
    /// every method is trained at each (the report gives mean and spread across them)
    pub seeds: Vec<u64>,
    pub template: Option<TemplateName>,
    /// LoRA rank of the lora arm (alpha twice the rank)
    pub lora_r: usize,
    /// keep embed_tokens and lm_head frozen in every method that would train them
    pub freeze_embed_head: bool,
    /// the evaluation every chosen arm gets (its adapter filled in per arm)
    pub eval: EvalConfig,
    /// further benchmarks each chosen arm is evaluated on (`eval-<bench>/` in its folder)
    pub also_eval: Vec<crate::eval::benchmarks::BenchFiles>,
    pub ablations: Vec<Ablation>,
    /// data-type ablation: (kind, file)
    pub data_types: Vec<(String, PathBuf)>,
    /// data-type ablation: samples per arm
    pub data_type_samples: usize,
    /// data-type ablation: trained tokens per arm instead (each arm trains
    /// `data_type_epochs` epochs over its subset)
    pub data_type_tokens: Option<usize>,
    pub data_type_epochs: f64,
    pub analysis: bool,
    pub similarity_samples: usize,
    pub image: ImageProcessing,
    pub out: PathBuf,
    pub device: DeviceChoice,
    pub progress: bool,
}
