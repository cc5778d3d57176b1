//! Model code: configs, the LLaMA-family decoder, vision towers (CLIP, DINOv2), the
//! projector and the multimodal composition. Struct fields carry the checkpoint names, so
//! the loading code spells out the key paths.

pub mod batch;
pub mod clip;
pub mod compose;
pub mod config;
pub mod dinov2;
pub mod llama;
pub mod load;
pub mod mllm;
pub mod params;
pub mod presets;
pub mod projector;
pub mod source;
pub mod spec;
pub mod vision;
pub mod vit;

use anyhow::Result;
use candle_core::Tensor;

use crate::io::store::Weights;
use crate::ops::linear::linear_forward;
use crate::ops::norm::{layernorm_forward, rmsnorm_forward};

/// `weight` (OC, IC) in the matmul dtype, optional `bias` (OC) in f32, optional LoRA
/// adapter applied on top without merging.
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

/// LoRA adapter: y += scale·(x·Aᵀ)·Bᵀ with A (R, IC), B (OC, R), f32.
#[derive(Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl Linear {
    pub fn load(w: &Weights, name: &str, out_f: usize, in_f: usize, bias: bool) -> Result<Self> {
        let w = w.pp(name);
        Ok(Self {
            weight: w.get_mm("weight", &[out_f, in_f])?,
            bias: if bias {
                Some(w.get_f32("bias", &[out_f])?)
            } else {
                None
            },
            lora: None,
        })
    }

    /// Inference forward (LoRA dropout is off outside training).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.lora {
            None => linear_forward(x, &self.weight, self.bias.as_ref()),
            Some(l) => Ok(crate::ops::linear::lora_forward(
                x,
                x,
                &self.weight,
                self.bias.as_ref(),
                &l.a,
                &l.b,
                l.scale,
            )?
            .0),
        }
    }

    /// The tensor named `rest` (`weight`, `bias`, `lora_A.weight`, `lora_B.weight`).
    pub fn param_mut(&mut self, rest: &str) -> Option<&mut Tensor> {
        match rest {
            "weight" => Some(&mut self.weight),
            "bias" => self.bias.as_mut(),
            "lora_A.weight" => self.lora.as_mut().map(|l| &mut l.a),
            "lora_B.weight" => self.lora.as_mut().map(|l| &mut l.b),
            _ => None,
        }
    }
}

/// LLaMA RMSNorm, `weight` (C) f32.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.pp(name).get_f32("weight", &[size])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(rmsnorm_forward(x, &self.weight, self.eps)?.0)
    }

    pub fn param_mut(&mut self, rest: &str) -> Option<&mut Tensor> {
        (rest == "weight").then_some(&mut self.weight)
    }
}

/// LayerNorm with `weight` and `bias` (C) f32.
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Weights, name: &str, size: usize, eps: f64) -> Result<Self> {
        let w = w.pp(name);
        Ok(Self {
            weight: w.get_f32("weight", &[size])?,
            bias: w.get_f32("bias", &[size])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(layernorm_forward(x, &self.weight, &self.bias, self.eps)?.0)
    }
}

/// Splits (B, T, NH·HD) into heads: (B, NH, T, HD), contiguous.
pub fn split_heads(x: &Tensor, nh: usize, hd: usize) -> candle_core::Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    x.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()
}

/// Merges heads: (B, NH, T, HD) -> (B, T, NH·HD), contiguous.
pub fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, nh, t, hd) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, nh * hd))
}
