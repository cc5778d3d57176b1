//! `lntune train` end to end on the tiny model: outputs, checkpoints, resume, adapters and
//! their base check, NaN handling, and bad data.

use crate::common::*;

#[test]
fn train_writes_adapter_checkpoints_metrics_and_plot() {
    let t = TinyRun::new();
    let data = t.path("data/conversation_train.json").display().to_string();
    let (ok, err) = t.train(
        "run",
        &[
            "--data",
            &data,
            "--method",
            "ln",
            "--steps",
            "4",
            "--save-every",
            "2",
        ],
    );
    assert!(ok, "{err}");
    let m = metrics(&t.path("run/metrics.jsonl"));
    assert_eq!(m.len(), 4);
    for (i, l) in m.iter().enumerate() {
        assert_eq!(l["step"], i + 1);
        assert!(
            l["loss"].as_f64().unwrap().is_finite() && l["tokens_per_s"].as_f64().unwrap() > 0.0
        );
    }
    assert!(t.path("run/loss.png").is_file());
    assert!(t.path("run/config.json").is_file());
    assert!(
        t.path("run/checkpoints/step-000002/optimizer.safetensors")
            .is_file()
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("run/adapter/adapter.json")).unwrap())
            .unwrap();
    assert_eq!(meta["method"]["method"], "ln");
    let tensors = load_all(&t.path("run/adapter/adapter.safetensors"));
    // ln: norms, projector, embeddings and head (untied), nothing else
    assert!(
        tensors
            .keys()
            .any(|k| k.ends_with("input_layernorm.weight"))
    );
    assert!(tensors.contains_key("language_model.lm_head.weight"));
    assert!(
        !tensors
            .keys()
            .any(|k| k.contains("q_proj") || k.starts_with("vision_tower"))
    );
    assert!(err.contains("data: 24 samples: "), "{err}");
}

#[test]
fn resume_equals_an_uninterrupted_run() {
    let t = TinyRun::new();
    let data = format!(
        "{},{}",
        t.path("data/conversation_train.json").display(),
        t.path("data/captions_train.json").display()
    );
    let args = [
        "--data",
        data.as_str(),
        "--method",
        "lora",
        "--steps",
        "6",
        "--save-every",
        "3",
        "--lora-dropout",
        "0.1",
    ];
    let (ok, err) = t.train("a", &args);
    assert!(ok, "{err}");
    // a second run that picks up from the first one's step-3 checkpoint
    let ck = t.path("a/checkpoints/step-000003").display().to_string();
    let mut resumed: Vec<&str> = args.to_vec();
    resumed.extend(["--resume", ck.as_str()]);
    let (ok, err) = t.train("b", &resumed);
    assert!(ok, "{err}");
    assert!(err.contains("resuming from"), "{err}");
    let (a, b) = (
        metrics(&t.path("a/metrics.jsonl")),
        metrics(&t.path("b/metrics.jsonl")),
    );
    assert_eq!(b.len(), 3);
    for (x, y) in a[3..].iter().zip(&b) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["loss"], y["loss"], "loss at step {}", x["step"]);
        assert_eq!(x["grad_norm"], y["grad_norm"]);
    }
    let (ta, tb) = (
        load_all(&t.path("a/adapter/adapter.safetensors")),
        load_all(&t.path("b/adapter/adapter.safetensors")),
    );
    for (k, v) in &ta {
        assert_eq!(max_abs(v, &tb[k]), 0.0, "{k}");
    }
}

#[test]
fn stage_two_from_stage_one_and_base_mismatch() {
    let t = TinyRun::new();
    let caps = t.path("data/captions_train.json").display().to_string();
    let (ok, err) = t.train("s1", &["--data", &caps, "--stage", "1", "--steps", "2"]);
    assert!(ok, "{err}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("s1/adapter/adapter.json")).unwrap())
            .unwrap();
    assert_eq!(meta["method"]["method"], "projector");
    let conv = t.path("data/conversation_train.json").display().to_string();
    let init = t.path("s1/adapter").display().to_string();
    let (ok, err) = t.train(
        "s2",
        &[
            "--data",
            &conv,
            "--method",
            "ln-simple",
            "--steps",
            "2",
            "--init-adapter",
            &init,
        ],
    );
    assert!(ok, "{err}");
    // the stage-2 adapter carries the stage-1 projector too
    let s2 = load_all(&t.path("s2/adapter/adapter.safetensors"));
    let s1 = load_all(&t.path("s1/adapter/adapter.safetensors"));
    assert_eq!(
        max_abs(
            &s2["multi_modal_projector.linear_1.weight"],
            &s1["multi_modal_projector.linear_1.weight"]
        ),
        0.0
    );
    // an adapter is refused on another base model
    let other = tempfile::tempdir().unwrap();
    copy_dir(&t.path("model"), other.path());
    let mut w = load_all(&other.path().join("model.safetensors"));
    let key = "language_model.model.norm.weight";
    w.insert(key.into(), (w[key].clone() * 2.0).unwrap());
    save_all(&w, &other.path().join("model.safetensors"));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .arg("train")
        .arg("--model")
        .arg(other.path())
        .args(["--data", &conv, "--images"])
        .arg(t.path("data/images"))
        .args(["--out"])
        .arg(t.path("s3"))
        .args(["--steps", "1", "--quiet", "--init-adapter", &init])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("another base model"),
        "{err}"
    );
}

/// `--init-adapter` takes a PEFT LN_TUNING directory (here one `export peft` wrote) and
/// starts exactly where the lntune adapter it came from does; a PEFT LoRA is refused by name.
#[test]
fn init_adapter_accepts_a_peft_ln_tuning_directory() {
    let t = TinyRun::new();
    let conv = t.path("data/conversation_train.json").display().to_string();
    let export = |run: &str, method: &str| {
        let (ok, err) = t.train(run, &["--data", &conv, "--method", method, "--steps", "2"]);
        assert!(ok, "{err}");
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
            .args(["export", "peft", "--model"])
            .arg(t.path("model"))
            .arg("--adapter")
            .arg(t.path(&format!("{run}/adapter")))
            .arg("--out")
            .arg(t.path(&format!("{run}-peft")))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        t.path(&format!("{run}-peft")).display().to_string()
    };
    let peft_ln = export("s1", "ln");
    let ours = t.path("s1/adapter").display().to_string();
    let mut first_loss = Vec::new();
    for (run, init) in [("from-peft", &peft_ln), ("from-lntune", &ours)] {
        let (ok, err) = t.train(
            run,
            &[
                "--data",
                &conv,
                "--method",
                "ln-simple",
                "--steps",
                "1",
                "--init-adapter",
                init,
            ],
        );
        assert!(ok, "{run}: {err}");
        first_loss.push(
            metrics(&t.path(&format!("{run}/metrics.jsonl")))[0]["loss"]
                .as_f64()
                .unwrap(),
        );
    }
    assert!(
        (first_loss[0] - first_loss[1]).abs() <= 1e-6 * first_loss[1].abs(),
        "PEFT and lntune inits start at {first_loss:?}"
    );
    let s1 = load_all(&t.path("s1/adapter/adapter.safetensors"));
    let s2 = load_all(&t.path("from-peft/adapter/adapter.safetensors"));
    let key = "multi_modal_projector.linear_1.weight";
    assert_eq!(
        max_abs(&s2[key], &s1[key]),
        0.0,
        "the init's projector travels on"
    );
    let peft_lora = export("l1", "lora");
    let (ok, err) = t.train(
        "from-lora",
        &[
            "--data",
            &conv,
            "--method",
            "ln",
            "--steps",
            "1",
            "--init-adapter",
            &peft_lora,
        ],
    );
    assert!(
        !ok && err.contains("--init-adapter") && err.contains("LORA"),
        "{err}"
    );
}

#[test]
fn non_finite_loss_stops_without_an_adapter() {
    let t = TinyRun::new();
    let conv = t.path("data/conversation_train.json").display().to_string();
    let (ok, err) = t.train(
        "nan",
        &[
            "--data",
            &conv,
            "--method",
            "full",
            "--steps",
            "30",
            "--lr",
            "1e30",
            "--max-grad-norm",
            "0",
        ],
    );
    assert!(!ok);
    assert!(err.contains("stopping before the update"), "{err}");
    assert!(!t.path("nan/adapter").exists());
}

#[test]
fn bad_data_is_reported() {
    let t = TinyRun::new();
    let write = |name: &str, text: &str| {
        let p = t.path(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    // malformed JSON: the file and the position
    let bad = write("bad.json", "[{\"id\": 1, \"conversations\": [}]");
    let (ok, err) = t.train("x", &["--data", &bad, "--steps", "1"]);
    assert!(
        !ok && err.contains("bad.json") && err.contains("line 1"),
        "{err}"
    );
    // counted skips: empty conversation, missing image, placeholder/image mismatch, too long
    let long = "word ".repeat(300);
    let mixed = write(
        "mixed.json",
        &serde_json::json!([
            {"id": "ok", "image": "train_00000.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "red"}]},
            {"id": "empty", "conversations": []},
            {"id": "missing", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}]},
            {"id": "mismatch", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}]},
            {"id": "long", "image": "train_00001.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": long}]},
            {"id": "text", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "there"}]},
        ])
        .to_string(),
    );
    let (ok, err) = t.train("y", &["--data", &mixed, "--steps", "1"]);
    assert!(ok, "{err}");
    assert!(err.contains("6 samples: 3 kept, 1 truncated"), "{err}");
    assert!(
        err.contains("1 skipped (empty conversation)") && err.contains("1 skipped (missing image)"),
        "{err}"
    );
    assert!(err.contains("1 skipped (image count mismatch)"), "{err}");
    // a corrupt image is an error naming the file
    std::fs::write(t.path("data/images/train_00000.png"), b"not a png").unwrap();
    let one = write("one.json", &serde_json::json!([{"id": "ok", "image": "train_00000.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "red"}]}]).to_string());
    let (ok, err) = t.train("z", &["--data", &one, "--steps", "1"]);
    assert!(
        !ok && err.contains("train_00000.png") && err.contains("cannot decode"),
        "{err}"
    );
}

/// A run's own config.json reproduces it: the same losses and the same adapter bytes, and
/// flags given with `--config` override its fields.
#[test]
fn a_runs_config_json_reproduces_it_and_flags_override() {
    let t = TinyRun::new();
    let data = t.path("data/conversation_train.json").display().to_string();
    let (ok, err) = t.train(
        "a",
        &[
            "--data", &data, "--method", "lora", "--lora-r", "4", "--steps", "3", "--lr", "3e-3",
        ],
    );
    assert!(ok, "{err}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("a/config.json")).unwrap()).unwrap();
    // the defaults that depend on the model and the method are written resolved
    assert_eq!(written["template"], "chatml");
    assert_eq!(written["lr"], 3e-3);
    assert_eq!(written["method"]["lora"]["r"], 4);
    let lntune = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let config = t.path("a/config.json").display().to_string();
    let b = t.path("b").display().to_string();
    let (ok, err) = lntune(&["train", "--config", &config, "--out", &b, "--quiet"]);
    assert!(ok, "{err}");
    let loss = |run: &str| -> Vec<f64> {
        metrics(&t.path(&format!("{run}/metrics.jsonl")))
            .iter()
            .map(|l| l["loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(loss("a"), loss("b"));
    assert_eq!(
        std::fs::read(t.path("a/adapter/adapter.safetensors")).unwrap(),
        std::fs::read(t.path("b/adapter/adapter.safetensors")).unwrap()
    );
    // a flag overrides the file's field; the rest stays
    let c = t.path("c").display().to_string();
    let (ok, err) = lntune(&[
        "train", "--config", &config, "--out", &c, "--quiet", "--steps", "2",
    ]);
    assert!(ok, "{err}");
    assert_eq!(loss("c"), loss("a")[..2].to_vec());
    let written_c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("c/config.json")).unwrap()).unwrap();
    assert_eq!(written_c["steps"], 2);
    assert_eq!(written_c["method"]["lora"]["r"], 4);
}

/// A hand-written run config: fields left out keep their defaults (the method's too), a
/// data source may be written `FILE[:N]`, and a misspelled field is an error naming it.
#[test]
fn run_config_files_keep_defaults_and_name_unknown_fields() {
    let t = TinyRun::new();
    let cfg = serde_json::json!({
        "model": t.path("model"),
        "data": [format!("{}:10", t.path("data/conversation_train.json").display())],
        "images": t.path("data/images"),
        "method": {"method": "ln-simple"},
        "template": "chatml",
        "steps": 2,
        "batch": 2,
        "max_length": 256,
    });
    let file = t.path("run.json");
    std::fs::write(&file, cfg.to_string()).unwrap();
    let run = |file: &std::path::Path, out: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
            .args(["train", "--quiet", "--config"])
            .arg(file)
            .arg("--out")
            .arg(t.path(out))
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (ok, err) = run(&file, "r");
    assert!(ok, "{err}");
    assert!(err.contains("data: 10 samples"), "{err}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("r/config.json")).unwrap()).unwrap();
    // ln-simple's own defaults: no projector; its learning rate; the recipe's warmup
    assert_eq!(written["method"]["train_projector"], false);
    assert_eq!(written["lr"], 5e-4);
    assert_eq!(written["warmup_ratio"], 0.03);
    let mut typo = cfg.clone();
    typo["stpes"] = serde_json::json!(3);
    std::fs::write(&file, typo.to_string()).unwrap();
    let (ok, err) = run(&file, "r2");
    assert!(
        !ok && err.contains("run.json") && err.contains("`stpes`"),
        "{err}"
    );
    let mut no_model = cfg.clone();
    no_model.as_object_mut().unwrap().remove("model");
    std::fs::write(&file, no_model.to_string()).unwrap();
    let (ok, err) = run(&file, "r3");
    assert!(!ok && err.contains("no model"), "{err}");
}

#[test]
fn bench_profile_splits_a_step_by_op_kind() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args([
            "--threads",
            "1",
            "bench",
            "--preset",
            "tiny",
            "--method",
            "lora",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--profile",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    let p = &r["profile"];
    let rows = p["rows"].as_array().unwrap();
    let get = |k: &str| rows.iter().find(|x| x["kind"] == k).unwrap().clone();
    // LoRA trains factors of every linear: every matmul kind ran and counted its work
    for k in [
        "matmul forward",
        "matmul dX",
        "matmul dW (trainable)",
        "attention",
    ] {
        let x = get(k);
        assert!(
            x["seconds"].as_f64().unwrap() > 0.0 && x["gflop"].as_f64().unwrap() > 0.0,
            "{k}: {x}"
        );
    }
    for k in ["norms", "elementwise", "loss", "optimizer"] {
        assert!(get(k)["seconds"].as_f64().unwrap() > 0.0, "{k}");
    }
    // the kinds and the rest add up to the mean timed step
    let sum: f64 = rows
        .iter()
        .map(|x| x["seconds"].as_f64().unwrap())
        .sum::<f64>()
        + p["other_s"].as_f64().unwrap();
    let median = r["median_step_s"].as_f64().unwrap();
    assert!(
        sum > 0.5 * median && sum < 2.0 * median,
        "{sum} vs {median}"
    );
    assert!(p["peak_gflops"].as_f64().unwrap() > 0.0);
    // the products' floor is their GFLOP at the measured peak
    let gflop: f64 = rows.iter().map(|x| x["gflop"].as_f64().unwrap()).sum();
    let floor = p["products_floor_s"].as_f64().unwrap();
    let want = gflop / p["peak_gflops"].as_f64().unwrap();
    assert!(
        (floor - want).abs() <= 1e-9 * want.max(1.0),
        "{floor} vs {want}"
    );
}

/// `tests/fixtures/tiny-llava-tokenizer` (what tools/device-check.sh adds to tiny-llava to
/// train it without the test harness) is exactly what the tests' tokenizer writes.
/// `LNTUNE_BLESS=1` rewrites it.
#[test]
fn committed_tiny_tokenizer_files_are_the_tests_tokenizer() {
    let dir = fixture("tiny-llava-tokenizer");
    let t = TinyRun::new();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        let made = std::fs::read(t.path("model").join(name)).unwrap();
        if std::env::var("LNTUNE_BLESS").is_ok_and(|v| v == "1") {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), &made).unwrap();
        }
        let committed = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()));
        assert!(
            committed == made,
            "{name} differs from the tests' tokenizer"
        );
    }
}

#[test]
fn a_yaml_run_config_trains_as_its_flags_and_its_saved_config_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = super::common::workspace(dir.path());
    let yaml = dir.path().join("run.yaml");
    std::fs::write(
        &yaml,
        format!(
            "# a run config in YAML\nmodel: {}\ndata:\n  - path: {}\nimages: {}\nmethod:\n  method: ln\ntemplate: chatml\nsteps: 3\nbatch: 4\n",
            model.display(),
            data.join("conversation_train.json").display(),
            data.join("images").display()
        ),
    )
    .unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
            .arg("train")
            .args(args)
            .arg("--quiet")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    run(&[
        "--config".as_ref(),
        yaml.as_os_str(),
        "--out".as_ref(),
        a.as_os_str(),
    ]);
    let train_json = data.join("conversation_train.json");
    let images = data.join("images");
    run(&[
        "--model".as_ref(),
        model.as_os_str(),
        "--data".as_ref(),
        train_json.as_os_str(),
        "--images".as_ref(),
        images.as_os_str(),
        "--method".as_ref(),
        "ln".as_ref(),
        "--template".as_ref(),
        "chatml".as_ref(),
        "--steps".as_ref(),
        "3".as_ref(),
        "--batch".as_ref(),
        "4".as_ref(),
        "--out".as_ref(),
        b.as_os_str(),
    ]);
    let saved = a.join("config.json");
    run(&[
        "--config".as_ref(),
        saved.as_os_str(),
        "--out".as_ref(),
        c.as_os_str(),
    ]);
    let losses = |run: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].to_string())
            .collect()
    };
    assert_eq!(losses(&a).len(), 3);
    assert_eq!(losses(&a), losses(&b), "YAML config vs flags");
    assert_eq!(
        losses(&a),
        losses(&c),
        "the saved config.json vs the YAML it came from"
    );
}
