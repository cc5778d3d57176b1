//! Writing the benchmark: images, scene graphs, captions, instruction data of three kinds
//! (LLaVA JSON), and the test sets in their benchmarks' formats (VQAv2 questions and
//! annotations, POPE JSON lines, MME-style JSON lines). One seeded RNG drives the scenes,
//! their pictures and the questions in a fixed order, so the same config gives the same
//! bytes.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::phrasing::{
    captions, detailed_description, question_text, sentence, short_form, synonym,
};
use super::query::{Query, answer, ref_to};
use super::questions::{
    absent_pair, basic_questions, basic_test_question, negatives, pair_frequencies,
    reasoning_questions, short_questions, yes_no_questions,
};
use super::scene::{COLORS, Level, Scene, YES_NO, random_scene, render};
use crate::data::llava::{Images, Sample, Turn};
use crate::util::files::{read_json, write_json, write_jsonl};
use crate::util::rng::Rng;

/// The dataset sizes and seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShapesConfig {
    pub seed: u64,
    pub train: usize,
    pub test: usize,
    pub size: usize,
    #[serde(default)]
    pub level: Level,
}

/// Counts of what was written, for the README and the caller.
#[derive(Debug, Default, Serialize)]
pub struct ShapesSummary {
    pub files: BTreeMap<String, usize>,
}

/// One POPE question.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PopeItem {
    pub question_id: usize,
    pub image: String,
    pub text: String,
    pub label: String,
}

/// One MME-style question.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MmeItem {
    pub question_id: String,
    pub image: String,
    pub text: String,
    pub category: String,
    pub answer: String,
}

/// The level of the shapes data in `dir`, from its `shapes.json` (`full` when the file or
/// its `level` field is absent: data written before levels existed).
pub fn read_level(dir: &Path) -> Result<Level> {
    let path = dir.join("shapes.json");
    if !path.exists() {
        return Ok(Level::Full);
    }
    Ok(read_json::<ShapesConfig>(&path)?.level)
}

/// Writes the whole benchmark under `out`. Same config, same bytes.
pub fn generate(cfg: &ShapesConfig, out: &Path) -> Result<ShapesSummary> {
    let _lock = crate::util::files::FolderLock::acquire(out)?;
    let mut rng = Rng::new(cfg.seed);
    let mut summary = ShapesSummary::default();
    let train = write_scenes(cfg, out, "train", cfg.train, &mut rng)?;
    let test = write_scenes(cfg, out, "test", cfg.test, &mut rng)?;
    write_json(&out.join("scenes_train.json"), &train)?;
    write_json(&out.join("scenes_test.json"), &test)?;
    write_captions(cfg, out, &train, &test, &mut summary)?;
    write_instructions(cfg, out, &train, &mut rng, &mut summary)?;
    write_vqa(cfg, out, &test, &mut rng, &mut summary)?;
    write_pope(cfg, out, &train, &test, &mut summary)?;
    write_mme(cfg, out, &test, &mut summary)?;
    write_json(&out.join("shapes.json"), cfg)?;
    Ok(summary)
}

/// `n` random scenes of a split, each drawn and written as `images/<split>_<i>.png`.
fn write_scenes(
    cfg: &ShapesConfig,
    out: &Path,
    split: &str,
    n: usize,
    rng: &mut Rng,
) -> Result<Vec<Scene>> {
    let img_dir = out.join("images");
    std::fs::create_dir_all(&img_dir)
        .with_context(|| format!("{}: cannot create", img_dir.display()))?;
    let mut scenes = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("{split}_{i:05}.png");
        let s = random_scene(rng, name.clone(), cfg.size, cfg.level);
        let px = render(&s, cfg.size, rng);
        let path = img_dir.join(&name);
        image::save_buffer_with_format(
            &path,
            &px,
            cfg.size as u32,
            cfg.size as u32,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .with_context(|| format!("{}: cannot write", path.display()))?;
        scenes.push(s);
    }
    Ok(scenes)
}

fn turn(from: &str, value: String) -> Turn {
    Turn {
        from: from.into(),
        value,
    }
}

fn sample(id: String, image: &str, turns: Vec<Turn>) -> Sample {
    Sample {
        id: serde_json::Value::String(id),
        image: Some(Images::One(image.into())),
        conversations: turns,
    }
}

/// Stage 1: one caption per training image (LLaVA JSON), and five references per test
/// image in the COCO caption format.
fn write_captions(
    cfg: &ShapesConfig,
    out: &Path,
    train: &[Scene],
    test: &[Scene],
    summary: &mut ShapesSummary,
) -> Result<()> {
    let caption_prompts = [
        "Describe the image briefly.",
        "What is in this picture?",
        "Give a short caption for the image.",
    ];
    let caps: Vec<Sample> = train
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = caption_prompts[i % caption_prompts.len()];
            sample(
                format!("cap-{i}"),
                &s.image,
                vec![
                    turn("human", format!("<image>\n{p}")),
                    turn("gpt", captions(s, cfg.level)[0].clone()),
                ],
            )
        })
        .collect();
    write_json(&out.join("captions_train.json"), &caps)?;
    summary
        .files
        .insert("captions_train.json".into(), caps.len());
    let images: Vec<serde_json::Value> = test
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": i, "file_name": s.image}))
        .collect();
    let mut anns = Vec::new();
    for (i, s) in test.iter().enumerate() {
        for c in captions(s, cfg.level) {
            anns.push(serde_json::json!({"id": anns.len(), "image_id": i, "caption": c}));
        }
    }
    write_json(
        &out.join("captions_test.json"),
        &serde_json::json!({"images": images, "annotations": anns}),
    )?;
    summary
        .files
        .insert("captions_test.json".into(), test.len());
    Ok(())
}

/// Stage 2: three instruction kinds per training image: a conversation of short questions
/// (and, at `Level::Full`, yes/no questions and sentence answers), a detailed description,
/// and reasoning about pairs of objects.
fn write_instructions(
    cfg: &ShapesConfig,
    out: &Path,
    train: &[Scene],
    rng: &mut Rng,
    summary: &mut ShapesSummary,
) -> Result<()> {
    let mut conv = Vec::new();
    let mut detail = Vec::new();
    let mut reason = Vec::new();
    for (i, s) in train.iter().enumerate() {
        let qs = match cfg.level {
            // every basic question, all in the short-answer format
            Level::Basic => basic_questions(s, rng),
            Level::Full => {
                let mut qs = short_questions(s, rng);
                qs.extend(yes_no_questions(s, rng));
                rng.shuffle(&mut qs);
                qs.truncate(5 + rng.below(3));
                qs
            }
        };
        let mut turns = Vec::new();
        for (k, q) in qs.iter().enumerate() {
            // at `Level::Full` three turns in four in LLaVA-1.5's short-answer format, the
            // rest as sentences
            let (text, ans) = if cfg.level == Level::Basic || rng.below(4) != 0 {
                (
                    format!("{}{}", q.question, cfg.level.question_suffix()),
                    short_form(&q.answer),
                )
            } else {
                (q.question.clone(), sentence(q))
            };
            let text = if k == 0 {
                format!("<image>\n{text}")
            } else {
                text
            };
            turns.push(turn("human", text));
            turns.push(turn("gpt", ans));
        }
        conv.push(sample(format!("conv-{i}"), &s.image, turns));
        detail.push(sample(
            format!("detail-{i}"),
            &s.image,
            vec![
                turn("human", "<image>\nDescribe the image in detail.".into()),
                turn("gpt", detailed_description(s, cfg.level)),
            ],
        ));
        let rq = reasoning_questions(s, rng);
        if !rq.is_empty() {
            let mut turns = Vec::new();
            for (k, q) in rq.iter().take(2).enumerate() {
                let text = if k == 0 {
                    format!("<image>\n{}", q.question)
                } else {
                    q.question.clone()
                };
                turns.push(turn("human", text));
                turns.push(turn("gpt", sentence(q)));
            }
            reason.push(sample(format!("reason-{i}"), &s.image, turns));
        }
    }
    for (name, v) in [
        ("conversation_train.json", &conv),
        ("detail_train.json", &detail),
        ("reasoning_train.json", &reason),
    ] {
        write_json(&out.join(name), v)?;
        summary.files.insert(name.into(), v.len());
    }
    Ok(())
}

/// VQA: questions and annotations in the VQAv2 layout, 10 answers each (synonyms among
/// them), the structured query kept in each annotation.
fn write_vqa(
    cfg: &ShapesConfig,
    out: &Path,
    test: &[Scene],
    rng: &mut Rng,
    summary: &mut ShapesSummary,
) -> Result<()> {
    let mut vqa_q = Vec::new();
    let mut vqa_a = Vec::new();
    for (i, s) in test.iter().enumerate() {
        let qs = match cfg.level {
            Level::Basic => basic_test_question(s, i, rng).into_iter().collect(),
            Level::Full => short_questions(s, rng),
        };
        for (k, q) in qs.into_iter().take(2).enumerate() {
            let qid = i * 10 + k;
            vqa_q.push(serde_json::json!({"question_id": qid, "image_id": i, "image": s.image, "question": q.question}));
            let answers: Vec<serde_json::Value> = (0..10)
                .map(|j| {
                    let a = synonym(&q.answer, j);
                    serde_json::json!({"answer_id": j + 1, "answer": a, "answer_confidence": "yes"})
                })
                .collect();
            let atype = match q.query {
                Query::Count | Query::CountColor(_) => "number",
                Query::Exists(..) => "yes/no",
                _ => "other",
            };
            vqa_a.push(serde_json::json!({
                "question_id": qid, "image_id": i, "question_type": "what", "answer_type": atype,
                "multiple_choice_answer": q.answer, "answers": answers,
                "query": q.query,
            }));
        }
    }
    write_json(
        &out.join("vqa_test_questions.json"),
        &serde_json::json!({"questions": vqa_q}),
    )?;
    write_json(
        &out.join("vqa_test_annotations.json"),
        &serde_json::json!({"annotations": vqa_a}),
    )?;
    summary
        .files
        .insert("vqa_test_questions.json".into(), vqa_q.len());
    Ok(())
}

/// POPE: per test image, present pairs (yes) and as many absent pairs (no) for each
/// negative sampling (random, popular, adversarial), each from its own seeded RNG.
fn write_pope(
    cfg: &ShapesConfig,
    out: &Path,
    train: &[Scene],
    test: &[Scene],
    summary: &mut ShapesSummary,
) -> Result<()> {
    let freq = pair_frequencies(train);
    for kind in ["random", "popular", "adversarial"] {
        let mut items = Vec::new();
        let mut krng = Rng::new(cfg.seed ^ 0x9090 ^ kind.len() as u64);
        for s in test {
            let present: Vec<(String, String)> = s
                .objects
                .iter()
                .map(|o| (o.color.clone(), o.shape.clone()))
                .collect();
            let mut pos: Vec<(String, String)> = present.clone();
            pos.dedup();
            for (c, sh) in pos.iter().take(2) {
                items.push((s.image.clone(), c.clone(), sh.clone(), "yes"));
            }
            let n_neg = pos.len().min(2);
            for (c, sh) in negatives(s, cfg.level, kind, n_neg, &freq, &mut krng) {
                items.push((s.image.clone(), c, sh, "no"));
            }
        }
        let rows: Vec<PopeItem> = items
            .into_iter()
            .enumerate()
            .map(|(k, (image, c, sh, label))| PopeItem {
                question_id: k,
                image,
                text: format!("Is there a {c} {sh} in the image?"),
                label: label.into(),
            })
            .collect();
        let name = format!("pope_test_{kind}.jsonl");
        write_jsonl(&out.join(&name), &rows)?;
        summary.files.insert(name, rows.len());
    }
    Ok(())
}

/// MME-style pairs: one yes and one no question per test image for existence, count, color
/// and position.
fn write_mme(
    cfg: &ShapesConfig,
    out: &Path,
    test: &[Scene],
    summary: &mut ShapesSummary,
) -> Result<()> {
    let mut mme = Vec::new();
    for s in test {
        let mut mrng = Rng::new(cfg.seed ^ 0x3e3e ^ s.image.len() as u64 ^ mme.len() as u64);
        let i = mrng.below(s.objects.len());
        let o = &s.objects[i];
        let (ac, ash) = absent_pair(s, cfg.level, &mut mrng);
        let n = s.objects.len();
        let wrong_n = if n == 5 { 4 } else { n + 1 };
        let other_color = COLORS
            .iter()
            .find(|c| **c != o.color)
            .expect("5 colors")
            .to_string();
        let mut other_cell = (o.cell.0, (o.cell.1 + 1) % 3);
        while s
            .objects
            .iter()
            .any(|x| x.cell == other_cell && x.color == o.color && x.shape == o.shape)
        {
            other_cell = ((other_cell.0 + 1) % 3, other_cell.1);
        }
        let r = ref_to(s, i);
        let pairs = [
            (
                "existence",
                Query::Exists(o.color.clone(), o.shape.clone()),
                Query::Exists(ac, ash),
            ),
            ("count", Query::CountIs(n), Query::CountIs(wrong_n)),
            (
                "color",
                Query::ColorIs(r.clone(), o.color.clone()),
                Query::ColorIs(r, other_color),
            ),
            (
                "position",
                Query::AtCell(o.color.clone(), o.shape.clone(), o.cell),
                Query::AtCell(o.color.clone(), o.shape.clone(), other_cell),
            ),
        ];
        for (cat, qy, qn) in pairs {
            for (k, q) in [qy, qn].into_iter().enumerate() {
                let a = answer(s, &q).expect("MME questions apply");
                mme.push(MmeItem {
                    question_id: format!("{}/{cat}/{k}", s.image),
                    image: s.image.clone(),
                    text: format!("{} {YES_NO}", question_text(&q)),
                    category: cat.into(),
                    answer: short_form(&a),
                });
            }
        }
    }
    write_jsonl(&out.join("mme_test.jsonl"), &mme)?;
    summary.files.insert("mme_test.jsonl".into(), mme.len());
    Ok(())
}
