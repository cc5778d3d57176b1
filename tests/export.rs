//! `export hf` of a composed model (DINOv2 + LLaMA, which transformers has no class for):
//! the same composed layout with a merged HF causal-LM directory, the projector merged and
//! the vision tower copied; lntune loads it with base + adapter's logits, images included.
//! (transformers on the LLM part: tests/interop.rs.)

use std::process::Command;

use candle_core::{DType, Device};
use lntune::methods::Method;
use lntune::methods::adapter::load_model;
use lntune::model::batch::Batch;

use crate::common::*;

#[test]
fn composed_hf_export_loads_with_the_adapters_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("tiny-dinov2-llama");
    let batch = Batch::from_safetensors(&base.join("batch.safetensors"), &Device::Cpu).unwrap();
    let adapter = tmp.path().join("adapter");
    pattern_adapter(&base, Method::Ln, &adapter);
    let out = tmp.path().join("merged");
    let o = Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(["export", "hf", "--model"])
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("composed"), "says what it wrote: {said}");
    let want = load_model(&base, Some(&adapter), DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&batch)
        .unwrap();
    let got = load_model(&out, None, DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&batch)
        .unwrap();
    let gap = max_abs(&got, &want);
    assert!(gap < 1e-6, "the composed export differs by {gap}");
    let plain = load_model(&base, None, DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&batch)
        .unwrap();
    assert!(max_abs(&got, &plain) > 1e-3, "the adapter is in the export");
    // the frozen vision tower and the LLM's config travel unchanged
    for f in [
        "compose.json",
        "vision/model.safetensors",
        "vision/config.json",
        "llm/config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(base.join(f)).unwrap(),
            "{f}"
        );
    }
    // a composed model whose LLM is a GGUF file is pointed at export gguf
    let gguf_base = tmp.path().join("gguf-base");
    copy_dir(&base, &gguf_base);
    let mut compose: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gguf_base.join("compose.json")).unwrap())
            .unwrap();
    compose["llm"]["path"] = "llm.gguf".into();
    std::fs::write(gguf_base.join("compose.json"), compose.to_string()).unwrap();
    lntune::jobs::export_gguf::export_gguf(
        &base.join("llm"),
        None,
        &gguf_base.join("llm.gguf"),
        lntune::jobs::export_gguf::GgufType::Keep,
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(["export", "hf", "--model"])
        .arg(&gguf_base)
        .arg("--out")
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("export gguf"), "{err}");
}
