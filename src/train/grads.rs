//! A step's gradients by checkpoint key, and what the optimizer and the logs ask of them:
//! accumulation over micro-batches, flattening, the global norm (independent of the thread
//! count), scaling.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Tensor};

/// Gradients by checkpoint key; `add` accumulates (micro-batches, tied embeddings).
#[derive(Default)]
pub struct Grads(pub HashMap<String, Tensor>);

/// Σ x² of a tensor in f64. On the CPU, f32 values are summed in fixed chunks (each in
/// order, then the chunk sums in order), so the result does not depend on the thread count
/// and no f64 copy of the tensor is made.
fn sum_of_squares(g: &Tensor) -> Result<f64> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    if crate::ops::cpu::fused_on(g) && g.dtype() == DType::F32 {
        let g = g.contiguous()?;
        let (storage, layout) = g.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            let partial: Vec<f64> = v[a..b]
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            return Ok(partial.iter().sum());
        }
    }
    Ok(g.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?)
}

impl Grads {
    pub fn add(&mut self, name: String, g: Tensor) -> Result<()> {
        match self.0.remove(&name) {
            Some(prev) => {
                self.0.insert(name, (prev + g)?);
            }
            None => {
                self.0.insert(name, g);
            }
        }
        Ok(())
    }

    pub fn merge(&mut self, other: Grads) -> Result<()> {
        for (k, v) in other.0 {
            self.add(k, v)?;
        }
        Ok(())
    }

    /// The tensors `names` (missing ones as zeros is not allowed: every name must have a
    /// gradient) flattened into one f32 vector, times `scale`.
    pub fn flatten(&self, names: &[String], scale: f64) -> Result<Vec<f32>> {
        let mut v = Vec::new();
        for n in names {
            let g = self
                .0
                .get(n)
                .ok_or_else(|| anyhow::anyhow!("no gradient for `{n}`"))?;
            v.extend(
                g.flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(|x| x * scale as f32),
            );
        }
        Ok(v)
    }

    /// sqrt(Σ ‖g‖²), accumulated in f64.
    pub fn global_norm(&self) -> Result<f64> {
        // summed in name order: HashMap order varies between processes
        let mut names: Vec<&String> = self.0.keys().collect();
        names.sort();
        let mut s = 0f64;
        for g in names.into_iter().map(|n| &self.0[n]) {
            s += sum_of_squares(g)?;
        }
        Ok(s.sqrt())
    }

    pub fn scale(&mut self, f: f64) -> Result<()> {
        for g in self.0.values_mut() {
            *g = (&*g * f)?;
        }
        Ok(())
    }
}
