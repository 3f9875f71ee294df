//! Learning-rate schedules, equal at every step to diffusers' `get_scheduler`
//! (a LambdaLR: lr = base × factor(step), with `step` the number of optimizer
//! steps taken so far).

use crate::config::schema::LrScheduler;

#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub kind: LrScheduler,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Polynomial degree.
    pub power: f64,
    /// Polynomial's final learning rate.
    pub lr_end: f64,
    /// Cosine with restarts: how many times it decays from the top.
    pub cycles: u32,
}

impl LrSchedule {
    /// Learning rate for the optimizer step that follows `step` completed steps.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn warmup(&self, step: u64) -> f64 {
        step as f64 / (self.warmup_steps.max(1)) as f64
    }

    fn factor(&self, step: u64) -> f64 {
        let (w, n, s) = (self.warmup_steps, self.total_steps, step);
        match self.kind {
            LrScheduler::Constant => 1.0,
            // "constant" in the A1111 extension's sense of a warm-up then flat.
            LrScheduler::ConstantWithWarmup => {
                if s < w { self.warmup(s) } else { 1.0 }
            }
            LrScheduler::LinearWithWarmup => {
                if s < w {
                    return self.warmup(s);
                }
                let progress = (n as f64 - s as f64) / (n.saturating_sub(w).max(1)) as f64;
                progress.max(0.0)
            }
            LrScheduler::Polynomial => {
                if s < w {
                    self.warmup(s)
                } else if s > n {
                    self.lr_end / self.base_lr
                } else {
                    let lr_range = self.base_lr - self.lr_end;
                    let decay_steps = (n - w) as f64;
                    let pct_remaining = 1.0 - (s - w) as f64 / decay_steps;
                    (lr_range * pct_remaining.powf(self.power) + self.lr_end) / self.base_lr
                }
            }
            LrScheduler::Cosine => {
                if s < w {
                    return self.warmup(s);
                }
                let progress = (s - w) as f64 / (n.saturating_sub(w).max(1)) as f64;
                // diffusers' num_cycles = 0.5: one half cosine from 1 to 0.
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
            LrScheduler::CosineWithRestarts => {
                if s < w {
                    return self.warmup(s);
                }
                let progress = (s - w) as f64 / (n.saturating_sub(w).max(1)) as f64;
                if progress >= 1.0 {
                    return 0.0;
                }
                // Each cycle is a whole half cosine from 1 to 0, then a jump back to 1.
                let within = (f64::from(self.cycles) * progress) % 1.0;
                (0.5 * (1.0 + (std::f64::consts::PI * within).cos())).max(0.0)
            }
        }
    }
}
