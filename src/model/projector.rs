//! The vision-language connector: `linear_1` (Dv -> Dl), then for an MLP projector
//! act -> `linear_2` (Dl -> Dl) -> act -> ... (llava-hf `LlavaMultiModalProjector` names;
//! LLaVA's `mm_projector_type` `linear` / `mlp2x_gelu`).

use anyhow::Result;
use candle_core::Tensor;

use super::Linear;
use super::config::ProjectorConfig;
use crate::io::store::Weights;
use crate::ops::act::act_forward;

pub struct Projector {
    pub cfg: ProjectorConfig,
    /// `linear_1`, `linear_2`, ...
    pub linears: Vec<Linear>,
    /// fixed per-channel standardization of the input, (x − input_mean) / input_std
    /// (`input_mean`, `input_std` in the projector file; never trained)
    pub input_norm: Option<(Tensor, Tensor)>,
}

impl Projector {
    pub fn load(w: &Weights, cfg: &ProjectorConfig) -> Result<Self> {
        let linears = (0..cfg.num_linears)
            .map(|i| {
                let in_f = if i == 0 {
                    cfg.in_features
                } else {
                    cfg.out_features
                };
                Linear::load(
                    w,
                    &format!("linear_{}", i + 1),
                    cfg.out_features,
                    in_f,
                    cfg.bias,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let input_norm = if cfg.standardize {
            Some((
                w.get_f32("input_mean", &[cfg.in_features])?,
                w.get_f32("input_std", &[cfg.in_features])?,
            ))
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            linears,
            input_norm,
        })
    }

    /// The standardized input (identity without `input_norm`).
    pub fn normalize_input(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.input_norm {
            Some((m, s)) => x.broadcast_sub(m)?.broadcast_div(s)?,
            None => x.clone(),
        })
    }

    /// `linear_{k}.weight` / `linear_{k}.bias`
    pub fn param_mut(&mut self, rest: &str) -> Option<&mut Tensor> {
        let (lin, tail) = rest.split_once('.')?;
        let k: usize = lin.strip_prefix("linear_")?.parse().ok()?;
        self.linears.get_mut(k.checked_sub(1)?)?.param_mut(tail)
    }

    /// features (N, P, Dv) -> (N, P, Dl)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.linears[0].forward(&self.normalize_input(x)?)?;
        for lin in &self.linears[1..] {
            x = lin.forward(&act_forward(&x, self.cfg.act)?)?;
        }
        Ok(x)
    }
}
