//! Loading a `Mllm` from the sources `ModelSource` tells apart:
//! - a llava-hf directory (`config.json` with `model_type: llava` + safetensors), in either
//!   key layout;
//! - a composed directory (`compose.json`): an HF LLM directory or GGUF file + an HF
//!   CLIP/DINOv2 directory + projector weights;
//! - a text-only LLM: an HF LLaMA/Mistral/Qwen2 directory or a GGUF file.
//!
//! Also a randomly initialised llava model of a given shape (benchmarks, tests).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use super::compose::ComposeFile;
use super::config::{
    FeatureSelect, LlavaConfigFile, LlmArch, LlmConfig, ProjectorConfig, SelectStrategy,
    TextConfigFile, VisionConfigFile,
};
use super::llama::Llama;
use super::mllm::{Mllm, VisionSide};
use super::params::{KeyPrefixes, llm_specs, projector_specs, vision_specs};
use super::projector::Projector;
use super::source::ModelSource;
use super::vision::VisionTower;
use crate::io::gguf::GgufModel;
use crate::io::store::{Store, Weights};
use crate::io::tokenizer::ChatTokenizer;
use crate::ops::act::Act;
use crate::util::files::read_json;
use crate::util::rng::Rng;

/// A llava `config.json`, resolved: everything but the weights.
#[derive(Debug, Clone)]
pub struct LlavaSpec {
    pub text: LlmConfig,
    pub vision: super::config::VisionConfig,
    pub select: FeatureSelect,
    pub projector: ProjectorConfig,
    pub image_token_id: u32,
}

impl LlavaSpec {
    pub fn from_file(cfg: &LlavaConfigFile, origin: &str) -> Result<Self> {
        let text = cfg.text_config.clone().unwrap_or_default().resolve(
            "llama",
            cfg.tie_word_embeddings,
            &format!("{origin} (text_config)"),
        )?;
        let vision = cfg
            .vision_config
            .clone()
            .with_context(|| format!("{origin}: missing field `vision_config`"))?
            .resolve("clip_vision_model", &format!("{origin} (vision_config)"))?;
        let layers = cfg
            .vision_feature_layer
            .as_ref()
            .map(|l| l.to_vec())
            .unwrap_or(vec![-2]);
        let strategy = SelectStrategy::parse(
            cfg.vision_feature_select_strategy
                .as_deref()
                .unwrap_or("default"),
            origin,
        )?;
        let projector = ProjectorConfig {
            num_linears: 2,
            act: cfg.projector_hidden_act.unwrap_or(Act::GeluErf),
            bias: cfg.multimodal_projector_bias.unwrap_or(true),
            in_features: vision.hidden_size() * layers.len(),
            out_features: text.hidden_size,
            standardize: false,
        };
        let image_token_id = u32::try_from(cfg.image_token_index.unwrap_or(32000))
            .map_err(|_| anyhow::anyhow!("{origin}: field `image_token_index` is negative"))?;
        Ok(Self {
            text,
            vision,
            select: FeatureSelect {
                layers,
                strategy,
                final_layernorm: false,
                pool: None,
            },
            projector,
            image_token_id,
        })
    }
}

impl Mllm {
    /// Loads any supported source (see the module docs). `dtype` is the matmul dtype of the
    /// frozen weights (f32 or bf16).
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            bail!("unsupported dtype {dtype:?}: use f32 or bf16");
        }
        match ModelSource::detect(path)? {
            ModelSource::Gguf(p) | ModelSource::TextHf(p) => {
                let (llm, tokenizer, keys) = load_llm_part(&p, dtype, device)?;
                Ok(Self::text_only(llm, tokenizer, keys, &p))
            }
            ModelSource::Composed(dir) => Self::load_composed(&dir, dtype, device),
            ModelSource::Llava(dir) => Self::load_llava(&dir, dtype, device),
        }
    }

    fn load_llava(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let spec = LlavaSpec::from_file(&read_json(&cfg_path)?, &cfg_path.display().to_string())?;
        let store = Arc::new(Store::open_dir(dir, device)?);
        let tokenizer = ChatTokenizer::from_hf_dir(dir)?;
        Self::from_llava(&spec, store, dtype, dir, tokenizer)
    }

    /// Builds a llava model from a resolved config and a store holding its weights in either
    /// llava-hf key layout.
    pub fn from_llava(
        spec: &LlavaSpec,
        store: Arc<Store>,
        dtype: DType,
        source: &Path,
        tokenizer: Option<ChatTokenizer>,
    ) -> Result<Self> {
        let root = Weights::new(store.clone(), dtype);
        // transformers <= 5.24 checkpoints: `language_model.model.*` + `language_model.lm_head`;
        // module-name layout: `model.language_model.*` + `lm_head`.
        let (body, head_prefix, head_key) = if root.pp("language_model.model").has_any() {
            (
                "language_model.model",
                "language_model",
                "language_model.lm_head.weight",
            )
        } else if root.pp("model.language_model").has_any() {
            ("model.language_model", "", "lm_head.weight")
        } else {
            bail!(
                "{}: no decoder weights (`language_model.model.*` or `model.language_model.*`)",
                store.describe()
            );
        };
        let vision_prefixes = [
            "vision_tower.vision_model",
            "vision_tower",
            "model.vision_tower.vision_model",
            "model.vision_tower",
        ];
        let vision_w = root.pp_first(&vision_prefixes).with_context(|| {
            format!(
                "{}: no vision tower weights (`vision_tower.*`)",
                store.describe()
            )
        })?;
        let projector_w = root
            .pp_first(&["multi_modal_projector", "model.multi_modal_projector"])
            .with_context(|| {
                format!(
                    "{}: no projector weights (`multi_modal_projector.*`)",
                    store.describe()
                )
            })?;
        let tower = VisionTower::load(&vision_w, &spec.vision)?;
        let projector = Projector::load(&projector_w, &spec.projector)?;
        let llm = Llama::load(&root.pp(body), &root.pp(head_prefix), &spec.text)?;
        Ok(Self {
            vision: Some(VisionSide {
                tower,
                select: spec.select.clone(),
                projector,
                image_token_id: spec.image_token_id,
                input_hw: None,
            }),
            llm,
            keys: KeyPrefixes {
                llm_body: body.into(),
                lm_head: head_key.into(),
                vision: vision_w.prefix().into(),
                projector: projector_w.prefix().into(),
            },
            source: source.to_path_buf(),
            tokenizer,
        })
    }

    /// A randomly initialised llava model (benchmarks, tests): linears and embeddings
    /// N(0, 0.02), norm scales and layer scales 1, biases 0, in the legacy llava-hf layout.
    pub fn random_llava(
        spec: &LlavaSpec,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let keys = KeyPrefixes::llava_legacy();
        let mut shapes: Vec<(String, Vec<usize>)> = llm_specs(&spec.text, &keys)
            .into_iter()
            .chain(projector_specs(&spec.projector, &keys))
            .map(|s| (s.name, s.shape))
            .collect();
        shapes.extend(vision_specs(&spec.vision, &keys.vision));
        let mut rng = Rng::new(seed);
        let mut tensors = Vec::with_capacity(shapes.len());
        for (name, shape) in shapes {
            let leaf = name.rsplit('.').nth(1).unwrap_or("");
            let t = if name.ends_with(".lambda1")
                || (shape.len() == 1 && leaf.contains("norm") && name.ends_with(".weight"))
            {
                Tensor::ones(shape.as_slice(), DType::F32, device)?
            } else if shape.len() == 1 && name.ends_with(".bias") {
                Tensor::zeros(shape.as_slice(), DType::F32, device)?
            } else if device.is_cpu() {
                // matrices straight in their storage dtype: a bf16 7B model never stands in
                // f32 in memory
                let dt = if shape.len() >= 2 { dtype } else { DType::F32 };
                rng.normal_tensor(&shape, 0.02, dt, device)?
            } else {
                // on a GPU its own generator: billions of draws in seconds, not minutes
                let t = Tensor::randn(0f32, 0.02, shape.as_slice(), device)?;
                if shape.len() >= 2 {
                    t.to_dtype(dtype)?
                } else {
                    t
                }
            };
            tensors.push((name, t));
        }
        let mut store = Store::new(device);
        store.add_owned(Path::new("<random init>"), tensors)?;
        Self::from_llava(
            spec,
            Arc::new(store),
            dtype,
            Path::new("<random init>"),
            None,
        )
    }

    /// A composed model: the LLM part, the vision part, then the projector between them,
    /// each checked against the sizes the others give.
    fn load_composed(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let origin = dir.join("compose.json").display().to_string();
        let c = ComposeFile::read(dir)?;
        let (llm, tokenizer, llm_keys) = load_llm_part(&dir.join(&c.llm.path), dtype, device)?;
        let (tower, vision_prefix) = load_vision_part(dir, &c, dtype, device)?;
        let features = c.features(&origin)?;
        let projector = load_projector_part(
            dir,
            &c,
            tower.hidden_size() * features.layers.len(),
            llm.cfg.hidden_size,
            dtype,
            device,
        )?;
        let image_token_id = u32::try_from(c.image_token_id)
            .map_err(|_| anyhow::anyhow!("{origin}: field `image_token_id` is negative"))?;
        let vision = VisionSide {
            tower,
            select: FeatureSelect {
                layers: features.layers,
                strategy: features.strategy,
                final_layernorm: features.final_layernorm,
                pool: c.vision.pool.map(|[a, b]| (a, b)),
            },
            projector,
            image_token_id,
            input_hw: c.vision.input_hw.map(|[h, w]| (h, w)),
        };
        if let (Some(n), Some([h, w])) = (c.image_tokens_per_image, c.vision.input_hw) {
            let got = vision.tokens_per_image(h, w);
            if got != n {
                bail!(
                    "{origin}: field `image_tokens_per_image` is {n} but a {h}x{w} image gives {got} features"
                );
            }
        }
        Ok(Self {
            vision: Some(vision),
            llm,
            keys: KeyPrefixes {
                llm_body: format!("llm.{}", llm_keys.0),
                lm_head: format!("llm.{}", llm_keys.1),
                vision: vision_prefix,
                projector: "projector".into(),
            },
            source: dir.to_path_buf(),
            tokenizer,
        })
    }

    fn text_only(
        llm: Llama,
        tokenizer: Option<ChatTokenizer>,
        keys: (String, String),
        src: &Path,
    ) -> Self {
        Self {
            vision: None,
            llm,
            keys: KeyPrefixes {
                llm_body: keys.0,
                lm_head: keys.1,
                vision: String::new(),
                projector: String::new(),
            },
            source: src.to_path_buf(),
            tokenizer,
        }
    }
}

/// The vision tower of a composed model and its key prefix (`vision` or `vision.<prefix>`).
fn load_vision_part(
    dir: &Path,
    c: &ComposeFile,
    dtype: DType,
    device: &Device,
) -> Result<(VisionTower, String)> {
    let vdir = dir.join(&c.vision.path);
    let vcfg_path = vdir.join("config.json");
    let vfile: VisionConfigFile = read_json(&vcfg_path)?;
    let default_type = c
        .vision
        .model_type
        .as_deref()
        .unwrap_or("clip_vision_model");
    let vision_cfg = vfile.resolve(default_type, &vcfg_path.display().to_string())?;
    let vroot = Weights::new(Arc::new(Store::open_dir(&vdir, device)?), dtype);
    let vision_w = vroot
        .pp_first(&["vision_model"])
        .unwrap_or_else(|| vroot.clone());
    let tower = VisionTower::load(&vision_w, &vision_cfg)?;
    let prefix = if vision_w.prefix().is_empty() {
        "vision".to_string()
    } else {
        format!("vision.{}", vision_w.prefix())
    };
    Ok((tower, prefix))
}

/// The projector of a composed model, `in_f` -> `out_f` as the other parts give them (the
/// sizes compose.json states, if any, must agree).
fn load_projector_part(
    dir: &Path,
    c: &ComposeFile,
    in_f: usize,
    out_f: usize,
    dtype: DType,
    device: &Device,
) -> Result<Projector> {
    let origin = dir.join("compose.json").display().to_string();
    for (field, want, got) in [
        ("projector.in_features", in_f, c.projector.in_features),
        ("projector.out_features", out_f, c.projector.out_features),
    ] {
        if let Some(got) = got
            && got != want
        {
            bail!("{origin}: field `{field}` is {got} but the model parts give {want}");
        }
    }
    let mut pcfg = ProjectorConfig::parse_type(
        &c.projector.type_,
        c.projector.bias.unwrap_or(true),
        in_f,
        out_f,
        &origin,
    )?;
    if let Some(act) = c.projector.act {
        pcfg.act = act;
    }
    pcfg.standardize = c.projector.standardize.unwrap_or(false);
    let mut pstore = Store::new(device);
    pstore.add_safetensors(&dir.join(&c.projector.path))?;
    Projector::load(&Weights::new(Arc::new(pstore), dtype), &pcfg)
}

/// Loads an LLM part from an HF directory or a GGUF file. Returns the decoder, its
/// tokenizer when present, and the (body prefix, lm_head key) of its checkpoint names.
pub fn load_llm_part(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(Llama, Option<ChatTokenizer>, (String, String))> {
    let keys = ("model".to_string(), "lm_head.weight".to_string());
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let g = GgufModel::open(path)?;
        let cfg = LlmConfig::from_gguf(&g)?;
        // llama.cpp permutes the Q and K rows of `llama` conversions
        let qk_heads = (cfg.arch == LlmArch::Llama).then_some((cfg.num_heads, cfg.num_kv_heads));
        let root = Weights::new(Arc::new(g.hf_store(qk_heads, device)?), dtype);
        let llm = Llama::load(&root.pp("model"), &root, &cfg)?;
        return Ok((llm, ChatTokenizer::from_gguf(&g)?, keys));
    }
    let cfg_path = path.join("config.json");
    let file: TextConfigFile = read_json(&cfg_path)?;
    let cfg = file.resolve("llama", None, &cfg_path.display().to_string())?;
    let root = Weights::new(Arc::new(Store::open_dir(path, device)?), dtype);
    let llm = Llama::load(&root.pp("model"), &root, &cfg)?;
    Ok((llm, ChatTokenizer::from_hf_dir(path)?, keys))
}
