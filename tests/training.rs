//! The training engine end to end on the tiny fixtures: which tensors get gradients, recompute
//! policies, gradient accumulation, overfitting a batch with every method, NaN handling,
//! bf16, and `plan`'s counts.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor};
use lntune::methods::setup::setup;
use lntune::methods::{Method, MethodConfig};
use lntune::model::batch::Batch;
use lntune::model::mllm::Mllm;
use lntune::train::optim::AdamWConfig;
use lntune::train::schedule::Schedule;
use lntune::train::step::{count_scored, forward_backward};
use lntune::train::trainer::{Trainer, TrainerConfig};
use lntune::train::{DEFAULT_ACTIVATION_BUDGET, Recompute};

use crate::common::*;

const ALL: [Method; 7] = [
    Method::Ln,
    Method::LnSimple,
    Method::Full,
    Method::Lora,
    Method::AttnQv,
    Method::Mlp,
    Method::Projector,
];

fn tiny(dtype: DType) -> (Mllm, Batch) {
    let dir = fixture("tiny-llava");
    let model = Mllm::load(&dir, dtype, &Device::Cpu).unwrap();
    let batch = Batch::from_safetensors(&dir.join("ref/batch.safetensors"), &Device::Cpu).unwrap();
    (model, batch)
}

fn trainer_cfg(lr: f64, steps: usize) -> TrainerConfig {
    TrainerConfig {
        optim: AdamWConfig::default(),
        schedule: Schedule {
            lr,
            warmup_steps: 0,
            total_steps: steps,
            min_lr_ratio: 1.0,
        },
        max_grad_norm: Some(1.0),
        seed: 7,
        recompute: Recompute::Auto,
        activation_budget: DEFAULT_ACTIVATION_BUDGET,
        compute: lntune::util::device::WeightDtype::F32,
    }
}

fn max_abs_t(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn every_method_grads_exactly_its_trainable_set() {
    for m in ALL {
        let (mut model, batch) = tiny(DType::F32);
        let mut trainer =
            Trainer::new(&mut model, &MethodConfig::new(m), trainer_cfg(1e-3, 10)).unwrap();
        // one step first, so that LoRA's B (zero at init, which zeroes dA) has moved
        trainer
            .step(&mut model, std::slice::from_ref(&batch))
            .unwrap();
        let (grads, _, _) = trainer
            .gradients(&model, std::slice::from_ref(&batch))
            .unwrap();
        let want: BTreeSet<String> = trainer
            .setup
            .trainable_specs()
            .map(|s| s.name.clone())
            .collect();
        let got: BTreeSet<String> = grads.0.keys().cloned().collect();
        assert_eq!(
            got, want,
            "{m:?}: gradients for exactly the trainable tensors"
        );
        for (name, g) in &grads.0 {
            let a = max_abs_t(g);
            assert!(a.is_finite() && a > 0.0, "{m:?}: gradient of {name} is {a}");
        }
    }
}

#[test]
fn recompute_policies_give_the_same_gradients() {
    for m in [Method::Ln, Method::Lora, Method::Full] {
        let (mut model, batch) = tiny(DType::F32);
        let mut mc = MethodConfig::new(m);
        mc.lora.dropout = 0.1; // the recompute must replay the dropout masks
        let s = setup(&mut model, &mc, 3).unwrap();
        let denom = count_scored(&batch).unwrap() as f64;
        let run = |r: Recompute| forward_backward(&model, &s, &batch, denom, 11, r, 0).unwrap();
        let (l_full, g_full) = run(Recompute::Full);
        for r in [Recompute::Selective, Recompute::None] {
            let (l, g) = run(r);
            assert_eq!(l.sum, l_full.sum);
            for (k, v) in &g.0 {
                let d = max_abs(v, &g_full.0[k]);
                assert!(
                    d <= 1e-7 * max_abs_t(v).max(1e-30) + 1e-12,
                    "{m:?} {r:?} {k}: {d}"
                );
            }
        }
    }
}

/// Row `i` of a batch as its own micro-batch, with its right padding removed.
fn one_row(b: &Batch, i: usize) -> Batch {
    let n = b.attention_mask[i].iter().filter(|&&v| v).count();
    Batch {
        input_ids: vec![b.input_ids[i][..n].to_vec()],
        attention_mask: vec![vec![true; n]],
        labels: Some(vec![b.labels.as_ref().unwrap()[i][..n].to_vec()]),
        pixel_values: Some(b.pixel_values.as_ref().unwrap().narrow(0, i, 1).unwrap()),
        vision_features: None,
    }
}

#[test]
fn accumulation_over_micro_batches_equals_one_batch() {
    for m in [Method::Ln, Method::Lora, Method::Full] {
        let (mut model, batch) = tiny(DType::F32);
        let mut trainer =
            Trainer::new(&mut model, &MethodConfig::new(m), trainer_cfg(1e-3, 10)).unwrap();
        trainer
            .step(&mut model, std::slice::from_ref(&batch))
            .unwrap();
        let (g_one, l_one, n_one) = trainer
            .gradients(&model, std::slice::from_ref(&batch))
            .unwrap();
        let micro = [one_row(&batch, 0), one_row(&batch, 1)];
        let (g_acc, l_acc, n_acc) = trainer.gradients(&model, &micro).unwrap();
        assert_eq!(n_one, n_acc);
        assert!(
            (l_one - l_acc).abs() < 1e-5,
            "{m:?}: loss {l_one} vs {l_acc}"
        );
        for (k, v) in &g_one.0 {
            let d = max_abs(v, &g_acc.0[k]);
            assert!(
                d <= 1e-4 * max_abs_t(v),
                "{m:?} {k}: {d} (scale {})",
                max_abs_t(v)
            );
        }
    }
}

#[test]
fn every_method_overfits_a_fixed_batch() {
    for (m, lr) in [
        (Method::Ln, 3e-3),
        (Method::LnSimple, 1e-2),
        (Method::Full, 1e-3),
        (Method::Lora, 3e-3),
        (Method::AttnQv, 1e-3),
        (Method::Mlp, 1e-3),
        (Method::Projector, 3e-3),
    ] {
        let (mut model, batch) = tiny(DType::F32);
        let steps = 150;
        let mut trainer =
            Trainer::new(&mut model, &MethodConfig::new(m), trainer_cfg(lr, steps)).unwrap();
        let mut first = f64::NAN;
        let mut last = f64::NAN;
        for i in 0..steps {
            let r = trainer
                .step(&mut model, std::slice::from_ref(&batch))
                .unwrap();
            if i == 0 {
                first = r.loss;
            }
            last = r.loss;
        }
        eprintln!("{m:?}: {first:.3} -> {last:.3}");
        // the projector alone moves only the 16 image-token embeddings of each sample, which
        // bounds how far it can fit random answer tokens; every other method memorises them
        let bound = if m == Method::Projector {
            first - 0.4
        } else {
            0.7 * first
        };
        assert!(last < bound, "{m:?}: loss {first:.3} -> {last:.3}");
    }
}

#[test]
fn non_finite_loss_stops_before_the_update() {
    let (mut model, batch) = tiny(DType::F32);
    let mut trainer = Trainer::new(
        &mut model,
        &MethodConfig::new(Method::Ln),
        trainer_cfg(1e-3, 10),
    )
    .unwrap();
    let key = "language_model.model.layers.1.input_layernorm.weight";
    let w = model.param_mut(key).unwrap();
    *w = (w.clone() * f64::NAN).unwrap();
    let proj = "multi_modal_projector.linear_1.weight";
    let before = model.param(proj).unwrap();
    let err = trainer
        .step(&mut model, std::slice::from_ref(&batch))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("loss is NaN") && err.contains("weights unchanged"),
        "{err}"
    );
    assert_eq!(max_abs(&model.param(proj).unwrap(), &before), 0.0);
    assert_eq!(trainer.step, 0);
}

#[test]
fn bf16_frozen_weights_give_close_gradients() {
    let want = load_all(&fixture("tiny-llava/ref/expected.safetensors"));
    let (mut model, batch) = tiny(DType::BF16);
    let mut mc = MethodConfig::new(Method::Ln);
    mc.train_embed = false;
    mc.train_head = false;
    let s = setup(&mut model, &mc, 0).unwrap();
    // trainable tensors are f32 masters, frozen linears stay bf16
    assert_eq!(
        model.llm.layers[0].input_layernorm.weight.dtype(),
        DType::F32
    );
    assert_eq!(model.llm.layers[0].mlp.up_proj.weight.dtype(), DType::BF16);
    let denom = count_scored(&batch).unwrap() as f64;
    let (_, g) = forward_backward(&model, &s, &batch, denom, 0, Recompute::Auto, 1 << 30).unwrap();
    for (k, v) in &g.0 {
        assert_eq!(v.dtype(), DType::F32);
        let r = &want[&format!("grad.{k}")];
        let rel = max_abs(v, r) / max_abs_t(r);
        assert!(rel < 0.05, "{k}: bf16 gradient off by {rel} relative");
    }
}

#[test]
fn a_bf16_run_follows_the_f32_loss_curve() {
    // the same LN-tuning run with frozen weights in f32 and in bf16 (mixed precision: on
    // CPUs with AMX every product, attention's too, also rounds its f32 operand to bf16):
    // each rounding has relative error <= 2^-9, which moves each step's loss by well
    // under 1% on this model; the curves must stay within 2% of each other at every step
    // while the loss falls by far more than that
    let run = |dtype| -> Vec<f64> {
        let (mut model, batch) = tiny(dtype);
        let steps = 40;
        let cfg = TrainerConfig {
            compute: if dtype == DType::BF16 {
                lntune::util::device::WeightDtype::Bf16
            } else {
                lntune::util::device::WeightDtype::F32
            },
            ..trainer_cfg(3e-3, steps)
        };
        let mut trainer = Trainer::new(&mut model, &MethodConfig::new(Method::Ln), cfg).unwrap();
        (0..steps)
            .map(|_| {
                trainer
                    .step(&mut model, std::slice::from_ref(&batch))
                    .unwrap()
                    .loss
            })
            .collect()
    };
    let (f32_curve, bf16_curve) = (run(DType::F32), run(DType::BF16));
    let worst = f32_curve
        .iter()
        .zip(&bf16_curve)
        .map(|(a, b)| (a - b).abs() / a)
        .fold(0.0, f64::max);
    eprintln!(
        "loss f32 {:.4} -> {:.4}, bf16 {:.4} -> {:.4}, worst relative gap {worst:.2e}",
        f32_curve[0], f32_curve[39], bf16_curve[0], bf16_curve[39]
    );
    assert!(worst < 0.02, "bf16 loss curve off by {worst} relative");
    assert!(f32_curve[39] < 0.8 * f32_curve[0]);
}

#[test]
fn plan_reproduces_the_papers_7b_ln_share() {
    // LLaMA-2-7B + CLIP ViT-L/14 (224 px) + linear projector: 266.6M trainable = 3.78%
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("llm")).unwrap();
    std::fs::create_dir_all(d.join("vision")).unwrap();
    std::fs::write(
        d.join("llm/config.json"),
        r#"{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "vocab_size": 32000,
            "max_position_embeddings": 4096, "tie_word_embeddings": false}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("vision/config.json"),
        r#"{"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 224, "intermediate_size": 4096,
            "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("compose.json"),
        r#"{"format": "tiny-vlm-compose/1", "vision": {"path": "vision", "model_type": "clip_vision_model"},
            "projector": {"path": "projector.safetensors", "type": "linear"}, "llm": {"path": "llm"},
            "image_token_id": 32000}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args([
            "plan", "--json", "--method", "ln", "--dtype", "bf16", "--model",
        ])
        .arg(d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["trainable_params"], 266_608_640);
    assert_eq!(p["groups"]["vision tower"]["params"], 303_179_776);
    let pct = p["trainable_percent"].as_f64().unwrap();
    assert_eq!(format!("{pct:.2}"), "3.78");
}

#[test]
fn plan_counts_match_the_loaded_model() {
    // from config.json alone vs the loaded tiny-llava, for every method
    for m in ["ln", "lora", "full", "attn-qv"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
            .args(["plan", "--json", "--method", m, "--model"])
            .arg(fixture("tiny-llava"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (mut model, _) = tiny(DType::F32);
        let method = match m {
            "ln" => Method::Ln,
            "lora" => Method::Lora,
            "full" => Method::Full,
            _ => Method::AttnQv,
        };
        let s = setup(&mut model, &MethodConfig::new(method), 0).unwrap();
        assert_eq!(
            p["trainable_params"].as_u64().unwrap() as usize,
            s.n_trainable(),
            "{m}"
        );
        let base: usize = model.param_specs().iter().map(|s| s.numel()).sum::<usize>()
            + model.vision_param_count();
        let adapters: usize = s
            .specs
            .iter()
            .filter(|s| s.base.is_some())
            .map(|s| s.numel())
            .sum();
        assert_eq!(
            p["total_params"].as_u64().unwrap() as usize,
            base + adapters,
            "{m}"
        );
    }
    // tiny-llava has 852,864 parameters (ref/README.md)
    let (model, _) = tiny(DType::F32);
    let n: usize =
        model.param_specs().iter().map(|s| s.numel()).sum::<usize>() + model.vision_param_count();
    assert_eq!(n, 852_864);
}

#[test]
fn bench_runs_each_method_in_its_own_process() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args([
            "bench", "--preset", "tiny", "--method", "ln,lora", "--steps", "2", "--warmup", "1",
            "--seq", "40", "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert!(l["median_step_s"].as_f64().unwrap() > 0.0);
        assert!(l["peak_rss_mib"].as_f64().unwrap() > 0.0);
        assert!(l["loss_first"].as_f64().unwrap().is_finite());
    }
}

fn lntune_json(args: &[&str]) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.trim();
    if text.starts_with('{') && text.contains("\n}") {
        return vec![serde_json::from_str(text).unwrap()];
    }
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn plan_presets_are_llava_1_5_shapes() {
    // LLaVA-1.5 7B / 13B (vocab 32064, CLIP ViT-L/14-336, mlp2x_gelu): the paper's ln set
    // trains block norms, final norm, projector, embeddings and head
    let p = &lntune_json(&["plan", "--json", "--preset", "llava-7b", "--dtype", "bf16"])[0];
    assert_eq!(p["total_params"], 7_063_427_072u64);
    assert_eq!(p["trainable_params"], 283_914_240u64);
    assert_eq!(p["groups"]["vision tower"]["params"], 303_507_456u64);
    let p = &lntune_json(&[
        "plan",
        "--json",
        "--preset",
        "llava-13b",
        "--method",
        "ln-simple",
    ])[0];
    assert_eq!(p["total_params"], 13_351_494_656u64);
    // 40 layers x 2 norms x 5120, and the final norm
    assert_eq!(p["trainable_params"], 414_720u64);
}

#[test]
fn plan_predicts_the_bench_step_peak_within_ten_percent() {
    // bench counts the live heap bytes of its steps (util::heap) and prints plan's
    // estimate for the same configuration, supervised-token count included
    for extra in [&[][..], &["--dtype", "bf16", "--recompute", "full"][..]] {
        let mut args = vec![
            "--threads",
            "2",
            "bench",
            "--preset",
            "small",
            "--method",
            "ln,lora,full",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--json",
        ];
        args.extend_from_slice(extra);
        for r in lntune_json(&args) {
            // without a bf16 kernel every frozen bf16 weight is widened to f32 for its
            // product (a transient copy the memory model leaves out)
            if r["products"] == "f32 from bf16" {
                eprintln!(
                    "skipped: {} {extra:?}: this CPU has no bf16 kernel (products: f32 from bf16), which plan does not model",
                    r["method"]
                );
                continue;
            }
            let held = r["peak_heap_mib"]
                .as_f64()
                .expect("the binary counts heap bytes");
            let planned = r["planned_peak_mib"].as_f64().unwrap();
            let ratio = planned / held;
            assert!(
                (0.9..=1.1).contains(&ratio),
                "{} {extra:?}: planned {planned:.0} MiB, held {held:.0} MiB",
                r["method"]
            );
        }
    }
}
