//! VQAv2: the official questions JSON (`{"questions": [{"question_id", "image_id",
//! "question"}]}`) and annotations JSON (`{"annotations": [{"question_id", "answers":
//! [{"answer"}], "answer_type"}]}`), images `COCO_val2014_<12-digit id>.jpg` (or a question's
//! own `image` field); the results file `[{"question_id", "answer"}]` (answers through the
//! EvalAI processor, as LLaVA's `convert_vqav2_for_submission` does); the official accuracy
//! overall and per answer type.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::item::{
    Item, Truth, array_of, check_coverage, image_in, str_of, u64_of, write_result_rows,
};
use crate::eval::metrics::{evalai_process, vqa_accuracy};
use crate::util::files::read_json;

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
pub fn load(questions: &Path, annotations: &Path, images: &Path) -> Result<Vec<Item>> {
    let q: Value = read_json(questions)?;
    let a: Value = read_json(annotations)?;
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
            Some(name) => image_in(images, name, questions, &at)?,
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

/// VQAv2 results (`[{"question_id", "answer"}]`) against the official questions and
/// annotations: the items of the answered questions and their answers.
pub fn read_results(
    pred: &Path,
    questions: &Path,
    annotations: &Path,
    partial: bool,
) -> Result<(Vec<Item>, Vec<String>, String)> {
    let q: Value = read_json(questions)?;
    let known: std::collections::HashSet<u64> = array_of(&q, "questions", questions)?
        .iter()
        .enumerate()
        .map(|(i, r)| u64_of(r, "question_id", questions, &format!("questions[{i}]")))
        .collect::<Result<_>>()?;
    let a: Value = read_json(annotations)?;
    let anns = vqa_annotations(&a, annotations)?;
    let res: Value = read_json(pred)?;
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
    let coverage = check_coverage(pred, &items, known.len(), partial)?;
    Ok((items, preds, coverage))
}

/// A model's raw answer as it is submitted: through the EvalAI answer processor.
pub fn submission_answer(raw: &str) -> String {
    evalai_process(raw)
}

/// The official accuracy × 100, overall and per answer type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VqaScores {
    /// official accuracy × 100
    pub overall: f64,
    pub by_answer_type: BTreeMap<String, f64>,
    pub questions: usize,
}

/// The scores of answered VQAv2 items (None without any).
pub fn score(answered: &[(&Item, &str)]) -> Option<VqaScores> {
    let vqa: Vec<(f64, &str)> = answered
        .iter()
        .filter_map(|(it, p)| match &it.truth {
            Truth::Vqa {
                answers,
                answer_type,
                ..
            } => Some((vqa_accuracy(p, answers), answer_type.as_str())),
            _ => None,
        })
        .collect();
    if vqa.is_empty() {
        return None;
    }
    let mean = |v: &[f64]| 100.0 * v.iter().sum::<f64>() / v.len() as f64;
    let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (a, t) in &vqa {
        by.entry(t.to_string()).or_default().push(*a);
    }
    Some(VqaScores {
        overall: mean(&vqa.iter().map(|x| x.0).collect::<Vec<_>>()),
        by_answer_type: by.iter().map(|(k, v)| (k.clone(), mean(v))).collect(),
        questions: vqa.len(),
    })
}

/// Writes `vqav2_results.json` (`[{"question_id", "answer"}]`) under `dir` when there are
/// VQAv2 items.
pub fn write_results(dir: &Path, answered: &[(&Item, &str)]) -> Result<Vec<PathBuf>> {
    let rows: Vec<Value> = answered
        .iter()
        .filter_map(|(it, p)| match &it.truth {
            Truth::Vqa { question_id, .. } => {
                Some(serde_json::json!({"question_id": question_id, "answer": p}))
            }
            _ => None,
        })
        .collect();
    write_result_rows(dir, "vqav2_results.json", &rows)
}
