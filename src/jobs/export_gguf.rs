//! `lntune export gguf`: the model's LLM with an adapter merged, as a llama.cpp GGUF file.
//!
//! From a GGUF base (a `.gguf` model, or a composed model whose LLM is one) the file keeps
//! the base's metadata (tokenizer, chat template) and tensor order; under `--type keep`
//! every tensor the adapter does not change is copied byte for byte and a changed one is
//! re-encoded in its own type (F16 where lntune cannot write that type). From an HF base
//! (llava-hf, HF LLM, or a composed model whose LLM is an HF directory) the metadata comes
//! from the decoder config and, for byte-level BPE tokenizers, `tokenizer.json`.
//!
//! Norms are always F32, as llama.cpp's converter writes them. Q and K rows go in
//! llama.cpp's permuted order for the `llama` architecture. The vision tower and the
//! projector have no place in a text GGUF: trained projector tensors are reported, not
//! written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};

use crate::io::gguf::{GgufModel, gguf_name, hf_name};
use crate::io::gguf_write::{OutTensor, can_encode, encode, permute_qk_rows, write_gguf};
use crate::model::compose::ComposeFile;
use crate::model::config::{LlmArch, LlmConfig, RopeScaling};
use crate::model::mllm::Mllm;
use crate::model::source::ModelSource;

/// Tensor types of the written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum GgufType {
    /// each tensor in the base's type (unchanged tensors byte for byte)
    Keep,
    /// matrices in F16
    F16,
    /// matrices in Q8_0 (F16 where a row is not whole blocks of 32)
    #[value(name = "q8_0")]
    Q8_0,
}

/// What `export gguf` wrote.
#[derive(Debug)]
pub struct GgufExport {
    pub tensors: usize,
    /// tensors copied from the base's GGUF byte for byte
    pub copied: usize,
    /// tensors whose values the adapter changed
    pub merged: usize,
    /// changed tensors written as F16 because lntune cannot encode the base's type
    pub retyped: usize,
    /// trained tensors outside the LLM (projector), which a text GGUF cannot hold
    pub left_out: Vec<String>,
    /// why no tokenizer metadata was written (HF bases), if none was
    pub no_tokenizer: Option<String>,
}

/// Where the LLM's weights are.
enum LlmFiles {
    Gguf(PathBuf),
    /// an HF directory and the prefix its keys lack compared with the model's keys
    Hf(PathBuf, &'static str),
}

fn llm_files(model: &Path) -> Result<LlmFiles> {
    Ok(match ModelSource::detect(model)? {
        ModelSource::Gguf(p) => LlmFiles::Gguf(p),
        ModelSource::Llava(d) | ModelSource::TextHf(d) => LlmFiles::Hf(d, ""),
        ModelSource::Composed(d) => {
            let c = ComposeFile::read(&d)?;
            let p = d.join(&c.llm.path);
            if p.is_file() {
                LlmFiles::Gguf(p)
            } else {
                LlmFiles::Hf(p, "llm.")
            }
        }
    })
}

/// The type a tensor is written in.
fn target_type(ty: GgufType, src: GgmlDType, dims: &[usize], changed: bool) -> GgmlDType {
    if dims.len() < 2 {
        return GgmlDType::F32;
    }
    match ty {
        GgufType::Keep if changed && !can_encode(src) => GgmlDType::F16,
        GgufType::Keep => src,
        GgufType::F16 => GgmlDType::F16,
        GgufType::Q8_0 if dims[dims.len() - 1].is_multiple_of(32) => GgmlDType::Q8_0,
        GgufType::Q8_0 => GgmlDType::F16,
    }
}

/// llama.cpp's `general.file_type` (`llama_ftype`) for a file whose matrices are `t`.
fn file_type(t: GgmlDType) -> Option<u32> {
    match t {
        GgmlDType::F32 => Some(0),
        GgmlDType::F16 => Some(1),
        GgmlDType::Q8_0 => Some(7),
        GgmlDType::BF16 => Some(32),
        _ => None,
    }
}

/// Writes `out`: the LLM of `model` with `adapter` merged, as GGUF.
pub fn export_gguf(
    model: &Path,
    adapter: Option<&Path>,
    out: &Path,
    ty: GgufType,
) -> Result<GgufExport> {
    if out.is_dir() {
        bail!(
            "export gguf: --out {} is a directory; give a .gguf file path",
            out.display()
        );
    }
    let files = llm_files(model)?;
    if let (LlmFiles::Gguf(src), Ok(o)) = (&files, out.canonicalize())
        && src.canonicalize().is_ok_and(|s| s == o)
    {
        bail!(
            "export gguf: --out {} is the base model's file; write the merged model elsewhere",
            out.display()
        );
    }
    let mut m = Mllm::load(model, DType::F32, &Device::Cpu)?;
    let merged = super::export::merged_params(&mut m, adapter)?;
    // adapter tensors by the LLM's HF name
    let mut changed: HashMap<String, Tensor> = HashMap::new();
    let mut left_out = Vec::new();
    let body = format!("{}.", m.keys.llm_body);
    for (k, t) in merged {
        if k == m.keys.lm_head {
            changed.insert("lm_head.weight".into(), t);
        } else if let Some(rest) = k.strip_prefix(&body) {
            changed.insert(format!("model.{rest}"), t);
        } else {
            left_out.push(k);
        }
    }
    left_out.sort();
    let cfg = m.llm.cfg.clone();
    let permute = cfg.arch != LlmArch::Qwen2;
    // an HF-order tensor in GGUF's row order
    let gguf_rows = |hf: &str, t: &Tensor| -> Result<Vec<f32>> {
        let dims = t.dims().to_vec();
        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let n_in = if dims.len() == 2 { dims[1] } else { 1 };
        Ok(if permute && hf.contains(".self_attn.q_proj.") {
            permute_qk_rows(&v, cfg.num_heads, n_in)
        } else if permute && hf.contains(".self_attn.k_proj.") {
            permute_qk_rows(&v, cfg.num_kv_heads, n_in)
        } else {
            v
        })
    };
    let mut report = GgufExport {
        tensors: 0,
        copied: 0,
        merged: 0,
        retyped: 0,
        left_out,
        no_tokenizer: None,
    };
    match files {
        LlmFiles::Gguf(src) => {
            let g = GgufModel::open(&src)?;
            let names = g.tensor_names();
            let mut plan = Vec::with_capacity(names.len());
            for name in &names {
                let (_, src_t, dims) = g.tensor_bytes(name)?;
                let hf = hf_name(name);
                let is_changed = hf.as_ref().is_some_and(|h| changed.contains_key(h));
                let t = target_type(ty, src_t, &dims, is_changed);
                if is_changed && ty == GgufType::Keep && t != src_t && dims.len() >= 2 {
                    report.retyped += 1;
                }
                plan.push(OutTensor {
                    name: name.clone(),
                    dims,
                    dtype: t,
                });
            }
            // keep: the base's file type still describes the file; otherwise the new one
            let mut meta: Vec<(String, Value)> = g
                .content
                .metadata
                .iter()
                .filter(|(k, _)| k.as_str() != "general.alignment")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if ty != GgufType::Keep {
                meta.retain(|(k, _)| k != "general.file_type");
                let main = if ty == GgufType::F16 {
                    GgmlDType::F16
                } else {
                    GgmlDType::Q8_0
                };
                meta.push((
                    "general.file_type".into(),
                    Value::U32(file_type(main).unwrap_or(1)),
                ));
            }
            meta.sort_by(|a, b| a.0.cmp(&b.0));
            write_gguf(out, &meta, &plan, |i| {
                let t = &plan[i];
                let (bytes, src_t, _) = g.tensor_bytes(&t.name)?;
                let hf = hf_name(&t.name);
                match hf.as_ref().and_then(|h| changed.get(h).map(|v| (h, v))) {
                    Some((h, v)) => {
                        report.merged += 1;
                        encode(t.dtype, &gguf_rows(h, v)?)
                    }
                    None if t.dtype == src_t => {
                        report.copied += 1;
                        Ok(bytes.to_vec())
                    }
                    None => {
                        let (v, _) = g.dequantize_tensor(&t.name)?;
                        encode(t.dtype, &v)
                    }
                }
                .with_context(|| format!("tensor `{}`", t.name))
            })?;
            report.tensors = plan.len();
        }
        LlmFiles::Hf(dir, strip) => {
            let store = crate::io::store::Store::open_dir(&dir, &Device::Cpu)?;
            let mut meta = hf_metadata(&cfg, &dir)?;
            let specs: Vec<_> = m
                .param_specs()
                .into_iter()
                .filter(|s| s.name == m.keys.lm_head || s.name.starts_with(&body))
                .collect();
            let mut plan = Vec::with_capacity(specs.len());
            let mut sources = Vec::with_capacity(specs.len());
            let mut matrix_type = None;
            for s in &specs {
                let hf = if s.name == m.keys.lm_head {
                    "lm_head.weight".to_string()
                } else {
                    format!("model.{}", &s.name[body.len()..])
                };
                let name =
                    gguf_name(&hf).with_context(|| format!("`{}` has no GGUF name", s.name))?;
                let in_store = s.name.strip_prefix(strip).unwrap_or(&s.name);
                let (st, dims, _) = store.raw(in_store).with_context(|| {
                    format!("{}: `{in_store}` is not a plain tensor", dir.display())
                })?;
                let src_t = match st {
                    safetensors::Dtype::F16 => GgmlDType::F16,
                    safetensors::Dtype::BF16 => GgmlDType::BF16,
                    _ => GgmlDType::F32,
                };
                let t = target_type(ty, src_t, dims, changed.contains_key(&hf));
                if dims.len() >= 2 {
                    matrix_type.get_or_insert(t);
                }
                plan.push(OutTensor {
                    name,
                    dims: dims.to_vec(),
                    dtype: t,
                });
                sources.push((s.name.clone(), hf));
            }
            let ft = matrix_type.and_then(file_type).unwrap_or(0);
            meta.push(("general.file_type".into(), Value::U32(ft)));
            if ty == GgufType::Q8_0 {
                meta.push(("general.quantization_version".into(), Value::U32(2)));
            }
            match hf_tokenizer(&dir, &cfg)? {
                Ok(tok) => meta.extend(tok),
                Err(why) => report.no_tokenizer = Some(why),
            }
            write_gguf(out, &meta, &plan, |i| {
                let (key, hf) = &sources[i];
                let v = match changed.get(hf) {
                    Some(v) => {
                        report.merged += 1;
                        v.clone()
                    }
                    None => m.param(key).with_context(|| format!("`{key}` missing"))?,
                };
                encode(plan[i].dtype, &gguf_rows(hf, &v)?)
                    .with_context(|| format!("tensor `{}`", plan[i].name))
            })?;
            report.tensors = plan.len();
        }
    }
    if report.merged != changed.len() {
        bail!(
            "export gguf: {} of the adapter's LLM tensors have no place in the GGUF",
            changed.len() - report.merged
        );
    }
    Ok(report)
}

/// `general.*` and `<arch>.*` metadata from a decoder config.
fn hf_metadata(cfg: &LlmConfig, dir: &Path) -> Result<Vec<(String, Value)>> {
    let arch = match cfg.arch {
        LlmArch::Llama | LlmArch::Mistral => "llama",
        LlmArch::Qwen2 => "qwen2",
    };
    if cfg.sliding_window.is_some() {
        bail!(
            "export gguf: {}: a sliding attention window cannot be written to GGUF's `{arch}` architecture",
            dir.display()
        );
    }
    if cfg.o_bias || cfg.mlp_bias || (cfg.qkv_bias && cfg.arch != LlmArch::Qwen2) {
        bail!(
            "export gguf: {}: LLaMA with `attention_bias`/`mlp_bias` is not written to GGUF yet",
            dir.display()
        );
    }
    let u = |x: usize| Value::U32(x as u32);
    let k = |s: &str| format!("{arch}.{s}");
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.name".into(), Value::String(name)),
        (k("vocab_size"), u(cfg.vocab_size)),
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("block_count"), u(cfg.num_layers)),
        (k("attention.head_count"), u(cfg.num_heads)),
        (k("attention.head_count_kv"), u(cfg.num_kv_heads)),
        (k("attention.key_length"), u(cfg.head_dim)),
        (k("attention.value_length"), u(cfg.head_dim)),
        (k("rope.dimension_count"), u(cfg.head_dim)),
        (k("rope.freq_base"), Value::F32(cfg.rope.theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
    ];
    match &cfg.rope.scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            meta.push((k("rope.scaling.type"), Value::String("linear".into())));
            meta.push((k("rope.scaling.factor"), Value::F32(*factor as f32)));
        }
        other => bail!(
            "export gguf: {}: rope scaling {other:?} is not written to GGUF yet",
            dir.display()
        ),
    }
    Ok(meta)
}

/// `tokenizer.ggml.*` metadata from `dir/tokenizer.json` when it is a byte-level BPE with
/// GPT-2's pre-tokenizer (`tokenizer.ggml.model = gpt2`, `pre = gpt2`); otherwise why not.
fn hf_tokenizer(
    dir: &Path,
    cfg: &LlmConfig,
) -> Result<std::result::Result<Vec<(String, Value)>, String>> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(Err(format!("{} has no tokenizer.json", dir.display())));
    }
    let tj: serde_json::Value = crate::util::files::read_json(&path)?;
    let model = &tj["model"];
    let byte_level_pre =
        tj["pre_tokenizer"]["type"] == "ByteLevel" && tj["pre_tokenizer"]["use_regex"] != false;
    if model["type"] != "BPE" || !byte_level_pre {
        return Ok(Err(format!(
            "{}: only byte-level BPE tokenizers with GPT-2's pre-tokenizer are written to GGUF so far",
            path.display()
        )));
    }
    let vocab = model["vocab"]
        .as_object()
        .with_context(|| format!("{}: field `model.vocab` is not an object", path.display()))?;
    let n = cfg.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    let mut put = |tok: &str, id: u64, ty: i32| -> Result<()> {
        let i = usize::try_from(id)
            .ok()
            .filter(|&i| i < n)
            .with_context(|| {
                format!(
                    "{}: token {tok:?} has id {id}, outside the vocabulary of {n}",
                    path.display()
                )
            })?;
        tokens[i] = Some(tok.to_string());
        types[i] = ty;
        Ok(())
    };
    for (tok, id) in vocab {
        let id = id.as_u64().with_context(|| {
            format!(
                "{}: field `model.vocab`[{tok:?}] is not an id",
                path.display()
            )
        })?;
        put(tok, id, 1)?;
    }
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        let (Some(tok), Some(id)) = (a["content"].as_str(), a["id"].as_u64()) else {
            bail!(
                "{}: an entry of `added_tokens` lacks content or id",
                path.display()
            );
        };
        // control tokens for special ones, user-defined otherwise (llama.cpp's token types)
        put(tok, id, if a["special"] == true { 3 } else { 4 })?;
    }
    // ids the tokenizer does not use (a padded embedding) get placeholder names, as
    // llama.cpp's converter writes them
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| Value::String(t.unwrap_or_else(|| format!("[PAD{i}]"))))
        .collect();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::String(s.clone())),
            serde_json::Value::Array(p) if p.len() == 2 => Ok(Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            ))),
            other => bail!("{}: a merge is {other}, expected `a b`", path.display()),
        })
        .collect::<Result<_>>()?;
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    if let Some(b) = cfg.bos_token_id {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = cfg.eos_token_ids.first() {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(*e)));
    }
    let tc = dir.join("tokenizer_config.json");
    if tc.is_file() {
        let c: serde_json::Value = crate::util::files::read_json(&tc)?;
        if let Some(t) = c["chat_template"].as_str() {
            meta.push(("tokenizer.chat_template".into(), Value::String(t.into())));
        }
        if let Some(b) = c["add_bos_token"].as_bool() {
            meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(b)));
        }
    }
    Ok(Ok(meta))
}
