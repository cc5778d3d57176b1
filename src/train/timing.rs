//! Timing training steps of one method on a randomly initialised model (`lntune bench`):
//! median step time, tokens/s and peak RSS. `--preset small` is the PyTorch peer harness's
//! `small` model (shared/peer/bench.py), with its batch layout (1 bos + image tokens +
//! text, the second half of the text supervised) and, by default, its trainable sets
//! (embeddings and head frozen except for `full`), so the numbers compare directly with its
//! RESULTS.md.

use std::time::Instant;

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::AdamWConfig;
use super::plan::{PlanConfig, PlanModel, check_batch_shape, plan, step_activation_bounds};
use super::schedule::Schedule;
use super::trainer::{Trainer, TrainerConfig};
use super::{DEFAULT_ACTIVATION_BUDGET, Recompute};
use crate::methods::{Method, MethodConfig};
use crate::model::batch::Batch;
use crate::model::load::LlavaSpec;
use crate::model::mllm::Mllm;
use crate::model::presets::preset;
use crate::util::checks;
use crate::util::device::WeightDtype;
use crate::util::heap;
use crate::util::process;
use crate::util::profile::{self, ProfileRow};
use crate::util::rng::Rng;

/// What one timing measures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimingConfig {
    pub method: Method,
    /// model preset (`model::presets::PRESETS`)
    pub preset: String,
    pub batch: usize,
    /// total tokens per sample, image tokens included
    pub seq: usize,
    /// timed steps (the median is reported)
    pub steps: usize,
    /// untimed warmup steps
    pub warmup: usize,
    /// storage dtype of the frozen weights
    pub dtype: WeightDtype,
    /// lntune's default trainable sets instead of the peer harness's
    pub paper_sets: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub recompute: Recompute,
    /// time each op kind over the timed steps (`bench --profile`)
    #[serde(default)]
    pub profile: bool,
}

impl TimingConfig {
    /// Every number in its range (each error names the flag).
    pub fn validate(&self) -> Result<()> {
        checks::positive("--batch", self.batch)?;
        checks::positive("--seq", self.seq)?;
        checks::positive("--steps", self.steps)?;
        checks::positive("--lora-r", self.lora_r)?;
        checks::finite_positive("--lora-alpha", self.lora_alpha)
    }
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

/// One method's timing, as `lntune bench --json` prints it.
#[derive(Debug, Serialize, Deserialize)]
pub struct StepTiming {
    pub method: String,
    pub preset: String,
    pub batch: usize,
    pub seq: usize,
    pub threads: usize,
    pub dtype: String,
    /// how the products ran (`ops::products_name`): `f32`, `bf16 on AMX`, `bf16 on AVX-512
    /// BF16`, `f32 from bf16` (no bf16 kernel on this CPU: each frozen bf16 weight is
    /// widened to f32 for its product, which `plan` does not model), `bf16` on a GPU
    #[serde(default)]
    pub products: String,
    pub recompute: String,
    pub trainable: usize,
    pub total: usize,
    pub median_step_s: f64,
    pub min_step_s: f64,
    pub max_step_s: f64,
    pub tokens_per_s: f64,
    pub peak_rss_mib: f64,
    pub rss_after_build_mib: f64,
    /// the most live heap bytes during the steps (weights included), where the binary
    /// counts them (`util::heap`): what `lntune plan` predicts on the CPU
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_heap_mib: Option<f64>,
    /// `lntune plan`'s estimate of the step's peak for this configuration
    #[serde(default)]
    pub planned_peak_mib: f64,
    /// on a GPU: the most memory the device held for the run (weights included)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_device_mib: Option<f64>,
    pub other_cpu_share: f64,
    pub loss_first: f64,
    pub loss_last: f64,
    /// with `profile`: where a timed step's time went
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<StepProfile>,
}

/// Seconds and GFLOP per timed step by op kind, and the matmul peak measured on this
/// machine (large square products in the step's matmul dtype, same threads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepProfile {
    pub rows: Vec<ProfileRow>,
    /// the step's wall time minus the kinds' sum (residual adds, reshapes, bookkeeping)
    pub other_s: f64,
    pub peak_gflops: f64,
    pub peak_dtype: String,
    /// seconds the step's products (every row's GFLOP) would take at the measured peak: a
    /// floor on the step of any implementation that computes the same products here
    #[serde(default)]
    pub products_floor_s: f64,
}

/// GFLOP/s of `n`×`n` by `n`×`n` products as a training step runs them in `dtype` (an
/// f32 activation times an f32 or bf16 weight, `ops::matmul_in`): the best of a few runs.
pub fn matmul_peak_gflops(n: usize, dtype: DType, dev: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let t = Instant::now();
        let c = crate::ops::matmul_in(&a, &b, dtype)?;
        let _ = c.dims();
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(profile::matmul_flops(n, n, n) as f64 * 1e-9 / best)
}

/// The trainable set of a method as the peer harness defines it (or lntune's default).
pub fn timing_method(m: Method, args: &TimingConfig) -> MethodConfig {
    let mut cfg = MethodConfig::new(m);
    if !args.paper_sets && m != Method::Full {
        cfg.train_embed = false;
        cfg.train_head = false;
    }
    cfg.lora.r = args.lora_r;
    cfg.lora.alpha = args.lora_alpha;
    cfg
}

/// Times `cfg.steps` training steps (after `cfg.warmup` untimed ones) of one method on a
/// random model of the preset, in this process.
pub fn time_steps(cfg: &TimingConfig, threads: Option<usize>, dev: &Device) -> Result<StepTiming> {
    cfg.validate()?;
    let (args, m) = (cfg, cfg.method);
    let spec = preset(&args.preset)?;
    check_batch_shape(&spec.text, args.batch, args.seq)?;
    let context = spec.text.max_position_embeddings;
    if args.seq > context {
        bail!(
            "--seq {} is longer than the preset's context of {context} tokens",
            args.seq
        );
    }
    // refused before anything is allocated: what the step must hold at least
    let (least, _) = step_activation_bounds(&spec.text, args.batch, args.seq);
    if let Some(total) = process::total_memory_bytes()
        && least > total as f64
    {
        bail!(
            "--batch {} x --seq {}: one step needs at least {:.1} GiB of activations, more than this machine's {:.1} GiB",
            args.batch,
            args.seq,
            least / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        );
    }
    let mut model = Mllm::random_llava(&spec, args.dtype.dtype(), dev, 0)?;
    let method = timing_method(m, args);
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
        activation_budget: DEFAULT_ACTIVATION_BUDGET,
        compute: args.dtype,
    };
    let mut trainer = Trainer::new(&mut model, &method, cfg)?;
    let batch = synthetic_batch(&spec, args.batch, args.seq, 0, dev)?;
    let rss_after_build = process::peak_rss_mib();
    heap::reset_peak();
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
    profile::enable(args.profile);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let (mut busy0, mut own0, mut wall0) = (0.0, 0.0, Instant::now());
    for i in 0..total_steps {
        if i == args.warmup {
            profile::reset();
            busy0 = process::machine_busy_s();
            own0 = process::own_cpu_s();
            wall0 = Instant::now();
        }
        let t = Instant::now();
        let r = trainer.step(&mut model, std::slice::from_ref(&batch))?;
        // a GPU runs the step's tail (the optimizer) after the call returns
        dev.synchronize()?;
        let dt = t.elapsed().as_secs_f64();
        if i >= args.warmup {
            times.push(dt);
        }
        losses.push(r.loss);
    }
    let wall = wall0.elapsed().as_secs_f64();
    let others = (process::machine_busy_s() - busy0) - (process::own_cpu_s() - own0);
    let ncpu = process::cpu_count() as f64;
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    let step_profile = if args.profile {
        let totals = profile::totals();
        profile::enable(false);
        let n = args.steps as f64;
        let rows: Vec<ProfileRow> = totals
            .into_iter()
            .map(|r| ProfileRow {
                seconds: r.seconds / n,
                gflop: r.gflop / n,
                ..r
            })
            .collect();
        let mean_step = times.iter().sum::<f64>() / n;
        let dtype = args.dtype.dtype();
        let peak_gflops = matmul_peak_gflops(1024, dtype, dev)?;
        let gflop: f64 = rows.iter().map(|r| r.gflop).sum();
        Some(StepProfile {
            other_s: mean_step - rows.iter().map(|r| r.seconds).sum::<f64>(),
            rows,
            peak_gflops,
            peak_dtype: crate::ops::products_name(dtype, dev).into(),
            products_floor_s: gflop / peak_gflops,
        })
    } else {
        None
    };
    Ok(StepTiming {
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
                DEFAULT_ACTIVATION_BUDGET,
            );
            if args.recompute == Recompute::Auto {
                format!("auto: {}", recompute_name(r))
            } else {
                recompute_name(r).into()
            }
        },
        products: crate::ops::products_name(args.dtype.dtype(), dev).into(),
        trainable: trainer.setup.n_trainable(),
        total,
        median_step_s: median,
        min_step_s: sorted[0],
        max_step_s: *sorted.last().expect("steps > 0"),
        tokens_per_s: (args.batch * args.seq) as f64 / median,
        peak_rss_mib: process::peak_rss_mib(),
        rss_after_build_mib: rss_after_build,
        peak_heap_mib: heap::peak_bytes().map(mib),
        planned_peak_mib: mib(planned_peak_bytes(args, &batch)?),
        peak_device_mib: crate::util::gpu::peak_memory_mib(dev),
        other_cpu_share: (others / (ncpu * wall)).clamp(0.0, 1.0),
        loss_first: losses[0],
        loss_last: *losses.last().expect("steps > 0"),
        profile: step_profile,
    })
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// What `lntune plan` predicts for the timed configuration (its preset, trainable set,
/// batch shape, dtype, policy and the batch's supervised tokens).
fn planned_peak_bytes(args: &TimingConfig, batch: &Batch) -> Result<usize> {
    let scored = super::step::count_scored(batch)?.div_ceil(args.batch);
    let p = plan(&PlanConfig {
        model: PlanModel::Preset(args.preset.clone()),
        method: timing_method(args.method, args),
        batch: args.batch,
        seq: args.seq,
        dtype: args.dtype.dtype(),
        recompute: args.recompute,
        scored: Some(scored),
    })?;
    Ok(p.total_bytes())
}

/// The name `--recompute` gives a policy.
pub fn recompute_name(r: Recompute) -> &'static str {
    match r {
        Recompute::Auto => "auto",
        Recompute::Full => "full",
        Recompute::Selective => "selective",
        Recompute::None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_batch_layout() {
        let s = preset("small").unwrap();
        let b = synthetic_batch(&s, 2, 256, 0, &Device::Cpu).unwrap();
        assert_eq!(b.input_ids[0].len(), 256);
        assert_eq!(b.input_ids[0].iter().filter(|&&t| t == 49151).count(), 196);
        let scored = super::super::step::count_scored(&b).unwrap();
        assert_eq!(scored, 2 * 30); // 59 text tokens, the last 30 supervised
    }
}
