//! CLIP vision transformer (transformers `CLIPVisionTransformer`), forward only.
//!
//! conv patches (no bias) -> prepend `class_embedding` -> + `position_embedding` ->
//! `pre_layrnorm` (HF's spelling) -> pre-LN layers `x += out_proj(attn(layer_norm1(x)))`,
//! `x += fc2(act(fc1(layer_norm2(x))))`. `post_layernorm` only feeds the pooled CLS output,
//! which LLaVA never uses, so it is not loaded.

use anyhow::{Result, bail};
use candle_core::Tensor;

use super::config::ClipConfig;
use super::vit::{ViTAttention, ViTMlp, patch_embed};
use super::{LayerNorm, Linear};
use crate::io::store::Weights;

pub struct ClipLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: ViTAttention,
    pub layer_norm2: LayerNorm,
    pub mlp: ViTMlp,
}

pub struct ClipVision {
    pub cfg: ClipConfig,
    /// (D, C·P·P), the conv kernel flattened for a matmul
    pub patch_embedding: Tensor,
    pub class_embedding: Tensor,    // (D)
    pub position_embedding: Tensor, // (1 + gh·gw, D)
    pub pre_layrnorm: LayerNorm,
    pub layers: Vec<ClipLayer>,
}

impl ClipVision {
    /// `w` is the tower root (`vision_tower.vision_model` or `vision_tower`).
    pub fn load(w: &Weights, cfg: &ClipConfig) -> Result<Self> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        if !cfg.image_size.is_multiple_of(p) {
            bail!(
                "CLIP image_size {} is not a multiple of patch_size {p}",
                cfg.image_size
            );
        }
        let grid = cfg.image_size / p;
        let e = w.pp("embeddings");
        let patch_embedding = e
            .get_mm("patch_embedding.weight", &[d, c, p, p])?
            .reshape((d, c * p * p))?;
        let eps = cfg.layer_norm_eps;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let l = w.pp(format!("encoder.layers.{i}"));
                let a = l.pp("self_attn");
                Ok(ClipLayer {
                    layer_norm1: LayerNorm::load(&l, "layer_norm1", d, eps)?,
                    self_attn: ViTAttention {
                        q: Linear::load(&a, "q_proj", d, d, true)?,
                        k: Linear::load(&a, "k_proj", d, d, true)?,
                        v: Linear::load(&a, "v_proj", d, d, true)?,
                        o: Linear::load(&a, "out_proj", d, d, true)?,
                        num_heads: cfg.num_heads,
                    },
                    layer_norm2: LayerNorm::load(&l, "layer_norm2", d, eps)?,
                    mlp: ViTMlp {
                        fc1: Linear::load(&l.pp("mlp"), "fc1", cfg.intermediate_size, d, true)?,
                        fc2: Linear::load(&l.pp("mlp"), "fc2", d, cfg.intermediate_size, true)?,
                        act: cfg.hidden_act,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embedding,
            class_embedding: e.get_f32("class_embedding", &[d])?,
            position_embedding: e.get_f32("position_embedding.weight", &[1 + grid * grid, d])?,
            pre_layrnorm: LayerNorm::load(w, "pre_layrnorm", d, eps)?,
            layers,
        })
    }

    /// pixels (N, C, H, W) -> the hidden states at indices `wanted` (0 = embeddings after
    /// pre_layrnorm, i = output of layer i-1), each (N, 1 + P, D). Layers past the largest
    /// wanted index are not run.
    pub fn hidden_states(&self, pixels: &Tensor, wanted: &[usize]) -> Result<Vec<Tensor>> {
        let (_, _, h, w) = pixels.dims4()?;
        let s = self.cfg.image_size;
        if h != s || w != s {
            bail!("CLIP tower expects {s}x{s} pixels, got {h}x{w} (pixel_values)");
        }
        let patches = patch_embed(pixels, &self.patch_embedding, None, self.cfg.patch_size)?;
        let (n, _, d) = patches.dims3()?;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((n, 1, d))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        let upto = wanted.iter().copied().max().unwrap_or(0);
        let mut states = vec![None; upto + 1];
        states[0] = Some(x.clone());
        for (i, layer) in self.layers.iter().take(upto).enumerate() {
            let a = layer.self_attn.forward(&layer.layer_norm1.forward(&x)?)?;
            x = (x + a)?;
            let m = layer.mlp.forward(&layer.layer_norm2.forward(&x)?)?;
            x = (x + m)?;
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
