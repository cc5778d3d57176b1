//! Learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio`·lr, with the
//! step convention of HF `get_cosine_schedule_with_warmup` (what the LLaVA code base uses):
//! the k-th optimizer step (k = 0, 1, …) runs with lr·λ(k).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Schedule {
    pub lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// Warmup as a fraction of the total (LLaVA's `warmup_ratio` 0.03), rounded up.
    pub fn with_warmup_ratio(lr: f64, total_steps: usize, warmup_ratio: f64) -> Self {
        Self {
            lr,
            warmup_steps: (warmup_ratio * total_steps as f64).ceil() as usize,
            total_steps,
            min_lr_ratio: 0.0,
        }
    }

    /// The learning rate of optimizer step `k` (0-based).
    pub fn lr_at(&self, k: usize) -> f64 {
        // 1) linear warmup from 0
        if k < self.warmup_steps {
            return self.lr * k as f64 / self.warmup_steps.max(1) as f64;
        }
        // 2) past the end: the floor
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((k - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        // 3) in between: cosine from lr down to min_lr_ratio·lr
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_at_chosen_steps() {
        // lr 1e-3, 10 warmup of 110 steps: HF λ(k) = k/10 in warmup, then
        // 0.5(1 + cos(π (k − 10)/100))
        let s = Schedule {
            lr: 1e-3,
            warmup_steps: 10,
            total_steps: 110,
            min_lr_ratio: 0.0,
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
        assert!(close(s.lr_at(0), 0.0));
        assert!(close(s.lr_at(5), 5e-4));
        assert!(close(s.lr_at(10), 1e-3));
        assert!(close(s.lr_at(60), 5e-4)); // halfway through the cosine
        assert!(close(
            s.lr_at(35),
            1e-3 * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())
        ));
        assert!(close(s.lr_at(110), 0.0));
        assert!(close(s.lr_at(500), 0.0));
        let floor = Schedule {
            min_lr_ratio: 0.1,
            ..s
        };
        assert!(close(floor.lr_at(110), 1e-4));
        assert_eq!(
            Schedule::with_warmup_ratio(2e-3, 1000, 0.03).warmup_steps,
            30
        );
    }
}
