//! `lntune bench`: times training steps of each method on a randomly initialised model and
//! prints median step time, tokens/s and peak RSS, one line per method. `--preset small` is
//! the PyTorch peer harness's `small` model (shared/peer/bench.py), with its batch layout
//! (1 bos + image tokens + text, the second half of the text supervised) and, by default,
//! its trainable sets (embeddings and head frozen except for `full`), so the numbers compare
//! directly with its RESULTS.md. Each method runs in its own process so that peak RSS is
//! per method.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::DTypeArg;
use crate::methods::{Method, MethodConfig};
use crate::model::config::LlavaConfigFile;
use crate::model::mllm::{Batch, LlavaSpec, Mllm};
use crate::rng::Rng;
use crate::train::Recompute;
use crate::train::optim::AdamWConfig;
use crate::train::schedule::Schedule;
use crate::train::trainer::{Trainer, TrainerConfig};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Methods, comma separated, or `all` (full, lora, ln, attn-qv, mlp, ln-simple)
    #[arg(long, default_value = "ln")]
    pub method: String,
    /// Model preset: `tiny` (the tiny-llava fixture's shape) or `small` (the peer's small)
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
    pub dtype: DTypeArg,
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
    /// Print JSON lines instead of the table
    #[arg(long)]
    pub json: bool,
    /// Internal: run one method in this process and print its JSON line
    #[arg(long, hide = true)]
    pub child: bool,
}

const TINY: &str = r#"{"model_type": "llava", "image_token_index": 511, "projector_hidden_act": "gelu",
 "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
 "text_config": {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4,
   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256, "rms_norm_eps": 1e-5,
   "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": false},
 "vision_config": {"model_type": "clip_vision_model", "image_size": 56, "patch_size": 14, "hidden_size": 64,
   "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "hidden_act": "quick_gelu",
   "layer_norm_eps": 1e-5}}"#;

const SMALL: &str = r#"{"model_type": "llava", "image_token_index": 49151, "projector_hidden_act": "gelu",
 "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
 "text_config": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 12,
   "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "rms_norm_eps": 1e-5,
   "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": false},
 "vision_config": {"model_type": "clip_vision_model", "image_size": 224, "patch_size": 16, "hidden_size": 384,
   "num_hidden_layers": 6, "num_attention_heads": 6, "intermediate_size": 1536, "hidden_act": "quick_gelu",
   "layer_norm_eps": 1e-5}}"#;

/// A named preset's resolved config.
pub fn preset(name: &str) -> Result<LlavaSpec> {
    let json = match name {
        "tiny" => TINY,
        "small" => SMALL,
        other => bail!("--preset `{other}` is unknown (tiny, small)"),
    };
    let file: LlavaConfigFile = serde_json::from_str(json).expect("preset JSON is valid");
    LlavaSpec::from_file(&file, &format!("preset {name}"))
}

/// The peer harness's batch: `<bos>` + P image tokens + text ids U[3, image id); labels on
/// the second half of the text; pixels N(0, 1).
pub fn synthetic_batch(
    spec: &LlavaSpec,
    b: usize,
    s: usize,
    seed: u64,
    dev: &Device,
) -> Result<Batch> {
    let size = spec.vision.image_size();
    let p = (size / spec.vision.patch_size()).pow(2);
    if s < p + 3 {
        bail!("--seq {s} leaves no text after 1 bos + {p} image tokens");
    }
    let n_text = s - 1 - p;
    let n_prompt = 1 + p + n_text / 2;
    let img = spec.image_token_id;
    let mut rng = Rng::new(seed);
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..b {
        let mut row = vec![1u32];
        row.extend(std::iter::repeat_n(img, p));
        row.extend((0..n_text).map(|_| 3 + rng.below(img as usize - 3) as u32));
        labels.push(
            row.iter()
                .enumerate()
                .map(|(i, &t)| if i < n_prompt { -100 } else { t as i64 })
                .collect(),
        );
        ids.push(row);
    }
    Ok(Batch {
        attention_mask: vec![vec![true; s]; b],
        input_ids: ids,
        labels: Some(labels),
        pixel_values: Some(rng.normal_tensor(&[b, 3, size, size], 1.0, DType::F32, dev)?),
        vision_features: None,
    })
}

/// One method's result.
#[derive(Debug, Serialize, Deserialize)]
pub struct BenchResult {
    pub method: String,
    pub preset: String,
    pub batch: usize,
    pub seq: usize,
    pub threads: usize,
    pub dtype: String,
    pub recompute: String,
    pub trainable: usize,
    pub total: usize,
    pub median_step_s: f64,
    pub min_step_s: f64,
    pub max_step_s: f64,
    pub tokens_per_s: f64,
    pub peak_rss_mib: f64,
    pub rss_after_build_mib: f64,
    pub other_cpu_share: f64,
    pub loss_first: f64,
    pub loss_last: f64,
}

/// The trainable set of a method as the peer harness defines it (or lntune's default).
pub fn bench_method(m: Method, args: &BenchArgs) -> MethodConfig {
    let mut cfg = MethodConfig::new(m);
    if !args.paper_sets && m != Method::Full {
        cfg.train_embed = false;
        cfg.train_head = false;
    }
    cfg.lora.r = args.lora_r;
    cfg.lora.alpha = args.lora_alpha;
    cfg
}

fn parse_methods(s: &str) -> Result<Vec<Method>> {
    use clap::ValueEnum;
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
    let methods = parse_methods(&args.method)?;
    if args.child {
        let r = run_one(&args, methods[0], threads)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    if !args.json {
        println!(
            "preset {} | batch {} | seq {} (image tokens included) | {} threads | {} | {} timed steps after {} warmup",
            args.preset,
            args.batch,
            args.seq,
            threads.map(|t| t.to_string()).unwrap_or("all".into()),
            if args.dtype == DTypeArg::F32 {
                "f32"
            } else {
                "bf16"
            },
            args.steps,
            args.warmup
        );
        println!(
            "{:<10} {:>12} {:>8} {:>10} {:>17} {:>9} {:>10} {:>10} {:>16}  loss first -> last",
            "method",
            "trainable",
            "% total",
            "median s",
            "min / max s",
            "tokens/s",
            "peak RSS",
            "other CPU",
            "recompute"
        );
    }
    let exe = std::env::current_exe().context("cannot find the lntune executable")?;
    for m in methods {
        let mut cmd = Command::new(&exe);
        if let Some(t) = threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        cmd.args([
            "bench",
            "--child",
            "--method",
            m.name(),
            "--preset",
            &args.preset,
        ])
        .args([
            "--batch",
            &args.batch.to_string(),
            "--seq",
            &args.seq.to_string(),
        ])
        .args([
            "--steps",
            &args.steps.to_string(),
            "--warmup",
            &args.warmup.to_string(),
        ])
        .args([
            "--dtype",
            if args.dtype == DTypeArg::F32 {
                "f32"
            } else {
                "bf16"
            },
        ])
        .args(["--recompute", recompute_name(args.recompute)])
        .args([
            "--lora-r",
            &args.lora_r.to_string(),
            "--lora-alpha",
            &args.lora_alpha.to_string(),
        ]);
        if args.paper_sets {
            cmd.arg("--paper-sets");
        }
        let out = cmd
            .output()
            .context("cannot run the benchmark child process")?;
        if !out.status.success() {
            bail!(
                "bench {}: {}",
                m.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let r: BenchResult = serde_json::from_str(line.trim()).context("benchmark child output")?;
        if args.json {
            println!("{}", line.trim());
        } else {
            println!(
                "{:<10} {:>12} {:>7.2}% {:>10.3} {:>8.3} / {:<6.3} {:>9.1} {:>6.0} MiB {:>9.0}% {:>16}  {:.3} -> {:.3}",
                r.method,
                r.trainable,
                100.0 * r.trainable as f64 / r.total as f64,
                r.median_step_s,
                r.min_step_s,
                r.max_step_s,
                r.tokens_per_s,
                r.peak_rss_mib,
                100.0 * r.other_cpu_share,
                r.recompute,
                r.loss_first,
                r.loss_last
            );
        }
    }
    Ok(())
}

fn run_one(args: &BenchArgs, m: Method, threads: Option<usize>) -> Result<BenchResult> {
    let dev = Device::Cpu;
    let spec = preset(&args.preset)?;
    let mut model = Mllm::random_llava(&spec, args.dtype.dtype(), &dev, 0)?;
    let method = bench_method(m, args);
    let total_steps = args.warmup + args.steps;
    let cfg = TrainerConfig {
        // PyTorch's AdamW defaults as the peer used them: lr 1e-4, wd 0.01 on every tensor
        optim: AdamWConfig {
            weight_decay: 0.01,
            decay_all: true,
            ..Default::default()
        },
        schedule: Schedule {
            lr: 1e-4,
            warmup_steps: 0,
            total_steps: usize::MAX / 2,
            min_lr_ratio: 1.0,
        },
        max_grad_norm: None,
        seed: 0,
        recompute: args.recompute,
        activation_budget: crate::train::DEFAULT_ACTIVATION_BUDGET,
    };
    let mut trainer = Trainer::new(&mut model, &method, cfg)?;
    let batch = synthetic_batch(&spec, args.batch, args.seq, 0, &dev)?;
    let rss_after_build = peak_rss_mib();
    let total = model
        .param_specs()
        .iter()
        .filter(|s| s.base.is_none())
        .map(|s| s.numel())
        .sum::<usize>()
        + trainer
            .setup
            .specs
            .iter()
            .filter(|s| s.base.is_some())
            .map(|s| s.numel())
            .sum::<usize>()
        + model.vision_param_count();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let (mut busy0, mut own0, mut wall0) = (0.0, 0.0, Instant::now());
    for i in 0..total_steps {
        if i == args.warmup {
            busy0 = machine_busy_s();
            own0 = own_cpu_s();
            wall0 = Instant::now();
        }
        let t = Instant::now();
        let r = trainer.step(&mut model, std::slice::from_ref(&batch))?;
        let dt = t.elapsed().as_secs_f64();
        if i >= args.warmup {
            times.push(dt);
        }
        losses.push(r.loss);
    }
    let wall = wall0.elapsed().as_secs_f64();
    let others = (machine_busy_s() - busy0) - (own_cpu_s() - own0);
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    Ok(BenchResult {
        method: m.name().into(),
        preset: args.preset.clone(),
        batch: args.batch,
        seq: args.seq,
        threads: threads.unwrap_or(ncpu as usize),
        dtype: format!("{:?}", args.dtype.dtype()),
        recompute: {
            let r = args.recompute.resolve(
                &model.llm.cfg,
                &trainer.setup.flags,
                args.batch,
                args.seq,
                crate::train::DEFAULT_ACTIVATION_BUDGET,
            );
            if args.recompute == Recompute::Auto {
                format!("auto: {}", recompute_name(r))
            } else {
                recompute_name(r).into()
            }
        },
        trainable: trainer.setup.n_trainable(),
        total,
        median_step_s: median,
        min_step_s: sorted[0],
        max_step_s: *sorted.last().expect("steps > 0"),
        tokens_per_s: (args.batch * args.seq) as f64 / median,
        peak_rss_mib: peak_rss_mib(),
        rss_after_build_mib: rss_after_build,
        other_cpu_share: (others / (ncpu * wall)).clamp(0.0, 1.0),
        loss_first: losses[0],
        loss_last: *losses.last().expect("steps > 0"),
    })
}

fn recompute_name(r: Recompute) -> &'static str {
    match r {
        Recompute::Auto => "auto",
        Recompute::Full => "full",
        Recompute::Selective => "selective",
        Recompute::None => "none",
    }
}

/// Peak resident set size of this process (VmHWM), MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Busy CPU seconds of the whole machine, from /proc/stat.
fn machine_busy_s() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let v: Vec<f64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 7 {
        return 0.0;
    }
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v.get(7).copied().unwrap_or(0.0);
    busy / 100.0 // USER_HZ
}

/// This process's user + system CPU seconds, from /proc/self/stat.
fn own_cpu_s() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // fields after the command: state(skipped, not numeric) ... utime is field 14 overall
    if f.len() < 13 {
        return 0.0;
    }
    (f[10] + f[11]) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_peer_counts() {
        // shared/peer/RESULTS.md: small total 110,678,208 params
        let s = preset("small").unwrap();
        let keys = crate::model::mllm::KeyPrefixes {
            llm_body: "l".into(),
            lm_head: "h".into(),
            vision: "v".into(),
            projector: "p".into(),
        };
        let n: usize = crate::methods::llm_specs(&s.text, &keys)
            .iter()
            .map(|p| p.numel())
            .sum::<usize>()
            + crate::methods::projector_specs(&s.projector, &keys)
                .iter()
                .map(|p| p.numel())
                .sum::<usize>()
            + crate::methods::vision_param_count(&s.vision);
        assert_eq!(n, 110_678_208);
    }

    #[test]
    fn synthetic_batch_layout() {
        let s = preset("small").unwrap();
        let b = synthetic_batch(&s, 2, 256, 0, &Device::Cpu).unwrap();
        assert_eq!(b.input_ids[0].len(), 256);
        assert_eq!(b.input_ids[0].iter().filter(|&&t| t == 49151).count(), 196);
        let scored = crate::train::step::count_scored(&b).unwrap();
        assert_eq!(scored, 2 * 30); // 59 text tokens, the last 30 supervised
    }
}
