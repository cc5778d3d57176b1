//! One optimizer step over micro-batches: accumulate exact token-mean gradients, stop on a
//! non-finite loss or gradient before touching the weights, clip the global norm, schedule
//! the learning rate, update with AdamW.

use std::cell::Cell;
use std::rc::Rc;

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::grads::Grads;
use super::optim::{AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::step::{count_scored, forward_backward};
use crate::methods::MethodConfig;
use crate::methods::setup::{TrainSetup, setup};
use crate::model::batch::Batch;
use crate::model::mllm::Mllm;
use crate::util::dist::Comm;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerConfig {
    pub optim: AdamWConfig,
    pub schedule: Schedule,
    /// clip the global gradient norm to this value (PyTorch `clip_grad_norm_`)
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    pub recompute: super::Recompute,
    /// bytes `Recompute::Auto` may keep for the backward
    pub activation_budget: usize,
    /// the products' dtype: bf16 for a run whose frozen weights are bf16 (mixed
    /// precision: every product in bf16 where the CPU has bf16 tiles, see `ops::autocast`)
    #[serde(default)]
    pub compute: crate::util::device::WeightDtype,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct StepReport {
    pub step: usize,
    /// token-mean loss over all micro-batches
    pub loss: f64,
    pub tokens: usize,
    /// global gradient norm before clipping
    pub grad_norm: f64,
    pub lr: f64,
}

pub struct Trainer {
    pub cfg: TrainerConfig,
    pub setup: TrainSetup,
    pub opt: AdamW,
    /// optimizer steps taken
    pub step: usize,
    /// the data-parallel ranks whose gradients each step sums (this process alone by
    /// default)
    pub comm: Rc<Comm>,
    /// seconds and bytes (per rank, sent) of the last step's gradient all-reduce
    pub last_exchange: Cell<(f64, usize)>,
}

impl Trainer {
    pub fn new(model: &mut Mllm, method: &MethodConfig, cfg: TrainerConfig) -> Result<Self> {
        let setup = setup(model, method, cfg.seed)?;
        Ok(Self {
            opt: AdamW::new(cfg.optim),
            cfg,
            setup,
            step: 0,
            comm: Rc::new(Comm::single()),
            last_exchange: Cell::new((0.0, 0)),
        })
    }

    /// Forward/backward of every micro-batch, then one update. The gradient equals that of
    /// one batch holding all micro-batches (token mean over all their scored tokens).
    pub fn step(&mut self, model: &mut Mllm, micro: &[Batch]) -> Result<StepReport> {
        let (grads, loss, tokens) = self.gradients(model, micro)?;
        self.apply(model, grads, loss, tokens)
    }

    /// Accumulated gradients of one optimizer step, its mean loss and token count. With
    /// several ranks, `micro` is this rank's shard of the step's batch, and what comes back
    /// is the whole batch's (gradients, loss and tokens summed over the ranks).
    pub fn gradients(&self, model: &Mllm, micro: &[Batch]) -> Result<(Grads, f64, usize)> {
        let (g, l, t, _) = self.gradients_detailed(model, micro, None)?;
        Ok((g, l, t))
    }

    /// `gradients`, plus each micro-batch's token-mean gradient of the tensors `subset`
    /// (flattened in that order) when asked: the gradient-variance statistics' input.
    pub fn gradients_detailed(
        &self,
        model: &Mllm,
        micro: &[Batch],
        subset: Option<&[String]>,
    ) -> Result<(Grads, f64, usize, Vec<Vec<f32>>)> {
        let local: usize = micro.iter().map(count_scored).sum::<Result<usize>>()?;
        let mut global = [local as f64];
        self.comm.sum_f64(&mut global)?;
        let tokens = global[0] as usize;
        if tokens == 0 {
            bail!("step {}: no supervised token in the batch", self.step);
        }
        let mut grads = Grads::default();
        let mut loss_sum = 0.0;
        let mut per_micro = Vec::new();
        let _autocast = crate::ops::autocast(self.cfg.compute.dtype());
        for (i, mb) in micro.iter().enumerate() {
            let seed = self.cfg.seed ^ ((self.step as u64) << 20) ^ i as u64;
            let (l, g) = forward_backward(
                model,
                &self.setup,
                mb,
                tokens as f64,
                seed,
                self.cfg.recompute,
                self.cfg.activation_budget,
            )?;
            loss_sum += l.sum;
            if let Some(names) = subset {
                // g is this micro-batch's share of the step's token mean; rescale it to
                // the micro-batch's own token mean
                let own = count_scored(mb)?.max(1);
                per_micro.push(g.flatten(names, tokens as f64 / own as f64)?);
            }
            grads.merge(g)?;
        }
        if self.comm.size() > 1 {
            let dev = model.llm.embed_tokens.device().clone();
            let t = std::time::Instant::now();
            loss_sum = sum_across_ranks(&self.comm, &self.setup, &mut grads, loss_sum, &dev)?;
            let bytes = 4 * self.setup.n_trainable() + 8;
            self.last_exchange.set((t.elapsed().as_secs_f64(), bytes));
        }
        Ok((grads, loss_sum / tokens as f64, tokens, per_micro))
    }

    /// Checks, clips and applies accumulated gradients.
    pub fn apply(
        &mut self,
        model: &mut Mllm,
        mut grads: Grads,
        loss: f64,
        tokens: usize,
    ) -> Result<StepReport> {
        if !loss.is_finite() {
            bail!(
                "step {}: loss is {loss}; stopping before the update (weights unchanged, no checkpoint written). Lower the learning rate or check the data",
                self.step
            );
        }
        let span = crate::util::profile::span(crate::util::profile::Kind::Optimizer);
        let grad_norm = grads.global_norm()?;
        if !grad_norm.is_finite() {
            bail!(
                "step {}: gradient norm is {grad_norm}; stopping before the update (weights unchanged, no checkpoint written)",
                self.step
            );
        }
        if let Some(max) = self.cfg.max_grad_norm {
            clip_grad_norm(&mut grads, grad_norm, max)?;
        }
        let lr = self.cfg.schedule.lr_at(self.step);
        self.opt.step(model, &grads, lr)?;
        drop(span);
        let report = StepReport {
            step: self.step,
            loss,
            tokens,
            grad_norm,
            lr,
        };
        self.step += 1;
        Ok(report)
    }
}

/// Sums every trainable tensor's gradient and the loss over the ranks: one f32 buffer in
/// spec order (a tensor this rank has no gradient for counts as zeros) and the loss in
/// f64. Returns the summed loss.
fn sum_across_ranks(
    comm: &Comm,
    setup: &TrainSetup,
    grads: &mut Grads,
    loss_sum: f64,
    dev: &Device,
) -> Result<f64> {
    let specs: Vec<_> = setup.trainable_specs().collect();
    let mut buf = Vec::with_capacity(specs.iter().map(|s| s.numel()).sum());
    for s in &specs {
        match grads.0.get(&s.name) {
            Some(g) => buf.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => buf.resize(buf.len() + s.numel(), 0.0),
        }
    }
    comm.sum_f32(&mut buf)?;
    let mut at = 0;
    for s in &specs {
        let n = s.numel();
        let g = Tensor::from_slice(&buf[at..at + n], s.shape.as_slice(), dev)?;
        grads.0.insert(s.name.clone(), g);
        at += n;
    }
    let mut loss = [loss_sum];
    comm.sum_f64(&mut loss)?;
    Ok(loss[0])
}

/// PyTorch `clip_grad_norm_`: scale by max / (norm + 1e-6) when the norm exceeds `max`.
pub fn clip_grad_norm(grads: &mut Grads, norm: f64, max: f64) -> Result<()> {
    if norm > max {
        grads.scale(max / (norm + 1e-6))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_scales_to_the_max_norm() {
        // |(3, 4)| = 5, |(12)| = 12: global norm 13
        let mut g = Grads::default();
        g.add("a".into(), Tensor::new(&[3f32, 4.], &Device::Cpu).unwrap())
            .unwrap();
        g.add("b".into(), Tensor::new(&[12f32], &Device::Cpu).unwrap())
            .unwrap();
        let n = g.global_norm().unwrap();
        assert!((n - 13.0).abs() < 1e-9);
        clip_grad_norm(&mut g, n, 1.0).unwrap();
        assert!((g.global_norm().unwrap() - 1.0).abs() < 1e-6);
        clip_grad_norm(&mut g, 1.0, 2.0).unwrap(); // below the max: unchanged
        assert!((g.global_norm().unwrap() - 1.0).abs() < 1e-6);
    }
}
