//! Pieces shared by the ViT towers (CLIP, DINOv2): patch embedding, multi-head
//! self-attention without a mask, and the fc1 -> act -> fc2 MLP.

use anyhow::{Result, bail};
use candle_core::{D, Tensor};

use super::{Linear, merge_heads, split_heads};
use crate::ops::act::{Act, act_forward};
use crate::ops::attention::attention_forward;

/// Non-overlapping patch embedding (a conv with stride = kernel) as one matmul:
/// pixels (N, C, H, W), kernel (D, C·P·P), bias (D) -> (N, gh·gw, D), patches row-major.
pub fn patch_embed(
    pixels: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    p: usize,
) -> Result<Tensor> {
    let (n, c, h, w) = pixels.dims4()?;
    if h % p != 0 || w % p != 0 {
        bail!("pixel_values {h}x{w} is not a multiple of the patch size {p}");
    }
    let (gh, gw) = (h / p, w / p);
    let patches = pixels
        .to_dtype(candle_core::DType::F32)?
        .reshape((n, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))? // (N, gh, gw, C, P, P)
        .contiguous()?
        .reshape((n, gh * gw, c * p * p))?;
    Ok(crate::ops::linear::linear_forward(&patches, kernel, bias)?)
}

/// Multi-head self-attention of a ViT layer (no mask; every head has its own K/V).
pub struct ViTAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub num_heads: usize,
}

impl ViTAttention {
    /// x (N, L, D) -> (N, L, D)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let (nh, hd) = (self.num_heads, d / self.num_heads);
        let q = split_heads(&self.q.forward(x)?, nh, hd)?;
        let k = split_heads(&self.k.forward(x)?, nh, hd)?;
        let v = split_heads(&self.v.forward(x)?, nh, hd)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let (att, _) = attention_forward(&q, &k, &v, None, scale, self.q.weight.dtype())?;
        Ok(self.o.forward(&merge_heads(&att)?)?)
    }
}

/// fc1 -> act -> fc2
pub struct ViTMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: Act,
}

impl ViTMlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self
            .fc2
            .forward(&act_forward(&self.fc1.forward(x)?, self.act)?)?)
    }
}
