//! `lntune bench` (step timing): flags to a `TimingConfig`, one child process per method (see
//! `jobs::timing`), a table or JSON lines out.

use std::io::Read;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use super::args::DeviceArgs;
use crate::jobs::timing::time_methods;
use crate::methods::Method;
use crate::train::Recompute;
use crate::train::timing::{StepProfile, StepTiming, TimingConfig, time_steps};
use crate::util::device::WeightDtype;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Methods, comma separated, or `all` (full, lora, ln, attn-qv, mlp, ln-simple)
    #[arg(long, default_value = "ln")]
    pub method: String,
    /// Model preset: `tiny` (the tiny-llava fixture's shape), `small` (the peer's small),
    /// `llava-7b` or `llava-13b` (LLaVA-1.5's exact shapes, random weights)
    #[arg(long, default_value = "small")]
    pub preset: String,
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Total tokens per sample, image tokens included
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Timed steps (median reported)
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed warmup steps
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
    /// Train lntune's default sets (paper: projector, embeddings and head trainable) instead
    /// of the peer harness's sets
    #[arg(long)]
    pub paper_sets: bool,
    /// LoRA rank and alpha (peer: r 8, alpha 16)
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// What the forward keeps for the backward
    #[arg(long, value_enum, default_value = "auto")]
    pub recompute: Recompute,
    /// Also print where a timed step's time goes, per op kind, with the matmuls' GFLOP/s
    /// against this machine's measured matmul peak
    #[arg(long)]
    pub profile: bool,
    /// Print JSON lines instead of the table
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Internal: time the method of the timing config on stdin in this process and print
    /// its JSON line
    #[arg(long, hide = true)]
    pub child: bool,
}

fn parse_methods(s: &str) -> Result<Vec<Method>> {
    if s == "all" {
        return Ok(vec![
            Method::Full,
            Method::Lora,
            Method::Ln,
            Method::AttnQv,
            Method::Mlp,
            Method::LnSimple,
        ]);
    }
    s.split(',')
        .map(|m| {
            Method::from_str(m.trim(), true).map_err(|e| anyhow::anyhow!("--method `{m}`: {e}"))
        })
        .collect()
}

pub fn run(args: BenchArgs, threads: Option<usize>) -> Result<()> {
    let device = args.device.device;
    if args.child {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input)?;
        let cfg: TimingConfig =
            serde_json::from_str(&input).context("bench --child: the timing config on stdin")?;
        let r = time_steps(&cfg, threads, &device.device()?)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let methods = parse_methods(&args.method)?;
    let base = TimingConfig {
        method: methods[0],
        preset: args.preset.clone(),
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        warmup: args.warmup,
        dtype: args.dtype,
        paper_sets: args.paper_sets,
        lora_r: args.lora_r,
        lora_alpha: args.lora_alpha,
        recompute: args.recompute,
        profile: args.profile,
    };
    if !args.json {
        println!(
            "preset {} | batch {} | seq {} (image tokens included) | {} threads | {} | {} timed steps after {} warmup",
            args.preset,
            args.batch,
            args.seq,
            threads.map(|t| t.to_string()).unwrap_or("all".into()),
            args.dtype.name(),
            args.steps,
            args.warmup
        );
        println!(
            "{:<10} {:>12} {:>8} {:>10} {:>17} {:>9} {:>10} {:>10} {:>10} {:>10} {:>16}  loss first -> last",
            "method",
            "trainable",
            "% total",
            "median s",
            "min / max s",
            "tokens/s",
            "peak RSS",
            if device == crate::util::device::DeviceChoice::Cpu {
                "heap held"
            } else {
                "GPU held"
            },
            "planned",
            "other CPU",
            "recompute"
        );
    }
    let results = time_methods(&base, &methods, threads, device, |r: &StepTiming| {
        if args.json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        } else {
            println!(
                "{:<10} {:>12} {:>7.2}% {:>10.3} {:>8.3} / {:<6.3} {:>9.1} {:>6.0} MiB {:>10} {:>6.0} MiB {:>9.0}% {:>16}  {:.3} -> {:.3}",
                r.method,
                r.trainable,
                100.0 * r.trainable as f64 / r.total as f64,
                r.median_step_s,
                r.min_step_s,
                r.max_step_s,
                r.tokens_per_s,
                r.peak_rss_mib,
                r.peak_device_mib
                    .or(r.peak_heap_mib)
                    .map_or("-".into(), |m| format!("{m:.0} MiB")),
                r.planned_peak_mib,
                100.0 * r.other_cpu_share,
                r.recompute,
                r.loss_first,
                r.loss_last
            );
        }
    })?;
    if !args.json {
        for r in &results {
            if let Some(p) = &r.profile {
                print_profile(r, p);
            }
        }
    }
    Ok(())
}

/// Where one method's timed step went: seconds and share per op kind, the matmuls'
/// GFLOP/s and their share of the measured peak.
fn print_profile(r: &StepTiming, p: &StepProfile) {
    let step: f64 = p.rows.iter().map(|x| x.seconds).sum::<f64>() + p.other_s;
    println!(
        "\nprofile: {} ({}), mean step {:.3} s; matmul peak measured here: {:.0} GFLOP/s ({}, 1024^3)",
        r.method, r.dtype, step, p.peak_gflops, p.peak_dtype
    );
    println!(
        "  {:<24} {:>9} {:>7} {:>9} {:>10} {:>7}",
        "op kind", "s/step", "share", "GFLOP", "GFLOP/s", "% peak"
    );
    for x in &p.rows {
        let rate = if x.gflop > 0.0 && x.seconds > 0.0 {
            x.gflop / x.seconds
        } else {
            f64::NAN
        };
        let (rate_s, peak_s) = if rate.is_finite() {
            (
                format!("{rate:.1}"),
                format!("{:.0}%", 100.0 * rate / p.peak_gflops),
            )
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "  {:<24} {:>9.4} {:>6.1}% {:>9.2} {:>10} {:>7}",
            x.kind,
            x.seconds,
            100.0 * x.seconds / step,
            x.gflop,
            rate_s,
            peak_s
        );
    }
    println!(
        "  {:<24} {:>9.4} {:>6.1}%",
        "other",
        p.other_s,
        100.0 * p.other_s / step
    );
    println!(
        "  the step's {:.1} GFLOP of products at the measured peak: {:.3} s ({:.0}% of this step)",
        p.rows.iter().map(|x| x.gflop).sum::<f64>(),
        p.products_floor_s,
        100.0 * p.products_floor_s / step
    );
}
