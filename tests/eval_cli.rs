//! `lntune eval`, `lntune score`, `generate` and `chat` end to end on the tiny model:
//! benchmark files in their official formats, resumable predictions, scoring of the official
//! result files, protocols, and clear errors for malformed files.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::*;

/// Tiny model + a stage-2 LoRA adapter (so that base + adapter differs from base).
fn tiny_with_adapter() -> TinyRun {
    let t = TinyRun::new();
    let data = p(&t.path("data/conversation_train.json"));
    let (ok, err) = t.train(
        "run",
        &[
            "--data", &data, "--method", "lora", "--steps", "2", "--lr", "1e-2",
        ],
    );
    assert!(ok, "{err}");
    t
}

fn eval_shapes(t: &TinyRun, out: &str, extra: &[&str]) -> (bool, String, String) {
    let o = t.eval_command(out, extra).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

fn all_finite(v: &serde_json::Value, at: &str) {
    match v {
        serde_json::Value::Number(n) => assert!(n.as_f64().unwrap().is_finite(), "{at}"),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| all_finite(x, &format!("{at}[{i}]"))),
        serde_json::Value::Object(o) => o
            .iter()
            .for_each(|(k, x)| all_finite(x, &format!("{at}.{k}"))),
        _ => {}
    }
}

#[test]
fn eval_resume_and_official_result_files() {
    let t = tiny_with_adapter();
    let (ok, out, err) = eval_shapes(&t, "ev", &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("VQAv2 accuracy")
            && out.contains("POPE")
            && out.contains("MME")
            && out.contains("CIDEr"),
        "{out}"
    );
    let scores = json(&t.path("ev/scores.json"));
    // 5 VQA + 3×5 POPE + 5 MME (pairs kept whole: up to 6) + 5 captions
    let preds = std::fs::read_to_string(t.path("ev/predictions.jsonl")).unwrap();
    let n = preds.lines().count();
    assert!((30..=31).contains(&n), "{n} predictions");
    assert_eq!(scores["vqav2"]["questions"], 5);
    assert_eq!(scores["captions"]["images"], 5);
    for split in ["random", "popular", "adversarial"] {
        let m = &scores["pope"][split];
        assert_eq!(
            m["tp"].as_u64().unwrap()
                + m["fp"].as_u64().unwrap()
                + m["tn"].as_u64().unwrap()
                + m["fn_"].as_u64().unwrap(),
            5
        );
    }
    // precision is NaN (null) when nothing is predicted yes; everything else is finite
    let mut s = scores.clone();
    s["pope"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .for_each(|m| {
            for k in ["precision", "f1"] {
                if m[k].is_null() {
                    m[k] = 0.into();
                }
            }
        });
    all_finite(&s, "scores");

    // interrupted run: 11 whole lines and half of the 12th survive; the rerun answers the rest
    let lines: Vec<&str> = preds.lines().collect();
    let mut cut = lines[..11].join("\n");
    cut.push('\n');
    cut.push_str(&lines[11][..lines[11].len() / 2]);
    std::fs::write(t.path("ev/predictions.jsonl"), cut).unwrap();
    std::fs::remove_file(t.path("ev/scores.json")).unwrap();
    let (ok, out2, err) = eval_shapes(&t, "ev", &[]);
    assert!(ok, "{err}");
    assert!(
        out2.contains(&format!(
            "({} answered now, 11 from an earlier run)",
            n - 11
        )),
        "{out2}"
    );
    assert_eq!(json(&t.path("ev/scores.json")), scores);
    assert_eq!(
        std::fs::read_to_string(t.path("ev/predictions.jsonl"))
            .unwrap()
            .lines()
            .count(),
        n
    );
    // a finished run answers nothing new
    let (ok, out3, _) = eval_shapes(&t, "ev", &[]);
    assert!(ok && out3.contains("(0 answered now"), "{out3}");
    // another setup into the same folder is refused
    let (ok, _, err) = eval_shapes(&t, "ev", &["--protocol", "authors"]);
    assert!(
        !ok && err.contains("eval.json") && err.contains("protocol"),
        "{err}"
    );

    // `lntune score` on the official result files gives the same numbers
    let data = t.path("data");
    let res = t.path("ev/results");
    let sc = |args: &[&str], name: &str| -> serde_json::Value {
        let out = p(&t.path(name));
        // the evaluation answered a --limit subset: a partial set of each file's questions
        let mut a = vec!["score", "--partial", "--out", out.as_str()];
        a.extend_from_slice(args);
        let (ok, stdout, err) = lntune(&a);
        assert!(ok, "{err}");
        assert!(!stdout.is_empty());
        json(&t.path(name))
    };
    let v = sc(
        &[
            "--bench",
            "vqav2",
            "--pred",
            &p(&res.join("vqav2_results.json")),
            "--questions",
            &p(&data.join("vqa_test_questions.json")),
            "--gt",
            &p(&data.join("vqa_test_annotations.json")),
        ],
        "s_vqa.json",
    );
    assert_eq!(v["vqav2"], scores["vqav2"]);
    for split in ["random", "popular", "adversarial"] {
        let v = sc(
            &[
                "--bench",
                "pope",
                "--pred",
                &p(&res.join(format!("pope_{split}_answers.jsonl"))),
                "--gt",
                &p(&data.join(format!("pope_test_{split}.jsonl"))),
            ],
            "s_pope.json",
        );
        assert_eq!(v["pope"][split], scores["pope"][split]);
    }
    let v = sc(
        &["--bench", "mme", "--pred", &p(&res.join("mme_results"))],
        "s_mme.json",
    );
    assert_eq!(v["mme"], scores["mme"]);
    let v = sc(
        &[
            "--bench",
            "coco",
            "--pred",
            &p(&res.join("captions_results.json")),
            "--gt",
            &p(&data.join("captions_test.json")),
        ],
        "s_cap.json",
    );
    assert_eq!(v["captions"], scores["captions"]);
}

#[test]
fn a_part_limit_overrides_the_limit_for_its_part_only() {
    let t = tiny_with_adapter();
    let (ok, _, err) = eval_shapes(
        &t,
        "ev_parts",
        &["--limit-of", "pope=2", "--limit-of", "captions=3"],
    );
    assert!(ok, "{err}");
    let scores = json(&t.path("ev_parts/scores.json"));
    assert_eq!(scores["vqav2"]["questions"], 5);
    assert_eq!(scores["captions"]["images"], 3);
    for split in ["random", "popular", "adversarial"] {
        let m = &scores["pope"][split];
        let n: u64 = ["tp", "fp", "tn", "fn_"]
            .iter()
            .map(|k| m[*k].as_u64().unwrap())
            .sum();
        assert_eq!(n, 2, "{split}");
    }
    // the part limits are part of what the folder's answers are: another set is refused
    let (ok, _, err) = eval_shapes(&t, "ev_parts", &["--limit-of", "pope=2"]);
    assert!(!ok && err.contains("part_limits"), "{err}");
    for (bad, says) in [
        ("vision=3", "unknown part \"vision\""),
        ("pope=0", "positive integer"),
        ("pope", "expected PART=N"),
    ] {
        let (ok, _, err) = eval_shapes(&t, "ev_bad", &["--limit-of", bad]);
        assert!(
            !ok && err.contains("--limit-of") && err.contains(says),
            "{bad}: {err}"
        );
    }
}

/// The shapes test files rewritten in the other benchmarks' layouts: VQAv2 with image ids
/// and COCO file names, POPE's coco_pope_* files, MME's release folder, a Karpathy JSON.
fn official_layouts(t: &TinyRun) -> std::path::PathBuf {
    let data = t.path("data");
    let root = t.path("bench");
    let images = root.join("val2014");
    std::fs::create_dir_all(&images).unwrap();
    let q = json(&data.join("vqa_test_questions.json"));
    let mut questions = Vec::new();
    for row in q["questions"].as_array().unwrap() {
        let name = row["image"].as_str().unwrap();
        let id: u64 = name
            .trim_start_matches("test_")
            .trim_end_matches(".png")
            .parse()
            .unwrap();
        let img = image::open(data.join("images").join(name)).unwrap();
        let dst = images.join(format!("COCO_val2014_{id:012}.jpg"));
        if !dst.exists() {
            img.to_rgb8().save(&dst).unwrap();
        }
        questions.push(serde_json::json!({"image_id": id, "question": row["question"], "question_id": row["question_id"]}));
    }
    std::fs::write(
        root.join("questions.json"),
        serde_json::json!({"data_subtype": "val2014", "questions": questions}).to_string(),
    )
    .unwrap();
    std::fs::copy(
        data.join("vqa_test_annotations.json"),
        root.join("annotations.json"),
    )
    .unwrap();
    // POPE
    std::fs::create_dir_all(root.join("pope")).unwrap();
    for s in ["random", "adversarial"] {
        std::fs::copy(
            data.join(format!("pope_test_{s}.jsonl")),
            root.join(format!("pope/coco_pope_{s}.json")),
        )
        .unwrap();
    }
    // MME folder: two subtasks, both layouts
    let mme = root.join("MME");
    for (k, sub) in ["color", "count"].iter().enumerate() {
        let (qdir, idir) = if k == 0 {
            (
                mme.join(sub).join("questions_answers_YN"),
                mme.join(sub).join("images"),
            )
        } else {
            (mme.join(sub), mme.join(sub))
        };
        std::fs::create_dir_all(&qdir).unwrap();
        std::fs::create_dir_all(&idir).unwrap();
        for i in 0..2 {
            std::fs::copy(
                data.join(format!("images/test_{i:05}.png")),
                idir.join(format!("{sub}{i}.png")),
            )
            .unwrap();
            std::fs::write(
                qdir.join(format!("{sub}{i}.txt")),
                "Is there a red object in the image? Please answer yes or no.\tYes\nIs there a blue object in the image? Please answer yes or no.\tNo\n",
            )
            .unwrap();
        }
    }
    // Karpathy-split captions
    let c = json(&data.join("captions_test.json"));
    let mut imgs = Vec::new();
    for (i, im) in c["images"].as_array().unwrap().iter().enumerate() {
        let id = im["id"].as_u64().unwrap();
        let sentences: Vec<serde_json::Value> = c["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["image_id"].as_u64() == Some(id))
            .map(|a| serde_json::json!({"raw": a["caption"]}))
            .collect();
        imgs.push(serde_json::json!({"filename": im["file_name"], "imgid": id, "split": if i < 3 { "test" } else { "train" }, "sentences": sentences}));
    }
    std::fs::write(
        root.join("dataset_flickr30k.json"),
        serde_json::json!({"images": imgs}).to_string(),
    )
    .unwrap();
    root
}

#[test]
fn every_benchmark_layout_and_protocol() {
    let t = tiny_with_adapter();
    // the authors' protocol puts three demonstrations before each question: 406 tokens,
    // beyond the tiny model's 256-token context, which prompts must fit; give it room
    let cfg = t.path("model/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["text_config"]["max_position_embeddings"] = 1024.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let root = official_layouts(&t);
    let model = p(&t.path("model"));
    let run = |bench: &str, data: &Path, extra: &[&str], out: &str| -> serde_json::Value {
        let outp = p(&t.path(out));
        let d = p(data);
        let mut a = vec![
            "eval",
            "--model",
            &model,
            "--bench",
            bench,
            "--data",
            &d,
            "--out",
            &outp,
            "--max-new-tokens",
            "3",
            "--caption-tokens",
            "5",
            "--template",
            "chatml",
            "--quiet",
        ];
        a.extend_from_slice(extra);
        let (ok, _, err) = lntune(&a);
        assert!(ok, "{bench}: {err}");
        json(&t.path(out).join("scores.json"))
    };
    let ann = p(&root.join("annotations.json"));
    let v = run(
        "vqav2",
        &root.join("questions.json"),
        &[
            "--annotations",
            &ann,
            "--images",
            &p(&root.join("val2014")),
            "--limit",
            "4",
        ],
        "e_vqa",
    );
    assert_eq!(v["vqav2"]["questions"], 4);
    // the authors' protocol: sampled answers that do not depend on the batch size
    let a1 = run(
        "vqav2",
        &root.join("questions.json"),
        &[
            "--annotations",
            &ann,
            "--images",
            &p(&root.join("val2014")),
            "--limit",
            "4",
            "--protocol",
            "authors",
            "--batch",
            "1",
        ],
        "e_auth1",
    );
    let a4 = run(
        "vqav2",
        &root.join("questions.json"),
        &[
            "--annotations",
            &ann,
            "--images",
            &p(&root.join("val2014")),
            "--limit",
            "4",
            "--protocol",
            "authors",
            "--batch",
            "4",
        ],
        "e_auth4",
    );
    assert_eq!(a1, a4);
    let v = run(
        "pope",
        &root.join("pope"),
        &["--images", &p(&t.path("data/images")), "--limit", "3"],
        "e_pope",
    );
    assert_eq!(
        v["pope"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["adversarial", "random"]
    );
    let v = run("mme", &root.join("MME"), &[], "e_mme");
    assert_eq!(v["mme"]["questions"], 8);
    assert_eq!(v["mme"]["subtasks"].as_object().unwrap().len(), 2);
    let v = run(
        "flickr",
        &root.join("dataset_flickr30k.json"),
        &["--images", &p(&t.path("data/images"))],
        "e_cap",
    );
    assert_eq!(v["captions"]["images"], 3);
}

#[test]
fn malformed_benchmark_files_are_named() {
    let t = TinyRun::new();
    let root = t.path("bad");
    std::fs::create_dir_all(&root).unwrap();
    let model = p(&t.path("model"));
    let try_eval = |bench: &str, data: &Path, extra: &[&str]| -> String {
        let out = p(&t.path("o"));
        let d = p(data);
        let mut a = vec![
            "eval", "--model", &model, "--bench", bench, "--data", &d, "--out", &out, "--quiet",
        ];
        a.extend_from_slice(extra);
        let (ok, _, err) = lntune(&a);
        assert!(!ok, "{bench} {} should fail", data.display());
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let imgs = p(&t.path("data/images"));
    // truncated JSON
    let f = root.join("q.json");
    std::fs::write(&f, "{\"questions\": [{\"question_id\": 1,").unwrap();
    let err = try_eval("vqav2", &f, &["--annotations", &p(&f), "--images", &imgs]);
    assert!(
        err.contains("q.json") && err.contains("malformed JSON"),
        "{err}"
    );
    // vqav2 without annotations
    let err = try_eval("vqav2", &t.path("data/vqa_test_questions.json"), &[]);
    assert!(err.contains("--annotations"), "{err}");
    // missing field
    std::fs::write(
        &f,
        r#"{"questions": [{"question_id": 1, "image": "test_00000.png"}]}"#,
    )
    .unwrap();
    let err = try_eval(
        "vqav2",
        &f,
        &[
            "--annotations",
            &p(&t.path("data/vqa_test_annotations.json")),
            "--images",
            &imgs,
        ],
    );
    assert!(
        err.contains("q.json: questions[0]: missing field `question`"),
        "{err}"
    );
    // missing image
    let pope = root.join("coco_pope_random.json");
    std::fs::write(
        &pope,
        r#"{"question_id": 1, "image": "nope.png", "text": "Is there a cat?", "label": "yes"}"#,
    )
    .unwrap();
    let err = try_eval("pope", &pope, &["--images", &imgs]);
    assert!(
        err.contains("coco_pope_random.json: line 1: image") && err.contains("nope.png not found"),
        "{err}"
    );
    // bad label
    std::fs::write(&pope, r#"{"question_id": 1, "image": "test_00000.png", "text": "Is there a cat?", "label": "maybe"}"#).unwrap();
    let err = try_eval("pope", &pope, &["--images", &imgs]);
    assert!(err.contains("field `label` is `maybe`"), "{err}");
    // MME line without a tab
    let mme = root.join("MME/color");
    std::fs::create_dir_all(&mme).unwrap();
    std::fs::copy(t.path("data/images/test_00000.png"), mme.join("a.png")).unwrap();
    std::fs::write(mme.join("a.txt"), "Is it red? Yes\n").unwrap();
    let err = try_eval("mme", &root.join("MME"), &[]);
    assert!(
        err.contains("a.txt: line 1: expected `question<TAB>answer`"),
        "{err}"
    );
    // Karpathy split with no test images
    std::fs::write(&f, r#"{"images": [{"filename": "test_00000.png", "imgid": 0, "split": "train", "sentences": [{"raw": "a"}]}]}"#).unwrap();
    let err = try_eval("coco", &f, &["--images", &imgs]);
    assert!(err.contains("no images in split `test`"), "{err}");
    // score: wrong column count, unknown subtask, question not in the questions file
    let res = root.join("res");
    std::fs::create_dir_all(&res).unwrap();
    std::fs::write(res.join("color.txt"), "a.png\tIs it red?\tYes\n").unwrap();
    let (ok, _, err) = lntune(&["score", "--bench", "mme", "--pred", &p(&res)]);
    assert!(
        !ok && err.contains("color.txt: line 1: expected 4 tab-separated columns"),
        "{err}"
    );
    std::fs::write(res.join("color.txt"), "a.png\tIs it red?\tYes\tYes\n").unwrap();
    std::fs::write(res.join("colour.txt"), "a.png\tIs it red?\tYes\tYes\n").unwrap();
    let (ok, _, err) = lntune(&["score", "--bench", "mme", "--pred", &p(&res)]);
    assert!(
        !ok && err.contains("`colour` is not an MME subtask"),
        "{err}"
    );
    let vr = root.join("vqa_res.json");
    std::fs::write(&vr, r#"[{"question_id": 999999, "answer": "red"}]"#).unwrap();
    let (ok, _, err) = lntune(&[
        "score",
        "--bench",
        "vqav2",
        "--pred",
        &p(&vr),
        "--questions",
        &p(&t.path("data/vqa_test_questions.json")),
        "--gt",
        &p(&t.path("data/vqa_test_annotations.json")),
    ]);
    assert!(!ok && err.contains("question_id 999999 is not in"), "{err}");
}

#[test]
fn predictions_file_with_a_bad_middle_line_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("predictions.jsonl");
    std::fs::write(
        &f,
        "garbage\n{\"id\": \"x\", \"image\": \"\", \"question\": \"\", \"answer\": \"a\"}\n",
    )
    .unwrap();
    let err = lntune::eval::predictions::Predictions::open(&f)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("predictions.jsonl: line 1: not a prediction"),
        "{err}"
    );
    // a cut last line is dropped and the file truncated to the whole lines
    std::fs::write(&f, "{\"id\": \"x\", \"image\": \"\", \"question\": \"\", \"answer\": \"a\"}\n{\"id\": \"y\", \"ima").unwrap();
    let mut pr = lntune::eval::predictions::Predictions::open(&f).unwrap();
    assert_eq!(pr.answers.len(), 1);
    pr.append(&lntune::eval::predictions::PredictionLine {
        id: "z".into(),
        image: String::new(),
        question: String::new(),
        answer: "b".into(),
    })
    .unwrap();
    drop(pr);
    let text = std::fs::read_to_string(&f).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.ends_with("\"answer\":\"b\"}\n"), "{text}");
}

#[test]
fn generate_and_chat_stream_answers() {
    let t = tiny_with_adapter();
    let (model, adapter, img) = (
        p(&t.path("model")),
        p(&t.path("run/adapter")),
        p(&t.path("data/images/test_00000.png")),
    );
    let (ok, out, err) = lntune(&[
        "generate",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--image",
        &img,
        "--prompt",
        "What is in the image?",
        "--max-new-tokens",
        "5",
        "--template",
        "chatml",
    ]);
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty());
    // sampling with a seed is reproducible
    let sample = || {
        lntune(&[
            "generate",
            "--model",
            &model,
            "--image",
            &img,
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "6",
            "--temperature",
            "1.0",
            "--top-k",
            "20",
            "--seed",
            "7",
            "--template",
            "chatml",
        ])
        .1
    };
    assert_eq!(sample(), sample());
    let mut child = Command::new(env!("CARGO_BIN_EXE_lntune"))
        .args([
            "chat",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--image",
            &img,
            "--max-new-tokens",
            "4",
            "--template",
            "chatml",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(format!("What color?\nAnd the shape?\n/image {img}\nHow many?\n/image /nonexistent.png\n/quit\n").as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&o.stdout).matches("> ").count() >= 6);
    assert!(stderr.contains("nonexistent.png"), "{stderr}");
    // a missing image is named
    let (ok, _, err) = lntune(&[
        "generate",
        "--model",
        &model,
        "--image",
        "/nonexistent.png",
        "--prompt",
        "x",
    ]);
    assert!(!ok && err.contains("nonexistent.png"), "{err}");
}

/// The shapes evaluation's predictions name the image each answer was given: the question's
/// own, or another test image under the wrong-image control.
#[test]
fn wrong_image_predictions_name_the_image_shown() {
    use candle_core::{DType, Device};
    use lntune::data::features::FeatureCache;
    use lntune::data::template::{Template, TemplateName};
    use lntune::eval::answer::Answerer;
    use lntune::eval::benchmarks::shapes::{ShapesEval, eval_shapes};
    use lntune::eval::generate::GenConfig;
    let t = TinyRun::new();
    let m = lntune::model::mllm::Mllm::load(&t.path("model"), DType::F32, &Device::Cpu).unwrap();
    let chat = Template::new(TemplateName::Chatml, m.tokenizer.as_ref()).unwrap();
    let pre = lntune::data::image::Preprocess::clip(56);
    let ask = Answerer {
        model: &m,
        template: &chat,
        preprocess: &pre,
        generation: GenConfig::greedy(2),
        batch: 16,
        progress: false,
    };
    for wrong_image in [false, true] {
        let out = t.path(&format!("pred-{wrong_image}.jsonl"));
        let e = ShapesEval {
            data: &t.path("data"),
            limit: Some(4),
            limit_small: Some(2),
            captions: false,
            wrong_image,
            caption_prompt: String::new(),
            predictions: Some(&out),
        };
        eval_shapes(&e, &ask, None, &mut FeatureCache::new(false)).unwrap();
        let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(rows.len() > 8, "{} predictions", rows.len());
        for r in &rows {
            let same = r["image"] == r["shown_image"];
            assert!(r["shown_image"].is_string(), "{r}");
            assert_eq!(same, !wrong_image, "{r}");
        }
    }
}
