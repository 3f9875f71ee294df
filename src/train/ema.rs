//! Exponential moving average of the UNet weights (diffusers' `EMAModel`):
//! after each optimizer step, shadow -= (1 - d) × (shadow - param) with
//! d = min(decay, (1 + n) / (10 + n)), n = optimizer steps so far - 1. The
//! averaged weights are saved as `ema_unet.safetensors`, used for previews and
//! exported.

use tch::Tensor;

/// Elements of shadow weights updated per multi-tensor call.
const CHUNK_NUMEL: i64 = 1 << 24;

pub struct Ema {
    pub decay: f64,
    /// Optimizer steps folded in so far.
    pub optimization_step: u64,
    /// Shadow weights by UNet key, float32, on the parameters' device.
    pub shadow: Vec<(String, Tensor)>,
}

impl Ema {
    pub fn new(params: &[(String, Tensor)], decay: f64) -> Ema {
        let _guard = tch::no_grad_guard();
        let shadow = params.iter().map(|(k, p)| (k.clone(), p.detach().copy())).collect();
        Ema { decay, optimization_step: 0, shadow }
    }

    /// The decay applied at the current step.
    pub fn current_decay(&self) -> f64 {
        let step = self.optimization_step.saturating_sub(1);
        if step == 0 {
            return 0.0;
        }
        ((1.0 + step as f64) / (10.0 + step as f64)).min(self.decay)
    }

    /// Folds the current weights `params` (same keys, same order) in.
    pub fn update(&mut self, params: &[(String, Tensor)]) {
        let _guard = tch::no_grad_guard();
        self.optimization_step += 1;
        let one_minus = 1.0 - self.current_decay();
        // Multi-tensor updates over chunks of at most CHUNK_NUMEL elements: a
        // handful of launches per chunk instead of three per tensor (SD 1.5: ~700
        // tensors), and at most one chunk of differences allocated at a time.
        let (mut shadow, mut current, mut numel) = (Vec::new(), Vec::new(), 0i64);
        for ((_, s), (_, p)) in self.shadow.iter().zip(params) {
            shadow.push(s.shallow_clone());
            current.push(p.shallow_clone());
            numel += s.numel() as i64;
            if numel >= CHUNK_NUMEL {
                super::foreach::ema_update(&shadow, &current, one_minus).expect("the EMA update");
                (shadow, current, numel) = (Vec::new(), Vec::new(), 0);
            }
        }
        super::foreach::ema_update(&shadow, &current, one_minus).expect("the EMA update");
    }
}
