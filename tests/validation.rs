//! Validation loss (`training.validate_every_n_epochs`, `concepts[].validation_data_dir`):
//! held-out photos and class images measured at fixed timesteps and noise, logged
//! as `validation` events, read back by the dashboard and `dreambooth runs`; a run
//! with validation trains bit for bit as one without.

#[path = "train_support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};

use dreambooth::config::RunConfig;
use dreambooth::train::trainer::{Outcome, Trainer};
use support::*;
use tch::Tensor;

/// Every tensor of every `.safetensors` file of a run's newest checkpoint, by file and key.
fn checkpoint_tensors(run: &Path) -> Vec<(String, Tensor)> {
    let (_, dir) = dreambooth::train::checkpoint::find_checkpoint(run, None).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let mut tensors = Tensor::read_safetensors(&file).unwrap();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(tensors.into_iter().map(|(k, t)| (format!("{name}:{k}"), t)));
    }
    out
}

fn assert_same_tensors(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    let names = |v: &[(String, Tensor)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(names(a), names(b), "{what}: the checkpoints hold different tensors");
    for ((k, ta), (_, tb)) in a.iter().zip(b) {
        assert!(ta.equal(tb), "{what}: {k} differs");
    }
}

/// The `validation` events of a run, each without its wall-clock fields.
fn validations(run: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    named_events(run, "validation")
        .into_iter()
        .map(|mut f| {
            f.remove("time");
            f.remove("seconds");
            f
        })
        .collect()
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// A config over `data` with `training` keys, its concept given held-out photos
/// (`held_out`) and, with `class`, prior preservation from 2 generated class images.
fn config_with(root: &Path, name: &str, data: &Path, training: &str, held_out: Option<&Path>, class: bool) -> RunConfig {
    let mut config = load(&write_config(root, name, data, training));
    config.concepts[0].validation_data_dir = held_out.map(Path::to_path_buf);
    if class {
        config.concepts[0].class_prompt = "a photo of a thing".into();
        config.concepts[0].num_class_images = 2;
    }
    config
}

fn train(config: RunConfig) -> PathBuf {
    let run = config.output_dir.join(&config.name);
    let mut t = Trainer::start(config, quiet()).unwrap();
    assert_eq!(t.run().unwrap(), Outcome::Finished);
    run
}

/// Images of the subject not in the training folder (shifted further).
fn held_out_images(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for k in 0..n {
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            let (cx, cy) = (24.0 + 6.0 * k as f64, 36.0);
            let d = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt();
            if d < 15.0 { image::Rgb([225, 45, 35]) } else { image::Rgb([25, 45, 195]) }
        });
        img.save(dir.join(format!("held-{k}.png"))).unwrap();
    }
}

/// Everything that carries state (EMA, the text encoder for half the run, flips,
/// accumulation, offset noise, min-SNR, prior preservation): a run that validates
/// every epoch ends with the same weights, optimizer state and generator states,
/// bit for bit, as one that never validates.
#[test]
fn validation_never_changes_a_full_run() {
    let root = tempfile::tempdir().unwrap();
    let (data, held) = (root.path().join("data"), root.path().join("held"));
    subject_images(&data, 3);
    held_out_images(&held, 2);
    let training = "  steps_per_image: 4\n  batch_size: 2\n  gradient_accumulation_steps: 2\n  use_ema: true\n  text_encoder_train_ratio: 0.5\n  random_flip: true\n  offset_noise: 0.1\n  min_snr_gamma: 5\n";
    let plain = train(config_with(root.path(), "plain", &data, training, Some(&held), true));
    let validated = train(config_with(
        root.path(),
        "validated",
        &data,
        &format!("{training}  validate_every_n_epochs: 1\n"),
        Some(&held),
        true,
    ));
    assert!(validations(&plain).is_empty(), "off by default");
    assert_eq!(validations(&validated).len(), 5, "epoch 0 and each of the 4 epochs");
    assert_same_tensors(&checkpoint_tensors(&plain), &checkpoint_tensors(&validated), "full run");
    let state = |run: &Path| {
        let (_, dir) = dreambooth::train::checkpoint::find_checkpoint(run, None).unwrap();
        std::fs::read_to_string(dir.join("state.json")).unwrap()
    };
    assert_eq!(state(&plain), state(&validated));
    assert_eq!(step_losses(&plain), step_losses(&validated), "the same losses step by step");
}

/// A LoRA run under bf16 autocast (its base UNet stored in bf16), and a run whose
/// latents are not cached: validation changes neither.
#[test]
fn validation_never_changes_a_lora_run_or_an_uncached_one() {
    let root = tempfile::tempdir().unwrap();
    let (data, held) = (root.path().join("data"), root.path().join("held"));
    subject_images(&data, 2);
    held_out_images(&held, 2);
    for (name, training) in [
        ("lora", "  use_lora: true\n  lora_rank: 4\n  text_encoder_train_ratio: 1.0\n  mixed_precision: bf16\n"),
        ("uncached", "  cache_latents: false\n  random_flip: true\n"),
    ] {
        let plain = train(config_with(root.path(), &format!("{name}-plain"), &data, training, Some(&held), true));
        let validated = train(config_with(
            root.path(),
            &format!("{name}-validated"),
            &data,
            &format!("{training}  validate_every_n_epochs: 1\n"),
            Some(&held),
            true,
        ));
        assert_eq!(validations(&validated).len(), 4, "{name}");
        assert_same_tensors(&checkpoint_tensors(&plain), &checkpoint_tensors(&validated), name);
    }
}

/// Two runs of one config log the same validation losses, bit for bit; the events
/// carry the step, epoch, pooled and per-concept losses of held-out photos and
/// class images, the timesteps and the loss at each.
#[test]
fn validation_events_are_deterministic_and_shaped() {
    let root = tempfile::tempdir().unwrap();
    let (data, held) = (root.path().join("data"), root.path().join("held"));
    subject_images(&data, 2);
    held_out_images(&held, 3);
    // 2 images, batch 1: 2 steps an epoch, 10 in all; validation at epochs 0, 2, 4 and the end (5).
    let training = "  steps_per_image: 5\n  validate_every_n_epochs: 2\n";
    let a = train(config_with(root.path(), "a", &data, training, Some(&held), true));
    let b = train(config_with(root.path(), "b", &data, training, Some(&held), true));
    let (va, vb) = (validations(&a), validations(&b));
    assert_eq!(va, vb, "the same losses from two runs");
    let steps: Vec<u64> = va.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    let epochs: Vec<u64> = va.iter().map(|v| v["epoch"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 4, 8, 10]);
    assert_eq!(epochs, [0, 2, 4, 5]);
    for v in &va {
        assert_eq!(v["timesteps"], serde_json::json!([200, 400, 600, 800]));
        let concepts = v["concepts"].as_array().unwrap();
        assert_eq!(concepts.len(), 1);
        assert_eq!(concepts[0]["concept"], 0);
        assert_eq!(concepts[0]["images"], 3);
        assert_eq!(f(&concepts[0]["loss"]), f(&v["loss"]), "one concept: its loss is the run's");
        let per_timestep: Vec<f64> = v["timestep_losses"].as_array().unwrap().iter().map(f).collect();
        assert_eq!(per_timestep.len(), 4);
        let mean = per_timestep.iter().sum::<f64>() / 4.0;
        assert!((mean - f(&v["loss"])).abs() < 1e-9, "the loss is the mean over the timesteps: {mean} vs {}", v["loss"]);
        let classes = v["class_concepts"].as_array().unwrap();
        assert_eq!(classes.len(), 1);
        assert_eq!(classes[0]["images"], 2, "both class images (at most 4 are used)");
        assert!(f(&v["class_loss"]).is_finite() && f(&v["loss"]).is_finite());
    }
    // The losses move with the weights (the held-out pass at step 0 is the source model's).
    assert_ne!(va[0]["loss"], va[3]["loss"]);
    let log = std::fs::read_to_string(a.join("train.log")).unwrap();
    assert!(log.contains("validation every 2 epochs and at the start and end: concept 1's held-out photos, 2 of concept 1's class images at timesteps 200, 400, 600, 800"), "{log}");
    assert!(log.contains("validation at step 4 (epoch 2): loss "), "{log}");
    // Three timesteps: 250, 500, 750.
    let c = train(config_with(root.path(), "c", &data, "  steps_per_image: 1\n  validate_every_n_epochs: 1\n  validation_timesteps: 3\n", Some(&held), false));
    let vc = validations(&c);
    assert_eq!(vc[0]["timesteps"], serde_json::json!([250, 500, 750]));
    assert!(vc[0].get("class_loss").is_none(), "no class images, no class loss");
}

/// Each concept's held-out photos have their own value; the run's loss pools
/// every photo and timestep. A concept with class images only adds a class value.
#[test]
fn each_concept_has_its_own_validation_loss() {
    let root = tempfile::tempdir().unwrap();
    let (data, held) = (root.path().join("data"), root.path().join("held"));
    let (other, other_held) = (root.path().join("other"), root.path().join("other-held"));
    subject_images(&data, 2);
    held_out_images(&held, 2);
    other_images(&other, 2);
    other_images(&other_held, 1);
    let mut config = config_with(root.path(), "two", &data, "  steps_per_image: 2\n  validate_every_n_epochs: 1\n", Some(&held), false);
    let mut second = config.concepts[0].clone();
    second.instance_data_dir = other.clone();
    second.instance_prompt = "a photo of zwx pattern".into();
    second.validation_data_dir = Some(other_held.clone());
    let mut third = second.clone();
    third.validation_data_dir = None;
    third.class_prompt = "a photo of a pattern".into();
    third.num_class_images = 1;
    config.concepts.push(second);
    config.concepts.push(third);
    let run = train(config);
    let events = validations(&run);
    assert_eq!(events.len(), 3);
    for v in &events {
        let concepts = v["concepts"].as_array().unwrap();
        let ids: Vec<u64> = concepts.iter().map(|c| c["concept"].as_u64().unwrap()).collect();
        assert_eq!(ids, [0, 1], "only the concepts with held-out photos");
        let (l0, l1) = (f(&concepts[0]["loss"]), f(&concepts[1]["loss"]));
        assert_ne!(l0, l1);
        // 2 photos of concept 1 and 1 of concept 2, each at 4 timesteps.
        let pooled = (2.0 * l0 + l1) / 3.0;
        assert!((pooled - f(&v["loss"])).abs() < 1e-9, "{pooled} vs {}", v["loss"]);
        let classes = v["class_concepts"].as_array().unwrap();
        assert_eq!(classes.len(), 1);
        assert_eq!(classes[0]["concept"], 2);
        assert_eq!(f(&classes[0]["loss"]), f(&v["class_loss"]));
    }
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("(concept 1 "), "{log}");
}

/// A run cut short and resumed logs, once the dashboard has dropped what the
/// lost process logged past its checkpoint, the validation values of a run never
/// interrupted; `dreambooth runs` and the summary name the epoch of the lowest.
#[test]
fn a_resumed_run_continues_its_validation_and_runs_names_the_lowest_epoch() {
    let root = tempfile::tempdir().unwrap();
    let (data, held) = (root.path().join("data"), root.path().join("held"));
    subject_images(&data, 2);
    held_out_images(&held, 2);
    let training = "  steps_per_image: 4\n  validate_every_n_epochs: 1\n  learning_rate: 1.0e-3\n";
    let whole = train(config_with(root.path(), "whole", &data, training, Some(&held), false));

    let mut t = Trainer::start(config_with(root.path(), "cut", &data, training, Some(&held), false), quiet()).unwrap();
    t.stop_at_step = Some(3);
    assert_eq!(t.run().unwrap(), Outcome::Stopped);
    drop(t);
    let run = root.path().join("runs/cut");
    // Progress past the checkpoint of step 3 is lost, as with kill -9 (its validation at step 4 too).
    let mut t = Trainer::resume(&run, quiet()).unwrap();
    t.stop_at_step = Some(5);
    t.run().unwrap();
    drop(t);
    std::fs::remove_dir_all(run.join("checkpoints/step-000005")).unwrap();
    let mut t = Trainer::resume(&run, quiet()).unwrap();
    assert_eq!(t.step, 3);
    t.run().unwrap();
    drop(t);
    let logged: Vec<u64> = validations(&run).iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(logged, [0, 2, 4, 4, 6, 8], "step 4 twice: once by the process that lost it");
    let expected: Vec<(u64, f64)> = validations(&whole).iter().map(|v| (v["step"].as_u64().unwrap(), f(&v["loss"]))).collect();
    assert_eq!(expected.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 2, 4, 6, 8]);
    let state = dreambooth::tui::dashboard::DashboardState::load(&run, 0.0);
    let shown: Vec<(u64, f64)> = state.validations.iter().map(|v| (v.step, v.loss.unwrap())).collect();
    assert_eq!(shown, expected, "each step once, with the uninterrupted run's values");

    let lowest = expected.iter().cloned().fold((0, f64::MAX), |a, b| if b.1 < a.1 { b } else { a });
    let epoch = lowest.0 / 2;
    let lines = dreambooth::tui::dashboard::list::run_lines(&root.path().join("runs"), 0.0).unwrap();
    let line = lines.iter().find(|l| l.name == "cut").unwrap();
    assert_eq!(line.validation, format!("{:.4} @ epoch {epoch}", lowest.1));
    let table = dreambooth::tui::dashboard::list::format_table(&lines);
    assert!(table.lines().next().unwrap().contains("VALIDATION"), "{table}");
    let best = state.lowest_validation().unwrap();
    assert_eq!((best.step, best.epoch), (lowest.0, epoch));
}

/// The tiny SDXL (both text encoders, the pooled embedding, size ids): a LoRA run
/// with class images validates and trains as one that does not.
#[test]
fn an_sdxl_run_validates_without_changing_its_weights() {
    let root = tempfile::tempdir().unwrap();
    let (data, held) = (root.path().join("data"), root.path().join("held"));
    subject_images(&data, 2);
    held_out_images(&held, 1);
    let sdxl = fixture_model("tiny-sdxl");
    let config = |name: &str, training: &str| {
        let mut c = load(&write_config_over(&sdxl, root.path(), name, &data, training));
        c.concepts[0].validation_data_dir = Some(held.clone());
        c.concepts[0].class_prompt = "a photo of a thing".into();
        c.concepts[0].num_class_images = 1;
        c
    };
    let training = "  steps_per_image: 2\n  use_lora: true\n  text_encoder_train_ratio: 0.5\n";
    let plain = train(config("plain", training));
    let validated = train(config("validated", &format!("{training}  validate_every_n_epochs: 1\n")));
    let v = validations(&validated);
    assert_eq!(v.len(), 3);
    assert!(v.iter().all(|e| f(&e["loss"]).is_finite() && f(&e["class_loss"]).is_finite()), "{v:?}");
    assert_same_tensors(&checkpoint_tensors(&plain), &checkpoint_tensors(&validated), "SDXL LoRA run");
}

/// Nothing to validate on, or a held-out folder that is not there, is refused
/// before a run directory is made, naming the key.
#[test]
fn a_validation_without_images_is_refused_naming_the_key() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 2);
    let config = config_with(root.path(), "nothing", &data, "  validate_every_n_epochs: 1\n", None, false);
    let e = Trainer::start(config, quiet()).err().unwrap();
    assert_eq!(dreambooth::error::exit_code(&e), 2);
    assert!(e.to_string().contains("`training.validate_every_n_epochs` is set but no concept has a `validation_data_dir`"), "{e}");
    let missing = root.path().join("missing");
    let config = config_with(root.path(), "missing", &data, "  validate_every_n_epochs: 1\n", Some(&missing), false);
    let e = Trainer::start(config, quiet()).err().unwrap();
    assert!(e.to_string().contains("concepts[0].validation_data_dir") && e.to_string().contains("does not exist"), "{e}");
    assert!(!root.path().join("runs/missing").exists() && !root.path().join("runs/nothing").exists());
    // Held-out photos without validate_every_n_epochs: said in the log, nothing measured.
    let held = root.path().join("held");
    held_out_images(&held, 1);
    let run = train(config_with(root.path(), "off", &data, "  steps_per_image: 1\n", Some(&held), false));
    assert!(validations(&run).is_empty());
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("`training.validate_every_n_epochs` is 0"), "{log}");
    let mut config = load(&root.path().join("off.yaml"));
    config.training.validation_timesteps = 0;
    let e = dreambooth::config::validate::validate(&config).unwrap_err();
    assert!(e.contains("`training.validation_timesteps` 0 must be between 1 and 100"), "{e}");
}

/// `validation_split` holds a seeded share of the concept's own photos out of
/// training: the run is the one whose held-out photos were moved into a
/// validation_data_dir by hand, bit for bit; bad splits are refused in a sentence.
#[test]
fn a_validation_split_is_a_held_out_folder_made_from_the_photos() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 5);
    let training = "  steps_per_image: 2\n  validate_every_n_epochs: 1\n";
    let mut config = config_with(root.path(), "split", &data, training, None, false);
    config.concepts[0].validation_split = 0.4;
    let (kept, held) = dreambooth::data::holdout::split_photos(&config.concepts[0], 0, config.seed, "data").unwrap();
    assert_eq!((kept.len(), held.len()), (3, 2));
    let t = Trainer::start(config, quiet()).unwrap();
    assert_eq!(t.data.instances.len(), 3);
    drop(t);
    std::fs::remove_dir_all(root.path().join("runs/split")).unwrap();
    let mut config = config_with(root.path(), "split", &data, training, None, false);
    config.concepts[0].validation_split = 0.4;
    let split = train(config);

    // The same photos moved by hand.
    let (by_hand, by_hand_held) = (root.path().join("by-hand"), root.path().join("by-hand-held"));
    for (files, dir) in [(&kept, &by_hand), (&held, &by_hand_held)] {
        std::fs::create_dir_all(dir).unwrap();
        for f in files.iter() {
            std::fs::copy(&f.path, dir.join(f.path.file_name().unwrap())).unwrap();
        }
    }
    let manual = train(config_with(root.path(), "manual", &by_hand, training, Some(&by_hand_held), false));
    let (vs, vm) = (validations(&split), validations(&manual));
    assert_eq!(vs, vm);
    assert_eq!(vs[0]["concepts"][0]["images"], 2);
    assert_same_tensors(&checkpoint_tensors(&split), &checkpoint_tensors(&manual), "split vs by hand");
    let log = std::fs::read_to_string(split.join("train.log")).unwrap();
    let names: Vec<String> = held.iter().map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert!(log.contains(&format!("concept 1 holds out of training for validation: {}", names.join(", "))), "{log}");

    // Refused before anything is made: both ways at once, a share of 1, one photo.
    let refused = |name: &str, data: &Path, share: f64, held_out: Option<&Path>| {
        let mut config = config_with(root.path(), name, data, training, held_out, false);
        config.concepts[0].validation_split = share;
        let e = Trainer::start(config, quiet()).err().unwrap();
        assert_eq!(dreambooth::error::exit_code(&e), 2, "{e}");
        assert!(!root.path().join("runs").join(name).exists());
        e.to_string()
    };
    let e = refused("both", &data, 0.2, Some(&by_hand_held));
    assert!(e.contains("both a validation_data_dir and a validation_split"), "{e}");
    let e = refused("all", &data, 1.0, None);
    assert!(e.contains("concepts[0].validation_split is 1"), "{e}");
    let one = root.path().join("one");
    subject_images(&one, 1);
    let e = refused("one", &one, 0.5, None);
    assert!(e.contains("needs at least 2 photos"), "{e}");
}

/// The baseline pass recomputed here from its definition: each held-out photo's
/// posterior-mean latents noised at 200, 400, 600 and 800 with draws from a
/// generator seeded `seed + 2^20 + 2 × concept` (in photo order, then timestep
/// order), the source UNet's MSE against the noise averaged over all of them.
#[test]
fn the_baseline_pass_is_the_documented_loss() {
    use dreambooth::train::step::{denoising_loss, ExampleWeights, LossInputs, PredictionType};
    let root = tempfile::tempdir().unwrap();
    let (data, held) = (root.path().join("data"), root.path().join("held"));
    subject_images(&data, 2);
    held_out_images(&held, 2);
    let config = config_with(root.path(), "defined", &data, "  steps_per_image: 1\n  validate_every_n_epochs: 1\n", Some(&held), false);
    let seed = config.seed;
    let mut t = Trainer::start(config, quiet()).unwrap();
    let expected = {
        let _guard = tch::no_grad_guard();
        let buckets = dreambooth::data::buckets::Buckets::square(64);
        let examples = dreambooth::data::dataset::load_folder(&held, "held", |_| "a photo of sks thing".into(), 0, &buckets, None).unwrap();
        let schedule = dreambooth::scheduler::NoiseSchedule::new(&t.sd.scheduler_config).unwrap();
        let prediction = PredictionType::from_config(&t.sd.scheduler_config).unwrap();
        let ids = Tensor::from_slice(&t.sd.text.tokenize("a photo of sks thing")).view([1, -1]);
        let conditioning = t.sd.text.conditioning(&t.sd.text.encode_ids(&ids, 1), &[examples[0].sizes]);
        let mut rng = dreambooth::rng::CpuRng::new(seed + (1 << 20));
        let mut losses = Vec::new();
        for e in &examples {
            let latents = t.sd.vae.encode(&e.pixels.unsqueeze(0)).mean * t.sd.vae_config.scaling_factor;
            for timestep in [200i64, 400, 600, 800] {
                let noise = rng.randn(&latents.size());
                let inputs = LossInputs {
                    latents: &latents,
                    noise: &noise,
                    timesteps: &Tensor::from_slice(&[timestep]),
                    conditioning: &conditioning,
                    coefficients: &ExampleWeights::all_instance(1).coefficients_tensor(),
                };
                losses.push(denoising_loss(&t.sd.unet, &schedule, prediction, 0.0, &inputs, &|f| f()).loss.double_value(&[]));
            }
        }
        losses.iter().sum::<f64>() / losses.len() as f64
    };
    t.run().unwrap();
    let run = root.path().join("runs/defined");
    let baseline = f(&validations(&run)[0]["loss"]);
    assert!((baseline - expected).abs() <= 1e-6 * expected, "the event says {baseline}, the definition gives {expected}");
}
