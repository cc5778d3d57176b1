//! The plan of a run from config files alone (no weights are read), so that 7B/13B runs can
//! be planned on any machine: trainable and total parameters per group, and the memory
//! model of one step (see the README): frozen weights once in their storage dtype,
//! trainable tensors with gradient and two Adam moments in f32, the kept activations of the
//! recompute policy, one block's backward workspace, head logits for the supervised tokens.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Result, bail};
use candle_core::DType;
use serde::Serialize;

use super::{DEFAULT_ACTIVATION_BUDGET, Recompute};
use crate::methods::MethodConfig;
use crate::methods::setup::train_flags;
use crate::model::config::LlmConfig;
use crate::model::params::Role;
use crate::model::spec::ModelSpec;
use crate::util::checks;

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
    /// what each rank of a data-parallel run contributes to the per-step all-reduce: the
    /// trainable tensors' f32 gradients (and the loss)
    pub allreduce_bytes: usize,
}

/// The model a plan is for: a checkpoint's config files, or a named preset
/// (`model::presets`, the shapes `lntune bench --preset` trains).
#[derive(Debug, Clone)]
pub enum PlanModel {
    Path(PathBuf),
    Preset(String),
}

/// What to plan: a model (config files only), a method, a batch shape and a precision.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    pub model: PlanModel,
    pub method: MethodConfig,
    pub batch: usize,
    pub seq: usize,
    /// storage dtype of the frozen weights (f32 or bf16)
    pub dtype: DType,
    pub recompute: Recompute,
    /// supervised tokens per sample (the rows the head runs on); None: every token
    pub scored: Option<usize>,
}

/// The most bytes any memory figure of a plan may reach (1 EiB): beyond it a batch shape
/// describes no machine, and the memory model's arithmetic would overflow.
const MAX_PLANNED_BYTES: f64 = (1u64 << 60) as f64;

/// Bounds, in bytes, of the activations one training step of a `b`×`t` batch holds on
/// `cfg`: the least any policy keeps (the residual stream and one block's output), and
/// the most the memory model can give (every layer keeping everything, attention
/// probabilities included, plus the head's logits and their gradient on every token).
pub fn step_activation_bounds(cfg: &LlmConfig, b: usize, t: usize) -> (f64, f64) {
    let (b, t) = (b as f64, t as f64);
    let c = cfg.hidden_size as f64;
    let per_token = (2 * cfg.hidden_size
        + 2 * cfg.num_heads * cfg.head_dim
        + 2 * cfg.num_kv_heads * cfg.head_dim
        + 3 * cfg.intermediate_size) as f64;
    let least = 4.0 * b * t * 2.0 * c;
    let most = 4.0 * b * cfg.num_layers as f64 * (per_token * t + cfg.num_heads as f64 * t * t)
        + 8.0 * b * t * cfg.vocab_size as f64;
    (least, most)
}

/// Refuses a batch shape whose memory model goes past `MAX_PLANNED_BYTES`.
pub fn check_batch_shape(cfg: &LlmConfig, b: usize, t: usize) -> Result<()> {
    checks::positive("--batch", b)?;
    checks::positive("--seq", t)?;
    let (_, most) = step_activation_bounds(cfg, b, t);
    if most > MAX_PLANNED_BYTES {
        bail!(
            "--batch {b} x --seq {t}: the memory model of one step reaches {:.1e} bytes, beyond any machine (at most 2^60)",
            most
        );
    }
    Ok(())
}

impl Plan {
    /// The memory estimate's total: the planned peak of one step, in bytes.
    pub fn total_bytes(&self) -> usize {
        self.memory_bytes.values().sum()
    }
}

/// Counts and a memory estimate for `cfg`.
pub fn plan(cfg: &PlanConfig) -> Result<Plan> {
    checks::positive("--batch", cfg.batch)?;
    checks::positive("--seq", cfg.seq)?;
    let spec = match &cfg.model {
        PlanModel::Path(p) => ModelSpec::from_path(p)?,
        PlanModel::Preset(name) => ModelSpec::from_preset(name)?,
    };
    check_batch_shape(&spec.llm, cfg.batch, cfg.seq)?;
    let method = &cfg.method;
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
    let (b, t) = (cfg.batch, cfg.seq);
    let frozen_bytes = cfg.dtype.size_in_bytes();
    let policy_choice = cfg.recompute;
    let cfg_scored = cfg.scored;
    let cfg = &spec.llm;
    let tf = train_flags(&specs, &flags, cfg.num_layers);
    let policy = policy_choice.resolve(cfg, &tf, b, t, DEFAULT_ACTIVATION_BUDGET);
    // gradient bytes per decoder layer, and of everything outside the blocks (head, final
    // norm, embeddings, projector: counted from the start of the backward, the head's
    // first and, tied, the embeddings' with it)
    let mut layer_grads = vec![0usize; cfg.num_layers];
    let mut outer_grads = 0usize;
    for (s, _) in specs.iter().zip(&flags).filter(|(_, t)| **t) {
        match s.layer {
            Some(l) if l < cfg.num_layers => layer_grads[l] += 4 * s.numel(),
            _ => outer_grads += 4 * s.numel(),
        }
    }
    let first = tf.first_block_needed();
    let layer_saved: Vec<usize> = match first {
        Some(f) => (0..cfg.num_layers)
            .map(|l| {
                if l < f {
                    0
                } else {
                    policy.bytes_per_layer(cfg, &tf.blocks[l], b, t)
                }
            })
            .collect(),
        None => vec![0; cfg.num_layers],
    };
    // one block's backward: its recomputed context (selective size, plus the attention
    // probabilities) and gradients of the same order
    let blk = tf.blocks.first().cloned().unwrap_or_default();
    let workspace = 2 * Recompute::None.bytes_per_layer(cfg, &blk, b, t);
    // the head runs on scored tokens only (logits + their gradient); B·T at most
    let scored = cfg_scored.map_or(t, |s| s.min(t));
    let head = 2 * 4 * b * scored * cfg.vocab_size;
    // The backward walks the layers down: layer l's saved context is freed as its
    // gradients appear, so the step's peak is the largest of (activations still saved +
    // gradients so far + the working set) over the walk, the head's turn first.
    let saved_all: usize = layer_saved.iter().sum();
    let mut peak = (saved_all, outer_grads, head);
    for l in (0..cfg.num_layers).rev() {
        let saved: usize = layer_saved[..=l].iter().sum();
        let grads = outer_grads + layer_grads[l..].iter().sum::<usize>();
        let here = (
            saved,
            grads,
            if first.is_some_and(|f| l >= f) {
                workspace
            } else {
                0
            },
        );
        if here.0 + here.1 + here.2 > peak.0 + peak.1 + peak.2 {
            peak = here;
        }
    }
    let head_peak = peak.2 == head;
    let mut memory = BTreeMap::new();
    memory.insert("frozen weights".into(), (total - trainable) * frozen_bytes);
    memory.insert(
        "trainable weights + Adam m, v (f32)".into(),
        3 * 4 * trainable,
    );
    memory.insert("at the peak: saved activations".into(), peak.0);
    memory.insert("at the peak: gradients (f32)".into(), peak.1);
    let ws_name = match (head_peak, cfg_scored) {
        (false, _) => "at the peak: one block's backward workspace",
        (true, Some(_)) => "at the peak: head on scored tokens",
        (true, None) => "at the peak: head on scored tokens (<= B·T)",
    };
    memory.insert(ws_name.into(), peak.2);
    Ok(Plan {
        method: method.method.name().into(),
        groups,
        total_params: total,
        trainable_params: trainable,
        trainable_percent: 100.0 * trainable as f64 / total as f64,
        recompute: format!("{policy:?}").to_lowercase(),
        memory_bytes: memory,
        allreduce_bytes: 4 * trainable + 8,
    })
}
