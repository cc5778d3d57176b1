//! `lntune demo`: flags to a `DemoConfig` (see `jobs::demo`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::DeviceArgs;
use crate::data::shapes::Level;
use crate::jobs::demo::{DemoConfig, run_demo};
use crate::methods::Method;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output directory
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Cache for the pretrained parts (default: $LNTUNE_CACHE or ~/.cache/lntune)
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Wheels (or extracted .gguf/.onnx) copied by hand, for machines without network
    #[arg(long)]
    pub assets: Option<PathBuf>,
    /// Stage-2 method
    #[arg(long, value_enum, default_value = "ln")]
    pub method: Method,
    /// A short smoke run of the whole pipeline for CI (under 3 minutes on 2 cores; too few
    /// steps to learn much)
    #[arg(long)]
    pub quick: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Shapes scenes and questions: `basic` (1-3 distinct shapes; color of a named shape,
    /// count, existence) or `full` (1-5 objects, 7 position-bound question kinds, yes/no and
    /// reasoning questions)
    #[arg(long, value_enum, default_value = "basic")]
    pub level: Level,
    /// Training images (default 1200 basic, 800 full; 48 with --quick)
    #[arg(long)]
    pub train_images: Option<usize>,
    /// Held-out test images (default 240 basic, 100 full; 16 with --quick)
    #[arg(long)]
    pub test_images: Option<usize>,
    /// Stage-1 steps (default 100; 15 with --quick)
    #[arg(long)]
    pub stage1_steps: Option<usize>,
    /// Stage-2 steps (default 300 basic, 180 full; 20 with --quick)
    #[arg(long)]
    pub stage2_steps: Option<usize>,
    /// Stage-2 learning rate (default: the method's)
    #[arg(long)]
    pub lr: Option<f64>,
    /// Test images for POPE, MME and captions (default 24; 8 with --quick; VQA uses all)
    #[arg(long)]
    pub eval_images: Option<usize>,
    /// Image side in pixels (a multiple of 14): DINOv2's patch grid is side/14 on a side
    #[arg(long, default_value_t = 126)]
    pub image_size: usize,
    /// Image tokens per side: the patch grid is average-pooled to pool x pool tokens (the
    /// grid side must be a multiple). The default 3 at 126 px gives 9 tokens, one per cell of
    /// the scenes' 3x3 layout (3x3 patches each)
    #[arg(long, default_value_t = 3)]
    pub pool: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// No progress bars
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let cfg = DemoConfig {
        out: args.out,
        cache: args.cache,
        assets: args.assets,
        method: args.method,
        quick: args.quick,
        seed: args.seed,
        level: args.level,
        train_images: args.train_images,
        test_images: args.test_images,
        stage1_steps: args.stage1_steps,
        stage2_steps: args.stage2_steps,
        lr: args.lr,
        eval_images: args.eval_images,
        image_size: args.image_size,
        pool: args.pool,
        progress: !args.quiet,
    };
    run_demo(&cfg, &args.device.device.device()?)
}
