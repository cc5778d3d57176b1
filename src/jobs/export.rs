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

/// A safetensors file with PyTorch's `{"format": "pt"}` metadata, as PEFT writes it.
fn write_safetensors_pt(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((name.clone(), t.dims().to_vec(), bytes));
    }
    data.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytes,
            )?;
            Ok((n.clone(), view))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .with_context(|| format!("{}: cannot write", path.display()))
}
