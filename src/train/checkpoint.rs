//! Training checkpoints: an adapter directory plus `optimizer.safetensors` (AdamW moments
//! and the step count), `state.json` (step, data position, seed) and `run_config.json` (the
//! run's resolved configuration, so that a resume can check it continues the same run),
//! written under a temporary name and renamed into place as `checkpoints/step-NNNNNN`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::io::store::Store;
use crate::methods::adapter::{AdapterMeta, write_adapter_files};
use crate::util::files::{list_dir, read_json, write_dir_atomically, write_json};

/// Where a run stands, saved with each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    pub step: usize,
    pub epoch: usize,
    pub index: usize,
    pub seed: u64,
}

/// Writes a checkpoint directory: adapter files, optimizer moments, run state, run config.
pub fn save_checkpoint(
    dir: &Path,
    tensors: &[(String, Tensor)],
    meta: &AdapterMeta,
    optimizer: &std::collections::BTreeMap<String, Tensor>,
    opt_t: usize,
    state: &RunState,
    run_config: &impl Serialize,
) -> Result<()> {
    write_dir_atomically(dir, |tmp| {
        write_adapter_files(tmp, tensors, meta)?;
        let mut map: HashMap<String, Tensor> = optimizer
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        map.insert("__t".into(), Tensor::new(&[opt_t as u32], &Device::Cpu)?);
        {
            let path = tmp.join("optimizer.safetensors");
            candle_core::safetensors::save(&map, &path)
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
        write_json(&tmp.join("run_config.json"), run_config)?;
        write_json(&tmp.join("state.json"), state)
    })
}

/// Reads a checkpoint's optimizer moments, step count and run state.
pub fn read_checkpoint(
    dir: &Path,
    device: &Device,
) -> Result<(std::collections::BTreeMap<String, Tensor>, usize, RunState)> {
    let state: RunState = read_json(&dir.join("state.json"))?;
    let file = dir.join("optimizer.safetensors");
    let mut store = Store::new(device);
    store.add_safetensors(&file)?;
    let mut moments = std::collections::BTreeMap::new();
    let mut t = None;
    for k in store.keys() {
        let v = store.load_any(&k)?;
        if k == "__t" {
            let steps = v
                .to_dtype(candle_core::DType::U32)?
                .flatten_all()?
                .to_vec1::<u32>()?;
            let [steps] = steps[..] else {
                bail!("{}: `__t` must hold one step count", file.display());
            };
            t = Some(steps as usize);
        } else {
            moments.insert(k, v);
        }
    }
    let t = t.with_context(|| format!("{}: missing the step count `__t`", file.display()))?;
    Ok((moments, t, state))
}

/// A checkpoint folder's name: `step-` and the step, at least six digits.
fn is_checkpoint_name(name: &str) -> bool {
    name.strip_prefix("step-")
        .is_some_and(|d| d.len() >= 6 && d.chars().all(|c| c.is_ascii_digit()))
}

/// The files of a complete checkpoint.
const CHECKPOINT_FILES: [&str; 5] = [
    "adapter.json",
    "adapter.safetensors",
    "optimizer.safetensors",
    "run_config.json",
    "state.json",
];

fn is_complete(dir: &Path) -> bool {
    CHECKPOINT_FILES.iter().all(|f| dir.join(f).is_file())
}

/// The newest complete `checkpoints/step-NNNNNN` of a run directory, or `dir` itself if it
/// is a checkpoint. Temporary directories of an interrupted write are never resumed from.
pub fn latest_checkpoint(dir: &Path) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if dir.join("state.json").exists() {
        if !is_checkpoint_name(&name) {
            bail!(
                "{}: not a checkpoint folder (checkpoints are named step-NNNNNN; this may be an interrupted write)",
                dir.display()
            );
        }
        if !is_complete(dir) {
            bail!(
                "{}: an incomplete checkpoint (it needs {})",
                dir.display(),
                CHECKPOINT_FILES.join(", ")
            );
        }
        return Ok(dir.to_path_buf());
    }
    let ck = dir.join("checkpoints");
    if !ck.is_dir() {
        bail!("{}: no checkpoints to resume from", ck.display());
    }
    let steps = list_dir(&ck, |p| {
        p.file_name()
            .is_some_and(|n| is_checkpoint_name(&n.to_string_lossy()))
            && is_complete(p)
    })?;
    let step_of = |p: &PathBuf| -> u64 {
        p.file_name()
            .and_then(|n| n.to_string_lossy().strip_prefix("step-")?.parse().ok())
            .unwrap_or(0)
    };
    steps
        .into_iter()
        .max_by_key(step_of)
        .with_context(|| format!("{}: no complete checkpoint", ck.display()))
}
