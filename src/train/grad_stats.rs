//! Gradient-variance statistics recorded during training (`--log-grad-stats`), two ways:
//! - across steps: the per-coordinate variance of the step gradients within a window of W
//!   consecutive steps (non-overlapping windows), averaged over coordinates;
//! - across micro-batches at fixed weights: the per-coordinate variance of the token-mean
//!   gradients of the micro-batches of one optimizer step (which all see the same weights),
//!   averaged over coordinates.
//!
//! Both use unbiased sample variances (n − 1), computed with Welford's update so that a
//! window never needs its gradients stored. The run writes one `GradStatLine` per step to
//! `grad_stats.jsonl`; `analyze::gradvar` aggregates and plots them.

use serde::{Deserialize, Serialize};

/// Per-coordinate running mean and sum of squared deviations of vectors of one length.
#[derive(Debug, Clone)]
pub struct CoordVariance {
    n: usize,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl CoordVariance {
    pub fn new(dim: usize) -> Self {
        Self {
            n: 0,
            mean: vec![0.0; dim],
            m2: vec![0.0; dim],
        }
    }

    pub fn count(&self) -> usize {
        self.n
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Adds one observation (panics on a length mismatch: a programming error).
    pub fn push(&mut self, x: &[f32]) {
        assert_eq!(x.len(), self.mean.len(), "gradient length changed");
        self.n += 1;
        let n = self.n as f64;
        for ((m, s), &v) in self.mean.iter_mut().zip(self.m2.iter_mut()).zip(x) {
            let v = v as f64;
            let d = v - *m;
            *m += d / n;
            *s += d * (v - *m);
        }
    }

    /// Mean over coordinates of the unbiased variance; None with fewer than 2 observations.
    pub fn mean_variance(&self) -> Option<f64> {
        if self.n < 2 || self.mean.is_empty() {
            return None;
        }
        Some(self.m2.iter().sum::<f64>() / (self.n - 1) as f64 / self.mean.len() as f64)
    }

    /// Squared norm of the mean vector (the "signal" next to the variance).
    pub fn mean_sq_norm(&self) -> f64 {
        self.mean.iter().map(|m| m * m).sum()
    }

    pub fn reset(&mut self) {
        self.n = 0;
        self.mean.iter_mut().for_each(|x| *x = 0.0);
        self.m2.iter_mut().for_each(|x| *x = 0.0);
    }
}

/// One line of `grad_stats.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GradStatLine {
    /// 1-based optimizer step
    pub step: usize,
    /// which gradient: `trainable` or a name prefix such as the projector's
    pub subset: String,
    pub dim: usize,
    /// norm of this step's (pre-clipping) gradient of the subset
    pub norm: f64,
    /// variance across this step's micro-batches (needs 2 or more per step)
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub microbatch_var: Option<f64>,
    /// variance across the steps of the window that ends here
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub window_var: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub window: Option<usize>,
}

/// Turns per-step gradients into `GradStatLine`s.
pub struct GradStatsRecorder {
    pub subset: String,
    pub window: usize,
    steps: CoordVariance,
}

impl GradStatsRecorder {
    pub fn new(subset: &str, dim: usize, window: usize) -> Self {
        Self {
            subset: subset.to_string(),
            window: window.max(2),
            steps: CoordVariance::new(dim),
        }
    }

    /// `step_grad`: the step's accumulated gradient; `micro`: each micro-batch's token-mean
    /// gradient (same weights).
    pub fn record(&mut self, step: usize, step_grad: &[f32], micro: &[Vec<f32>]) -> GradStatLine {
        let microbatch_var = if micro.len() >= 2 {
            let mut v = CoordVariance::new(step_grad.len());
            micro.iter().for_each(|g| v.push(g));
            v.mean_variance()
        } else {
            None
        };
        self.steps.push(step_grad);
        let (window_var, window) = if self.steps.count() == self.window {
            let v = self.steps.mean_variance();
            self.steps.reset();
            (v, Some(self.window))
        } else {
            (None, None)
        };
        GradStatLine {
            step,
            subset: self.subset.clone(),
            dim: step_grad.len(),
            norm: step_grad
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt(),
            microbatch_var,
            window_var,
            window,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    #[test]
    fn exact_on_small_cases() {
        let mut v = CoordVariance::new(2);
        assert_eq!(v.mean_variance(), None);
        v.push(&[1.0, 10.0]);
        v.push(&[3.0, 10.0]);
        v.push(&[5.0, 10.0]);
        // coordinate 0: var(1, 3, 5) = 4; coordinate 1: 0
        assert!((v.mean_variance().unwrap() - 2.0).abs() < 1e-12);
        assert!((v.mean_sq_norm() - (9.0 + 100.0)).abs() < 1e-12);
    }

    #[test]
    fn recovers_a_known_variance() {
        // gradients = signal + N(0, σ²) noise per coordinate, σ differing per coordinate
        let dim = 2000;
        let sigma: Vec<f64> = (0..dim).map(|i| 0.5 + (i % 4) as f64 * 0.25).collect(); // 0.5..1.25
        let want = sigma.iter().map(|s| s * s).sum::<f64>() / dim as f64;
        let mut rng = Rng::new(3);
        let signal: Vec<f64> = (0..dim).map(|_| rng.normal()).collect();
        let mut rec = GradStatsRecorder::new("trainable", dim, 8);
        let mut lines = Vec::new();
        for step in 1..=16 {
            let micro: Vec<Vec<f32>> = (0..4)
                .map(|_| {
                    (0..dim)
                        .map(|i| (signal[i] + sigma[i] * rng.normal()) as f32)
                        .collect()
                })
                .collect();
            // the step gradient of 4 equal micro-batches: their mean (variance σ²/4)
            let g: Vec<f32> = (0..dim)
                .map(|i| micro.iter().map(|m| m[i]).sum::<f32>() / 4.0)
                .collect();
            lines.push(rec.record(step, &g, &micro));
        }
        // micro-batch variance estimates σ² on every step (2000 coords × 3 dof: about ±2% per step)
        for l in &lines {
            let v = l.microbatch_var.unwrap();
            assert!(
                (v / want - 1.0).abs() < 0.08,
                "step {}: {v} vs {want}",
                l.step
            );
        }
        // window variance across steps estimates σ²/4, reported at steps 8 and 16 only
        let w: Vec<&GradStatLine> = lines.iter().filter(|l| l.window_var.is_some()).collect();
        assert_eq!(w.iter().map(|l| l.step).collect::<Vec<_>>(), [8, 16]);
        for l in w {
            let v = l.window_var.unwrap();
            assert!(
                (v / (want / 4.0) - 1.0).abs() < 0.05,
                "{v} vs {}",
                want / 4.0
            );
        }
        // one micro-batch per step: no micro-batch estimate
        assert_eq!(
            rec.record(17, &[0.0; 2000], &[vec![0.0; 2000]])
                .microbatch_var,
            None
        );
    }
}
