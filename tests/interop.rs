//! Adapters in PEFT's format against the real libraries: an lntune ln, ln-simple or LoRA
//! adapter exported with `lntune export peft` gives, under `PeftModel.from_pretrained`,
//! lntune's logits; a PEFT `LN_TUNING` or `LORA` adapter given to lntune's `--adapter`
//! gives PEFT's. The
//! Python side (tools/interop/peft_logits.py) runs in the venv of tools/interop-env.sh
//! (`target/interop-venv`, or LNTUNE_INTEROP_PYTHON); without it these tests print
//! `skipped: …`, except under CI=true, where they must run.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use lntune::methods::Method;
use lntune::methods::adapter::load_model;
use lntune::model::batch::Batch;
use lntune::model::mllm::Mllm;

use super::common::{fixture, load_all, max_abs, pattern_adapter, workspace};

pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("LNTUNE_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop-venv/bin/python")
        });
    if p.is_file() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{}: missing (run tools/interop-env.sh)",
        p.display()
    );
    eprintln!(
        "skipped: no interop venv at {} (bash tools/interop-env.sh)",
        p.display()
    );
    None
}

fn peft_side(py: &Path, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/interop/peft_logits.py");
    let out = Command::new(py).arg(script).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// PEFT's (or, with no adapter, plain transformers') logits of `base` on the fixture batch.
fn transformers_logits(py: &Path, base: &Path, adapter: Option<&Path>, out: &Path) -> Tensor {
    let batch = batch_file();
    let mut args = vec!["logits", "--base", base.to_str().unwrap()];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    args.extend([
        "--batch",
        batch.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    peft_side(py, &args);
    load_all(out).remove("logits").unwrap()
}

fn batch_file() -> PathBuf {
    fixture("tiny-llava/ref/batch.safetensors")
}

fn lntune_logits(adapter: Option<&Path>) -> Tensor {
    let m = load_model(&fixture("tiny-llava"), adapter, DType::F32, &Device::Cpu).unwrap();
    let batch = Batch::from_safetensors(&batch_file(), &Device::Cpu).unwrap();
    m.forward(&batch).unwrap()
}

/// An lntune adapter of `method` on tiny-llava (see `common::pattern_adapter`).
fn lntune_adapter(method: Method, dir: &Path) {
    pattern_adapter(&fixture("tiny-llava"), method, dir);
}

#[test]
fn exported_peft_adapters_give_lntunes_logits_in_peft() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    for method in [Method::Ln, Method::LnSimple, Method::Lora] {
        let ours = dir.path().join(format!("{}-lntune", method.name()));
        let peft = dir.path().join(format!("{}-peft", method.name()));
        lntune_adapter(method, &ours);
        let out = Command::new(env!("CARGO_BIN_EXE_lntune"))
            .args(["export", "peft", "--model"])
            .arg(fixture("tiny-llava"))
            .arg("--adapter")
            .arg(&ours)
            .arg("--out")
            .arg(&peft)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let logits_file = dir
            .path()
            .join(format!("{}-logits.safetensors", method.name()));
        let theirs = &transformers_logits(&py, &fixture("tiny-llava"), Some(&peft), &logits_file);
        let ours_logits = lntune_logits(Some(&ours));
        let base = lntune_logits(None);
        let gap = max_abs(&ours_logits, theirs);
        eprintln!("{}: lntune -> PEFT logits gap {gap:.2e}", method.name());
        assert!(
            gap < 1e-5,
            "{}: PEFT's logits differ from lntune's by {gap}",
            method.name()
        );
        // the adapter changes the model (the comparison is not of two base models)
        assert!(max_abs(&base, theirs) > 1e-3, "{}", method.name());
    }
}

#[test]
fn peft_adapters_load_with_pefts_logits() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny-llava");
    for (kind, simple) in [("make-ln", false), ("make-ln", true), ("make-lora", false)] {
        let adapter = dir.path().join(format!("peft-{kind}-{simple}"));
        let mut args = vec![
            kind,
            "--base",
            base.to_str().unwrap(),
            "--out",
            adapter.to_str().unwrap(),
            "--seed",
            "3",
        ];
        if simple {
            args.push("--simple");
        }
        peft_side(&py, &args);
        let logits_file = dir
            .path()
            .join(format!("logits-{kind}-{simple}.safetensors"));
        let theirs = &transformers_logits(&py, &base, Some(&adapter), &logits_file);
        let ours = lntune_logits(Some(&adapter));
        let gap = max_abs(&ours, theirs);
        eprintln!("{kind} simple={simple}: PEFT -> lntune logits gap {gap:.2e}");
        assert!(
            gap < 1e-5,
            "simple {simple}: lntune's logits differ from PEFT's by {gap}"
        );
        assert!(max_abs(&lntune_logits(None), theirs) > 1e-3);
    }
}

#[test]
fn tensorboard_reads_the_training_scalars() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = workspace(dir.path());
    let out = dir.path().join("run");
    let run = Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args([
            "train",
            "--method",
            "ln",
            "--steps",
            "4",
            "--batch",
            "4",
            "--template",
            "chatml",
        ])
        .args(["--quiet", "--report-to", "tensorboard", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(data.join("conversation_train.json"))
        .arg("--val-data")
        .arg(data.join("conversation_train.json:8"))
        .arg("--images")
        .arg(data.join("images"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/interop/read_tensorboard.py");
    let read = Command::new(&py).arg(script).arg(&out).output().unwrap();
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let tb: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (tag, field) in [
        ("train/loss", "loss"),
        ("train/learning_rate", "lr"),
        ("train/grad_norm", "grad_norm"),
    ] {
        let points = tb[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {tb}"));
        assert_eq!(points.len(), 4, "{tag}");
        for (p, m) in points.iter().zip(&metrics) {
            assert_eq!(p[0], m["step"], "{tag}");
            let (a, b) = (p[1].as_f64().unwrap(), m[field].as_f64().unwrap());
            // TensorBoard scalars are f32
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "{tag}: {a} vs {b}"
            );
        }
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let val = summary["val_loss"].as_f64().expect("a validation loss");
    let eval = &tb["eval/loss"][0];
    assert_eq!(eval[0], 4);
    assert!((eval[1].as_f64().unwrap() - val).abs() <= 1e-6 * val);
}

#[test]
fn merged_hf_exports_load_in_transformers_with_lntunes_logits() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny-llava");
    let base_store = lntune::io::store::Store::open_dir(&base, &Device::Cpu).unwrap();
    for method in [Method::Ln, Method::Lora] {
        let adapter = dir.path().join(format!("{}-adapter", method.name()));
        lntune_adapter(method, &adapter);
        let merged = dir.path().join(format!("{}-merged", method.name()));
        // 1 MB shards: tiny-llava's 3.4 MB go to several files and an index
        let out = Command::new(env!("CARGO_BIN_EXE_lntune"))
            .args(["export", "hf", "--max-shard-size", "1", "--model"])
            .arg(&base)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&merged)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(merged.join("model.safetensors.index.json").is_file());
        let logits_file = dir
            .path()
            .join(format!("{}-merged.safetensors", method.name()));
        let theirs = &transformers_logits(&py, &merged, None, &logits_file);
        let ours = lntune_logits(Some(&adapter));
        let gap = max_abs(&ours, theirs);
        eprintln!(
            "{}: merged export in transformers, logits gap {gap:.2e}",
            method.name()
        );
        assert!(
            gap < 1e-5,
            "{}: transformers on the merged export differs by {gap}",
            method.name()
        );
        assert!(max_abs(&lntune_logits(None), theirs) > 1e-3);
        // what the adapter does not touch is the base's bytes (the vision tower, and the
        // attention weights an ln adapter leaves alone)
        let exported = lntune::io::store::Store::open_dir(&merged, &Device::Cpu).unwrap();
        assert_eq!(exported.keys(), base_store.keys());
        for k in base_store.keys() {
            let untouched =
                k.starts_with("vision_tower.") || (method == Method::Ln && k.contains("self_attn"));
            if untouched {
                assert_eq!(
                    exported.raw(&k).unwrap().2,
                    base_store.raw(&k).unwrap().2,
                    "{k}"
                );
            }
        }
    }
}

/// A text batch (ids below 256, the second row right-padded) for the LLM alone, and the
/// same as a file for the Python side.
fn text_batch(dir: &Path) -> (Batch, PathBuf) {
    let rows: Vec<Vec<u32>> = vec![
        (0..16).map(|i| (i * 37 % 250 + 3) as u32).collect(),
        (0..16).map(|i| (i * 11 % 250 + 3) as u32).collect(),
    ];
    let mut mask = vec![vec![true; 16]; 2];
    for m in mask[1].iter_mut().skip(12) {
        *m = false;
    }
    let flat = |f: &dyn Fn(usize, usize) -> i64| -> Tensor {
        let v: Vec<i64> = (0..2)
            .flat_map(|r| (0..16).map(move |c| (r, c)))
            .map(|(r, c)| f(r, c))
            .collect();
        Tensor::from_vec(v, (2, 16), &Device::Cpu).unwrap()
    };
    let file = dir.join("text-batch.safetensors");
    let tensors = std::collections::HashMap::from([
        ("input_ids".to_string(), flat(&|r, c| rows[r][c] as i64)),
        (
            "attention_mask".to_string(),
            flat(&|r, c| mask[r][c] as i64),
        ),
    ]);
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let batch = Batch {
        input_ids: rows,
        attention_mask: mask,
        labels: None,
        pixel_values: None,
        vision_features: None,
    };
    (batch, file)
}

/// transformers' `AutoModelForCausalLM` logits of an HF directory or GGUF file.
fn lm_logits(py: &Path, model: &Path, batch_file: &Path, out: &Path) -> Tensor {
    peft_side(
        py,
        &[
            "lm-logits",
            "--base",
            model.to_str().unwrap(),
            "--batch",
            batch_file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    load_all(out).remove("logits").unwrap()
}

#[test]
fn composed_hf_exports_give_transformers_an_llm_with_lntunes_logits() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny-dinov2-llama");
    let adapter = dir.path().join("ln-adapter");
    pattern_adapter(&base, Method::Ln, &adapter);
    let merged = dir.path().join("merged");
    let out = Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(["export", "hf", "--model"])
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (batch, batch_file) = text_batch(dir.path());
    let want = load_model(&base, Some(&adapter), DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&batch)
        .unwrap();
    let theirs = lm_logits(
        &py,
        &merged.join("llm"),
        &batch_file,
        &dir.path().join("l.safetensors"),
    );
    let gap = max_abs(&want, &theirs);
    eprintln!("composed export: transformers' LlamaForCausalLM on llm/ vs lntune, {gap:.2e}");
    assert!(
        gap < 1e-5,
        "transformers on the merged LLM part differs by {gap}"
    );
}

#[test]
fn gguf_exports_load_in_transformers_within_the_dequantisation_tolerance() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny-llava");
    let adapter = dir.path().join("lora-adapter");
    lntune_adapter(Method::Lora, &adapter);
    let (batch, batch_file) = text_batch(dir.path());
    let want = load_model(&base, Some(&adapter), DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&batch)
        .unwrap();
    // (type, bound on transformers against base + adapter)
    for (ty, bound) in [("keep", 1e-5), ("f16", 2e-3), ("q8_0", 3e-2)] {
        let gguf = dir.path().join(format!("{ty}.gguf"));
        let out = Command::new(env!("CARGO_BIN_EXE_lntune"))
            .args(["export", "gguf", "--type", ty, "--model"])
            .arg(&base)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&gguf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let logits_file = dir.path().join(format!("{ty}-logits.safetensors"));
        let theirs = lm_logits(&py, &gguf, &batch_file, &logits_file);
        // the same file in lntune: the same dequantized weights
        let ours = Mllm::load(&gguf, DType::F32, &Device::Cpu)
            .unwrap()
            .forward(&batch)
            .unwrap();
        let same_file = max_abs(&ours, &theirs);
        let to_merged = max_abs(&want, &theirs);
        eprintln!(
            "{ty}: transformers' GGUF loader vs lntune on the file {same_file:.2e}, vs base + adapter {to_merged:.2e}"
        );
        assert!(
            same_file < 1e-5,
            "{ty}: the two readers differ by {same_file}"
        );
        assert!(to_merged < bound, "{ty}: {to_merged} from base + adapter");
    }
}
