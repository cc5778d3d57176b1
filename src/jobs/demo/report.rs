//! The demo's report: `report.json` (every score, the settings, the wall times) and
//! `report.md` (the table printed at the end).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::eval::benchmarks::shapes::ShapesScores;
use crate::train::trainer::StepReport;

/// The demo's numbers, as report.json holds them.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub config: BTreeMap<String, serde_json::Value>,
    pub after_stage1: ShapesScores,
    pub after_stage2: ShapesScores,
    pub after_stage2_wrong_image: ShapesScores,
    pub stage1_final_loss: f64,
    pub stage2_final_loss: f64,
    pub seconds: BTreeMap<String, f64>,
    pub data: BTreeMap<String, String>,
}

pub fn mean_last(r: &[StepReport], n: usize) -> f64 {
    let k = r.len().min(n).max(1);
    r.iter().rev().take(k).map(|x| x.loss).sum::<f64>() / k as f64
}

fn pct(x: f64) -> String {
    format!("{x:.1}")
}

pub fn report_markdown(r: &DemoReport, out: &Path) -> String {
    let mut s = String::new();
    s += "# lntune demo: DINOv2-S (frozen) + projector + SmolLM2-135M-Instruct on `shapes`\n\n";
    s += &format!(
        "Shapes level `{}`, {} px images, {} image tokens. Held-out test images: {}. Stage 1: projector on captions, {} steps. Stage 2: `{}`, {} steps. Scores with the official metric code (VQAv2 accuracy, POPE, MME, CIDEr-D).\n\n",
        r.config["level"].as_str().unwrap_or(""),
        r.config["image_size"],
        r.config["vision_tokens_per_image"],
        r.config["test_images"],
        r.config["stage1_steps"],
        r.config["stage2_method"].as_str().unwrap_or(""),
        r.config["stage2_steps"]
    );
    s += "| metric | after stage 1 | after stage 2 | stage 2, wrong image |\n|---|---|---|---|\n";
    // one table row: the label, then the score after stage 1, after stage 2, and with a
    // wrong image ("-" where a score was not computed)
    let row = |label: &str, score: &dyn Fn(&ShapesScores) -> Option<String>| {
        let cell = |x: &ShapesScores| score(x).unwrap_or_else(|| "-".into());
        format!(
            "| {label} | {} | {} | {} |\n",
            cell(&r.after_stage1),
            cell(&r.after_stage2),
            cell(&r.after_stage2_wrong_image)
        )
    };
    s += &row("VQA accuracy", &|x| Some(pct(x.vqa)));
    s += &row("VQA exact match", &|x| Some(pct(x.vqa_exact)));
    for k in r.after_stage2.vqa_by_type.keys() {
        s += &row(&format!("VQA: {k}"), &|x| {
            x.vqa_by_type.get(k).map(|v| pct(*v))
        });
    }
    for split in ["random", "popular", "adversarial"] {
        s += &row(&format!("POPE {split}: acc / F1"), &|x| {
            x.pope.get(split).map(|p| {
                // F1 has no value when the model never answers yes (no precision)
                let f1 = if p.f1.is_finite() {
                    pct(100.0 * p.f1)
                } else {
                    "n/a".to_string()
                };
                format!("{} / {f1}", pct(100.0 * p.accuracy))
            })
        });
    }
    s += &row("MME-style total (4 subtasks, max 800)", &|x| {
        Some(pct(x.mme_total))
    });
    for cat in r.after_stage2.mme.keys() {
        s += &row(&format!("MME {cat} (max 200)"), &|x| {
            x.mme.get(cat).map(|m| pct(m.score))
        });
    }
    // the wrong-image control asks no captions
    s += &row("caption CIDEr-D", &|x| x.cider.map(|v| format!("{v:.3}")));
    s += &format!(
        "\nFinal training loss (mean of the last 10 steps): stage 1 {:.3}, stage 2 {:.3}.\n",
        r.stage1_final_loss, r.stage2_final_loss
    );
    s += "\nExamples after stage 2 (question, reference, prediction):\n\n";
    for (q, a, p) in &r.after_stage2.examples {
        s += &format!("- {q} | {a} | {p}\n");
    }
    s += "\nWall time (s): ";
    s += &r
        .seconds
        .iter()
        .map(|(k, v)| format!("{k} {v:.0}"))
        .collect::<Vec<_>>()
        .join(", ");
    s += &format!(
        "\n\nFiles: {}/stage1/loss.png, {}/stage2/loss.png, the stage-2 adapter in {}/stage2/adapter, report.json.\n",
        out.display(),
        out.display(),
        out.display()
    );
    s
}
