//! `lntune compare` and `lntune analyze` end to end on the tiny model: report structure,
//! finite numbers, resume of an interrupted comparison, gradient statistics in training.

use std::path::Path;

use crate::common::*;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn numbers(v: &serde_json::Value, at: &str, out: &mut Vec<(String, f64)>) {
    match v {
        serde_json::Value::Number(n) => out.push((at.to_string(), n.as_f64().unwrap())),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| numbers(x, &format!("{at}[{i}]"), out)),
        serde_json::Value::Object(o) => o
            .iter()
            .for_each(|(k, x)| numbers(x, &format!("{at}.{k}"), out)),
        _ => {}
    }
}

fn find_nulls(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Null => out.push(at.to_string()),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| find_nulls(x, &format!("{at}[{i}]"), out)),
        serde_json::Value::Object(o) => o
            .iter()
            .for_each(|(k, x)| find_nulls(x, &format!("{at}.{k}"), out)),
        _ => {}
    }
}

fn compare_args(t: &TinyRun, out: &str) -> Vec<String> {
    let mut a = s(&["compare", "--model"]);
    a.push(p(&t.path("model")));
    a.extend(s(&["--data"]));
    a.push(format!(
        "{},{}",
        p(&t.path("data/conversation_train.json")),
        p(&t.path("data/captions_train.json"))
    ));
    a.extend(s(&["--images"]));
    a.push(p(&t.path("data/images")));
    a.extend(s(&[
        // a small rank (the paper's 64 is the tiny model's whole key/value width)
        "--lora-r",
        "8",
        "--methods",
        "ln,lora",
        "--steps",
        "4",
        "--batch",
        "2",
        "--grad-accum",
        "2",
        "--max-length",
        "256",
        "--template",
        "chatml",
    ]));
    a.extend(s(&["--bench", "shapes", "--eval-data"]));
    a.push(p(&t.path("data")));
    a.extend(s(&[
        "--eval-limit",
        "2",
        "--similarity-samples",
        "4",
        "--quiet",
        "--out",
    ]));
    a.push(p(&t.path(out)));
    a
}

#[test]
fn compare_report_is_complete_finite_and_resumable() {
    let t = TinyRun::new();
    let mut args = compare_args(&t, "cmp");
    args.extend(s(&[
        // embeddings and head frozen: the `ln` method arm is the connector ablation's
        // "ln + connector" arm, trained once
        "--freeze-embed-head",
        "--ablation",
        "connector",
        "--ablation",
        "data-type",
        "--data-type-samples",
        "6",
        "--data-types",
    ]));
    args.push(format!(
        "conversation={},reasoning={}",
        p(&t.path("data/conversation_train.json")),
        p(&t.path("data/reasoning_train.json"))
    ));
    let (ok, out, err) = lntune(&args);
    assert!(ok, "{err}");
    assert!(
        out.contains("## Quality") && out.contains("## Cost"),
        "{out}"
    );
    let dir = t.path("cmp");
    for f in [
        "report.md",
        "report.json",
        "loss_curves.png",
        "score_vs_trainable.png",
        "score_vs_memory.png",
        "paired_vs_ln.png",
        "ablation_connector.png",
        "ablation_data_type.png",
        "analysis/gradvar/gradvar_steps.png",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let names: Vec<&str> = r["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ln", "lora"]);
    for m in r["methods"].as_array().unwrap() {
        let sm = &m["summary"];
        assert_eq!(sm["steps"], 4);
        assert!(
            sm["trainable_params"].as_u64().unwrap() > 0
                && sm["peak_rss_mib"].as_f64().unwrap() > 10.0
        );
        assert_eq!(m["loss_curve"].as_array().unwrap().len(), 4);
        let sc = &m["scores"];
        assert!(
            sc["vqav2"]["overall"].is_number()
                && sc["mme"]["perception"].is_number()
                && sc["captions"]["cider"].is_number()
        );
    }
    // lora against ln on the same questions, per benchmark kind
    let paired = r["paired"].as_array().unwrap();
    assert!(!paired.is_empty());
    for c in paired {
        assert_eq!(c["method"], "lora");
        let (d, lo, hi) = (
            c["diff"].as_f64().unwrap(),
            c["ci95"][0].as_f64().unwrap(),
            c["ci95"][1].as_f64().unwrap(),
        );
        assert!(lo <= d && d <= hi, "{c}");
        let want = c["other"].as_f64().unwrap() - c["reference"].as_f64().unwrap();
        assert!((d - want).abs() < 1e-9, "{c}");
        assert!(c["questions"].as_u64().unwrap() > 0);
        if c["bench"] != "vqav2" {
            assert!(
                (0.0..=1.0).contains(&c["mcnemar_p"].as_f64().unwrap()),
                "{c}"
            );
        }
    }
    assert!(out.contains("Paired against ln"), "{out}");
    assert_eq!(r["connector"].as_array().unwrap().len(), 3);
    assert!(
        !dir.join("runs/connector/ln___connector").exists()
            && dir.join("runs/connector/ln_only").is_dir(),
        "ln + connector reuses the ln method arm"
    );
    assert_eq!(r["connector"][0]["name"], "ln + connector");
    assert_eq!(
        r["connector"][0]["loss_curve"],
        r["methods"][0]["loss_curve"]
    );
    let dt: Vec<&str> = r["data_type"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(dt, ["conversation", "reasoning", "mixed"]);
    // the connector arms train what they say
    let trainable: Vec<u64> = r["connector"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["summary"]["trainable_params"].as_u64().unwrap())
        .collect();
    assert_eq!(
        trainable[0],
        trainable[1] + trainable[2],
        "ln + connector = ln only + connector only"
    );
    // analyses: stage model + both methods; gradient variance across micro-batches exists
    let sim = r["similarity"]["models"].as_array().unwrap();
    assert_eq!(sim.len(), 3);
    // each model's per-sample similarities (the claims' paired interval) average to its value
    for m in sim {
        let ps: Vec<f64> = m[1]["per_sample_all_pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(ps.len(), 4, "{m}");
        let mean = ps.iter().sum::<f64>() / 4.0;
        assert!(
            (mean - m[1]["all_pairs"].as_f64().unwrap()).abs() < 1e-9,
            "{m}"
        );
    }
    // the ablations' ranked pairs, on the same questions, the better-ranked arm as reference
    let pairs: Vec<(String, String, String)> = r["ablation_paired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["reference_arm"].as_str().unwrap().to_string(),
                p["method"].as_str().unwrap().to_string(),
                p["bench"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (better, worse) in [
        ("ln + connector", "ln only"),
        ("ln only", "connector only"),
        ("conversation", "reasoning"),
    ] {
        for bench in ["mme", "pope", "vqav2"] {
            assert!(
                pairs.contains(&(better.into(), worse.into(), bench.into())),
                "{better} vs {worse} on {bench}: {pairs:?}"
            );
        }
    }
    // the paper's claims: one row per benchmark for ln against lora, one per ranked pair,
    // the parameter count and memory; each verdict follows its rule from the numbers shown
    let claims = r["claims"].as_array().unwrap();
    let claim = |text: &str| {
        claims
            .iter()
            .find(|c| c["claim"] == text)
            .unwrap_or_else(|| panic!("no claim `{text}`: {claims:?}"))
    };
    for bench in ["mme", "pope", "vqav2"] {
        let c = claim(&format!("{bench}: ln beats lora"));
        let row = r["paired"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["method"] == "lora" && p["bench"] == bench)
            .unwrap();
        // the claim reads ln − lora: the paired row's interval of lora − ln, reversed
        let (lo, hi) = (
            -row["ci95"][1].as_f64().unwrap(),
            -row["ci95"][0].as_f64().unwrap(),
        );
        // (a benchmark an arm answers with a constant decides nothing, and says so)
        let expect = if c["evidence"]
            .as_str()
            .unwrap()
            .contains("the benchmark does not measure it")
        {
            "inconclusive"
        } else if lo > 0.0 {
            "reproduced"
        } else if hi < 0.0 {
            "not_reproduced"
        } else {
            "inconclusive"
        };
        assert_eq!(c["verdict"], expect, "{c}");
        claim(&format!("{bench}: ln + connector beats ln only"));
        claim(&format!("{bench}: conversation beats reasoning"));
    }
    let fewer = claim("ln trains fewer parameters than lora");
    let params = |m: &str| {
        r["methods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == m)
            .unwrap()["summary"]["trainable_params"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        fewer["verdict"],
        if params("ln") < params("lora") {
            "reproduced"
        } else {
            "not_reproduced"
        }
    );
    claim("ln needs less memory than lora");
    assert!(
        out.contains("## The paper's claims") && out.contains("| verdict |"),
        "{out}"
    );
    for g in r["gradvar"].as_array().unwrap() {
        assert!(g["mean_microbatch_var"].as_f64().unwrap() > 0.0, "{g}");
    }
    // every number is finite (NaN would have been written as null)
    let mut nums = Vec::new();
    numbers(&r, "report", &mut nums);
    assert!(nums.len() > 100);
    for (at, x) in &nums {
        assert!(x.is_finite(), "{at} = {x}");
    }
    // the only nulls allowed: POPE precision and F1 when nothing was predicted "yes" (0/0)
    let mut nulls = Vec::new();
    find_nulls(&r, "report", &mut nulls);
    for at in &nulls {
        assert!(
            at.contains(".pope.") && (at.ends_with(".precision") || at.ends_with(".f1")),
            "null at {at}"
        );
    }

    // interrupted: the lora arm lost its summary and scores (as if killed), the ablations are
    // finished; a rerun redoes only that arm and gives the same tables
    std::fs::remove_file(dir.join("runs/methods/lora/summary.json")).unwrap();
    std::fs::remove_dir_all(dir.join("runs/methods/lora/eval")).unwrap();
    let mut again = compare_args(&t, "cmp");
    again.extend_from_slice(&args[compare_args(&t, "cmp").len()..]);
    let (ok, _, err) = lntune(&again);
    assert!(ok, "{err}");
    assert!(
        err.contains("done train lora") && err.contains("skip (already done) train ln"),
        "{err}"
    );
    assert!(
        err.contains("skip (already done) train connector/ln only"),
        "{err}"
    );
    let r2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    for (a, b) in r["methods"]
        .as_array()
        .unwrap()
        .iter()
        .zip(r2["methods"].as_array().unwrap())
    {
        assert_eq!(a["scores"], b["scores"], "{}", a["name"]);
        assert_eq!(a["loss_curve"], b["loss_curve"], "{}", a["name"]);
    }
    // the wall time counts both invocations
    assert_eq!(r["invocations"], 1);
    assert_eq!(r2["invocations"], 2);
    let w1 = r["wall_s"].as_f64().unwrap();
    let w2 = r2["wall_s"].as_f64().unwrap();
    assert!(w1 > 0.0 && w2 > w1, "{w1} {w2}");

    // carried to another machine without its adapters (the full-finetuning ones are model
    // sized): a rerun trains nothing, and the report, layer similarity included, is the same
    for table in ["methods", "connector", "data-type"] {
        for e in std::fs::read_dir(dir.join("runs").join(table)).unwrap() {
            let a = e.unwrap().path().join("adapter");
            if a.is_dir() {
                std::fs::remove_dir_all(&a).unwrap();
            }
        }
    }
    let (ok, _, err) = lntune(&again);
    assert!(ok, "{err}");
    assert!(!err.contains("done train"), "nothing retrained: {err}");
    let r3: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(r3["similarity"], r2["similarity"]);
    assert_eq!(r3["methods"], r2["methods"]);
    assert_eq!(r3["paired"], r2["paired"]);
}

#[test]
fn compare_lr_sweep_keeps_the_lowest_validation_loss() {
    let t = TinyRun::new();
    let mut args = compare_args(&t, "sw");
    args.extend(s(&[
        "--lr-sweep",
        "--sweep-factors",
        "0.1,10",
        "--val-samples",
        "6",
        "--no-analysis",
        "--ablation",
        "connector",
    ]));
    // one method is enough here
    let i = args.iter().position(|a| a == "ln,lora").unwrap();
    args[i] = "ln".into();
    let (ok, out, err) = lntune(&args);
    assert!(ok, "{err}");
    assert!(out.contains("Learning-rate sweep"), "{out}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("sw/report.json")).unwrap()).unwrap();
    let sweep = r["lr_sweep"].as_array().unwrap();
    assert_eq!(sweep.len(), 2);
    let best = sweep
        .iter()
        .min_by(|a, b| {
            a["summary"]["val_loss"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["summary"]["val_loss"].as_f64().unwrap())
        })
        .unwrap();
    assert_eq!(r["methods"][0]["lr"], best["lr"]);
    assert!(t.path("sw/data/val.json").is_file());
    // the ablation's LN arms train at the rate the sweep chose for ln
    for arm in r["connector"].as_array().unwrap() {
        if arm["name"] != "connector only" {
            assert_eq!(arm["lr"], best["lr"], "{}", arm["name"]);
        }
    }
}

#[test]
fn train_logs_gradient_statistics_and_analyze_reads_them() {
    let t = TinyRun::new();
    let data = p(&t.path("data/conversation_train.json"));
    let train_ln = |out: &str, extra: &[&str]| {
        let base = ["--data", &data, "--method", "ln", "--steps", "6"];
        let (ok, err) = t.train(out, &[&base[..], &["--grad-accum", "3"], extra].concat());
        assert!(ok, "{err}");
    };
    train_ln(
        "g",
        &[
            "--log-grad-stats",
            "--grad-stats-window",
            "3",
            "--grad-stats-subset",
            "projector",
        ],
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(t.path("g/grad_stats.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert!(
        lines
            .iter()
            .all(|l| l["microbatch_var"].as_f64().unwrap() > 0.0 && l["subset"] == "projector")
    );
    let windows: Vec<u64> = lines
        .iter()
        .filter(|l| l["window_var"].is_number())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(windows, [3, 6]);
    // a run resumed in its own folder from its step-3 checkpoint logs steps 4-6 once, as
    // the uninterrupted run did (they were once kept twice)
    train_ln(
        "gr",
        &[
            "--log-grad-stats",
            "--grad-stats-window",
            "3",
            "--grad-stats-subset",
            "projector",
            "--save-every",
            "3",
        ],
    );
    let ck = p(&t.path("gr/checkpoints/step-000003"));
    train_ln(
        "gr",
        &[
            "--log-grad-stats",
            "--grad-stats-window",
            "3",
            "--grad-stats-subset",
            "projector",
            "--save-every",
            "3",
            "--resume",
            &ck,
        ],
    );
    let resumed: Vec<serde_json::Value> = std::fs::read_to_string(t.path("gr/grad_stats.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = resumed
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        resumed, lines,
        "the resumed log equals the uninterrupted one"
    );
    // the statistics only observe: the same run without them has the same loss curve (so
    // `compare` may reuse a method arm trained with them)
    train_ln("g-plain", &[]);
    let losses = |run: &str| -> Vec<f64> {
        metrics(&t.path(&format!("{run}/metrics.jsonl")))
            .iter()
            .map(|m| m["loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses("g"), losses("g-plain"));
    let (ok, out, err) = lntune(
        &[
            s(&["analyze", "gradvar", "--run"]),
            vec![
                format!("ln={}", p(&t.path("g"))),
                "--out".into(),
                p(&t.path("gv")),
            ],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert!(out.contains("| ln | projector |"), "{out}");
    assert!(t.path("gv/gradvar_microbatch.png").is_file());
    // a subset the method does not train is refused clearly
    let (ok, err) = t.train(
        "g2",
        &[
            "--data",
            &data,
            "--method",
            "ln-simple",
            "--steps",
            "1",
            "--log-grad-stats",
            "--grad-stats-subset",
            "projector",
        ],
    );
    assert!(
        !ok && err.contains("no trainable tensor of this method matches"),
        "{err}"
    );
    // analyze without stats names the file
    let (ok, _, err) = lntune(
        &[
            s(&["analyze", "gradvar", "--run"]),
            vec![p(&t.path("data")), "--out".into(), p(&t.path("gv2"))],
        ]
        .concat(),
    );
    assert!(
        !ok && err.contains("grad_stats.jsonl: cannot read"),
        "{err}"
    );
}

#[test]
fn analyze_similarity_writes_tables_and_heatmaps() {
    let t = TinyRun::new();
    let data = p(&t.path("data/conversation_train.json"));
    let (ok, err) = t.train(
        "a",
        &[
            "--data", &data, "--method", "ln", "--steps", "2", "--lr", "1e-1",
        ],
    );
    assert!(ok, "{err}");
    let args = [
        s(&["analyze", "similarity", "--model"]),
        vec![
            p(&t.path("model")),
            "--adapter".into(),
            format!("tuned={}", p(&t.path("a/adapter"))),
            "--data".into(),
            data,
            "--images".into(),
            p(&t.path("data/images")),
        ],
        s(&[
            "--samples",
            "3",
            "--template",
            "chatml",
            "--max-length",
            "256",
            "--out",
        ]),
        vec![p(&t.path("sim"))],
    ]
    .concat();
    let (ok, out, err) = lntune(&args);
    assert!(ok, "{err}");
    assert!(
        out.contains("| base |") && out.contains("| tuned |"),
        "{out}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("sim/similarity.json")).unwrap())
            .unwrap();
    let models = r["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    for m in models {
        let s = &m[1];
        let mat = s["matrix"].as_array().unwrap();
        assert_eq!(mat.len(), 4, "tiny-llava has 4 decoder layers");
        assert!((mat[0][0].as_f64().unwrap() - 1.0).abs() < 1e-9);
        let v = s["all_pairs"].as_f64().unwrap();
        assert!(v > -1.0 && v < 1.0);
    }
    assert_ne!(
        models[0][1]["all_pairs"], models[1][1]["all_pairs"],
        "the adapter changes the hidden states"
    );
    assert!(
        t.path("sim/similarity_base.png").is_file() && t.path("sim/similarity_tuned.png").is_file()
    );
}

/// `--seeds 0,1`: each method's chosen arm trained again at seed 1 (its own run folder and
/// loss curve), mean ± sd across seeds in the report, ln paired with each method per seed
/// and on the per-question means over seeds.
#[test]
fn compare_trains_every_method_at_every_seed() {
    let t = TinyRun::new();
    // a second benchmark: the shapes POPE questions in POPE's own file layout
    let pope = t.path("pope");
    std::fs::create_dir_all(&pope).unwrap();
    std::fs::copy(
        t.path("data/pope_test_random.jsonl"),
        pope.join("coco_pope_random.json"),
    )
    .unwrap();
    for e in std::fs::read_dir(t.path("data/images")).unwrap() {
        let f = e.unwrap().path();
        if f.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("test_")
        {
            std::fs::copy(&f, pope.join(f.file_name().unwrap())).unwrap();
        }
    }
    let mut args = compare_args(&t, "seeds");
    args.extend(s(&["--seeds", "0,1", "--no-analysis", "--also-eval"]));
    args.push(format!("pope={}", p(&pope)));
    let (ok, out, err) = lntune(&args);
    assert!(ok, "{err}");
    assert!(out.contains("Across seeds"), "{out}");
    let dir = t.path("seeds");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let seed_runs = r["seed_runs"].as_array().unwrap();
    let names: Vec<&str> = seed_runs
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ln/seed-1", "lora/seed-1"]);
    for (m, x) in r["methods"].as_array().unwrap().iter().zip(seed_runs) {
        assert_eq!(m["method"], x["method"]);
        assert!(x["scores"].is_object(), "each seed is evaluated");
        assert_ne!(
            m["loss_curve"], x["loss_curve"],
            "another seed, another run"
        );
    }
    // the second benchmark: scored for every arm and seed, paired against ln, in the tables
    for x in r["methods"].as_array().unwrap().iter().chain(seed_runs) {
        assert!(
            x["more_scores"]["pope"]["pope"]["random"]["accuracy"].is_number(),
            "{x}"
        );
    }
    assert!(out.contains("pope: POPE acc"), "{out}");
    assert!(dir.join("runs/methods/ln/eval-pope/scores.json").is_file());
    // every arm trained and evaluated from one store of image features
    let stores: Vec<_> = std::fs::read_dir(dir.join("features")).unwrap().collect();
    assert_eq!(stores.len(), 1, "one tower, one preprocessing: one store");
    let paired = r["paired"].as_array().unwrap();
    assert!(
        paired.iter().any(|c| c["bench"] == "pope/pope"),
        "{paired:?}"
    );
    let seeds: std::collections::BTreeSet<String> = paired
        .iter()
        .map(|c| {
            c.get("seed")
                .map(|s| s.to_string())
                .unwrap_or("mean".into())
        })
        .collect();
    assert_eq!(seeds.into_iter().collect::<Vec<_>>(), ["0", "1", "mean"]);
    // a LoRA rank above the tiny model's 64-wide key/value projections: refused before any
    // arm runs
    let mut wide = compare_args(&t, "wide");
    let at = wide.iter().position(|a| a == "--lora-r").unwrap();
    wide[at + 1] = "128".into();
    let (ok, _, err) = lntune(&wide);
    assert!(
        !ok && err.contains("--methods lora") && err.contains("at most"),
        "{err}"
    );
    assert!(!t.path("wide/runs").exists());
    // a given seed twice is refused by name
    let mut twice = compare_args(&t, "twice");
    twice.extend(s(&["--seeds", "1,1"]));
    let (ok, _, err) = lntune(&twice);
    assert!(!ok && err.contains("--seeds"), "{err}");
}

/// The disk store of image features (`compare` points all its arms at one): a second cache
/// reads what the first wrote, and different preprocessing is a different store.
#[test]
fn feature_store_is_shared_and_keyed_by_what_features_depend_on() {
    use lntune::data::features::FeatureCache;
    use lntune::data::image::ImageProcessing;
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, data) = workspace(tmp.path());
    let mut m = lntune::model::mllm::Mllm::load(
        &model_dir,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let fp = lntune::methods::adapter::fingerprint(&mut m).unwrap();
    let pre = ImageProcessing::default().preprocess(&m).unwrap();
    let mut imgs: Vec<std::path::PathBuf> = std::fs::read_dir(data.join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    imgs.sort();
    imgs.truncate(3);
    let root = tmp.path().join("features");
    let mut a = FeatureCache::new(true);
    a.attach_disk(&root, &m, &pre, &fp).unwrap();
    let fa = a
        .for_paths(&m, &imgs, &pre, &candle_core::Device::Cpu, false)
        .unwrap();
    let dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1);
    assert_eq!(
        std::fs::read_dir(&dirs[0]).unwrap().count(),
        3,
        "one file per image"
    );
    // what a second process finds is what it uses: mark the first image's file
    let sha = lntune::util::files::sha256_file(&imgs[0]).unwrap();
    let marked = (fa[0].zeros_like().unwrap() + 7.0).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("features".to_string(), marked.clone())]),
        dirs[0].join(format!("{sha}.safetensors")),
    )
    .unwrap();
    let mut b = FeatureCache::new(true);
    b.attach_disk(&root, &m, &pre, &fp).unwrap();
    let fb = b
        .for_paths(&m, &imgs, &pre, &candle_core::Device::Cpu, false)
        .unwrap();
    assert_eq!(max_abs(&fb[0], &marked), 0.0, "read from the store");
    assert_eq!(max_abs(&fb[1], &fa[1]), 0.0);
    // other normalization: another store, computed afresh
    let mut pre2 = pre.clone();
    pre2.mean = [0.0, 0.0, 0.0];
    let mut c = FeatureCache::new(true);
    c.attach_disk(&root, &m, &pre2, &fp).unwrap();
    let fc = c
        .for_paths(&m, &imgs, &pre2, &candle_core::Device::Cpu, false)
        .unwrap();
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 2);
    assert!(max_abs(&fc[0], &marked) > 1.0);
}

#[test]
fn data_type_ablation_at_equal_token_budgets() {
    let t = TinyRun::new();
    let mut args = compare_args(&t, "cmp");
    let at = args.iter().position(|a| a == "ln,lora").unwrap();
    args[at] = "ln".into();
    args.extend(s(&[
        "--no-analysis",
        "--ablation",
        "data-type",
        "--data-type-tokens",
        "60",
        "--data-type-epochs",
        "2",
        "--data-types",
    ]));
    let kinds = ["conversation", "detail"];
    args.push(
        kinds
            .iter()
            .map(|k| format!("{k}={}", p(&t.path(&format!("data/{k}_train.json")))))
            .collect::<Vec<_>>()
            .join(","),
    );
    let (ok, out, err) = lntune(&args);
    assert!(ok, "{err}");
    assert!(out.contains("equal token budgets"), "{out}");
    let dir = t.path("cmp");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let budgets = r["data_type_budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 3);
    let ids = |f: &Path| -> Vec<String> {
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        v.iter().map(|x| x["id"].to_string()).collect()
    };
    for b in budgets {
        let name = b["name"].as_str().unwrap();
        let samples = b["samples"].as_u64().unwrap() as usize;
        let tokens = b["tokens"].as_u64().unwrap();
        let (files, want): (Vec<String>, u64) = if name == "mixed" {
            (kinds.iter().map(|k| format!("mixed-{k}")).collect(), 60)
        } else {
            (vec![name.to_string()], 60)
        };
        assert!(tokens >= want, "{name}: {tokens} tokens");
        // every subset is drawn from its kind's file, and holds `samples` samples
        let mut n = 0;
        for f in &files {
            let kind = f.trim_start_matches("mixed-");
            let got = ids(&dir.join(format!("data/data-type/{f}.json")));
            let all = ids(&t.path(&format!("data/{kind}_train.json")));
            assert!(got.iter().all(|i| all.contains(i)), "{f}");
            n += got.len();
        }
        assert_eq!(n, samples, "{name}");
        // two epochs of batch 2 x 2, whatever --steps says
        let arm = r["data_type"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap();
        assert_eq!(
            arm["summary"]["steps"].as_u64().unwrap() as usize,
            (2 * samples).div_ceil(4),
            "{name}"
        );
    }
    // a budget no kind can fill is refused by name before any arm trains
    let mut big = args.clone();
    let at = big.iter().position(|a| a == "60").unwrap();
    big[at] = "100000000".into();
    let out = big.iter().position(|a| a == "--out").unwrap();
    big[out + 1] = p(&t.path("cmp2"));
    let (ok, _, err) = lntune(&big);
    assert!(!ok);
    assert!(
        err.contains("--data-type-tokens 100000000") && err.contains("conversation_train.json"),
        "{err}"
    );
    assert!(!t.path("cmp2/runs").exists());
}
