//! A model's shape from its config files alone (no weights read): what `lntune plan` needs
//! to count parameters and estimate memory for checkpoints that do not fit this machine.

use std::path::Path;

use anyhow::Result;

use super::compose::ComposeFile;
use super::config::{LlmConfig, ProjectorConfig, TextConfigFile, VisionConfig, VisionConfigFile};
use super::load::LlavaSpec;
use super::params::{KeyPrefixes, ParamSpec, llm_specs, projector_specs, vision_param_count};
use super::source::ModelSource;
use crate::io::gguf::GgufModel;
use crate::io::store::Store;
use crate::util::files::read_json;

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
        match ModelSource::detect(path)? {
            ModelSource::Gguf(p) => {
                Ok(Self::llm_only(LlmConfig::from_gguf(&GgufModel::open(&p)?)?))
            }
            ModelSource::TextHf(dir) => {
                let cfg_path = dir.join("config.json");
                let f: TextConfigFile = read_json(&cfg_path)?;
                Ok(Self::llm_only(f.resolve(
                    "llama",
                    None,
                    &cfg_path.display().to_string(),
                )?))
            }
            ModelSource::Composed(dir) => Self::composed(&dir),
            ModelSource::Llava(dir) => {
                let cfg_path = dir.join("config.json");
                let origin = cfg_path.display().to_string();
                let spec = LlavaSpec::from_file(&read_json(&cfg_path)?, &origin)?;
                Ok(Self {
                    llm: spec.text,
                    vision: Some(spec.vision),
                    projector: Some(spec.projector),
                    keys: llava_keys_from_headers(&dir),
                    kind: "llava",
                })
            }
        }
    }

    /// A named preset (`super::presets`), keyed as `Mllm::random_llava` keys it.
    pub fn from_preset(name: &str) -> Result<Self> {
        let spec = super::presets::preset(name)?;
        Ok(Self {
            llm: spec.text,
            vision: Some(spec.vision),
            projector: Some(spec.projector),
            keys: KeyPrefixes::llava_legacy(),
            kind: "llava",
        })
    }

    fn llm_only(llm: LlmConfig) -> Self {
        Self {
            llm,
            vision: None,
            projector: None,
            keys: KeyPrefixes::llm_only(),
            kind: "llm",
        }
    }

    fn composed(dir: &Path) -> Result<Self> {
        let origin = dir.join("compose.json").display().to_string();
        let c = ComposeFile::read(dir)?;
        let llm_path = dir.join(&c.llm.path);
        let llm = if llm_path.is_file() {
            LlmConfig::from_gguf(&GgufModel::open(&llm_path)?)?
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
        let n_layers = c.features(&origin)?.layers.len();
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
    let legacy = KeyPrefixes::llava_legacy();
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
