//! Where a training step's time goes, by op kind, for `lntune bench --profile`.
//!
//! Ops open a `span` of their kind; when profiling is on, the span adds its wall time (and,
//! for matmuls, its floating-point operations) to process-wide totals. Off, a span is one
//! relaxed atomic load. Candle's CPU ops run eagerly, so a span's wall time is the op's
//! time; spans do not nest (an op's inner matmuls count to the op).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Op kinds a step's time is split into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// forward matmuls of linears (frozen or trainable weights), the head included
    MatmulForward,
    /// input gradients of linears: dY·W
    MatmulDx,
    /// weight gradients of trainable linears and LoRA factors: dYᵀ·X
    MatmulDw,
    /// attention forward and backward (scores, softmax, weighted sum)
    Attention,
    /// RMSNorm / LayerNorm forward and backward
    Norm,
    /// activations, RoPE, embeddings, residual adds done by ops
    Elementwise,
    /// cross-entropy forward and backward
    Loss,
    /// gradient clipping and the AdamW update
    Optimizer,
    /// building the step's batch
    Data,
}

pub const KINDS: [Kind; 9] = [
    Kind::MatmulForward,
    Kind::MatmulDx,
    Kind::MatmulDw,
    Kind::Attention,
    Kind::Norm,
    Kind::Elementwise,
    Kind::Loss,
    Kind::Optimizer,
    Kind::Data,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::MatmulForward => "matmul forward",
            Kind::MatmulDx => "matmul dX",
            Kind::MatmulDw => "matmul dW (trainable)",
            Kind::Attention => "attention",
            Kind::Norm => "norms",
            Kind::Elementwise => "elementwise",
            Kind::Loss => "loss",
            Kind::Optimizer => "optimizer",
            Kind::Data => "data",
        }
    }

    fn index(self) -> usize {
        KINDS
            .iter()
            .position(|&k| k == self)
            .expect("every kind is listed")
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 9] = [const { AtomicU64::new(0) }; 9];
static FLOPS: [AtomicU64; 9] = [const { AtomicU64::new(0) }; 9];

/// Turns profiling on or off and clears the totals.
pub fn enable(on: bool) {
    reset();
    ENABLED.store(on, Ordering::Relaxed);
}

/// Clears the totals (after warmup steps).
pub fn reset() {
    for k in 0..KINDS.len() {
        NANOS[k].store(0, Ordering::Relaxed);
        FLOPS[k].store(0, Ordering::Relaxed);
    }
}

/// A running measurement; adds its time to its kind when dropped.
pub struct Span {
    kind: Kind,
    flops: u64,
    start: Instant,
}

impl Drop for Span {
    fn drop(&mut self) {
        let i = self.kind.index();
        NANOS[i].fetch_add(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        FLOPS[i].fetch_add(self.flops, Ordering::Relaxed);
    }
}

/// Starts a span of `kind` (None when profiling is off).
pub fn span(kind: Kind) -> Option<Span> {
    span_flops(kind, 0)
}

/// Starts a span of `kind` that did `flops` floating-point operations.
pub fn span_flops(kind: Kind, flops: u64) -> Option<Span> {
    ENABLED.load(Ordering::Relaxed).then(|| Span {
        kind,
        flops,
        start: Instant::now(),
    })
}

/// The floating-point operations of an (m, k) x (k, n) matmul.
pub fn matmul_flops(m: usize, k: usize, n: usize) -> u64 {
    2 * m as u64 * k as u64 * n as u64
}

/// One kind's totals.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileRow {
    pub kind: String,
    pub seconds: f64,
    pub gflop: f64,
}

/// The totals since the last reset, every kind in order.
pub fn totals() -> Vec<ProfileRow> {
    KINDS
        .iter()
        .map(|&k| {
            let i = k.index();
            ProfileRow {
                kind: k.name().into(),
                seconds: NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9,
                gflop: FLOPS[i].load(Ordering::Relaxed) as f64 * 1e-9,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_add_up_only_when_on() {
        enable(false);
        drop(span(Kind::Norm));
        assert!(totals().iter().all(|r| r.seconds == 0.0));
        enable(true);
        {
            let _s = span_flops(Kind::MatmulDw, matmul_flops(2, 3, 4));
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let t = totals();
        let dw = t
            .iter()
            .find(|r| r.kind == "matmul dW (trainable)")
            .unwrap();
        // (other tests running at the same time may add their own spans)
        assert!(dw.seconds >= 0.002 && dw.gflop >= 48e-9, "{dw:?}");
        enable(false);
    }
}
