//! A comparison's report: `report.md` (the paper's Table 1 and 2 shapes, the sweep, the
//! ablations, the analyses), `report.json`, and the plots `loss_curves.png`,
//! `score_vs_trainable.png`, `score_vs_memory.png`, `ablation_connector.png`,
//! `ablation_data_type.png`.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::analyze::gradvar::{GradvarRun, gradvar_markdown};
use crate::analyze::similarity::SimilarityReport;
use crate::eval::benchmarks::scores::Scores;
use crate::jobs::compare::arms::lr_text;
use crate::train::run::RunSummary;
use crate::util::files::{write_atomically, write_json};
use crate::util::plot::{Chart, Series, trailing_mean};

/// An arm's results, as report.json holds them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmResult {
    pub name: String,
    pub method: String,
    pub lr: f64,
    pub summary: RunSummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scores: Option<Scores>,
    /// the scores of each `--also-eval` benchmark, by its name
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty", default)]
    pub more_scores: std::collections::BTreeMap<String, Scores>,
    /// (step, loss) of every step
    pub loss_curve: Vec<(usize, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareReport {
    pub command: String,
    pub machine: String,
    /// wall time summed over the invocations that made the comparison (an interrupted one
    /// counted up to its last finished child process)
    pub wall_s: f64,
    /// how many invocations (1 unless the comparison was resumed)
    #[serde(default)]
    pub invocations: usize,
    /// sum of every arm's training wall time (all invocations)
    pub train_wall_s: f64,
    pub methods: Vec<ArmResult>,
    /// every method's chosen arm at the other seeds of `--seeds`
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub seed_runs: Vec<ArmResult>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub lr_sweep: Vec<ArmResult>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub connector: Vec<ArmResult>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub data_type: Vec<ArmResult>,
    /// the data-type arms' token budgets (empty when they had equal sample counts)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_type_budgets: Vec<super::token_budget::DataTypeBudget>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<SimilarityReport>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub gradvar: Vec<GradvarRun>,
    /// every method against ln on the same questions
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub paired: Vec<PairedRow>,
    /// the ablation arms the paper ranks, the one it finds better as the reference
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub ablation_paired: Vec<PairedRow>,
    /// each of the paper's claims with its evidence and verdict (`claims`)
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub claims: Vec<ClaimRow>,
}

/// Points within which "A matches B" holds (`claims`): the study's test sets are sized to
/// detect a difference of this size.
pub const MATCH_MARGIN: f64 = 5.0;

/// Whether this comparison's numbers support a claim of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Reproduced,
    NotReproduced,
    Inconclusive,
}

impl Verdict {
    pub fn words(self) -> &'static str {
        match self {
            Verdict::Reproduced => "reproduced",
            Verdict::NotReproduced => "not reproduced",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// One claim of the paper, what this comparison measured about it, and the verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimRow {
    pub claim: String,
    pub evidence: String,
    pub verdict: Verdict,
}

/// One arm (a method, or an ablation arm) against a reference arm (ln, or the ablation arm
/// the paper finds better) on one benchmark's questions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairedRow {
    pub method: String,
    /// the reference arm's name (the scores' `reference` is its mean score)
    #[serde(default = "ln_name")]
    pub reference_arm: String,
    /// the seed both arms were trained with; none: per-question scores averaged over seeds
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub seed: Option<u64>,
    #[serde(flatten)]
    pub comparison: crate::eval::paired::PairedComparison,
}

/// The claims table with the rules its verdicts follow.
fn claims_section(claims: &[ClaimRow]) -> String {
    let mut md = format!(
        "## The paper's claims\n\nRules: \"A beats B\" is reproduced when the 95% interval of A − B lies above 0 and not reproduced when it lies below 0; \"A matches or beats B\" is reproduced when the interval's lower end is above −{m} points, not reproduced when the interval lies below 0 and reaches past −{m}; a claim over seeds (memory, gradient variance) is reproduced when every seed's value is on the claimed side of every other seed's; a claim on a benchmark an arm answers with a constant (every POPE answer \"yes\" in a split, the same answer to both MME questions of every image) is inconclusive whatever the interval; anything else is inconclusive.\n\n| claim | evidence | verdict |\n|---|---|---|\n",
        m = MATCH_MARGIN
    );
    for c in claims {
        md.push_str(&format!(
            "| {} | {} | {} |\n",
            c.claim,
            c.evidence,
            c.verdict.words()
        ));
    }
    md.push('\n');
    md
}

fn ln_name() -> String {
    "ln".into()
}

/// The paired-statistics table of report.md.
fn paired_table(rows: &[PairedRow]) -> String {
    let mut md = String::from(
        "| arm | seed | benchmark | questions | reference | reference's | arm's | arm − reference [95% CI] | McNemar p (discordant reference/arm) |\n|---|---|---|---:|---|---:|---:|---|---|\n",
    );
    for r in rows {
        let c = &r.comparison;
        let mcnemar = match (c.mcnemar_p, c.discordant) {
            (Some(p), Some([a, b])) => format!("{p:.3} ({a}/{b})"),
            _ => "(soft scores)".into(),
        };
        let seed = r
            .seed
            .map(|s| s.to_string())
            .unwrap_or_else(|| "mean of seeds".into());
        md.push_str(&format!(
            "| {} | {seed} | {} | {} | {} | {:.1} | {:.1} | {:+.1} [{:+.1}, {:+.1}] | {mcnemar} |\n",
            r.method,
            c.bench,
            c.questions,
            r.reference_arm,
            c.reference,
            c.other,
            c.diff,
            c.ci95[0],
            c.ci95[1]
        ));
    }
    md
}

/// The score columns of a benchmark's scores: (name, value), the headline first.
pub fn score_columns(s: &Scores) -> Vec<(String, f64)> {
    let mut v = Vec::new();
    if let Some(q) = &s.vqav2 {
        v.push(("VQA acc".to_string(), q.overall));
    }
    if !s.pope.is_empty() {
        let n = s.pope.len() as f64;
        v.push((
            "POPE acc".to_string(),
            100.0 * s.pope.values().map(|m| m.accuracy).sum::<f64>() / n,
        ));
        v.push((
            "POPE F1".to_string(),
            100.0
                * s.pope
                    .values()
                    .map(|m| if m.f1.is_finite() { m.f1 } else { 0.0 })
                    .sum::<f64>()
                / n,
        ));
    }
    if let Some(m) = &s.mme {
        v.push(("MME".to_string(), m.perception + m.cognition));
    }
    if let Some(c) = &s.captions {
        v.push(("CIDEr".to_string(), c.cider));
    }
    v
}

/// Every score column of an arm: the main benchmark's, then each `--also-eval` one's
/// prefixed with its name.
fn arm_columns(r: &ArmResult) -> Vec<(String, f64)> {
    let mut v = r.scores.as_ref().map(score_columns).unwrap_or_default();
    for (bench, s) in &r.more_scores {
        v.extend(
            score_columns(s)
                .into_iter()
                .map(|(c, x)| (format!("{bench}: {c}"), x)),
        );
    }
    v
}

fn methods_table(rows: &[ArmResult], with_lr: bool) -> String {
    let cols: Vec<String> = rows
        .iter()
        .find(|r| r.scores.is_some())
        .map(|r| arm_columns(r).into_iter().map(|c| c.0).collect())
        .unwrap_or_default();
    let mut s = String::from("| method |");
    if with_lr {
        s.push_str(" lr |");
    }
    s.push_str(" trainable params | trainable % |");
    for c in &cols {
        s.push_str(&format!(" {c} |"));
    }
    s.push('\n');
    s.push_str(&"|---".repeat(3 + cols.len() + usize::from(with_lr)));
    s.push_str("|\n");
    for r in rows {
        s.push_str(&format!("| {} |", r.name));
        if with_lr {
            s.push_str(&format!(" {} |", lr_text(r.lr)));
        }
        s.push_str(&format!(
            " {} | {:.3} |",
            r.summary.trainable_params, r.summary.trainable_percent
        ));
        let vals = arm_columns(r);
        for c in &cols {
            match vals.iter().find(|v| &v.0 == c) {
                Some((_, x)) => s.push_str(&format!(" {x:.2} |")),
                None => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    s
}

/// Mean and sample standard deviation of every score and the final train loss across the
/// seeds of each method (its row in `methods` and its `seed_runs`).
fn seeds_table(methods: &[ArmResult], seed_runs: &[ArmResult]) -> String {
    let cols: Vec<String> = methods
        .iter()
        .find(|r| r.scores.is_some())
        .map(|r| arm_columns(r).into_iter().map(|c| c.0).collect())
        .unwrap_or_default();
    let mut md = String::from("| method | seeds |");
    for c in &cols {
        md.push_str(&format!(" {c} |"));
    }
    md.push_str(" final train loss |\n");
    md.push_str(&"|---".repeat(3 + cols.len()));
    md.push_str("|\n");
    let mean_sd = |v: &[f64]| {
        let n = v.len() as f64;
        let m = v.iter().sum::<f64>() / n;
        let sd = if v.len() > 1 {
            (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        format!("{m:.2} ± {sd:.2}")
    };
    for row in methods {
        let runs: Vec<&ArmResult> = std::iter::once(row)
            .chain(seed_runs.iter().filter(|r| r.method == row.method))
            .collect();
        md.push_str(&format!("| {} | {} |", row.method, runs.len()));
        for c in &cols {
            let v: Vec<f64> = runs
                .iter()
                .filter_map(|r| arm_columns(r).into_iter().find(|x| &x.0 == c).map(|x| x.1))
                .collect();
            md.push_str(&format!(
                " {} |",
                if v.is_empty() {
                    "-".into()
                } else {
                    mean_sd(&v)
                }
            ));
        }
        let losses: Vec<f64> = runs.iter().map(|r| r.summary.final_loss).collect();
        md.push_str(&format!(" {} |\n", mean_sd(&losses)));
    }
    md
}

fn efficiency_table(rows: &[ArmResult]) -> String {
    let mut s = String::from(
        "| method | lr | peak memory (MiB) | median step (s) | tokens/s | final train loss | validation loss | train wall (s) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let m = &r.summary;
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {:.0} | {:.4} | {} | {:.0} |\n",
            r.name,
            lr_text(r.lr),
            m.peak_rss_mib,
            m.median_step_s,
            m.median_tokens_per_s,
            m.final_loss,
            m.val_loss
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "-".into()),
            m.wall_s
        ));
    }
    s
}

/// Loss per step is noisy (batches differ in length and kind), so each arm is drawn as a
/// trailing mean over `LOSS_WINDOW` steps; the raw values are in each arm's metrics.jsonl.
const LOSS_WINDOW: usize = 8;

fn loss_chart(title: &str, rows: &[ArmResult]) -> Chart {
    Chart {
        title: format!("{title} (mean of {LOSS_WINDOW} steps)"),
        x_label: "step".into(),
        y_label: "loss".into(),
        series: rows
            .iter()
            .map(|r| Series {
                label: r.name.clone(),
                points: trailing_mean(
                    &r.loss_curve
                        .iter()
                        .map(|&(s, l)| (s as f64, l))
                        .collect::<Vec<_>>(),
                    LOSS_WINDOW,
                ),
                scatter: false,
                intervals: vec![],
            })
            .collect(),
        log_x: false,
        x_names: vec![],
    }
}

/// Writes report.md, report.json and the plots.
pub fn write_report(r: &CompareReport, out: &Path) -> Result<()> {
    let mut md = String::from("# lntune compare\n\n");
    md.push_str(&format!("Command: `{}`\n\nMachine: {}. Wall time {:.0} s over {} invocation(s) (`wall_time.json`); training time of all arms {:.0} s.\n\n", r.command, r.machine, r.wall_s, r.invocations, r.train_wall_s));
    if !r.claims.is_empty() {
        md.push_str(&claims_section(&r.claims));
    }
    md.push_str("## Quality (the shape of the paper's Table 1)\n\n");
    md.push_str(&methods_table(&r.methods, false));
    if !r.seed_runs.is_empty() {
        md.push_str("\n### Across seeds (mean ± sample standard deviation)\n\n");
        md.push_str(&seeds_table(&r.methods, &r.seed_runs));
    }
    if !r.paired.is_empty() {
        md.push_str(&format!(
            "\n### Paired against ln (the same questions; per-question scores in percent, {} bootstrap resamples; an interval that holds 0 does not separate the methods)\n\n",
            crate::eval::paired::RESAMPLES
        ));
        md.push_str(&paired_table(&r.paired));
    }
    if !r.ablation_paired.is_empty() {
        md.push_str("\n### Ablation arms paired (the arm the paper finds better as the reference; same questions, same seed)\n\n");
        md.push_str(&paired_table(&r.ablation_paired));
    }
    md.push_str("\n## Cost (the shape of the paper's Table 2)\n\n");
    md.push_str(&efficiency_table(&r.methods));
    if !r.lr_sweep.is_empty() {
        md.push_str(
            "\n## Learning-rate sweep (validation loss; the lowest per method is kept)\n\n",
        );
        md.push_str(&efficiency_table(&r.lr_sweep));
    }
    if !r.connector.is_empty() {
        md.push_str("\n## Ablation: connector\n\n");
        md.push_str(&methods_table(&r.connector, true));
        md.push('\n');
        md.push_str(&efficiency_table(&r.connector));
    }
    if !r.data_type.is_empty() {
        if r.data_type_budgets.is_empty() {
            md.push_str("\n## Ablation: data type (LN tuning, equal sample budgets)\n\n");
        } else {
            md.push_str("\n## Ablation: data type (LN tuning, equal token budgets)\n\n");
            md.push_str(
                "| arm | samples | trained tokens | epochs | steps |\n|---|---|---|---|---|\n",
            );
            for b in &r.data_type_budgets {
                let steps = r
                    .data_type
                    .iter()
                    .find(|a| a.name == b.name)
                    .map_or("-".to_string(), |a| a.summary.steps.to_string());
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {steps} |\n",
                    b.name, b.samples, b.tokens, b.epochs
                ));
            }
            md.push('\n');
        }
        md.push_str(&methods_table(&r.data_type, false));
        md.push('\n');
        md.push_str(&efficiency_table(&r.data_type));
    }
    if let Some(s) = &r.similarity {
        md.push_str("\n## Layer similarity (lower: more expressive, in the paper's reading)\n\n");
        md.push_str(&s.markdown());
        md.push_str("\nHeatmaps: `analysis/similarity/similarity_<model>.png`.\n");
    }
    if !r.gradvar.is_empty() {
        md.push_str("\n## Gradient variance\n\n");
        md.push_str(&gradvar_markdown(&r.gradvar));
        md.push_str("\nPlots: `analysis/gradvar/gradvar_steps.png`, `analysis/gradvar/gradvar_microbatch.png`.\n");
    }
    md.push_str("\nPlots: `loss_curves.png`, `score_vs_trainable.png`, `score_vs_memory.png`");
    md.push_str(if r.connector.is_empty() {
        ""
    } else {
        ", `ablation_connector.png`"
    });
    md.push_str(if r.data_type.is_empty() {
        ""
    } else {
        ", `ablation_data_type.png`"
    });
    md.push_str(if r.paired.is_empty() {
        ""
    } else {
        ", `paired_vs_ln.png`"
    });
    md.push_str(".\n");
    write_atomically(&out.join("report.md"), md.as_bytes())?;
    write_json(&out.join("report.json"), r)?;

    loss_chart("training loss per method", &r.methods).save_png(&out.join("loss_curves.png"))?;
    let headline = r
        .methods
        .iter()
        .find_map(|m| m.scores.as_ref())
        .and_then(|s| score_columns(s).first().map(|c| c.0.clone()))
        .unwrap_or_else(|| "score".into());
    let scatter = |x_label: &str, x: &dyn Fn(&ArmResult) -> f64, log_x: bool| Chart {
        title: format!("{headline} vs {x_label}"),
        x_label: x_label.into(),
        y_label: headline.clone(),
        series: r
            .methods
            .iter()
            .map(|m| Series {
                label: m.name.clone(),
                points: vec![(
                    x(m),
                    m.scores
                        .as_ref()
                        .and_then(|s| score_columns(s).first().map(|c| c.1))
                        .unwrap_or(f64::NAN),
                )],
                scatter: true,
                intervals: vec![],
            })
            .collect(),
        log_x,
        x_names: vec![],
    };
    scatter("trainable %", &|m| m.summary.trainable_percent, true)
        .save_png(&out.join("score_vs_trainable.png"))?;
    scatter("peak memory MiB", &|m| m.summary.peak_rss_mib, false)
        .save_png(&out.join("score_vs_memory.png"))?;
    if !r.connector.is_empty() {
        loss_chart("connector ablation: training loss", &r.connector)
            .save_png(&out.join("ablation_connector.png"))?;
    }
    if !r.data_type.is_empty() {
        loss_chart("data-type ablation: training loss", &r.data_type)
            .save_png(&out.join("ablation_data_type.png"))?;
    }
    if !r.paired.is_empty() {
        paired_chart(&r.paired).save_png(&out.join("paired_vs_ln.png"))?;
    }
    Ok(())
}

/// Each method's difference to ln per benchmark with its 95% interval: on the per-question
/// means over seeds when there are several seeds, else at the one seed.
fn paired_chart(rows: &[PairedRow]) -> Chart {
    let pooled = rows.iter().any(|r| r.seed.is_none());
    let rows: Vec<&PairedRow> = rows.iter().filter(|r| r.seed.is_none() == pooled).collect();
    let mut methods: Vec<String> = Vec::new();
    let mut benches: Vec<String> = Vec::new();
    for r in &rows {
        if !methods.contains(&r.method) {
            methods.push(r.method.clone());
        }
        if !benches.contains(&r.comparison.bench) {
            benches.push(r.comparison.bench.clone());
        }
    }
    let nb = benches.len() as f64;
    Chart {
        title: format!(
            "difference to ln, 95% bootstrap interval{}",
            if pooled { " (mean over seeds)" } else { "" }
        ),
        x_label: "method".into(),
        y_label: "points (per-question score)".into(),
        series: benches
            .iter()
            .enumerate()
            .map(|(k, b)| {
                // benchmarks side by side around each method's position
                let offset = (k as f64 - (nb - 1.0) / 2.0) * 0.12;
                let of_bench: Vec<(usize, &&PairedRow)> = rows
                    .iter()
                    .filter(|r| &r.comparison.bench == b)
                    .filter_map(|r| Some((methods.iter().position(|m| m == &r.method)?, r)))
                    .collect();
                Series {
                    label: b.clone(),
                    points: of_bench
                        .iter()
                        .map(|(i, r)| (*i as f64 + offset, r.comparison.diff))
                        .collect(),
                    scatter: true,
                    intervals: of_bench
                        .iter()
                        .map(|(_, r)| (r.comparison.ci95[0], r.comparison.ci95[1]))
                        .collect(),
                }
            })
            .collect(),
        log_x: false,
        x_names: methods,
    }
}
