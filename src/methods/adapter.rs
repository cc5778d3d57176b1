//! Adapters on disk, and the one way a model is loaded with one.
//!
//! An adapter directory holds `adapter.safetensors` (the trained tensors only, under their
//! checkpoint names, f32) and `adapter.json` (the method with its flags and a fingerprint of
//! the base model). Loading onto a different base is refused. The directory is written under
//! a temporary name and renamed into place.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::MethodConfig;
use super::setup::{TrainSetup, setup};
use crate::io::store::Store;
use crate::model::mllm::Mllm;
use crate::util::files::{read_json, recover_dir, write_dir_atomically, write_json};

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
    /// tensors stored because the run started from them (its init adapter), beyond the
    /// method's trainable set
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_tensors: Vec<String>,
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

pub(crate) fn write_adapter_files(
    dir: &Path,
    tensors: &[(String, Tensor)],
    meta: &AdapterMeta,
) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    {
        let path = dir.join("adapter.safetensors");
        candle_core::safetensors::save(&map, &path)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    write_json(&dir.join("adapter.json"), meta)
}

/// Saves an adapter directory.
pub fn save_adapter(dir: &Path, tensors: &[(String, Tensor)], meta: &AdapterMeta) -> Result<()> {
    write_dir_atomically(dir, |tmp| write_adapter_files(tmp, tensors, meta))
}

/// Reads an adapter: its metadata and tensors.
pub fn read_adapter(dir: &Path) -> Result<(AdapterMeta, Store)> {
    // an adapter replaced by a process that was killed half-way comes back whole first
    recover_dir(dir)?;
    let jp = dir.join("adapter.json");
    let meta: AdapterMeta = read_json(&jp)?;
    if meta.format != FORMAT {
        bail!(
            "{}: field `format` is `{}`, expected `{FORMAT}`",
            jp.display(),
            meta.format
        );
    }
    let file = dir.join("adapter.safetensors");
    let mut store = Store::new(&Device::Cpu);
    store.add_safetensors(&file)?;
    for name in store.keys() {
        let values = store
            .load_any(&name)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if let Some(bad) = values.iter().find(|x| !x.is_finite()) {
            bail!(
                "{}: tensor `{name}` holds {bad}; an adapter must hold finite values",
                file.display()
            );
        }
    }
    Ok((meta, store))
}

/// Reads an adapter trained on the base whose `fingerprint` is `base_fp`; one trained on
/// another base is refused.
pub fn read_adapter_for(dir: &Path, base_fp: &str) -> Result<(AdapterMeta, Store)> {
    let (meta, store) = read_adapter(dir)?;
    if base_fp != meta.base_fingerprint {
        bail!(
            "{}: this adapter was trained on another base model (fingerprint {}… of {}, this model {}…)",
            dir.display(),
            &meta.base_fingerprint[..12.min(meta.base_fingerprint.len())],
            meta.base_source,
            &base_fp[..12.min(base_fp.len())]
        );
    }
    Ok((meta, store))
}

/// Loads an adapter onto a freshly loaded base: checks the fingerprint, applies the adapter's
/// method (so LoRA slots exist), and sets every stored tensor. Returns the method's setup and
/// the names set.
pub fn apply_adapter(
    dir: &Path,
    model: &mut Mllm,
) -> Result<(AdapterMeta, TrainSetup, Vec<String>)> {
    if super::peft::is_peft_dir(dir) {
        return apply_peft_adapter(dir, model);
    }
    let (meta, store) = read_adapter_for(dir, &fingerprint(model)?)?;
    let setup = setup(model, &meta.method, 0)?;
    // exactly the method's trainable tensors (and those the run started from)
    let file = dir.join("adapter.safetensors");
    let stored = store.keys();
    for name in &stored {
        let trained = setup.trainable_specs().any(|s| &s.name == name);
        if !trained && !meta.init_tensors.contains(name) {
            bail!(
                "{}: tensor `{name}` is not trained by the adapter's method `{}`",
                file.display(),
                meta.method.method.name()
            );
        }
    }
    if let Some(missing) = setup.trainable_specs().find(|s| !stored.contains(&s.name)) {
        bail!(
            "{}: misses `{}`, which the adapter's method `{}` trains",
            file.display(),
            missing.name,
            meta.method.method.name()
        );
    }
    let names = set_tensors(model, &store, &dir.join("adapter.safetensors"))?;
    Ok((meta, setup, names))
}

/// A PEFT `LN_TUNING` adapter directory (`methods::peft`): PEFT records no fingerprint of
/// its base, so only the names and shapes are checked against `model`.
fn apply_peft_adapter(
    dir: &Path,
    model: &mut Mllm,
) -> Result<(AdapterMeta, TrainSetup, Vec<String>)> {
    let (method, tensors) = super::peft::read_peft(dir, model)?;
    let setup = setup(model, &method, 0)?;
    let file = dir.join("adapter_model.safetensors");
    let mut store = Store::new(&Device::Cpu);
    store.add_owned(&file, tensors)?;
    let names = set_tensors(model, &store, &file)?;
    let meta = AdapterMeta {
        format: FORMAT.into(),
        method,
        base_fingerprint: fingerprint(model)?,
        base_source: model.source.display().to_string(),
        tensors: names.clone(),
        step: 0,
        init_tensors: vec![],
    };
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

/// Loads a model and, if given, an adapter onto it (checked against the base's fingerprint;
/// LoRA stays unmerged): what every command that runs a trained model starts with.
pub fn load_model(
    model: &Path,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Mllm> {
    let mut m = Mllm::load(model, dtype, device)?;
    if let Some(a) = adapter {
        apply_adapter(a, &mut m)?;
    }
    Ok(m)
}
