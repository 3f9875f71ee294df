//! AdamW with decoupled weight decay, operation for operation as PyTorch's
//! single-tensor `torch.optim.AdamW` (the CPU default), so a step matches the
//! reference to float rounding. Its state (step count and both moments, by
//! parameter key) is saved with checkpoints for exact resume.

use std::collections::HashMap;

use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Parameters by checkpoint key, in a fixed order.
    params: Vec<(String, Tensor)>,
    exp_avg: HashMap<String, Tensor>,
    exp_avg_sq: HashMap<String, Tensor>,
    /// Each parameter's learning rate over the scheduled one (PyTorch's param
    /// groups with their own `lr` under one LambdaLR); 1 unless set.
    lr_scales: Vec<f64>,
    /// Optimizer steps taken (PyTorch keeps one per parameter; they move together).
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> AdamW {
        let lr_scales = vec![1.0; params.len()];
        AdamW { config, params, exp_avg: HashMap::new(), exp_avg_sq: HashMap::new(), lr_scales, step: 0 }
    }

    /// The same optimizer with parameter `i` stepping at `scales[i]` × the step's learning rate.
    pub fn with_lr_scales(mut self, scales: Vec<f64>) -> AdamW {
        assert_eq!(scales.len(), self.params.len(), "one learning-rate scale per parameter");
        self.lr_scales = scales;
        self
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// One update with learning rate `lr` from the parameters' current `.grad()`.
    /// Parameters without a gradient are left alone (as PyTorch skips them).
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        if super::foreach::applies(self.params.first().map(|(_, p)| p)) {
            self.fused_step(lr);
            return;
        }
        for i in 0..self.params.len() {
            self.update_param(i, lr);
        }
    }

    /// Starts an optimizer step whose parameters are then updated one by one
    /// with [`update_param`](Self::update_param) (`training.fused_backward`).
    pub fn begin_step(&mut self) {
        self.step += 1;
    }

    /// Updates parameter `i` from its current `.grad()` as [`step`](Self::step)
    /// would in this step (none: left alone).
    pub fn update_param(&mut self, i: usize, lr: f64) {
        let _guard = tch::no_grad_guard();
        let c = self.config;
        let step = self.step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(step);
        let bias_correction2_sqrt = (1.0 - c.beta2.powi(step)).sqrt();
        let (key, param) = &self.params[i];
        let grad = param.grad();
        if !grad.defined() {
            return;
        }
        let lr = lr * self.lr_scales[i];
        let step_size = lr / bias_correction1;
        let mut param = param.shallow_clone();
        let exp_avg = self.exp_avg.entry(key.clone()).or_insert_with(|| param.zeros_like());
        let exp_avg_sq = self.exp_avg_sq.entry(key.clone()).or_insert_with(|| param.zeros_like());
        if c.weight_decay != 0.0 {
            let _ = param.g_mul_scalar_(1.0 - lr * c.weight_decay);
        }
        let _ = exp_avg.lerp_(&grad, 1.0 - c.beta1);
        // addcmul_(grad, grad, value) computes (value * grad) * grad.
        let _ = exp_avg_sq.g_mul_scalar_(c.beta2);
        let _ = exp_avg_sq.g_add_(&((&grad * (1.0 - c.beta2)) * &grad));
        let denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt) + c.eps;
        // addcdiv_(exp_avg, denom, value) computes (value * exp_avg) / denom.
        let _ = param.g_add_(&((&*exp_avg * -step_size) / denom));
    }

    /// The same update as fused multi-tensor kernels (CUDA), one per learning
    /// rate: PyTorch's `fused=True` AdamW, equal to the loop up to float rounding.
    fn fused_step(&mut self, lr: f64) {
        let c = self.config;
        let mut scales: Vec<f64> = Vec::new();
        for &s in &self.lr_scales {
            if !scales.contains(&s) {
                scales.push(s);
            }
        }
        for scale in scales {
            let (mut params, mut grads, mut exp_avgs, mut exp_avg_sqs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((key, param), _) in self.params.iter().zip(&self.lr_scales).filter(|(_, &s)| s == scale) {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let exp_avg = self.exp_avg.entry(key.clone()).or_insert_with(|| param.zeros_like());
                let exp_avg_sq = self.exp_avg_sq.entry(key.clone()).or_insert_with(|| param.zeros_like());
                params.push(param.shallow_clone());
                grads.push(grad);
                exp_avgs.push(exp_avg.shallow_clone());
                exp_avg_sqs.push(exp_avg_sq.shallow_clone());
            }
            if params.is_empty() {
                continue;
            }
            let lr = lr * scale;
            super::foreach::fused_adamw(&params, &grads, &exp_avgs, &exp_avg_sqs, self.step, lr, c.beta1, c.beta2, c.weight_decay, c.eps)
                .expect("fused AdamW on float32 CUDA tensors");
        }
    }

    /// Zeroes the gradients (keeping their memory for the next backward pass).
    pub fn zero_grad(&mut self) {
        zero_grads(&self.params);
    }

    /// The state as named tensors (for checkpoint files) plus the step count.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (key, _) in &self.params {
            if let (Some(m), Some(v)) = (self.exp_avg.get(key), self.exp_avg_sq.get(key)) {
                out.push((format!("exp_avg.{key}"), m.shallow_clone()));
                out.push((format!("exp_avg_sq.{key}"), v.shallow_clone()));
            }
        }
        out
    }

    /// Restores what `state_tensors` saved (moved to each parameter's device).
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> anyhow::Result<()> {
        self.step = step;
        self.exp_avg.clear();
        self.exp_avg_sq.clear();
        for (key, p) in &self.params {
            match (tensors.get(&format!("exp_avg.{key}")), tensors.get(&format!("exp_avg_sq.{key}"))) {
                (Some(m), Some(v)) => {
                    if m.size() != p.size() || v.size() != p.size() {
                        anyhow::bail!("the optimizer state of `{key}` does not match the parameter's shape");
                    }
                    self.exp_avg.insert(key.clone(), m.to_device(p.device()).to_kind(p.kind()));
                    self.exp_avg_sq.insert(key.clone(), v.to_device(p.device()).to_kind(p.kind()));
                }
                // A parameter that never had a gradient has no moments (the text encoder's
                // last layer under clip_skip 2, which the conditioning skips).
                (None, None) => {}
                _ => anyhow::bail!("the optimizer state of `{key}` has one moment of two"),
            }
        }
        if step > 0 && !self.params.is_empty() && self.exp_avg.is_empty() {
            anyhow::bail!("the optimizer state has no moments at all, after {step} steps");
        }
        Ok(())
    }
}

/// Zeroes each parameter's gradient in place (both optimizers' `zero_grad`):
/// one multi-tensor call on CUDA (where a CUDA graph keeps the gradients and
/// they are zeroed every step), per tensor elsewhere.
pub fn zero_grads(params: &[(String, Tensor)]) {
    let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(Tensor::defined).collect();
    if grads.first().is_some_and(|g| g.device().is_cuda()) {
        super::foreach::zero(&grads).expect("zeroing CUDA gradients");
        return;
    }
    for (_, p) in params {
        let mut p = p.shallow_clone();
        p.zero_grad();
    }
}
