//! Every score of a set of answered items, grouped by benchmark, as `lntune eval` and
//! `lntune score` report them; and the official result files of all of them. Each
//! benchmark's file scores and writes its own items.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::captions::{self, CaptionScores};
use super::item::{Item, Truth};
use super::mme::{self, MmeScores};
use super::pope;
use super::vqav2::{self, VqaScores};
use crate::eval::metrics::PopeMetrics;

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
        Truth::Vqa { .. } => vqav2::submission_answer(raw),
        _ => raw.to_string(),
    }
}

/// Items paired with their submitted answers (`preds[i]` answers `items[i]`).
fn answered<'a>(items: &'a [Item], preds: &'a [String]) -> Vec<(&'a Item, &'a str)> {
    assert_eq!(items.len(), preds.len(), "one prediction per item");
    items
        .iter()
        .zip(preds)
        .map(|(it, p)| (it, p.as_str()))
        .collect()
}

/// Scores items against submitted answers, the way each official scorer does: VQAv2
/// accuracy with the official normalization; POPE and MME parse yes/no; captions are PTB
/// tokenized and scored with CIDEr-D and BLEU.
pub fn score(items: &[Item], preds: &[String]) -> Scores {
    let a = answered(items, preds);
    Scores {
        vqav2: vqav2::score(&a),
        pope: pope::score(&a),
        mme: mme::score(&a),
        captions: captions::score(&a),
    }
}

/// Writes submitted answers in each benchmark's own result format under `dir` (see each
/// benchmark's `write_results`); returns the files written.
pub fn write_official(dir: &Path, items: &[Item], preds: &[String]) -> Result<Vec<PathBuf>> {
    let a = answered(items, preds);
    let mut written = vqav2::write_results(dir, &a)?;
    written.extend(pope::write_results(dir, &a)?);
    written.extend(mme::write_results(dir, &a)?);
    written.extend(captions::write_results(dir, &a)?);
    Ok(written)
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
