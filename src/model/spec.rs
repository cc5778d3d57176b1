//! A model's shape from its config files alone (no weights read): what `lntune plan` needs
//! to count parameters and estimate memory for checkpoints that do not fit this machine.

use std::path::Path;

use anyhow::{Result, bail};
use serde::Deserialize;

use super::config::{
    LlmConfig, ProjectorConfig, TextConfigFile, VisionConfig, VisionConfigFile, read_json,
};
use super::mllm::{ComposeFile, KeyPrefixes, LlavaSpec};
use crate::io::gguf::GgufModel;
use crate::io::store::Store;
use crate::methods::{ParamSpec, llm_specs, projector_specs, vision_param_count};

pub struct ModelSpec {
    pub llm: LlmConfig,
    pub vision: Option<VisionConfig>,
    pub projector: Option<ProjectorConfig>,
    pub keys: KeyPrefixes,
    /// "llava", "compose" or "llm"
    pub kind: &'static str,
}

impl ModelSpec {
    /// Reads config.json / compose.json / GGUF metadata under `path`. Weight files, where
    /// present, are only consulted for their key layout (headers, not data).
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            let g = GgufModel::open(path)?;
            return Ok(Self::llm_only(g.llm_config()?));
        }
        if path.join("compose.json").exists() {
            return Self::composed(path);
        }
        let cfg_path = path.join("config.json");
        if !cfg_path.exists() {
            bail!(
                "{}: no config.json, compose.json or .gguf file",
                path.display()
            );
        }
        #[derive(Deserialize)]
        struct Probe {
            model_type: Option<String>,
        }
        let probe: Probe = read_json(&cfg_path)?;
        let origin = cfg_path.display().to_string();
        match probe.model_type.as_deref() {
            Some("llava") => {
                let spec = LlavaSpec::from_file(&read_json(&cfg_path)?, &origin)?;
                let keys = llava_keys_from_headers(path);
                Ok(Self {
                    llm: spec.text,
                    vision: Some(spec.vision),
                    projector: Some(spec.projector),
                    keys,
                    kind: "llava",
                })
            }
            _ => {
                let f: TextConfigFile = read_json(&cfg_path)?;
                Ok(Self::llm_only(f.resolve("llama", None, &origin)?))
            }
        }
    }

    fn llm_only(llm: LlmConfig) -> Self {
        Self {
            llm,
            vision: None,
            projector: None,
            keys: KeyPrefixes {
                llm_body: "model".into(),
                lm_head: "lm_head.weight".into(),
                vision: String::new(),
                projector: String::new(),
            },
            kind: "llm",
        }
    }

    fn composed(dir: &Path) -> Result<Self> {
        let path = dir.join("compose.json");
        let origin = path.display().to_string();
        let c: ComposeFile = read_json(&path)?;
        let llm_path = dir.join(&c.llm.path);
        let llm = if llm_path.is_file() {
            GgufModel::open(&llm_path)?.llm_config()?
        } else {
            let p = llm_path.join("config.json");
            read_json::<TextConfigFile>(&p)?.resolve("llama", None, &p.display().to_string())?
        };
        let vp = dir.join(&c.vision.path).join("config.json");
        let vision = read_json::<VisionConfigFile>(&vp)?.resolve(
            c.vision
                .model_type
                .as_deref()
                .unwrap_or("clip_vision_model"),
            &vp.display().to_string(),
        )?;
        let n_layers = c
            .vision
            .feature_layer
            .as_ref()
            .map(|l| l.to_vec().len())
            .unwrap_or(1);
        let projector = ProjectorConfig::parse_type(
            &c.projector.type_,
            c.projector.bias.unwrap_or(true),
            vision.hidden_size() * n_layers,
            llm.hidden_size,
            &origin,
        )?;
        Ok(Self {
            llm,
            vision: Some(vision),
            projector: Some(projector),
            keys: KeyPrefixes {
                llm_body: "llm.model".into(),
                lm_head: "llm.lm_head.weight".into(),
                vision: "vision".into(),
                projector: "projector".into(),
            },
            kind: "compose",
        })
    }

    /// Decoder and projector parameters, named as the loaded model names them.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let mut specs = llm_specs(&self.llm, &self.keys);
        if let Some(p) = &self.projector {
            specs.extend(projector_specs(p, &self.keys));
        }
        specs
    }

    pub fn vision_params(&self) -> usize {
        self.vision.as_ref().map(vision_param_count).unwrap_or(0)
    }

    /// Image tokens per image at the tower's configured resolution (CLS dropped).
    pub fn tokens_per_image(&self) -> usize {
        self.vision
            .as_ref()
            .map(|v| (v.image_size() / v.patch_size()).pow(2))
            .unwrap_or(0)
    }
}

/// The llava-hf key layout of a checkpoint directory, read from safetensors headers when
/// they exist (legacy layout otherwise).
fn llava_keys_from_headers(dir: &Path) -> KeyPrefixes {
    let legacy = KeyPrefixes {
        llm_body: "language_model.model".into(),
        lm_head: "language_model.lm_head.weight".into(),
        vision: "vision_tower".into(),
        projector: "multi_modal_projector".into(),
    };
    let Ok(store) = Store::open_dir(dir, &candle_core::Device::Cpu) else {
        return legacy;
    };
    let keys = store.keys();
    let has = |p: &str| keys.iter().any(|k| k.starts_with(p));
    if has("model.language_model.") {
        KeyPrefixes {
            llm_body: "model.language_model".into(),
            lm_head: "lm_head.weight".into(),
            vision: if has("model.vision_tower.vision_model.") {
                "model.vision_tower.vision_model".into()
            } else {
                "model.vision_tower".into()
            },
            projector: "model.multi_modal_projector".into(),
        }
    } else {
        KeyPrefixes {
            vision: if has("vision_tower.vision_model.") {
                "vision_tower.vision_model".into()
            } else {
                "vision_tower".into()
            },
            ..legacy
        }
    }
}
