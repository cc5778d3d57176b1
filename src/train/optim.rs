//! AdamW with PyTorch's semantics (`torch.optim.AdamW`, single-tensor path): decoupled
//! weight decay p ← p·(1 − lr·wd), then the bias-corrected Adam update
//! p ← p − (lr / (1 − β1ᵗ))·m / (√v / √(1 − β2ᵗ) + ε). State (m, v) in f32 for the
//! trainable tensors only. By default 1-D tensors (norm scales, biases) get no decay
//! (nanoGPT's rule), which `decay_all` turns off.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::step::Grads;
use crate::model::mllm::Mllm;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// decay 1-D tensors too (PyTorch's single-group default)
    pub decay_all: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decay_all: false,
        }
    }
}

/// Moments of one tensor.
pub struct Moments {
    pub m: Tensor,
    pub v: Tensor,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// optimizer steps taken
    pub t: usize,
    pub state: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        Self {
            cfg,
            t: 0,
            state: BTreeMap::new(),
        }
    }

    /// Whether the tensor gets weight decay.
    pub fn decays(&self, p: &Tensor) -> bool {
        self.cfg.weight_decay != 0.0 && (self.cfg.decay_all || p.rank() >= 2)
    }

    /// One update of every tensor in `grads` at learning rate `lr`.
    pub fn step(&mut self, model: &mut Mllm, grads: &Grads, lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - b2.powi(self.t as i32)).sqrt();
        let step_size = lr / bc1;
        let mut names: Vec<&String> = grads.0.keys().collect();
        names.sort();
        for name in names {
            let g = &grads.0[name];
            let p = model
                .param_mut(name)
                .with_context(|| format!("optimizer: no tensor `{name}` in the model"))?;
            let mut next = p.clone();
            if self.cfg.weight_decay != 0.0 && (self.cfg.decay_all || p.rank() >= 2) {
                next = (next * (1.0 - lr * self.cfg.weight_decay))?;
            }
            let st = match self.state.remove(name) {
                Some(s) => s,
                None => Moments {
                    m: g.zeros_like()?,
                    v: g.zeros_like()?,
                },
            };
            let m = ((st.m * b1)? + (g * (1.0 - b1))?)?;
            let v = ((st.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + self.cfg.eps)?;
            next = (next - ((&m / denom)? * step_size)?)?;
            *p = next;
            self.state.insert(name.clone(), Moments { m, v });
        }
        model.llm.sync_tied_head();
        Ok(())
    }
}
