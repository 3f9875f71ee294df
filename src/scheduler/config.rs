//! The model's saved noise-schedule config (`scheduler/scheduler_config.json`).
//! It applies to every sampler, as diffusers' `from_config` does: keys a
//! sampler does not know are ignored, keys absent take that sampler's default.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    pub num_train_timesteps: i64,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: String,
    pub steps_offset: i64,
    /// `leading`, `trailing` or `linspace`; `None` when the file does not say,
    /// so each sampler uses its own default as diffusers does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_alpha_to_one: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_sample: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_prk_steps: Option<bool>,
    pub rescale_betas_zero_snr: bool,
    // Sampler-specific keys that change numbers; `None` = that sampler's default.
    // (A `null` written back would reach diffusers as an explicit `None`, so absent
    // values are not serialised.)
    /// DDIM: x0 is clipped to +-this when `clip_sample` (default 1.0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_sample_range: Option<f64>,
    /// DDIM / DPM-Solver dynamic thresholding (pixel-space models only; unsupported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thresholding: Option<bool>,
    /// Euler: `linear` (default) or `log_linear` sigma interpolation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interpolation_type: Option<String>,
    /// LMS / Euler / DPM-Solver: Karras sigma spacing (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_karras_sigmas: Option<bool>,
    /// Euler / DPM-Solver: `zero` (default) or `sigma_min` as the last sigma.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_sigmas_type: Option<String>,
    /// Euler: `discrete` (default) or `continuous`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestep_type: Option<String>,
    /// DPM-Solver: first-order final step (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub euler_at_final: Option<bool>,
    /// DPM-Solver: lower-order last steps under 15 steps (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lower_order_final: Option<bool>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            steps_offset: 0,
            timestep_spacing: None,
            set_alpha_to_one: None,
            clip_sample: None,
            skip_prk_steps: None,
            rescale_betas_zero_snr: false,
            clip_sample_range: None,
            thresholding: None,
            interpolation_type: None,
            use_karras_sigmas: None,
            final_sigmas_type: None,
            timestep_type: None,
            euler_at_final: None,
            lower_order_final: None,
        }
    }
}

impl SchedulerConfig {
    /// What Stable Diffusion 1.x/2.x ship (PNDM config of the original release).
    pub fn stable_diffusion() -> Self {
        SchedulerConfig {
            class_name: Some("PNDMScheduler".into()),
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            steps_offset: 1,
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            skip_prk_steps: Some(true),
            ..Default::default()
        }
    }
}
