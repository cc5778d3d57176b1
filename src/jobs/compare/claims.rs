//! The paper's claims judged from a comparison's own numbers. Each claim gets its evidence
//! (a paired interval, or the measured values of every seed) and a verdict by a fixed rule,
//! so that a report says "reproduced", "not reproduced" or "inconclusive" only where its
//! files support it:
//!
//! - "A beats B" (a paired difference A − B with its 95% bootstrap interval): reproduced
//!   when the interval lies above 0, not reproduced when it lies below 0, else inconclusive.
//! - "A matches or beats B": reproduced when the interval's lower end is above
//!   −`MATCH_MARGIN` (A is at most that much worse), not reproduced when the interval lies
//!   below 0 and reaches past −`MATCH_MARGIN`, else inconclusive.
//! - A benchmark on which an arm's answers are constant (every POPE answer "yes", or every
//!   one "no", in a split; MME acc+ 0 at acc 0.5 in every subtask: the same answer to both
//!   questions of each image) measures nothing about it: a claim on it is inconclusive,
//!   whatever the interval.
//! - "A is lower than B" over seeds (memory, gradient variance): reproduced when every
//!   seed's A is below every seed's B (with 3 seeds each, an exact one-sided permutation p
//!   of 1/20), not reproduced when every A is above every B, else inconclusive.

use super::report::{ArmResult, ClaimRow, CompareReport, MATCH_MARGIN, PairedRow, Verdict};
use crate::analyze::gradvar::GradvarRun;

/// The ablation pairs the paper ranks, the better one first: LN + connector > LN only >
/// connector only; conversation data > detailed description, > complex reasoning.
pub const ABLATION_PAIRS: [(&str, &str); 4] = [
    ("ln + connector", "ln only"),
    ("ln only", "connector only"),
    ("conversation", "detail"),
    ("conversation", "reasoning"),
];

/// How the paper's claim about a method relates ln to it: LN tuning matches or beats full
/// finetuning and the single-module baselines, and beats LoRA and LN-simple.
const METHOD_CLAIMS: [(&str, bool); 5] = [
    ("full", false),
    ("lora", true),
    ("attn-qv", false),
    ("mlp", false),
    ("ln-simple", true),
];

fn beats(ci: [f64; 2]) -> Verdict {
    if ci[0] > 0.0 {
        Verdict::Reproduced
    } else if ci[1] < 0.0 {
        Verdict::NotReproduced
    } else {
        Verdict::Inconclusive
    }
}

fn matches_or_beats(ci: [f64; 2]) -> Verdict {
    if ci[0] > -MATCH_MARGIN {
        Verdict::Reproduced
    } else if ci[1] < 0.0 {
        Verdict::NotReproduced
    } else {
        Verdict::Inconclusive
    }
}

/// `a` lower than `b` at every seed (see the module's rule).
fn lower_at_every_seed(a: &[f64], b: &[f64]) -> Verdict {
    let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    if a.is_empty() || b.is_empty() {
        Verdict::Inconclusive
    } else if max(a) < min(b) {
        Verdict::Reproduced
    } else if min(a) > max(b) {
        Verdict::NotReproduced
    } else {
        Verdict::Inconclusive
    }
}

/// A paired row read the other way round: `reference − method` and its interval.
fn reference_minus_method(r: &PairedRow) -> (f64, [f64; 2]) {
    let c = &r.comparison;
    (-c.diff, [-c.ci95[1], -c.ci95[0]])
}

fn interval_text(d: f64, ci: [f64; 2], questions: usize, seeds: &str) -> String {
    format!(
        "{d:+.1} [{:+.1}, {:+.1}] points, {questions} questions, {seeds}",
        ci[0], ci[1]
    )
}

/// Why `bench` (a paired row's benchmark: `pope`, or `<also-eval bench>/pope`) says nothing
/// about the arm: its answers there are constant. None when they vary.
fn degenerate(a: &ArmResult, bench: &str) -> Option<String> {
    let (scores, kind) = match bench.split_once('/') {
        Some((b, kind)) => (a.more_scores.get(b)?, kind),
        None => (a.scores.as_ref()?, bench),
    };
    match kind {
        "pope" => scores
            .pope
            .iter()
            .find(|(_, m)| m.yes_ratio == 0.0 || m.yes_ratio == 1.0)
            .map(|(split, m)| {
                format!(
                    "{} answers \"{}\" to every POPE {split} question",
                    a.name,
                    if m.yes_ratio == 1.0 { "yes" } else { "no" }
                )
            }),
        "mme" => scores
            .mme
            .as_ref()
            .filter(|m| {
                !m.subtasks.is_empty()
                    && m.subtasks
                        .values()
                        .all(|t| t.acc_plus == 0.0 && t.acc == 0.5)
            })
            .map(|_| {
                format!(
                    "{} gives both questions of every MME image the same answer",
                    a.name
                )
            }),
        _ => None,
    }
}

/// A verdict on `bench` made inconclusive where one of `arms` answers it constantly; the
/// evidence says which.
fn unless_degenerate(
    verdict: Verdict,
    evidence: String,
    arms: &[&ArmResult],
    bench: &str,
) -> (Verdict, String) {
    match arms.iter().find_map(|a| degenerate(a, bench)) {
        Some(why) => (
            Verdict::Inconclusive,
            format!("{evidence}; {why}: the benchmark does not measure it"),
        ),
        None => (verdict, evidence),
    }
}

/// An ablation arm by its report name.
fn ablation_arm<'a>(r: &'a CompareReport, name: &str) -> Option<&'a ArmResult> {
    r.connector
        .iter()
        .chain(&r.data_type)
        .find(|a| a.name == name)
}

/// Every run of a method: its methods row and its other seeds' rows.
fn runs_of<'a>(r: &'a CompareReport, method: &str) -> Vec<&'a ArmResult> {
    r.methods
        .iter()
        .filter(|m| m.name == method)
        .chain(r.seed_runs.iter().filter(|m| m.method == method))
        .collect()
}

/// A measured value with the digits it carries: whole MiB for memory, four decimals in
/// between, scientific notation for the small values (gradient variances are ~1e-6,
/// which four decimals would print as zero).
fn value_text(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 || !a.is_finite() {
        format!("{x}")
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 0.01 {
        format!("{x:.4}")
    } else {
        format!("{x:.3e}")
    }
}

fn values_text(name: &str, v: &[f64], unit: &str) -> String {
    let list: Vec<String> = v.iter().map(|&x| value_text(x)).collect();
    let list = list.join(" / ");
    if unit.is_empty() {
        format!("{name} {list}")
    } else {
        format!("{name} {list} {unit}")
    }
}

/// Judges every claim the comparison has numbers for.
pub fn judge(r: &CompareReport) -> Vec<ClaimRow> {
    let mut rows = Vec::new();
    // quality: ln against each method on the per-question means over seeds (or the one seed)
    let pooled = r.paired.iter().any(|p| p.seed.is_none());
    for (method, strict) in METHOD_CLAIMS {
        for p in r
            .paired
            .iter()
            .filter(|p| p.method == method && p.seed.is_none() == pooled)
        {
            let (d, ci) = reference_minus_method(p);
            let seeds = if pooled {
                "per-question mean over seeds".to_string()
            } else {
                format!("seed {}", p.seed.unwrap_or_default())
            };
            let arms: Vec<&ArmResult> = runs_of(r, "ln")
                .into_iter()
                .chain(runs_of(r, method))
                .collect();
            let (verdict, evidence) = unless_degenerate(
                if strict {
                    beats(ci)
                } else {
                    matches_or_beats(ci)
                },
                format!(
                    "ln − {method} = {}",
                    interval_text(d, ci, p.comparison.questions, &seeds)
                ),
                &arms,
                &p.comparison.bench,
            );
            rows.push(ClaimRow {
                claim: format!(
                    "{}: ln {} {method}",
                    p.comparison.bench,
                    if strict { "beats" } else { "matches or beats" }
                ),
                evidence,
                verdict,
            });
        }
    }
    // cost: trainable parameters (exact) and peak memory (every seed's run)
    let ln = runs_of(r, "ln");
    if let (Some(l), Some(o)) = (ln.first(), runs_of(r, "lora").first()) {
        let (a, b) = (l.summary.trainable_params, o.summary.trainable_params);
        rows.push(ClaimRow {
            claim: "ln trains fewer parameters than lora".into(),
            evidence: format!(
                "ln {a}, lora {b} ({:+.1}%)",
                100.0 * (a as f64 / b as f64 - 1.0)
            ),
            verdict: if a < b {
                Verdict::Reproduced
            } else {
                Verdict::NotReproduced
            },
        });
    }
    for other in ["lora", "full"] {
        let o = runs_of(r, other);
        if ln.is_empty() || o.is_empty() {
            continue;
        }
        let mem = |v: &[&ArmResult]| v.iter().map(|a| a.summary.peak_rss_mib).collect::<Vec<_>>();
        let (a, b) = (mem(&ln), mem(&o));
        rows.push(ClaimRow {
            claim: format!("ln needs less memory than {other}"),
            evidence: format!(
                "peak RSS per seed: {}; {}",
                values_text("ln", &a, "MiB"),
                values_text(other, &b, "MiB")
            ),
            verdict: lower_at_every_seed(&a, &b),
        });
    }
    // the ablations' rankings
    for p in &r.ablation_paired {
        let (d, ci) = reference_minus_method(p);
        let arms: Vec<&ArmResult> = [&p.reference_arm, &p.method]
            .into_iter()
            .filter_map(|n| ablation_arm(r, n))
            .collect();
        let (verdict, evidence) = unless_degenerate(
            beats(ci),
            format!(
                "{} − {} = {}",
                p.reference_arm,
                p.method,
                interval_text(
                    d,
                    ci,
                    p.comparison.questions,
                    &format!("seed {}", p.seed.unwrap_or_default())
                )
            ),
            &arms,
            &p.comparison.bench,
        );
        rows.push(ClaimRow {
            claim: format!(
                "{}: {} beats {}",
                p.comparison.bench, p.reference_arm, p.method
            ),
            evidence,
            verdict,
        });
    }
    // layer similarity: ln's below full's, paired over the same samples
    if let Some(sim) = &r.similarity {
        let get = |n: &str| sim.models.iter().find(|(m, _)| m == n).map(|(_, s)| s);
        if let (Some(l), Some(f)) = (get("ln"), get("full")) {
            let (a, b) = (&l.per_sample_all_pairs, &f.per_sample_all_pairs);
            let (evidence, verdict) = if a.len() == b.len() && !a.is_empty() {
                // cosine × 100 so that the interval reads in the same units as the table
                let c = crate::eval::paired::compare("similarity", b, a, 0);
                (
                    format!(
                        "ln − full mean cosine (×100) = {:+.2} [{:+.2}, {:+.2}], {} samples; ln {:.4}, full {:.4}",
                        c.diff, c.ci95[0], c.ci95[1], c.questions, l.all_pairs, f.all_pairs
                    ),
                    // lower is the claim: an interval below 0
                    beats([-c.ci95[1], -c.ci95[0]]),
                )
            } else {
                (
                    format!(
                        "ln {:.4}, full {:.4} (no per-sample values: no interval)",
                        l.all_pairs, f.all_pairs
                    ),
                    Verdict::Inconclusive,
                )
            };
            rows.push(ClaimRow {
                claim: "ln's layer similarity is lower than full finetuning's".into(),
                evidence,
                verdict,
            });
        }
    }
    // gradient variance of the projector gradient, every seed's run
    type Pick = fn(&GradvarRun) -> Option<f64>;
    let of = |prefix: &str, pick: Pick| {
        r.gradvar
            .iter()
            .filter(|g| g.name == prefix || g.name.starts_with(&format!("{prefix}/")))
            .filter_map(pick)
            .collect::<Vec<f64>>()
    };
    let picks: [(&str, Pick); 2] = [
        ("across steps", |g| g.mean_window_var),
        ("across micro-batches", |g| g.mean_microbatch_var),
    ];
    for (what, pick) in picks {
        let (a, b) = (of("ln", pick), of("full", pick));
        if a.is_empty() || b.is_empty() {
            continue;
        }
        rows.push(ClaimRow {
            claim: format!("ln's gradient variance ({what}) is lower than full finetuning's"),
            evidence: format!(
                "projector gradient, per seed: {}; {}",
                values_text("ln", &a, ""),
                values_text("full", &b, "")
            ),
            verdict: lower_at_every_seed(&a, &b),
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_rules() {
        assert_eq!(beats([0.1, 3.0]), Verdict::Reproduced);
        assert_eq!(beats([-3.0, -0.1]), Verdict::NotReproduced);
        assert_eq!(beats([-1.0, 1.0]), Verdict::Inconclusive);
        // matching within the margin counts, even when the other is significantly better
        assert_eq!(matches_or_beats([-4.9, -1.0]), Verdict::Reproduced);
        assert_eq!(matches_or_beats([-9.0, -0.5]), Verdict::NotReproduced);
        assert_eq!(matches_or_beats([-9.0, 2.0]), Verdict::Inconclusive);
        assert_eq!(
            lower_at_every_seed(&[1.0, 2.0, 3.0], &[3.5, 4.0, 5.0]),
            Verdict::Reproduced
        );
        assert_eq!(
            lower_at_every_seed(&[6.0, 7.0], &[3.5, 4.0, 5.0]),
            Verdict::NotReproduced
        );
        assert_eq!(
            lower_at_every_seed(&[1.0, 4.5], &[3.5, 4.0]),
            Verdict::Inconclusive
        );
        assert_eq!(lower_at_every_seed(&[], &[1.0]), Verdict::Inconclusive);
    }

    #[test]
    fn paired_rows_are_read_from_ln_side() {
        // method − ln = −3 [−5, −1]: ln beats the method by 3 [1, 5]
        let row = PairedRow {
            method: "lora".into(),
            reference_arm: "ln".into(),
            seed: None,
            comparison: crate::eval::paired::PairedComparison {
                bench: "vqav2".into(),
                questions: 1000,
                reference: 40.0,
                other: 37.0,
                diff: -3.0,
                ci95: [-5.0, -1.0],
                mcnemar_p: None,
                discordant: None,
            },
        };
        let (d, ci) = reference_minus_method(&row);
        assert_eq!((d, ci), (3.0, [1.0, 5.0]));
        assert_eq!(beats(ci), Verdict::Reproduced);
    }

    fn arm(name: &str, method: &str, params: usize, rss: f64) -> serde_json::Value {
        serde_json::json!({
            "name": name, "method": method, "lr": 1e-3, "loss_curve": [],
            "summary": {"method": method, "trainable_params": params, "total_params": 1000,
                "trainable_percent": 1.0, "steps": 1, "median_step_s": 1.0,
                "median_tokens_per_s": 1.0, "final_loss": 1.0, "peak_rss_mib": rss,
                "wall_s": 1.0}
        })
    }

    fn similarity(per_sample: &[f64]) -> serde_json::Value {
        let mean = per_sample.iter().sum::<f64>() / per_sample.len() as f64;
        serde_json::json!({"matrix": [], "all_pairs": mean, "adjacent": mean,
            "samples": per_sample.len(), "per_sample_all_pairs": per_sample})
    }

    #[test]
    fn evidence_keeps_the_digits_of_small_and_large_values() {
        // gradient variances are ~1e-6: fixed decimals would print them as zero
        assert_eq!(
            values_text("ln", &[2.86e-6, 2.62e-6], ""),
            "ln 2.860e-6 / 2.620e-6"
        );
        assert_eq!(
            values_text("ln", &[1589.1172, 1590.7617], "MiB"),
            "ln 1589 / 1591 MiB"
        );
        assert_eq!(values_text("full", &[0.91234, 0.0], ""), "full 0.9123 / 0");
    }

    #[test]
    fn every_claim_is_judged_from_the_report() {
        let grad = |name: &str, steps: f64, micro: f64| {
            serde_json::json!({"name": name, "subset": "projector", "dim": 4,
                "mean_window_var": steps, "mean_microbatch_var": micro, "mean_norm": 1.0})
        };
        let report: CompareReport = serde_json::from_value(serde_json::json!({
            "command": "", "machine": "", "wall_s": 1.0, "train_wall_s": 1.0,
            "methods": [arm("ln", "ln", 10, 100.0), arm("full", "full", 1000, 300.0),
                arm("lora", "lora", 50, 150.0)],
            "seed_runs": [arm("ln/seed-1", "ln", 10, 120.0), arm("full/seed-1", "full", 1000, 310.0),
                arm("lora/seed-1", "lora", 50, 110.0)],
            // ln − full: −0.1 on every sample
            "similarity": {"models": [["ln", similarity(&[0.5, 0.6, 0.7])],
                ["full", similarity(&[0.6, 0.7, 0.8])]]},
            // steps: ln below full at both seeds; micro-batches: the seeds overlap
            "gradvar": [grad("ln", 1.0, 1.0), grad("ln/seed-1", 2.0, 5.0),
                grad("full", 3.0, 4.0), grad("full/seed-1", 4.0, 6.0)],
            "paired": [{"method": "full", "bench": "vqav2", "questions": 1000,
                "reference": 40.0, "other": 43.0, "diff": 3.0, "ci95": [1.0, 4.5]}]
        }))
        .unwrap();
        let claims = judge(&report);
        let verdict = |c: &str| {
            claims
                .iter()
                .find(|r| r.claim == c)
                .unwrap_or_else(|| panic!("no `{c}` in {claims:?}"))
                .verdict
        };
        // full is 3 [1, 4.5] points better: ln is within the margin, so it "matches"
        assert_eq!(
            verdict("vqav2: ln matches or beats full"),
            Verdict::Reproduced
        );
        assert_eq!(
            verdict("ln trains fewer parameters than lora"),
            Verdict::Reproduced
        );
        assert_eq!(
            verdict("ln needs less memory than full"),
            Verdict::Reproduced
        );
        // 100/120 MiB against 150/110 MiB: the seeds overlap
        assert_eq!(
            verdict("ln needs less memory than lora"),
            Verdict::Inconclusive
        );
        assert_eq!(
            verdict("ln's layer similarity is lower than full finetuning's"),
            Verdict::Reproduced
        );
        assert_eq!(
            verdict("ln's gradient variance (across steps) is lower than full finetuning's"),
            Verdict::Reproduced
        );
        assert_eq!(
            verdict(
                "ln's gradient variance (across micro-batches) is lower than full finetuning's"
            ),
            Verdict::Inconclusive
        );
    }

    #[test]
    fn a_benchmark_answered_with_a_constant_decides_nothing() {
        let pope = |yes_ratio: f64| {
            serde_json::json!({"random": {"tp": 1, "fp": 1, "tn": 0, "fn_": 0, "accuracy": 0.5,
                "precision": 0.5, "recall": 1.0, "f1": 0.67, "yes_ratio": yes_ratio}})
        };
        let mme = |acc: f64, acc_plus: f64| {
            serde_json::json!({"subtasks": {"color": {"acc": acc, "acc_plus": acc_plus,
                "score": 100.0 * (acc + acc_plus), "other": 0}}, "perception": 50.0,
                "cognition": 0.0, "perception_without_landmark_artwork": 50.0, "questions": 2})
        };
        let with_scores = |name: &str, yes_ratio: f64, acc: f64, acc_plus: f64| {
            let mut a = arm(name, name, 10, 100.0);
            a["scores"] = serde_json::json!({"pope": pope(yes_ratio), "mme": mme(acc, acc_plus)});
            a
        };
        let row = |bench: &str| {
            serde_json::json!({"method": "lora", "bench": bench, "questions": 200,
                "reference": 50.0, "other": 40.0, "diff": -10.0, "ci95": [-14.0, -6.0]})
        };
        let judge_with = |lora_yes: f64, lora_acc_plus: f64| {
            let report: CompareReport = serde_json::from_value(serde_json::json!({
                "command": "", "machine": "", "wall_s": 1.0, "train_wall_s": 1.0,
                "methods": [with_scores("ln", 0.5, 0.75, 0.5),
                    with_scores("lora", lora_yes, 0.5, lora_acc_plus)],
                "paired": [row("pope"), row("mme")],
                "connector": [with_scores("ln only", 0.5, 0.75, 0.5),
                    with_scores("connector only", lora_yes, 0.5, lora_acc_plus)],
                "ablation_paired": [{"method": "connector only", "reference_arm": "ln only",
                    "bench": "pope", "questions": 200, "reference": 50.0, "other": 40.0,
                    "diff": -10.0, "ci95": [-14.0, -6.0]}]
            }))
            .unwrap();
            judge(&report)
        };
        let find =
            |claims: &[ClaimRow], c: &str| claims.iter().find(|r| r.claim == c).cloned().unwrap();
        // lora says "yes" to everything and repeats itself on MME: nothing is decided
        let claims = judge_with(1.0, 0.0);
        let p = find(&claims, "pope: ln beats lora");
        assert_eq!(p.verdict, Verdict::Inconclusive);
        assert!(
            p.evidence
                .contains("lora answers \"yes\" to every POPE random question"),
            "{}",
            p.evidence
        );
        let m = find(&claims, "mme: ln beats lora");
        assert_eq!(m.verdict, Verdict::Inconclusive);
        let a = find(&claims, "pope: ln only beats connector only");
        assert_eq!(a.verdict, Verdict::Inconclusive);
        assert!(
            a.evidence.contains("connector only answers"),
            "{}",
            a.evidence
        );
        assert!(m.evidence.contains("same answer"), "{}", m.evidence);
        // answers that vary: the interval decides
        let claims = judge_with(0.6, 0.25);
        assert_eq!(
            find(&claims, "pope: ln beats lora").verdict,
            Verdict::Reproduced
        );
        assert_eq!(
            find(&claims, "mme: ln beats lora").verdict,
            Verdict::Reproduced
        );
    }
}
