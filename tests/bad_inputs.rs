//! Bad inputs by class, table-driven: every case runs the `lntune` binary and must exit 1
//! with a one-line `error: …` that names the flag, field or file, and never panic.

use crate::common::*;

/// Runs `lntune args` and checks the failure: exit code 1, no panic, and the last stderr
/// line an `error:` that contains every one of `wants`.
fn refused(args: &[String], wants: &[&str]) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(last.starts_with("error: "), "{args:?}: {err}");
    for w in wants {
        assert!(last.contains(w), "{args:?}: `{w}` not in `{last}`");
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn numeric_flags_out_of_range_are_named() {
    let t = TinyRun::new();
    let model = t.path("model").display().to_string();
    let data = t.path("data/conversation_train.json").display().to_string();
    let images = t.path("data/images").display().to_string();
    let out = t.path("run").display().to_string();
    let train = |extra: &[&str]| {
        let mut a = strings(&[
            "train", "--model", &model, "--data", &data, "--images", &images, "--out", &out,
            "--quiet",
        ]);
        a.extend(strings(extra));
        a
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (train(&["--batch", "0"]), vec!["--batch"]),
        (train(&["--grad-accum", "0"]), vec!["--grad-accum"]),
        (
            train(&["--save-every", "0"]),
            vec!["--save-every must be positive"],
        ),
        (train(&["--steps", "0"]), vec!["--steps must be positive"]),
        (train(&["--max-length", "0"]), vec!["--max-length"]),
        (train(&["--image-size", "0"]), vec!["--image-size"]),
        // sizes that would claim memory: checked against the model
        (
            train(&["--image-size", "100000"]),
            vec!["--image-size 100000", "CLIP tower"],
        ),
        (
            train(&["--image-size", "100000", "--image-processor", "dinov2"]),
            vec!["--image-size 100000", "CLIP tower"],
        ),
        (
            train(&["--method", "lora", "--lora-r", "100000000"]),
            vec!["`r` = 100000000", "at most"],
        ),
        (train(&["--lr", "NaN"]), vec!["--lr", "NaN"]),
        (train(&["--lr=-0.001"]), vec!["--lr"]),
        (train(&["--lr", "inf"]), vec!["--lr"]),
        (train(&["--epochs", "NaN"]), vec!["--epochs"]),
        (train(&["--epochs", "0"]), vec!["--epochs"]),
        (train(&["--max-grad-norm", "NaN"]), vec!["--max-grad-norm"]),
        (train(&["--max-grad-norm=-1"]), vec!["--max-grad-norm"]),
        (train(&["--warmup-ratio", "1.5"]), vec!["--warmup-ratio"]),
        (train(&["--min-lr-ratio=-0.1"]), vec!["--min-lr-ratio"]),
        (train(&["--weight-decay", "NaN"]), vec!["--weight-decay"]),
        (train(&["--method", "lora", "--lora-r", "0"]), vec!["`r`"]),
        (
            train(&["--method", "lora", "--lora-alpha", "inf"]),
            vec!["`alpha`"],
        ),
        (
            train(&["--method", "lora", "--lora-dropout", "1"]),
            vec!["`dropout`"],
        ),
        (
            train(&["--log-grad-stats", "--grad-stats-window", "0"]),
            vec!["--grad-stats-window"],
        ),
        (train(&["--stage", "3"]), vec!["--stage"]),
        (
            strings(&[
                "eval",
                "--model",
                &model,
                "--bench",
                "shapes",
                "--data",
                &t.path("data").display().to_string(),
                "--out",
                &t.path("ev").display().to_string(),
                "--batch",
                "0",
            ]),
            vec!["--batch must be positive"],
        ),
        (
            strings(&[
                "eval",
                "--model",
                &model,
                "--bench",
                "shapes",
                "--data",
                &t.path("data").display().to_string(),
                "--out",
                &t.path("ev").display().to_string(),
                "--max-new-tokens",
                "0",
            ]),
            vec!["--max-new-tokens"],
        ),
        (
            strings(&[
                "generate",
                "--model",
                &model,
                "--prompt",
                "hi",
                "--temperature",
                "NaN",
            ]),
            vec!["--temperature"],
        ),
        (
            strings(&[
                "generate",
                "--model",
                &model,
                "--prompt",
                "hi",
                "--max-new-tokens",
                "0",
            ]),
            vec!["--max-new-tokens"],
        ),
        (
            strings(&["bench", "--preset", "tiny", "--steps", "0"]),
            vec!["--steps must be positive"],
        ),
        (
            strings(&["bench", "--preset", "tiny", "--seq", "100000"]),
            vec!["--seq 100000", "context of 256"],
        ),
        (
            strings(&["bench", "--preset", "tiny", "--batch", "100000000"]),
            vec!["--batch 100000000", "more than this machine's"],
        ),
        (
            strings(&[
                "plan",
                "--model",
                &fixture("tiny-llava").display().to_string(),
                "--batch",
                "100000000000",
                "--seq",
                "1000000000000",
            ]),
            vec![
                "--batch 100000000000 x --seq 1000000000000",
                "beyond any machine",
            ],
        ),
        (
            strings(&["data", "shapes", "--out", &out, "--size", "1000000"]),
            vec!["--size 1000000", "over the limit"],
        ),
        (
            strings(&["--threads", "0", "bench", "--preset", "tiny"]),
            vec!["--threads"],
        ),
        (
            strings(&["--threads", "100000", "bench", "--preset", "tiny"]),
            vec!["--threads"],
        ),
        (
            strings(&["bench", "--preset", "tiny", "--batch", "0"]),
            vec!["--batch"],
        ),
        (
            strings(&["bench", "--preset", "tiny", "--seq", "0"]),
            vec!["--seq"],
        ),
        (
            strings(&["plan", "--model", &model, "--batch", "0"]),
            vec!["--batch"],
        ),
        (
            strings(&["plan", "--model", &model, "--seq", "0"]),
            vec!["--seq"],
        ),
        (
            // 5e-4 and 5.25e-4: one folder label `lr-5e-4` for two arms
            strings(&[
                "compare",
                "--model",
                &model,
                "--data",
                &data,
                "--images",
                &images,
                "--methods",
                "ln",
                "--lr",
                "ln=5e-4",
                "--lr-sweep",
                "--sweep-factors",
                "1,1.05",
                "--bench",
                "shapes",
                "--eval-data",
                &t.path("data").display().to_string(),
                "--out",
                &t.path("c").display().to_string(),
            ]),
            vec!["--sweep-factors", "lr-5e-4", "5.25e-4"],
        ),
        (
            strings(&[
                "demo",
                "--image-size",
                "0",
                "--out",
                &t.path("d").display().to_string(),
            ]),
            vec!["--image-size 0"],
        ),
        (
            strings(&[
                "demo",
                "--train-images",
                "0",
                "--out",
                &t.path("d").display().to_string(),
            ]),
            vec!["--train-images"],
        ),
        (
            strings(&[
                "demo",
                "--stage2-steps",
                "0",
                "--out",
                &t.path("d").display().to_string(),
            ]),
            vec!["--stage2-steps"],
        ),
    ];
    for (args, wants) in &cases {
        refused(args, wants);
    }
    // nothing was trained: no run files were left behind by a refused run
    assert!(!t.path("run/config.json").exists());
    assert!(!t.path("c/runs").exists());
}

/// A copy of the tiny model whose config.json has `edit` applied.
fn model_with(t: &TinyRun, name: &str, edit: impl Fn(&mut serde_json::Value)) -> String {
    let dir = t.path(name);
    copy_dir(&t.path("model"), &dir);
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
    dir.display().to_string()
}

#[test]
fn config_sizes_that_cannot_be_are_named() {
    let t = TinyRun::new();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
        (
            "vision-heads-0",
            Box::new(|v| v["vision_config"]["num_attention_heads"] = 0.into()),
            vec!["num_attention_heads"],
        ),
        (
            "vision-patch-0",
            Box::new(|v| v["vision_config"]["patch_size"] = 0.into()),
            vec!["patch_size"],
        ),
        (
            "vision-heads-not-dividing",
            Box::new(|v| v["vision_config"]["num_attention_heads"] = 3.into()),
            vec!["hidden_size 64", "num_attention_heads 3"],
        ),
        (
            "text-heads-0",
            Box::new(|v| v["text_config"]["num_attention_heads"] = 0.into()),
            vec!["num_attention_heads"],
        ),
        (
            "text-layers-absurd",
            Box::new(|v| v["text_config"]["num_hidden_layers"] = 1_000_000_000u64.into()),
            vec!["num_hidden_layers", "at most 1024"],
        ),
        (
            "text-vocab-0",
            Box::new(|v| v["text_config"]["vocab_size"] = 0.into()),
            vec!["vocab_size"],
        ),
        (
            "text-eps-negative",
            Box::new(|v| v["text_config"]["rms_norm_eps"] = (-1.0).into()),
            vec!["rms_norm_eps"],
        ),
    ];
    for (name, edit, wants) in cases {
        let m = model_with(&t, name, edit);
        // plan reads configs alone; train loads the model
        for cmd in [
            strings(&["plan", "--model", &m]),
            strings(&[
                "train",
                "--model",
                &m,
                "--data",
                &t.path("data/conversation_train.json").display().to_string(),
                "--out",
                &t.path(&format!("run-{name}")).display().to_string(),
                "--quiet",
            ]),
        ] {
            let mut w = wants.clone();
            w.push("config.json");
            refused(&cmd, &w);
        }
    }
}

#[test]
fn gguf_metadata_and_offsets_that_cannot_be_are_named() {
    let t = TinyRun::new();
    let path = t.path("bad.gguf");
    let base = |heads: u32| {
        vec![
            ("general.architecture", GgufValue::Str("llama".into())),
            ("llama.embedding_length", GgufValue::U32(8)),
            ("llama.attention.head_count", GgufValue::U32(heads)),
            ("llama.feed_forward_length", GgufValue::U32(16)),
            ("llama.block_count", GgufValue::U32(1)),
            ("llama.vocab_size", GgufValue::U32(4)),
        ]
    };
    write_gguf(&path, &base(0), &[]);
    let p = path.display().to_string();
    refused(&strings(&["plan", "--model", &p]), &["head_count", "is 0"]);
    // a tensor whose data lies past the end of the file
    let tensor = GgufTensor {
        name: "token_embd.weight".into(),
        dims: vec![4, 8],
        ggml_type: GGML_F32,
        data: f32_bytes(&[0.0; 32]),
    };
    write_gguf(&path, &base(2), &[tensor]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 64);
    std::fs::write(&path, &bytes).unwrap();
    refused(
        &strings(&["generate", "--model", &p, "--prompt", "hi"]),
        &["bad.gguf"],
    );
}

#[test]
fn a_checkpoint_that_does_not_fit_the_run_is_refused() {
    let t = TinyRun::new();
    let data = t.path("data/conversation_train.json").display().to_string();
    let (ok, err) = t.train("a", &["--data", &data, "--steps", "4", "--save-every", "2"]);
    assert!(ok, "{err}");
    let ck = t.path("a/checkpoints/step-000002");
    let resume_args = |out: &str| {
        let mut a = strings(&[
            "train",
            "--model",
            &t.path("model").display().to_string(),
            "--data",
            &data,
            "--images",
            &t.path("data/images").display().to_string(),
            "--batch",
            "2",
            "--template",
            "chatml",
            "--max-length",
            "256",
            "--quiet",
            "--steps",
            "4",
            "--out",
            out,
            "--resume",
        ]);
        a.push(ck.display().to_string());
        a
    };
    let out = t.path("b").display().to_string();
    // a moment tensor of the wrong shape
    let opt = ck.join("optimizer.safetensors");
    let original = std::fs::read(&opt).unwrap();
    let mut moments = load_all(&opt);
    let name = moments.keys().find(|k| *k != "__t").unwrap().clone();
    moments.insert(
        name.clone(),
        candle_core::Tensor::zeros((2, 3), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
    );
    save_all(&moments, &opt);
    refused(
        &resume_args(&out),
        &["optimizer.safetensors", &name, "expected [2,"],
    );
    std::fs::write(&opt, &original).unwrap();
    // a tensor the run's method does not train
    let ad = ck.join("adapter.safetensors");
    let original = std::fs::read(&ad).unwrap();
    let mut tensors = load_all(&ad);
    tensors.insert(
        "language_model.model.layers.0.self_attn.q_proj.weight".into(),
        candle_core::Tensor::zeros(
            (128, 128),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    save_all(&tensors, &ad);
    refused(
        &resume_args(&out),
        &["q_proj.weight", "not trained by this run"],
    );
    std::fs::write(&ad, &original).unwrap();
    // a temporary directory of an interrupted write is never a checkpoint
    let tmp = t.path("a/checkpoints/.step-000004.tmp-1");
    copy_dir(&ck, &tmp);
    let mut a = resume_args(&out);
    *a.last_mut().unwrap() = tmp.display().to_string();
    refused(&a, &["not a checkpoint folder"]);
    // ... and resuming the run folder picks step 2, not the temporary copy
    let mut a = resume_args(&out);
    *a.last_mut().unwrap() = t.path("a").display().to_string();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(&a)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("step-000002"), "{err}");
}

#[test]
fn resume_checks_it_continues_the_same_run() {
    let t = TinyRun::new();
    let data = t.path("data/conversation_train.json").display().to_string();
    let (ok, err) = t.train("a", &["--data", &data, "--steps", "4", "--save-every", "2"]);
    assert!(ok, "{err}");
    let a = t.path("a").display().to_string();
    // another method: refused, naming the field
    let (ok, err) = t.train(
        "a",
        &[
            "--data",
            &data,
            "--steps",
            "4",
            "--resume",
            &a,
            "--method",
            "ln-simple",
        ],
    );
    assert!(
        !ok && err.contains("belongs to another run") && err.contains("`method`"),
        "{err}"
    );
    // another seed: refused
    let (ok, err) = t.train(
        "a",
        &[
            "--data", &data, "--steps", "4", "--resume", &a, "--seed", "5",
        ],
    );
    assert!(!ok && err.contains("`seed`"), "{err}");
    // more steps: allowed, and said
    let (ok, err) = t.train("a", &["--data", &data, "--steps", "6", "--resume", &a]);
    assert!(ok && err.contains("resume: `steps` was 4, now 6"), "{err}");
    assert_eq!(metrics(&t.path("a/metrics.jsonl")).len(), 6);
}

#[test]
fn a_fresh_run_does_not_mix_with_an_older_one() {
    let t = TinyRun::new();
    let data = t.path("data/conversation_train.json").display().to_string();
    let (ok, err) = t.train("a", &["--data", &data, "--steps", "4", "--save-every", "2"]);
    assert!(ok, "{err}");
    let (ok, err) = t.train("a", &["--data", &data, "--steps", "2"]);
    assert!(
        !ok && err.contains("holds a training run") && err.contains("--overwrite"),
        "{err}"
    );
    assert!(
        t.path("a/checkpoints/step-000002").is_dir(),
        "the old run is untouched"
    );
    let (ok, err) = t.train("a", &["--data", &data, "--steps", "2", "--overwrite"]);
    assert!(ok, "{err}");
    // the old run's checkpoints are gone with it; the new run's files are its own
    assert!(!t.path("a/checkpoints").exists());
    assert_eq!(metrics(&t.path("a/metrics.jsonl")).len(), 2);
}

#[test]
fn two_writers_of_one_folder_are_refused() {
    let t = TinyRun::new();
    let data = t.path("data/conversation_train.json").display().to_string();
    let out = t.path("a");
    std::fs::create_dir_all(&out).unwrap();
    // hold the folder's lock as a running lntune would, from another process
    let holder = std::process::Command::new("flock")
        .arg("-o")
        .arg(out.join(".lntune.lock"))
        .args(["sleep", "30"])
        .spawn();
    let Ok(mut holder) = holder else {
        eprintln!("skipped: the `flock` command is not available");
        return;
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (ok, err) = t.train("a", &["--data", &data, "--steps", "2"]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        !ok && err.contains("another lntune process is writing here"),
        "{err}"
    );
    assert!(
        !out.join("config.json").exists(),
        "the refused run wrote nothing"
    );
    // once the holder is gone, the folder is free again
    let (ok, err) = t.train("a", &["--data", &data, "--steps", "2"]);
    assert!(ok, "{err}");
}

#[test]
fn scorers_refuse_duplicate_and_missing_answers() {
    let t = TinyRun::new();
    let q = t.path("data/vqa_test_questions.json");
    let a = t.path("data/vqa_test_annotations.json");
    let questions: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&q).unwrap()).unwrap();
    let ids: Vec<u64> = questions["questions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["question_id"].as_u64().unwrap())
        .collect();
    let pred = t.path("pred.json");
    let write = |ids: &[u64]| {
        let rows: Vec<serde_json::Value> = ids
            .iter()
            .map(|i| serde_json::json!({"question_id": i, "answer": "red"}))
            .collect();
        std::fs::write(&pred, serde_json::to_string(&rows).unwrap()).unwrap();
    };
    let score = |extra: &[&str]| {
        let mut v = strings(&["score", "--bench", "vqav2", "--pred"]);
        v.push(pred.display().to_string());
        v.extend(strings(&["--questions", &q.display().to_string(), "--gt"]));
        v.push(a.display().to_string());
        v.extend(strings(extra));
        v
    };
    // every question answered: scores, and says so
    write(&ids);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(score(&[]))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains(&format!("{0} of {0} questions answered", ids.len())),
        "{out}"
    );
    // one answered twice
    let mut twice = ids.clone();
    twice.push(ids[0]);
    write(&twice);
    refused(&score(&[]), &["pred.json", "answered twice"]);
    refused(&score(&["--partial"]), &["answered twice"]);
    // some missing: refused, unless --partial, which prints the coverage
    write(&ids[..3]);
    refused(&score(&[]), &["answers 3 of", "--partial"]);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(score(&["--partial"]))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains(&format!("3 of {} questions answered", ids.len())),
        "{out}"
    );

    // MME: two questions per image, scored as a pair
    let mme = t.path("mme");
    std::fs::create_dir_all(&mme).unwrap();
    let mme_score = |extra: &[&str]| {
        let mut a = strings(&[
            "score",
            "--bench",
            "mme",
            "--pred",
            &mme.display().to_string(),
            "--out",
            &t.path("mme.json").display().to_string(),
        ]);
        a.extend(strings(extra));
        a
    };
    let pairs = "a.png\tIs there a dog?\tYes\tYes\na.png\tIs there a cat?\tNo\tNo\n\
                 b.png\tIs there a dog?\tYes\tNo\nb.png\tIs there a cat?\tNo\tNo\n";
    std::fs::write(mme.join("existence.txt"), pairs).unwrap();
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(mme_score(&[]))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // a line twice
    std::fs::write(
        mme.join("existence.txt"),
        format!("{pairs}a.png\tIs there a dog?\tYes\tNo\n"),
    )
    .unwrap();
    refused(&mme_score(&[]), &["existence.txt", "answered twice"]);
    refused(&mme_score(&["--partial"]), &["answered twice"]);
    // an image with one question: its pair is incomplete; --partial leaves it out
    std::fs::write(
        mme.join("existence.txt"),
        format!("{pairs}c.png\tIs there a dog?\tYes\tYes\n"),
    )
    .unwrap();
    refused(
        &mme_score(&[]),
        &["image `c.png` has 1 question", "--partial"],
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(mme_score(&["--partial"]))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && out.contains("2 images with both questions, 1 answers of incomplete pairs left out"),
        "{out}"
    );
    let full: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("mme.json")).unwrap()).unwrap();
    assert_eq!(full["mme"]["questions"], 4);
}

#[test]
fn data_cannot_point_outside_the_image_folder() {
    let t = TinyRun::new();
    // a training sample whose image climbs out of --images is skipped and counted
    let data = t.path("data/conversation_train.json");
    let mut samples: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    samples[0]["image"] = "../model/config.json".into();
    samples[1]["image"] = t
        .path("data/images/train_00001.png")
        .display()
        .to_string()
        .into();
    let bad = t.path("bad.json");
    std::fs::write(&bad, serde_json::to_string(&samples).unwrap()).unwrap();
    let (ok, err) = t.train("r", &["--data", &bad.display().to_string(), "--steps", "1"]);
    assert!(
        ok && err.contains("2 skipped (image path outside --images)"),
        "{err}"
    );
    // ... unless allowed (the absolute path then loads; the config.json is no image)
    let (_, err) = t.train(
        "r2",
        &[
            "--data",
            &bad.display().to_string(),
            "--steps",
            "1",
            "--allow-any-image-path",
        ],
    );
    assert!(!err.contains("outside --images"), "{err}");
    // a benchmark question whose image climbs out is an error naming the file and the place
    let pope = t.path("data/pope_test_random.jsonl");
    let text = std::fs::read_to_string(&pope).unwrap();
    let mut first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    first["image"] = "../../etc/passwd".into();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[0] = first.to_string();
    let evil = t.path("data/pope_evil.jsonl");
    std::fs::write(&evil, lines.join("\n")).unwrap();
    refused(
        &strings(&[
            "eval",
            "--model",
            &t.path("model").display().to_string(),
            "--bench",
            "pope",
            "--data",
            &evil.display().to_string(),
            "--images",
            &t.path("data/images").display().to_string(),
            "--out",
            &t.path("ev").display().to_string(),
        ]),
        &["pope_evil.jsonl", "line 1", "leaves the image folder"],
    );
}

#[test]
fn adapters_hold_finite_values_of_their_method_only() {
    let t = TinyRun::new();
    let data = t.path("data/conversation_train.json").display().to_string();
    let (ok, err) = t.train("a", &["--data", &data, "--steps", "1"]);
    assert!(ok, "{err}");
    let file = t.path("a/adapter/adapter.safetensors");
    let original = load_all(&file);
    let generate = || {
        strings(&[
            "generate",
            "--model",
            &t.path("model").display().to_string(),
            "--adapter",
            &t.path("a/adapter").display().to_string(),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ])
    };
    // a NaN in a stored tensor
    let mut tensors = original.clone();
    let name = "language_model.model.norm.weight".to_string();
    let n = tensors[&name].elem_count();
    let mut v = vec![1f32; n];
    v[3] = f32::NAN;
    tensors.insert(
        name.clone(),
        candle_core::Tensor::from_vec(v, n, &candle_core::Device::Cpu).unwrap(),
    );
    save_all(&tensors, &file);
    refused(&generate(), &["adapter.safetensors", &name, "finite"]);
    // a tensor the method (ln) does not train
    let mut tensors = original.clone();
    tensors.insert(
        "language_model.model.layers.0.mlp.up_proj.weight".into(),
        candle_core::Tensor::zeros(
            (256, 128),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    save_all(&tensors, &file);
    refused(
        &generate(),
        &["up_proj.weight", "not trained by the adapter's method `ln`"],
    );
    // a tensor of the method missing
    let mut tensors = original.clone();
    tensors.remove(&name);
    save_all(&tensors, &file);
    refused(&generate(), &["misses", &name]);
}

#[test]
fn an_eval_resume_checks_what_its_answers_depend_on() {
    let t = TinyRun::new();
    let data = t.path("data/conversation_train.json").display().to_string();
    let (ok, err) = t.train("a", &["--data", &data, "--steps", "1"]);
    assert!(ok, "{err}");
    let eval = || {
        strings(&[
            "eval",
            "--model",
            &t.path("model").display().to_string(),
            "--adapter",
            &t.path("a/adapter").display().to_string(),
            "--bench",
            "pope",
            "--data",
            &t.path("data/pope_test_random.jsonl").display().to_string(),
            "--images",
            &t.path("data/images").display().to_string(),
            "--out",
            &t.path("ev").display().to_string(),
            "--limit",
            "4",
            "--max-new-tokens",
            "2",
        ])
    };
    let run = |args: &[String]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (ok, err) = run(&eval());
    assert!(ok, "{err}");
    let (ok, err) = run(&eval());
    assert!(ok, "the same evaluation resumes: {err}");
    // the adapter retrained at the same path
    let (ok, err) = t.train("a", &["--data", &data, "--steps", "2", "--overwrite"]);
    assert!(ok, "{err}");
    refused(&eval(), &["eval.json", "`adapter_sha256`"]);
    // put the first adapter's evaluation aside; an image changed under the same name
    std::fs::rename(t.path("ev"), t.path("ev-old")).unwrap();
    let (ok, err) = run(&eval());
    assert!(ok, "{err}");
    // an image the evaluation asked about (the first prediction's)
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(t.path("ev/predictions.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let img = std::path::PathBuf::from(first["image"].as_str().unwrap());
    let mut bytes = std::fs::read(&img).unwrap();
    bytes.extend_from_slice(b"\0");
    std::fs::write(&img, bytes).unwrap();
    refused(&eval(), &["eval.json", "`items_digest`"]);
}

/// A sample with 100,000 rounds costs what its first `max_length` rounds cost: the rest
/// can never be kept, so it is dropped before rendering, and masking is linear. The
/// example equals the one made from the cut sample, and counts as truncated.
#[test]
fn many_turns_cost_what_fits() {
    use lntune::data::dataset::ExampleBuilder;
    use lntune::data::llava::{Sample, Turn};
    use lntune::data::template::{Template, TemplateName};
    let tokenizer = tiny_tokenizer();
    let template = Template::new(TemplateName::Chatml, Some(&tokenizer)).unwrap();
    let builder = ExampleBuilder {
        template: &template,
        tokenizer: &tokenizer,
        image_token_id: 511,
        tokens_per_image: 4,
        max_length: 64,
        image_root: None,
        allow_any_image_path: false,
        add_special: true,
    };
    let turn = |from: &str, value: &str| Turn {
        from: from.into(),
        value: value.into(),
    };
    let mut conv = Vec::new();
    for k in 0..100_000 {
        conv.push(turn(
            "human",
            if k == 0 { "what is red" } else { "and blue" },
        ));
        conv.push(turn("gpt", "a color"));
    }
    let sample = |conversations: Vec<Turn>| Sample {
        id: "long".into(),
        image: None,
        conversations,
    };
    let (long, report) = builder.examples(&[sample(conv.clone())]);
    let (cut, _) = builder.examples(&[sample(conv[..2 * 64].to_vec())]);
    assert_eq!(report.truncated, 1);
    assert_eq!(long[0].tokens.input_ids, cut[0].tokens.input_ids);
    assert_eq!(long[0].tokens.labels, cut[0].tokens.labels);
    assert_eq!(long[0].tokens.input_ids.len(), 64);
}

/// Prompts are held to the model's context (the tiny model's is 256 tokens): a prompt that
/// leaves no room is refused, a chat drops its oldest rounds to fit.
#[test]
fn prompts_fit_the_context() {
    let t = TinyRun::new();
    let model = t.path("model").display().to_string();
    let long = "red ".repeat(2000);
    refused(
        &strings(&["generate", "--model", &model, "--prompt", &long]),
        &["model's context of 256 tokens"],
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args(["chat", "--model", &model, "--max-new-tokens", "2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        for k in 0..40 {
            writeln!(
                stdin,
                "question number {k}: what color is the square in the picture"
            )
            .unwrap();
        }
        // one question that cannot fit at all: an error, and the chat goes on
        writeln!(stdin, "{long}").unwrap();
        writeln!(stdin, "/quit").unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("older round(s) dropped to fit the model's context"),
        "{err}"
    );
    assert!(err.contains("error: the prompt takes"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn an_image_size_is_bounded_by_the_models_context() {
    use lntune::data::image::ImageProcessing;
    let model = lntune::model::mllm::Mllm::load(
        &fixture("tiny-dinov2-llama"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let with = |size| ImageProcessing {
        processor: None,
        size: Some(size),
    };
    // context 128: 154 px = an 11x11 grid = 121 tokens fits, 168 px = 144 tokens does not
    assert!(with(154).preprocess(&model).is_ok());
    let err = with(168).preprocess(&model).unwrap_err().to_string();
    assert!(
        err.contains("--image-size 168") && err.contains("144 tokens") && err.contains("128"),
        "{err}"
    );
    let err = with(100_000).preprocess(&model).unwrap_err().to_string();
    assert!(err.contains("--image-size 100000"), "{err}");
    let err = with(5).preprocess(&model).unwrap_err().to_string();
    assert!(err.contains("smaller than one patch"), "{err}");
}

#[test]
fn inputs_that_are_not_regular_files_are_refused() {
    let t = TinyRun::new();
    let model = t.path("model").display().to_string();
    let images = t.path("data/images").display().to_string();
    let fifo = t.path("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    let mut inputs = vec!["/dev/zero".to_string()];
    if made {
        inputs.push(fifo.display().to_string());
    } else {
        eprintln!("note: no `mkfifo`; the FIFO case is not tried");
    }
    for input in &inputs {
        // a FIFO with no writer would block a read for ever; /dev/zero would fill memory
        refused(
            &strings(&[
                "train",
                "--model",
                &model,
                "--data",
                input,
                "--images",
                &images,
                "--out",
                &t.path("run").display().to_string(),
            ]),
            &[input, "not a regular file"],
        );
        refused(
            &strings(&[
                "generate", "--model", &model, "--image", input, "--prompt", "hi",
            ]),
            &[input, "not a regular file"],
        );
        refused(
            &strings(&["plan", "--model", input]),
            &[input, "not a regular file"],
        );
    }
}
