//! Helpers of the training tests: a tiny run config over generated images.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use dreambooth::config::RunConfig;

pub fn fixture_model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

/// The demo's tiny model (VAE factor 4: 16×16 latents at resolution 64, fast
/// on the CPU), written once per test process.
pub fn demo_model() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("demo-model-{}", env!("CARGO_CRATE_NAME")));
        dreambooth::demo::ensure_demo_model(&dir.join("model")).unwrap()
    })
    .clone()
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// `n` images of a subject: a red disc on a blue background, shifted a little per image.
pub fn subject_images(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for k in 0..n {
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            let (cx, cy) = (28.0 + 4.0 * k as f64, 32.0);
            let d = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt();
            if d < 16.0 { image::Rgb([230, 40, 30]) } else { image::Rgb([20, 40, 200]) }
        });
        img.save(dir.join(format!("img-{k}.png"))).unwrap();
    }
}

/// Unrelated images: a fine checkerboard of green and yellow, nothing like the subject.
pub fn other_images(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for k in 0..n {
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            if ((x + k as u32) / 2 + y / 2).is_multiple_of(2) { image::Rgb([30, 200, 40]) } else { image::Rgb([240, 230, 20]) }
        });
        img.save(dir.join(format!("other-{k}.png"))).unwrap();
    }
}

/// YAML of a small CPU run on the demo model; `training` holds `  key: value` lines that
/// override the small defaults here.
pub fn config_yaml(root: &Path, name: &str, instance_dir: &Path, training: &str) -> String {
    config_yaml_over(&demo_model(), root, name, instance_dir, training)
}

/// [`config_yaml`] over the model at `model`.
pub fn config_yaml_over(model: &Path, root: &Path, name: &str, instance_dir: &Path, training: &str) -> String {
    let mut keys: Vec<(String, String)> = [
        ("steps_per_image", "3"),
        ("learning_rate", "1.0e-4"),
        ("lr_scheduler", "constant"),
        ("mixed_precision", "'no'"),
        ("save_model_every_n_epochs", "0"),
        ("save_preview_every_n_epochs", "0"),
        ("keep_last_checkpoints", "0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for line in training.lines().filter(|l| !l.trim().is_empty()) {
        let (k, v) = line.trim().split_once(':').unwrap();
        let (k, v) = (k.trim().to_string(), v.trim().to_string());
        match keys.iter_mut().find(|(key, _)| *key == k) {
            Some(entry) => entry.1 = v,
            None => keys.push((k, v)),
        }
    }
    let training: String = keys.iter().map(|(k, v)| format!("  {k}: {v}\n")).collect();
    format!(
        "name: {name}\nsource_checkpoint: {}\noutput_dir: {}\ndevice: cpu\nseed: 7\nresolution: 64\n\
         concepts:\n  - instance_data_dir: {}\n    instance_prompt: a photo of sks thing\n\
         training:\n{training}sampling:\n  steps: 2\n  scheduler: ddim\n",
        model.display(),
        root.join("runs").display(),
        instance_dir.display(),
    )
}

pub fn write_config(root: &Path, name: &str, instance_dir: &Path, training: &str) -> PathBuf {
    write_config_over(&demo_model(), root, name, instance_dir, training)
}

/// [`write_config`] over the model at `model`.
pub fn write_config_over(model: &Path, root: &Path, name: &str, instance_dir: &Path, training: &str) -> PathBuf {
    let path = root.join(format!("{name}.yaml"));
    std::fs::write(&path, config_yaml_over(model, root, name, instance_dir, training)).unwrap();
    path
}

pub fn load(path: &Path) -> RunConfig {
    dreambooth::config::load_run_config(path).unwrap()
}

pub fn quiet() -> dreambooth::train::trainer::TrainOptions {
    dreambooth::train::trainer::TrainOptions { plain: false, quiet: true, ..Default::default() }
}

/// Names of the named events of a run, in order.
pub fn event_names(run_dir: &Path) -> Vec<String> {
    dreambooth::run::events::read_events(run_dir)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            dreambooth::run::events::Event::Named { name, .. } => Some(name),
            _ => None,
        })
        .collect()
}

pub fn named_events(run_dir: &Path, wanted: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    dreambooth::run::events::read_events(run_dir)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            dreambooth::run::events::Event::Named { name, fields } if name == wanted => Some(fields),
            _ => None,
        })
        .collect()
}

pub fn step_count(run_dir: &Path) -> usize {
    dreambooth::run::events::read_events(run_dir)
        .unwrap()
        .into_iter()
        .filter(|e| matches!(e, dreambooth::run::events::Event::Step(_)))
        .count()
}

/// Mean denoising loss of `dir`'s images under the trainer's current weights, with
/// fixed noise and timesteps (the same for every call).
pub fn eval_loss(t: &dreambooth::train::trainer::Trainer, dir: &std::path::Path) -> f64 {
    use dreambooth::train::step::{denoising_loss, draw_noise, ExampleWeights, LossInputs, PredictionType};
    let _guard = tch::no_grad_guard();
    let examples = dreambooth::data::dataset::load_folder(dir, "eval", |_| "a photo of sks thing".into(), 0, &dreambooth::data::buckets::Buckets::square(64), None).unwrap();
    let schedule = dreambooth::scheduler::NoiseSchedule::new(&t.sd.scheduler_config).unwrap();
    let prediction = PredictionType::from_config(&t.sd.scheduler_config).unwrap();
    let ehs = dreambooth::model::unet::Conditioning::text(t.sd.encode_prompt("a photo of sks thing", 1).hidden);
    let mut rng = dreambooth::rng::CpuRng::new(99);
    let mut total = 0.0;
    let mut n = 0.0;
    for e in &examples {
        let latents = t.sd.vae.encode(&e.pixels.unsqueeze(0)).mean * t.sd.vae_config.scaling_factor;
        for _ in 0..8 {
            let noise = draw_noise(&mut rng, &latents.size(), 1000, 0.0);
            let weights = ExampleWeights::all_instance(1);
            let inputs = LossInputs { latents: &latents, noise: &noise.noise, timesteps: &noise.timesteps, conditioning: &ehs, coefficients: &weights.coefficients_tensor() };
            total += denoising_loss(&t.sd.unet, &schedule, prediction, 0.0, &inputs, &|f| f()).loss.double_value(&[]);
            n += 1.0;
        }
    }
    total / n
}

/// Trains the run of `config` until step `stop_at`, where it stops (with a
/// checkpoint, as a stop request does), then resumes it in a new trainer to the
/// end: the trainer that finished.
pub fn stopped_and_resumed(config: &Path, stop_at: u64) -> dreambooth::train::trainer::Trainer {
    use dreambooth::train::trainer::{Outcome, Trainer};
    let mut cut = Trainer::start(load(config), quiet()).unwrap();
    cut.stop_at_step = Some(stop_at);
    assert_eq!(cut.run().unwrap(), Outcome::Stopped);
    let run = cut.run_dir.clone();
    drop(cut);
    let mut resumed = Trainer::resume(&run, quiet()).unwrap();
    assert_eq!(resumed.run().unwrap(), Outcome::Finished);
    resumed
}

/// Writes `keys` (`key: value` lines) into the first concept of the config at
/// `path`, after its instance prompt (class prompts, class image counts, ...).
pub fn add_concept_keys(path: &Path, keys: &str) {
    let marker = "    instance_prompt: a photo of sks thing\n";
    let indented: String = keys.lines().map(|l| format!("    {}\n", l.trim())).collect();
    let yaml = std::fs::read_to_string(path).unwrap();
    assert!(yaml.contains(marker), "{yaml}");
    std::fs::write(path, yaml.replacen(marker, &format!("{marker}{indented}"), 1)).unwrap();
}

/// The loss of every step record of a run, in order.
pub fn step_losses(run_dir: &Path) -> Vec<f64> {
    dreambooth::run::events::read_events(run_dir)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            dreambooth::run::events::Event::Step(s) => Some(s.loss),
            _ => None,
        })
        .collect()
}
