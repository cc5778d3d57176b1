//! `lntune plan`: what a method trains and what a step will cost, from config files alone
//! (no weights are read), so that 7B/13B runs can be planned on any machine.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::DTypeArg;
use super::method_args::MethodArgs;
use crate::methods::Role;
use crate::model::spec::ModelSpec;
use crate::train::{DEFAULT_ACTIVATION_BUDGET, Recompute, train_flags};

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Model: llava-hf directory, directory with compose.json, HF LLM directory or .gguf
    /// file (only config files and GGUF metadata are read)
    #[arg(long)]
    pub model: PathBuf,
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
    pub dtype: DTypeArg,
    #[arg(long, value_enum, default_value = "auto")]
    pub recompute: Recompute,
    /// Print JSON instead of tables
    #[arg(long)]
    pub json: bool,
}

/// Parameter counts of one group.
#[derive(Debug, Serialize, Default, Clone)]
pub struct GroupCount {
    pub params: usize,
    pub trainable: usize,
}

/// What `plan` computes.
#[derive(Debug, Serialize)]
pub struct Plan {
    pub method: String,
    pub groups: BTreeMap<String, GroupCount>,
    pub total_params: usize,
    pub trainable_params: usize,
    pub trainable_percent: f64,
    pub recompute: String,
    pub memory_bytes: BTreeMap<String, usize>,
}

/// Counts and a memory estimate for `args`.
pub fn plan(args: &PlanArgs) -> Result<Plan> {
    let spec = ModelSpec::from_path(&args.model)?;
    let method = args.method.config()?;
    let mut specs = spec.param_specs();
    let flags = method.apply(&mut specs)?;
    let mut groups: BTreeMap<String, GroupCount> = BTreeMap::new();
    for (s, t) in specs.iter().zip(&flags) {
        let g = groups.entry(s.role.group().to_string()).or_default();
        g.params += s.numel();
        if *t {
            g.trainable += s.numel();
        }
    }
    let vision = spec.vision_params();
    if vision > 0 {
        groups.insert(
            Role::Vision.group().into(),
            GroupCount {
                params: vision,
                trainable: 0,
            },
        );
    }
    let total: usize = groups.values().map(|g| g.params).sum();
    let trainable: usize = groups.values().map(|g| g.trainable).sum();

    // memory model of one step (see the README): bytes
    let (b, t) = (args.batch, args.seq);
    let cfg = &spec.llm;
    let tf = train_flags(&specs, &flags, cfg.num_layers);
    let frozen_bytes = match args.dtype {
        DTypeArg::F32 => 4,
        DTypeArg::Bf16 => 2,
    };
    let policy = args
        .recompute
        .resolve(cfg, &tf, b, t, DEFAULT_ACTIVATION_BUDGET);
    let first = tf.first_block_needed();
    let saved: usize = match first {
        Some(f) => (f..cfg.num_layers)
            .map(|l| policy.bytes_per_layer(cfg, &tf.blocks[l], b, t))
            .sum(),
        None => 0,
    };
    // one block's backward: its recomputed context (selective size, plus the attention
    // probabilities) and gradients of the same order
    let blk = tf.blocks.first().cloned().unwrap_or_default();
    let workspace = 2 * Recompute::None.bytes_per_layer(cfg, &blk, b, t);
    // the head runs on scored tokens only; B·T is the upper bound (logits + their gradient)
    let head = 2 * 4 * b * t * cfg.vocab_size;
    let mut memory = BTreeMap::new();
    memory.insert("frozen weights".into(), (total - trainable) * frozen_bytes);
    memory.insert(
        "trainable weights + grads + Adam m, v (f32)".into(),
        4 * 4 * trainable,
    );
    memory.insert("saved activations".into(), saved);
    memory.insert("peak block workspace".into(), workspace);
    memory.insert("head on scored tokens (<= B·T)".into(), head);
    Ok(Plan {
        method: method.method.name().into(),
        groups,
        total_params: total,
        trainable_params: trainable,
        trainable_percent: 100.0 * trainable as f64 / total as f64,
        recompute: format!("{policy:?}").to_lowercase(),
        memory_bytes: memory,
    })
}

fn gib(b: usize) -> String {
    let g = b as f64 / (1u64 << 30) as f64;
    if g >= 1.0 {
        format!("{g:.2} GiB")
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn commas(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn run(args: PlanArgs) -> Result<()> {
    let p = plan(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    println!("model   {}", args.model.display());
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
    let mut sum = 0;
    for (k, v) in &p.memory_bytes {
        println!("  {k:<46} {:>12}", gib(*v));
        sum += v;
    }
    println!("  {:<46} {:>12}", "total (peak, approx.)", gib(sum));
    Ok(())
}
