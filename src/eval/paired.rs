//! Paired statistics of two models answering the same questions: the difference of their
//! mean per-question scores with a bootstrap confidence interval (items resampled with
//! replacement, the pairing kept), and, where scores are right/wrong, McNemar's exact test
//! on the questions exactly one of them gets right.
//!
//! Per-question scores are the official scorers' own: VQAv2 accuracy (`min(#humans/3, 1)`
//! over the 10 leave-one-out subsets) of the submitted answer, POPE's parsed yes/no against
//! the label, MME's parsed answer against the ground truth (the accuracy part of MME's
//! score). Captions have no per-question right or wrong and are left out.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::benchmarks::item::{Item, Truth};
use super::benchmarks::scores::submission_answer;
use super::metrics::{mme_parse, pope_parse, vqa_accuracy};
use crate::util::rng::Rng;

/// Bootstrap resamples of a confidence interval.
pub const RESAMPLES: usize = 10_000;

/// One model against a reference on one benchmark's questions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedComparison {
    /// `vqav2`, `pope` or `mme`
    pub bench: String,
    pub questions: usize,
    /// mean per-question score of the reference, in percent
    pub reference: f64,
    /// mean per-question score of the other model, in percent
    pub other: f64,
    /// other − reference, in points
    pub diff: f64,
    /// 95% percentile-bootstrap interval of `diff`
    pub ci95: [f64; 2],
    /// McNemar's exact two-sided p (right/wrong scores only)
    pub mcnemar_p: Option<f64>,
    /// (reference right and other wrong, reference wrong and other right)
    pub discordant: Option<[usize; 2]>,
}

/// Per-question scores in [0, 1] by benchmark, in item order; `answers` maps item ids to
/// raw answers and must answer every item.
pub fn item_scores(
    items: &[Item],
    answers: &HashMap<String, String>,
) -> Result<BTreeMap<String, Vec<f64>>> {
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for it in items {
        let Some(raw) = answers.get(&it.id) else {
            bail!("no answer for item `{}`", it.id);
        };
        let (bench, score) = match &it.truth {
            Truth::Vqa { answers, .. } => {
                ("vqav2", vqa_accuracy(&submission_answer(it, raw), answers))
            }
            Truth::Pope { label, .. } => {
                let yes = label.eq_ignore_ascii_case("yes");
                ("pope", f64::from(u8::from(pope_parse(raw) == yes)))
            }
            Truth::Mme { answer, .. } => (
                "mme",
                f64::from(u8::from(answer.to_lowercase() == mme_parse(raw))),
            ),
            Truth::Caption { .. } => continue,
        };
        out.entry(bench.into()).or_default().push(score);
    }
    Ok(out)
}

/// `other` against `reference` on the same questions (`reference[i]` and `other[i]` score
/// question i). The bootstrap is seeded, so a report is reproducible.
pub fn compare(bench: &str, reference: &[f64], other: &[f64], seed: u64) -> PairedComparison {
    assert_eq!(reference.len(), other.len(), "paired scores");
    let n = reference.len();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n.max(1) as f64;
    let diffs: Vec<f64> = other.iter().zip(reference).map(|(b, a)| b - a).collect();
    let mut rng = Rng::new(seed);
    let mut means: Vec<f64> = (0..if n == 0 { 0 } else { RESAMPLES })
        .map(|_| (0..n).map(|_| diffs[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        if means.is_empty() {
            0.0
        } else {
            100.0 * means[((q * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)]
        }
    };
    let binary = reference.iter().chain(other).all(|&x| x == 0.0 || x == 1.0);
    let discordant = binary.then(|| {
        let ref_only = reference
            .iter()
            .zip(other)
            .filter(|(a, b)| **a == 1.0 && **b == 0.0)
            .count();
        let other_only = reference
            .iter()
            .zip(other)
            .filter(|(a, b)| **a == 0.0 && **b == 1.0)
            .count();
        [ref_only, other_only]
    });
    PairedComparison {
        bench: bench.into(),
        questions: n,
        reference: 100.0 * mean(reference),
        other: 100.0 * mean(other),
        diff: 100.0 * mean(&diffs),
        ci95: [pct(0.025), pct(0.975)],
        mcnemar_p: discordant.map(|[b, c]| mcnemar_exact(b, c)),
        discordant,
    }
}

/// McNemar's exact test: two-sided binomial p of `b` against `c` discordant pairs under
/// p = 1/2, `min(1, 2·P(X ≤ min(b, c)))` with X ~ Binomial(b + c, 1/2).
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    // log-space terms: 0.5^n underflows for n above ~1074
    let mut log_pmf = n as f64 * 0.5f64.ln();
    let mut tail = 0.0;
    for k in 0..=b.min(c) {
        tail += log_pmf.exp();
        log_pmf += ((n - k) as f64).ln() - ((k + 1) as f64).ln();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_exact_by_hand() {
        // n = 12, min 2: 2·(1 + 12 + 66)/4096
        assert!((mcnemar_exact(10, 2) - 158.0 / 4096.0).abs() < 1e-15);
        assert!((mcnemar_exact(2, 10) - 158.0 / 4096.0).abs() < 1e-15);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        // n = 1: 2·0.5 = 1; n = 6 all one way: 2/64
        assert_eq!(mcnemar_exact(1, 0), 1.0);
        assert!((mcnemar_exact(6, 0) - 2.0 / 64.0).abs() < 1e-15);
        // large n stays finite and symmetric: 1200 vs 1000 discordant pairs
        let p = mcnemar_exact(1200, 1000);
        // exact value: 2·Σ_{k≤1000} C(2200, k) / 2^2200, in rational arithmetic
        assert!((p / 2.1817026407914712e-05 - 1.0).abs() < 1e-9, "{p}");
        assert_eq!(p, mcnemar_exact(1000, 1200));
    }

    #[test]
    fn bootstrap_interval_covers_the_difference_and_shrinks_with_more_questions() {
        // the other model gets 10% more questions right, on a fixed pattern
        let make = |n: usize| -> (Vec<f64>, Vec<f64>) {
            let a: Vec<f64> = (0..n).map(|i| f64::from(u8::from(i % 2 == 0))).collect();
            let b: Vec<f64> = (0..n)
                .map(|i| f64::from(u8::from(i % 2 == 0 || i % 10 == 1)))
                .collect();
            (a, b)
        };
        let (a, b) = make(100);
        let small = compare("pope", &a, &b, 0);
        assert_eq!(
            (small.reference, small.other, small.diff),
            (50.0, 60.0, 10.0)
        );
        assert_eq!(small.discordant, Some([0, 10]));
        assert!(
            small.ci95[0] <= 10.0 && 10.0 <= small.ci95[1],
            "{:?}",
            small.ci95
        );
        assert!(
            small.ci95[0] > 0.0,
            "10 of 10 discordant pairs one way: {:?}",
            small.ci95
        );
        let (a, b) = make(2000);
        let large = compare("pope", &a, &b, 0);
        let width = |c: &PairedComparison| c.ci95[1] - c.ci95[0];
        assert!(width(&large) < width(&small) / 3.0);
        assert!(large.mcnemar_p.unwrap() < small.mcnemar_p.unwrap());
        // the same seed gives the same interval; soft scores get no McNemar
        assert_eq!(compare("pope", &a, &b, 0), large);
        let soft = compare("vqav2", &[0.3, 1.0, 0.6], &[0.6, 1.0, 0.0], 1);
        assert!(soft.mcnemar_p.is_none() && soft.discordant.is_none());
        assert!((soft.diff - 100.0 * (0.3 - 0.6) / 3.0).abs() < 1e-12);
    }
}
