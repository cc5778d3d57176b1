//! The language model's runtime config, resolved from a `text_config` (transformers' class
//! defaults per `model_type`) or from GGUF metadata.

use anyhow::{Context, Result, bail};

use super::file::{MAX_HEADS, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, OneOrMany, TextConfigFile};
use crate::io::gguf::GgufModel;
use crate::ops::act::Act;
use crate::util::checks;

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
