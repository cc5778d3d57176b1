//! Benchmarks in their usual file formats, and their scores with the official metrics.
//!
//! Readers turn each benchmark's files into `Item`s (an image, the question as the benchmark
//! words it, and the ground truth); `score` turns answered items into `Scores`. The same
//! scorer serves `lntune eval` (items answered by a model) and `lntune score` (items read
//! from a predictions file in the official submission format), so both give equal numbers.
//!
//! Formats read:
//! - VQAv2: the official questions JSON (`{"questions": [{"question_id", "image_id",
//!   "question"}]}`) and annotations JSON (`{"annotations": [{"question_id", "answers":
//!   [{"answer"}], "answer_type"}]}`); images `COCO_val2014_<12-digit id>.jpg` (or a
//!   question's own `image` field).
//! - POPE: `coco_pope_{random,popular,adversarial}.json`, one JSON object per line with
//!   `question_id`, `image`, `text`, `label`.
//! - MME: the release folder (one folder per subtask: `images/` + `questions_answers_YN/`, or
//!   images next to same-named .txt files; each line `question<TAB>answer`), or a JSONL
//!   question file (`image`, `text`, `category`, and `answer` or the release folder for it).
//! - Captions: Karpathy-split JSON (`dataset_coco.json`, `dataset_flickr30k.json`: `images`
//!   with `filename`, `split`, `sentences[].raw`) or COCO-style (`images` + `annotations`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::metrics::{
    MmeScore, PopeMetrics, bleu, cider_d, evalai_process, mme_subtask, mme_totals, pope_metrics,
    pope_parse, ptb_tokenize, vqa_accuracy,
};
use crate::rng::Rng;

/// A benchmark's ground truth for one item.
#[derive(Debug, Clone, PartialEq)]
pub enum Truth {
    Vqa {
        question_id: u64,
        answers: Vec<String>,
        answer_type: String,
    },
    Pope {
        split: String,
        question_id: Value,
        label: String,
    },
    Mme {
        subtask: String,
        /// the image's file name (MME's result files are keyed by it)
        image_name: String,
        answer: String,
    },
    Caption {
        image_id: u64,
        refs: Vec<String>,
    },
}

impl Truth {
    /// Captions are asked with the caption prompt; everything else is a short question.
    pub fn is_caption(&self) -> bool {
        matches!(self, Truth::Caption { .. })
    }
}

/// One question of a benchmark.
#[derive(Debug, Clone)]
pub struct Item {
    /// unique within a run: `vqav2/<qid>`, `pope/<split>/<qid>`, `mme/<subtask>/<image>/<k>`,
    /// `caption/<image id>`
    pub id: String,
    pub image: PathBuf,
    /// the question as the benchmark words it (empty for captions)
    pub question: String,
    pub truth: Truth,
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))
}

pub fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&read_text(path)?)
        .map_err(|e| anyhow::anyhow!("{}: malformed JSON: {e}", path.display()))
}

/// JSON objects one per line (blank lines skipped).
pub fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    read_text(path)?
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                anyhow::anyhow!("{}: line {}: malformed JSON: {e}", path.display(), i + 1)
            })
        })
        .collect()
}

fn field<'a>(v: &'a Value, name: &str, file: &Path, at: &str) -> Result<&'a Value> {
    v.get(name)
        .filter(|x| !x.is_null())
        .with_context(|| format!("{}: {at}: missing field `{name}`", file.display()))
}

fn str_of<'a>(v: &'a Value, name: &str, file: &Path, at: &str) -> Result<&'a str> {
    field(v, name, file, at)?
        .as_str()
        .with_context(|| format!("{}: {at}: field `{name}` is not a string", file.display()))
}

fn u64_of(v: &Value, name: &str, file: &Path, at: &str) -> Result<u64> {
    let x = field(v, name, file, at)?;
    x.as_u64()
        .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
        .with_context(|| {
            format!(
                "{}: {at}: field `{name}` is not a non-negative integer",
                file.display()
            )
        })
}

fn array_of<'a>(v: &'a Value, name: &str, file: &Path) -> Result<&'a Vec<Value>> {
    v.get(name)
        .and_then(|x| x.as_array())
        .with_context(|| format!("{}: missing array `{name}`", file.display()))
}

/// A JSON id (number or string) as text.
pub fn id_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn existing(path: PathBuf, file: &Path, at: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "{}: {at}: image {} not found",
            file.display(),
            path.display()
        )
    }
}

// ---------------------------------------------------------------------------------------
// VQAv2

/// The official annotations file's entries by question id.
fn vqa_annotations<'a>(a: &'a Value, annotations: &Path) -> Result<HashMap<u64, &'a Value>> {
    let mut anns = HashMap::new();
    for (i, ann) in array_of(a, "annotations", annotations)?.iter().enumerate() {
        let at = format!("annotations[{i}]");
        anns.insert(u64_of(ann, "question_id", annotations, &at)?, ann);
    }
    Ok(anns)
}

/// The ground truth of question `qid`: its answers (never none) and answer type.
fn vqa_truth(anns: &HashMap<u64, &Value>, qid: u64, annotations: &Path) -> Result<Truth> {
    let ann = anns.get(&qid).with_context(|| {
        format!(
            "{}: no annotation for question_id {qid}",
            annotations.display()
        )
    })?;
    let at = format!("annotation of question {qid}");
    let answers = array_of(ann, "answers", annotations)?
        .iter()
        .map(|x| str_of(x, "answer", annotations, &at).map(String::from))
        .collect::<Result<Vec<_>>>()?;
    if answers.is_empty() {
        bail!("{}: {at}: `answers` is empty", annotations.display());
    }
    let answer_type = ann
        .get("answer_type")
        .and_then(|x| x.as_str())
        .unwrap_or("other")
        .to_string();
    Ok(Truth::Vqa {
        question_id: qid,
        answers,
        answer_type,
    })
}

/// VQAv2 items from the official questions and annotations files. Images are looked up in
/// `images` as the question's `image` field if it has one, else as
/// `COCO_<data_subtype>_<12-digit image id>.jpg`, `<12-digit id>.jpg` or `<id>.jpg`.
pub fn load_vqav2(questions: &Path, annotations: &Path, images: &Path) -> Result<Vec<Item>> {
    let q = read_json(questions)?;
    let a = read_json(annotations)?;
    let subtype = q
        .get("data_subtype")
        .and_then(|s| s.as_str())
        .unwrap_or("val2014")
        .to_string();
    let anns = vqa_annotations(&a, annotations)?;
    let mut items = Vec::new();
    for (i, row) in array_of(&q, "questions", questions)?.iter().enumerate() {
        let at = format!("questions[{i}]");
        let qid = u64_of(row, "question_id", questions, &at)?;
        let question = str_of(row, "question", questions, &at)?.to_string();
        let image = match row.get("image").and_then(|x| x.as_str()) {
            Some(name) => existing(images.join(name), questions, &at)?,
            None => {
                let id = u64_of(row, "image_id", questions, &at)?;
                let candidates = [
                    format!("COCO_{subtype}_{id:012}.jpg"),
                    format!("{id:012}.jpg"),
                    format!("{id}.jpg"),
                ];
                candidates
                    .iter()
                    .map(|c| images.join(c))
                    .find(|p| p.is_file())
                    .with_context(|| {
                        format!(
                            "{}: {at}: no image for image_id {id} in {} (tried {})",
                            questions.display(),
                            images.display(),
                            candidates.join(", ")
                        )
                    })?
            }
        };
        items.push(Item {
            id: format!("vqav2/{qid}"),
            image,
            question,
            truth: vqa_truth(&anns, qid, annotations)?,
        });
    }
    Ok(items)
}

// ---------------------------------------------------------------------------------------
// POPE

/// The POPE split a file holds: random, popular or adversarial if its name says so, else its
/// stem.
pub fn pope_split_of(file: &Path) -> String {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    ["random", "popular", "adversarial"]
        .into_iter()
        .find(|s| stem.contains(s))
        .map(String::from)
        .unwrap_or(stem)
}

/// The POPE files of a directory (names containing `pope`, .json or .jsonl), or the file
/// itself.
pub fn pope_files(data: &Path) -> Result<Vec<PathBuf>> {
    if data.is_file() {
        return Ok(vec![data.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(data)
        .with_context(|| format!("{}: cannot list", data.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p
                .file_name()
                .map(|s| s.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            n.contains("pope") && (n.ends_with(".json") || n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no POPE files (coco_pope_random.json, ...)",
            data.display()
        );
    }
    Ok(files)
}

/// POPE items of one question file (JSON lines with question_id, image, text, label).
pub fn load_pope(file: &Path, images: &Path) -> Result<Vec<Item>> {
    let split = pope_split_of(file);
    read_jsonl(file)?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let at = format!("line {}", i + 1);
            let qid = field(r, "question_id", file, &at)?.clone();
            let label = str_of(r, "label", file, &at)?.to_lowercase();
            if label != "yes" && label != "no" {
                bail!(
                    "{}: {at}: field `label` is `{label}`, expected yes or no",
                    file.display()
                );
            }
            Ok(Item {
                id: format!("pope/{split}/{}", id_text(&qid)),
                image: existing(images.join(str_of(r, "image", file, &at)?), file, &at)?,
                question: str_of(r, "text", file, &at)?.to_string(),
                truth: Truth::Pope {
                    split: split.clone(),
                    question_id: qid,
                    label,
                },
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// MME

const IMAGE_EXTS: [&str; 4] = ["png", "jpg", "jpeg", "PNG"];

/// MME items from the release folder: every subtask folder's question files, two lines
/// (question, answer) per image, in file-name order.
pub fn load_mme_folder(root: &Path) -> Result<Vec<Item>> {
    let mut subtasks: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("{}: cannot list", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && super::metrics::mme_eval_type(
                    &p.file_name().unwrap_or_default().to_string_lossy(),
                )
                .is_some()
        })
        .collect();
    subtasks.sort();
    if subtasks.is_empty() {
        bail!(
            "{}: no MME subtask folders (existence, count, ..., code_reasoning)",
            root.display()
        );
    }
    let mut items = Vec::new();
    for dir in subtasks {
        let subtask = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let (qdir, idir) = if dir.join("questions_answers_YN").is_dir() {
            (dir.join("questions_answers_YN"), dir.join("images"))
        } else {
            (dir.clone(), dir.clone())
        };
        let mut txts: Vec<PathBuf> = std::fs::read_dir(&qdir)
            .with_context(|| format!("{}: cannot list", qdir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        txts.sort();
        for txt in txts {
            let stem = txt
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            let image = IMAGE_EXTS
                .iter()
                .map(|e| idir.join(format!("{stem}.{e}")))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "{}: no image {stem}.png/.jpg in {}",
                        txt.display(),
                        idir.display()
                    )
                })?;
            let image_name = image
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            for (k, line) in read_text(&txt)?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .enumerate()
            {
                let (q, a) = line.split_once('\t').with_context(|| {
                    format!(
                        "{}: line {}: expected `question<TAB>answer`",
                        txt.display(),
                        k + 1
                    )
                })?;
                items.push(Item {
                    id: format!("mme/{subtask}/{image_name}/{k}"),
                    image: image.clone(),
                    question: q.trim().to_string(),
                    truth: Truth::Mme {
                        subtask: subtask.clone(),
                        image_name: image_name.clone(),
                        answer: a.trim().to_string(),
                    },
                });
            }
        }
    }
    Ok(items)
}

/// MME items from a JSONL question file (`image`, `text`, `category`, optional `answer`),
/// LLaVA's `llava_mme.jsonl` style. Images are relative to `images`; answers missing from the
/// file come from the release folder `gt_root` (matched by subtask, image and question).
pub fn load_mme_jsonl(file: &Path, images: &Path, gt_root: Option<&Path>) -> Result<Vec<Item>> {
    let gt: HashMap<(String, String, String), String> = match gt_root {
        Some(root) => load_mme_folder(root)?
            .into_iter()
            .filter_map(|i| match i.truth {
                Truth::Mme {
                    subtask,
                    image_name,
                    answer,
                } => Some(((subtask, image_name, i.question), answer)),
                _ => None,
            })
            .collect(),
        None => HashMap::new(),
    };
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    read_jsonl(file)?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let at = format!("line {}", i + 1);
            let rel = str_of(r, "image", file, &at)?;
            let subtask = str_of(r, "category", file, &at)?.to_string();
            let text = str_of(r, "text", file, &at)?.to_string();
            // LLaVA's file appends its short-answer instruction to MME's question
            let question = text
                .trim_end_matches(super::harness::SHORT_ANSWER)
                .trim()
                .to_string();
            let image_name = Path::new(rel)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            let answer = match r.get("answer").and_then(|a| a.as_str()) {
                Some(a) => a.to_string(),
                None => gt
                    .get(&(subtask.clone(), image_name.clone(), question.clone()))
                    .cloned()
                    .with_context(|| {
                        format!(
                            "{}: {at}: no `answer`, and no ground truth for it{}",
                            file.display(),
                            if gt_root.is_some() {
                                " in the MME folder"
                            } else {
                                " (pass the MME release folder with --annotations)"
                            }
                        )
                    })?,
            };
            let k = seen
                .entry((subtask.clone(), image_name.clone()))
                .or_insert(0);
            *k += 1;
            Ok(Item {
                id: format!("mme/{subtask}/{image_name}/{}", *k - 1),
                image: existing(images.join(rel), file, &at)?,
                question,
                truth: Truth::Mme {
                    subtask,
                    image_name,
                    answer,
                },
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Captions

/// Caption items: one per image of `split` (Karpathy JSON) or every image (COCO-style JSON).
pub fn load_captions(file: &Path, images: &Path, split: &str) -> Result<Vec<Item>> {
    let v = read_json(file)?;
    let imgs = array_of(&v, "images", file)?;
    let mut items = Vec::new();
    if v.get("annotations").is_some() {
        // COCO-style: images [{id, file_name}], annotations [{image_id, caption}]
        let mut refs: HashMap<u64, Vec<String>> = HashMap::new();
        for (i, a) in array_of(&v, "annotations", file)?.iter().enumerate() {
            let at = format!("annotations[{i}]");
            refs.entry(u64_of(a, "image_id", file, &at)?)
                .or_default()
                .push(str_of(a, "caption", file, &at)?.to_string());
        }
        for (i, im) in imgs.iter().enumerate() {
            let at = format!("images[{i}]");
            let id = u64_of(im, "id", file, &at)?;
            let refs = refs
                .remove(&id)
                .with_context(|| format!("{}: {at}: image {id} has no captions", file.display()))?;
            items.push(Item {
                id: format!("caption/{id}"),
                image: existing(images.join(str_of(im, "file_name", file, &at)?), file, &at)?,
                question: String::new(),
                truth: Truth::Caption { image_id: id, refs },
            });
        }
    } else {
        // Karpathy: images [{filepath?, filename, split, sentences: [{raw}], cocoid | imgid}]
        for (i, im) in imgs.iter().enumerate() {
            let at = format!("images[{i}]");
            if str_of(im, "split", file, &at)? != split {
                continue;
            }
            let id = match im.get("cocoid") {
                Some(_) => u64_of(im, "cocoid", file, &at)?,
                None => u64_of(im, "imgid", file, &at)?,
            };
            let name = str_of(im, "filename", file, &at)?;
            let image = match im.get("filepath").and_then(|p| p.as_str()) {
                Some(dir) if images.join(dir).join(name).is_file() => images.join(dir).join(name),
                _ => existing(images.join(name), file, &at)?,
            };
            let refs = array_of(im, "sentences", file)?
                .iter()
                .map(|s| str_of(s, "raw", file, &at).map(String::from))
                .collect::<Result<Vec<_>>>()?;
            items.push(Item {
                id: format!("caption/{id}"),
                image,
                question: String::new(),
                truth: Truth::Caption { image_id: id, refs },
            });
        }
        if items.is_empty() {
            bail!("{}: no images in split `{split}`", file.display());
        }
    }
    Ok(items)
}

// ---------------------------------------------------------------------------------------
// Subsets

/// At most `n` items, chosen at random with `seed` but kept in their order. MME items are
/// kept or dropped per image so that acc+ stays defined, and POPE items are drawn per label
/// in the file's proportions (a random 40 of a balanced file could be 26 "yes" and 14 "no",
/// where answering "yes" to everything would score 65%).
pub fn subset(items: Vec<Item>, n: Option<usize>, seed: u64) -> Vec<Item> {
    let Some(n) = n else { return items };
    if items.len() <= n {
        return items;
    }
    let group = |it: &Item| match &it.truth {
        Truth::Mme {
            subtask,
            image_name,
            ..
        } => format!("{subtask}/{image_name}"),
        _ => it.id.clone(),
    };
    let stratum = |it: &Item| match &it.truth {
        Truth::Pope { label, .. } => label.trim().to_lowercase(),
        _ => String::new(),
    };
    let mut groups: Vec<String> = Vec::new();
    let mut size: HashMap<String, usize> = HashMap::new();
    let mut stratum_of: HashMap<String, String> = HashMap::new();
    let mut in_stratum: BTreeMap<String, usize> = BTreeMap::new();
    for it in &items {
        let g = group(it);
        let e = size.entry(g.clone()).or_insert(0);
        if *e == 0 {
            stratum_of.insert(g.clone(), stratum(it));
            groups.push(g);
        }
        *e += 1;
        *in_stratum.entry(stratum(it)).or_insert(0) += 1;
    }
    // each stratum's share of n, largest remainders first so that the quotas sum to n
    let total_items = items.len();
    let mut quota: BTreeMap<String, usize> = in_stratum
        .iter()
        .map(|(k, &c)| (k.clone(), c * n / total_items))
        .collect();
    let mut remainders: Vec<(usize, String)> = in_stratum
        .iter()
        .map(|(k, &c)| (c * n % total_items, k.clone()))
        .collect();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let short = n - quota.values().sum::<usize>();
    for (_, k) in remainders.into_iter().take(short) {
        *quota.get_mut(&k).expect("a stratum") += 1;
    }
    Rng::new(seed).shuffle(&mut groups);
    let mut keep = std::collections::HashSet::new();
    let mut taken: HashMap<String, usize> = HashMap::new();
    for g in groups {
        let st = &stratum_of[&g];
        let t = taken.entry(st.clone()).or_insert(0);
        if *t >= quota[st] {
            continue;
        }
        *t += size[&g];
        keep.insert(g);
    }
    items
        .into_iter()
        .filter(|it| keep.contains(&group(it)))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Scoring

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VqaScores {
    /// official accuracy × 100
    pub overall: f64,
    pub by_answer_type: BTreeMap<String, f64>,
    pub questions: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MmeScores {
    pub subtasks: BTreeMap<String, MmeScore>,
    pub perception: f64,
    pub cognition: f64,
    /// perception without landmark and artwork (the paper authors' harness)
    pub perception_without_landmark_artwork: f64,
    pub questions: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptionScores {
    /// CIDEr-D as pycocoevalcap prints it (papers print it × 100)
    pub cider: f64,
    /// BLEU-1..4 as pycocoevalcap prints them
    pub bleu: [f64; 4],
    pub images: usize,
}

/// Every score of the answered items, grouped by benchmark kind.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Scores {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vqav2: Option<VqaScores>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub pope: BTreeMap<String, PopeMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mme: Option<MmeScores>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captions: Option<CaptionScores>,
}

/// A model's raw answer as it is submitted: VQAv2 answers go through the EvalAI answer
/// processor (as LLaVA's `convert_vqav2_for_submission` does), the rest unchanged.
pub fn submission_answer(item: &Item, raw: &str) -> String {
    match item.truth {
        Truth::Vqa { .. } => evalai_process(raw),
        _ => raw.to_string(),
    }
}

/// Scores items against submitted answers (`preds[i]` answers `items[i]`), the way each
/// official scorer does: VQAv2 accuracy with the official normalization; POPE and MME parse
/// yes/no; captions are PTB tokenized and scored with CIDEr-D and BLEU.
pub fn score(items: &[Item], preds: &[String]) -> Scores {
    assert_eq!(items.len(), preds.len(), "one prediction per item");
    let mut s = Scores::default();
    let mut vqa: Vec<(f64, &str)> = Vec::new();
    let mut pope: BTreeMap<&str, (Vec<&str>, Vec<bool>)> = BTreeMap::new();
    let mut mme: BTreeMap<String, Vec<(&str, &str)>> = BTreeMap::new();
    let mut caps: (Vec<Vec<String>>, Vec<String>) = (vec![], vec![]);
    for (it, p) in items.iter().zip(preds) {
        match &it.truth {
            Truth::Vqa {
                answers,
                answer_type,
                ..
            } => {
                vqa.push((vqa_accuracy(p, answers), answer_type));
            }
            Truth::Pope { split, label, .. } => {
                let e = pope.entry(split).or_default();
                e.0.push(label);
                e.1.push(pope_parse(p));
            }
            Truth::Mme {
                subtask, answer, ..
            } => mme.entry(subtask.clone()).or_default().push((answer, p)),
            Truth::Caption { refs, .. } => {
                caps.0.push(refs.iter().map(|r| ptb_tokenize(r)).collect());
                caps.1.push(ptb_tokenize(p));
            }
        }
    }
    if !vqa.is_empty() {
        let mean = |v: &[f64]| 100.0 * v.iter().sum::<f64>() / v.len() as f64;
        let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (a, t) in &vqa {
            by.entry(t.to_string()).or_default().push(*a);
        }
        s.vqav2 = Some(VqaScores {
            overall: mean(&vqa.iter().map(|x| x.0).collect::<Vec<_>>()),
            by_answer_type: by.iter().map(|(k, v)| (k.clone(), mean(v))).collect(),
            questions: vqa.len(),
        });
    }
    s.pope = pope
        .into_iter()
        .map(|(k, (l, p))| (k.to_string(), pope_metrics(&l, &p)))
        .collect();
    if !mme.is_empty() {
        let questions = mme.values().map(|v| v.len()).sum();
        let subtasks: BTreeMap<String, MmeScore> = mme
            .iter()
            .map(|(k, v)| (k.clone(), mme_subtask(v)))
            .collect();
        let all = mme_totals(&subtasks, false);
        let without = mme_totals(&subtasks, true);
        s.mme = Some(MmeScores {
            perception: all.get("Perception").copied().unwrap_or(0.0),
            cognition: all.get("Cognition").copied().unwrap_or(0.0),
            perception_without_landmark_artwork: without.get("Perception").copied().unwrap_or(0.0),
            subtasks,
            questions,
        });
    }
    if !caps.1.is_empty() {
        let (b, _) = bleu(&caps.0, &caps.1);
        s.captions = Some(CaptionScores {
            cider: cider_d(&caps.0, &caps.1).0,
            bleu: b,
            images: caps.1.len(),
        });
    }
    s
}

impl Scores {
    /// A plain-text table of every score.
    pub fn table(&self) -> String {
        let mut t = String::new();
        if let Some(v) = &self.vqav2 {
            t.push_str(&format!(
                "VQAv2 accuracy      {:>7.2}  ({} questions)\n",
                v.overall, v.questions
            ));
            for (k, x) in &v.by_answer_type {
                t.push_str(&format!("  {k:<18}{x:>7.2}\n"));
            }
        }
        if !self.pope.is_empty() {
            t.push_str("POPE split          acc     prec    recall  F1      yes-ratio\n");
            for (k, m) in &self.pope {
                t.push_str(&format!(
                    "  {k:<16}{:>6.2}  {:>6.2}  {:>6.2}  {:>6.2}  {:>6.2}\n",
                    100.0 * m.accuracy,
                    100.0 * m.precision,
                    100.0 * m.recall,
                    100.0 * m.f1,
                    100.0 * m.yes_ratio
                ));
            }
        }
        if let Some(m) = &self.mme {
            t.push_str(&format!(
                "MME perception      {:>7.2}  (without landmark/artwork {:.2}); cognition {:.2}  ({} questions)\n",
                m.perception, m.perception_without_landmark_artwork, m.cognition, m.questions
            ));
            for (k, x) in &m.subtasks {
                t.push_str(&format!(
                    "  {k:<22}score {:>7.2}  acc {:>6.2}  acc+ {:>6.2}\n",
                    x.score,
                    100.0 * x.acc,
                    100.0 * x.acc_plus
                ));
            }
        }
        if let Some(c) = &self.captions {
            t.push_str(&format!(
                "Captions CIDEr-D    {:>7.4}  BLEU-1..4 {:.4} {:.4} {:.4} {:.4}  ({} images)\n",
                c.cider, c.bleu[0], c.bleu[1], c.bleu[2], c.bleu[3], c.images
            ));
        }
        t
    }

    /// Every number in the scores, for finiteness checks.
    pub fn numbers(&self) -> Vec<f64> {
        let mut v = Vec::new();
        if let Some(q) = &self.vqav2 {
            v.push(q.overall);
            v.extend(q.by_answer_type.values());
        }
        for m in self.pope.values() {
            v.extend([m.accuracy, m.precision, m.recall, m.f1, m.yes_ratio]);
        }
        if let Some(m) = &self.mme {
            v.extend([
                m.perception,
                m.cognition,
                m.perception_without_landmark_artwork,
            ]);
            for s in m.subtasks.values() {
                v.extend([s.acc, s.acc_plus, s.score]);
            }
        }
        if let Some(c) = &self.captions {
            v.push(c.cider);
            v.extend(c.bleu);
        }
        v
    }
}

// ---------------------------------------------------------------------------------------
// Official submission formats, written by `lntune eval` and read by `lntune score`

/// Writes submitted answers in each benchmark's own result format under `dir`:
/// `vqav2_results.json` (`[{"question_id", "answer"}]`), `pope_<split>_answers.jsonl` (`question_id`, `text`), `mme_results/<subtask>.txt`
/// (image, question, ground truth, prediction; tab-separated) and `captions_results.json`
/// (`[{"image_id", "caption"}]`).
pub fn write_official(dir: &Path, items: &[Item], preds: &[String]) -> Result<Vec<PathBuf>> {
    let mut vqa = Vec::new();
    let mut pope: BTreeMap<String, String> = BTreeMap::new();
    let mut mme: BTreeMap<String, String> = BTreeMap::new();
    let mut caps = Vec::new();
    for (it, p) in items.iter().zip(preds) {
        match &it.truth {
            Truth::Vqa { question_id, .. } => {
                vqa.push(serde_json::json!({"question_id": question_id, "answer": p}))
            }
            Truth::Pope {
                split, question_id, ..
            } => {
                let line = serde_json::json!({"question_id": question_id, "text": p});
                pope.entry(split.clone())
                    .or_default()
                    .push_str(&format!("{line}\n"));
            }
            Truth::Mme {
                subtask,
                image_name,
                answer,
            } => {
                let clean = |s: &str| s.replace(['\t', '\n'], " ");
                mme.entry(subtask.clone()).or_default().push_str(&format!(
                    "{image_name}\t{}\t{answer}\t{}\n",
                    clean(&it.question),
                    clean(p)
                ));
            }
            Truth::Caption { image_id, .. } => {
                caps.push(serde_json::json!({"image_id": image_id, "caption": p}))
            }
        }
    }
    let mut written = Vec::new();
    let mut put = |path: PathBuf, text: String| -> Result<()> {
        write_atomically(&path, text.as_bytes())?;
        written.push(path);
        Ok(())
    };
    if !vqa.is_empty() {
        put(dir.join("vqav2_results.json"), serde_json::to_string(&vqa)?)?;
    }
    for (split, text) in pope {
        put(dir.join(format!("pope_{split}_answers.jsonl")), text)?;
    }
    for (subtask, text) in mme {
        std::fs::create_dir_all(dir.join("mme_results"))?;
        put(dir.join("mme_results").join(format!("{subtask}.txt")), text)?;
    }
    if !caps.is_empty() {
        put(
            dir.join("captions_results.json"),
            serde_json::to_string(&caps)?,
        )?;
    }
    Ok(written)
}

/// Writes a file through a temporary sibling and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
    }
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension()
            .map(|e| e.to_string_lossy().to_string())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// VQAv2 results (`[{"question_id", "answer"}]`) against the official questions and
/// annotations: the items of the answered questions and their answers.
pub fn read_vqav2_results(
    pred: &Path,
    questions: &Path,
    annotations: &Path,
) -> Result<(Vec<Item>, Vec<String>)> {
    let q = read_json(questions)?;
    let known: std::collections::HashSet<u64> = array_of(&q, "questions", questions)?
        .iter()
        .enumerate()
        .map(|(i, r)| u64_of(r, "question_id", questions, &format!("questions[{i}]")))
        .collect::<Result<_>>()?;
    let a = read_json(annotations)?;
    let anns = vqa_annotations(&a, annotations)?;
    let res = read_json(pred)?;
    let rows = res
        .as_array()
        .with_context(|| format!("{}: expected a JSON array of results", pred.display()))?;
    let mut items = Vec::new();
    let mut preds = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let at = format!("[{i}]");
        let qid = u64_of(r, "question_id", pred, &at)?;
        if !known.contains(&qid) {
            bail!(
                "{}: {at}: question_id {qid} is not in {}",
                pred.display(),
                questions.display()
            );
        }
        items.push(Item {
            id: format!("vqav2/{qid}"),
            image: PathBuf::new(),
            question: String::new(),
            truth: vqa_truth(&anns, qid, annotations)?,
        });
        preds.push(str_of(r, "answer", pred, &at)?.to_string());
    }
    Ok((items, preds))
}

/// POPE answers (JSONL `question_id`, `text`) against a label file (`question_id`, `label`).
pub fn read_pope_answers(pred: &Path, labels: &Path) -> Result<(Vec<Item>, Vec<String>)> {
    let split = pope_split_of(labels);
    let mut by_id: HashMap<String, String> = HashMap::new();
    for (i, r) in read_jsonl(labels)?.iter().enumerate() {
        let at = format!("line {}", i + 1);
        by_id.insert(
            id_text(field(r, "question_id", labels, &at)?),
            str_of(r, "label", labels, &at)?.to_lowercase(),
        );
    }
    let mut items = Vec::new();
    let mut preds = Vec::new();
    for (i, r) in read_jsonl(pred)?.iter().enumerate() {
        let at = format!("line {}", i + 1);
        let qid = field(r, "question_id", pred, &at)?.clone();
        let label = by_id.get(&id_text(&qid)).with_context(|| {
            format!(
                "{}: {at}: question_id {} has no label in {}",
                pred.display(),
                id_text(&qid),
                labels.display()
            )
        })?;
        items.push(Item {
            id: format!("pope/{split}/{}", id_text(&qid)),
            image: PathBuf::new(),
            question: String::new(),
            truth: Truth::Pope {
                split: split.clone(),
                question_id: qid,
                label: label.clone(),
            },
        });
        preds.push(str_of(r, "text", pred, &at)?.to_string());
    }
    Ok((items, preds))
}

/// MME results: a folder of `<subtask>.txt` files, each line `image<TAB>question<TAB>ground
/// truth<TAB>prediction` (the format of MME's `eval_tool/Your_Results`).
pub fn read_mme_results(dir: &Path) -> Result<(Vec<Item>, Vec<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no <subtask>.txt result files", dir.display());
    }
    let mut items = Vec::new();
    let mut preds = Vec::new();
    for f in files {
        let subtask = f
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if super::metrics::mme_eval_type(&subtask).is_none() {
            bail!("{}: `{subtask}` is not an MME subtask", f.display());
        }
        for (k, line) in read_text(&f)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
        {
            let cols: Vec<&str> = line.split('\t').collect();
            if cols.len() != 4 {
                bail!(
                    "{}: line {}: expected 4 tab-separated columns (image, question, ground truth, prediction), found {}",
                    f.display(),
                    k + 1,
                    cols.len()
                );
            }
            items.push(Item {
                id: format!("mme/{subtask}/{}/{k}", cols[0]),
                image: PathBuf::new(),
                question: cols[1].to_string(),
                truth: Truth::Mme {
                    subtask: subtask.clone(),
                    image_name: cols[0].to_string(),
                    answer: cols[2].trim().to_string(),
                },
            });
            preds.push(cols[3].to_string());
        }
    }
    Ok((items, preds))
}

/// COCO-caption results (`[{"image_id", "caption"}]`) against COCO-style annotations; the
/// images scored are those of the results (as pycocoevalcap's `params['image_id']`).
pub fn read_caption_results(pred: &Path, annotations: &Path) -> Result<(Vec<Item>, Vec<String>)> {
    let a = read_json(annotations)?;
    let mut refs: HashMap<u64, Vec<String>> = HashMap::new();
    for (i, x) in array_of(&a, "annotations", annotations)?.iter().enumerate() {
        let at = format!("annotations[{i}]");
        refs.entry(u64_of(x, "image_id", annotations, &at)?)
            .or_default()
            .push(str_of(x, "caption", annotations, &at)?.to_string());
    }
    let res = read_json(pred)?;
    let rows = res
        .as_array()
        .with_context(|| format!("{}: expected a JSON array of results", pred.display()))?;
    let mut items = Vec::new();
    let mut preds = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, r) in rows.iter().enumerate() {
        let at = format!("[{i}]");
        let id = u64_of(r, "image_id", pred, &at)?;
        if !seen.insert(id) {
            bail!(
                "{}: {at}: image_id {id} has a second caption",
                pred.display()
            );
        }
        let refs = refs.get(&id).with_context(|| {
            format!(
                "{}: {at}: image_id {id} has no reference captions in {}",
                pred.display(),
                annotations.display()
            )
        })?;
        items.push(Item {
            id: format!("caption/{id}"),
            image: PathBuf::new(),
            question: String::new(),
            truth: Truth::Caption {
                image_id: id,
                refs: refs.clone(),
            },
        });
        preds.push(str_of(r, "caption", pred, &at)?.to_string());
    }
    Ok((items, preds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pope(i: usize, label: &str) -> Item {
        Item {
            id: format!("pope/random/{i}"),
            image: PathBuf::from(format!("{}.png", i / 2)),
            question: "Is there a cat in the image?".into(),
            truth: Truth::Pope {
                split: "random".into(),
                question_id: Value::from(i),
                label: label.into(),
            },
        }
    }

    #[test]
    fn pope_subsets_keep_the_label_balance() {
        // a balanced file: every seed's subset of 40 has 20 of each label, in file order
        let items: Vec<Item> = (0..300)
            .map(|i| pope(i, if i % 2 == 0 { "yes" } else { "no" }))
            .collect();
        for seed in 0..20 {
            let s = subset(items.clone(), Some(40), seed);
            let yes = s
                .iter()
                .filter(|it| matches!(&it.truth, Truth::Pope { label, .. } if label == "yes"))
                .count();
            assert_eq!((s.len(), yes), (40, 20), "seed {seed}");
            let ids: Vec<&String> = s.iter().map(|it| &it.id).collect();
            let mut sorted = ids.clone();
            sorted.sort_by_key(|id| id.rsplit('/').next().unwrap().parse::<usize>().unwrap());
            assert_eq!(ids, sorted);
        }
        // 3:1 proportions, 10 of 40 items: quotas 7.5 "yes" and 2.5 "no"; the one item left
        // goes to the largest remainder, here a tie, broken by label name ("no")
        let skewed: Vec<Item> = (0..40)
            .map(|i| pope(i, if i % 4 == 0 { "no" } else { "yes" }))
            .collect();
        let s = subset(skewed, Some(10), 1);
        let no = s
            .iter()
            .filter(|it| matches!(&it.truth, Truth::Pope { label, .. } if label == "no"))
            .count();
        assert_eq!((s.len(), no), (10, 3));
    }

    #[test]
    fn mme_subsets_keep_both_questions_of_an_image() {
        let items: Vec<Item> = (0..40)
            .map(|i| Item {
                id: format!("mme/color/{}/{}", i / 2, i % 2),
                image: PathBuf::from(format!("{}.png", i / 2)),
                question: "Is the car red?".into(),
                truth: Truth::Mme {
                    subtask: "color".into(),
                    image_name: format!("{}.png", i / 2),
                    answer: if i % 2 == 0 { "Yes" } else { "No" }.into(),
                },
            })
            .collect();
        let s = subset(items, Some(9), 3);
        // groups of two: the last one taken may pass n by one
        assert_eq!(s.len(), 10);
        for pair in s.chunks(2) {
            assert_eq!(pair[0].image, pair[1].image);
        }
    }
}
