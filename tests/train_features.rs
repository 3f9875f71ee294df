//! The trainer's optional features end to end on the demo model: 8-bit AdamW,
//! LoRA, gradient checkpointing, Imagic, `generate --model`.

#[path = "train_support/mod.rs"]
mod support;

use std::path::Path;

use dreambooth::train::trainer::Trainer;
use support::*;
use tch::Tensor;

fn final_unet(run: &Path) -> Vec<(String, Tensor)> {
    let (_, dir) = dreambooth::train::checkpoint::find_checkpoint(run, None).unwrap();
    let mut v = Tensor::read_safetensors(dir.join("unet.safetensors")).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_bit_identical(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(b) {
        assert_eq!(ka, kb);
        assert!(ta.equal(tb), "{ka} differs");
    }
}

/// ‖a − b‖ / ‖b − start‖ over all tensors: how far apart two runs end, relative
/// to how far training moved the weights.
fn relative_distance(a: &[(String, Tensor)], b: &[(String, Tensor)], start: &[(String, Tensor)]) -> f64 {
    let (mut diff, mut moved) = (0.0, 0.0);
    for (((_, x), (_, y)), (_, s)) in a.iter().zip(b).zip(start) {
        diff += (x - y).square().sum(tch::Kind::Double).double_value(&[]);
        moved += (y - s).square().sum(tch::Kind::Double).double_value(&[]);
    }
    (diff / moved).sqrt()
}

/// Trains `name` to the end from a fresh run; a second run `name-cut` is
/// checkpointed after one step, loses its next step (kill -9) and resumes.
fn full_and_resumed(root: &Path, name: &str, data: &Path, training: &str) -> (Trainer, std::path::PathBuf) {
    let full = write_config(root, name, data, training);
    let mut t = Trainer::start(load(&full), quiet()).unwrap();
    t.run().unwrap();
    let cut = write_config(root, &format!("{name}-cut"), data, training);
    let mut c = Trainer::start(load(&cut), quiet()).unwrap();
    c.train_step().unwrap();
    c.checkpoint().unwrap();
    c.train_step().unwrap();
    let cut_dir = c.run_dir.clone();
    drop(c);
    let mut c = Trainer::resume(&cut_dir, quiet()).unwrap();
    assert_eq!(c.step, 1);
    c.run().unwrap();
    drop(c);
    (t, cut_dir)
}

#[test]
fn adamw_8bit_trains_resumes_exactly_and_stays_close_to_fp32_adamw() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 1);
    let training = "  steps_per_image: 6\n  learning_rate: 5.0e-4\n";
    let cfg = write_config(root.path(), "fp32", &data, training);
    let mut fp32 = Trainer::start(load(&cfg), quiet()).unwrap();
    let start: Vec<(String, Tensor)> = {
        let mut v: Vec<_> = fp32.params.unet.iter().map(|(k, t)| (k.clone(), t.detach().copy())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let before = eval_loss(&fp32, &data);
    fp32.run().unwrap();
    let fp32_after = eval_loss(&fp32, &data);

    let (q, cut_dir) = full_and_resumed(root.path(), "q8", &data, &format!("{training}  optimizer: adamw_8bit\n"));
    let after = eval_loss(&q, &data);
    eprintln!("denoising loss {before:.4} -> {after:.4} with 8-bit AdamW ({fp32_after:.4} with fp32 AdamW)");
    assert!(after < 0.8 * before, "8-bit AdamW: loss went from {before} to {after}");
    let state = Tensor::read_safetensors(
        dreambooth::train::checkpoint::find_checkpoint(&q.run_dir, None).unwrap().1.join("state.safetensors"),
    )
    .unwrap();
    assert!(state.iter().any(|(_, t)| t.kind() == tch::Kind::Uint8), "no 8-bit moments in the checkpoint");
    assert_bit_identical(&final_unet(&q.run_dir), &final_unet(&cut_dir));
    let distance = relative_distance(&final_unet(&q.run_dir), &final_unet(&fp32.run_dir), &start);
    eprintln!("8-bit vs fp32 AdamW final UNet: ‖Δ‖ / ‖fp32 update‖ = {distance:.4}");
    assert!(distance < 0.25, "8-bit AdamW ended {distance} (relative) away from fp32 AdamW");
}
