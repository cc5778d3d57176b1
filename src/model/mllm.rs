//! The multimodal model: vision tower (frozen) -> projector -> LLaMA-family decoder, with the
//! projected image features replacing the image tokens of `input_ids`.
//!
//! Sources it loads from:
//! - a llava-hf directory (`config.json` with `model_type: llava` + safetensors);
//! - a composed directory (`compose.json`, format `tiny-vlm-compose/1`): an HF LLM
//!   directory or GGUF file + an HF CLIP/DINOv2 directory + projector weights;
//! - a text-only LLM: an HF LLaMA/Mistral/Qwen2 directory or a GGUF file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::config::{
    FeatureSelect, LlavaConfigFile, ProjectorConfig, SelectStrategy, TextConfigFile,
    VisionConfigFile, read_json,
};
use super::llama::Llama;
use super::projector::Projector;
use super::vision::VisionTower;
use crate::io::gguf::GgufModel;
use crate::io::store::{Store, Weights};
use crate::ops::act::Act;
use crate::ops::loss::{IGNORE_INDEX, cross_entropy_forward};

/// Checkpoint-key prefixes of the model's parts, so that gradients, adapters and plans can
/// name tensors exactly as the user's files do. A part's key is `<prefix>.<name in part>`.
#[derive(Debug, Clone)]
pub struct KeyPrefixes {
    /// holds `embed_tokens`, `layers.{i}`, `norm`
    pub llm_body: String,
    /// the full key of the output head (`…lm_head.weight`)
    pub lm_head: String,
    pub vision: String,
    pub projector: String,
}

/// The vision side: tower, which states it exposes, projector, and the image token.
pub struct VisionSide {
    pub tower: VisionTower,
    pub select: FeatureSelect,
    pub projector: Projector,
    pub image_token_id: u32,
}

pub struct Mllm {
    pub vision: Option<VisionSide>,
    pub llm: Llama,
    pub keys: KeyPrefixes,
    /// where the model came from (for messages and adapter fingerprints)
    pub source: PathBuf,
    /// tokenizer and chat template when the source carries them (GGUF metadata,
    /// tokenizer.json)
    pub text: Option<crate::io::tokenizer::TextTools>,
}

/// One training/eval batch in the layout of the reference fixtures.
pub struct Batch {
    /// (B, T) token ids, image tokens pre-expanded
    pub input_ids: Vec<Vec<u32>>,
    /// (B, T) true for real tokens (right padding)
    pub attention_mask: Vec<Vec<bool>>,
    /// (B, T) targets, `IGNORE_INDEX` where unscored; None for inference
    pub labels: Option<Vec<Vec<i64>>>,
    /// (N images, C, H, W) f32, images in batch order
    pub pixel_values: Option<Tensor>,
    /// the vision tower's output for these images, (N, P, Dv), when already computed (the
    /// tower is frozen, so features can be cached); used instead of `pixel_values`
    pub vision_features: Option<Tensor>,
}

impl Batch {
    /// Reads `input_ids`, `attention_mask` (optional: all ones), `labels` (optional) and
    /// `pixel_values` (optional) from a safetensors file.
    pub fn from_safetensors(path: &Path, device: &Device) -> Result<Self> {
        let mut store = Store::new(&Device::Cpu);
        store.add_safetensors(path)?;
        let ints = |name: &str| -> Result<Option<Vec<Vec<i64>>>> {
            if !store.contains(name) {
                return Ok(None);
            }
            let t = store.load_any(name)?;
            let t = t.to_dtype(DType::I64)?;
            let rows = t.to_vec2::<i64>().map_err(|e| {
                anyhow::anyhow!(
                    "{}: tensor `{name}` must be 2-D (B, T): {e}",
                    path.display()
                )
            })?;
            Ok(Some(rows))
        };
        let ids = ints("input_ids")?
            .with_context(|| format!("{}: missing tensor `input_ids`", path.display()))?;
        let input_ids = ids
            .iter()
            .map(|r| {
                r.iter()
                    .map(|&x| {
                        u32::try_from(x).map_err(|_| {
                            anyhow::anyhow!("{}: `input_ids` holds negative id {x}", path.display())
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let (b, t) = (
            input_ids.len(),
            input_ids.first().map(|r| r.len()).unwrap_or(0),
        );
        let attention_mask = match ints("attention_mask")? {
            Some(m) => m
                .into_iter()
                .map(|r| r.into_iter().map(|x| x != 0).collect())
                .collect(),
            None => vec![vec![true; t]; b],
        };
        let labels = ints("labels")?;
        let shape_ok = |rows: &Vec<Vec<bool>>| rows.len() == b && rows.iter().all(|r| r.len() == t);
        if !shape_ok(&attention_mask) {
            bail!(
                "{}: `attention_mask` shape differs from `input_ids` [{b}, {t}]",
                path.display()
            );
        }
        if let Some(l) = &labels
            && (l.len() != b || l.iter().any(|r| r.len() != t))
        {
            bail!(
                "{}: `labels` shape differs from `input_ids` [{b}, {t}]",
                path.display()
            );
        }
        let pixel_values = if store.contains("pixel_values") {
            let pv = store.load_any("pixel_values")?.to_dtype(DType::F32)?;
            if pv.rank() != 4 {
                bail!(
                    "{}: `pixel_values` has shape {:?}, expected (N, C, H, W)",
                    path.display(),
                    pv.dims()
                );
            }
            Some(pv.to_device(device)?)
        } else {
            None
        };
        Ok(Self {
            input_ids,
            attention_mask,
            labels,
            pixel_values,
            vision_features: None,
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (
            self.input_ids.len(),
            self.input_ids.first().map(|r| r.len()).unwrap_or(0),
        )
    }
}

/// A llava `config.json`, resolved: everything but the weights.
#[derive(Debug, Clone)]
pub struct LlavaSpec {
    pub text: super::config::LlmConfig,
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

/// `compose.json` (format `tiny-vlm-compose/1`).
#[derive(Debug, Deserialize)]
pub struct ComposeFile {
    pub format: String,
    pub vision: ComposeVision,
    pub projector: ComposeProjector,
    pub llm: ComposePart,
    pub image_token_id: i64,
    pub image_tokens_per_image: Option<usize>,
}

#[derive(Debug, Deserialize)]
pub struct ComposeVision {
    pub path: String,
    pub model_type: Option<String>,
    /// `last_hidden_state` or `hidden_states`
    pub feature: Option<String>,
    /// one index into the tower's hidden states, or a list whose states are concatenated
    /// along channels (lntune extension)
    pub feature_layer: Option<super::config::OneOrMany>,
    pub apply_final_layernorm: Option<bool>,
    pub select_strategy: Option<String>,
    /// pixel height and width the model is used with
    pub input_hw: Option<[usize; 2]>,
    /// average-pool the patch grid to [rows, cols] tokens (lntune extension)
    pub pool: Option<[usize; 2]>,
}

#[derive(Debug, Deserialize)]
pub struct ComposeProjector {
    pub path: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub bias: Option<bool>,
    pub in_features: Option<usize>,
    pub out_features: Option<usize>,
    /// activation between linears; `gelu_erf` unless stated
    pub act: Option<Act>,
    /// standardize the input with `input_mean` / `input_std` from the projector file
    /// (lntune extension)
    pub standardize: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ComposePart {
    pub path: String,
}

impl Mllm {
    /// Loads any supported source (see the module docs). `dtype` is the matmul dtype of the
    /// frozen weights (f32 or bf16).
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            bail!("unsupported dtype {dtype:?}: use f32 or bf16");
        }
        if path.is_file() {
            if path.extension().is_some_and(|e| e == "gguf") {
                return Self::load_text_only_gguf(path, dtype, device);
            }
            bail!("{}: not a model directory or .gguf file", path.display());
        }
        if !path.is_dir() {
            bail!("{}: no such model directory or file", path.display());
        }
        if path.join("compose.json").exists() {
            return Self::load_composed(path, dtype, device);
        }
        let cfg_path = path.join("config.json");
        if !cfg_path.exists() {
            bail!("{}: no config.json or compose.json", path.display());
        }
        #[derive(Deserialize)]
        struct Probe {
            model_type: Option<String>,
        }
        let probe: Probe = read_json(&cfg_path)?;
        match probe.model_type.as_deref() {
            Some("llava") => Self::load_llava(path, dtype, device),
            Some("llama" | "mistral" | "qwen2") => Self::load_text_only_hf(path, dtype, device),
            Some(other) => bail!(
                "{}: unknown architecture `{other}` in field `model_type`; supported: llava, llama, mistral, qwen2",
                cfg_path.display()
            ),
            None => bail!("{}: missing field `model_type`", cfg_path.display()),
        }
    }

    fn load_llava(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let spec = LlavaSpec::from_file(&read_json(&cfg_path)?, &cfg_path.display().to_string())?;
        let store = Arc::new(Store::open_dir(dir, device)?);
        let text = crate::io::tokenizer::TextTools::from_hf_dir(dir)?;
        Self::from_llava(&spec, store, dtype, dir, text)
    }

    /// Builds a llava model from a resolved config and a store holding its weights in either
    /// llava-hf key layout.
    pub fn from_llava(
        spec: &LlavaSpec,
        store: Arc<Store>,
        dtype: DType,
        source: &Path,
        text: Option<crate::io::tokenizer::TextTools>,
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
            }),
            llm,
            keys: KeyPrefixes {
                llm_body: body.into(),
                lm_head: head_key.into(),
                vision: vision_w.prefix().into(),
                projector: projector_w.prefix().into(),
            },
            source: source.to_path_buf(),
            text,
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
        let keys = KeyPrefixes {
            llm_body: "language_model.model".into(),
            lm_head: "language_model.lm_head.weight".into(),
            vision: "vision_tower".into(),
            projector: "multi_modal_projector".into(),
        };
        let mut shapes: Vec<(String, Vec<usize>)> = crate::methods::llm_specs(&spec.text, &keys)
            .into_iter()
            .chain(crate::methods::projector_specs(&spec.projector, &keys))
            .map(|s| (s.name, s.shape))
            .collect();
        shapes.extend(crate::methods::vision_specs(&spec.vision, &keys.vision));
        let mut rng = crate::rng::Rng::new(seed);
        let mut tensors = Vec::with_capacity(shapes.len());
        for (name, shape) in shapes {
            let leaf = name.rsplit('.').nth(1).unwrap_or("");
            let t = if name.ends_with(".lambda1")
                || (shape.len() == 1 && leaf.contains("norm") && name.ends_with(".weight"))
            {
                Tensor::ones(shape.as_slice(), DType::F32, device)?
            } else if shape.len() == 1 && name.ends_with(".bias") {
                Tensor::zeros(shape.as_slice(), DType::F32, device)?
            } else {
                rng.normal_tensor(&shape, 0.02, DType::F32, device)?
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

    fn load_composed(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let path = dir.join("compose.json");
        let origin = path.display().to_string();
        let c: ComposeFile = read_json(&path)?;
        if c.format != "tiny-vlm-compose/1" {
            bail!(
                "{origin}: field `format` is `{}`, expected `tiny-vlm-compose/1`",
                c.format
            );
        }
        // LLM part: HF directory or GGUF file
        let llm_path = dir.join(&c.llm.path);
        let (llm, text, llm_keys) = load_llm_part(&llm_path, dtype, device)?;
        // vision part
        let vdir = dir.join(&c.vision.path);
        let vcfg_path = vdir.join("config.json");
        let vfile: VisionConfigFile = read_json(&vcfg_path)?;
        let default_type = c
            .vision
            .model_type
            .as_deref()
            .unwrap_or("clip_vision_model");
        let vision_cfg = vfile.resolve(default_type, &vcfg_path.display().to_string())?;
        let vstore = Arc::new(Store::open_dir(&vdir, device)?);
        let vroot = Weights::new(vstore.clone(), dtype);
        let vision_w = vroot
            .pp_first(&["vision_model"])
            .unwrap_or_else(|| vroot.clone());
        let tower = VisionTower::load(&vision_w, &vision_cfg)?;
        let feature = c.vision.feature.as_deref().unwrap_or("hidden_states");
        let (layers, final_layernorm) = match feature {
            "last_hidden_state" => (
                c.vision
                    .feature_layer
                    .as_ref()
                    .map(|l| l.to_vec())
                    .unwrap_or(vec![-1]),
                c.vision.apply_final_layernorm.unwrap_or(true),
            ),
            "hidden_states" => (
                c.vision
                    .feature_layer
                    .as_ref()
                    .map(|l| l.to_vec())
                    .unwrap_or(vec![-2]),
                c.vision.apply_final_layernorm.unwrap_or(false),
            ),
            other => bail!(
                "{origin}: field `vision.feature` is `{other}`, expected last_hidden_state or hidden_states"
            ),
        };
        let strategy = SelectStrategy::parse(
            c.vision.select_strategy.as_deref().unwrap_or("default"),
            &origin,
        )?;
        // projector part
        let ppath = dir.join(&c.projector.path);
        let mut pstore = Store::new(device);
        pstore.add_safetensors(&ppath)?;
        let in_f = vision_cfg.hidden_size() * layers.len();
        let out_f = llm.cfg.hidden_size;
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
        let projector = Projector::load(&Weights::new(Arc::new(pstore), dtype), &pcfg)?;
        let image_token_id = u32::try_from(c.image_token_id)
            .map_err(|_| anyhow::anyhow!("{origin}: field `image_token_id` is negative"))?;
        let vision = VisionSide {
            tower,
            select: FeatureSelect {
                layers,
                strategy,
                final_layernorm,
                pool: c.vision.pool.map(|[a, b]| (a, b)),
            },
            projector,
            image_token_id,
        };
        if let (Some(n), Some([h, w])) = (c.image_tokens_per_image, c.vision.input_hw) {
            let got = vision.tokens_per_image(h, w);
            if got != n {
                bail!(
                    "{origin}: field `image_tokens_per_image` is {n} but a {h}x{w} image gives {got} features"
                );
            }
        }
        let vprefix = if vision_w.prefix().is_empty() {
            "vision".to_string()
        } else {
            format!("vision.{}", vision_w.prefix())
        };
        Ok(Self {
            vision: Some(vision),
            llm,
            keys: KeyPrefixes {
                llm_body: format!("llm.{}", llm_keys.0),
                lm_head: format!("llm.{}", llm_keys.1),
                vision: vprefix,
                projector: "projector".into(),
            },
            source: dir.to_path_buf(),
            text,
        })
    }

    fn load_text_only_hf(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (llm, text, keys) = load_llm_part(dir, dtype, device)?;
        Ok(Self::text_only(llm, text, keys, dir))
    }

    fn load_text_only_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (llm, text, keys) = load_llm_part(path, dtype, device)?;
        Ok(Self::text_only(llm, text, keys, path))
    }

    fn text_only(
        llm: Llama,
        text: Option<crate::io::tokenizer::TextTools>,
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
            text,
        }
    }

    /// Runs the vision tower and the projector: pixels (N, C, H, W) -> (N, P, Dl).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let v = self
            .vision
            .as_ref()
            .context("this model has no vision tower, but the batch has pixel_values")?;
        let f = v.tower.features(pixels, &v.select)?;
        v.projector.forward(&f)
    }

    /// Input embeddings with the image features spliced in: (B, T, C) f32.
    /// The k-th image-token position in row-major (batch, position) order receives the k-th
    /// feature row (images in batch order, patches row-major), as transformers'
    /// `masked_scatter` does. `features` is (N, P, C) or None for text-only batches.
    pub fn embed_with_images(
        &self,
        input_ids: &[Vec<u32>],
        features: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = (
            input_ids.len(),
            input_ids.first().map(|r| r.len()).unwrap_or(0),
        );
        let v = self.llm.cfg.vocab_size as u32;
        let image_id = self.vision.as_ref().map(|s| s.image_token_id);
        let mut flat = Vec::with_capacity(b * t);
        let mut gather = Vec::with_capacity(b * t);
        let mut n_img = 0u32;
        for (bi, row) in input_ids.iter().enumerate() {
            if row.len() != t {
                bail!(
                    "input_ids: row {bi} has {} tokens, row 0 has {t}",
                    row.len()
                );
            }
            for (pos, &id) in row.iter().enumerate() {
                if Some(id) == image_id {
                    gather.push((b * t) as u32 + n_img);
                    n_img += 1;
                    // the image token's own embedding row is replaced; look up a valid id
                    flat.push(if id < v { id } else { 0 });
                } else {
                    if id >= v {
                        bail!(
                            "input_ids: token id {id} at [{bi}, {pos}] is outside the vocabulary (size {v})"
                        );
                    }
                    gather.push((bi * t + pos) as u32);
                    flat.push(id);
                }
            }
        }
        let n_feat = match features {
            Some(f) => f.dims3()?.0 * f.dims3()?.1,
            None => 0,
        };
        if n_img as usize != n_feat {
            let per = features.map(|f| f.dim(1).unwrap_or(0)).unwrap_or(0);
            let n_images = features.map(|f| f.dim(0).unwrap_or(0)).unwrap_or(0);
            bail!(
                "input_ids hold {n_img} image tokens (id {}), but {n_images} images give {n_images} x {per} = {n_feat} features",
                image_id.map(|i| i.to_string()).unwrap_or("none".into())
            );
        }
        let dev = self.llm.embed_tokens.device();
        let ids = Tensor::from_vec(flat, b * t, dev)?;
        let text = self.llm.embed(&ids)?; // (B·T, C)
        let c = text.dim(1)?;
        let all = match features {
            Some(f) if n_feat > 0 => Tensor::cat(&[&text, &f.reshape((n_feat, c))?], 0)?,
            _ => text,
        };
        let gather = Tensor::from_vec(gather, b * t, dev)?;
        Ok(all.index_select(&gather, 0)?.reshape((b, t, c))?)
    }

    /// Full forward: batch -> logits (B, T, V) f32.
    pub fn forward(&self, batch: &Batch) -> Result<Tensor> {
        let x = self.input_embeds(batch)?;
        let h = self.hidden_from_embeds(&x, &batch.attention_mask)?;
        Ok(self.llm.logits(&h)?)
    }

    /// Vision tower + projector + splice: the decoder's input embeddings (B, T, C).
    pub fn input_embeds(&self, batch: &Batch) -> Result<Tensor> {
        let feats = match (&batch.vision_features, &batch.pixel_values) {
            (Some(f), _) => Some(
                self.vision
                    .as_ref()
                    .context("no vision tower")?
                    .projector
                    .forward(f)?,
            ),
            (None, Some(p)) => Some(self.image_features(p)?),
            (None, None) => None,
        };
        self.embed_with_images(&batch.input_ids, feats.as_ref())
    }

    /// Decoder blocks and final norm on input embeddings (B, T, C), positions 0..T-1 in
    /// every row (right padding), keys masked by `attention_mask`.
    pub fn hidden_from_embeds(&self, x: &Tensor, attention_mask: &[Vec<bool>]) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        let inp = self.llm.prepare(attention_mask, &positions, t)?;
        Ok(self.llm.forward_hidden(x, &inp)?)
    }

    /// Token-mean cross-entropy of logits (B, T, V) against labels shifted by one.
    pub fn loss(logits: &Tensor, labels: &[Vec<i64>]) -> Result<Tensor> {
        let (b, t, v) = logits.dims3()?;
        let targets = shifted_targets(labels, t)?;
        let (loss, _) = cross_entropy_forward(&logits.reshape((b * t, v))?, &targets)?;
        Ok(loss)
    }

    /// Every decoder and projector parameter, named by checkpoint key (see `methods`).
    pub fn param_specs(&self) -> Vec<crate::methods::ParamSpec> {
        let mut specs = crate::methods::llm_specs(&self.llm.cfg, &self.keys);
        if let Some(v) = &self.vision {
            specs.extend(crate::methods::projector_specs(
                &v.projector.cfg,
                &self.keys,
            ));
        }
        specs
    }

    /// Parameters of the (always frozen) vision tower.
    pub fn vision_param_count(&self) -> usize {
        self.vision
            .as_ref()
            .map(|v| crate::methods::vision_param_count(&v.tower.config()))
            .unwrap_or(0)
    }

    /// The tensor with checkpoint key `name` (decoder, head, projector, LoRA adapters).
    pub fn param_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        if !self.llm.cfg.tie_word_embeddings && name == self.keys.lm_head {
            return Some(&mut self.llm.lm_head);
        }
        if let Some(rest) = name.strip_prefix(&format!("{}.", self.keys.llm_body)) {
            return self.llm.body_param_mut(rest);
        }
        let v = self.vision.as_mut()?;
        let rest = name.strip_prefix(&format!("{}.", self.keys.projector))?;
        v.projector.param_mut(rest)
    }

    /// The decoder linear whose weight key is `<stem>.weight` (for LoRA adapters).
    pub fn linear_mut(&mut self, stem: &str) -> Option<&mut super::Linear> {
        let rest = stem.strip_prefix(&format!("{}.", self.keys.llm_body))?;
        self.llm.linear_mut(rest)
    }

    /// The tensor with checkpoint key `name`, read-only.
    pub fn param(&mut self, name: &str) -> Option<Tensor> {
        self.param_mut(name).map(|t| t.clone())
    }

    /// Features per image of `h`×`w` pixels, None for a text-only model.
    pub fn tokens_per_image(&self, h: usize, w: usize) -> Option<usize> {
        self.vision.as_ref().map(|v| v.tokens_per_image(h, w))
    }
}

impl VisionSide {
    /// Features per image of `h`×`w` pixels after the select strategy.
    pub fn tokens_per_image(&self, h: usize, w: usize) -> usize {
        if let Some((a, b)) = self.select.pool {
            return a * b;
        }
        let p = self.tower.num_patches(h, w);
        match self.select.strategy {
            SelectStrategy::Default => p,
            SelectStrategy::Full => p + 1,
        }
    }
}

/// Labels (B, T) -> targets for logits rows (B·T): row (b, t) predicts labels[b][t + 1];
/// the last position of each row predicts nothing.
pub fn shifted_targets(labels: &[Vec<i64>], t: usize) -> Result<Vec<i64>> {
    let mut targets = Vec::with_capacity(labels.len() * t);
    for (bi, row) in labels.iter().enumerate() {
        if row.len() != t {
            bail!("labels: row {bi} has {} entries, expected {t}", row.len());
        }
        targets.extend_from_slice(&row[1..]);
        targets.push(IGNORE_INDEX);
    }
    Ok(targets)
}

/// Loads an LLM part from an HF directory or a GGUF file. Returns the decoder, tokenizer
/// tools when present, and the (body prefix, lm_head key) of its checkpoint names.
pub fn load_llm_part(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(
    Llama,
    Option<crate::io::tokenizer::TextTools>,
    (String, String),
)> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let g = GgufModel::open(path)?;
        let cfg = g.llm_config()?;
        let store = Arc::new(g.hf_store(&cfg, device)?);
        let root = Weights::new(store, dtype);
        let llm = Llama::load(&root.pp("model"), &root, &cfg)?;
        let text = g.text_tools()?;
        return Ok((llm, text, ("model".into(), "lm_head.weight".into())));
    }
    let cfg_path = path.join("config.json");
    let file: TextConfigFile = read_json(&cfg_path)?;
    let cfg = file.resolve("llama", None, &cfg_path.display().to_string())?;
    let store = Arc::new(Store::open_dir(path, device)?);
    let root = Weights::new(store, dtype);
    let llm = Llama::load(&root.pp("model"), &root, &cfg)?;
    let text = crate::io::tokenizer::TextTools::from_hf_dir(path)?;
    Ok((llm, text, ("model".into(), "lm_head.weight".into())))
}
