//! Answering benchmark questions with a model (batched greedy or sampled generation, one
//! image per question), and the `shapes` benchmark's scores with the official metrics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::generate::{GenConfig, Prompt, generate};
use super::metrics::{
    MmeScore, PopeMetrics, bleu, cider_d, mme_subtask, mme_totals, pope_metrics, pope_parse,
    ptb_tokenize, vqa_accuracy,
};
use crate::data::image::Preprocess;
use crate::data::llava::{IMAGE_PLACEHOLDER, Turn};
use crate::data::template::{Rendered, Template, tokenize};
use crate::model::mllm::Mllm;
use crate::train::run::{FeatureCache, progress_bar};

/// LLaVA-1.5's short-answer instruction.
pub const SHORT_ANSWER: &str = crate::data::shapes::SHORT;

/// One question: an image and the user's text (without the image placeholder).
#[derive(Debug, Clone)]
pub struct Question {
    pub image: PathBuf,
    pub text: String,
}

/// How to ask.
pub struct Asker<'a> {
    pub model: &'a Mllm,
    pub template: &'a Template,
    pub preprocess: &'a Preprocess,
    pub generation: GenConfig,
    pub batch: usize,
    /// show a progress bar
    pub progress: bool,
}

impl Asker<'_> {
    /// The prompt's token ids for one question (image tokens expanded).
    pub fn prompt_ids(&self, text: &str) -> Result<Vec<u32>> {
        self.prompt_ids_with(&[], text)
    }

    /// The prompt's token ids after text-only demonstration turns (user, assistant).
    pub fn prompt_ids_with(&self, demos: &[(String, String)], text: &str) -> Result<Vec<u32>> {
        let tools = self
            .model
            .text
            .as_ref()
            .context("the model has no tokenizer")?;
        let v = self
            .model
            .vision
            .as_ref()
            .context("the model has no vision tower")?;
        let (h, w) = self.preprocess.crop.unwrap_or((224, 224));
        let mut turns = Vec::new();
        for (q, a) in demos {
            turns.push(Turn {
                from: "human".into(),
                value: q.clone(),
            });
            turns.push(Turn {
                from: "gpt".into(),
                value: a.clone(),
            });
        }
        turns.push(Turn {
            from: "human".into(),
            value: format!("{IMAGE_PLACEHOLDER}\n{text}"),
        });
        let prompt = self.template.render_prompt(&turns)?;
        let r = Rendered {
            text: prompt,
            targets: vec![],
        };
        Ok(tokenize(&r, tools, v.image_token_id, v.tokens_per_image(h, w), true)?.input_ids)
    }

    /// Answers every question. `image_of(i)` picks the image question i is shown (identity
    /// normally; a different image for the wrong-image control).
    pub fn answer(
        &self,
        questions: &[Question],
        cache: &mut FeatureCache,
        image_of: &dyn Fn(usize) -> usize,
        what: &str,
    ) -> Result<Vec<String>> {
        let tools = self
            .model
            .text
            .as_ref()
            .context("the model has no tokenizer")?;
        let dev = Device::Cpu;
        let paths: Vec<PathBuf> = questions.iter().map(|q| q.image.clone()).collect();
        let feats = cache.for_paths(self.model, &paths, self.preprocess, &dev, self.progress)?;
        let bar = progress_bar(questions.len() as u64, 0, self.progress, what);
        let mut out = Vec::with_capacity(questions.len());
        for (c, chunk) in questions.chunks(self.batch.max(1)).enumerate() {
            let prompts = chunk
                .iter()
                .enumerate()
                .map(|(k, q)| {
                    let i = c * self.batch.max(1) + k;
                    Ok(Prompt {
                        ids: self.prompt_ids(&q.text)?,
                        images: vec![feats[image_of(i)].clone()],
                        seed: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let g = generate(self.model, tools, &prompts, &self.generation, |_, _| {})?;
            out.extend(g.into_iter().map(|g| g.text.trim().to_string()));
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(out)
    }
}

/// Answers with a memo of (image, text) -> answer, so that questions repeated across test
/// files (POPE's positive questions appear in all three splits) are generated once.
fn answer_memo(
    ask: &Asker,
    qs: &[Question],
    cache: &mut FeatureCache,
    memo: &mut std::collections::HashMap<(PathBuf, String), String>,
    what: &str,
) -> Result<Vec<String>> {
    let mut todo: Vec<Question> = Vec::new();
    for q in qs {
        let key = (q.image.clone(), q.text.clone());
        if !memo.contains_key(&key) && !todo.iter().any(|t| t.image == q.image && t.text == q.text)
        {
            todo.push(q.clone());
        }
    }
    let answers = ask.answer(&todo, cache, &|i| i, what)?;
    for (q, a) in todo.into_iter().zip(answers) {
        memo.insert((q.image, q.text), a);
    }
    Ok(qs
        .iter()
        .map(|q| memo[&(q.image.clone(), q.text.clone())].clone())
        .collect())
}

/// Scores of the `shapes` benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShapesScores {
    /// VQAv2 accuracy × 100, overall and per question kind
    pub vqa: f64,
    pub vqa_by_type: BTreeMap<String, f64>,
    pub pope: BTreeMap<String, PopeMetrics>,
    pub mme: BTreeMap<String, MmeScore>,
    pub mme_total: f64,
    pub cider: Option<f64>,
    pub bleu4: Option<f64>,
    /// a few (question, answer, prediction) examples
    pub examples: Vec<(String, String, String)>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    crate::model::config::read_json(path)
}

fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| anyhow::anyhow!("{}: line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

fn str_field<'a>(v: &'a serde_json::Value, field: &str, file: &Path) -> Result<&'a str> {
    v.get(field)
        .and_then(|x| x.as_str())
        .with_context(|| format!("{}: missing string field `{field}`", file.display()))
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
}

/// Evaluates a model on the shapes test sets. `ask` answers short questions; `caption`
/// (plain template) generates captions.
pub fn eval_shapes(
    e: &ShapesEval,
    ask: &Asker,
    caption: Option<&Asker>,
    cache: &mut FeatureCache,
) -> Result<ShapesScores> {
    let img = |name: &str| e.data.join("images").join(name);
    let within = |name: &str, limit: Option<usize>| -> bool {
        match limit {
            None => true,
            Some(n) => name
                .strip_prefix("test_")
                .and_then(|s| s.strip_suffix(".png"))
                .and_then(|s| s.parse::<usize>().ok())
                .is_some_and(|i| i < n),
        }
    };
    let keep_image = |name: &str| within(name, e.limit);
    let keep_small = |name: &str| within(name, e.limit_small.or(e.limit));
    let suffix = format!("\n{}", crate::data::shapes::SHORT);
    // VQA
    let qf = e.data.join("vqa_test_questions.json");
    let af = e.data.join("vqa_test_annotations.json");
    let qs = read_json(&qf)?;
    let anns = read_json(&af)?;
    let anns: BTreeMap<u64, &serde_json::Value> = anns["annotations"]
        .as_array()
        .with_context(|| format!("{}: missing `annotations`", af.display()))?
        .iter()
        .filter_map(|a| Some((a["question_id"].as_u64()?, a)))
        .collect();
    let mut vqa_items = Vec::new();
    for q in qs["questions"]
        .as_array()
        .with_context(|| format!("{}: missing `questions`", qf.display()))?
    {
        let image = str_field(q, "image", &qf)?;
        if !keep_image(image) {
            continue;
        }
        let qid = q["question_id"]
            .as_u64()
            .with_context(|| format!("{}: missing `question_id`", qf.display()))?;
        let ann = anns
            .get(&qid)
            .with_context(|| format!("{}: no annotation for question {qid}", af.display()))?;
        vqa_items.push((
            Question {
                image: img(image),
                text: format!("{}{suffix}", str_field(q, "question", &qf)?),
            },
            *ann,
        ));
    }
    // wrong-image control: every question is shown the image of another test scene (that of
    // the question half the list away)
    let shifted = |qs: &[Question]| -> Vec<Question> {
        let n = qs.len();
        if !e.wrong_image || n < 2 {
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
    };
    let mut memo = std::collections::HashMap::new();
    let questions: Vec<Question> =
        shifted(&vqa_items.iter().map(|(q, _)| q.clone()).collect::<Vec<_>>());
    let preds = answer_memo(ask, &questions, cache, &mut memo, "vqa")?;
    let mut by_type: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut all = Vec::new();
    let mut examples = Vec::new();
    for ((q, ann), p) in vqa_items.iter().zip(&preds) {
        let gts: Vec<String> = ann["answers"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|a| a["answer"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let acc = vqa_accuracy(p, &gts);
        let kind = ann["query"]
            .as_object()
            .and_then(|o| o.keys().next().cloned())
            .unwrap_or_else(|| ann["query"].as_str().unwrap_or("other").to_string());
        by_type.entry(kind).or_default().push(acc);
        all.push(acc);
        if examples.len() < 8 {
            examples.push((
                q.text.replace(&suffix, ""),
                gts.first().cloned().unwrap_or_default(),
                p.clone(),
            ));
        }
    }
    let mean = |v: &[f64]| 100.0 * v.iter().sum::<f64>() / v.len().max(1) as f64;
    // POPE
    let mut pope = BTreeMap::new();
    for split in ["random", "popular", "adversarial"] {
        let f = e.data.join(format!("pope_test_{split}.jsonl"));
        let rows: Vec<serde_json::Value> = read_jsonl(&f)?
            .into_iter()
            .filter(|r| r["image"].as_str().is_some_and(keep_small))
            .collect();
        let qs: Vec<Question> = rows
            .iter()
            .map(|r| {
                Ok(Question {
                    image: img(str_field(r, "image", &f)?),
                    text: format!("{}{suffix}", str_field(r, "text", &f)?),
                })
            })
            .collect::<Result<_>>()?;
        let qs = shifted(&qs);
        let answers = answer_memo(ask, &qs, cache, &mut memo, &format!("pope {split}"))?;
        let labels: Vec<&str> = rows
            .iter()
            .map(|r| r["label"].as_str().unwrap_or("no"))
            .collect();
        let preds: Vec<bool> = answers.iter().map(|a| pope_parse(a)).collect();
        pope.insert(split.to_string(), pope_metrics(&labels, &preds));
    }
    // MME-style
    let f = e.data.join("mme_test.jsonl");
    let rows: Vec<serde_json::Value> = read_jsonl(&f)?
        .into_iter()
        .filter(|r| r["image"].as_str().is_some_and(keep_small))
        .collect();
    let qs: Vec<Question> = rows
        .iter()
        .map(|r| {
            Ok(Question {
                image: img(str_field(r, "image", &f)?),
                text: str_field(r, "text", &f)?.to_string(),
            })
        })
        .collect::<Result<_>>()?;
    let qs = shifted(&qs);
    let answers = answer_memo(ask, &qs, cache, &mut memo, "mme")?;
    let mut per_cat: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (r, a) in rows.iter().zip(&answers) {
        per_cat
            .entry(str_field(r, "category", &f)?.to_string())
            .or_default()
            .push((str_field(r, "answer", &f)?.to_string(), a.clone()));
    }
    let mme: BTreeMap<String, MmeScore> = per_cat
        .iter()
        .map(|(k, v)| {
            let items: Vec<(&str, &str)> =
                v.iter().map(|(g, p)| (g.as_str(), p.as_str())).collect();
            (k.clone(), mme_subtask(&items))
        })
        .collect();
    let mme_total = mme_totals(&mme, false).values().sum();
    // captions
    let (mut cider, mut bleu4) = (None, None);
    if let Some(cap) = caption.filter(|_| e.captions) {
        let f = e.data.join("captions_test.json");
        let c = read_json(&f)?;
        let images = c["images"]
            .as_array()
            .with_context(|| format!("{}: missing `images`", f.display()))?;
        let mut refs: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for a in c["annotations"]
            .as_array()
            .with_context(|| format!("{}: missing `annotations`", f.display()))?
        {
            refs.entry(a["image_id"].as_u64().unwrap_or(0))
                .or_default()
                .push(ptb_tokenize(str_field(a, "caption", &f)?));
        }
        let kept: Vec<&serde_json::Value> = images
            .iter()
            .filter(|i| i["file_name"].as_str().is_some_and(keep_small))
            .collect();
        let qs: Vec<Question> = kept
            .iter()
            .map(|i| {
                Ok(Question {
                    image: img(str_field(i, "file_name", &f)?),
                    text: e.caption_prompt.clone(),
                })
            })
            .collect::<Result<_>>()?;
        let caps = cap.answer(&qs, cache, &|i| i, "captions")?;
        let r: Vec<Vec<String>> = kept
            .iter()
            .map(|i| {
                refs.get(&i["id"].as_u64().unwrap_or(0))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        let h: Vec<String> = caps.iter().map(|c| ptb_tokenize(c)).collect();
        cider = Some(cider_d(&r, &h).0);
        bleu4 = Some(bleu(&r, &h).0[3]);
        if let (Some(i), Some(c)) = (kept.first(), caps.first()) {
            examples.push((
                "(caption)".into(),
                refs.get(&i["id"].as_u64().unwrap_or(0))
                    .and_then(|v| v.first().cloned())
                    .unwrap_or_default(),
                c.clone(),
            ));
        }
    }
    Ok(ShapesScores {
        vqa: mean(&all),
        vqa_by_type: by_type.iter().map(|(k, v)| (k.clone(), mean(v))).collect(),
        pope,
        mme,
        mme_total,
        cider,
        bleu4,
        examples,
    })
}
