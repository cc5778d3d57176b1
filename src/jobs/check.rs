//! `lntune check`: run a model on a reference batch and compare with reference outputs
//! (the layout of `tests/fixtures/tiny-llava/ref/README.md`): logits, loss, the `debug.*`
//! intermediates the file carries, gradients (`grad.*`) and one AdamW step (`after_adamw.*`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use crate::io::store::Store;
use crate::methods::setup::{TrainSetup, setup};
use crate::methods::{LoraConfig, Method, MethodConfig, peft_to_checkpoint};
use crate::model::batch::Batch;
use crate::model::mllm::Mllm;
use crate::model::params::KeyPrefixes;
use crate::train::Recompute;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::step::{count_scored, forward_backward};
use crate::util::device::WeightDtype;

/// What to check against which reference, with which tolerances.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// Model: llava-hf directory, directory with compose.json, HF LLM directory or .gguf file
    pub model: PathBuf,
    /// Batch file: input_ids, attention_mask, labels, pixel_values (safetensors)
    pub batch: PathBuf,
    /// Reference outputs: logits, loss, debug.* (safetensors)
    pub expected: PathBuf,
    /// matmul precision of the frozen weights
    pub dtype: WeightDtype,
    /// Tolerance on the max abs error of logits (and debug intermediates)
    pub atol_logits: f64,
    /// Tolerance on the abs error of the loss
    pub atol_loss: f64,
    /// Tolerance on gradients: max abs error relative to the reference tensor's max abs
    pub rtol_grad: f64,
    /// Tolerance on the parameters after one AdamW step (abs)
    pub atol_adamw: f64,
    /// ... plus this times the reference tensor's max abs (bf16: the trainable masters start
    /// from the bf16-rounded checkpoint values)
    pub rtol_adamw: f64,
    /// AdamW step compared with `after_adamw.*`: learning rate
    pub adamw_lr: f64,
    /// AdamW step compared with `after_adamw.*`: weight decay (applied to every tensor)
    pub adamw_weight_decay: f64,
    /// LoRA alpha for `lora.*` references (default: lora_adapter/adapter_config.json next to
    /// the expected file)
    pub lora_alpha: Option<f64>,
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
    /// compare max rel (gradients) instead of max abs
    relative: bool,
}

/// Runs the model on the batch and compares every reference tensor; an error names the
/// tensors beyond tolerance.
pub fn check(args: &CheckConfig, device: &Device) -> Result<()> {
    // products in the run's precision, as in training (bf16: mixed precision)
    let _autocast = crate::ops::autocast(args.dtype.dtype());
    let t0 = Instant::now();
    let mut model = Mllm::load(&args.model, args.dtype.dtype(), device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let batch = Batch::from_safetensors(&args.batch, device)?;
    let mut expected = Store::new(&Device::Cpu);
    expected.add_safetensors(&args.expected)?;
    // trainable set (and LoRA adapter values) first: the forward must include the adapters
    let grad_check = if expected.keys().iter().any(|k| k.starts_with("grad.")) {
        Some(grad_setup(args, &mut model, &expected)?)
    } else {
        None
    };
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
                relative: false,
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
        "{:<60} {:>14} {:>11} {:>11} {:>13}  status",
        "tensor", "shape", "max abs", "max rel", "tol"
    );
    let mut failed = Vec::new();
    let mut notes = Vec::new();
    if let Some(gc) = &grad_check {
        grad_rows(
            args, &mut model, gc, &batch, &expected, &mut rows, &mut notes,
        )?;
    }
    print_rows(&rows, &mut failed);
    for n in &notes {
        println!("{n}");
    }
    println!("(max rel = max abs error / max abs value of the reference)");
    if !failed.is_empty() {
        bail!("check failed beyond tolerance: {}", failed.join(", "));
    }
    println!("check passed");
    Ok(())
}

fn print_rows(rows: &[Row], failed: &mut Vec<String>) {
    for r in rows {
        let err = if r.relative {
            r.diff.max_rel
        } else {
            r.diff.max_abs
        };
        let ok = err <= r.tol;
        if !ok {
            failed.push(r.name.clone());
        }
        println!(
            "{:<60} {:>14} {:>11.3e} {:>11.3e} {:>9.1e}{}  {}",
            r.name,
            format!("{:?}", r.shape),
            r.diff.max_abs,
            r.diff.max_rel,
            r.tol,
            if r.relative { " rel" } else { " abs" },
            if ok { "ok" } else { "FAIL" }
        );
    }
}

/// Gradients (and one AdamW step) against `grad.*` / `after_adamw.*`. The trainable set is
/// what the reference holds gradients for; `lora.*` tensors switch to a LoRA setup with the
/// reference's adapter values. Vision-tower tensors are reported, not computed: lntune never
/// runs a backward through the frozen tower.
fn grad_setup(args: &CheckConfig, model: &mut Mllm, expected: &Store) -> Result<GradCheck> {
    let keys = expected.keys();
    let lora_keys: Vec<&String> = keys.iter().filter(|k| k.starts_with("lora.")).collect();
    // reference name -> our checkpoint key
    let model_keys = model.keys.clone();
    let is_lora = !lora_keys.is_empty();
    let to_ours = |k: &str| ref_to_ours(is_lora, &model_keys, k);
    let specs = model.param_specs();
    let known: std::collections::HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut method;
    if lora_keys.is_empty() {
        let names: Vec<String> = keys
            .iter()
            .filter_map(|k| k.strip_prefix("grad."))
            .filter(|k| known.contains(k))
            .map(regex::escape)
            .collect();
        if names.is_empty() {
            bail!(
                "{}: no `grad.*` tensor names a decoder or projector parameter",
                args.expected.display()
            );
        }
        method = MethodConfig::new(Method::Custom);
        method.include = Some(names.join("|"));
    } else {
        method = MethodConfig::new(Method::Lora);
        method.train_projector = false;
        method.train_embed = false;
        method.train_head = false;
        let first_a = lora_keys
            .iter()
            .find(|k| k.ends_with("lora_A.weight"))
            .context("no lora_A tensor")?;
        let r = expected.shape(first_a).context("lora_A shape")?[0];
        let alpha = match args.lora_alpha {
            Some(a) => a,
            None => {
                let cfg = args
                    .expected
                    .with_file_name("lora_adapter")
                    .join("adapter_config.json");
                let v: serde_json::Value = crate::util::files::read_json(&cfg).with_context(|| {
                    "LoRA references need --lora-alpha or lora_adapter/adapter_config.json next to the expected file"
                })?;
                v.get("lora_alpha")
                    .and_then(|a| a.as_f64())
                    .with_context(|| format!("{}: missing field `lora_alpha`", cfg.display()))?
            }
        };
        let mut targets: Vec<String> = Vec::new();
        for k in &lora_keys {
            for (pat, t) in [
                ("q_proj", "q"),
                ("k_proj", "k"),
                ("v_proj", "v"),
                ("o_proj", "o"),
                ("gate_proj", "gate"),
                ("up_proj", "up"),
                ("down_proj", "down"),
            ] {
                if k.contains(&format!(".{pat}.")) && !targets.iter().any(|x| x == t) {
                    targets.push(t.into());
                }
            }
        }
        method.lora = LoraConfig {
            r,
            alpha,
            dropout: 0.0,
            targets,
        };
    }
    let setup = setup(model, &method, 0)?;
    for k in &lora_keys {
        let ours = to_ours(k.trim_start_matches("lora."));
        let t = model.param_mut(&ours).with_context(|| {
            format!("reference adapter `{k}` has no LoRA slot `{ours}` in the model")
        })?;
        *t = expected.load_any(k)?.to_device(t.device())?;
    }
    Ok(GradCheck {
        setup,
        is_lora,
        model_keys,
    })
}

/// What `grad_setup` decided, for `grad_rows`.
struct GradCheck {
    setup: TrainSetup,
    is_lora: bool,
    model_keys: KeyPrefixes,
}

/// A reference tensor name as our checkpoint key (PEFT names for LoRA references).
fn ref_to_ours(is_lora: bool, keys: &KeyPrefixes, k: &str) -> String {
    if is_lora {
        peft_to_checkpoint(k, keys)
    } else {
        k.to_string()
    }
}

fn grad_rows(
    args: &CheckConfig,
    model: &mut Mllm,
    gc: &GradCheck,
    batch: &Batch,
    expected: &Store,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let keys = expected.keys();
    let (setup, model_keys) = (&gc.setup, &gc.model_keys);
    let to_ours = |k: &str| ref_to_ours(gc.is_lora, model_keys, k);
    let denom = count_scored(batch)? as f64;
    let (loss, grads) = forward_backward(model, setup, batch, denom, 0, Recompute::Full, 0)?;
    if let Some(want) = if expected.contains("loss") {
        Some(expected.load_any("loss")?)
    } else {
        None
    } {
        let got = Tensor::new((loss.sum / denom) as f32, &Device::Cpu)?;
        rows.push(Row {
            name: "loss (training step)".into(),
            shape: vec![],
            diff: diff("loss", &got, &want)?,
            tol: args.atol_loss,
            relative: false,
        });
    }
    let mut skipped = Vec::new();
    for k in keys.iter().filter(|k| k.starts_with("grad.")) {
        let ours = to_ours(&k["grad.".len()..]);
        let want = expected.load_any(k)?;
        match grads.0.get(&ours) {
            Some(g) => rows.push(Row {
                name: k.clone(),
                shape: want.dims().to_vec(),
                diff: diff(k, g, &want)?,
                tol: args.rtol_grad,
                relative: true,
            }),
            None if ours.starts_with(&model_keys.vision) || ours.starts_with("vision.") => {
                skipped.push(k.clone())
            }
            None => bail!("reference `{k}` names `{ours}`, which got no gradient"),
        }
    }
    if !skipped.is_empty() {
        notes.push(format!("not compared ({} tensors): the vision tower is frozen and has no backward in lntune: {}", skipped.len(), skipped.join(", ")));
    }
    if keys.iter().any(|k| k.starts_with("after_adamw.")) {
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: args.adamw_weight_decay,
            decay_all: true,
            ..Default::default()
        });
        opt.step(model, &grads, args.adamw_lr)?;
        for k in keys.iter().filter(|k| k.starts_with("after_adamw.")) {
            let ours = to_ours(&k["after_adamw.".len()..]);
            if !grads.0.contains_key(&ours) {
                continue;
            }
            let got = model.param(&ours).context("updated tensor")?;
            let want = expected.load_any(k)?;
            let scale = want
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            rows.push(Row {
                name: k.clone(),
                shape: want.dims().to_vec(),
                diff: diff(k, &got, &want)?,
                tol: args.atol_adamw + args.rtol_adamw * scale,
                relative: false,
            });
        }
    }
    Ok(())
}
