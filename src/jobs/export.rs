//! `lntune export peft`: an lntune adapter as a PEFT adapter directory
//! (`methods::peft` has the format), written under a temporary name and renamed.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::methods::adapter::{fingerprint, read_adapter_for, set_tensors};
use crate::methods::peft::{base_layer_keys, to_peft};
use crate::methods::setup::setup;
use crate::model::mllm::Mllm;
use crate::util::files::{write_dir_atomically, write_json};

/// Writes `out` (adapter_config.json + adapter_model.safetensors) for the lntune adapter
/// `adapter` trained on `model`. Returns the number of tensors written.
pub fn export_peft(model: &Path, adapter: &Path, out: &Path) -> Result<usize> {
    let mut m = Mllm::load(model, DType::F32, &Device::Cpu)?;
    let (meta, store) = read_adapter_for(adapter, &fingerprint(&mut m)?)?;
    // PEFT also saves the base weight of a wrapped embedding or head: read it before the
    // adapter replaces it
    let mut base_layers = Vec::new();
    for (key, name) in base_layer_keys(&m, &meta.tensors)? {
        let v = m
            .param(&name)
            .with_context(|| format!("`{name}` missing"))?;
        base_layers.push((key, v.to_dtype(DType::F32)?));
    }
    // the method's slots (LoRA's A and B) exist before its tensors are set
    let s = setup(&mut m, &meta.method, 0)?;
    let names = set_tensors(&mut m, &store, &adapter.join("adapter.safetensors"))?;
    let mut peft = to_peft(&mut m, &meta.method, &s.specs, &names, &meta.base_source)?;
    peft.tensors.extend(base_layers);
    let n = peft.tensors.len();
    write_dir_atomically(out, |tmp| {
        write_json(&tmp.join("adapter_config.json"), &peft.config)?;
        write_safetensors_pt(&tmp.join("adapter_model.safetensors"), &peft.tensors)
    })?;
    Ok(n)
}

/// One tensor of a file to write: name, dtype, shape, little-endian bytes.
type RawTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// An adapter's f32 tensors as one safetensors file, in name order.
fn write_safetensors_pt(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut data = Vec::new();
    for (name, t) in tensors {
        let bytes = tensor_bytes(t, safetensors::Dtype::F32)?;
        data.push((
            name.clone(),
            safetensors::Dtype::F32,
            t.dims().to_vec(),
            bytes,
        ));
    }
    data.sort_by(|a, b| a.0.cmp(&b.0));
    write_raw_safetensors(path, &data)
}

/// A safetensors file with PyTorch's `{"format": "pt"}` metadata, as PEFT and transformers
/// write theirs.
fn write_raw_safetensors(path: &Path, data: &[RawTensor]) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, dt, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)?;
            Ok((n.clone(), view))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// What `export hf` wrote.
pub struct HfExport {
    pub shards: usize,
    pub tensors: usize,
    /// tensors whose values the adapter changed (the rest are the base's bytes)
    pub merged: usize,
}

/// A merged checkpoint directory in the base's own format and key layout: `model` with
/// `adapter` (lntune's or PEFT's) folded into its weights (LoRA as W + s·B·A), every other
/// tensor copied byte for byte, sharded at `max_shard_bytes` (with
/// `model.safetensors.index.json` when there is more than one shard), and the base's
/// config, tokenizer, chat template and processor files beside it.
///
/// A composed model (compose.json) has no transformers class: its export is the same
/// composed layout, with the LLM part a merged HF causal-LM directory that transformers
/// loads on its own, the projector file merged, and the vision tower copied.
pub fn export_hf(
    model: &Path,
    adapter: Option<&Path>,
    out: &Path,
    max_shard_bytes: usize,
) -> Result<HfExport> {
    if let (Ok(a), Ok(b)) = (model.canonicalize(), out.canonicalize())
        && a == b
    {
        anyhow::bail!(
            "export hf: --out {} is the base model's directory; write the merged model elsewhere",
            out.display()
        );
    }
    if model.is_dir() && model.join("compose.json").exists() {
        return export_composed_hf(model, adapter, out, max_shard_bytes);
    }
    if !model.is_dir() || !model.join("config.json").is_file() {
        anyhow::bail!(
            "export hf: {} is not a transformers checkpoint directory (config.json + safetensors); for a GGUF model use `lntune export gguf`",
            model.display()
        );
    }
    let mut m = Mllm::load(model, DType::F32, &Device::Cpu)?;
    let merged = merged_params(&mut m, adapter)?;
    let mut report = None;
    write_dir_atomically(out, |tmp| {
        report = Some(write_checkpoint(model, &merged, tmp, max_shard_bytes)?);
        Ok(())
    })?;
    report.context("export hf: nothing written")
}

/// `export hf` of a composed model: compose.json and the parts at the same relative paths.
fn export_composed_hf(
    model: &Path,
    adapter: Option<&Path>,
    out: &Path,
    max_shard_bytes: usize,
) -> Result<HfExport> {
    let c = crate::model::compose::ComposeFile::read(model)?;
    let origin = model.join("compose.json");
    let part = |field: &str, rel: &str| {
        crate::util::files::inside(Path::new(""), rel).with_context(|| {
            format!(
                "export hf: {}: field `{field}` ({rel:?}) is not a path inside the directory, so the export cannot mirror it",
                origin.display()
            )
        })
    };
    let (llm_rel, vision_rel, proj_rel) = (
        part("llm.path", &c.llm.path)?,
        part("vision.path", &c.vision.path)?,
        part("projector.path", &c.projector.path)?,
    );
    if model.join(&llm_rel).is_file() {
        anyhow::bail!(
            "export hf: {}'s LLM is a GGUF file, which has no HF checkpoint to merge into; use `lntune export gguf`",
            model.display()
        );
    }
    let mut m = Mllm::load(model, DType::F32, &Device::Cpu)?;
    let mut llm_merged = HashMap::new();
    let mut proj_merged = HashMap::new();
    for (k, t) in merged_params(&mut m, adapter)? {
        if let Some(rest) = k.strip_prefix("llm.") {
            llm_merged.insert(rest.to_string(), t);
        } else if let Some(rest) = k.strip_prefix("projector.") {
            proj_merged.insert(rest.to_string(), t);
        } else {
            anyhow::bail!(
                "export hf: the adapter's tensor `{k}` is in no part of {}",
                model.display()
            );
        }
    }
    let mut report = None;
    write_dir_atomically(out, |tmp| {
        std::fs::copy(&origin, tmp.join("compose.json"))
            .with_context(|| format!("{}: cannot copy", origin.display()))?;
        let llm_out = tmp.join(&llm_rel);
        std::fs::create_dir_all(&llm_out)
            .with_context(|| format!("{}: cannot create", llm_out.display()))?;
        let mut r = write_checkpoint(
            &model.join(&llm_rel),
            &llm_merged,
            &llm_out,
            max_shard_bytes,
        )?;
        copy_tree(&model.join(&vision_rel), &tmp.join(&vision_rel))?;
        // the projector: one safetensors file, trained tensors merged
        let proj_src = model.join(&proj_rel);
        let mut store = crate::io::store::Store::new(&Device::Cpu);
        store.add_safetensors(&proj_src)?;
        let mut data: Vec<RawTensor> = Vec::new();
        for k in store.keys() {
            let (dtype, shape, bytes) = store
                .raw(&k)
                .with_context(|| format!("{}: `{k}` is not a plain tensor", proj_src.display()))?;
            let bytes = match proj_merged.get(&k) {
                Some(t) => {
                    r.merged += 1;
                    tensor_bytes(t, dtype)?
                }
                None => bytes.to_vec(),
            };
            data.push((k, dtype, shape.to_vec(), bytes));
        }
        r.tensors += data.len();
        let proj_out = tmp.join(&proj_rel);
        if let Some(parent) = proj_out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        write_raw_safetensors(&proj_out, &data)?;
        report = Some(r);
        Ok(())
    })?;
    let r = report.context("export hf: nothing written")?;
    if r.merged != llm_merged.len() + proj_merged.len() {
        anyhow::bail!(
            "export hf: {} of the adapter's tensors have no place in {}'s files",
            llm_merged.len() + proj_merged.len() - r.merged,
            model.display()
        );
    }
    Ok(r)
}

/// Copies the regular files under `src` to `dst`, directories included.
fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("{}: cannot create", dst.display()))?;
    for e in std::fs::read_dir(src).with_context(|| format!("{}: cannot list", src.display()))? {
        let p = e?.path();
        let to = dst.join(p.file_name().context("a directory entry without a name")?);
        if p.is_dir() {
            copy_tree(&p, &to)?;
        } else if p.is_file() {
            std::fs::copy(&p, &to).with_context(|| format!("{}: cannot copy", p.display()))?;
        }
    }
    Ok(())
}

/// Writes the checkpoint of directory `model` into the existing directory `to`, with the
/// tensors of `merged` (by the checkpoint's keys) in place of the file's values.
fn write_checkpoint(
    model: &Path,
    merged: &HashMap<String, Tensor>,
    to: &Path,
    max_shard_bytes: usize,
) -> Result<HfExport> {
    let store = crate::io::store::Store::open_dir(model, &Device::Cpu)?;
    // plan the shards: every tensor of the base, in name order
    let keys = store.keys();
    let mut shards: Vec<Vec<String>> = vec![vec![]];
    let mut used = 0usize;
    for k in &keys {
        let (_, _, bytes) = store
            .raw(k)
            .with_context(|| format!("{}: `{k}` is not a plain tensor", model.display()))?;
        if used > 0 && used + bytes.len() > max_shard_bytes {
            shards.push(vec![]);
            used = 0;
        }
        used += bytes.len();
        shards.last_mut().expect("one shard").push(k.clone());
    }
    let n = shards.len();
    let file_name = |i: usize| {
        if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        }
    };
    let mut written_merged = 0;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let mut data: Vec<RawTensor> = Vec::new();
        for k in shard {
            let (dtype, shape, bytes) = store.raw(k).expect("planned above");
            let bytes = match merged.get(k) {
                Some(t) => {
                    written_merged += 1;
                    tensor_bytes(t, dtype)?
                }
                None => bytes.to_vec(),
            };
            total += bytes.len();
            weight_map.insert(k.clone(), file_name(i).into());
            data.push((k.clone(), dtype, shape.to_vec(), bytes));
        }
        write_raw_safetensors(&to.join(file_name(i)), &data)?;
    }
    if n > 1 {
        write_json(
            &to.join("model.safetensors.index.json"),
            &serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    // config, tokenizer, chat template, processor and generation files of the base
    for e in
        std::fs::read_dir(model).with_context(|| format!("{}: cannot list", model.display()))?
    {
        let p = e?.path();
        let name = p
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if p.is_file() && !weights && !name.starts_with('.') {
            std::fs::copy(&p, to.join(&name))
                .with_context(|| format!("{}: cannot copy", p.display()))?;
        }
    }
    if written_merged != merged.len() {
        anyhow::bail!(
            "export hf: {} of the adapter's tensors have no place in {}'s files",
            merged.len() - written_merged,
            model.display()
        );
    }
    Ok(HfExport {
        shards: n,
        tensors: keys.len(),
        merged: written_merged,
    })
}

/// The tensors `adapter` changes in `m`, by checkpoint key, in f32: the trained tensors as
/// they are, LoRA pairs folded into their base weight as `W + (alpha/r)·B·A`.
pub(crate) fn merged_params(
    m: &mut Mllm,
    adapter: Option<&Path>,
) -> Result<HashMap<String, Tensor>> {
    let mut merged: HashMap<String, Tensor> = HashMap::new();
    let Some(a) = adapter else {
        return Ok(merged);
    };
    let (meta, _setup, names) = crate::methods::adapter::apply_adapter(a, m)?;
    let scale = meta.method.lora.alpha / meta.method.lora.r as f64;
    for name in &names {
        if let Some(stem) = name.strip_suffix(".lora_A.weight") {
            let w_name = format!("{stem}.weight");
            let w = m
                .param(&w_name)
                .with_context(|| format!("`{w_name}` missing"))?;
            let la = m.param(name).context("lora_A")?.to_dtype(DType::F32)?;
            let lb = m
                .param(&format!("{stem}.lora_B.weight"))
                .context("lora_B")?
                .to_dtype(DType::F32)?;
            let delta = (lb.matmul(&la)? * scale)?;
            merged.insert(w_name, (w.to_dtype(DType::F32)? + delta)?);
        } else if !name.ends_with(".lora_B.weight") {
            merged.insert(
                name.clone(),
                m.param(name)
                    .context("trained tensor")?
                    .to_dtype(DType::F32)?,
            );
        }
    }
    Ok(merged)
}

/// A tensor's values in a safetensors dtype (the base tensor's, so the merged file keeps
/// the checkpoint's precision).
fn tensor_bytes(t: &Tensor, dtype: safetensors::Dtype) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match dtype {
        safetensors::Dtype::F32 => t
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        safetensors::Dtype::BF16 => t
            .to_dtype(DType::BF16)?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        safetensors::Dtype::F16 => t
            .to_dtype(DType::F16)?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => anyhow::bail!("export hf: a trained tensor stored as {other:?} cannot be merged"),
    })
}
