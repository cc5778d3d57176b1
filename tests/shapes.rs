//! The generated `shapes` benchmark: same seed, same bytes; every answer follows from the
//! scene graph; the rendered pixels show the objects' colors.

use std::collections::BTreeMap;
use std::path::Path;

use lntune::data::shapes::*;

fn make(dir: &Path, seed: u64) {
    make_level(dir, seed, Level::Full, 10);
}

fn make_level(dir: &Path, seed: u64, level: Level, test: usize) {
    generate(
        &ShapesConfig {
            seed,
            train: 24,
            test,
            size: 112,
            level,
        },
        dir,
    )
    .unwrap();
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for sub in [dir.to_path_buf(), dir.join("images")] {
        for e in std::fs::read_dir(&sub).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                out.insert(
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

#[test]
fn same_seed_same_bytes() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    for level in [Level::Full, Level::Basic] {
        make_level(a.path(), 5, level, 10);
        make_level(b.path(), 5, level, 10);
        make_level(c.path(), 6, level, 10);
        let (fa, fb, fc) = (files(a.path()), files(b.path()), files(c.path()));
        assert!(fa.len() > 40);
        assert_eq!(fa, fb, "{level:?}");
        assert_ne!(fa["scenes_train.json"], fc["scenes_train.json"]);
    }
}

fn scenes(dir: &Path, split: &str) -> BTreeMap<String, Scene> {
    let v: Vec<Scene> = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("scenes_{split}.json"))).unwrap(),
    )
    .unwrap();
    v.into_iter().map(|s| (s.image.clone(), s)).collect()
}

/// The query a question text was generated from (texts are unique per query and scene).
fn query_of(s: &Scene, text: &str) -> Query {
    let t = text.trim_start_matches("<image>\n");
    let t = t
        .trim_end_matches(&format!("\n{SHORT}"))
        .trim_end_matches(&format!(" {YES_NO}"));
    let hits: Vec<Query> = all_queries(s)
        .into_iter()
        .filter(|q| question_text(q) == t)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "question {t:?} on {}: {} matching queries",
        s.image,
        hits.len()
    );
    hits[0].clone()
}

#[test]
fn every_answer_follows_from_the_scene_graph() {
    for level in [Level::Full, Level::Basic] {
        let d = tempfile::tempdir().unwrap();
        make_level(d.path(), 11, level, 10);
        check_answers(d.path(), level);
    }
}

fn check_answers(dir: &Path, level: Level) {
    let train = scenes(dir, "train");
    let test = scenes(dir, "test");
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
    };
    let mut checked = 0;
    // conversation and reasoning data: short or sentence answers
    for f in ["conversation_train.json", "reasoning_train.json"] {
        for s in read(f).as_array().unwrap() {
            let scene = &train[s["image"].as_str().unwrap()];
            let turns = s["conversations"].as_array().unwrap();
            for pair in turns.chunks(2) {
                let q = pair[0]["value"].as_str().unwrap();
                let a = pair[1]["value"].as_str().unwrap();
                let query = query_of(scene, q);
                // basic conversations are all one-word answers, without the instruction
                let short =
                    q.ends_with(SHORT) || (level == Level::Basic && f == "conversation_train.json");
                let want = if short {
                    short_answer(scene, &query)
                } else {
                    sentence_answer(scene, &query)
                };
                assert_eq!(Some(a.to_string()), want, "{f}: {q}");
                checked += 1;
            }
        }
    }
    // captions and detailed descriptions come from the scene
    for s in read("captions_train.json").as_array().unwrap() {
        let scene = &train[s["image"].as_str().unwrap()];
        assert_eq!(
            s["conversations"][1]["value"].as_str().unwrap(),
            captions(scene, level)[0]
        );
        checked += 1;
    }
    for s in read("detail_train.json").as_array().unwrap() {
        let scene = &train[s["image"].as_str().unwrap()];
        assert_eq!(
            s["conversations"][1]["value"].as_str().unwrap(),
            detailed_description(scene, level)
        );
        checked += 1;
    }
    // VQA: the majority answer and the query's answer; synonyms are numbers spelled out or
    // upper/lower for top/bottom
    let qs = read("vqa_test_questions.json");
    let anns = read("vqa_test_annotations.json");
    for (q, a) in qs["questions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(anns["annotations"].as_array().unwrap())
    {
        let scene = &test[q["image"].as_str().unwrap()];
        let query = query_of(scene, q["question"].as_str().unwrap());
        let ans = answer(scene, &query).unwrap();
        assert_eq!(a["multiple_choice_answer"].as_str().unwrap(), ans);
        assert_eq!(a["answers"].as_array().unwrap().len(), 10);
        for g in a["answers"].as_array().unwrap() {
            let g = g["answer"].as_str().unwrap();
            let ok = g == ans
                || lntune::eval::metrics::process_digit_article(g) == ans
                || g.replace("upper", "top").replace("lower", "bottom") == ans;
            assert!(ok, "{g} vs {ans}");
        }
        checked += 1;
    }
    // POPE and MME
    for split in ["random", "popular", "adversarial"] {
        let text = std::fs::read_to_string(dir.join(format!("pope_test_{split}.jsonl"))).unwrap();
        let mut yes = 0;
        let mut n = 0;
        for l in text.lines() {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            let scene = &test[r["image"].as_str().unwrap()];
            let query = query_of(scene, r["text"].as_str().unwrap());
            assert_eq!(answer(scene, &query).unwrap(), r["label"].as_str().unwrap());
            yes += (r["label"] == "yes") as usize;
            n += 1;
            checked += 1;
        }
        assert_eq!(2 * yes, n, "{split}: balanced yes/no");
    }
    let text = std::fs::read_to_string(dir.join("mme_test.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for pair in rows.chunks(2) {
        assert_eq!(
            (pair[0]["answer"].as_str(), pair[1]["answer"].as_str()),
            (Some("Yes"), Some("No"))
        );
        for r in pair {
            let scene = &test[r["image"].as_str().unwrap()];
            let query = query_of(scene, r["text"].as_str().unwrap());
            assert_eq!(
                short_answer(scene, &query).unwrap(),
                r["answer"].as_str().unwrap()
            );
            checked += 1;
        }
    }
    assert!(checked > 300, "{checked} answers checked");
}

#[test]
fn rendered_objects_show_their_colors() {
    let d = tempfile::tempdir().unwrap();
    make(d.path(), 3);
    let palette = [
        ("red", [220, 40, 40]),
        ("green", [40, 170, 60]),
        ("blue", [40, 80, 220]),
        ("yellow", [235, 205, 30]),
        ("purple", [150, 60, 190]),
    ];
    for (name, s) in scenes(d.path(), "train") {
        let img = image::open(d.path().join("images").join(&name))
            .unwrap()
            .to_rgb8();
        for o in &s.objects {
            let p = img.get_pixel(o.center.0 as u32, o.center.1 as u32).0;
            let nearest = palette
                .iter()
                .min_by_key(|(_, c)| (0..3).map(|k| (c[k] - p[k] as i32).pow(2)).sum::<i32>())
                .unwrap()
                .0;
            assert_eq!(nearest, o.color, "{name}: {:?} at {:?}", o.shape, o.center);
        }
    }
}

/// `Level::Basic` is the task of a few distinct shapes: 1-3 objects, no shape twice, all
/// large; test questions in turn color / count / existence, existence half yes, and the
/// conversation data asks only those three kinds.
#[test]
fn basic_level_scenes_and_questions() {
    let d = tempfile::tempdir().unwrap();
    make_level(d.path(), 4, Level::Basic, 60);
    let dir = d.path();
    let train = scenes(dir, "train");
    let test = scenes(dir, "test");
    for s in train.values().chain(test.values()) {
        let n = s.objects.len();
        assert!((1..=3).contains(&n), "{}: {n} objects", s.image);
        let mut shapes: Vec<&str> = s.objects.iter().map(|o| o.shape.as_str()).collect();
        shapes.sort();
        shapes.dedup();
        assert_eq!(shapes.len(), n, "{}: a shape twice", s.image);
        assert!(
            shapes
                .iter()
                .all(|x| ["circle", "square", "triangle"].contains(x))
        );
        assert!(s.objects.iter().all(|o| o.size == "large"));
    }
    assert!(
        (1..=3).all(|n| test.values().any(|s| s.objects.len() == n)),
        "every object count occurs"
    );
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
    };
    let anns = read("vqa_test_annotations.json");
    let anns = anns["annotations"].as_array().unwrap();
    assert_eq!(anns.len(), 60, "one question per test image");
    let mut kinds = BTreeMap::new();
    let mut exist_yes = 0;
    for a in anns {
        let q: Query = serde_json::from_value(a["query"].clone()).unwrap();
        let kind = match q {
            Query::ColorOf(Ref::Shape(_)) => "color",
            Query::Count => "count",
            Query::Exists(..) => {
                exist_yes += (a["multiple_choice_answer"] == "yes") as usize;
                "existence"
            }
            other => panic!("unexpected basic question {other:?}"),
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    assert_eq!(
        kinds,
        BTreeMap::from([("color", 20), ("count", 20), ("existence", 20)])
    );
    assert_eq!(exist_yes, 10);
    for s in read("conversation_train.json").as_array().unwrap() {
        let scene = &train[s["image"].as_str().unwrap()];
        let turns = s["conversations"].as_array().unwrap();
        // a color question per object, the count, one yes and one no existence question
        assert_eq!(turns.len(), 2 * (scene.objects.len() + 3));
        for pair in turns.chunks(2) {
            let q = pair[0]["value"].as_str().unwrap();
            assert!(
                !q.contains(SHORT),
                "one-word answers need no instruction: {q}"
            );
            let t = q.trim_start_matches("<image>\n");
            assert!(
                t.starts_with("What color is the ")
                    || t.starts_with("How many shapes")
                    || t.starts_with("Is there a "),
                "{t}"
            );
        }
    }
    // captions of basic scenes do not name sizes
    let caps = read("captions_train.json");
    for c in caps.as_array().unwrap() {
        let text = c["conversations"][1]["value"].as_str().unwrap();
        assert!(!text.contains("large") && !text.contains("small"), "{text}");
    }
}
