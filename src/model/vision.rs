//! `VisionTower`: the frozen image encoder (CLIP or DINOv2) and the choice of the hidden
//! states the projector sees (`vision_feature_layer`, select strategy, final layernorm,
//! grid pooling).

use anyhow::{Result, bail};
use candle_core::{D, Tensor};

use super::clip::ClipVision;
use super::config::{FeatureSelect, SelectStrategy, VisionConfig};
use super::dinov2::Dinov2Vision;
use crate::io::store::Weights;

/// The frozen image encoder of a multimodal model.
pub enum VisionTower {
    Clip(ClipVision),
    Dinov2(Dinov2Vision),
}

impl VisionTower {
    pub fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        Ok(match cfg {
            VisionConfig::Clip(c) => Self::Clip(ClipVision::load(w, c)?),
            VisionConfig::Dinov2(c) => Self::Dinov2(Dinov2Vision::load(w, c)?),
        })
    }

    pub fn config(&self) -> VisionConfig {
        match self {
            Self::Clip(m) => VisionConfig::Clip(m.cfg.clone()),
            Self::Dinov2(m) => VisionConfig::Dinov2(m.cfg.clone()),
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Clip(m) => m.cfg.hidden_size,
            Self::Dinov2(m) => m.cfg.hidden_size,
        }
    }

    fn num_layers(&self) -> usize {
        match self {
            Self::Clip(m) => m.cfg.num_layers,
            Self::Dinov2(m) => m.cfg.num_layers,
        }
    }

    /// Resolves a `vision_feature_layer` (negative counts from the end of `hidden_states`,
    /// which has num_layers + 1 entries) to an index.
    pub fn resolve_layer(&self, layer: i64) -> Result<usize> {
        let len = self.num_layers() as i64 + 1;
        let idx = if layer < 0 { len + layer } else { layer };
        if idx < 0 || idx >= len {
            bail!(
                "vision_feature_layer {layer} is out of range for a tower with {} layers",
                self.num_layers()
            );
        }
        Ok(idx as usize)
    }

    /// Number of patch tokens for an input of `h`×`w` pixels, before the select strategy.
    pub fn num_patches(&self, h: usize, w: usize) -> usize {
        let p = match self {
            Self::Clip(m) => m.cfg.patch_size,
            Self::Dinov2(m) => m.cfg.patch_size,
        };
        (h / p) * (w / p)
    }

    /// pixels (N, C, H, W) -> features (N, P', D·k) for the projector, P' = P without CLS
    /// (`default`) or 1 + P (`full`), k = number of selected layers.
    pub fn features(&self, pixels: &Tensor, sel: &FeatureSelect) -> Result<Tensor> {
        let wanted = sel
            .layers
            .iter()
            .map(|&l| self.resolve_layer(l))
            .collect::<Result<Vec<_>>>()?;
        let states = match self {
            Self::Clip(m) => {
                if sel.final_layernorm {
                    bail!("a CLIP tower has no final layernorm on its hidden states");
                }
                m.hidden_states(pixels, &wanted)?
            }
            Self::Dinov2(m) => {
                let states = m.hidden_states(pixels, &wanted)?;
                if sel.final_layernorm {
                    states
                        .iter()
                        .map(|s| m.layernorm.forward(s).map_err(Into::into))
                        .collect::<Result<Vec<_>>>()?
                } else {
                    states
                }
            }
        };
        let x = if states.len() == 1 {
            states.into_iter().next().expect("one state")
        } else {
            Tensor::cat(&states, D::Minus1)?
        };
        let x = match sel.strategy {
            SelectStrategy::Default => {
                let l = x.dim(1)?;
                x.narrow(1, 1, l - 1)?
            }
            SelectStrategy::Full => x,
        };
        match sel.pool {
            None => Ok(x),
            Some((ph, pw)) => {
                if sel.strategy != SelectStrategy::Default {
                    bail!("vision.pool needs the `default` strategy (patch tokens only)");
                }
                let (_, _, h, w) = pixels.dims4()?;
                let p = self.patch_size();
                avg_pool_grid(&x, h / p, w / p, ph, pw)
            }
        }
    }

    fn patch_size(&self) -> usize {
        match self {
            Self::Clip(m) => m.cfg.patch_size,
            Self::Dinov2(m) => m.cfg.patch_size,
        }
    }
}

/// Average-pools patch tokens (N, gh·gw, D) on their grid to (N, ph·pw, D); the grid must
/// divide evenly.
pub fn avg_pool_grid(x: &Tensor, gh: usize, gw: usize, ph: usize, pw: usize) -> Result<Tensor> {
    let (n, l, d) = x.dims3()?;
    if l != gh * gw || ph == 0 || pw == 0 || !gh.is_multiple_of(ph) || !gw.is_multiple_of(pw) {
        bail!("cannot pool a {gh}x{gw} patch grid ({l} tokens) to {ph}x{pw}");
    }
    let (kh, kw) = (gh / ph, gw / pw);
    Ok(x.reshape((n, ph, kh, pw, kw, d))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((n, ph * pw, kh * kw, d))?
        .mean(2)?)
}
