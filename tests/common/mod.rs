//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use tch::Tensor;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// A reference file of tensors made by make_fixtures.py.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("reference").join(format!("{name}.safetensors"));
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double)).abs().max().double_value(&[])
}

/// Runs the built binary; returns (exit status, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(args)
        .env("OMP_NUM_THREADS", "2")
        .output()
        .expect("the dreambooth binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The request every tiny-SDXL reference image was drawn with
/// (make_sdxl_fixtures.py): prompt, negative, 8 steps, guidance 5, 48×32.
pub fn sdxl_request(sampler: &str, seed: u64) -> dreambooth::pipeline::SampleRequest {
    dreambooth::pipeline::SampleRequest {
        prompt: "a photo of sks dog".into(),
        negative: "blurry".into(),
        seed,
        steps: 8,
        sampler: sampler.into(),
        guidance: 5.0,
        width: 48,
        height: 32,
        clip_skip: 1,
    }
}

/// Asserts `got` is within `tol` of `want` everywhere.
pub fn close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let d = max_abs_diff(got, want);
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}
