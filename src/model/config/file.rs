//! The config.json mirrors: serde structs field by field, every field optional (hub
//! configs often spell out only what differs from the transformers class defaults), and the
//! largest sizes a config may claim.

use serde::Deserialize;

use crate::ops::act::Act;

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

/// The largest sizes a config may give: far above any real model, low enough that no count
/// or shape derived from them overflows or asks for absurd memory before a weight is read.
pub const MAX_LAYERS: usize = 1024;
pub const MAX_WIDTH: usize = 1 << 16;
pub const MAX_VOCAB: usize = 1 << 22;
pub const MAX_HEADS: usize = 1024;
pub const MAX_IMAGE_SIDE: usize = 8192;
