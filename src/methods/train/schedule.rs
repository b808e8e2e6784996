//! The learning rate of every optimizer step, as a pure function of the step index, so a resumed
//! run needs no scheduler state.

use super::config::Schedule;

/// The learning rate at each global step of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    base: f64,
    schedule: Schedule,
    steps_per_epoch: u64,
    warmup_steps: u64,
    total_steps: u64,
}

impl LrSchedule {
    /// `base` is the optimizer's lr; warm-up and annealing are counted in steps of
    /// `steps_per_epoch` (≥ 1).
    pub fn new(
        base: f64,
        schedule: Schedule,
        warmup_epochs: usize,
        epochs: usize,
        steps_per_epoch: u64,
    ) -> Self {
        let steps_per_epoch = steps_per_epoch.max(1);
        Self {
            base,
            schedule,
            steps_per_epoch,
            warmup_steps: warmup_epochs as u64 * steps_per_epoch,
            total_steps: epochs as u64 * steps_per_epoch,
        }
    }

    /// The lr of the optimizer step with 0-based global index `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            // Linear from base/W at the first step to base at the last warm-up step (the
            // "linear warm-up" of Goyal et al.), never 0, which would waste a step.
            return self.base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match &self.schedule {
            Schedule::Constant => self.base,
            Schedule::Step { milestones, gamma } => {
                let epoch = step / self.steps_per_epoch;
                let passed = milestones.iter().filter(|&&m| m as u64 <= epoch).count();
                self.base * gamma.powi(passed as i32)
            }
            Schedule::Cosine { min_lr } => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let t = (step - self.warmup_steps).min(span) as f64 / span as f64;
                min_lr + (self.base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}");
    }

    #[test]
    fn constant_is_constant() {
        let s = LrSchedule::new(0.3, Schedule::Constant, 0, 5, 10);
        for step in [0, 1, 17, 49, 1000] {
            assert_eq!(s.lr(step), 0.3);
        }
    }

    #[test]
    fn step_schedule_decays_at_the_milestone_epochs() {
        // 10 steps per epoch, milestones at epochs 2 and 4: lr 0.1 for steps 0..20, 0.01 for
        // 20..40, 0.001 from 40 on.
        let s = LrSchedule::new(
            0.1,
            Schedule::Step {
                milestones: vec![4, 2],
                gamma: 0.1,
            },
            0,
            6,
            10,
        );
        close(s.lr(0), 0.1);
        close(s.lr(19), 0.1);
        close(s.lr(20), 0.01);
        close(s.lr(39), 0.01);
        close(s.lr(40), 0.001);
        close(s.lr(59), 0.001);
    }

    #[test]
    fn cosine_follows_the_half_cosine_over_all_steps() {
        // 4 epochs × 25 steps = 100 steps; lr(s) = min + (base − min)·(1 + cos(π·s/100))/2.
        let s = LrSchedule::new(0.2, Schedule::Cosine { min_lr: 0.02 }, 0, 4, 25);
        close(s.lr(0), 0.2);
        close(s.lr(50), 0.02 + 0.18 * 0.5); // cos(π/2) = 0
        close(s.lr(25), 0.02 + 0.18 * 0.5 * (1.0 + 0.5f64.sqrt())); // cos(π/4) = √½
        close(
            s.lr(99),
            0.02 + 0.18 * 0.5 * (1.0 + (std::f64::consts::PI * 0.99).cos()),
        );
        assert!(s.lr(99) > 0.02 && s.lr(99) < 0.0201);
        // Monotone decreasing.
        assert!((1..100).all(|i| s.lr(i) < s.lr(i - 1)));
    }

    #[test]
    fn warmup_ramps_linearly_then_hands_over() {
        // 2 warm-up epochs × 5 steps: lr = base·(s+1)/10 for s < 10.
        let s = LrSchedule::new(1.0, Schedule::Cosine { min_lr: 0.0 }, 2, 12, 5);
        close(s.lr(0), 0.1);
        close(s.lr(4), 0.5);
        close(s.lr(9), 1.0);
        // Cosine over the remaining 50 steps starts at base.
        close(s.lr(10), 1.0);
        close(s.lr(35), 0.5);
        // With a step schedule, milestones count absolute epochs.
        let s = LrSchedule::new(
            1.0,
            Schedule::Step {
                milestones: vec![3],
                gamma: 0.5,
            },
            1,
            5,
            4,
        );
        close(s.lr(0), 0.25);
        close(s.lr(3), 1.0);
        close(s.lr(4), 1.0);
        close(s.lr(11), 1.0);
        close(s.lr(12), 0.5);
    }
}
