//! `lntune data shapes`: writes the generated `shapes` benchmark.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::data::shapes::{Level, ShapesConfig, generate};

#[derive(Args, Debug)]
pub struct DataArgs {
    /// Dataset to generate: `shapes`
    pub what: String,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training images
    #[arg(long, default_value_t = 1200)]
    pub train: usize,
    /// Test images
    #[arg(long, default_value_t = 240)]
    pub test: usize,
    /// Image side in pixels
    #[arg(long, default_value_t = 224)]
    pub size: usize,
    /// Scenes and questions: `full` (1-5 objects of 4 shapes in 2 sizes, 7 short-answer kinds,
    /// yes/no and reasoning questions) or `basic` (1-3 objects of distinct shapes; the color
    /// of a named shape, the number of shapes, existence of a colored shape)
    #[arg(long, value_enum, default_value = "full")]
    pub level: Level,
}

pub fn run(args: DataArgs) -> Result<()> {
    if args.what != "shapes" {
        bail!("data `{}`: unknown dataset (shapes)", args.what);
    }
    if args.size < 48 {
        bail!("--size {} is too small (at least 48 px)", args.size);
    }
    // images lntune itself could not read back are not written
    let limit = crate::data::image::max_image_pixels();
    if args.size.saturating_mul(args.size) > limit {
        bail!(
            "--size {}: images of {0}x{0} pixels are over the limit of {limit} pixels (LNTUNE_MAX_IMAGE_PIXELS)",
            args.size
        );
    }
    let cfg = ShapesConfig {
        seed: args.seed,
        train: args.train,
        test: args.test,
        size: args.size,
        level: args.level,
    };
    let s = generate(&cfg, &args.out)?;
    for (f, n) in &s.files {
        println!("{:<28} {n:>7}", f);
    }
    println!("written to {}", args.out.display());
    Ok(())
}
