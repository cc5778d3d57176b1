//! Training checkpoints: an adapter directory plus `optimizer.safetensors` (AdamW moments
//! and the step count) and `state.json` (step, data position, seed), written under a
//! temporary name and renamed into place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::io::store::Store;
use crate::methods::adapter::{AdapterMeta, write_adapter_files};
use crate::util::files::{read_json, write_dir_atomically, write_json};

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
        write_json(&tmp.join("state.json"), state)
    })
}

/// Reads a checkpoint's optimizer moments, step count and run state.
pub fn read_checkpoint(
    dir: &Path,
    device: &Device,
) -> Result<(std::collections::BTreeMap<String, Tensor>, usize, RunState)> {
    let state: RunState = read_json(&dir.join("state.json"))?;
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
