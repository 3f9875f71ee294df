//! The training loop over a run directory: events, checkpoints, previews, and
//! exact resume after an interruption.

#[path = "train_support/mod.rs"]
mod support;

use dreambooth::train::trainer::{total_steps, Outcome, Trainer};
use support::*;
use tch::Tensor;

#[test]
fn total_steps_is_epochs_times_batches_over_accumulation() {
    assert_eq!(total_steps(175, 5, 1), 875);
    assert_eq!(total_steps(10, 5usize.div_ceil(2) as u64, 1), 30); // ceil(5/2) = 3 batches an epoch
    assert_eq!(total_steps(10, 4, 3), 13); // 40 micro-batches, 13 whole steps
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
    assert_eq!(names.iter().take(2).map(String::as_str).collect::<Vec<_>>(), ["loading", "start"]);
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

/// Trains `training` over `data` twice: once straight through ("full", whose
/// total steps must be `total`), once cut after step 1 (a checkpoint, then a
/// step lost as with kill -9) and resumed ("cut"); the two final UNets must be
/// bit-identical.
fn assert_cut_and_resumed_run_matches(root: &std::path::Path, data: &std::path::Path, training: &str, total: u64) {
    let full = write_config(root, "full", data, training);
    let mut t = Trainer::start(load(&full), quiet()).unwrap();
    assert_eq!(t.total_steps, total);
    t.run().unwrap();
    drop(t);

    let cut = write_config(root, "cut", data, training);
    let mut t = Trainer::start(load(&cut), quiet()).unwrap();
    t.train_step().unwrap();
    t.checkpoint().unwrap();
    // Progress after the checkpoint is lost, as with kill -9.
    t.train_step().unwrap();
    drop(t);
    let run = root.join("runs/cut");
    let mut t = Trainer::resume(&run, quiet()).unwrap();
    assert_eq!(t.step, 1);
    t.run().unwrap();
    drop(t);
    assert_bit_identical(&final_unet(&root.join("runs/full")), &final_unet(&run));
}

#[test]
fn resume_after_an_interruption_is_bit_identical() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 3);
    // Everything that carries state: EMA, text encoder for part of the run, random
    // flips, accumulation, a decaying LR, fp16 loss scaling.
    let training = "  steps_per_image: 4\n  batch_size: 2\n  gradient_accumulation_steps: 2\n  use_ema: true\n  text_encoder_train_ratio: 0.5\n  random_flip: true\n  lr_scheduler: cosine\n  offset_noise: 0.1\n";
    assert_cut_and_resumed_run_matches(root.path(), &data, training, 4);
}

/// With aspect-ratio buckets the epoch's order is grouped by frame; a resume in
/// the middle of an epoch picks up the same batches.
#[test]
fn a_bucketed_run_resumes_bit_identically() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (name, w, h) in [("a", 128, 64), ("b", 64, 128), ("c", 64, 64), ("d", 128, 64), ("e", 64, 64)] {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 2) as u8, (y * 2) as u8, name.as_bytes()[0]]))
            .save(data.join(format!("{name}.png")))
            .unwrap();
    }
    let training = "  steps_per_image: 2\n  batch_size: 2\n  aspect_ratio_bucketing: true\n  random_flip: true\n";
    // Wide a, d; tall b; square c, e: three batches an epoch.
    assert_cut_and_resumed_run_matches(root.path(), &data, training, 2 * 3);
}

/// Std of the scaled VAE latents (posterior means) of `dir`'s images under the trainer's model.
fn scaled_latent_std(t: &Trainer, dir: &std::path::Path) -> f64 {
    let _guard = tch::no_grad_guard();
    let examples = dreambooth::data::dataset::load_folder(dir, "eval", |_| "a photo of sks thing".into(), 0, &dreambooth::data::buckets::Buckets::square(64), None).unwrap();
    let pixels = Tensor::stack(&examples.iter().map(|e| e.pixels.shallow_clone()).collect::<Vec<_>>(), 0);
    (t.sd.vae.encode(&pixels).mean * t.sd.vae_config.scaling_factor).std(true).double_value(&[])
}

#[test]
fn training_learns_the_subject() {
    // The demo model with its random VAE replaced (the run config's `vae`) by one trained
    // for reconstruction (tests/fixtures/make_trained_vae.py), whose latents carry the picture: with the
    // demo's own VAE every picture encodes to nearly the same latents (scaled std ~0.1,
    // posterior noise larger than their spread), so the UNet learns only image-agnostic
    // denoising and the subject ends no better than unrelated images.
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let other = root.path().join("other");
    subject_images(&data, 3);
    other_images(&other, 3);
    let training = "  steps_per_image: 150\n  learning_rate: 2.0e-3\n  lr_scheduler: cosine\n";
    let cfg = write_config(root.path(), "learn", &data, training);
    let mut config = load(&cfg);
    config.vae = Some(fixture_model("trained-vae"));
    let mut t = Trainer::start(config, quiet()).unwrap();
    assert_eq!(t.total_steps, 450);
    // The trained VAE is the one in use, its scaling_factor puts latents at about unit
    // std (make_trained_vae.py measured 1.14 and 1.18 for these two sets).
    for dir in [&data, &other] {
        let std = scaled_latent_std(&t, dir);
        assert!((0.8..1.5).contains(&std), "scaled latents of {} have std {std}", dir.display());
    }
    let (before, before_unrelated) = (eval_loss(&t, &data), eval_loss(&t, &other));
    t.run().unwrap();
    let (after, after_unrelated) = (eval_loss(&t, &data), eval_loss(&t, &other));
    eprintln!("subject loss {before:.4} -> {after:.4}; unrelated images {before_unrelated:.4} -> {after_unrelated:.4}");
    assert!(after < 0.8 * before, "loss on the subject went from {before} to {after}");
    // Measured (fixed noise and timesteps, uniform t): subject 1.3428 -> 0.0425,
    // unrelated checkerboards 1.3386 -> 0.0665, so the subject ends at 0.64x the
    // unrelated loss (0.63x and 0.62x with run seeds 8 and 9 instead of 7). The gap is
    // in the low timesteps, where the noise must be told from the picture: at t=10 the
    // loss is 0.26 on the subject against 0.64 on the checkerboards, at t=50 0.11
    // against 0.30, at t=900 0.031 against 0.033. The same run on the demo's random
    // VAE ends at 0.998x (1.3549 -> 0.0384 against 1.3517 -> 0.0385). A constant
    // learning rate (1e-3) instead of the cosine decay gave 0.66x to 0.98x over seeds
    // 7-9, 100 steps a picture 0.74x to 0.76x. The gap (unrelated minus subject) grows
    // from -0.004 to +0.024.
    assert!(
        after < 0.8 * after_unrelated,
        "after training the subject's loss {after} is not clearly below the unrelated images' {after_unrelated}"
    );
    let (gap_before, gap_after) = (before_unrelated - before, after_unrelated - after);
    assert!(gap_after > gap_before + 0.01, "the unrelated-minus-subject loss gap went from {gap_before} to {gap_after}");
}

/// A run with the loss read one step late (the CUDA default, forced here on the
/// CPU) writes the same records, in the same order among checkpoints, previews
/// and stops, as one that reads each loss at once.
#[test]
fn deferred_loss_readback_keeps_the_event_log() {
    use dreambooth::run::events::{read_events, Event};
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 2);
    let training = "  steps_per_image: 4\n  save_model_every_n_epochs: 2\n  save_preview_every_n_epochs: 3\n  gradient_accumulation_steps: 2\n";
    // What each event says, without its time and speed.
    let summary = |run: &std::path::Path| -> Vec<String> {
        read_events(run)
            .unwrap()
            .into_iter()
            .map(|e| match e {
                Event::Step(r) => format!("step {} epoch {} loss {} lr {}", r.step, r.epoch, r.loss, r.lr),
                Event::Named { name, fields } => format!("{name} {:?}", fields.get("step")),
            })
            .collect()
    };
    let mut runs = Vec::new();
    for (name, defer) in [("now", false), ("later", true)] {
        let cfg = write_config(root.path(), name, &data, training);
        let mut config = load(&cfg);
        config.concepts[0].sample_prompts = vec!["a photo of sks thing".into()];
        let mut t = Trainer::start(config, quiet()).unwrap();
        t.defer_loss_readback = defer;
        // Cut at step 3: the stop comes while a record is pending.
        t.stop_at_step = Some(3);
        assert_eq!(t.run().unwrap(), Outcome::Stopped);
        drop(t);
        let run = root.path().join("runs").join(name);
        let mut t = Trainer::resume(&run, quiet()).unwrap();
        t.defer_loss_readback = defer;
        assert_eq!(t.run().unwrap(), Outcome::Finished);
        runs.push(summary(&run));
    }
    let (now, later) = (&runs[0], &runs[1]);
    assert!(now.iter().filter(|l| l.starts_with("step ")).count() == 4, "{now:#?}");
    assert!(now.iter().any(|l| l.starts_with("sample ")), "{now:#?}");
    assert_eq!(now.len(), later.len(), "{now:#?}\n{later:#?}");
    for (a, b) in now.iter().zip(later) {
        assert_eq!(a, b, "the event logs differ");
    }
}

/// The CUDA graph bookkeeping (inputs copied into fixed tensors, gradients kept
/// and zeroed in place instead of set to none, the graph dropped when the text
/// encoder stops, an epoch's smaller last batch run eagerly) trains exactly as a
/// plain run. Capture and replay are simulated on the CPU; benches/gpu_check.sh
/// checks the real graphs on a GPU.
#[test]
fn cuda_graph_bookkeeping_trains_as_a_plain_run() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 3);
    // 3 images in batches of 2: shapes [2, …] and [1, …] alternate. 10 steps: the
    // text encoder trains for 3 (captured at step 3), the graph is dropped, warms
    // up again at steps 4 and 5, is captured at 6 and replayed at 7 to 10.
    let training = "  steps_per_image: 10\n  batch_size: 2\n  gradient_accumulation_steps: 2\n  text_encoder_train_ratio: 0.3\n  set_grads_to_none: true\n  use_ema: true\n";
    let mut states = Vec::new();
    for (name, graphs) in [("plain", false), ("graphs", true)] {
        let cfg = write_config(root.path(), name, &data, training);
        let mut t = Trainer::start(load(&cfg), quiet()).unwrap();
        if graphs {
            t.simulate_cuda_graphs();
        }
        assert_eq!(t.run().unwrap(), Outcome::Finished);
        states.push(t.cuda_graph_state());
    }
    assert_eq!(states, ["off", "captured"]);
    assert_bit_identical(&final_unet(&root.path().join("runs/plain")), &final_unet(&root.path().join("runs/graphs")));
}

/// Under `clip_skip: 2` the text encoder's last layer conditions nothing, gets no
/// gradient and so no optimizer moments; a run that trains the text encoder resumes
/// all the same (it was refused: "the optimizer state has no moments"), to the weights
/// of a run never interrupted, with either optimizer.
#[test]
fn a_clip_skip_run_that_trains_the_text_encoder_resumes_exactly() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 2);
    for optimizer in ["adamw", "adamw_8bit"] {
        let training = format!(
            "  steps_per_image: 2\n  learning_rate: 1.0e-3\n  clip_skip: 2\n  text_encoder_train_ratio: 1.0\n  optimizer: {optimizer}\n  save_model_every_n_epochs: 1\n"
        );
        let weights = |t: &Trainer| -> Vec<Tensor> {
            t.params.unet.iter().chain(t.params.text_encoder("text_encoder")).map(|(_, p)| p.detach().copy()).collect()
        };
        let mut whole = Trainer::start(load(&write_config(root.path(), &format!("whole-{optimizer}"), &data, &training)), quiet()).unwrap();
        assert_eq!(whole.run().unwrap(), Outcome::Finished);
        let mut cut = Trainer::start(load(&write_config(root.path(), &format!("cut-{optimizer}"), &data, &training)), quiet()).unwrap();
        cut.stop_at_step = Some(2);
        assert_eq!(cut.run().unwrap(), Outcome::Stopped);
        let run = cut.run_dir.clone();
        drop(cut);
        let mut resumed = Trainer::resume(&run, quiet()).unwrap();
        assert_eq!(resumed.run().unwrap(), Outcome::Finished);
        let (a, b) = (weights(&whole), weights(&resumed));
        assert!(a.iter().zip(&b).all(|(x, y)| x.equal(y)), "{optimizer}: the resumed run's weights differ");
    }
}
