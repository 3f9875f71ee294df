//! Mixed precision: autocast (matmuls and convolutions in bf16/fp16 while the
//! weights stay float32, as torch.autocast) and, for fp16, a dynamic loss scaler
//! with the semantics of PyTorch's `GradScaler`: the loss is multiplied by the
//! scale before backward, gradients are unscaled before clipping, a step whose
//! gradients hold inf/nan is skipped and the scale halves, and the scale doubles
//! after `growth_interval` good steps in a row.

use tch::{Device, Kind, Tensor};

use crate::config::schema::MixedPrecision;

mod ffi {
    extern "C" {
        pub fn dbt_autocast_set(cuda: i32, enabled: i32, dtype: i32) -> i32;
        pub fn dbt_set_flush_denormal(on: i32) -> i32;
    }
}

/// Flushes denormal floats to zero in CPU math (`torch.set_flush_denormal(True)`):
/// Adam's second moments of tiny gradients are denormal, and the CPU computes
/// with those tens of times slower. Returns false where the CPU cannot.
pub fn flush_denormals() -> bool {
    // SAFETY: sets a flag of libtorch's global context.
    unsafe { ffi::dbt_set_flush_denormal(1) == 0 }
}

/// The precision a run really trains in on its device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Precision {
    /// Autocast's compute dtype; `None`: plain float32.
    pub autocast: Option<Kind>,
    pub device: Device,
}

impl Precision {
    pub fn new(setting: MixedPrecision, device: Device) -> Precision {
        let autocast = match setting {
            MixedPrecision::No => None,
            MixedPrecision::Bf16 => Some(Kind::BFloat16),
            MixedPrecision::Fp16 => Some(Kind::Half),
        };
        Precision { autocast, device }
    }

    /// One line for the log: what is really applied, where.
    pub fn describe(&self) -> String {
        let place = if self.device.is_cuda() { "CUDA" } else { "CPU" };
        match self.autocast {
            None => format!("precision: float32 weights and math on the {place}"),
            Some(Kind::BFloat16) => format!("precision: float32 weights, bf16 autocast on the {place}"),
            Some(_) => format!("precision: float32 weights, fp16 autocast on the {place}, dynamic loss scaling"),
        }
    }

    /// Runs `f` with autocast on (when this precision asks for it).
    pub fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        let Some(kind) = self.autocast else { return f() };
        let cuda = i32::from(self.device.is_cuda());
        let code = match kind {
            Kind::Half => 5,
            _ => 15,
        };
        // SAFETY: plain calls into libtorch's thread-local autocast state.
        let ok = unsafe { ffi::dbt_autocast_set(cuda, 1, code) } == 0;
        let out = f();
        if ok {
            // SAFETY: as above; undoes the enable.
            unsafe { ffi::dbt_autocast_set(cuda, 0, code) };
        }
        out
    }
}

/// PyTorch GradScaler's dynamic loss scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
    /// Good steps in a row since the scale last changed.
    pub growth_tracker: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler { scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000, growth_tracker: 0 }
    }
}

impl LossScaler {
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        loss * self.scale
    }

    /// Divides the gradients by the scale in place; true when any is inf or nan
    /// (the step must then be skipped).
    pub fn unscale(&self, params: &[(String, Tensor)]) -> bool {
        let _guard = tch::no_grad_guard();
        let inv = 1.0 / self.scale;
        let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
        if super::foreach::applies(grads.first()) {
            return super::foreach::unscale(&grads, inv).expect("unscale of float32 CUDA gradients");
        }
        let mut found_inf = false;
        for mut g in grads {
            let _ = g.g_mul_scalar_(inv);
            if !found_inf && !bool::try_from(g.isfinite().all()).unwrap_or(false) {
                found_inf = true;
            }
        }
        found_inf
    }

    /// After a step (or a skipped one): back off on overflow, grow after a streak.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == self.growth_interval {
                self.scale *= self.growth_factor;
                self.growth_tracker = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_backs_off_and_a_streak_grows() {
        let mut s = LossScaler { growth_interval: 3, ..LossScaler::default() };
        let p = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&p * f64::INFINITY).sum(Kind::Float).backward();
        assert!(s.unscale(&[("p".into(), p.shallow_clone())]));
        s.update(true);
        assert_eq!(s.scale, 32768.0);
        for _ in 0..3 {
            s.update(false);
        }
        assert_eq!(s.scale, 65536.0);
        assert_eq!(s.growth_tracker, 0);
    }

    #[test]
    fn cpu_autocast_runs_matmuls_in_bf16() {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu)) / 3.0;
        let plain = Precision::new(MixedPrecision::No, Device::Cpu).autocast(|| a.matmul(&a));
        let bf16 = Precision::new(MixedPrecision::Bf16, Device::Cpu).autocast(|| a.matmul(&a));
        assert_eq!(plain.kind(), Kind::Float);
        assert_eq!(bf16.kind(), Kind::BFloat16);
        // Autocast is off again afterwards.
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
    }
}
