//! Resuming a run: the newest complete checkpoint is restored only when it belongs to this
//! run (base model, every setting that changes the math, the method's tensors and their
//! moments), and the metrics of the steps after it are dropped.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, bail};
use candle_core::Device;

use super::checkpoint::{latest_checkpoint, read_checkpoint};
use super::config::RunConfig;
use super::trainer::{StepReport, Trainer};
use crate::data::dataset::DataPosition;
use crate::methods::adapter::{read_adapter_for, set_tensors};
use crate::model::mllm::Mllm;
use crate::util::files::{read_json, write_atomically};

/// What a resume must match: the run being continued.
pub(super) struct Resume<'a> {
    /// the run or checkpoint folder given with --resume
    pub(super) dir: &'a Path,
    /// this run's resolved config
    pub(super) cfg: &'a RunConfig,
    pub(super) base_fp: &'a str,
    /// tensors the init adapter set (every adapter of the run stores them too)
    pub(super) init_names: &'a [String],
    /// this process writes the run's files (rank 0 of a data-parallel run): it drops the
    /// metrics of the steps after the checkpoint
    pub(super) writer: bool,
}

/// Settings a resumed run may change: they decide how long it runs and what it records,
/// not the math of the steps already taken (a new total of steps reshapes the schedule
/// from here on).
const RESUME_MAY_CHANGE: [&str; 9] = [
    "model",
    "steps",
    "epochs",
    "save_every",
    "recompute",
    "cache_features",
    "grad_stats",
    "val_data",
    "report_to",
];

/// Restores the newest checkpoint of `from.dir` into the model and trainer, after checking
/// that it belongs to this run: the same base model (fingerprint), every setting that
/// changes the math equal (those that may change are printed), exactly the run's trainable
/// tensors with moments of their shapes. Keeps the metrics of the steps up to it (those
/// after it are redone). Returns the data position and the kept step reports.
pub(super) fn resume_from(
    from: &Resume,
    metrics_path: &Path,
    model: &mut Mllm,
    trainer: &mut Trainer,
    device: &Device,
) -> Result<(DataPosition, Vec<StepReport>)> {
    let ck = latest_checkpoint(from.dir)?;
    check_same_run(&ck, from.cfg)?;
    let (_, store) = read_adapter_for(&ck, from.base_fp)?;
    let trainable: BTreeMap<String, usize> = trainer
        .setup
        .trainable_specs()
        .map(|s| (s.name.clone(), s.numel()))
        .collect();
    for name in store.keys() {
        if !trainable.contains_key(&name) && !from.init_names.contains(&name) {
            bail!(
                "{}: tensor `{name}` is not trained by this run's method",
                ck.join("adapter.safetensors").display()
            );
        }
    }
    set_tensors(model, &store, &ck.join("adapter.safetensors"))?;
    let (moments, t, state) = read_checkpoint(&ck, device)?;
    for (name, m) in &moments {
        match trainable.get(name) {
            Some(&n) if m.dims() == [2, n] => {}
            Some(&n) => bail!(
                "{}: the moments of `{name}` have shape {:?}, expected [2, {n}]",
                ck.join("optimizer.safetensors").display(),
                m.dims()
            ),
            None => bail!(
                "{}: moments of `{name}`, which this run does not train",
                ck.join("optimizer.safetensors").display()
            ),
        }
    }
    trainer.opt.state = moments;
    trainer.opt.t = t;
    trainer.step = state.step;
    let reports = keep_metrics_up_to(metrics_path, state.step, from.writer)?;
    if from.writer {
        eprintln!("resuming from {} (step {})", ck.display(), state.step);
    }
    Ok((
        DataPosition {
            epoch: state.epoch,
            index: state.index,
        },
        reports,
    ))
}

/// Compares the checkpoint's `run_config.json` with this run's config, field by field.
fn check_same_run(ck: &Path, cfg: &RunConfig) -> Result<()> {
    let path = ck.join("run_config.json");
    let then: serde_json::Value = read_json(&path)?;
    let now = serde_json::to_value(cfg)?;
    let (Some(then), Some(now)) = (then.as_object(), now.as_object()) else {
        bail!("{}: not a run config", path.display());
    };
    let mut differ = Vec::new();
    let mut changed = Vec::new();
    for (k, v) in now {
        let old = then.get(k).cloned().unwrap_or(serde_json::Value::Null);
        if &old == v {
            continue;
        }
        let line = format!("`{k}` was {old}, now {v}");
        if RESUME_MAY_CHANGE.contains(&k.as_str()) {
            changed.push(line);
        } else {
            differ.push(line);
        }
    }
    if !differ.is_empty() {
        bail!(
            "{}: this checkpoint belongs to another run: {}",
            ck.display(),
            differ.join("; ")
        );
    }
    for c in changed {
        eprintln!("resume: {c}");
    }
    Ok(())
}

/// Keeps the lines of `metrics.jsonl` up to `step` (rewritten atomically when `write`) and
/// returns their reports.
fn keep_metrics_up_to(metrics_path: &Path, step: usize, write: bool) -> Result<Vec<StepReport>> {
    Ok(keep_jsonl_up_to(metrics_path, step, write)?
        .iter()
        .filter_map(|l| serde_json::from_str::<StepReport>(l).ok())
        .collect())
}

/// The lines of a per-step log (metrics.jsonl, grad_stats.jsonl) whose `step` is at most
/// `step`; with `write`, the file is rewritten to hold only those, so a resumed run appends
/// after them instead of after the steps the interrupted run logged past its checkpoint.
pub(crate) fn keep_jsonl_up_to(path: &Path, step: usize, write: bool) -> Result<Vec<String>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(vec![]);
    };
    let kept: Vec<String> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| (s as usize) <= step)
        })
        .map(str::to_string)
        .collect();
    if write {
        write_atomically(
            path,
            kept.iter()
                .map(|l| format!("{l}\n"))
                .collect::<String>()
                .as_bytes(),
        )?;
    }
    Ok(kept)
}
