//! `lntune plan`: flags to a `PlanConfig`, the plan printed as tables or JSON.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::MethodArgs;
use crate::methods::Method;
use crate::model::presets::preset_json;
use crate::train::Recompute;
use crate::train::plan::{PlanConfig, PlanModel, plan};
use crate::util::commas;
use crate::util::device::WeightDtype;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Model: llava-hf directory, directory with compose.json, HF LLM directory or .gguf
    /// file (only config files and GGUF metadata are read)
    #[arg(long, required_unless_present = "preset", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A named model shape instead of --model: tiny, small, llava-7b, llava-13b (the
    /// shapes `lntune bench --preset` trains)
    #[arg(long)]
    pub preset: Option<String>,
    #[command(flatten)]
    pub method: MethodArgs,
    /// Micro-batch size for the memory estimate
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens per sample (image tokens included) for the memory estimate
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    /// Storage dtype of the frozen weights
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
    #[arg(long, value_enum, default_value = "auto")]
    pub recompute: Recompute,
    /// Supervised (answer) tokens per sample: the head runs on these rows only [default:
    /// every token, the upper bound]
    #[arg(long)]
    pub scored: Option<usize>,
    /// Print JSON instead of tables
    #[arg(long)]
    pub json: bool,
    /// With --preset: print the preset's config.json (llava-hf format, e.g. for building
    /// the same model in transformers) and nothing else
    #[arg(long)]
    pub print_config: bool,
}

fn gib(b: usize) -> String {
    let g = b as f64 / (1u64 << 30) as f64;
    if g >= 1.0 {
        format!("{g:.2} GiB")
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

pub fn run(args: PlanArgs) -> Result<()> {
    if args.print_config {
        let Some(name) = &args.preset else {
            anyhow::bail!("--print-config prints a preset's config: it needs --preset");
        };
        let json: serde_json::Value = serde_json::from_str(preset_json(name)?)?;
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let cfg = PlanConfig {
        model: match (&args.model, &args.preset) {
            (Some(p), _) => PlanModel::Path(p.clone()),
            (None, Some(name)) => PlanModel::Preset(name.clone()),
            (None, None) => anyhow::bail!("--model or --preset is needed"),
        },
        method: args.method.config_or(Method::Ln)?,
        batch: args.batch,
        seq: args.seq,
        dtype: args.dtype.dtype(),
        recompute: args.recompute,
        scored: args.scored,
    };
    let p = plan(&cfg)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    match (&args.model, &args.preset) {
        (Some(p), _) => println!("model   {}", p.display()),
        (None, name) => println!("model   preset {}", name.as_deref().unwrap_or("")),
    }
    println!("method  {}", p.method);
    println!(
        "{:<22} {:>16} {:>16} {:>9}",
        "group", "params", "trainable", "% total"
    );
    for (name, g) in &p.groups {
        println!(
            "{:<22} {:>16} {:>16} {:>8.3}%",
            name,
            commas(g.params),
            commas(g.trainable),
            100.0 * g.trainable as f64 / p.total_params as f64
        );
    }
    println!(
        "{:<22} {:>16} {:>16} {:>8.2}%",
        "total",
        commas(p.total_params),
        commas(p.trainable_params),
        p.trainable_percent
    );
    println!(
        "memory estimate: batch {} x {} tokens, frozen weights {:?}, recompute {}",
        args.batch,
        args.seq,
        args.dtype.dtype(),
        p.recompute
    );
    for (k, v) in &p.memory_bytes {
        println!("  {k:<46} {:>12}", gib(*v));
    }
    println!(
        "  {:<46} {:>12}",
        "total (peak, approx.)",
        gib(p.total_bytes())
    );
    println!(
        "data-parallel: each rank all-reduces {} of f32 gradients per optimizer step",
        gib(p.allreduce_bytes)
    );
    Ok(())
}
