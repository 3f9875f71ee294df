//! Which tensors train: the UNet (`train_unet`), the text encoder for the first
//! `text_encoder_train_ratio` of the steps (without its layer norms when
//! `freeze_clip_normalization`). Optimizer keys carry the network as a prefix
//! (`unet.conv_in.weight`, `text_encoder.encoder.layers.0.mlp.fc1.weight`).

use tch::Tensor;

use crate::config::schema::Training;
use crate::pipeline::ModelParameters;

pub const UNET_PREFIX: &str = "unet.";
pub const TEXT_PREFIX: &str = "text_encoder.";

/// CLIP's normalisation layers (layer_norm1/2 of each layer, final_layer_norm).
pub fn is_clip_norm(key: &str) -> bool {
    key.contains("layer_norm")
}

/// Number of optimizer steps during which the text encoder trains.
pub fn text_encoder_steps(training: &Training, total_steps: u64) -> u64 {
    (training.text_encoder_train_ratio * total_steps as f64).ceil() as u64
}

/// The trainable parameter set of a full fine-tune, by optimizer key. This is
/// the one place that chooses it: a LoRA run would hand back its adapter
/// matrices here instead of the networks' own weights.
pub fn choose_trainable_parameters(training: &Training, params: &ModelParameters) -> anyhow::Result<Vec<(String, Tensor)>> {
    if training.use_lora {
        return Err(crate::error::usage(
            "`training.use_lora` is not available in this build yet; set it to false for a full fine-tune",
        ));
    }
    let mut out = Vec::new();
    if training.train_unet {
        out.extend(params.unet.iter().map(|(k, t)| (format!("{UNET_PREFIX}{k}"), t.shallow_clone())));
    }
    if training.text_encoder_train_ratio > 0.0 {
        out.extend(
            params
                .text_encoder
                .iter()
                .filter(|(k, _)| !(training.freeze_clip_normalization && is_clip_norm(k)))
                .map(|(k, t)| (format!("{TEXT_PREFIX}{k}"), t.shallow_clone())),
        );
    }
    Ok(out)
}

/// Turns gradients on for `trainable` and off for everything else in `params`.
pub fn set_trainable(params: &ModelParameters, trainable: &[(String, Tensor)]) {
    let keys: std::collections::HashSet<&str> = trainable.iter().map(|(k, _)| k.as_str()).collect();
    for (prefix, list) in [(UNET_PREFIX, &params.unet), (TEXT_PREFIX, &params.text_encoder), ("vae.", &params.vae)] {
        for (k, t) in list.iter() {
            let on = keys.contains(format!("{prefix}{k}").as_str());
            let _ = t.set_requires_grad(on);
        }
    }
}
