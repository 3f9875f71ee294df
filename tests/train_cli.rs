//! The training commands through the binary: bad input, kill -9 then resume
//! (bit-identical), SIGTERM saves a checkpoint, stop, export.

#[path = "train_support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use tch::Tensor;
use std::time::{Duration, Instant};

use support::*;

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dreambooth")).args(args).env("OMP_NUM_THREADS", "2").output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn assert_one_line_error(code: i32, err: &str, needle: &str) {
    assert_ne!(code, 0, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: ") && err.contains(needle), "expected {needle:?}: {err}");
}

#[test]
fn bad_input_is_one_sentence_and_touches_nothing() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let empty = r.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let cfg = write_config(r, "a", &empty, "");
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap()]);
    assert_one_line_error(code, &err, "holds no images");
    let cfg = write_config(r, "b", &r.join("missing"), "");
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap()]);
    assert_one_line_error(code, &err, "does not exist");
    let bad = r.join("bad");
    subject_images(&bad, 1);
    std::fs::write(bad.join("note.png"), b"not an image").unwrap();
    let cfg = write_config(r, "c", &bad, "");
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap()]);
    assert_one_line_error(code, &err, "not a readable image");
    let zero = r.join("zero");
    subject_images(&zero, 1);
    std::fs::write(zero.join("z.png"), b"").unwrap();
    let cfg = write_config(r, "d", &zero, "");
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap()]);
    assert_one_line_error(code, &err, "0 bytes");
    let good = r.join("good");
    subject_images(&good, 1);
    let cfg = write_config(r, "e", &good, "  learning_rte: 1.0\n");
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap()]);
    assert_one_line_error(code, &err, "learning_rate");
    assert_eq!(code, 2);
    let cfg = write_config(r, "f", &good, "  steps_per_image: -3\n");
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap()]);
    assert_one_line_error(code, &err, "steps_per_image");
    assert!(!r.join("runs").exists() || std::fs::read_dir(r.join("runs")).unwrap().next().is_none());
    // An existing run directory is left as it is.
    let run = r.join("runs/g");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("keep.txt"), b"mine").unwrap();
    let cfg = write_config(r, "g", &good, "");
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap()]);
    assert_one_line_error(code, &err, "already exists");
    assert_eq!(std::fs::read_dir(&run).unwrap().count(), 1);
    // An output_dir that cannot be created.
    let file = r.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(&r.join("runs").display().to_string(), &file.join("runs").display().to_string());
    std::fs::write(&cfg, text).unwrap();
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap()]);
    assert_one_line_error(code, &err, "output_dir");
}

/// `train CONFIG --plain` in the background, its output dropped.
fn spawn_train(config: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(["train", config.to_str().unwrap(), "--plain"])
        .env("OMP_NUM_THREADS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unet_bytes(run: &Path) -> Vec<u8> {
    let (_, dir) = dreambooth::train::checkpoint::find_checkpoint(run, None).unwrap();
    std::fs::read(dir.join("unet.safetensors")).unwrap()
}

/// `resume --steps-per-image N` trains a finished run on to N epochs: the weights
/// equal those of a run planned for N from the start, bit for bit, and the run's
/// config.yaml says N. Asking for fewer epochs than are done is one sentence
/// naming the fewest that leave a step, and changes nothing.
#[test]
fn resume_with_more_steps_per_image_trains_on_like_a_longer_run() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    subject_images(&data, 2);
    for (name, epochs) in [("long", 4), ("short", 2)] {
        let cfg = write_config(r, name, &data, &format!("  steps_per_image: {epochs}\n  random_flip: true\n"));
        let (code, _, err) = cli(&["train", cfg.to_str().unwrap(), "--plain"]);
        assert_eq!(code, 0, "{err}");
    }
    let run = r.join("runs/short");
    // Resumed as it is, a finished run has nothing to do: it says how to train on, and writes nothing.
    let events_before = std::fs::read(run.join("events.jsonl")).unwrap();
    for detach in [false, true] {
        let mut args = vec!["resume", run.to_str().unwrap(), "--plain"];
        args.extend(detach.then_some("--detach"));
        let (code, out, err) = cli(&args);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("has trained all its 4 steps; `dreambooth resume") && err.contains("--steps-per-image 3` (or more) trains on"), "{err}");
        assert!(!err.contains("background") && out.is_empty(), "{out}{err}");
    }
    assert_eq!(std::fs::read(run.join("events.jsonl")).unwrap(), events_before, "a finished run's resume wrote events");
    let config_before = std::fs::read_to_string(run.join("config.yaml")).unwrap();
    let (code, _, err) = cli(&["resume", run.to_str().unwrap(), "--plain", "--steps-per-image", "1"]);
    assert_one_line_error(code, &err, "the run is at step 4 already: give 3 or more");
    assert_eq!(code, 2);
    assert_eq!(std::fs::read_to_string(run.join("config.yaml")).unwrap(), config_before, "a refused change was written");
    let (code, _, err) = cli(&["resume", run.to_str().unwrap(), "--plain", "--steps-per-image", "4"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(unet_bytes(&r.join("runs/long")), unet_bytes(&run), "trained on to 4 epochs, the weights differ from a 4-epoch run");
    let config = dreambooth::config::load_run_config(&run.join("config.yaml")).unwrap();
    assert_eq!(config.training.steps_per_image, 4);
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("steps per image 2 → 4: 4 → 8 steps"), "{log}");

    // `runs` lists both, as the dashboard reads them.
    let (code, out, err) = cli(&["runs", r.join("runs").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("RUN") && lines[0].contains("CHECKPOINT"), "{out}");
    for name in ["long", "short"] {
        let line = lines.iter().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in {out}"));
        assert!(line.contains("finished") && line.contains("8/8") && line.contains("step 8"), "{line}");
    }
    let (code, _, err) = cli(&["runs", r.join("nowhere").to_str().unwrap()]);
    assert_one_line_error(code, &err, "cannot read the runs folder");
}

#[test]
fn kill_9_then_resume_is_bit_identical_and_sigterm_checkpoints() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    subject_images(&data, 2);
    // Pauses of a second after each epoch leave time to kill the process.
    let training = "  steps_per_image: 3\n  save_model_every_n_epochs: 1\n  pause_after_n_epochs: 1\n  pause_seconds: 1\n  random_flip: true\n";
    let full = write_config(r, "full", &data, training);
    let (code, _, err) = cli(&["train", full.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");

    let cut = write_config(r, "cut", &data, training);
    let run = r.join("runs/cut");
    let mut child = spawn_train(&cut);
    wait_for("the first checkpoint", Duration::from_secs(120), || run.join("checkpoints/step-000002/state.json").is_file());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let (code, _, err) = cli(&["resume", run.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(unet_bytes(&r.join("runs/full")), unet_bytes(&run), "resumed weights differ from the uninterrupted run");

    // SIGTERM during training: a checkpoint, a `stopped` event, a clean exit.
    let sig = write_config(r, "sig", &data, "  steps_per_image: 50\n");
    let run = r.join("runs/sig");
    let child = spawn_train(&sig);
    wait_for("a few steps", Duration::from_secs(120), || step_count(&run) >= 2);
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    assert!(event_names(&run).contains(&"stopped".to_string()));
    assert!(!dreambooth::train::checkpoint::list_checkpoints(&run).is_empty());

    // Export of the finished run, both layouts that apply to a diffusers source.
    let out_dir = r.join("export");
    let (code, _, err) = cli(&["export", r.join("runs/full").to_str().unwrap(), "--format", "diffusers", "--out", out_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out_dir.join("unet/diffusion_pytorch_model.safetensors").is_file());
    let (code, _, err) = cli(&["export", r.join("runs/full").to_str().unwrap(), "--format", "lora", "--out", r.join("l").to_str().unwrap()]);
    assert_one_line_error(code, &err, "use_lora");
    // A safetensors file under a .ckpt name would be unpickled by AUTOMATIC1111: refused.
    let ckpt = r.join("full.ckpt");
    let (code, _, err) = cli(&["export", r.join("runs/full").to_str().unwrap(), "--format", "ldm", "--out", ckpt.to_str().unwrap()]);
    assert_one_line_error(code, &err, "writes a safetensors file; give a name ending in .safetensors");
    assert!(!ckpt.exists());
}

#[test]
fn stop_checkpoints_a_detached_run_and_resume_finishes_it() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    subject_images(&data, 2);
    // Enough steps that the run is still going when `stop` arrives; a setting
    // without effect, and class images to make (after which output goes to train.log).
    let cfg = write_config(r, "bg", &data, "  steps_per_image: 12\n  lr_power: 2.0\n");
    add_concept_keys(&cfg, "class_prompt: a photo of a thing\nnum_class_images: 2");
    let run = r.join("runs/bg");
    let (code, out, err) = cli(&["train", cfg.to_str().unwrap(), "--detach"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), run.display().to_string());
    // The config's warnings reach the terminal the run was started from.
    assert!(err.contains("warning: `lr_power` applies to `lr_scheduler: polynomial` only"), "{err}");
    wait_for("the first step record", Duration::from_secs(120), || run.join("events.jsonl").is_file() && step_count(&run) >= 1);
    assert!(dreambooth::run::lock::RunLock::is_held(&run), "the detached trainer does not hold the run");
    let names = event_names(&run);
    let first = |wanted: &str| names.iter().position(|n| n == wanted);
    assert!(first("class_images").is_some() && first("warning") < first("class_images"), "said before the class images: {names:?}");

    let (code, out, err) = cli(&["stop", run.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("stopped at step "), "{out}");
    let checkpoints = dreambooth::train::checkpoint::list_checkpoints(&run);
    let (stopped_at, _) = checkpoints.last().expect("stop wrote no checkpoint").clone();
    assert!((1..24).contains(&stopped_at), "stopped at step {stopped_at}");
    eprintln!("stopped at step {stopped_at} of 24");
    assert!(event_names(&run).contains(&"stopped".to_string()), "{:?}", event_names(&run));
    assert!(!dreambooth::run::lock::RunLock::is_held(&run), "the lock was not released");
    // Stopping a run that no longer trains is a usage error.
    let (code, _, err) = cli(&["stop", run.to_str().unwrap()]);
    assert_one_line_error(code, &err, "no trainer is running");
    assert_eq!(code, 2);

    let (code, _, err) = cli(&["resume", run.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(event_names(&run).last().map(String::as_str), Some("done"));
    assert_eq!(dreambooth::train::checkpoint::list_checkpoints(&run).last().map(|c| c.0), Some(24));
}

fn rgb_pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

/// Trains 2 steps (text encoder too, so both halves of the LDM mapping are
/// exercised) over `source` and exports the run with `--format ldm`; returns
/// the run directory and the exported file.
fn train_and_export_ldm(r: &Path, name: &str, source: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = r.join("data");
    subject_images(&data, 2);
    let yaml = config_yaml(r, name, &data, "  steps_per_image: 2\n  learning_rate: 1.0e-3\n  text_encoder_train_ratio: 1.0\n")
        .replace(&demo_model().display().to_string(), &source.display().to_string());
    let cfg = r.join(format!("{name}.yaml"));
    std::fs::write(&cfg, yaml).unwrap();
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");
    let run = r.join("runs").join(name);
    let exported = r.join("exported.safetensors");
    let (code, _, err) = cli(&["export", run.to_str().unwrap(), "--format", "ldm", "--out", exported.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    (run, exported)
}

/// The pixels `generate` makes from `model` (fixed prompt, seed and size).
fn image_of(r: &Path, model: &Path, name: &str) -> Vec<u8> {
    image_with(r, model, name, &[])
}

/// [`image_of`] with more `generate` arguments.
fn image_with(r: &Path, model: &Path, name: &str, extra: &[&str]) -> Vec<u8> {
    let png = r.join(name);
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "a photo of sks thing",
        "--seed", "5", "--steps", "4", "--width", "32", "--height", "32", "--device", "cpu", "--out", png.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, _, err) = cli(&args);
    assert_eq!(code, 0, "{err}");
    rgb_pixels(&png)
}

/// The exported file gives the run's image, and training changed it.
fn assert_export_generates_like_the_run(r: &Path, exported: &Path, run: &Path, source: &Path) {
    let from_export = image_of(r, exported, "export.png");
    assert_eq!(from_export, image_of(r, run, "run.png"), "the exported file and the run directory give different images");
    assert_ne!(from_export, image_of(r, source, "source.png"), "training changed nothing visible");
}

/// A run with a VAE of its own (`vae:`, as most SD 1.5 runs use sd-vae-ft-mse) trains,
/// previews and exports with it: the exported single file holds that VAE in its own
/// layout, a diffusers export holds it in vae/, and each samples like the run.
#[test]
fn a_runs_own_vae_is_used_and_exported() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    subject_images(&data, 2);
    let vae_file = fixture_model("tiny-vae.safetensors");
    for (name, source, vae) in [
        ("vae-file", fixture_model("tiny-sd1.safetensors"), vae_file.clone()),
        ("vae-folder", fixture_model("tiny-sd1"), fixture_model("tiny-vae")),
    ] {
        let yaml = config_yaml(r, name, &data, "  steps_per_image: 1\n  learning_rate: 1.0e-3\n")
            .replace(&demo_model().display().to_string(), &source.display().to_string())
            .replace("output_dir:", &format!("vae: {}\noutput_dir:", vae.display()));
        let cfg = r.join(format!("{name}.yaml"));
        std::fs::write(&cfg, yaml).unwrap();
        let (code, _, err) = cli(&["train", cfg.to_str().unwrap(), "--plain"]);
        assert_eq!(code, 0, "{err}");
        let run = r.join("runs").join(name);
        let log = std::fs::read_to_string(run.join("train.log")).unwrap();
        assert!(log.contains(&format!("VAE: {} (in place of the source's)", vae.display())), "{log}");
        // The run samples with its VAE: the source's own VAE gives another image.
        let own = image_with(r, &run, "own.png", &["--vae", source.to_str().unwrap()]);
        let with_run_vae = image_of(r, &run, "run.png");
        assert_ne!(own, with_run_vae, "the run's VAE made no difference");
        assert_eq!(with_run_vae, image_with(r, &run, "explicit.png", &["--vae", vae_file.to_str().unwrap()]));
        for format in ["ldm", "diffusers"] {
            let out = r.join(format!("{name}-export-{format}"));
            let out = if format == "ldm" { out.with_extension("safetensors") } else { out };
            let (code, _, err) = cli(&["export", run.to_str().unwrap(), "--format", format, "--out", out.to_str().unwrap()]);
            assert_eq!(code, 0, "{err}");
            assert_eq!(image_of(r, &out, &format!("{name}-{format}.png")), with_run_vae, "{name} exported as {format}");
        }
    }
    // The single file's VAE tensors are the given VAE's (float16 there, float32 in the source's layout).
    let exported: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(r.join("vae-file-export-ldm.safetensors")).unwrap().into_iter().collect();
    for (key, t) in Tensor::read_safetensors(&vae_file).unwrap() {
        let put = &exported[&format!("first_stage_model.{key}")];
        assert!(put.equal(&t.to_kind(put.kind())), "`{key}` is not the run's VAE");
    }
}

/// A start that fails before making anything (a VAE path that does not exist, one
/// that does not fit the model) is one sentence and leaves no run directory behind, so
/// the corrected config trains with `train` again.
#[test]
fn a_start_that_fails_to_load_leaves_no_run_directory() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    subject_images(&data, 1);
    let run = r.join("runs/bad-vae");
    let with_vae = |vae: &Path| {
        let yaml = config_yaml(r, "bad-vae", &data, "  steps_per_image: 1\n")
            .replace("output_dir:", &format!("vae: {}\noutput_dir:", vae.display()));
        let cfg = r.join("bad-vae.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        cli(&["train", cfg.to_str().unwrap(), "--plain"])
    };
    let (code, _, err) = with_vae(&r.join("no-such-vae"));
    assert_one_line_error(code, &err, "`vae` ");
    assert!(err.contains("no-such-vae does not exist"), "{err}");
    assert_eq!(code, 2);
    assert!(!run.exists(), "a run directory was made for a config that cannot start");
    let (code, _, err) = with_vae(&fixture_model("tiny-sd1.safetensors"));
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error: ")).count(), 1, "one sentence, once: {err}");
    assert!(last_line(&err).contains("does not fit this model"), "{err}");
    assert!(!run.exists(), "a run directory was left by a start that failed to load");
    let (code, _, err) = with_vae(&fixture_model("trained-vae"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(event_names(&run).last().map(String::as_str), Some("done"));
}

#[test]
fn ldm_export_of_a_single_file_run_generates_the_same_image() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let source = fixture_model("tiny-sd1.safetensors");
    let (run, exported) = train_and_export_ldm(r, "ldm", &source);

    // The same key set as the source file, and the trained weights are in it.
    let keys = |p: &Path| {
        let mut v: Vec<(String, Tensor)> = Tensor::read_safetensors(p).unwrap();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (src, out) = (keys(&source), keys(&exported));
    assert_eq!(src.iter().map(|(k, _)| k).collect::<Vec<_>>(), out.iter().map(|(k, _)| k).collect::<Vec<_>>());
    let changed: Vec<&String> = src.iter().zip(&out).filter(|((_, a), (_, b))| !a.equal(b)).map(|((k, _), _)| k).collect();
    assert!(changed.iter().any(|k| k.starts_with("model.diffusion_model.")), "no UNet weight changed");
    assert!(changed.iter().any(|k| k.starts_with("cond_stage_model.")), "no text encoder weight changed");
    assert!(!changed.iter().any(|k| k.starts_with("first_stage_model.")), "the VAE does not train");
    assert_export_generates_like_the_run(r, &exported, &run, &source);
}

/// A run over a diffusers folder exports to the standard SD layout: the keys of
/// the reference single file (written from the same folder by the fixture
/// script, checked by diffusers), and the same images as the run.
#[test]
fn ldm_export_of_a_diffusers_folder_run_is_a_standard_single_file() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let source = fixture_model("tiny-sd1");
    let (run, exported) = train_and_export_ldm(r, "folder", &source);

    let keys = |p: &Path| {
        let mut v: Vec<String> = Tensor::read_safetensors(p).unwrap().into_iter().map(|(k, _)| k).collect();
        v.sort();
        v
    };
    // The reference also holds LatentDiffusion's schedule buffers (betas, ...), which loaders ignore.
    let reference: Vec<String> = keys(&fixture_model("tiny-sd1.safetensors")).into_iter().filter(|k| k.contains('.')).collect();
    assert_eq!(keys(&exported), reference);
    assert_export_generates_like_the_run(r, &exported, &run, &source);

    // --half: every float tensor in float16, the same keys, about half the bytes, and it loads.
    let half = r.join("half.safetensors");
    let (code, _, err) = cli(&["export", run.to_str().unwrap(), "--format", "ldm", "--half", "--out", half.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let tensors = Tensor::read_safetensors(&half).unwrap();
    assert_eq!(tensors.len(), reference.len());
    for (k, t) in &tensors {
        let expected = if k.ends_with("position_ids") { tch::Kind::Int64 } else { tch::Kind::Half };
        assert_eq!(t.kind(), expected, "{k}");
    }
    let (full_size, half_size) = (std::fs::metadata(&exported).unwrap().len(), std::fs::metadata(&half).unwrap().len());
    assert!(half_size * 10 < full_size * 6, "{half_size} bytes against {full_size}");
    image_of(r, &half, "half.png");
}

/// A run of 3 images, 2 epochs, a checkpoint after each epoch (steps 3 and 6),
/// whose step 5 asks libtorch for 16 PiB; returns the run directory and its stderr.
fn run_failing_at_step_5(r: &Path, name: &str) -> (std::path::PathBuf, String) {
    let data = r.join("data");
    subject_images(&data, 3);
    let cfg = write_config(r, name, &data, "  steps_per_image: 2\n  save_model_every_n_epochs: 1\n");
    let out = Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(["train", cfg.to_str().unwrap(), "--plain"])
        .env("OMP_NUM_THREADS", "2")
        .env("DREAMBOOTH_FAIL_AT_STEP", "5")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    (r.join("runs").join(name), err)
}

/// The last non-empty line of a command's stderr (its error sentence).
fn last_line(err: &str) -> &str {
    err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("")
}

#[test]
fn a_libtorch_allocation_failure_is_one_sentence_and_the_run_resumes() {
    let root = tempfile::tempdir().unwrap();
    let (run, err) = run_failing_at_step_5(root.path(), "oom");
    assert!(!err.contains("panicked") && !err.contains("Exception raised from"), "{err}");
    let last = last_line(&err);
    assert!(last.starts_with("error: out of memory while training step 5 of "), "{last}");
    assert!(last.contains("can't allocate memory") && last.contains("its checkpoint of step 3 is intact"), "{last}");
    let errors = named_events(&run, "error");
    assert_eq!(errors.len(), 1, "{:?}", event_names(&run));
    assert_eq!(errors[0]["step"], 4);
    assert!(!dreambooth::run::lock::RunLock::is_held(&run), "the failed trainer kept the lock");
    assert_eq!(dreambooth::train::checkpoint::list_checkpoints(&run).last().map(|c| c.0), Some(3));

    let (code, _, err) = cli(&["resume", run.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(event_names(&run).last().map(String::as_str), Some("done"));
    assert_eq!(dreambooth::train::checkpoint::list_checkpoints(&run).last().map(|c| c.0), Some(6));
}

/// `train` of 4 images in micro-batches of 4 on a device whose memory fits
/// `fits` examples (`DREAMBOOTH_OOM_ABOVE_MICRO_BATCH`); returns the run and the exit code.
fn run_with_memory_for(r: &Path, name: &str, data: &Path, fits: &str) -> (std::path::PathBuf, i32, String) {
    let cfg = write_config(r, name, data, "  steps_per_image: 2\n  batch_size: 4\n  save_model_every_n_epochs: 1\n");
    let out = Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(["train", cfg.to_str().unwrap(), "--plain"])
        .env("OMP_NUM_THREADS", "2")
        .env("DREAMBOOTH_OOM_ABOVE_MICRO_BATCH", fits)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (r.join("runs").join(name), out.status.code().unwrap_or(-1), err)
}

/// An out-of-memory in a step's micro-batches retries the step with the
/// micro-batch halved and accumulation doubled, said and recorded in
/// config.yaml: the run is the one it would have been at those sizes from the
/// start. At micro-batch 1 it ends as before, in one sentence.
#[test]
fn out_of_memory_splits_the_micro_batch_and_the_run_goes_on() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    subject_images(&data, 4);
    let (run, code, err) = run_with_memory_for(r, "split", &data, "2");
    assert_eq!(code, 0, "{err}");
    let splits = named_events(&run, "micro_batch_split");
    assert_eq!(splits.len(), 1, "{:?}", event_names(&run));
    assert_eq!((splits[0]["step"].as_u64(), splits[0]["batch_size"].as_u64()), (Some(0), Some(2)));
    assert_eq!(splits[0]["gradient_accumulation_steps"], 2);
    let warnings = named_events(&run, "warning");
    assert!(warnings.iter().any(|w| w["message"].as_str().unwrap().contains("retrying with batch_size 2 × gradient_accumulation_steps 2")));
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("out of memory at step 1"), "{log}");
    let recorded = load(&run.join("config.yaml"));
    assert_eq!((recorded.training.batch_size, recorded.training.gradient_accumulation_steps), (2, 2));
    assert_eq!(named_events(&run, "done")[0]["step"], 2);

    // The same run configured at 2 × 2 from the start: bit for bit.
    let cfg = write_config(r, "planned", &data, "  steps_per_image: 2\n  batch_size: 2\n  gradient_accumulation_steps: 2\n  save_model_every_n_epochs: 1\n");
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");
    let unet = |run: &Path| {
        let (_, dir) = dreambooth::train::checkpoint::find_checkpoint(run, None).unwrap();
        let mut tensors = Tensor::read_safetensors(dir.join("unet.safetensors")).unwrap();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        tensors
    };
    for ((k, a), (_, b)) in unet(&run).iter().zip(unet(&r.join("runs/planned")).iter()) {
        assert!(a.equal(b), "{k} differs");
    }

    // Nothing fits: 4 → 2 → 1, then the usual sentence.
    let (run, code, err) = run_with_memory_for(r, "nothing-fits", &data, "0");
    assert_eq!(code, 1, "{err}");
    assert!(last_line(&err).starts_with("error: out of memory while training step 1 of "), "{err}");
    let sizes: Vec<u64> = named_events(&run, "micro_batch_split").iter().map(|e| e["batch_size"].as_u64().unwrap()).collect();
    assert_eq!(sizes, vec![2, 1]);

    // fused_backward updates inside the backward pass and cannot accumulate: no split, the sentence.
    let cfg = write_config(r, "fused", &data, "  steps_per_image: 2\n  batch_size: 4\n  fused_backward: true\n  max_grad_norm: 0\n");
    let out = Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(["train", cfg.to_str().unwrap(), "--plain"])
        .env("OMP_NUM_THREADS", "2")
        .env("DREAMBOOTH_OOM_ABOVE_MICRO_BATCH", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(last_line(&err).starts_with("error: out of memory while training step 1 of "), "{err}");
    assert!(named_events(&r.join("runs/fused"), "micro_batch_split").is_empty());
}

/// A checkpoint written before the micro-batch was split resumes under the
/// split sizes (what config.yaml says after a split): its epoch count carries
/// over and the run ends at the same step.
#[test]
fn a_checkpoint_from_before_a_split_resumes_at_the_split_sizes() {
    use dreambooth::train::trainer::{Outcome, Trainer};
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    subject_images(&data, 4);
    let cfg = write_config(r, "resplit", &data, "  steps_per_image: 3\n  batch_size: 2\n");
    let mut t = Trainer::start(load(&cfg), quiet()).unwrap();
    t.stop_at_step = Some(3);
    assert_eq!(t.run().unwrap(), Outcome::Stopped);
    assert_eq!((t.epochs_done(), t.total_steps), (1, 6));
    let run = t.run_dir.clone();
    drop(t);
    let config_path = run.join("config.yaml");
    let mut config = load(&config_path);
    config.training.batch_size = 1;
    config.training.gradient_accumulation_steps = 2;
    std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
    let mut t = Trainer::resume(&run, quiet()).unwrap();
    assert_eq!((t.step, t.micro_batches, t.epochs_done(), t.total_steps), (3, 6, 1, 6));
    assert_eq!(t.run().unwrap(), Outcome::Finished);
    assert_eq!((t.step, t.epochs_done()), (6, 3));
}

/// Asking for CUDA graphs where they cannot run says so and trains eagerly.
#[test]
fn cuda_graphs_asked_for_on_the_cpu_are_refused_with_a_warning() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    subject_images(&data, 1);
    let cfg = write_config(r, "graphs", &data, "  steps_per_image: 2\n");
    let out = Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(["train", cfg.to_str().unwrap(), "--plain"])
        .env("OMP_NUM_THREADS", "2")
        .env("DREAMBOOTH_CUDA_GRAPHS", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let warnings = named_events(&r.join("runs/graphs"), "warning");
    assert!(
        warnings.iter().any(|w| w["message"].as_str().unwrap_or("").contains("CUDA graphs stay off: they need a CUDA device")),
        "{warnings:?}"
    );
    assert_eq!(event_names(&r.join("runs/graphs")).last().map(String::as_str), Some("done"));
}

/// A write that the file system refuses (here a file-size limit, `ulimit -f`, which
/// fails writes as a full disk does) ends the run with one sentence naming the
/// file; the checkpoint before it stays intact, no half checkpoint is left, and the
/// run resumes once there is room. A damaged newest checkpoint is named, with the
/// earlier one that is left.
#[test]
fn full_disk_and_damaged_checkpoints_are_one_sentence_and_lose_nothing() {
    let root = tempfile::tempdir().unwrap();
    // A checkpoint at step 3, then a (simulated) failure at step 5.
    let (run, _) = run_failing_at_step_5(root.path(), "full");
    let (_, kept) = dreambooth::train::checkpoint::find_checkpoint(&run, None).unwrap();
    let snapshot = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
            .collect();
        files.sort();
        files
    };
    let before = snapshot(&kept);
    // Resumed under a 1 MiB file-size limit: the step-6 UNet file cannot be written.
    let out = Command::new("bash")
        .args(["-c", "ulimit -f 1024; exec \"$0\" resume \"$1\" --plain", env!("CARGO_BIN_EXE_dreambooth"), run.to_str().unwrap()])
        .env("OMP_NUM_THREADS", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = last_line(&err);
    assert!(last.starts_with("error: cannot write the checkpoint ") && last.contains("File too large"), "{last}");
    assert!(last.contains("unet.safetensors"), "the sentence names the file: {last}");
    assert!(last.contains("its checkpoint of step 3 is intact: `dreambooth resume "), "{last}");
    let entries: Vec<String> =
        std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(entries, vec!["step-000003".to_string()], "a half checkpoint was left");
    assert_eq!(snapshot(&kept), before, "the last good checkpoint changed");
    assert_eq!(named_events(&run, "error").len(), 2);
    assert!(!dreambooth::run::lock::RunLock::is_held(&run), "the failed trainer kept the lock");

    let (code, _, err) = cli(&["resume", run.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(event_names(&run).last().map(String::as_str), Some("done"));
    assert_eq!(dreambooth::train::checkpoint::list_checkpoints(&run).last().map(|c| c.0), Some(6));

    // The newest checkpoint damaged afterwards (a copy cut short): resume says what
    // is wrong and which checkpoint is left, and goes back to none by itself.
    let unet = run.join("checkpoints/step-000006/unet.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 3]).unwrap();
    let (code, out, err) = cli(&["resume", run.to_str().unwrap(), "--plain"]);
    let last = last_line(&err);
    assert_eq!(code, 1, "{err}");
    assert!(last.contains("step-000006/unet.safetensors is not a valid safetensors file"), "{last}");
    assert!(last.contains("to resume from the checkpoint of step 3 instead, move "), "{last}");
    // Found from the file's header, before the model is loaded again.
    assert!(!out.contains("precision:") && !err.contains("precision:"), "the model was loaded first:\n{out}{err}");
}

/// A run killed while it makes its class images (before its first checkpoint)
/// resumes from step 0 with the images it has: its weights equal those of a run
/// never interrupted. A stop request then ends it cleanly (exit 0, a `stopped`
/// event, nothing to checkpoint).
#[test]
fn a_run_killed_or_stopped_while_making_class_images_resumes_from_step_0() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    subject_images(&data, 2);
    let with_class_images = |name: &str| {
        let cfg = write_config(r, name, &data, "  steps_per_image: 2\n  random_flip: true\n");
        add_concept_keys(&cfg, "class_prompt: a photo of a thing\nnum_class_images: 24\nclass_infer_steps: 12");
        cfg
    };
    let started = Instant::now();
    let full = with_class_images("full");
    let (code, _, err) = cli(&["train", full.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");
    eprintln!("uninterrupted run with 24 class images: {:.1} s", started.elapsed().as_secs_f64());

    let class_dir = |run: &Path| run.join("class_images/concept-0");
    let cut = with_class_images("cut");
    let run = r.join("runs/cut");
    let mut child = spawn_train(&cut);
    wait_for("three class images", Duration::from_secs(120), || class_dir(&run).join("class-00002.png").is_file());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let made = std::fs::read_dir(class_dir(&run)).unwrap().count();
    assert!(made < 24, "the kill came after every class image was made ({made})");
    assert!(dreambooth::train::checkpoint::list_checkpoints(&run).is_empty());
    let (code, _, err) = cli(&["resume", run.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(unet_bytes(&r.join("runs/full")), unet_bytes(&run), "the restarted run differs from the uninterrupted one");
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("has no checkpoint yet: training it from step 0"), "{log}");
    assert!(log.contains(&format!("generating {} class images", 24 - made)), "{log}");

    let stop = with_class_images("stop");
    let run = r.join("runs/stop");
    let child = spawn_train(&stop);
    wait_for("a class image", Duration::from_secs(120), || class_dir(&run).join("class-00000.png").is_file());
    dreambooth::run::control::send(&run, dreambooth::run::control::Request::Stop).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    assert!(event_names(&run).contains(&"stopped".to_string()));
    assert!(dreambooth::train::checkpoint::list_checkpoints(&run).is_empty());
    assert!(std::fs::read_dir(class_dir(&run)).unwrap().count() < 24);
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("stopped before training began"), "{log}");
}

/// `generate` from a run directory samples with the run's own `clip_skip` and at its
/// `resolution` (as its previews did) unless `--clip-skip` / `--width` say otherwise.
#[test]
fn generate_from_a_run_uses_its_clip_skip_and_resolution() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    subject_images(&data, 1);
    let cfg = write_config(r, "skip", &data, "  steps_per_image: 1\n  clip_skip: 2\n");
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");
    let run = r.join("runs/skip");
    let image = |name: &str, extra: &[&str]| image_with(r, &run, name, extra);
    let default = image("default.png", &[]);
    assert_eq!(default, image("two.png", &["--clip-skip", "2"]));
    assert_ne!(default, image("one.png", &["--clip-skip", "1"]), "clip skip 2 and 1 gave the same image");
    // The tiny model's native size is 128; the run trained (and previewed) at 64.
    let png = r.join("sized.png");
    let (code, _, err) = cli(&["generate", "--model", run.to_str().unwrap(), "--prompt", "x", "--steps", "1", "--device", "cpu",
        "--out", png.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(image::image_dimensions(&png).unwrap(), (64, 64));
}

/// SD 2 (v-prediction) runs export to a single file with its config beside it
/// (`<out>.yaml`, as AUTOMATIC1111 reads it): written from the model's configs
/// for a diffusers folder, copied from the source's sidecar for a single file.
/// Either way the exported file samples like the run, bit for bit.
#[test]
fn sd2_ldm_exports_carry_their_config_and_generate_like_the_run() {
    for source in [fixture_model("tiny-sd2"), fixture_model("tiny-sd2.safetensors")] {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let (run, exported) = train_and_export_ldm(r, "sd2", &source);
        let yaml = std::fs::read_to_string(exported.with_extension("yaml")).expect("no config beside the exported file");
        assert!(yaml.contains("parameterization: v") && yaml.contains("FrozenOpenCLIPEmbedder"), "{yaml}");
        if source.is_file() {
            assert_eq!(yaml, std::fs::read_to_string(source.with_extension("yaml")).unwrap(), "the source's sidecar, copied");
        }
        assert_export_generates_like_the_run(r, &exported, &run, &source);
        // A second export to the same name is refused and leaves both files alone.
        std::fs::remove_file(&exported).unwrap();
        let (code, _, err) = cli(&["export", run.to_str().unwrap(), "--format", "ldm", "--out", exported.to_str().unwrap()]);
        assert_one_line_error(code, &err, "already exists");
        assert!(!exported.exists());
    }
}

/// A source model replaced under the same path after the run started (a
/// re-download, another fine-tune) is said on resume and export: the run's
/// weights would sit over a different model.
#[test]
fn a_source_model_changed_since_the_start_is_said() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    subject_images(&data, 1);
    let model = r.join("model.safetensors");
    std::fs::copy(fixture_model("tiny-sd1.safetensors"), &model).unwrap();
    let cfg = write_config_over(&model, r, "src", &data, "  steps_per_image: 1\n  save_preview_every_n_epochs: 0\n");
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");
    let run = r.join("runs/src");
    assert!(run.join("source.json").is_file());
    let export = |name: &str| cli(&["export", run.to_str().unwrap(), "--format", "ldm", "--out", r.join(name).to_str().unwrap()]);
    let (code, _, err) = export("same.safetensors");
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
    // The last tensor's last byte changes: still a valid model, not the same one.
    let mut bytes = std::fs::read(&model).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&model, &bytes).unwrap();
    let (code, _, err) = export("changed.safetensors");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("is not the model this run started from"), "{err}");
    let (code, out, err) = cli(&["resume", run.to_str().unwrap(), "--plain", "--steps-per-image", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(format!("{out}{err}").contains("warning: `source_checkpoint`"), "{out}{err}");
}

/// Resume counts a bucketed run's steps before the model loads; over a single
/// file the side multiple comes from the file's own shapes (the tiny model's is 4,
/// not SD's 64): counted with 64, this run of 9 steps "had trained all its 6".
#[test]
fn a_bucketed_run_over_a_single_file_resumes_to_its_own_step_count() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = r.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (name, w, h) in [("a", 96, 64), ("b", 64, 96), ("c", 64, 64)] {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, name.as_bytes()[0]])).save(data.join(format!("{name}.png"))).unwrap();
    }
    let training = "  steps_per_image: 3\n  batch_size: 2\n  aspect_ratio_bucketing: true\n  save_model_every_n_epochs: 1\n  save_preview_every_n_epochs: 0\n";
    let cfg = write_config_over(&fixture_model("tiny-sd1.safetensors"), r, "buckets", &data, training);
    let (code, _, err) = cli(&["train", cfg.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");
    let run = r.join("runs/buckets");
    let steps: Vec<u64> = dreambooth::train::checkpoint::list_checkpoints(&run).iter().map(|c| c.0).collect();
    assert_eq!(steps, [3, 6, 9], "three buckets, two images a batch: three batches an epoch");
    std::fs::remove_dir_all(run.join("checkpoints/step-000009")).unwrap();
    let (code, out, err) = cli(&["resume", run.to_str().unwrap(), "--plain"]);
    assert_eq!(code, 0, "{err}");
    assert!(!format!("{out}{err}").contains("has trained all its"), "{out}{err}");
    assert_eq!(dreambooth::train::checkpoint::list_checkpoints(&run).last().map(|c| c.0), Some(9));
}

/// People keep their run config as `my-dog.yaml` beside `my-dog.safetensors`:
/// an SD 1.x export writes no config sidecar, so that file is no obstacle and
/// stays as it was (only a model that needs its sidecar refuses the name).
#[test]
fn an_ldm_export_that_writes_no_sidecar_leaves_a_yaml_of_that_name_alone() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (run, exported) = train_and_export_ldm(r, "sd1", &fixture_model("tiny-sd1"));
    assert!(!exported.with_extension("yaml").exists());
    let out = r.join("my-dog.safetensors");
    std::fs::write(r.join("my-dog.yaml"), "name: my-dog\n").unwrap();
    let (code, _, err) = cli(&["export", run.to_str().unwrap(), "--format", "ldm", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.is_file());
    assert_eq!(std::fs::read_to_string(r.join("my-dog.yaml")).unwrap(), "name: my-dog\n");
}
