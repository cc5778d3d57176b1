//! POPE: `coco_pope_{random,popular,adversarial}.json`, one JSON object per line with
//! `question_id`, `image`, `text`, `label`; answers as JSON lines `question_id`, `text`;
//! accuracy, precision, recall, F1 and yes-ratio per split, parsed as POPE's evaluate.py
//! does.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::item::{Item, Truth, check_coverage, field, id_text, image_in, str_of};
use crate::eval::metrics::{PopeMetrics, pope_metrics, pope_parse};
use crate::util::files::{list_dir, read_jsonl, write_atomically};

/// The POPE split a file holds: random, popular or adversarial if its name says so, else its
/// stem.
pub fn split_of(file: &Path) -> String {
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
pub fn files(data: &Path) -> Result<Vec<PathBuf>> {
    if data.is_file() {
        return Ok(vec![data.to_path_buf()]);
    }
    let files = list_dir(data, |p| {
        let n = p
            .file_name()
            .map(|s| s.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        n.contains("pope") && (n.ends_with(".json") || n.ends_with(".jsonl"))
    })?;
    if files.is_empty() {
        bail!(
            "{}: no POPE files (coco_pope_random.json, ...)",
            data.display()
        );
    }
    Ok(files)
}

/// POPE items of one question file (JSON lines with question_id, image, text, label).
pub fn load(file: &Path, images: &Path) -> Result<Vec<Item>> {
    let split = split_of(file);
    read_jsonl::<Value>(file)?
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
                image: image_in(images, str_of(r, "image", file, &at)?, file, &at)?,
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

/// POPE answers (JSONL `question_id`, `text`) against a label file (`question_id`, `label`).
pub fn read_results(
    pred: &Path,
    labels: &Path,
    partial: bool,
) -> Result<(Vec<Item>, Vec<String>, String)> {
    let split = split_of(labels);
    let mut by_id: HashMap<String, String> = HashMap::new();
    for (i, r) in read_jsonl::<Value>(labels)?.iter().enumerate() {
        let at = format!("line {}", i + 1);
        by_id.insert(
            id_text(field(r, "question_id", labels, &at)?),
            str_of(r, "label", labels, &at)?.to_lowercase(),
        );
    }
    let mut items = Vec::new();
    let mut preds = Vec::new();
    for (i, r) in read_jsonl::<Value>(pred)?.iter().enumerate() {
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
    let coverage = check_coverage(pred, &items, by_id.len(), partial)?;
    Ok((items, preds, coverage))
}

/// The metrics of answered POPE items per split (empty without any).
pub fn score(answered: &[(&Item, &str)]) -> BTreeMap<String, PopeMetrics> {
    let mut pope: BTreeMap<&str, (Vec<&str>, Vec<bool>)> = BTreeMap::new();
    for (it, p) in answered {
        if let Truth::Pope { split, label, .. } = &it.truth {
            let e = pope.entry(split).or_default();
            e.0.push(label);
            e.1.push(pope_parse(p));
        }
    }
    pope.into_iter()
        .map(|(k, (l, p))| (k.to_string(), pope_metrics(&l, &p)))
        .collect()
}

/// Writes `pope_<split>_answers.jsonl` (`question_id`, `text`) per split under `dir`.
pub fn write_results(dir: &Path, answered: &[(&Item, &str)]) -> Result<Vec<PathBuf>> {
    let mut by_split: BTreeMap<String, String> = BTreeMap::new();
    for (it, p) in answered {
        if let Truth::Pope {
            split, question_id, ..
        } = &it.truth
        {
            let line = serde_json::json!({"question_id": question_id, "text": p});
            by_split
                .entry(split.clone())
                .or_default()
                .push_str(&format!("{line}\n"));
        }
    }
    let mut written = Vec::new();
    for (split, text) in by_split {
        let path = dir.join(format!("pope_{split}_answers.jsonl"));
        write_atomically(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}
