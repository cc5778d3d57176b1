//! Adapters and checkpoints on disk.
//!
//! An adapter directory holds `adapter.safetensors` (the trained tensors only, under their
//! checkpoint names, f32) and `adapter.json` (the method with its flags and a fingerprint of
//! the base model). Loading onto a different base is refused. A training checkpoint is an
//! adapter plus `optimizer.safetensors` (AdamW moments) and `state.json` (step, data position,
//! seed). Every directory is written under a temporary name and renamed into place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::io::store::Store;
use crate::methods::MethodConfig;
use crate::model::mllm::Mllm;
use crate::train::TrainSetup;

pub const FORMAT: &str = "lntune-adapter/1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterMeta {
    pub format: String,
    pub method: MethodConfig,
    /// `fingerprint()` of the base model the adapter was trained on
    pub base_fingerprint: String,
    pub base_source: String,
    /// the tensors in adapter.safetensors
    pub tensors: Vec<String>,
    /// optimizer steps behind these values
    pub step: usize,
}

/// A hash of the base model: every decoder/projector parameter's name and shape, the vision
/// tower's size, and a sample of values (the final norm and the first 256 values of the
/// embeddings and of each block's q_proj), so that a different checkpoint of the same shape
/// is caught too. Computed on the freshly loaded model.
pub fn fingerprint(model: &mut Mllm) -> Result<String> {
    let mut h = Sha256::new();
    let specs = model.param_specs();
    for s in &specs {
        h.update(s.name.as_bytes());
        h.update(format!("{:?}", s.shape).as_bytes());
    }
    h.update(model.vision_param_count().to_le_bytes());
    let body = model.keys.llm_body.clone();
    let mut sample = vec![
        format!("{body}.norm.weight"),
        format!("{body}.embed_tokens.weight"),
    ];
    for l in 0..model.llm.cfg.num_layers {
        sample.push(format!("{body}.layers.{l}.self_attn.q_proj.weight"));
    }
    for name in sample {
        if let Some(t) = model.param(&name) {
            let v = t
                .flatten_all()?
                .narrow(0, 0, t.elem_count().min(256))?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            for x in v {
                h.update(x.to_le_bytes());
            }
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `dir` atomically: `fill` populates a temporary sibling, which then replaces `dir`.
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("{}: cannot create", parent.display()))?;
    let name = dir
        .file_name()
        .context("directory has no name")?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    fill(&tmp)?;
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old)
            .with_context(|| format!("{}: cannot move aside", dir.display()))?;
        std::fs::rename(&tmp, dir).with_context(|| format!("{}: cannot rename", dir.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dir).with_context(|| format!("{}: cannot rename", dir.display()))?;
    }
    Ok(())
}

/// The tensors an adapter stores: the run's trainable tensors plus `extra` names (tensors an
/// init adapter replaced).
pub fn adapter_tensors(
    model: &mut Mllm,
    setup: &TrainSetup,
    extra: &[String],
) -> Result<Vec<(String, Tensor)>> {
    let mut names: Vec<String> = setup.trainable_specs().map(|s| s.name.clone()).collect();
    for e in extra {
        if !names.contains(e) {
            names.push(e.clone());
        }
    }
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = model
                .param(&n)
                .with_context(|| format!("adapter tensor `{n}` is not in the model"))?;
            Ok((n, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?))
        })
        .collect()
}

fn write_adapter_files(dir: &Path, tensors: &[(String, Tensor)], meta: &AdapterMeta) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, dir.join("adapter.safetensors"))?;
    std::fs::write(
        dir.join("adapter.json"),
        serde_json::to_string_pretty(meta)?,
    )?;
    Ok(())
}

/// Saves an adapter directory.
pub fn save_adapter(dir: &Path, tensors: &[(String, Tensor)], meta: &AdapterMeta) -> Result<()> {
    write_dir_atomically(dir, |tmp| write_adapter_files(tmp, tensors, meta))
}

/// Reads an adapter: its metadata and tensors.
pub fn read_adapter(dir: &Path) -> Result<(AdapterMeta, Store)> {
    let jp = dir.join("adapter.json");
    let meta: AdapterMeta = crate::model::config::read_json(&jp)?;
    if meta.format != FORMAT {
        bail!(
            "{}: field `format` is `{}`, expected `{FORMAT}`",
            jp.display(),
            meta.format
        );
    }
    let mut store = Store::new(&Device::Cpu);
    store.add_safetensors(&dir.join("adapter.safetensors"))?;
    Ok((meta, store))
}

/// Loads an adapter onto a freshly loaded base: checks the fingerprint, applies the adapter's
/// method (so LoRA slots exist), and sets every stored tensor. Returns the method's setup and
/// the names set.
pub fn apply_adapter(
    dir: &Path,
    model: &mut Mllm,
) -> Result<(AdapterMeta, TrainSetup, Vec<String>)> {
    let (meta, store) = read_adapter(dir)?;
    let fp = fingerprint(model)?;
    if fp != meta.base_fingerprint {
        bail!(
            "{}: this adapter was trained on another base model (fingerprint {}… of {}, this model {}…)",
            dir.display(),
            &meta.base_fingerprint[..12.min(meta.base_fingerprint.len())],
            meta.base_source,
            &fp[..12]
        );
    }
    let setup = crate::train::setup(model, &meta.method, 0)?;
    let names = set_tensors(model, &store, &dir.join("adapter.safetensors"))?;
    Ok((meta, setup, names))
}

/// Sets every tensor of `store` into the model (shapes checked); returns their names.
pub fn set_tensors(model: &mut Mllm, store: &Store, file: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for name in store.keys() {
        let dev = model.llm.embed_tokens.device().clone();
        let slot = model.param_mut(&name).with_context(|| {
            format!(
                "{}: tensor `{name}` has no place in this model",
                file.display()
            )
        })?;
        let want = slot.dims().to_vec();
        let v = store.load(&name, &want, DType::F32)?.to_device(&dev)?;
        *slot = if slot.dtype() == DType::F32 {
            v
        } else {
            v.to_dtype(slot.dtype())?
        };
        names.push(name);
    }
    model.llm.sync_tied_head();
    Ok(names)
}

/// Where a run stands, saved with each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    pub step: usize,
    pub epoch: usize,
    pub index: usize,
    pub seed: u64,
}

/// Writes a checkpoint directory: adapter files, optimizer moments, run state.
pub fn save_checkpoint(
    dir: &Path,
    tensors: &[(String, Tensor)],
    meta: &AdapterMeta,
    optimizer: &std::collections::BTreeMap<String, Tensor>,
    opt_t: usize,
    state: &RunState,
) -> Result<()> {
    write_dir_atomically(dir, |tmp| {
        write_adapter_files(tmp, tensors, meta)?;
        let mut map: HashMap<String, Tensor> = optimizer
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        map.insert("__t".into(), Tensor::new(&[opt_t as u32], &Device::Cpu)?);
        candle_core::safetensors::save(&map, tmp.join("optimizer.safetensors"))?;
        std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)?;
        Ok(())
    })
}

/// Reads a checkpoint's optimizer moments, step count and run state.
pub fn read_checkpoint(
    dir: &Path,
    device: &Device,
) -> Result<(std::collections::BTreeMap<String, Tensor>, usize, RunState)> {
    let state: RunState = crate::model::config::read_json(&dir.join("state.json"))?;
    let mut store = Store::new(device);
    store.add_safetensors(&dir.join("optimizer.safetensors"))?;
    let mut moments = std::collections::BTreeMap::new();
    let mut t = 0;
    for k in store.keys() {
        let v = store.load_any(&k)?;
        if k == "__t" {
            t = v.to_vec1::<u32>()?[0] as usize;
        } else {
            moments.insert(k, v);
        }
    }
    Ok((moments, t, state))
}

/// The newest `step-*` directory under `run/checkpoints`, or `dir` itself if it is one.
pub fn latest_checkpoint(dir: &Path) -> Result<PathBuf> {
    if dir.join("state.json").exists() {
        return Ok(dir.to_path_buf());
    }
    let ck = dir.join("checkpoints");
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&ck)
        .with_context(|| format!("{}: no checkpoints to resume from", ck.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("state.json").exists())
        .collect();
    steps.sort();
    steps
        .pop()
        .with_context(|| format!("{}: no complete checkpoint", ck.display()))
}
