//! `lntune check`: run a model on a reference batch and compare with reference outputs
//! (the layout of `tests/fixtures/tiny-llava/ref/README.md`): logits, loss, and the
//! `debug.*` intermediates the file carries.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::Args;

use super::{DTypeArg, DeviceArg};
use crate::io::store::Store;
use crate::model::mllm::{Batch, Mllm};

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Model: llava-hf directory, directory with compose.json, HF LLM directory or .gguf file
    #[arg(long)]
    pub model: PathBuf,
    /// Batch file: input_ids, attention_mask, labels, pixel_values (safetensors)
    #[arg(long)]
    pub batch: PathBuf,
    /// Reference outputs: logits, loss, debug.* (safetensors)
    #[arg(long)]
    pub expected: PathBuf,
    /// Matmul precision of the frozen weights
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Tolerance on the max abs error of logits (and debug intermediates)
    #[arg(long, default_value_t = 1e-4)]
    pub atol_logits: f64,
    /// Tolerance on the abs error of the loss
    #[arg(long, default_value_t = 1e-5)]
    pub atol_loss: f64,
}

/// Max abs error and max abs error relative to the reference's max abs value.
#[derive(Debug, Clone, Copy)]
pub struct Diff {
    pub max_abs: f64,
    pub max_rel: f64,
}

/// Compares two tensors of the same shape in f64.
pub fn diff(name: &str, got: &Tensor, want: &Tensor) -> Result<Diff> {
    if got.dims() != want.dims() {
        bail!(
            "{name}: shape {:?} differs from the reference {:?}",
            got.dims(),
            want.dims()
        );
    }
    let g = got
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let w = want
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let mut max_abs = 0f64;
    let mut ref_max = 0f64;
    for (a, b) in g.iter().zip(&w) {
        let d = (a - b).abs();
        if d.is_nan() {
            max_abs = f64::INFINITY;
        } else if d > max_abs {
            max_abs = d;
        }
        ref_max = ref_max.max(b.abs());
    }
    Ok(Diff {
        max_abs,
        max_rel: if ref_max > 0.0 {
            max_abs / ref_max
        } else {
            max_abs
        },
    })
}

/// One row of the report.
struct Row {
    name: String,
    shape: Vec<usize>,
    diff: Diff,
    tol: f64,
}

pub fn run(args: CheckArgs) -> Result<()> {
    let device = args.device.device()?;
    let t0 = Instant::now();
    let model = Mllm::load(&args.model, args.dtype.dtype(), &device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let batch = Batch::from_safetensors(&args.batch, &device)?;
    let mut expected = Store::new(&Device::Cpu);
    expected.add_safetensors(&args.expected)?;
    let ref_tensor = |name: &str| -> Result<Option<Tensor>> {
        if expected.contains(name) {
            Ok(Some(expected.load_any(name)?))
        } else {
            Ok(None)
        }
    };

    let t1 = Instant::now();
    let feats = match &batch.pixel_values {
        Some(p) => Some(model.image_features(p)?),
        None => None,
    };
    let embeds = model.embed_with_images(&batch.input_ids, feats.as_ref())?;
    let hidden = model.hidden_from_embeds(&embeds, &batch.attention_mask)?;
    let logits = model.llm.logits(&hidden)?;
    let fwd_s = t1.elapsed().as_secs_f64();

    let mut rows = Vec::new();
    let mut push = |name: &str, got: &Tensor, tol: f64| -> Result<()> {
        if let Some(want) = ref_tensor(name)? {
            rows.push(Row {
                name: name.into(),
                shape: want.dims().to_vec(),
                diff: diff(name, got, &want)?,
                tol,
            });
        }
        Ok(())
    };
    if let Some(f) = &feats {
        push("debug.image_features", f, args.atol_logits)?;
    }
    push("debug.lm_inputs_embeds", &embeds, args.atol_logits)?;
    push("logits", &logits, args.atol_logits)?;
    if expected.contains("loss") {
        let labels = batch.labels.as_ref().with_context(|| {
            format!(
                "{}: the reference has a loss but the batch has no `labels`",
                args.batch.display()
            )
        })?;
        let loss = Mllm::loss(&logits, labels)?;
        push("loss", &loss, args.atol_loss)?;
    }
    if rows.iter().all(|r| r.name != "logits") {
        bail!("{}: no `logits` tensor to compare", args.expected.display());
    }

    println!(
        "model    {} ({} decoder layers, {}, {:?}; loaded in {load_s:.2}s, forward {fwd_s:.2}s)",
        args.model.display(),
        model.llm.cfg.num_layers,
        if model.vision.is_some() {
            "multimodal"
        } else {
            "text-only"
        },
        args.dtype.dtype(),
    );
    println!(
        "{:<28} {:>14} {:>11} {:>11} {:>9}  status",
        "tensor", "shape", "max abs", "max rel", "tol"
    );
    let mut failed = Vec::new();
    for r in &rows {
        let ok = r.diff.max_abs <= r.tol;
        if !ok {
            failed.push(r.name.clone());
        }
        println!(
            "{:<28} {:>14} {:>11.3e} {:>11.3e} {:>9.1e}  {}",
            r.name,
            format!("{:?}", r.shape),
            r.diff.max_abs,
            r.diff.max_rel,
            r.tol,
            if ok { "ok" } else { "FAIL" }
        );
    }
    let n_grad = expected
        .keys()
        .iter()
        .filter(|k| k.starts_with("grad.") || k.starts_with("after_adamw."))
        .count();
    if n_grad > 0 {
        println!(
            "({n_grad} gradient/optimizer references present; gradient checks need the training engine and are not run by this build)"
        );
    }
    println!("(max rel = max abs error / max abs value of the reference)");
    if !failed.is_empty() {
        bail!("check failed beyond tolerance: {}", failed.join(", "));
    }
    println!("check passed");
    Ok(())
}
