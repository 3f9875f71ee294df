//! The training loop over a run directory: events, checkpoints, previews, and
//! exact resume after an interruption.

#[path = "train_support/mod.rs"]
mod support;

use dreambooth::train::trainer::{total_steps, Outcome, Trainer};
use support::*;
use tch::Tensor;

#[test]
fn total_steps_is_epochs_times_batches_over_accumulation() {
    assert_eq!(total_steps(175, 5, 1, 1), 875);
    assert_eq!(total_steps(10, 5, 2, 1), 30); // ceil(5/2) = 3 batches an epoch
    assert_eq!(total_steps(10, 4, 1, 3), 13); // 40 micro-batches, 13 whole steps
}

#[test]
fn a_run_writes_its_directory_as_designed() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 2);
    let cfg = write_config(root.path(), "basic", &data, "  save_model_every_n_epochs: 2\n  save_preview_every_n_epochs: 2\n");
    let config = load(&cfg);
    let mut config = config;
    config.concepts[0].sample_prompts = vec!["a photo of sks thing".into(), "sks thing on a table".into()];
    let mut t = Trainer::start(config, quiet()).unwrap();
    assert_eq!(t.total_steps, 6);
    assert_eq!(t.run().unwrap(), Outcome::Finished);
    let run = root.path().join("runs/basic");
    for f in ["config.yaml", "events.jsonl", "train.log", "lock", "checkpoints/step-000004/unet.safetensors",
              "checkpoints/step-000004/state.json", "checkpoints/step-000004/state.safetensors",
              "checkpoints/step-000006/unet.safetensors", "samples/step-000004-0.png", "samples/step-000004-1.png",
              "samples/step-000006-1.png"] {
        assert!(run.join(f).is_file(), "{f} is missing");
    }
    // The UNet is saved under diffusers key names; the text encoder did not train.
    let unet: Vec<(String, Tensor)> = Tensor::read_safetensors(run.join("checkpoints/step-000006/unet.safetensors")).unwrap();
    assert!(unet.iter().any(|(k, _)| k == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"));
    assert!(!run.join("checkpoints/step-000006/text_encoder.safetensors").exists());
    let names = event_names(&run);
    assert_eq!(names.first().map(String::as_str), Some("start"));
    assert_eq!(names.last().map(String::as_str), Some("done"));
    let start = &named_events(&run, "start")[0];
    assert_eq!(start["total_steps"], 6);
    assert_eq!(step_count(&run), 6);
    assert_eq!(named_events(&run, "sample").len(), 2, "{names:?}");
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("precision: float32"), "{log}");
}

fn final_unet(run: &std::path::Path) -> Vec<(String, Tensor)> {
    let (_, dir) = dreambooth::train::checkpoint::find_checkpoint(run, None).unwrap();
    let mut v = Tensor::read_safetensors(dir.join("unet.safetensors")).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub fn assert_bit_identical(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(b) {
        assert_eq!(ka, kb);
        assert!(ta.equal(tb), "{ka} differs after resume");
    }
}

#[test]
fn resume_after_an_interruption_is_bit_identical() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 3);
    // Everything that carries state: EMA, text encoder for part of the run, random
    // flips, accumulation, a decaying LR, fp16 loss scaling.
    let training = "  steps_per_image: 4\n  batch_size: 2\n  gradient_accumulation_steps: 2\n  use_ema: true\n  text_encoder_train_ratio: 0.5\n  random_flip: true\n  lr_scheduler: cosine\n  offset_noise: 0.1\n";
    let full = write_config(root.path(), "full", &data, training);
    let mut t = Trainer::start(load(&full), quiet()).unwrap();
    let total = t.total_steps;
    assert_eq!(total, 4);
    t.run().unwrap();
    drop(t);

    let cut = write_config(root.path(), "cut", &data, training);
    let mut t = Trainer::start(load(&cut), quiet()).unwrap();
    t.train_step().unwrap();
    t.checkpoint().unwrap();
    // Progress after the checkpoint is lost, as with kill -9.
    t.train_step().unwrap();
    drop(t);
    let run = root.path().join("runs/cut");
    let mut t = Trainer::resume(&run, quiet()).unwrap();
    assert_eq!(t.step, 1);
    t.run().unwrap();
    drop(t);
    assert_bit_identical(&final_unet(&root.path().join("runs/full")), &final_unet(&run));
}

#[test]
fn training_learns_the_subject() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let other = root.path().join("other");
    subject_images(&data, 3);
    other_images(&other, 3);
    let cfg = write_config(root.path(), "learn", &data, "  steps_per_image: 10\n  learning_rate: 3.0e-4\n");
    let mut t = Trainer::start(load(&cfg), quiet()).unwrap();
    let (before, before_unrelated) = (eval_loss(&t, &data), eval_loss(&t, &other));
    t.run().unwrap();
    let (after, after_unrelated) = (eval_loss(&t, &data), eval_loss(&t, &other));
    eprintln!("subject loss {before:.4} -> {after:.4}; unrelated images {before_unrelated:.4} -> {after_unrelated:.4}");
    assert!(after < 0.8 * before, "loss on the subject went from {before} to {after}");
    // Not shown, and not asserted: that the drop is larger on the subject than on
    // unrelated images. The demo model's VAE is random, so every image encodes to
    // latents of std ~0.11 (against unit noise) that differ little between picture
    // sets, and the UNet mostly learns image-agnostic denoising. Measured with the
    // same fixed noise/timesteps and prompt: here (30 steps, lr 3e-4) the
    // checkerboard set drops as much (1.352 -> 0.582) as the subject (1.355 ->
    // 0.583); against a drawn yellow-square-on-green set, after 150 steps at lr 1e-3
    // the subject ends 2-6% lower at every timestep range (t<1000..t<3), a gap that
    // does not grow with more steps (300) - too thin to call learning the subject.
}
