//! DINOv2 vision transformer (transformers `Dinov2Model`), forward only.
//!
//! conv patches (with bias) -> prepend `cls_token` -> + position embeddings, bicubically
//! interpolated to the input grid exactly as transformers 5.x does -> pre-LN layers with
//! layer scale `x += λ1 ⊙ attn(norm1(x))`, `x += λ2 ⊙ mlp(norm2(x))` -> final `layernorm`
//! (`last_hidden_state`).
//!
//! Checkpoint names: hub layout `attention.attention.{query,key,value}` and
//! `attention.output.dense`, or transformers 5.x module names `attention.{q,k,v,o}_proj`.

use anyhow::{Result, bail};
use candle_core::{D, Tensor};

use super::config::Dinov2Config;
use super::vit::{ViTAttention, ViTMlp, patch_embed};
use super::{LayerNorm, Linear};
use crate::io::store::Weights;
use crate::ops::act::{Act, act_forward};

/// The MLP of a DINOv2 layer: plain fc1/act/fc2, or SwiGLU (`weights_in`, `weights_out`).
pub enum Dinov2Mlp {
    Plain(ViTMlp),
    SwiGlu {
        weights_in: Linear,
        weights_out: Linear,
    },
}

impl Dinov2Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Plain(m) => m.forward(x),
            Self::SwiGlu {
                weights_in,
                weights_out,
            } => {
                let h = weights_in.forward(x)?;
                let half = h.dim(D::Minus1)? / 2;
                let g = act_forward(&h.narrow(D::Minus1, 0, half)?, Act::Silu)?;
                let u = h.narrow(D::Minus1, half, half)?;
                Ok(weights_out.forward(&(g * u)?)?)
            }
        }
    }
}

pub struct Dinov2Layer {
    pub norm1: LayerNorm,
    pub attention: ViTAttention,
    pub layer_scale1: Tensor, // (D)
    pub norm2: LayerNorm,
    pub mlp: Dinov2Mlp,
    pub layer_scale2: Tensor, // (D)
}

pub struct Dinov2Vision {
    pub cfg: Dinov2Config,
    pub patch_kernel: Tensor, // (D, C·P·P)
    pub patch_bias: Tensor,   // (D)
    pub cls_token: Tensor,    // (D)
    pub pos_cls: Tensor,      // (1, D)
    pub pos_grid: Tensor,     // (g0, g0, D), the stored patch position table
    pub layers: Vec<Dinov2Layer>,
    pub layernorm: LayerNorm,
}

impl Dinov2Vision {
    pub fn load(w: &Weights, cfg: &Dinov2Config) -> Result<Self> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let e = w.pp("embeddings");
        let pos_key = "position_embeddings";
        let stored = e.shape(pos_key).unwrap_or_default();
        let n_pos = stored.get(1).copied().unwrap_or(0);
        let g0 = ((n_pos.saturating_sub(1)) as f64).sqrt().round() as usize;
        if stored.len() != 3 || g0 * g0 + 1 != n_pos {
            bail!(
                "{}: tensor `{}` has shape {stored:?}, expected [1, 1 + g*g, {d}]",
                w.store().file_of(&e.key(pos_key)).display(),
                e.key(pos_key)
            );
        }
        let pos = e.get_f32(pos_key, &[1, n_pos, d])?.squeeze(0)?;
        let eps = cfg.layer_norm_eps;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let l = w.pp(format!("encoder.layer.{i}"));
                let hub = l.contains("attention.attention.query.weight");
                let name = |hub_name: &str, new_name: &str| -> String {
                    if hub {
                        hub_name.into()
                    } else {
                        new_name.into()
                    }
                };
                let a = l.pp("attention");
                let qkv_bias = cfg.qkv_bias;
                let mlp = if cfg.use_swiglu_ffn {
                    // transformers: hidden = (int(int(D·ratio)·2/3) + 7) // 8 · 8
                    let hidden = (cfg.mlp_hidden * 2 / 3).div_ceil(8) * 8;
                    Dinov2Mlp::SwiGlu {
                        weights_in: Linear::load(&l.pp("mlp"), "weights_in", 2 * hidden, d, true)?,
                        weights_out: Linear::load(&l.pp("mlp"), "weights_out", d, hidden, true)?,
                    }
                } else {
                    Dinov2Mlp::Plain(ViTMlp {
                        fc1: Linear::load(&l.pp("mlp"), "fc1", cfg.mlp_hidden, d, true)?,
                        fc2: Linear::load(&l.pp("mlp"), "fc2", d, cfg.mlp_hidden, true)?,
                        act: cfg.hidden_act,
                    })
                };
                Ok(Dinov2Layer {
                    norm1: LayerNorm::load(&l, "norm1", d, eps)?,
                    attention: ViTAttention {
                        q: Linear::load(&a, &name("attention.query", "q_proj"), d, d, qkv_bias)?,
                        k: Linear::load(&a, &name("attention.key", "k_proj"), d, d, qkv_bias)?,
                        v: Linear::load(&a, &name("attention.value", "v_proj"), d, d, qkv_bias)?,
                        o: Linear::load(&a, &name("output.dense", "o_proj"), d, d, true)?,
                        num_heads: cfg.num_heads,
                    },
                    layer_scale1: l.get_f32("layer_scale1.lambda1", &[d])?,
                    norm2: LayerNorm::load(&l, "norm2", d, eps)?,
                    mlp,
                    layer_scale2: l.get_f32("layer_scale2.lambda1", &[d])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_kernel: e
                .get_mm("patch_embeddings.projection.weight", &[d, c, p, p])?
                .reshape((d, c * p * p))?,
            patch_bias: e.get_f32("patch_embeddings.projection.bias", &[d])?,
            cls_token: e.get_f32("cls_token", &[1, 1, d])?.reshape(d)?,
            pos_cls: pos.narrow(0, 0, 1)?,
            pos_grid: pos.narrow(0, 1, g0 * g0)?.reshape((g0, g0, d))?,
            layers,
            layernorm: LayerNorm::load(w, "layernorm", d, eps)?,
        })
    }

    /// The position table for an `h`×`w` pixel input: (1 + gh·gw, D).
    /// transformers returns the stored table unchanged iff the patch count equals the stored
    /// one and `h == w`; otherwise the grid part is resized with PyTorch's bicubic
    /// (`F.interpolate(size=(gh, gw), mode="bicubic", align_corners=False)`, A = −0.75).
    pub fn position_embeddings(&self, h: usize, w: usize) -> Result<Tensor> {
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let (g0, _, d) = self.pos_grid.dims3()?;
        let grid = if gh * gw == g0 * g0 && h == w {
            self.pos_grid.reshape((g0 * g0, d))?
        } else {
            let dev = self.pos_grid.device();
            let wh = Tensor::from_vec(bicubic_matrix(g0, gh), (gh, g0), dev)?;
            let ww = Tensor::from_vec(bicubic_matrix(g0, gw), (gw, g0), dev)?;
            // rows: (gh, g0) · (g0, g0·D) -> (gh, g0, D)
            let t = wh
                .matmul(&self.pos_grid.reshape((g0, g0 * d))?)?
                .reshape((gh, g0, d))?;
            // columns: for each output row, (gw, g0) · (g0, D)
            ww.unsqueeze(0)?
                .broadcast_as((gh, gw, g0))?
                .contiguous()?
                .matmul(&t)? // (gh, gw, D)
                .reshape((gh * gw, d))?
        };
        Ok(Tensor::cat(&[&self.pos_cls, &grid], 0)?)
    }

    /// pixels (N, C, H, W) -> hidden states at indices `wanted` (0 = embeddings output,
    /// i = output of layer i-1, before the final layernorm), each (N, 1 + P, D).
    pub fn hidden_states(&self, pixels: &Tensor, wanted: &[usize]) -> Result<Vec<Tensor>> {
        let (_, _, h, w) = pixels.dims4()?;
        let patches = patch_embed(
            pixels,
            &self.patch_kernel,
            Some(&self.patch_bias),
            self.cfg.patch_size,
        )?;
        let (n, _, d) = patches.dims3()?;
        let cls = self.cls_token.reshape((1, 1, d))?.broadcast_as((n, 1, d))?;
        let mut x =
            Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings(h, w)?)?;
        let upto = wanted.iter().copied().max().unwrap_or(0);
        let mut states = vec![None; upto + 1];
        if wanted.contains(&0) {
            states[0] = Some(x.clone());
        }
        for (i, layer) in self.layers.iter().take(upto).enumerate() {
            let a = layer.attention.forward(&layer.norm1.forward(&x)?)?;
            x = (x + a.broadcast_mul(&layer.layer_scale1)?)?;
            let m = layer.mlp.forward(&layer.norm2.forward(&x)?)?;
            x = (x + m.broadcast_mul(&layer.layer_scale2)?)?;
            if wanted.contains(&(i + 1)) {
                states[i + 1] = Some(x.clone());
            }
        }
        Ok(wanted
            .iter()
            .map(|&i| states[i].clone().expect("wanted state kept"))
            .collect())
    }
}

/// PyTorch's bicubic resampling along one axis as an (n_out, n_in) matrix:
/// align_corners=False, no antialias, A = −0.75, border taps clamped. Computed in f32 as
/// PyTorch's CPU kernel does.
pub fn bicubic_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    const A: f32 = -0.75;
    let c1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = n_in as f32 / n_out as f32;
    let mut m = vec![0f32; n_out * n_in];
    for i in 0..n_out {
        let src = (i as f32 + 0.5) * scale - 0.5;
        let x0 = src.floor();
        let t = src - x0;
        let weights = [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)];
        for (k, wgt) in weights.iter().enumerate() {
            let idx = (x0 as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
            m[i * n_in + idx] += wgt;
        }
    }
    m
}

#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_matrix_matches_torch_interpolate() {
        // torch: F.interpolate(arange(16).reshape(1,1,4,4), size=(3,5), mode="bicubic",
        // align_corners=False)
        let want = [
            0.443_879_5,
            1.115_380_2,
            2.004_629_6,
            2.893_879_9,
            3.565_379_9,
            5.939_251_4,
            6.610_751_6,
            7.5,
            8.389_252,
            9.060_75,
            11.434_624,
            12.106_124,
            12.995_373,
            13.884_624,
            14.556_123,
        ];
        let (wh, ww) = (bicubic_matrix(4, 3), bicubic_matrix(4, 5));
        for i in 0..3 {
            for j in 0..5 {
                let mut v = 0f32;
                for r in 0..4 {
                    for c in 0..4 {
                        v += wh[i * 4 + r] * ww[j * 4 + c] * (r * 4 + c) as f32;
                    }
                }
                assert!((v - want[i * 5 + j]).abs() < 1e-5, "({i},{j}) {v}");
            }
        }
        // same size: the identity (the taps at integer positions weigh 1, 0)
        let id = bicubic_matrix(3, 3);
        assert_eq!(id, vec![1., 0., 0., 0., 1., 0., 0., 0., 1.]);
    }
}
