//! Bad input to `generate`: one clear sentence naming the file or flag, a
//! non-zero exit status, never a panic.

mod common;
#[path = "train_support/mod.rs"]
mod support;

use std::path::Path;

use common::{model, run_cli};
use support::copy_dir;

fn generate(model: &Path, extra: &[&str], out: &Path) -> (i32, String) {
    let mut args = vec![
        "generate", "--model", model.to_str().unwrap(), "--prompt", "a dog", "--steps", "2", "--device", "cpu",
        "--out", out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, _, err) = run_cli(&args);
    (code, err)
}

/// One line on stderr, starting with "error:", mentioning `needle`, no panic.
fn assert_clear_error(code: i32, err: &str, needle: &str) {
    assert_ne!(code, 0, "expected failure; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(!err.contains("RUST_BACKTRACE"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(model("tiny-sd1.safetensors")).unwrap();
    let path = dir.path().join("cut.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let (code, err) = generate(&path, &[], &dir.path().join("o.png"));
    assert_clear_error(code, &err, "cut.safetensors");
    assert_eq!(code, 1);
}

#[test]
fn garbage_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.safetensors");
    std::fs::write(&path, b"this is not a tensor file at all, just some text").unwrap();
    let (code, err) = generate(&path, &[], &dir.path().join("o.png"));
    assert_clear_error(code, &err, "junk.safetensors");
}

#[test]
fn evil_ckpt_is_refused_and_runs_nothing() {
    let marker = Path::new("/tmp/dreambooth_evil_ckpt_ran");
    let _ = std::fs::remove_file(marker);
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = generate(&model("evil.ckpt"), &[], &dir.path().join("o.png"));
    assert_clear_error(code, &err, "evil.ckpt");
    assert!(err.contains("system"), "the refusal names what the pickle asked for: {err}");
    assert!(!marker.exists(), "the pickle's command ran");
}


#[test]
fn folder_without_unet() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("broken-model");
    copy_dir(&model("tiny-sd1"), &m);
    std::fs::remove_dir_all(m.join("unet")).unwrap();
    let (code, err) = generate(&m, &[], &dir.path().join("o.png"));
    assert_clear_error(code, &err, "unet");
    assert!(err.contains("broken-model"), "{err}");
}

#[test]
fn folder_without_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("no-tok");
    copy_dir(&model("tiny-sd1"), &m);
    std::fs::remove_dir_all(m.join("tokenizer")).unwrap();
    let (code, err) = generate(&m, &[], &dir.path().join("o.png"));
    assert_clear_error(code, &err, "tokenizer");
}

#[test]
fn unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mystery.safetensors");
    let t = tch::Tensor::zeros([4, 4], (tch::Kind::Float, tch::Device::Cpu));
    tch::Tensor::write_safetensors(&[("some.other.network.weight", &t)], &path).unwrap();
    let (code, err) = generate(&path, &[], &dir.path().join("o.png"));
    assert_clear_error(code, &err, "mystery.safetensors");
}

#[test]
fn missing_model_path() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = generate(&dir.path().join("nowhere"), &[], &dir.path().join("o.png"));
    assert_clear_error(code, &err, "nowhere");
}

#[test]
fn width_the_model_cannot_take() {
    let dir = tempfile::tempdir().unwrap();
    // tiny-sd2: VAE factor 4 × UNet downsampling 4 = multiples of 16.
    let (code, err) = generate(&model("tiny-sd2"), &["--width", "40"], &dir.path().join("o.png"));
    assert_clear_error(code, &err, "--width 40");
    assert_eq!(code, 2);
}

#[test]
fn unknown_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = generate(&model("tiny-sd1"), &["--scheduler", "heun"], &dir.path().join("o.png"));
    assert_clear_error(code, &err, "heun");
    assert!(err.contains("dpmpp-2m"), "lists the valid names: {err}");
    assert_eq!(code, 2);
}

#[test]
fn unknown_device() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("tiny-sd1");
    let out = dir.path().join("o.png");
    let (code, _, err) = run_cli(&[
        "generate", "--model", m.to_str().unwrap(), "--prompt", "a dog", "--device", "tpu", "--out", out.to_str().unwrap(),
    ]);
    assert_clear_error(code, &err, "--device tpu");
    assert_eq!(code, 2);
}

#[test]
fn generate_names_what_it_cannot_write_and_what_a_prompt_loses() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("tiny-sd1");
    let jpg = dir.path().join("o.jpg");
    let (code, _, err) = run_cli(&["generate", "--model", m.to_str().unwrap(), "--prompt", "a dog", "--out", jpg.to_str().unwrap()]);
    assert_clear_error(code, &err, "generate writes PNG images");
    assert!(!jpg.exists());
    let out = dir.path().join("o.png");
    let (code, _, err) = run_cli(&[
        "generate", "--model", m.to_str().unwrap(), "--prompt", "a dog", "--max-token-length", "100", "--out", out.to_str().unwrap(),
    ]);
    assert_clear_error(code, &err, "--max-token-length 100 must be 75, 150 or 225");
    // 90 words: 90 tokens, of which the text encoder reads 75 (diffusers warns the same way).
    let long = vec!["dog"; 90].join(" ");
    let generate = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", m.to_str().unwrap(), "--prompt", &long, "--steps", "1", "--device", "cpu"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        run_cli(&args)
    };
    let (code, _, err) = generate(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: --prompt has 90 tokens and the text encoder reads 75: the rest is cut"), "{err}");
    let (code, _, err) = generate(&["--max-token-length", "150"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn attach_to_a_folder_that_is_no_run_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run_cli(&["attach", dir.path().to_str().unwrap()]);
    assert_clear_error(code, &err, "is not a run directory (it has no config.yaml)");
    assert_eq!(code, 2);
}
