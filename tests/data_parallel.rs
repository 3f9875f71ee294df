//! Data-parallel training over c10d's Gloo on the CPU: two processes on loopback.
//! `--nproc 2` with batch 1 trains what one process with batch 2 trains (the same
//! samples and noise each step), two processes started by hand with torchrun's
//! variables equal the `--nproc` run bit for bit, a killed worker ends the run on
//! every rank with a sentence naming it, and the run resumes with the same world
//! size exactly (and with another, re-planned); SIGTERM to the launcher stops
//! every rank at one step with one checkpoint.

mod train_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tch::Tensor;
use train_support::*;

fn dreambooth() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dreambooth"));
    // Two ranks share two cores.
    cmd.env("OMP_NUM_THREADS", "1").env("DREAMBOOTH_DIST_TIMEOUT", "120").env("DREAMBOOTH_DIST_GRACE", "20");
    for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.stdout(Stdio::null()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Four images, two epochs, a checkpoint every epoch: 4 steps of global batch 2.
fn config(root: &Path, name: &str, batch: u32) -> PathBuf {
    let images = root.join("images");
    if !images.exists() {
        subject_images(&images, 4);
    }
    // DreamBooth's usual learning rate: AdamW moves a weight by about the learning
    // rate whatever its gradient's size, so a gradient component that is rounding
    // noise (batch 2 in one UNet call vs. two calls of 1) moves it by up to that
    // much; at 1e-6 over 4 steps that stays well under the 1e-5 asked for.
    let training = format!(
        "steps_per_image: 2\nbatch_size: {batch}\nlearning_rate: 1.0e-6\nsave_model_every_n_epochs: 1\nkeep_last_checkpoints: 0\n"
    );
    write_config(root, name, &images, &training)
}

fn unet_file(run: &Path) -> PathBuf {
    let (step, dir) = dreambooth::train::checkpoint::find_checkpoint(run, None).unwrap();
    assert_eq!(step, 4, "{} ends at step 4", run.display());
    dir.join("unet.safetensors")
}

fn unet(run: &Path) -> Vec<(String, Tensor)> {
    let mut tensors = Tensor::read_safetensors(unet_file(run)).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

fn max_difference(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((ka, ta), (kb, tb))| {
            assert_eq!(ka, kb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn two_processes_train_what_one_process_trains_with_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let runs = r.join("runs");

    let alone = config(r, "alone", 2);
    let (code, err) = run(dreambooth().args(["train", alone.to_str().unwrap(), "--plain"]));
    assert_eq!(code, 0, "{err}");

    let launched = config(r, "launched", 1);
    let (code, err) = run(dreambooth().args(["train", launched.to_str().unwrap(), "--plain", "--nproc", "2"]));
    assert_eq!(code, 0, "{err}");

    // Rank 0 alone wrote the run; its events give the world size and the global loss.
    let start = &named_events(&runs.join("launched"), "start")[0];
    assert_eq!(start["world_size"], 2);
    assert_eq!(start["total_steps"], 4);
    assert_eq!(step_count(&runs.join("launched")), 4);
    // Each rank's memory reaches rank 0's events (step 1, then every 10 steps).
    let ranks = &named_events(&runs.join("launched"), "ranks")[0];
    let memory = ranks["memory_bytes"].as_array().unwrap();
    assert!(memory.len() == 2 && memory.iter().all(|b| b.as_u64().unwrap() > 0), "{ranks:?}");

    let difference = max_difference(&unet(&runs.join("alone")), &unet(&runs.join("launched")));
    assert!(difference < 1e-5, "--nproc 2 × batch 1 differs from batch 2 alone by {difference}");
    let losses = |run: &str| step_losses(&runs.join(run));
    let (a, b) = (losses("alone"), losses("launched"));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "losses {a:?} vs {b:?}");
    }

    // The same two ranks started by hand, as torchrun or srun would.
    let by_hand = config(r, "by-hand", 1);
    let port = free_port().to_string();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            dreambooth()
                .args(["train", by_hand.to_str().unwrap(), "--plain"])
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in ranks {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(
        std::fs::read(unet_file(&runs.join("by-hand"))).unwrap(),
        std::fs::read(unet_file(&runs.join("launched"))).unwrap(),
        "torchrun's variables by hand must equal --nproc bit for bit"
    );
}

#[test]
fn a_killed_worker_ends_every_rank_and_the_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let runs = r.join("runs");

    let whole = config(r, "whole", 1);
    let (code, err) = run(dreambooth().args(["train", whole.to_str().unwrap(), "--plain", "--nproc", "2"]));
    assert_eq!(code, 0, "{err}");

    // Rank 1 dies (SIGKILL) at step 4, after the checkpoint of step 2.
    let cut = config(r, "cut", 1);
    let started = Instant::now();
    let (code, err) = run(dreambooth()
        .args(["train", cut.to_str().unwrap(), "--plain", "--nproc", "2"])
        .env("DREAMBOOTH_FAIL_AT_STEP", "4")
        .env("DREAMBOOTH_KILL_RANK", "1"));
    assert_eq!(code, 1, "{err}");
    assert!(started.elapsed() < Duration::from_secs(120), "the run took {:?} to end", started.elapsed());
    let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap();
    assert!(last.contains("rank 1 of 2 was killed by signal 9"), "{err}");
    assert!(last.contains("resume"), "{last}");
    let (step, _) = dreambooth::train::checkpoint::find_checkpoint(&runs.join("cut"), None).unwrap();
    assert_eq!(step, 2);

    let (code, err) = run(dreambooth().args(["resume", runs.join("cut").to_str().unwrap(), "--plain", "--nproc", "2"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(unet_file(&runs.join("cut"))).unwrap(),
        std::fs::read(unet_file(&runs.join("whole"))).unwrap(),
        "resumed with the same world size, the run equals one never cut"
    );
}

#[test]
fn settings_that_cannot_train_with_several_processes_are_one_sentence() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let images = r.join("images");
    subject_images(&images, 2);
    let fused = write_config(r, "fused", &images, "fused_backward: true\n");
    let (code, err) = run(dreambooth().args(["train", fused.to_str().unwrap(), "--nproc", "2"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("fused_backward") && err.lines().count() == 1, "{err}");
    let (code, err) = run(dreambooth().args(["train", fused.to_str().unwrap(), "--nproc", "0"]));
    assert_eq!(code, 2, "{err}");
    assert!(!r.join("runs/fused").exists());
}

/// The last checkpoint's UNet file of a run.
fn last_unet_file(run: &Path) -> PathBuf {
    dreambooth::train::checkpoint::find_checkpoint(run, None).unwrap().1.join("unet.safetensors")
}

#[test]
fn averaging_during_backward_equals_averaging_after_it_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let runs = r.join("runs");
    // Three images in global batches of 2: each epoch's last batch leaves rank 1
    // without rows, and accumulation over 2 micro-batches reduces only on the last.
    let images = r.join("images");
    subject_images(&images, 3);
    let training = "steps_per_image: 2\nbatch_size: 1\ngradient_accumulation_steps: 2\nlearning_rate: 1.0e-6\n\
                    save_model_every_n_epochs: 1\nkeep_last_checkpoints: 0\n";
    let overlapped = write_config(r, "overlapped", &images, training);
    let after = write_config(r, "after", &images, training);
    // Small buckets, so that several start while backward is still running.
    let (code, err) = run(dreambooth()
        .args(["train", overlapped.to_str().unwrap(), "--plain", "--nproc", "2"])
        .env("DREAMBOOTH_DIST_BUCKET_MB", "0.05"));
    assert_eq!(code, 0, "{err}");
    let (code, err) = run(dreambooth()
        .args(["train", after.to_str().unwrap(), "--plain", "--nproc", "2"])
        .env("DREAMBOOTH_DIST_BUCKET_MB", "0.05")
        .env("DREAMBOOTH_DIST_OVERLAP", "0"));
    assert_eq!(code, 0, "{err}");

    let log = std::fs::read_to_string(runs.join("overlapped/train.log")).unwrap();
    let note = log.lines().find(|l| l.contains("gradients averaged in")).unwrap_or_else(|| panic!("{log}"));
    let early: u64 = note.split("; ").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    eprintln!("{note}");
    assert!(early > 0, "no bucket started during the backward pass: {note}");
    assert!(log.contains("batch 1 per process × 2 processes = 2"), "{log}");
    assert_eq!(
        std::fs::read(last_unet_file(&runs.join("overlapped"))).unwrap(),
        std::fs::read(last_unet_file(&runs.join("after"))).unwrap(),
        "averaging during backward must equal averaging after it bit for bit"
    );
}

#[test]
fn ranks_make_their_share_of_the_class_images_and_the_folder_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let runs = r.join("runs");
    let images = r.join("images");
    subject_images(&images, 2);
    let with_classes = |name: &str| {
        let path = write_config(r, name, &images, "steps_per_image: 1\nbatch_size: 1\n");
        add_concept_keys(&path, "class_prompt: a photo of a thing\nnum_class_images: 3");
        path
    };
    let (alone, launched) = (with_classes("alone"), with_classes("launched"));
    let (code, err) = run(dreambooth().args(["train", alone.to_str().unwrap(), "--plain"]));
    assert_eq!(code, 0, "{err}");
    let (code, err) = run(dreambooth().args(["train", launched.to_str().unwrap(), "--plain", "--nproc", "2"]));
    assert_eq!(code, 0, "{err}");

    let folder = |run: &str| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(runs.join(run).join("class_images/concept-0"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
            .collect();
        files.sort();
        files
    };
    let (a, b) = (folder("alone"), folder("launched"));
    assert_eq!(b.iter().map(|f| f.0.clone()).collect::<Vec<_>>(), ["class-00000.png", "class-00001.png", "class-00002.png"]);
    assert!(a == b, "the class images of two ranks differ from one process's");
    let log = std::fs::read_to_string(runs.join("launched/train.log")).unwrap();
    assert!(log.contains("each of 2 processes making its share"), "{log}");
    let progress = named_events(&runs.join("launched"), "class_images");
    assert_eq!(progress.last().unwrap()["done"], 3, "{progress:?}");
}

#[test]
fn sigterm_to_the_launcher_checkpoints_once_and_the_run_resumes_with_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let run_dir = r.join("runs/sig");
    let images = r.join("images");
    subject_images(&images, 4);
    // 4 images × 30 epochs in global batches of 2: 60 steps, far more than the signal lets run.
    let cfg = write_config(r, "sig", &images, "steps_per_image: 30\nbatch_size: 1\n");
    let launcher = dreambooth()
        .args(["train", cfg.to_str().unwrap(), "--plain", "--nproc", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !run_dir.join("events.jsonl").is_file() || step_count(&run_dir) < 2 {
        assert!(started.elapsed() < Duration::from_secs(120), "no steps within 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signalling the launcher this test started.
    unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) };
    let out = launcher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Both ranks ended cleanly: had they stopped at different steps, a collective would have failed.
    assert!(out.status.success(), "{:?}: {err}", out.status);
    let checkpoints = dreambooth::train::checkpoint::list_checkpoints(&run_dir);
    assert_eq!(checkpoints.len(), 1, "one checkpoint, by rank 0: {checkpoints:?}");
    let stopped = &named_events(&run_dir, "stopped")[0];
    let step = checkpoints[0].0;
    assert_eq!(stopped["step"], step, "{stopped:?}");
    assert!(step < 60, "the run stopped early");

    // Resumed by one process (global batch 1): the same place in the data order,
    // the steps re-planned for the new batch.
    let (code, err) = run(dreambooth().args(["resume", run_dir.to_str().unwrap(), "--plain"]));
    assert_eq!(code, 0, "{err}");
    let log = std::fs::read_to_string(run_dir.join("train.log")).unwrap();
    let wanted = format!("is step {} of global batch 1", 2 * step);
    assert!(log.contains(&wanted), "{wanted} in {log}");
    let starts = named_events(&run_dir, "start");
    let resumed = starts.last().unwrap();
    assert_eq!((resumed["total_steps"].as_u64(), resumed["world_size"].as_u64()), (Some(120), Some(1)), "{resumed:?}");
    let last_step = dreambooth::run::events::read_events(&run_dir)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            dreambooth::run::events::Event::Step(s) => Some(s.step),
            _ => None,
        })
        .max();
    assert_eq!(last_step, Some(120));
}

/// A pause from the dashboard pauses every rank at one step, for longer than
/// the collectives' time-out, and a resume request goes on to the end.
#[test]
fn a_requested_pause_holds_every_rank_past_the_collective_time_out() {
    use dreambooth::run::control::{send, Request};
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let run_dir = r.join("runs/paused");
    let images = r.join("images");
    subject_images(&images, 4);
    // 4 images × 30 epochs in global batches of 2: 60 steps, more than the request takes to arrive.
    let cfg = write_config(r, "paused", &images, "steps_per_image: 30\nbatch_size: 1\n");
    let launcher = dreambooth()
        .env("DREAMBOOTH_DIST_TIMEOUT", "3")
        .args(["train", cfg.to_str().unwrap(), "--plain", "--nproc", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(120), "no {what} within 120 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for("step", &|| run_dir.join("events.jsonl").is_file() && step_count(&run_dir) >= 1);
    send(&run_dir, Request::Pause).unwrap();
    wait_for("pause", &|| !named_events(&run_dir, "pause").is_empty());
    // Twice the collectives' time-out.
    std::thread::sleep(Duration::from_secs(6));
    send(&run_dir, Request::Resume).unwrap();
    let out = launcher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert_eq!(named_events(&run_dir, "done")[0]["step"], 60, "{err}");
    assert_eq!(named_events(&run_dir, "resume").len(), 1);
}

/// `--detach --nproc 2`: the command returns once the run is set up, and the
/// launcher and both ranks train in the background to the end.
#[test]
fn a_detached_launcher_trains_in_the_background() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let run_dir = r.join("runs/detached");
    let images = r.join("images");
    subject_images(&images, 4);
    let cfg = write_config(r, "detached", &images, "steps_per_image: 2\nbatch_size: 1\n");
    let out = dreambooth().args(["train", cfg.to_str().unwrap(), "--detach", "--nproc", "2"]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), run_dir.display().to_string());
    assert!(stderr.contains("training in the background"), "{stderr}");
    let started = Instant::now();
    while named_events(&run_dir, "done").is_empty() {
        assert!(started.elapsed() < Duration::from_secs(120), "not done within 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(named_events(&run_dir, "start")[0]["world_size"], 2);
    assert_eq!(named_events(&run_dir, "done")[0]["step"], 4);
}
