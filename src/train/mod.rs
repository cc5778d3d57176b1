//! Training: the frozen-weight-aware forward/backward step, AdamW, the learning-rate
//! schedule, the trainer that checks before it updates, checkpoints, and the run loop with
//! its files; also the memory plan and the step timing of `plan` and `bench`.

pub mod block;
pub mod checkpoint;
pub mod config;
pub mod grad_stats;
pub mod grads;
pub mod optim;
pub mod plan;
pub mod resume;
pub mod run;
pub mod schedule;
pub mod step;
pub mod timing;
pub mod trainer;

use crate::methods::setup::{BlockFlags, TrainFlags};
use crate::model::config::LlmConfig;

/// How much of each decoder block the forward keeps for the backward.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Recompute {
    /// the least recompute whose kept activations fit the activation budget
    Auto,
    /// keep each block's input and post-attention residual (2·T·C per layer) and recompute
    /// the block in backward: least memory
    Full,
    /// also keep the block's matmul outputs (q, k, v, the MLP's gate and up, and linear
    /// inputs of trainable weights); recompute only the attention probabilities (T² per head)
    Selective,
    /// keep each block's whole backward context, attention probabilities included
    None,
}

impl Recompute {
    /// Bytes the forward keeps per decoder layer for a B×T batch under this policy (f32).
    pub fn bytes_per_layer(self, cfg: &LlmConfig, f: &BlockFlags, b: usize, t: usize) -> usize {
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let inputs = 2 * c; // x, x2
        let outputs = q + 2 * kv + 2 * i; // q, k, v, gate, up
        let lin_inputs = if f.q.any() || f.k.any() || f.v.any() {
            c
        } else {
            0
        } + if f.o.any() { q } else { 0 }
            + if f.gate.any() || f.up.any() { c } else { 0 }
            + if f.down.any() { i } else { 0 };
        let per_token = match self {
            Recompute::Full => inputs,
            Recompute::Selective | Recompute::Auto | Recompute::None => {
                inputs + outputs + lin_inputs
            }
        };
        let probs = if self == Recompute::None {
            cfg.num_heads * t * t
        } else {
            0
        };
        4 * b * (per_token * t + probs)
    }

    /// The policy to use for one batch: `auto` keeps as much as fits in `budget` bytes over
    /// the layers that need a backward: everything (`none`), else `selective`, else `full`.
    pub fn resolve(
        self,
        cfg: &LlmConfig,
        flags: &TrainFlags,
        b: usize,
        t: usize,
        budget: usize,
    ) -> Recompute {
        if self != Recompute::Auto {
            return self;
        }
        let Some(first) = flags.first_block_needed() else {
            return Recompute::Full;
        };
        let total = |r: Recompute| -> usize {
            (first..cfg.num_layers)
                .map(|l| r.bytes_per_layer(cfg, &flags.blocks[l], b, t))
                .sum()
        };
        [Recompute::None, Recompute::Selective]
            .into_iter()
            .find(|&r| total(r) <= budget)
            .unwrap_or(Recompute::Full)
    }
}

/// Default activation budget of `Recompute::Auto`.
pub const DEFAULT_ACTIVATION_BUDGET: usize = 2 << 30;
