//! The optimizer a run uses: fp32 AdamW or 8-bit AdamW, behind one interface.

use std::collections::HashMap;

use tch::Tensor;

use super::adamw::{AdamW, AdamWConfig};
use super::adamw8bit::AdamW8bit;
use crate::config::schema::{Optimizer as OptimizerKind, Training};

pub enum Optimizer {
    AdamW(AdamW),
    AdamW8bit(AdamW8bit),
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, params: Vec<(String, Tensor)>, config: AdamWConfig) -> Optimizer {
        match kind {
            OptimizerKind::Adamw => Optimizer::AdamW(AdamW::new(params, config)),
            OptimizerKind::Adamw8bit => Optimizer::AdamW8bit(AdamW8bit::new(params, config)),
        }
    }

    /// The optimizer and its hyper-parameters as the run's `training` section
    /// sets them: the text encoder's tensors (its weights or its LoRA) step at
    /// `text_encoder_learning_rate` over `learning_rate` times the scheduled rate.
    pub fn from_training(params: Vec<(String, Tensor)>, training: &Training) -> Optimizer {
        let config = AdamWConfig {
            beta1: training.adam_beta1,
            beta2: training.adam_beta2,
            eps: training.adam_epsilon,
            weight_decay: training.weight_decay,
        };
        let text_encoder_scale = training.text_encoder_lr() / training.learning_rate;
        let scales = params
            .iter()
            .map(|(key, _)| if super::modules::is_text_encoder_key(key) { text_encoder_scale } else { 1.0 })
            .collect();
        Optimizer::new(training.optimizer, params, config).with_lr_scales(scales)
    }

    /// An optimizer of no parameters (a stand-in while the real one is lent out).
    pub fn empty() -> Optimizer {
        Optimizer::AdamW(AdamW::new(Vec::new(), AdamWConfig::default()))
    }

    /// The same optimizer with parameter `i` stepping at `scales[i]` × the step's learning rate.
    pub fn with_lr_scales(self, scales: Vec<f64>) -> Optimizer {
        match self {
            Optimizer::AdamW(o) => Optimizer::AdamW(o.with_lr_scales(scales)),
            Optimizer::AdamW8bit(o) => Optimizer::AdamW8bit(o.with_lr_scales(scales)),
        }
    }

    pub fn kind(&self) -> OptimizerKind {
        match self {
            Optimizer::AdamW(_) => OptimizerKind::Adamw,
            Optimizer::AdamW8bit(_) => OptimizerKind::Adamw8bit,
        }
    }

    pub fn config(&self) -> AdamWConfig {
        match self {
            Optimizer::AdamW(o) => o.config,
            Optimizer::AdamW8bit(o) => o.config,
        }
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        match self {
            Optimizer::AdamW(o) => o.params(),
            Optimizer::AdamW8bit(o) => o.params(),
        }
    }

    /// Optimizer steps taken (saved with checkpoints beside `state_tensors`).
    pub fn step_count(&self) -> u64 {
        match self {
            Optimizer::AdamW(o) => o.step,
            Optimizer::AdamW8bit(o) => o.step,
        }
    }

    pub fn step(&mut self, lr: f64) {
        match self {
            Optimizer::AdamW(o) => o.step(lr),
            Optimizer::AdamW8bit(o) => o.step(lr),
        }
    }

    /// Starts a step applied parameter by parameter (`training.fused_backward`).
    pub fn begin_step(&mut self) {
        match self {
            Optimizer::AdamW(o) => o.begin_step(),
            Optimizer::AdamW8bit(o) => o.begin_step(),
        }
    }

    /// Updates parameter `i` (an index into [`params`](Self::params)) from its gradient.
    pub fn update_param(&mut self, i: usize, lr: f64) {
        match self {
            Optimizer::AdamW(o) => o.update_param(i, lr),
            Optimizer::AdamW8bit(o) => o.update_param(i, lr),
        }
    }

    pub fn zero_grad(&mut self) {
        match self {
            Optimizer::AdamW(o) => o.zero_grad(),
            Optimizer::AdamW8bit(o) => o.zero_grad(),
        }
    }

    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        match self {
            Optimizer::AdamW(o) => o.state_tensors(),
            Optimizer::AdamW8bit(o) => o.state_tensors(),
        }
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> anyhow::Result<()> {
        match self {
            Optimizer::AdamW(o) => o.load_state(tensors, step),
            Optimizer::AdamW8bit(o) => o.load_state(tensors, step),
        }
    }

    /// Bytes of optimizer state held now (moments are allocated at the first step).
    pub fn state_bytes(&self) -> u64 {
        self.state_tensors().iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum()
    }

    /// Bytes of state a parameter of `numel` fp32 elements will hold under `kind`
    /// (for estimates before any step).
    pub fn state_bytes_for(kind: OptimizerKind, numel: i64) -> u64 {
        match kind {
            OptimizerKind::Adamw => 2 * 4 * numel as u64,
            OptimizerKind::Adamw8bit => AdamW8bit::state_bytes_for(numel),
        }
    }
}
