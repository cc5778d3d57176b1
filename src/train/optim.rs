//! AdamW with PyTorch's semantics (`torch.optim.AdamW`, single-tensor path): decoupled
//! weight decay p ← p·(1 − lr·wd), then the bias-corrected Adam update
//! p ← p − (lr / (1 − β1ᵗ))·m / (√v / √(1 − β2ᵗ) + ε). State (m, v) in f32 for the
//! trainable tensors only. By default 1-D tensors (norm scales, biases) get no decay
//! (nanoGPT's rule), which `decay_all` turns off.
//!
//! On the CPU the update is two fused in-place passes (moments, then parameter), instead of a
//! dozen allocating tensor ops; other devices use the composed tensor ops.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::grads::Grads;
use crate::model::mllm::Mllm;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// optimizer steps taken
    pub t: usize,
    /// per tensor: (2, numel) f32, row 0 = m (first moment), row 1 = v (second moment)
    pub state: BTreeMap<String, Tensor>,
}

/// Elements per parallel chunk of the fused updates.
const CHUNK: usize = 1 << 16;

/// m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g², in place on the packed (2, n) state.
struct MomentsUpdate {
    beta1: f32,
    beta2: f32,
}

/// p ← p·(1 − lr·wd) − step·m / (√v / √bc2 + ε), in place on the parameter.
struct ParamUpdate {
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("adamw: {what} is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: {what} must be f32"),
    }
}

fn f32_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("adamw: {what} is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: {what} must be f32"),
    }
}

impl InplaceOp2 for MomentsUpdate {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = f32_slice(s2, l2, "gradient")?;
        let mv = f32_slice_mut(s1, l1, "state")?;
        let (m, v) = mv.split_at_mut(g.len());
        let (b1, b2) = (self.beta1, self.beta2);
        // elementwise, so chunks on the rayon threads give the same bits
        m.par_chunks_mut(CHUNK)
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|((m, v), g)| {
                for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                }
            });
        Ok(())
    }
}

impl InplaceOp2 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let mv = f32_slice(s2, l2, "state")?;
        let p = f32_slice_mut(s1, l1, "parameter")?;
        let (m, v) = mv.split_at(p.len());
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK))
            .zip(v.par_chunks(CHUNK))
            .for_each(|((p, m), v)| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    *p *= self.decay;
                    *p -= self.step_size * m / (v.sqrt() / self.bc2_sqrt + self.eps);
                }
            });
        Ok(())
    }
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        Self {
            cfg,
            t: 0,
            state: BTreeMap::new(),
        }
    }

    /// Whether a tensor of this rank gets weight decay.
    pub fn decays(&self, rank: usize) -> bool {
        self.cfg.weight_decay != 0.0 && (self.cfg.decay_all || rank >= 2)
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
            let decay = if self.decays(g.rank()) {
                1.0 - lr * self.cfg.weight_decay
            } else {
                1.0
            };
            let p = model
                .param_mut(name)
                .with_context(|| format!("optimizer: no tensor `{name}` in the model"))?;
            let n = g.elem_count();
            let mv = match self.state.remove(name) {
                Some(s) => s,
                None => Tensor::zeros((2, n), DType::F32, g.device())?,
            };
            if crate::ops::cpu::fused_on(p) && p.dtype() == DType::F32 && p.is_contiguous() {
                let g = g.contiguous()?;
                mv.inplace_op2(
                    &g,
                    &MomentsUpdate {
                        beta1: b1 as f32,
                        beta2: b2 as f32,
                    },
                )?;
                p.inplace_op2(
                    &mv,
                    &ParamUpdate {
                        decay: decay as f32,
                        step_size: step_size as f32,
                        bc2_sqrt: bc2_sqrt as f32,
                        eps: self.cfg.eps as f32,
                    },
                )?;
                self.state.insert(name.clone(), mv);
            } else {
                let flat = g.flatten_all()?;
                let m = ((mv.get(0)? * b1)? + (&flat * (1.0 - b1))?)?;
                let v = ((mv.get(1)? * b2)? + (flat.sqr()? * (1.0 - b2))?)?;
                let denom = ((v.sqrt()? / bc2_sqrt)? + self.cfg.eps)?;
                let upd = ((&m / denom)? * step_size)?.reshape(p.shape())?;
                *p = ((&*p * decay)? - upd)?;
                self.state.insert(name.clone(), Tensor::stack(&[m, v], 0)?);
            }
        }
        model.llm.sync_tied_head();
        Ok(())
    }
}
