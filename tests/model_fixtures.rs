//! The whole forward pass against transformers' numbers, and the checkpoint layouts that must
//! load to the same model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lntune::model::batch::Batch;
use lntune::model::mllm::Mllm;

use crate::common::*;

struct Run {
    logits: Tensor,
    loss: f64,
    feats: Option<Tensor>,
    embeds: Tensor,
}

fn run(model_dir: &Path, batch: &Path, dtype: DType) -> Run {
    let model = Mllm::load(model_dir, dtype, &Device::Cpu).unwrap();
    let batch = Batch::from_safetensors(batch, &Device::Cpu).unwrap();
    let feats = batch
        .pixel_values
        .as_ref()
        .map(|p| model.image_features(p).unwrap());
    let embeds = model
        .embed_with_images(&batch.input_ids, feats.as_ref())
        .unwrap();
    let logits = model.forward(&batch).unwrap();
    let loss = Mllm::loss(&logits, batch.labels.as_ref().unwrap())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    Run {
        logits,
        loss,
        feats,
        embeds,
    }
}

fn tiny_llava() -> Run {
    let dir = fixture("tiny-llava");
    run(&dir, &dir.join("ref/batch.safetensors"), DType::F32)
}

#[test]
fn tiny_llava_matches_transformers() {
    let r = tiny_llava();
    let want = load_all(&fixture("tiny-llava/ref/expected.safetensors"));
    let d_logits = max_abs(&r.logits, &want["logits"]);
    let want_loss = want["loss"].to_scalar::<f32>().unwrap() as f64;
    assert!(d_logits <= 1e-5, "logits max abs {d_logits}");
    assert!(
        (r.loss - want_loss).abs() <= 1e-6,
        "loss {} vs {want_loss}",
        r.loss
    );
    assert!(max_abs(r.feats.as_ref().unwrap(), &want["debug.image_features"]) <= 1e-5);
    assert!(max_abs(&r.embeds, &want["debug.lm_inputs_embeds"]) <= 1e-5);
}

#[test]
fn tiny_llava_projector_input_matches() {
    // layer -2 of a 2-layer CLIP = output of encoder layer 0, CLS dropped
    let dir = fixture("tiny-llava");
    let model = Mllm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let batch = Batch::from_safetensors(&dir.join("ref/batch.safetensors"), &Device::Cpu).unwrap();
    let v = model.vision.as_ref().unwrap();
    let f = v
        .tower
        .features(batch.pixel_values.as_ref().unwrap(), &v.select)
        .unwrap();
    let want = load_all(&dir.join("ref/expected.safetensors"));
    assert!(max_abs(&f, &want["debug.projector_input"]) <= 1e-5);
}

#[test]
fn tiny_dinov2_llama_matches_transformers() {
    let dir = fixture("tiny-dinov2-llama");
    let r = run(&dir, &dir.join("batch.safetensors"), DType::F32);
    let want = load_all(&dir.join("expected.safetensors"));
    let d_logits = max_abs(&r.logits, &want["logits"]);
    let want_loss = want["loss"].to_scalar::<f32>().unwrap() as f64;
    assert!(d_logits <= 1e-5, "logits max abs {d_logits}");
    assert!(
        (r.loss - want_loss).abs() <= 1e-6,
        "loss {} vs {want_loss}",
        r.loss
    );
    assert!(max_abs(r.feats.as_ref().unwrap(), &want["debug.image_features"]) <= 1e-5);
}

#[test]
fn tiny_dinov2_position_table_and_last_hidden_state() {
    let dir = fixture("tiny-dinov2-llama");
    let model = Mllm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let want = load_all(&dir.join("expected.safetensors"));
    let lntune::model::vision::VisionTower::Dinov2(d) = &model.vision.as_ref().unwrap().tower
    else {
        panic!("expected a DINOv2 tower");
    };
    let pos = d.position_embeddings(42, 42).unwrap().unsqueeze(0).unwrap();
    assert_eq!(max_abs(&pos, &want["debug.vision_pos_embed_used"]), 0.0);
    let batch = Batch::from_safetensors(&dir.join("batch.safetensors"), &Device::Cpu).unwrap();
    let pixels = batch.pixel_values.as_ref().unwrap();
    let pre = d.hidden_states(pixels, &[2]).unwrap().remove(0);
    assert!(max_abs(&pre, &want["debug.vision_hidden_states_last_pre_layernorm"]) <= 1e-5);
    let post = d.layernorm.forward(&pre).unwrap();
    assert!(max_abs(&post, &want["debug.vision_last_hidden_state"]) <= 1e-5);
}

#[test]
fn bf16_weights_stay_close_to_f32_reference() {
    let dir = fixture("tiny-llava");
    let model = Mllm::load(&dir, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(
        model.llm.layers[0].self_attn.q_proj.weight.dtype(),
        DType::BF16
    );
    assert_eq!(
        model.llm.layers[0].input_layernorm.weight.dtype(),
        DType::F32
    );
    let batch = Batch::from_safetensors(&dir.join("ref/batch.safetensors"), &Device::Cpu).unwrap();
    let logits = model.forward(&batch).unwrap();
    assert_eq!(logits.dtype(), DType::F32);
    let want = load_all(&dir.join("ref/expected.safetensors"));
    let d = max_abs(&logits, &want["logits"]);
    // bf16 has 8 mantissa bits; logits here are O(1)
    assert!(d > 0.0 && d < 0.05, "bf16 logits max abs {d}");
}

/// Rewrites tiny-llava's checkpoint with renamed keys into a temp dir and checks the model
/// is unchanged.
fn assert_same_after_rewrite(
    rename: impl Fn(&str) -> Option<String>,
    edit_config: impl Fn(&mut serde_json::Value),
    shards: usize,
) {
    let src = fixture("tiny-llava");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tensors = load_all(&src.join("model.safetensors"));
    let mut renamed: Vec<(String, Tensor)> = tensors
        .into_iter()
        .filter_map(|(k, v)| rename(&k).map(|k| (k, v)))
        .collect();
    renamed.sort_by(|a, b| a.0.cmp(&b.0));
    if shards <= 1 {
        save_all(
            &renamed.into_iter().collect(),
            &dir.join("model.safetensors"),
        );
    } else {
        let per = renamed.len().div_ceil(shards);
        let mut weight_map = serde_json::Map::new();
        for (i, chunk) in renamed.chunks(per).enumerate() {
            let name = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
            for (k, _) in chunk {
                weight_map.insert(k.clone(), name.clone().into());
            }
            let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
            save_all(&map, &dir.join(&name));
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).unwrap(),
        )
        .unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit_config(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let got = run(dir, &src.join("ref/batch.safetensors"), DType::F32);
    let base = tiny_llava();
    assert_eq!(max_abs(&got.logits, &base.logits), 0.0);
}

#[test]
fn hub_key_layout_with_vision_model_level() {
    assert_same_after_rewrite(
        |k| {
            Some(match k.strip_prefix("vision_tower.") {
                Some(rest) => format!("vision_tower.vision_model.{rest}"),
                None => k.to_string(),
            })
        },
        |_| {},
        1,
    );
}

#[test]
fn module_name_layout() {
    assert_same_after_rewrite(
        |k| {
            Some(if let Some(r) = k.strip_prefix("language_model.model.") {
                format!("model.language_model.{r}")
            } else if k == "language_model.lm_head.weight" {
                "lm_head.weight".into()
            } else {
                format!("model.{k}")
            })
        },
        |_| {},
        1,
    );
}

#[test]
fn sharded_checkpoint() {
    assert_same_after_rewrite(|k| Some(k.to_string()), |_| {}, 3);
}

#[test]
fn tied_embeddings_without_lm_head() {
    // Tie the head in the config and drop lm_head: logits must equal an untied model whose
    // lm_head is a copy of the embeddings.
    let src = fixture("tiny-llava");
    let tmp = tempfile::tempdir().unwrap();
    let mut tensors = load_all(&src.join("model.safetensors"));
    tensors.remove("language_model.lm_head.weight");
    save_all(&tensors, &tmp.path().join("model.safetensors"));
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["text_config"]["tie_word_embeddings"] = true.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let tied = run(tmp.path(), &src.join("ref/batch.safetensors"), DType::F32);

    let tmp2 = tempfile::tempdir().unwrap();
    let embed = tensors["language_model.model.embed_tokens.weight"].clone();
    tensors.insert("language_model.lm_head.weight".into(), embed);
    save_all(&tensors, &tmp2.path().join("model.safetensors"));
    std::fs::copy(src.join("config.json"), tmp2.path().join("config.json")).unwrap();
    let untied = run(tmp2.path(), &src.join("ref/batch.safetensors"), DType::F32);
    assert_eq!(max_abs(&tied.logits, &untied.logits), 0.0);
    let model = Mllm::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    assert!(model.llm.cfg.tie_word_embeddings);
}

#[test]
fn cli_check_passes_on_both_fixtures() {
    for dtype in ["f32", "bf16"] {
        for (model, batch, expected) in [
            (
                "tiny-llava",
                "tiny-llava/ref/batch.safetensors",
                "tiny-llava/ref/expected.safetensors",
            ),
            (
                "tiny-dinov2-llama",
                "tiny-dinov2-llama/batch.safetensors",
                "tiny-dinov2-llama/expected.safetensors",
            ),
        ] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
                .args(["check", "--model"])
                .arg(fixture(model))
                .arg("--batch")
                .arg(fixture(batch))
                .arg("--expected")
                .arg(fixture(expected))
                .args(["--dtype", dtype])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{model} {dtype}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.contains("check passed"));
            // the stated tolerance of the dtype
            let tol = if dtype == "f32" {
                "1.0e-4 abs"
            } else {
                "2.0e-2 abs"
            };
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with("logits") && l.ends_with("ok") && l.contains(tol)),
                "{model} {dtype}: {stdout}"
            );
        }
    }
}

/// The composed tensor-op paths (what CUDA runs: no fused CPU kernel) against the same
/// references, on every fixture: `LNTUNE_COMPOSED_OPS=1` turns the fused kernels off.
#[test]
fn composed_op_paths_pass_check_on_every_fixture() {
    let mut cases = vec![
        (
            fixture("tiny-llava"),
            fixture("tiny-llava/ref/batch.safetensors"),
            fixture("tiny-llava/ref/expected.safetensors"),
        ),
        (
            fixture("tiny-dinov2-llama"),
            fixture("tiny-dinov2-llama/batch.safetensors"),
            fixture("tiny-dinov2-llama/expected.safetensors"),
        ),
    ];
    let mut variants: Vec<_> = std::fs::read_dir(fixture("variants"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    variants.sort();
    for v in variants {
        cases.push((
            v.clone(),
            v.join("batch.safetensors"),
            v.join("expected.safetensors"),
        ));
    }
    for (model, batch, expected) in cases {
        for dtype in ["f32", "bf16"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
                .env("LNTUNE_COMPOSED_OPS", "1")
                .args(["check", "--model"])
                .arg(&model)
                .arg("--batch")
                .arg(&batch)
                .arg("--expected")
                .arg(&expected)
                .args(["--dtype", dtype])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("check passed"),
                "{} {dtype}: {stdout}\n{}",
                model.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn cli_check_in_bf16_is_not_within_the_f32_tolerance() {
    // bf16 mixed precision really changes the numbers: the f32 tolerance fails it
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(["check", "--model"])
        .arg(fixture("tiny-llava"))
        .arg("--batch")
        .arg(fixture("tiny-llava/ref/batch.safetensors"))
        .arg("--expected")
        .arg(fixture("tiny-llava/ref/expected.safetensors"))
        .args(["--dtype", "bf16", "--atol-logits", "1e-4"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("logits"), "{stderr}");
}

#[test]
fn cli_check_fails_beyond_tolerance() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(["check", "--model"])
        .arg(fixture("tiny-llava"))
        .arg("--batch")
        .arg(fixture("tiny-llava/ref/batch.safetensors"))
        .arg("--expected")
        .arg(fixture("tiny-llava/ref/expected.safetensors"))
        .args(["--atol-logits", "1e-9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("check failed beyond tolerance"), "{stderr}");
    assert!(stderr.contains("logits"), "{stderr}");
}

/// Checkpoints written by transformers in other settings (tools/make_variants.py): GQA 4
/// with explicit head_dim, tied head, `full` strategy, several/zero images per sample, llama3
/// and linear RoPE scaling, two feature layers, hub key layout with shards, Qwen2 biases,
/// Mistral, DINOv2 with an interpolated position table, left padding.
#[test]
fn transformers_variants_match() {
    let root = fixture("variants");
    let mut names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert_eq!(names.len(), 4);
    for dir in names {
        let want = load_all(&dir.join("expected.safetensors"));
        let r = run(&dir, &dir.join("batch.safetensors"), DType::F32);
        let d = max_abs(&r.logits, &want["logits"]);
        let wl = want["loss"].to_scalar::<f32>().unwrap() as f64;
        assert!(d <= 1e-5, "{}: logits max abs {d}", dir.display());
        assert!(
            (r.loss - wl).abs() <= 1e-6,
            "{}: loss {} vs {wl}",
            dir.display(),
            r.loss
        );
    }
}

#[test]
fn composed_model_input_size_is_the_default_image_size() {
    use lntune::data::image::ImageProcessing;
    let model = Mllm::load(&fixture("tiny-dinov2-llama"), DType::F32, &Device::Cpu).unwrap();
    // compose.json says input_hw [42, 42]: DINOv2's own 256/224 would not be what it was made for
    let p = ImageProcessing::default().preprocess(&model).unwrap();
    assert_eq!((p.shortest_edge, p.crop), (Some(42), Some((42, 42))));
    let chosen = ImageProcessing {
        size: Some(56),
        ..Default::default()
    };
    let p = chosen.preprocess(&model).unwrap();
    assert_eq!((p.shortest_edge, p.crop), (Some(56), Some((56, 56))));
    // without the field: the processor's own
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-dinov2-llama"), tmp.path());
    let cfg_path = tmp.path().join("compose.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["vision"].as_object_mut().unwrap().remove("input_hw");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let model = Mllm::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let p = ImageProcessing::default().preprocess(&model).unwrap();
    assert_eq!((p.shortest_edge, p.crop), (Some(256), Some((224, 224))));
}
