//! 8-bit AdamW: bitsandbytes' dynamic map and kernel (fixture from
//! tests/fixtures/make_adam8_fixtures.py), quantisation error bounds, closeness
//! to fp32 AdamW on a least-squares problem, state size, and exact resume.

mod common;

use std::collections::HashMap;

use dreambooth::config::schema::Optimizer as OptimizerKind;
use dreambooth::train::adamw::AdamWConfig;
use dreambooth::train::adamw8bit::{
    create_dynamic_map, dequantize_blockwise, quantize_blockwise, AdamW8bit, QuantMap, BLOCK_SIZE,
};
use dreambooth::train::optimizer::Optimizer;
use tch::{Device, Kind, Tensor};

/// The tensors here are tiny: one thread avoids OpenMP spinning on a busy machine.
fn cpu() -> (Kind, Device) {
    tch::set_num_threads(1);
    (Kind::Float, Device::Cpu)
}

#[test]
fn dynamic_maps_equal_the_bitsandbytes_formula() {
    let reference = common::reference("adam8");
    for (signed, name) in [(true, "dynamic_map.signed"), (false, "dynamic_map.unsigned")] {
        let want = Vec::<f32>::try_from(&reference[name]).unwrap();
        let got = create_dynamic_map(signed);
        assert_eq!(got.len(), 256);
        let want_bits: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
        let got_bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got_bits, want_bits, "{name} differs");
    }
}

/// Sets `param.grad()` to exactly `grad` (the gradient of `sum(param * grad)`).
fn set_grad(param: &Tensor, grad: &Tensor) {
    let mut p = param.shallow_clone();
    p.zero_grad();
    (param * grad).sum(Kind::Float).backward();
}

/// Three steps of the reference kernel on `device`; returns how many codes differ.
fn check_reference_steps(device: Device) -> i64 {
    let r = common::reference("adam8");
    let param = r["step.param0"].to_device(device).set_requires_grad(true);
    let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 };
    let mut opt = AdamW8bit::new(vec![("w".into(), param.shallow_clone())], config);
    for step in 1..=3 {
        set_grad(&param, &r[&format!("step.grad{step}")].to_device(device));
        opt.step(1e-3);
        let diff = common::max_abs_diff(&param.to_device(Device::Cpu), &r[&format!("step.param{step}")]);
        assert!(diff <= 1e-6, "{device:?} step {step}: parameters differ by {diff}");
    }
    let state: HashMap<String, Tensor> =
        opt.state_tensors().into_iter().map(|(k, t)| (k, t.to_device(Device::Cpu))).collect();
    let mut differing = 0;
    for name in ["exp_avg_q8", "exp_avg_sq_q8"] {
        let got = &state[&format!("{name}.w")];
        assert_eq!(got.kind(), Kind::Uint8);
        differing += got.ne_tensor(&r[&format!("step.{name}")]).sum(Kind::Int64).int64_value(&[]);
    }
    for name in ["exp_avg_absmax", "exp_avg_sq_absmax"] {
        let diff = common::max_abs_diff(&state[&format!("{name}.w")], &r[&format!("step.{name}")]);
        assert!(diff <= 1e-9, "{device:?}: {name} differs by {diff}");
    }
    differing
}

#[test]
fn three_steps_match_the_reference_kernel() {
    cpu();
    assert_eq!(check_reference_steps(Device::Cpu), 0, "codes differ from the reference");
}

/// The same on a GPU (skipped without one). GPU float rounding may move a value
/// that sits on a midpoint to the neighbouring code: allow a handful.
#[test]
fn three_steps_match_the_reference_kernel_on_cuda() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: skipped");
        return;
    }
    let differing = check_reference_steps(Device::Cuda(0));
    eprintln!("CUDA: {differing} of {} codes differ from the reference", 2 * REFERENCE_NUMEL);
    assert!(differing <= 8, "{differing} codes differ on CUDA");
}

/// Elements of the fixture's parameter (17 whole blocks and a partial one).
const REFERENCE_NUMEL: i64 = 17 * BLOCK_SIZE + 44;

/// Step time and state size, fp32 AdamW vs 8-bit: at SD 1.5 UNet scale (86
/// tensors of 10 M elements ≈ 860 M parameters) on a GPU, or 10 tensors of 1 M
/// on the CPU. Run by hand: `cargo test --release --test adamw8bit -- --ignored`.
#[test]
#[ignore = "a timing, not a check (a GPU needs ~20 GB free)"]
fn step_time() {
    let (device, tensors, numel) =
        if tch::Cuda::is_available() { (Device::Cuda(0), 86, 10_000_000) } else { (Device::Cpu, 10, 1_000_000) };
    let sync = || {
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
    };
    let make = || -> Vec<(String, Tensor)> {
        tch::manual_seed(0);
        (0..tensors)
            .map(|i| {
                let p = Tensor::randn([numel], (Kind::Float, device)).set_requires_grad(true);
                (&p * 1.0).sum(Kind::Float).backward();
                (format!("p{i}"), p)
            })
            .collect()
    };
    let total = (tensors * numel) as f64;
    for kind in [OptimizerKind::Adamw, OptimizerKind::Adamw8bit] {
        let mut opt = Optimizer::new(kind, make(), config());
        for _ in 0..2 {
            opt.step(1e-5);
        }
        sync();
        let start = std::time::Instant::now();
        let steps = 5;
        for _ in 0..steps {
            opt.step(1e-5);
        }
        sync();
        let ms = start.elapsed().as_secs_f64() * 1000.0 / steps as f64;
        let bytes = opt.state_bytes();
        eprintln!(
            "{device:?} {kind:?}: {ms:.1} ms per step over {:.0} M parameters; state {:.3} GB ({:.3} B/param)",
            total / 1e6,
            bytes as f64 / 1e9,
            bytes as f64 / total
        );
    }
}

#[test]
fn quantize_dequantize_error_is_bounded() {
    tch::manual_seed(1);
    // Values over five decades, so every part of the map is used; one block all zero.
    let n = 40 * BLOCK_SIZE + 17;
    let magnitude = Tensor::rand([n], cpu()) * -5.0;
    let x = Tensor::randn([n], cpu()) * Tensor::from(10.0f32).pow(&magnitude);
    let _ = x.narrow(0, BLOCK_SIZE, BLOCK_SIZE).zero_();
    for (signed, input, bound) in [(true, x.shallow_clone(), 0.00704), (false, x.abs(), 0.00352)] {
        let map = QuantMap::new(signed, Device::Cpu);
        let (codes, absmax) = quantize_blockwise(&input, &map);
        assert_eq!(codes.kind(), Kind::Uint8);
        assert_eq!(codes.size(), [n]);
        assert_eq!(absmax.size(), [41]);
        let back = dequantize_blockwise(&codes, &absmax, &map);
        let err = (&back - &input).abs();
        let padded = err.constant_pad_nd([0, 41 * BLOCK_SIZE - n]).reshape([41, BLOCK_SIZE]);
        let relative_to_block = padded.amax([1], false) / absmax.clamp_min(1e-30);
        let worst = relative_to_block.max().double_value(&[]);
        assert!(worst <= bound, "signed={signed}: error {worst} of the block's absmax exceeds {bound}");
        // The zero block comes back as zeros, and no value changes sign.
        assert_eq!(back.narrow(0, BLOCK_SIZE, BLOCK_SIZE).abs().sum(Kind::Float).double_value(&[]), 0.0);
        let sign_flips = (back.signbit().ne_tensor(&input.signbit()).logical_and(&input.ne(0.0)))
            .sum(Kind::Int64)
            .int64_value(&[]);
        assert_eq!(sign_flips, 0);
        // Elements at least a tenth of their block's absmax are stored to within 7 %.
        let blocks_in = input.abs().constant_pad_nd([0, 41 * BLOCK_SIZE - n]).reshape([41, BLOCK_SIZE]);
        let big = blocks_in.ge_tensor(&(absmax.unsqueeze(1) * 0.1)).logical_and(&blocks_in.gt(0.0));
        let rel = (&padded / blocks_in.clamp_min(1e-30)).masked_select(&big).max().double_value(&[]);
        assert!(rel < 0.07, "signed={signed}: relative error {rel} on large elements");
    }
}

/// A least-squares problem: rows of X map to Y through W (64×96, quantised
/// state) and b (64, fp32 state).
struct Problem {
    x: Tensor,
    y: Tensor,
}

impl Problem {
    fn new() -> Problem {
        tch::manual_seed(7);
        let x = Tensor::randn([256, 96], cpu());
        let w = Tensor::randn([64, 96], cpu()) * 0.5;
        let b = Tensor::randn([64], cpu());
        let y = x.matmul(&w.tr()) + b + Tensor::randn([256, 64], cpu()) * 0.1;
        Problem { x, y }
    }

    fn loss(&self, w: &Tensor, b: &Tensor) -> Tensor {
        (self.x.matmul(&w.tr()) + b - &self.y).square().mean(Kind::Float)
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        tch::manual_seed(3);
        vec![
            ("w".into(), (Tensor::randn([64, 96], cpu()) * 0.1).set_requires_grad(true)),
            ("b".into(), Tensor::zeros([64], cpu()).set_requires_grad(true)),
        ]
    }

    /// Runs `steps` steps at learning rate `lr` decaying linearly to 0 over
    /// `decay_steps` (0: constant); returns the loss before each step and W after each.
    fn train(&self, opt: &mut Optimizer, steps: usize, lr: f64) -> (Vec<f64>, Vec<Tensor>) {
        self.train_decaying(opt, steps, lr, 0)
    }

    fn train_decaying(&self, opt: &mut Optimizer, steps: usize, lr: f64, decay_steps: usize) -> (Vec<f64>, Vec<Tensor>) {
        let (w, b) = (opt.params()[0].1.shallow_clone(), opt.params()[1].1.shallow_clone());
        let mut losses = Vec::new();
        let mut ws = Vec::new();
        for step in 0..steps {
            opt.zero_grad();
            let loss = self.loss(&w, &b);
            losses.push(loss.double_value(&[]));
            loss.backward();
            let factor = if decay_steps == 0 { 1.0 } else { 1.0 - step as f64 / decay_steps as f64 };
            opt.step(lr * factor);
            ws.push(w.detach().copy());
        }
        (losses, ws)
    }
}

fn config() -> AdamWConfig {
    AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
}

#[test]
fn tracks_fp32_adamw_on_least_squares() {
    let problem = Problem::new();
    let w0 = problem.params()[0].1.detach().copy();
    let mut fp32 = Optimizer::new(OptimizerKind::Adamw, problem.params(), config());
    let mut int8 = Optimizer::new(OptimizerKind::Adamw8bit, problem.params(), config());
    let (steps, lr) = (300, 3e-2);
    // A linearly decaying LR as in training, so both settle instead of
    // hovering at their (different) noise levels.
    let (loss32, w32) = problem.train_decaying(&mut fp32, steps, lr, steps);
    let (loss8, w8) = problem.train_decaying(&mut int8, steps, lr, steps);
    let final32 = problem.loss(&fp32.params()[0].1, &fp32.params()[1].1).double_value(&[]);
    let final8 = problem.loss(&int8.params()[0].1, &int8.params()[1].1).double_value(&[]);
    assert!(final32 < loss32[0] * 0.05, "fp32 AdamW did not learn: {} -> {final32}", loss32[0]);
    let loss_gap = (final8 - final32).abs() / final32;
    // Trajectory: distance between the two W, relative to how far fp32 W moved.
    let mut worst = 0.0f64;
    for (a, b) in w32.iter().zip(&w8) {
        let moved = (a - &w0).norm().double_value(&[]);
        worst = worst.max((a - b).norm().double_value(&[]) / moved);
    }
    eprintln!(
        "least squares, {steps} steps: loss {:.5} -> fp32 {final32:.6}, 8-bit {final8:.6} (gap {:.3} %); \
         worst trajectory gap {:.3} % of the distance moved; loss at step 50: {:.5} vs {:.5}",
        loss32[0],
        loss_gap * 100.0,
        worst * 100.0,
        loss32[50],
        loss8[50]
    );
    assert!(loss_gap < 0.03, "final loss differs by {:.2} %", loss_gap * 100.0);
    assert!(worst < 0.05, "W trajectories drift apart by {:.2} %", worst * 100.0);
}

#[test]
fn state_bytes_are_about_two_per_parameter() {
    let problem = Problem::new();
    let mut fp32 = Optimizer::new(OptimizerKind::Adamw, problem.params(), config());
    let mut int8 = Optimizer::new(OptimizerKind::Adamw8bit, problem.params(), config());
    assert_eq!(int8.state_bytes(), 0, "state is allocated at the first step");
    problem.train(&mut fp32, 1, 1e-2);
    problem.train(&mut int8, 1, 1e-2);
    let (w_numel, b_numel) = (64 * 96u64, 64u64);
    assert_eq!(fp32.state_bytes(), 8 * (w_numel + b_numel));
    // W: two uint8 codes per element + two fp32 scales per 256-element block;
    // b is under 4096 elements and keeps fp32 moments, as bitsandbytes does.
    let blocks = w_numel.div_ceil(256);
    assert_eq!(int8.state_bytes(), 2 * w_numel + 2 * 4 * blocks + 8 * b_numel);
    let per_param_w = (2 * w_numel + 2 * 4 * blocks) as f64 / w_numel as f64;
    assert!((per_param_w - 2.03125).abs() < 1e-9, "{per_param_w} bytes per parameter");
    for (kind, opt) in [(OptimizerKind::Adamw, &fp32), (OptimizerKind::Adamw8bit, &int8)] {
        let estimate = Optimizer::state_bytes_for(kind, w_numel as i64) + Optimizer::state_bytes_for(kind, b_numel as i64);
        assert_eq!(estimate, opt.state_bytes(), "{kind:?}: estimate differs from the measured bytes");
    }
    eprintln!(
        "state bytes: fp32 AdamW {} ({} B/param), 8-bit {} ({per_param_w:.4} B/param for the quantised W)",
        fp32.state_bytes(),
        fp32.state_bytes() / (w_numel + b_numel),
        int8.state_bytes()
    );
}

#[test]
fn state_round_trips_bit_exact_through_a_file() {
    let problem = Problem::new();
    let dir = tempfile::tempdir().unwrap();
    for kind in [OptimizerKind::Adamw, OptimizerKind::Adamw8bit] {
        let mut straight = Optimizer::new(kind, problem.params(), config());
        problem.train(&mut straight, 5, 1e-2);
        let path = dir.path().join(format!("{kind:?}.safetensors"));
        Tensor::write_safetensors(&straight.state_tensors(), &path).unwrap();
        // A second optimizer resumes from the file, on copies of the weights.
        let copies: Vec<(String, Tensor)> = straight
            .params()
            .iter()
            .map(|(k, p)| (k.clone(), p.detach().copy().set_requires_grad(true)))
            .collect();
        let mut resumed = Optimizer::new(kind, copies, config());
        let state: HashMap<String, Tensor> = Tensor::read_safetensors(&path).unwrap().into_iter().collect();
        resumed.load_state(&state, straight.step_count()).unwrap();
        let reloaded: HashMap<String, Tensor> = resumed.state_tensors().into_iter().collect();
        for (name, t) in straight.state_tensors() {
            assert!(t.equal(&reloaded[&name]), "{kind:?}: `{name}` changed on the way through the file");
        }
        problem.train(&mut straight, 5, 1e-2);
        problem.train(&mut resumed, 5, 1e-2);
        for ((key, a), (_, b)) in straight.params().iter().zip(resumed.params()) {
            assert!(a.equal(b), "{kind:?}: `{key}` differs after resuming");
        }
    }
}

#[test]
fn load_state_refuses_the_other_optimizers_state() {
    let problem = Problem::new();
    let mut fp32 = Optimizer::new(OptimizerKind::Adamw, problem.params(), config());
    problem.train(&mut fp32, 1, 1e-2);
    let state: HashMap<String, Tensor> = fp32.state_tensors().into_iter().collect();
    let mut int8 = Optimizer::new(OptimizerKind::Adamw8bit, problem.params(), config());
    let err = int8.load_state(&state, 1).unwrap_err().to_string();
    assert!(err.contains("`w`") && err.contains("other optimizer"), "{err}");
}

/// Grouped updates (parameters packed into flat buffers) give exactly the
/// numbers of one update per parameter: mixed sizes (partial blocks, tensors
/// under the 8-bit threshold), several groups, and a step where only some
/// parameters have gradients.
#[test]
fn grouped_updates_equal_per_parameter_updates_bit_for_bit() {
    let shapes: [&[i64]; 6] = [&[64, 96], &[64], &[17, 300], &[5000], &[3, 3, 40, 40], &[12]];
    // Drawn once (the global generator is shared with tests running alongside).
    let initial: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, cpu()) * 0.1).collect();
    let make = || -> Vec<(String, Tensor)> {
        initial.iter().enumerate().map(|(i, t)| (format!("p{i}"), t.copy().set_requires_grad(true))).collect()
    };
    let grouped = AdamW8bit::new(make(), config()).with_group_numel(16_384);
    let single = AdamW8bit::new(make(), config()).with_group_numel(1);
    let mut opts = [grouped, single];
    for step in 0..6u32 {
        let grads: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, cpu()) * 1e-2).collect();
        for opt in &mut opts {
            for (i, ((_, p), g)) in opt.params().iter().zip(&grads).enumerate() {
                let mut p = p.shallow_clone();
                p.zero_grad();
                // Step 3: parameters 1 and 2 get no gradient (their groups take the per-member path).
                if step == 3 && (i == 1 || i == 2) {
                    dreambooth::rng::set_grad_to_none(&p);
                    continue;
                }
                (&p * g).sum(Kind::Float).backward();
            }
            opt.step(1e-2);
        }
    }
    let [grouped, single] = &opts;
    for ((key, a), (_, b)) in grouped.params().iter().zip(single.params()) {
        assert!(a.equal(b), "`{key}` differs between grouped and per-parameter updates");
    }
    let state: HashMap<String, Tensor> = single.state_tensors().into_iter().collect();
    let grouped_state = grouped.state_tensors();
    assert_eq!(grouped_state.len(), state.len());
    for (name, t) in &grouped_state {
        assert!(t.equal(&state[name]), "state `{name}` differs");
    }
    // The grouped state (views into flat buffers) goes through a file and back
    // into a grouped optimizer unchanged.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    Tensor::write_safetensors(&grouped_state, &path).unwrap();
    let read: HashMap<String, Tensor> = Tensor::read_safetensors(&path).unwrap().into_iter().collect();
    let mut reloaded = AdamW8bit::new(make(), config()).with_group_numel(16_384);
    reloaded.load_state(&read, grouped.step).unwrap();
    let again: HashMap<String, Tensor> = reloaded.state_tensors().into_iter().collect();
    assert_eq!(again.len(), grouped_state.len());
    for (name, t) in &grouped_state {
        assert!(t.equal(&again[name]), "state `{name}` changed through the file");
    }
}

/// Per-parameter learning rates (how the text encoder gets its own rate) give
/// exactly what separate optimizers at those rates give: fp32 AdamW, and 8-bit
/// AdamW with its parameters packed into groups.
#[test]
fn per_parameter_learning_rates_equal_separate_optimizers() {
    let shapes: [&[i64]; 5] = [&[64, 96], &[64], &[17, 300], &[12], &[5000]];
    let scales = [1.0, 0.25, 0.25, 1.0, 0.25];
    let lr = 1e-2;
    let initial: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, cpu()) * 0.1).collect();
    let make = |keep: &dyn Fn(f64) -> bool| -> Vec<(String, Tensor)> {
        initial
            .iter()
            .zip(scales)
            .enumerate()
            .filter(|(_, (_, s))| keep(*s))
            .map(|(i, (t, _))| (format!("p{i}"), t.copy().set_requires_grad(true)))
            .collect()
    };
    let eight_bit = |params| Optimizer::AdamW8bit(AdamW8bit::new(params, config()).with_group_numel(16_384));
    let fp32 = |params| Optimizer::new(OptimizerKind::Adamw, params, config());
    let kinds: [&dyn Fn(Vec<(String, Tensor)>) -> Optimizer; 2] = [&fp32, &eight_bit];
    for build in kinds {
        let mut mixed = build(make(&|_| true)).with_lr_scales(scales.to_vec());
        let mut fast = build(make(&|s| s == 1.0));
        let mut slow = build(make(&|s| s != 1.0));
        for _ in 0..4 {
            let grads: HashMap<String, Tensor> =
                shapes.iter().enumerate().map(|(i, s)| (format!("p{i}"), Tensor::randn(*s, cpu()) * 1e-2)).collect();
            for opt in [&mut mixed, &mut fast, &mut slow] {
                for (key, p) in opt.params() {
                    let mut p = p.shallow_clone();
                    p.zero_grad();
                    (&p * &grads[key]).sum(Kind::Float).backward();
                }
            }
            mixed.step(lr);
            fast.step(lr);
            slow.step(lr * 0.25);
        }
        let apart: HashMap<&str, &Tensor> =
            fast.params().iter().chain(slow.params()).map(|(k, t)| (k.as_str(), t)).collect();
        for (key, t) in mixed.params() {
            assert!(t.equal(apart[key.as_str()]), "{:?}: `{key}` differs from its own optimizer's", mixed.kind());
        }
    }
}
