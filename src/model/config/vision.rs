//! The vision tower's and projector's runtime configs, resolved from a `vision_config`.

use anyhow::{Context, Result, bail};

use super::file::{MAX_HEADS, MAX_IMAGE_SIDE, MAX_LAYERS, MAX_WIDTH, VisionConfigFile};
use crate::ops::act::Act;
use crate::util::checks;

/// CLIP vision transformer.
#[derive(Debug, Clone)]
pub struct ClipConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_act: Act,
    pub layer_norm_eps: f64,
}

/// DINOv2 vision transformer.
#[derive(Debug, Clone)]
pub struct Dinov2Config {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub mlp_hidden: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_act: Act,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    pub use_swiglu_ffn: bool,
}

#[derive(Debug, Clone)]
pub enum VisionConfig {
    Clip(ClipConfig),
    Dinov2(Dinov2Config),
}

impl VisionConfig {
    pub fn hidden_size(&self) -> usize {
        match self {
            VisionConfig::Clip(c) => c.hidden_size,
            VisionConfig::Dinov2(c) => c.hidden_size,
        }
    }
    pub fn num_layers(&self) -> usize {
        match self {
            VisionConfig::Clip(c) => c.num_layers,
            VisionConfig::Dinov2(c) => c.num_layers,
        }
    }
    pub fn patch_size(&self) -> usize {
        match self {
            VisionConfig::Clip(c) => c.patch_size,
            VisionConfig::Dinov2(c) => c.patch_size,
        }
    }
    pub fn image_size(&self) -> usize {
        match self {
            VisionConfig::Clip(c) => c.image_size,
            VisionConfig::Dinov2(c) => c.image_size,
        }
    }
}

impl VisionConfig {
    /// Sizes a ViT tower can have; `origin` names the file for messages.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let field = |name: &str| format!("{origin}: field `{name}`");
        let (heads, mlp, channels, eps) = match self {
            VisionConfig::Clip(c) => (
                c.num_heads,
                c.intermediate_size,
                c.num_channels,
                c.layer_norm_eps,
            ),
            VisionConfig::Dinov2(c) => {
                (c.num_heads, c.mlp_hidden, c.num_channels, c.layer_norm_eps)
            }
        };
        for (name, v, max) in [
            ("hidden_size", self.hidden_size(), MAX_WIDTH),
            ("intermediate_size", mlp, 4 * MAX_WIDTH),
            ("num_hidden_layers", self.num_layers(), MAX_LAYERS),
            ("num_attention_heads", heads, MAX_HEADS),
            ("num_channels", channels, 16),
            ("patch_size", self.patch_size(), MAX_IMAGE_SIDE),
            ("image_size", self.image_size(), MAX_IMAGE_SIDE),
        ] {
            checks::positive(&field(name), v)?;
            checks::at_most(&field(name), v, max)?;
        }
        if !self.hidden_size().is_multiple_of(heads) {
            bail!(
                "{origin}: hidden_size {} is not a multiple of num_attention_heads {heads}",
                self.hidden_size()
            );
        }
        if self.image_size() < self.patch_size() {
            bail!(
                "{origin}: image_size {} is smaller than patch_size {}",
                self.image_size(),
                self.patch_size()
            );
        }
        checks::finite_positive(&field("layer_norm_eps"), eps)
    }
}

impl VisionConfigFile {
    /// Resolves with the transformers defaults of `model_type` (`default_type` when absent).
    pub fn resolve(&self, default_type: &str, origin: &str) -> Result<VisionConfig> {
        let cfg = self.resolve_unchecked(default_type, origin)?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn resolve_unchecked(&self, default_type: &str, origin: &str) -> Result<VisionConfig> {
        if let Some(inner) = &self.vision_config {
            // a full CLIPConfig: the tower's config is nested
            return inner.resolve_unchecked("clip_vision_model", origin);
        }
        let mt = self.model_type.as_deref().unwrap_or(default_type);
        match mt {
            "clip_vision_model" | "clip" => Ok(VisionConfig::Clip(ClipConfig {
                hidden_size: self.hidden_size.unwrap_or(768),
                intermediate_size: self.intermediate_size.unwrap_or(3072),
                num_layers: self.num_hidden_layers.unwrap_or(12),
                num_heads: self.num_attention_heads.unwrap_or(12),
                image_size: self.image_size.unwrap_or(224),
                patch_size: self.patch_size.unwrap_or(32),
                num_channels: self.num_channels.unwrap_or(3),
                hidden_act: self.hidden_act.unwrap_or(Act::QuickGelu),
                layer_norm_eps: self.layer_norm_eps.unwrap_or(1e-5),
            })),
            "dinov2" => {
                let hidden = self.hidden_size.unwrap_or(768);
                let mlp_ratio = self.mlp_ratio.unwrap_or(4.0);
                checks::within(
                    &format!("{origin}: field `mlp_ratio`"),
                    mlp_ratio,
                    0.0,
                    64.0,
                )?;
                Ok(VisionConfig::Dinov2(Dinov2Config {
                    hidden_size: hidden,
                    num_layers: self.num_hidden_layers.unwrap_or(12),
                    num_heads: self.num_attention_heads.unwrap_or(12),
                    mlp_hidden: (hidden as f64 * mlp_ratio) as usize,
                    image_size: self.image_size.unwrap_or(224),
                    patch_size: self.patch_size.unwrap_or(14),
                    num_channels: self.num_channels.unwrap_or(3),
                    hidden_act: self.hidden_act.unwrap_or(Act::GeluErf),
                    layer_norm_eps: self.layer_norm_eps.unwrap_or(1e-6),
                    qkv_bias: self.qkv_bias.unwrap_or(true),
                    use_swiglu_ffn: self.use_swiglu_ffn.unwrap_or(false),
                }))
            }
            other => bail!(
                "{origin}: unknown vision architecture `{other}` in field `model_type`; supported: clip_vision_model, dinov2"
            ),
        }
    }
}

/// Which tokens of the tower's output feed the projector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelectStrategy {
    /// drop the CLS token
    Default,
    /// keep every token
    Full,
}

impl SelectStrategy {
    pub fn parse(s: &str, origin: &str) -> Result<Self> {
        match s {
            "default" => Ok(Self::Default),
            "full" => Ok(Self::Full),
            other => bail!(
                "{origin}: vision_feature_select_strategy `{other}` is not supported (default, full)"
            ),
        }
    }
}

/// Which vision hidden state(s) the projector sees.
#[derive(Debug, Clone)]
pub struct FeatureSelect {
    /// indices into `hidden_states` (embeddings output first), negative from the end;
    /// several are concatenated along channels as transformers does
    pub layers: Vec<i64>,
    pub strategy: SelectStrategy,
    /// apply the tower's final layernorm (DINOv2 `last_hidden_state`)
    pub final_layernorm: bool,
    /// average-pool the patch grid to (rows, cols) tokens (`default` strategy only)
    pub pool: Option<(usize, usize)>,
}

/// Projector layout: `linear_1`, act, `linear_2`, act, ... (llava-hf names).
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    pub num_linears: usize,
    pub act: Act,
    pub bias: bool,
    pub in_features: usize,
    pub out_features: usize,
    /// standardize the input with stored `input_mean` / `input_std`
    pub standardize: bool,
}

impl ProjectorConfig {
    /// `linear` or `mlp{N}x_gelu` (LLaVA's `mm_projector_type` names).
    pub fn parse_type(
        t: &str,
        bias: bool,
        in_features: usize,
        out_features: usize,
        origin: &str,
    ) -> Result<Self> {
        let num_linears = if t == "linear" {
            1
        } else if let Some(n) = t.strip_prefix("mlp").and_then(|r| r.strip_suffix("x_gelu")) {
            n.parse::<usize>()
                .ok()
                .filter(|&n| (1..=16).contains(&n))
                .with_context(|| format!("{origin}: bad projector type `{t}`"))?
        } else {
            bail!("{origin}: projector type `{t}` is not supported (linear, mlp<N>x_gelu)");
        };
        Ok(Self {
            num_linears,
            act: Act::GeluErf,
            bias,
            in_features,
            out_features,
            standardize: false,
        })
    }
}
