//! `training.fused_backward`: each tensor is updated inside the backward pass
//! and its gradient freed there. Without clipping and accumulation it trains
//! to the same weights as the plain step, with either optimizer, text encoder
//! included; it resumes exactly; the settings it cannot honour are refused.

mod train_support;

use dreambooth::train::trainer::{Outcome, Trainer};
use tch::Tensor;
use train_support::*;

fn weights(t: &Trainer) -> Vec<(String, Tensor)> {
    let mut all: Vec<(String, Tensor)> = t.params.unet.iter().map(|(k, p)| (format!("unet.{k}"), p.detach().copy())).collect();
    all.extend(t.params.text_tensors().map(|(name, (k, p))| (format!("{name}.{k}"), p.detach().copy())));
    all
}

fn run_to_end(root: &std::path::Path, name: &str, data: &std::path::Path, model: &std::path::Path, training: &str) -> Trainer {
    let mut t = Trainer::start(load(&write_config_over(model, root, name, data, training)), quiet()).unwrap();
    assert_eq!(t.run().unwrap(), Outcome::Finished);
    t
}

#[test]
fn fused_steps_train_to_the_plain_steps_weights() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 2);
    for optimizer in ["adamw", "adamw_8bit"] {
        let common = format!(
            "  steps_per_image: 3\n  learning_rate: 1.0e-3\n  max_grad_norm: 0\n  text_encoder_train_ratio: 0.5\n  use_ema: true\n  optimizer: {optimizer}\n"
        );
        let plain = run_to_end(root.path(), &format!("plain-{optimizer}"), &data, &demo_model(), &common);
        let fused = run_to_end(root.path(), &format!("fused-{optimizer}"), &data, &demo_model(), &format!("{common}  fused_backward: true\n"));
        let (a, b) = (weights(&plain), weights(&fused));
        let moved = weights(&Trainer::start(load(&write_config(root.path(), &format!("fresh-{optimizer}"), &data, &common)), quiet()).unwrap());
        assert!(a.iter().zip(&moved).any(|((_, x), (_, y))| !x.equal(y)), "{optimizer}: nothing trained");
        for ((key, x), (_, y)) in a.iter().zip(&b) {
            assert!(x.equal(y), "{optimizer}: {key} differs between the plain and the fused run");
        }
        // No gradient outlives its update.
        assert!(fused.trainable().iter().all(|(_, p)| !p.grad().defined()), "{optimizer}: a gradient was kept");
    }
}

#[test]
fn a_fused_sdxl_run_resumes_exactly() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 2);
    let sdxl = fixture_model("tiny-sdxl");
    let training = "  steps_per_image: 2\n  max_grad_norm: 0\n  fused_backward: true\n  optimizer: adamw_8bit\n  save_model_every_n_epochs: 1\n";
    let whole = run_to_end(root.path(), "whole", &data, &sdxl, training);
    let resumed = stopped_and_resumed(&write_config_over(&sdxl, root.path(), "cut", &data, training), 1);
    for ((key, x), (_, y)) in weights(&whole).iter().zip(&weights(&resumed)) {
        assert!(x.equal(y), "{key} differs after resume");
    }
}

#[test]
fn settings_a_fused_step_cannot_honour_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 1);
    for (extra, words) in [
        ("  gradient_accumulation_steps: 2\n  max_grad_norm: 0\n", "gradient_accumulation_steps: 1"),
        ("  max_grad_norm: 1.0\n", "max_grad_norm: 0"),
        ("  max_grad_norm: 0\n  mixed_precision: fp16\n", "bf16"),
    ] {
        let path = write_config(root.path(), "refused", &data, &format!("  fused_backward: true\n{extra}"));
        let err = dreambooth::config::load_run_config(&path).unwrap_err().to_string();
        assert!(err.contains("fused_backward") && err.contains(words), "{extra:?}: {err}");
    }
}
