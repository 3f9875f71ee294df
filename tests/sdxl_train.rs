//! DreamBooth runs over the tiny SDXL (tests/fixtures/models/tiny-sdxl): the
//! settings that touch SDXL's conditioning (both text encoders trained, their
//! outputs cached when frozen, prior preservation with SDXL class images,
//! buckets with their size and crop ids, flips, EMA, previews), and exact resume.

mod train_support;

use dreambooth::train::trainer::{Outcome, Trainer};
use tch::Tensor;
use train_support::*;

fn sdxl() -> std::path::PathBuf {
    fixture_model("tiny-sdxl")
}

/// Wide, tall and square pictures, so buckets and crops differ between images.
fn mixed_images(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, w, h) in [("a", 96, 64), ("b", 64, 96), ("c", 64, 64), ("d", 100, 64)] {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 2) as u8, (y * 2) as u8, name.as_bytes()[0]]))
            .save(dir.join(format!("{name}.png")))
            .unwrap();
    }
}

fn weights(t: &Trainer) -> Vec<(String, Tensor)> {
    let mut all: Vec<(String, Tensor)> = t.params.unet.iter().map(|(k, p)| (format!("unet.{k}"), p.detach().copy())).collect();
    all.extend(t.params.text_tensors().map(|(name, (k, p))| (format!("{name}.{k}"), p.detach().copy())));
    all
}

fn assert_same(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (_, tb)) in a.iter().zip(b) {
        assert!(ta.equal(tb), "{what}: {ka} differs");
    }
}

#[test]
fn a_full_sdxl_run_trains_both_text_encoders_and_resumes_exactly() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    mixed_images(&data);
    let training = "  steps_per_image: 2\n  batch_size: 2\n  text_encoder_train_ratio: 1.0\n  aspect_ratio_bucketing: true\n  random_flip: true\n  use_ema: true\n  save_model_every_n_epochs: 1\n  save_preview_every_n_epochs: 2\n";
    let whole_cfg = write_config_over(&sdxl(), root.path(), "whole", &data, training);
    let mut whole = Trainer::start(load(&whole_cfg), quiet()).unwrap();
    let before = weights(&whole);
    assert_eq!(whole.run().unwrap(), Outcome::Finished);
    let after = weights(&whole);
    // Both encoders moved; encoder 1's last layer conditions nothing (SDXL reads its
    // penultimate layer) and stays as it was.
    for prefix in ["unet.", "text_encoder.encoder.layers.0.", "text_encoder_2.encoder.layers.3.", "text_encoder_2.text_projection"] {
        let moved = before.iter().zip(&after).any(|((k, a), (_, b))| k.starts_with(prefix) && !a.equal(b));
        assert!(moved, "{prefix} did not train");
    }
    let last1 = "text_encoder.encoder.layers.2.";
    assert!(before.iter().zip(&after).all(|((k, a), (_, b))| !k.starts_with(last1) || a.equal(b)));
    let run = whole.run_dir.clone();
    drop(whole);
    let (_, ckpt) = dreambooth::train::checkpoint::find_checkpoint(&run, None).unwrap();
    for file in ["unet.safetensors", "text_encoder.safetensors", "text_encoder_2.safetensors", "ema_unet.safetensors"] {
        assert!(ckpt.join(file).is_file(), "the checkpoint has no {file}");
    }
    assert!(std::fs::read_dir(run.join("samples")).unwrap().count() > 0, "no previews");

    let resumed = stopped_and_resumed(&write_config_over(&sdxl(), root.path(), "cut", &data, training), 2);
    assert_same(&after, &weights(&resumed), "resumed SDXL run");
}

/// A LoRA run with prior preservation: class images are drawn by the SDXL
/// pipeline, frozen encoders' outputs (hidden states and the pooled embedding)
/// are cached, and a run cut and resumed ends with the same adapters.
#[test]
fn an_sdxl_lora_run_with_prior_preservation_resumes_exactly() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 2);
    let training = "  steps_per_image: 2\n  use_lora: true\n  lora_rank: 2\n  learning_rate: 1.0e-3\n  save_model_every_n_epochs: 1\n";
    let with_prior = |name: &str| {
        let path = write_config_over(&sdxl(), root.path(), name, &data, training);
        let yaml = std::fs::read_to_string(&path).unwrap().replace(
            "    instance_prompt: a photo of sks thing\n",
            "    instance_prompt: a photo of sks thing\n    class_prompt: a photo of a thing\n    num_class_images: 2\n",
        );
        std::fs::write(&path, yaml).unwrap();
        load(&path)
    };
    let mut whole = Trainer::start(with_prior("lora-whole"), quiet()).unwrap();
    assert!(whole.data.has_prior());
    assert_eq!(whole.run().unwrap(), Outcome::Finished);
    assert!(!whole.cached_text_states().is_empty());
    assert!(whole.cached_text_states().values().all(|s| s.pooled.is_some()), "cached states lack the pooled embedding");
    let lora_whole = whole.trainable().iter().map(|(k, t)| (k.clone(), t.detach().copy())).collect::<Vec<_>>();
    drop(whole);

    let mut cut = Trainer::start(with_prior("lora-cut"), quiet()).unwrap();
    cut.stop_at_step = Some(1);
    assert_eq!(cut.run().unwrap(), Outcome::Stopped);
    let run = cut.run_dir.clone();
    drop(cut);
    let mut resumed = Trainer::resume(&run, quiet()).unwrap();
    assert_eq!(resumed.run().unwrap(), Outcome::Finished);
    let lora_resumed = resumed.trainable().iter().map(|(k, t)| (k.clone(), t.detach().copy())).collect::<Vec<_>>();
    assert_same(&lora_whole, &lora_resumed, "resumed SDXL LoRA run");
}

/// Each image's size ids: its own size, where its frame was cut from the
/// scaled picture, the frame; a flipped image's crop counted from the other side.
#[test]
fn examples_carry_their_size_and_crop_ids() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    mixed_images(&data);
    let cfg = write_config_over(&sdxl(), root.path(), "ids", &data, "");
    let t = Trainer::start(load(&cfg), quiet()).unwrap();
    // 100×64 at resolution 64 (no buckets): scaled to 100×64, the centre 64×64 cut at left 18.
    let d = t.data.instances.iter().find(|e| e.frame() == (64, 64) && e.sizes.original == (64, 100)).unwrap();
    assert_eq!(d.sizes.crop_top_left, (0, 18));
    assert_eq!(d.sizes.target, (64, 64));
    assert_eq!(d.size_ids(true).crop_top_left, (0, 100 - 18 - 64));
}

/// The whole command line on SDXL: `train` a LoRA run and a full run (text
/// encoders too), `export` each (kohya LoRA, one sgm-layout file, a diffusers
/// folder), and every export draws with `generate` what the run directory draws.
/// (That diffusers loads these exports to the same images is checked by hand with
/// tests/fixtures/check_sdxl_exports_with_diffusers.py; see benches/README.md.)
#[test]
fn sdxl_runs_export_to_files_that_draw_like_the_run() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    subject_images(&data, 2);
    let bin = env!("CARGO_BIN_EXE_dreambooth");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).env("OMP_NUM_THREADS", "2").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let pixels = |png: &std::path::Path| image::open(png).unwrap().to_rgb8().into_raw();
    let draw = |model: &std::path::Path, png: &str, extra: &[&str]| {
        let out = r.join(png);
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "a photo of sks thing", "--seed", "4",
            "--steps", "4", "--width", "48", "--height", "32", "--device", "cpu", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        cli(&args);
        pixels(&out)
    };
    let folder = sdxl();
    let folder_config = ["--model-config", folder.to_str().unwrap()];
    let base = draw(&folder, "base.png", &[]);
    for (name, training) in [
        ("lora", "  steps_per_image: 2\n  use_lora: true\n  learning_rate: 1.0e-2\n  text_encoder_train_ratio: 1.0\n"),
        ("full", "  steps_per_image: 2\n  learning_rate: 1.0e-3\n  text_encoder_train_ratio: 1.0\n"),
    ] {
        let cfg = write_config_over(&folder, r, name, &data, training);
        cli(&["train", cfg.to_str().unwrap(), "--plain"]);
        let run = r.join("runs").join(name);
        let trained = draw(&run, &format!("{name}-run.png"), &[]);
        assert_ne!(trained, base, "{name}: training changed nothing");
        let ldm = r.join(format!("{name}-ldm.safetensors"));
        cli(&["export", run.to_str().unwrap(), "--format", "ldm", "--out", ldm.to_str().unwrap()]);
        assert_eq!(draw(&ldm, &format!("{name}-ldm.png"), &folder_config), trained, "{name}: the ldm export draws otherwise");
        let diffusers = r.join(format!("{name}-diffusers"));
        cli(&["export", run.to_str().unwrap(), "--format", "diffusers", "--out", diffusers.to_str().unwrap()]);
        assert_eq!(draw(&diffusers, &format!("{name}-diffusers.png"), &[]), trained, "{name}: the diffusers export draws otherwise");
        if name == "lora" {
            let lora = r.join("lora.safetensors");
            cli(&["export", run.to_str().unwrap(), "--format", "lora", "--out", lora.to_str().unwrap()]);
            let with_lora = draw(&folder, "with-lora.png", &["--lora", lora.to_str().unwrap()]);
            assert_eq!(with_lora, trained, "generate --lora draws otherwise");
        }
    }
}
