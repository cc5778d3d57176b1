//! Bad input gives one clear error that names the file and the tensor or field, never a panic.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lntune::model::batch::Batch;
use lntune::model::mllm::Mllm;

use crate::common::*;

/// A copy of tiny-llava whose checkpoint and config went through `edit`.
fn broken_llava(
    edit_tensors: impl Fn(&mut std::collections::HashMap<String, Tensor>),
    edit_config: impl Fn(&mut String),
) -> tempfile::TempDir {
    let src = fixture("tiny-llava");
    let tmp = tempfile::tempdir().unwrap();
    let mut t = load_all(&src.join("model.safetensors"));
    edit_tensors(&mut t);
    save_all(&t, &tmp.path().join("model.safetensors"));
    let mut cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    edit_config(&mut cfg);
    std::fs::write(tmp.path().join("config.json"), cfg).unwrap();
    tmp
}

fn load_err(dir: &Path) -> String {
    match Mllm::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn missing_tensor_names_file_and_key() {
    let key = "language_model.model.layers.2.mlp.up_proj.weight";
    let d = broken_llava(|t| drop(t.remove(key)), |_| {});
    let err = load_err(d.path());
    assert!(
        err.contains("model.safetensors") && err.contains(key) && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let key = "multi_modal_projector.linear_1.weight";
    let d = broken_llava(
        |t| {
            t.insert(
                key.into(),
                Tensor::zeros((128, 32), DType::F32, &Device::Cpu).unwrap(),
            );
        },
        |_| {},
    );
    let err = load_err(d.path());
    assert!(
        err.contains(key) && err.contains("[128, 32]") && err.contains("[128, 64]"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_is_refused() {
    let d = broken_llava(|_| {}, |_| {});
    let f = d.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(d.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );
}

#[test]
fn malformed_config_names_file_and_position() {
    let d = broken_llava(|_| {}, |c| c.insert(1, ','));
    let err = load_err(d.path());
    assert!(err.contains("config.json") && err.contains("line"), "{err}");
}

#[test]
fn unknown_architectures_are_named() {
    let d = broken_llava(
        |_| {},
        |c| *c = c.replace("\"model_type\": \"llama\"", "\"model_type\": \"gemma\""),
    );
    let err = load_err(d.path());
    assert!(
        err.contains("unknown architecture `gemma`") && err.contains("config.json"),
        "{err}"
    );
    let d = broken_llava(
        |_| {},
        |c| {
            *c = c.replace(
                "\"model_type\": \"clip_vision_model\"",
                "\"model_type\": \"siglip_vision_model\"",
            )
        },
    );
    let err = load_err(d.path());
    assert!(
        err.contains("siglip_vision_model") && err.contains("vision_config"),
        "{err}"
    );
    let d = broken_llava(
        |_| {},
        |c| {
            *c = c.replace(
                "\"model_type\": \"llava\"",
                "\"model_type\": \"llava_next\"",
            )
        },
    );
    let err = load_err(d.path());
    assert!(err.contains("llava_next"), "{err}");
}

#[test]
fn missing_directory_config_and_weights() {
    let err = load_err(Path::new("/nonexistent/model"));
    assert!(err.contains("/nonexistent/model"), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("no config.json or compose.json"), "{err}");
    std::fs::copy(
        fixture("tiny-llava/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("no model.safetensors"), "{err}");
}

#[test]
fn compose_json_is_validated() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-dinov2-llama"), tmp.path());
    let cj = tmp.path().join("compose.json");
    let text = std::fs::read_to_string(&cj).unwrap();
    std::fs::write(&cj, text.replace("tiny-vlm-compose/1", "something/9")).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("compose.json") && err.contains("format"),
        "{err}"
    );
    std::fs::write(
        &cj,
        text.replace(
            "\"image_tokens_per_image\": 9",
            "\"image_tokens_per_image\": 10",
        ),
    )
    .unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("image_tokens_per_image"), "{err}");
    std::fs::write(
        &cj,
        text.replace("\"in_features\": 32", "\"in_features\": 48"),
    )
    .unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("projector.in_features"), "{err}");
}

fn tiny_batch() -> (Mllm, Batch) {
    let dir = fixture("tiny-llava");
    let model = Mllm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let batch = Batch::from_safetensors(&dir.join("ref/batch.safetensors"), &Device::Cpu).unwrap();
    (model, batch)
}

#[test]
fn image_token_count_mismatch() {
    let (model, mut batch) = tiny_batch();
    // one image token turned into text: 31 tokens for 2 images x 16 features
    let pos = batch.input_ids[0].iter().position(|&t| t == 511).unwrap();
    batch.input_ids[0][pos] = 5;
    let err = format!("{:#}", model.forward(&batch).err().unwrap());
    assert!(
        err.contains("31 image tokens") && err.contains("2 x 16 = 32"),
        "{err}"
    );
    // pixel_values dropped: image tokens but no images
    let (model, mut batch) = tiny_batch();
    batch.pixel_values = None;
    let err = format!("{:#}", model.forward(&batch).err().unwrap());
    assert!(err.contains("32 image tokens"), "{err}");
}

#[test]
fn bad_batches() {
    let (model, mut batch) = tiny_batch();
    batch.input_ids[1][3] = 9999;
    let err = format!("{:#}", model.forward(&batch).err().unwrap());
    assert!(err.contains("9999") && err.contains("vocabulary"), "{err}");

    let (model, mut batch) = tiny_batch();
    batch.pixel_values = Some(Tensor::zeros((2, 3, 42, 42), DType::F32, &Device::Cpu).unwrap());
    let err = format!("{:#}", model.forward(&batch).err().unwrap());
    assert!(err.contains("56x56") && err.contains("42x42"), "{err}");

    let (model, batch) = tiny_batch();
    let logits = model.forward(&batch).unwrap();
    let none = vec![vec![-100i64; 40]; 2];
    let err = format!("{:#}", Mllm::loss(&logits, &none).err().unwrap());
    assert!(err.contains("no target"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("b.safetensors");
    let mut t = load_all(&fixture("tiny-llava/ref/batch.safetensors"));
    t.remove("input_ids");
    save_all(&t, &f);
    let err = format!(
        "{:#}",
        Batch::from_safetensors(&f, &Device::Cpu).err().unwrap()
    );
    assert!(
        err.contains("b.safetensors") && err.contains("input_ids"),
        "{err}"
    );
    let mut t = load_all(&fixture("tiny-llava/ref/batch.safetensors"));
    t.insert(
        "labels".into(),
        Tensor::zeros((2, 39), DType::I64, &Device::Cpu).unwrap(),
    );
    save_all(&t, &f);
    let err = format!(
        "{:#}",
        Batch::from_safetensors(&f, &Device::Cpu).err().unwrap()
    );
    assert!(err.contains("labels") && err.contains("[2, 40]"), "{err}");
}

#[test]
fn cli_errors_are_one_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args([
            "check",
            "--model",
            "/nonexistent",
            "--batch",
            "x",
            "--expected",
            "y",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("/nonexistent"),
        "{stderr}"
    );
}
