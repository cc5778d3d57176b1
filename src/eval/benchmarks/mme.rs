//! MME: the release folder (one folder per subtask: `images/` + `questions_answers_YN/`, or
//! images next to same-named .txt files; each line `question<TAB>answer`), or a JSONL
//! question file (`image`, `text`, `category`, and `answer` or the release folder for it);
//! results in the format of MME's `eval_tool/Your_Results` (one `<subtask>.txt` per
//! subtask: image, question, ground truth, prediction); per-subtask accuracy, acc+ and
//! score, and the perception and cognition totals.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::item::{Item, Truth, image_in, str_of};
use crate::data::template::SHORT_ANSWER;
use crate::eval::metrics::{MmeScore, mme_eval_type, mme_subtask, mme_totals};
use crate::util::files::{list_dir, read_jsonl, read_text, write_atomically};

fn is_txt(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "txt")
}

const IMAGE_EXTS: [&str; 4] = ["png", "jpg", "jpeg", "PNG"];

/// MME items from the release folder: every subtask folder's question files, two lines
/// (question, answer) per image, in file-name order.
pub fn load_folder(root: &Path) -> Result<Vec<Item>> {
    let subtasks = list_dir(root, |p| {
        p.is_dir() && mme_eval_type(&p.file_name().unwrap_or_default().to_string_lossy()).is_some()
    })?;
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
        for txt in list_dir(&qdir, is_txt)? {
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
pub fn load_jsonl(file: &Path, images: &Path, gt_root: Option<&Path>) -> Result<Vec<Item>> {
    let gt: HashMap<(String, String, String), String> = match gt_root {
        Some(root) => load_folder(root)?
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
    read_jsonl::<Value>(file)?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let at = format!("line {}", i + 1);
            let rel = str_of(r, "image", file, &at)?;
            let subtask = str_of(r, "category", file, &at)?.to_string();
            let text = str_of(r, "text", file, &at)?.to_string();
            // LLaVA's file appends its short-answer instruction to MME's question
            let question = text.trim_end_matches(SHORT_ANSWER).trim().to_string();
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
                image: image_in(images, rel, file, &at)?,
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

/// Reads an MME results folder: one `<subtask>.txt` per subtask, lines of
/// `image<TAB>question<TAB>ground truth<TAB>prediction` (the format of MME's
/// `eval_tool/Your_Results`). MME asks two questions per image and its acc+ scores them as
/// a pair, so an image must have exactly two distinct questions; with `partial`, images
/// that do not are left out of the scores (and counted in the coverage).
pub fn read_results(dir: &Path, partial: bool) -> Result<(Vec<Item>, Vec<String>, String)> {
    let files = list_dir(dir, is_txt)?;
    if files.is_empty() {
        bail!("{}: no <subtask>.txt result files", dir.display());
    }
    let mut items = Vec::new();
    let mut preds = Vec::new();
    let (mut images, mut left_out) = (0usize, 0usize);
    for f in &files {
        let subtask = f.file_stem().unwrap_or_default().to_string_lossy();
        if mme_eval_type(&subtask).is_none() {
            bail!("{}: `{subtask}` is not an MME subtask", f.display());
        }
    }
    for f in files {
        let subtask = f
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        // each image's lines, in the order images first appear
        let mut order: Vec<String> = Vec::new();
        let mut by_image: BTreeMap<String, Vec<(Item, String)>> = BTreeMap::new();
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
            let image = cols[0].to_string();
            let lines = by_image.entry(image.clone()).or_insert_with(|| {
                order.push(image.clone());
                Vec::new()
            });
            if lines.iter().any(|(it, _)| it.question == cols[1]) {
                bail!(
                    "{}: line {}: image `{image}` with question `{}` is answered twice",
                    f.display(),
                    k + 1,
                    cols[1]
                );
            }
            lines.push((
                Item {
                    id: format!("mme/{subtask}/{image}/{}", cols[1]),
                    image: PathBuf::new(),
                    question: cols[1].to_string(),
                    truth: Truth::Mme {
                        subtask: subtask.clone(),
                        image_name: image.clone(),
                        answer: cols[2].trim().to_string(),
                    },
                },
                cols[3].to_string(),
            ));
        }
        for image in order {
            let lines = by_image.remove(&image).unwrap_or_default();
            if lines.len() != 2 {
                if !partial {
                    bail!(
                        "{}: image `{image}` has {} question(s); MME asks two per image and acc+ needs both (score the complete pairs alone with --partial)",
                        f.display(),
                        lines.len()
                    );
                }
                left_out += lines.len();
                continue;
            }
            images += 1;
            for (it, p) in lines {
                items.push(it);
                preds.push(p);
            }
        }
    }
    let coverage = format!(
        "{images} images with both questions{}",
        if left_out > 0 {
            format!(", {left_out} answers of incomplete pairs left out")
        } else {
            String::new()
        }
    );
    Ok((items, preds, coverage))
}

/// Per-subtask scores and the totals.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MmeScores {
    pub subtasks: BTreeMap<String, MmeScore>,
    pub perception: f64,
    pub cognition: f64,
    /// perception without landmark and artwork (the paper authors' harness)
    pub perception_without_landmark_artwork: f64,
    pub questions: usize,
}

/// The scores of answered MME items (None without any).
pub fn score(answered: &[(&Item, &str)]) -> Option<MmeScores> {
    let mut mme: BTreeMap<String, Vec<(&str, &str)>> = BTreeMap::new();
    for (it, p) in answered {
        if let Truth::Mme {
            subtask, answer, ..
        } = &it.truth
        {
            mme.entry(subtask.clone()).or_default().push((answer, p));
        }
    }
    if mme.is_empty() {
        return None;
    }
    let questions = mme.values().map(|v| v.len()).sum();
    let subtasks: BTreeMap<String, MmeScore> = mme
        .iter()
        .map(|(k, v)| (k.clone(), mme_subtask(v)))
        .collect();
    let all = mme_totals(&subtasks, false);
    let without = mme_totals(&subtasks, true);
    Some(MmeScores {
        perception: all.get("Perception").copied().unwrap_or(0.0),
        cognition: all.get("Cognition").copied().unwrap_or(0.0),
        perception_without_landmark_artwork: without.get("Perception").copied().unwrap_or(0.0),
        subtasks,
        questions,
    })
}

/// Writes `mme_results/<subtask>.txt` (image, question, ground truth, prediction;
/// tab-separated) per subtask under `dir`.
pub fn write_results(dir: &Path, answered: &[(&Item, &str)]) -> Result<Vec<PathBuf>> {
    let mut by_subtask: BTreeMap<String, String> = BTreeMap::new();
    for (it, p) in answered {
        if let Truth::Mme {
            subtask,
            image_name,
            answer,
        } = &it.truth
        {
            let clean = |s: &str| s.replace(['\t', '\n'], " ");
            by_subtask
                .entry(subtask.clone())
                .or_default()
                .push_str(&format!(
                    "{image_name}\t{}\t{answer}\t{}\n",
                    clean(&it.question),
                    clean(p)
                ));
        }
    }
    let mut written = Vec::new();
    for (subtask, text) in by_subtask {
        let path = dir.join("mme_results").join(format!("{subtask}.txt"));
        write_atomically(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}
