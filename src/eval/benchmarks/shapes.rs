//! `shapes`, the demo's generated benchmark: one data folder holds a VQAv2-format question
//! set, three POPE files, an MME-style file and COCO-format caption references, read by the
//! other benchmarks' loaders and scored by their scorers. `eval_shapes` answers all of them
//! (optionally with every question shown another image: the wrong-image control) and adds
//! exact match and VQA accuracy per question kind.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::item::{Item, Truth};
use super::scores::{score, submission_answer};
use super::subset::{ItemLimit, subset};
use super::{captions, mme, pope, vqav2};
use crate::data::features::FeatureCache;
use crate::data::shapes::read_level;
use crate::eval::answer::{Answerer, Question, answer_memo};
use crate::eval::metrics::{MmeScore, PopeMetrics, vqa_accuracy};
use crate::util::files::{read_json, write_atomically};

/// Every item of a shapes data folder (each part a random subset of at most what `limit`
/// says, with `seed`): VQA, POPE's three files, MME-style, captions of `split`.
pub fn load(
    data: &Path,
    images: &Path,
    split: &str,
    limit: &ItemLimit,
    seed: u64,
) -> Result<Vec<Item>> {
    let mut v = subset(
        vqav2::load(
            &data.join("vqa_test_questions.json"),
            &data.join("vqa_test_annotations.json"),
            images,
        )?,
        limit.of("vqa"),
        seed,
    );
    for s in ["random", "popular", "adversarial"] {
        v.extend(subset(
            pope::load(&data.join(format!("pope_test_{s}.jsonl")), images)?,
            limit.of("pope"),
            seed,
        ));
    }
    v.extend(subset(
        mme::load_jsonl(&data.join("mme_test.jsonl"), images, None)?,
        limit.of("mme"),
        seed,
    ));
    v.extend(subset(
        captions::load(&data.join("captions_test.json"), images, split)?,
        limit.of("captions"),
        seed,
    ));
    Ok(v)
}

/// Scores of the `shapes` benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShapesScores {
    /// VQAv2 accuracy × 100, overall and per question kind
    pub vqa: f64,
    pub vqa_by_type: BTreeMap<String, f64>,
    /// VQA exact match × 100: the raw answer, lowercased, without punctuation and
    /// whitespace, equals the answer (the first of the 10, unchanged by synonyms): the
    /// stricter score of one-word answers
    #[serde(default)]
    pub vqa_exact: f64,
    pub pope: BTreeMap<String, PopeMetrics>,
    pub mme: BTreeMap<String, MmeScore>,
    pub mme_total: f64,
    pub cider: Option<f64>,
    pub bleu4: Option<f64>,
    /// a few (question, answer, prediction) examples
    pub examples: Vec<(String, String, String)>,
}

/// What to evaluate.
pub struct ShapesEval<'a> {
    pub data: &'a Path,
    /// VQA on at most this many test images (all when None)
    pub limit: Option<usize>,
    /// POPE, MME and captions on at most this many test images (all when None)
    pub limit_small: Option<usize>,
    pub captions: bool,
    /// show each question a different test image (the wrong-image control)
    pub wrong_image: bool,
    /// the user text that asks for a caption (empty for the `plain` template)
    pub caption_prompt: String,
    /// where to write every question and answer as JSONL (id, image, question, reference,
    /// answer), so that a score can be traced to the answers behind it
    pub predictions: Option<&'a Path>,
}

/// Lowercase letters and digits only: how exact match compares answers.
fn bare(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Evaluates a model on the shapes test sets, read and scored like `lntune eval --bench
/// shapes`. `ask` answers short questions; `caption` generates captions.
pub fn eval_shapes(
    e: &ShapesEval,
    ask: &Answerer,
    caption: Option<&Answerer>,
    cache: &mut FeatureCache,
) -> Result<ShapesScores> {
    let images = e.data.join("images");
    let small = e.limit_small.or(e.limit);
    let suffix = read_level(e.data)?.question_suffix();
    let mut memo = HashMap::new();
    let mut answered = Answered::default();
    for (what, group) in question_groups(e, &images)? {
        // the data's short-answer suffix (LLaVA-1.5's instruction at the full level) after
        // VQA and POPE questions; MME's own "Please answer yes or no." stays alone, as the
        // model was trained
        let qs: Vec<Question> = group
            .iter()
            .map(|it| Question {
                image: it.image.clone(),
                text: match it.truth {
                    Truth::Mme { .. } => it.question.clone(),
                    _ => format!("{}{suffix}", it.question),
                },
            })
            .collect();
        let asked = if e.wrong_image { wrong_images(&qs) } else { qs };
        let answers = answer_memo(ask, &asked, cache, &mut memo, &what)?;
        answered.push(group, asked, answers);
    }
    if let Some(cap) = caption.filter(|_| e.captions) {
        let caps: Vec<Item> = captions::load(&e.data.join("captions_test.json"), &images, "test")?
            .into_iter()
            .filter(|it| within(it, small))
            .collect();
        let qs: Vec<Question> = caps
            .iter()
            .map(|it| Question {
                image: it.image.clone(),
                text: e.caption_prompt.clone(),
            })
            .collect();
        let answers = cap.answer(&qs, cache, &|i| i, "captions")?;
        answered.push(caps, qs, answers);
    }
    let submitted: Vec<String> = answered
        .items
        .iter()
        .zip(&answered.answers)
        .map(|(it, a)| submission_answer(it, a))
        .collect();
    if let Some(path) = e.predictions {
        write_predictions(path, &answered)?;
    }
    shapes_scores(e.data, &answered, &submitted)
}

/// Whether a test item is within the first `limit` test images (they are
/// `test_<index>.png`).
fn within(it: &Item, limit: Option<usize>) -> bool {
    let name = it
        .image
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    match limit {
        None => true,
        Some(n) => name
            .strip_prefix("test_")
            .and_then(|s| s.strip_suffix(".png"))
            .and_then(|s| s.parse::<usize>().ok())
            .is_some_and(|i| i < n),
    }
}

/// The short-question sets of a shapes folder, each with its progress label: VQA on the
/// first `limit` test images; POPE's three files and MME-style on the first `limit_small`.
fn question_groups(e: &ShapesEval, images: &Path) -> Result<Vec<(String, Vec<Item>)>> {
    let small = e.limit_small.or(e.limit);
    let vqa: Vec<Item> = vqav2::load(
        &e.data.join("vqa_test_questions.json"),
        &e.data.join("vqa_test_annotations.json"),
        images,
    )?
    .into_iter()
    .filter(|it| within(it, e.limit))
    .collect();
    let mut groups: Vec<(String, Vec<Item>)> = vec![("vqa".into(), vqa)];
    for split in ["random", "popular", "adversarial"] {
        let items = pope::load(&e.data.join(format!("pope_test_{split}.jsonl")), images)?;
        groups.push((
            format!("pope {split}"),
            items.into_iter().filter(|it| within(it, small)).collect(),
        ));
    }
    let mme = mme::load_jsonl(&e.data.join("mme_test.jsonl"), images, None)?;
    groups.push((
        "mme".into(),
        mme.into_iter().filter(|it| within(it, small)).collect(),
    ));
    Ok(groups)
}

/// The wrong-image control: every question shown the image of another test scene (that of
/// the question half the list away, or the next one with another image).
fn wrong_images(qs: &[Question]) -> Vec<Question> {
    let n = qs.len();
    if n < 2 {
        return qs.to_vec();
    }
    (0..n)
        .map(|i| {
            let mut j = (i + n / 2) % n;
            while qs[j].image == qs[i].image && j != i {
                j = (j + 1) % n;
            }
            Question {
                image: qs[j].image.clone(),
                text: qs[i].text.clone(),
            }
        })
        .collect()
}

/// Every item asked, in order, with the raw answer and the image the model was shown (the
/// item's own, or another one under the wrong-image control).
#[derive(Default)]
struct Answered {
    items: Vec<Item>,
    answers: Vec<String>,
    shown: Vec<PathBuf>,
}

impl Answered {
    fn push(&mut self, items: Vec<Item>, asked: Vec<Question>, answers: Vec<String>) {
        self.items.extend(items);
        self.shown.extend(asked.into_iter().map(|q| q.image));
        self.answers.extend(answers);
    }
}

/// Every question and answer as JSONL (id, image, shown_image, question, reference,
/// answer), so that a score can be traced to the answers behind it.
fn write_predictions(path: &Path, a: &Answered) -> Result<()> {
    let mut lines = String::new();
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().to_string());
    for ((it, answer), shown) in a.items.iter().zip(&a.answers).zip(&a.shown) {
        let reference = match &it.truth {
            Truth::Vqa { answers, .. } => answers.first().cloned().unwrap_or_default(),
            Truth::Pope { label, .. } => label.clone(),
            Truth::Mme { answer, .. } => answer.clone(),
            Truth::Caption { refs, .. } => refs.first().cloned().unwrap_or_default(),
        };
        // `image`: the question's own image; `shown_image`: the one the model was given
        let line = serde_json::json!({
            "id": it.id,
            "image": name(&it.image),
            "shown_image": name(shown),
            "question": it.question,
            "reference": reference,
            "answer": answer,
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    write_atomically(path, lines.as_bytes())
}

/// The VQA question kind of each question id: the shapes annotations' `query` (its first
/// key, `{"ColorOf": {...}}`, or itself, a bare `"Count"`).
fn question_kinds(data: &Path) -> Result<BTreeMap<u64, String>> {
    let anns: Value = read_json(&data.join("vqa_test_annotations.json"))?;
    Ok(anns["annotations"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|a| {
                    let query = &a["query"];
                    let kind = query
                        .as_object()
                        .and_then(|o| o.keys().next().cloned())
                        .or_else(|| query.as_str().map(str::to_string))
                        .unwrap_or_else(|| "other".into());
                    Some((a["question_id"].as_u64()?, kind))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The official scores of the answered items, plus VQA exact match, VQA accuracy per
/// question kind, and a few examples.
fn shapes_scores(data: &Path, asked: &Answered, submitted: &[String]) -> Result<ShapesScores> {
    let scores = score(&asked.items, submitted);
    let kind_of = question_kinds(data)?;
    let mut by_kind: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut exact = Vec::new();
    let mut examples = Vec::new();
    for ((it, a), raw) in asked.items.iter().zip(submitted).zip(&asked.answers) {
        if let Truth::Vqa {
            question_id,
            answers: gts,
            ..
        } = &it.truth
        {
            by_kind
                .entry(
                    kind_of
                        .get(question_id)
                        .cloned()
                        .unwrap_or_else(|| "other".into()),
                )
                .or_default()
                .push(vqa_accuracy(a, gts));
            let answer = gts.first().map(|g| bare(g)).unwrap_or_default();
            exact.push(f64::from(u8::from(bare(raw) == answer)));
            if examples.len() < 8 {
                examples.push((
                    it.question.clone(),
                    gts.first().cloned().unwrap_or_default(),
                    a.clone(),
                ));
            }
        }
    }
    let first_caption =
        asked
            .items
            .iter()
            .zip(&asked.answers)
            .find_map(|(it, a)| match &it.truth {
                Truth::Caption { refs, .. } => Some((refs, a)),
                _ => None,
            });
    if let Some((refs, a)) = first_caption {
        examples.push((
            "(caption)".into(),
            refs.first().cloned().unwrap_or_default(),
            a.clone(),
        ));
    }
    let mean = |v: &[f64]| 100.0 * v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(ShapesScores {
        vqa: scores.vqav2.as_ref().map(|v| v.overall).unwrap_or(0.0),
        vqa_by_type: by_kind.iter().map(|(k, v)| (k.clone(), mean(v))).collect(),
        vqa_exact: mean(&exact),
        pope: scores.pope.clone(),
        mme_total: scores
            .mme
            .as_ref()
            .map(|m| m.perception + m.cognition)
            .unwrap_or(0.0),
        mme: scores.mme.map(|m| m.subtasks).unwrap_or_default(),
        cider: scores.captions.as_ref().map(|c| c.cider),
        bleu4: scores.captions.as_ref().map(|c| c.bleu[3]),
        examples,
    })
}
