//! Model configs. Two layers, as in candle-transformers: serde structs that mirror the HF
//! `config.json` files field by field (every field optional, because hub configs often spell
//! out only what differs from the transformers class defaults), and plain runtime configs
//! with every value resolved. The defaults below are the transformers class defaults for
//! each `model_type`, so that e.g. llava-hf/llava-1.5-7b-hf's sparse `text_config` resolves
//! to Vicuna-7B.

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::io::gguf::GgufModel;
use crate::ops::act::Act;
use crate::util::checks;

// ---------------------------------------------------------------------------------------
// config.json mirrors

/// An integer or a list of integers (`eos_token_id`, `vision_feature_layer`).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            OneOrMany::One(v) => vec![*v],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeParamsFile {
    pub rope_type: Option<String>,
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

/// A decoder's config.json (LlamaConfig, MistralConfig, Qwen2Config) or a llava `text_config`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TextConfigFile {
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub hidden_act: Option<Act>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeParamsFile>,
    pub rope_parameters: Option<RopeParamsFile>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub bos_token_id: Option<OneOrMany>,
    pub eos_token_id: Option<OneOrMany>,
    pub pad_token_id: Option<OneOrMany>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
}

/// A vision config.json (CLIPVisionConfig, Dinov2Config) or a llava `vision_config`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct VisionConfigFile {
    pub model_type: Option<String>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub num_channels: Option<usize>,
    pub hidden_act: Option<Act>,
    pub layer_norm_eps: Option<f64>,
    pub mlp_ratio: Option<f64>,
    pub qkv_bias: Option<bool>,
    pub layerscale_value: Option<f64>,
    pub use_swiglu_ffn: Option<bool>,
    /// A full CLIPConfig nests the tower here.
    pub vision_config: Option<Box<VisionConfigFile>>,
}

/// LlavaForConditionalGeneration's config.json.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LlavaConfigFile {
    pub model_type: Option<String>,
    pub text_config: Option<TextConfigFile>,
    pub vision_config: Option<VisionConfigFile>,
    #[serde(alias = "image_token_id")]
    pub image_token_index: Option<i64>,
    pub projector_hidden_act: Option<Act>,
    pub vision_feature_layer: Option<OneOrMany>,
    pub vision_feature_select_strategy: Option<String>,
    pub multimodal_projector_bias: Option<bool>,
    pub image_seq_length: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
}

// ---------------------------------------------------------------------------------------
// runtime configs

/// How RoPE frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// positions divided by `factor`
    Linear {
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// `inv_freq[j] = theta^(-2j/HD)` in f32 as transformers computes it, then scaled.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base = self.theta as f32;
        let mut inv: Vec<f32> = (0..head_dim / 2)
            .map(|j| 1.0f32 / base.powf((2 * j) as f32 / head_dim as f32))
            .collect();
        match &self.scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => {
                for f in &mut inv {
                    *f /= *factor as f32;
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let old_ctx = *original_max_position_embeddings as f32;
                let low_wavelen = old_ctx / low;
                let high_wavelen = old_ctx / high;
                for f in &mut inv {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    *f = if medium {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        inv
    }
}

/// Which decoder family: they differ only in biases and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmArch {
    Llama,
    Mistral,
    Qwen2,
}

/// A LLaMA-family decoder, fully resolved.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    pub arch: LlmArch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// biases on q, k, v (Qwen2, or LLaMA with `attention_bias`)
    pub qkv_bias: bool,
    /// bias on o_proj (LLaMA `attention_bias`)
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub sliding_window: Option<usize>,
}

/// The largest sizes a config may give: far above any real model, low enough that no count
/// or shape derived from them overflows or asks for absurd memory before a weight is read.
const MAX_LAYERS: usize = 1024;
const MAX_WIDTH: usize = 1 << 16;
const MAX_VOCAB: usize = 1 << 22;
const MAX_HEADS: usize = 1024;
const MAX_IMAGE_SIDE: usize = 8192;

impl LlmConfig {
    /// Sizes and numbers a decoder can have; `origin` names the file for messages.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let field = |name: &str| format!("{origin}: field `{name}`");
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, 4 * MAX_WIDTH),
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_WIDTH),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                usize::MAX,
            ),
        ] {
            checks::positive(&field(name), v)?;
            checks::at_most(&field(name), v, max)?;
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "{origin}: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads,
                self.num_kv_heads
            );
        }
        checks::at_most(
            &field("num_attention_heads x head_dim"),
            self.num_heads * self.head_dim,
            MAX_WIDTH,
        )?;
        checks::finite_positive(&field("rms_norm_eps"), self.rms_norm_eps)?;
        checks::finite_positive(&field("rope_theta"), self.rope.theta)?;
        match &self.rope.scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => checks::finite_positive(&field("factor"), *factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                checks::finite_positive(&field("factor"), *factor)?;
                checks::finite_positive(&field("low_freq_factor"), *low_freq_factor)?;
                checks::finite_positive(&field("high_freq_factor"), *high_freq_factor)?;
                checks::positive(
                    &field("original_max_position_embeddings"),
                    *original_max_position_embeddings,
                )?;
                if high_freq_factor <= low_freq_factor {
                    bail!(
                        "{origin}: rope scaling `high_freq_factor` must exceed `low_freq_factor`"
                    );
                }
            }
        }
        Ok(())
    }

    /// The decoder config from a GGUF file's `<arch>.*` metadata.
    pub fn from_gguf(g: &GgufModel) -> Result<Self> {
        let arch_name = g.architecture()?;
        let arch = match arch_name.as_str() {
            "llama" => LlmArch::Llama,
            "qwen2" => LlmArch::Qwen2,
            other => bail!(
                "{}: unknown architecture `{other}` in metadata `general.architecture`; supported: llama, qwen2",
                g.path.display()
            ),
        };
        let k = |s: &str| format!("{arch_name}.{s}");
        let hidden = g.need_usize(&k("embedding_length"))?;
        let heads = g.need_usize(&k("attention.head_count"))?;
        if heads == 0 {
            bail!(
                "{}: metadata `{}` is 0",
                g.path.display(),
                k("attention.head_count")
            );
        }
        let kv_heads = g
            .meta_usize(&k("attention.head_count_kv"))?
            .unwrap_or(heads);
        let head_dim = match g.meta_usize(&k("rope.dimension_count"))? {
            Some(d) => d,
            None => g
                .meta_usize(&k("attention.key_length"))?
                .unwrap_or(hidden / heads),
        };
        let vocab = match g.meta_usize(&k("vocab_size"))? {
            Some(v) => v,
            None => g
                .content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .with_context(|| {
                    format!("{}: missing tensor `token_embd.weight`", g.path.display())
                })?,
        };
        let scaling = match g.meta_string(&k("rope.scaling.type"))?.as_deref() {
            None | Some("none") => RopeScaling::Default,
            Some("linear") => RopeScaling::Linear {
                factor: g.meta_f64(&k("rope.scaling.factor"))?.with_context(|| {
                    format!(
                        "{}: missing metadata `{}`",
                        g.path.display(),
                        k("rope.scaling.factor")
                    )
                })?,
            },
            Some(other) => bail!(
                "{}: metadata `{}` is `{other}`, which is not supported (linear)",
                g.path.display(),
                k("rope.scaling.type")
            ),
        };
        if g.content.tensor_infos.contains_key("rope_freqs.weight") {
            bail!(
                "{}: tensor `rope_freqs.weight` (llama3 rope scaling) is not supported",
                g.path.display()
            );
        }
        let has = |n: &str| g.content.tensor_infos.contains_key(n);
        let qkv_bias = has("blk.0.attn_q.bias");
        let cfg = LlmConfig {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: g.need_usize(&k("feed_forward_length"))?,
            num_layers: g.need_usize(&k("block_count"))?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: g
                .meta_f64(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope: RopeConfig {
                theta: g.meta_f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
                scaling,
            },
            max_position_embeddings: g.meta_usize(&k("context_length"))?.unwrap_or(2048),
            tie_word_embeddings: !has("output.weight"),
            qkv_bias,
            o_bias: has("blk.0.attn_output.bias"),
            mlp_bias: has("blk.0.ffn_up.bias"),
            bos_token_id: g.meta_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: g
                .meta_u32("tokenizer.ggml.eos_token_id")?
                .into_iter()
                .collect(),
            sliding_window: None,
        };
        cfg.validate(&g.path.display().to_string())?;
        Ok(cfg)
    }
}

fn first_id(v: &Option<OneOrMany>) -> Option<u32> {
    v.as_ref()
        .and_then(|v| v.to_vec().first().copied())
        .and_then(|x| u32::try_from(x).ok())
}

impl TextConfigFile {
    /// Resolves with the transformers defaults of `model_type` (`default_type` when absent).
    /// `origin` names the file/field for messages.
    pub fn resolve(
        &self,
        default_type: &str,
        tie_default: Option<bool>,
        origin: &str,
    ) -> Result<LlmConfig> {
        let mt = self.model_type.as_deref().unwrap_or(default_type);
        // (vocab, hidden, intermediate, layers, heads, kv heads or None = heads, max pos,
        //  rms eps, tie)
        let (arch, d) = match mt {
            "llama" => (
                LlmArch::Llama,
                (32000, 4096, 11008, 32, 32, None, 2048, 1e-6, false),
            ),
            "mistral" => (
                LlmArch::Mistral,
                (32000, 4096, 14336, 32, 32, Some(8), 4096 * 32, 1e-6, false),
            ),
            "qwen2" => (
                LlmArch::Qwen2,
                (151936, 4096, 22016, 32, 32, Some(32), 32768, 1e-6, false),
            ),
            other => bail!(
                "{origin}: unknown architecture `{other}` in field `model_type`; supported: llama, mistral, qwen2"
            ),
        };
        let hidden_size = self.hidden_size.unwrap_or(d.1);
        let num_heads = self.num_attention_heads.unwrap_or(d.4);
        let num_kv_heads = self.num_key_value_heads.or(d.5).unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            bail!(
                "{origin}: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            );
        }
        let head_dim = self.head_dim.unwrap_or(hidden_size / num_heads);
        if !head_dim.is_multiple_of(2) {
            bail!("{origin}: head_dim {head_dim} must be even for RoPE");
        }
        if let Some(act) = self.hidden_act
            && act != Act::Silu
        {
            bail!("{origin}: hidden_act {act:?} is not supported for the decoder MLP (only silu)");
        }
        let rope = resolve_rope(self, origin)?;
        let attention_bias = self.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            LlmArch::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let sliding_window = match arch {
            LlmArch::Mistral => self.sliding_window,
            LlmArch::Qwen2 if self.use_sliding_window.unwrap_or(false) => self.sliding_window,
            _ => None,
        };
        let cfg = LlmConfig {
            arch,
            vocab_size: self.vocab_size.unwrap_or(d.0),
            hidden_size,
            intermediate_size: self.intermediate_size.unwrap_or(d.2),
            num_layers: self.num_hidden_layers.unwrap_or(d.3),
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(d.7),
            rope,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(d.6),
            tie_word_embeddings: self.tie_word_embeddings.or(tie_default).unwrap_or(d.8),
            qkv_bias,
            o_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            bos_token_id: first_id(&self.bos_token_id),
            eos_token_ids: self
                .eos_token_id
                .as_ref()
                .map(|e| {
                    e.to_vec()
                        .into_iter()
                        .filter_map(|x| u32::try_from(x).ok())
                        .collect()
                })
                .unwrap_or_default(),
            sliding_window,
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }
}

fn resolve_rope(c: &TextConfigFile, origin: &str) -> Result<RopeConfig> {
    let params = c
        .rope_parameters
        .clone()
        .or(c.rope_scaling.clone())
        .unwrap_or_default();
    let theta = params.rope_theta.or(c.rope_theta).unwrap_or(10000.0);
    let kind = params.rope_type.clone().or(params.type_.clone());
    let need = |v: Option<f64>, name: &str| {
        v.with_context(|| format!("{origin}: rope scaling needs field `{name}`"))
    };
    let scaling = match kind.as_deref() {
        None | Some("default") => RopeScaling::Default,
        Some("linear") => RopeScaling::Linear {
            factor: need(params.factor, "factor")?,
        },
        Some("llama3") => RopeScaling::Llama3 {
            factor: need(params.factor, "factor")?,
            low_freq_factor: need(params.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(params.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: params
                .original_max_position_embeddings
                .with_context(|| {
                    format!("{origin}: rope scaling needs field `original_max_position_embeddings`")
                })?,
        },
        Some(other) => bail!(
            "{origin}: rope type `{other}` is not supported (supported: default, linear, llama3)"
        ),
    };
    Ok(RopeConfig { theta, scaling })
}

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

#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    #[test]
    fn sparse_llava_15_config_resolves_to_vicuna_7b_and_clip_l336() {
        // llava-hf/llava-1.5-7b-hf's config.json spells out only what differs from defaults
        let json = r#"{"model_type": "llava", "image_token_index": 32000,
            "projector_hidden_act": "gelu", "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                "vocab_size": 32064},
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                "model_type": "clip_vision_model", "num_attention_heads": 16,
                "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                "vocab_size": 32000}}"#;
        let f: LlavaConfigFile = serde_json::from_str(json).unwrap();
        let t = f.text_config.unwrap().resolve("llama", None, "t").unwrap();
        assert_eq!(
            (
                t.hidden_size,
                t.num_layers,
                t.num_heads,
                t.num_kv_heads,
                t.intermediate_size
            ),
            (4096, 32, 32, 32, 11008)
        );
        assert_eq!(
            (t.vocab_size, t.head_dim, t.tie_word_embeddings),
            (32064, 128, false)
        );
        assert_eq!(
            t.rope,
            RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::Default
            }
        );
        let VisionConfig::Clip(v) = f
            .vision_config
            .unwrap()
            .resolve("clip_vision_model", "v")
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (v.hidden_size, v.num_layers, v.patch_size, v.image_size),
            (1024, 24, 14, 336)
        );
        assert_eq!((v.hidden_act, v.layer_norm_eps), (Act::QuickGelu, 1e-5));
    }

    #[test]
    fn rope_settings_in_both_spellings() {
        let v4: TextConfigFile = serde_json::from_str(
            r#"{"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}"#,
        )
        .unwrap();
        let v5: TextConfigFile = serde_json::from_str(
            r#"{"rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}}"#,
        )
        .unwrap();
        let a = v4.resolve("llama", None, "a").unwrap().rope;
        assert_eq!(a, v5.resolve("llama", None, "b").unwrap().rope);
        assert_eq!(a.scaling, RopeScaling::Linear { factor: 2.0 });
        let bad: TextConfigFile =
            serde_json::from_str(r#"{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#)
                .unwrap();
        let err = bad
            .resolve("llama", None, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cfg.json") && err.contains("yarn"), "{err}");
    }

    #[test]
    fn inv_freq_matches_transformers() {
        // transformers ROPE_INIT_FUNCTIONS, head_dim 128
        let llama3 = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        };
        let inv = llama3.inv_freq(128);
        let want = [
            (0, 1.0f32),
            (20, 0.016_560_441),
            (40, 3.428_102_4e-5),
            (45, 1.229_763_9e-5),
            (50, 4.411_534_5e-6),
            (63, 3.068_925_9e-7),
        ];
        for (i, w) in want {
            assert!(
                (inv[i] - w).abs() <= 1e-6 * w.abs(),
                "llama3 [{i}] {} vs {w}",
                inv[i]
            );
        }
        let linear = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Linear { factor: 4.0 },
        };
        let inv = linear.inv_freq(128);
        for (i, w) in [(0, 0.25f32), (1, 0.216_491_09), (63, 2.886_954_8e-5)] {
            assert!(
                (inv[i] - w).abs() <= 1e-6 * w,
                "linear [{i}] {} vs {w}",
                inv[i]
            );
        }
    }

    #[test]
    fn projector_type_names() {
        let p = ProjectorConfig::parse_type("mlp3x_gelu", true, 8, 16, "x").unwrap();
        assert_eq!(p.num_linears, 3);
        assert_eq!(
            ProjectorConfig::parse_type("linear", true, 8, 16, "x")
                .unwrap()
                .num_linears,
            1
        );
        assert!(ProjectorConfig::parse_type("resampler", true, 8, 16, "x").is_err());
    }
}
