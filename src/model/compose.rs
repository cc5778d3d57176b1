//! `compose.json` (format `tiny-vlm-compose/1`): a multimodal model assembled from parts, an
//! HF CLIP or DINOv2 directory, projector weights, and an HF LLM directory or GGUF file. The
//! loader reads it and `lntune demo` writes it through the same struct, so a field written
//! is a field read.

use std::path::Path;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::config::{OneOrMany, SelectStrategy};
use crate::ops::act::Act;
use crate::util::files::{read_json, write_json};

/// The one format version this loader reads.
pub const COMPOSE_FORMAT: &str = "tiny-vlm-compose/1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComposeFile {
    pub format: String,
    pub vision: ComposeVision,
    pub projector: ComposeProjector,
    pub llm: ComposePart,
    pub image_token_id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tokens_per_image: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComposeVision {
    /// the tower's HF directory, relative to the compose.json directory (or absolute)
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// `last_hidden_state` or `hidden_states`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    /// one index into the tower's hidden states, or a list whose states are concatenated
    /// along channels (lntune extension)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_layer: Option<OneOrMany>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_final_layernorm: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_strategy: Option<String>,
    /// pixel height and width the model is used with
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_hw: Option<[usize; 2]>,
    /// average-pool the patch grid to [rows, cols] tokens (lntune extension)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<[usize; 2]>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComposeProjector {
    /// safetensors file with `linear_{k}.weight`/`.bias` (and `input_mean`, `input_std`)
    pub path: String,
    /// `linear` or `mlp<N>x_gelu`
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_features: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_features: Option<usize>,
    /// activation between linears; `gelu_erf` unless stated
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Act>,
    /// standardize the input with `input_mean` / `input_std` from the projector file
    /// (lntune extension)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standardize: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComposePart {
    /// an HF LLM directory or a .gguf file
    pub path: String,
}

/// Which hidden states of the tower the projector sees, as `compose.json` states them.
pub struct ComposeFeatures {
    pub layers: Vec<i64>,
    pub final_layernorm: bool,
    pub strategy: SelectStrategy,
}

impl ComposeFile {
    /// Reads `dir/compose.json` and checks its format version.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("compose.json");
        let c: ComposeFile = read_json(&path)?;
        if c.format != COMPOSE_FORMAT {
            bail!(
                "{}: field `format` is `{}`, expected `{COMPOSE_FORMAT}`",
                path.display(),
                c.format
            );
        }
        Ok(c)
    }

    /// Writes `dir/compose.json` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join("compose.json"), self)
    }

    /// The feature layers, final layernorm and select strategy, with transformers' defaults:
    /// `last_hidden_state` is layer -1 after the final layernorm, `hidden_states` layer -2
    /// without it.
    pub fn features(&self, origin: &str) -> Result<ComposeFeatures> {
        let v = &self.vision;
        let layers = |default: i64| {
            v.feature_layer
                .as_ref()
                .map(|l| l.to_vec())
                .unwrap_or(vec![default])
        };
        let (layers, final_layernorm) = match v.feature.as_deref().unwrap_or("hidden_states") {
            "last_hidden_state" => (layers(-1), v.apply_final_layernorm.unwrap_or(true)),
            "hidden_states" => (layers(-2), v.apply_final_layernorm.unwrap_or(false)),
            other => bail!(
                "{origin}: field `vision.feature` is `{other}`, expected last_hidden_state or hidden_states"
            ),
        };
        let strategy =
            SelectStrategy::parse(v.select_strategy.as_deref().unwrap_or("default"), origin)?;
        Ok(ComposeFeatures {
            layers,
            final_layernorm,
            strategy,
        })
    }
}
