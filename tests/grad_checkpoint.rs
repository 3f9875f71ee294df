//! Gradient checkpointing: the gradients of a loss w.r.t. every UNet and text-encoder
//! parameter equal the plain ones, for full fine-tuning and for LoRA on a frozen
//! base; the blocks really are recomputed; peak memory of a forward + backward
//! pass on a bigger random model is lower (measured in child processes).

mod common;

use dreambooth::model::unet::Conditioning;
use std::collections::HashMap;

use common::{model, reference};
use dreambooth::checkpoint::load_model;
use dreambooth::model::attention::AttentionBackend;
use dreambooth::model::checkpointing::block_runs;
use dreambooth::model::clip::ClipTextTransformer;
use dreambooth::model::config::{ClipConfig, PerBlock, UNetConfig};
use dreambooth::model::lora::{self, LoraSpec, LoraTargets};
use dreambooth::model::unet::UNet2DConditionModel;
use dreambooth::model::weights::Weights;
use dreambooth::config::schema::MixedPrecision;
use dreambooth::rng::CpuRng;
use dreambooth::train::precision::Precision;
use tch::{Device, Kind, Tensor};

struct Models {
    unet: UNet2DConditionModel,
    clip: ClipTextTransformer,
    /// Everything that trains, by name.
    params: Vec<(String, Tensor)>,
}

/// tiny-sd1's UNet and text encoder; all weights train, or (`lora`) only
/// attention adapters with non-zero `up` on a frozen base.
fn tiny(lora: bool) -> Models {
    let m = load_model(&model("tiny-sd1"), None).unwrap();
    let uw = Weights::new("UNet", m.unet, Device::Cpu, Kind::Float);
    let mut unet = UNet2DConditionModel::new(&uw, &m.unet_config, AttentionBackend::Default).unwrap();
    let text = m.text_encoders.into_iter().next().unwrap();
    let cw = Weights::new("text encoder", text.tensors, Device::Cpu, Kind::Float);
    let mut clip = ClipTextTransformer::new(&cw, &text.config, false).unwrap();
    let mut params: Vec<(String, Tensor)> = Vec::new();
    if lora {
        let mut rng = CpuRng::new(9);
        let spec = LoraSpec { rank: 2, alpha: 2.0, targets: LoraTargets::ATTENTION, kind: Kind::Float };
        let mut net = lora::attach_unet_lora(&mut unet, &m.architecture, &spec, &mut rng).unwrap();
        net.extend(lora::attach_text_lora(&mut clip, "lora_te_", &spec, &mut rng).unwrap());
        let _g = tch::no_grad_guard();
        for m in &net.modules {
            m.up.shallow_clone().copy_(&(rng.randn(&m.up.size()) * 0.1));
        }
        params = net.trainable();
    } else {
        for (k, t) in uw.parameters().into_iter().chain(cw.parameters().into_iter().map(|(k, t)| (format!("te.{k}"), t))) {
            params.push((k, t.set_requires_grad(true)));
        }
    }
    Models { unet, clip, params }
}

/// One training-like step: text encoder → UNet → MSE against a target; gradients by name.
fn grads(checkpointing: bool, lora: bool) -> (HashMap<String, Tensor>, usize) {
    grads_with(checkpointing, lora, MixedPrecision::No)
}

/// `grads` with the forward pass under the trainer's autocast for `precision`.
fn grads_with(checkpointing: bool, lora: bool, precision: MixedPrecision) -> (HashMap<String, Tensor>, usize) {
    let mut m = tiny(lora);
    m.unet.set_gradient_checkpointing(checkpointing);
    m.clip.set_gradient_checkpointing(checkpointing);
    let r = reference("tiny-sd1");
    let before = block_runs();
    let autocast = Precision::new(precision, Device::Cpu);
    let out = autocast.autocast(|| {
        let context = m.clip.forward(&r["text.ids"], 1);
        m.unet.forward(&r["unet.sample"], &r["unet.timestep"], &Conditioning::text(context.shallow_clone()))
    });
    let target = r["unet.sample"].shallow_clone();
    (out.to_kind(Kind::Float) - target).square().mean(Kind::Float).backward();
    let runs = block_runs() - before;
    (m.params.iter().map(|(k, t)| (k.clone(), t.grad().copy())).collect(), runs)
}

fn compare(lora: bool) {
    let (plain, plain_runs) = grads(false, lora);
    let (ckpt, ckpt_runs) = grads(true, lora);
    assert_eq!(plain_runs, 0);
    // tiny-sd1: 12 resnets + 6 transformers in the UNet, 3 CLIP layers; each runs
    // once forward and once more in the backward pass. Under LoRA the first resnet
    // has nothing to differentiate (frozen weights, inputs from frozen layers) and
    // runs plainly.
    let blocks = if lora { 12 + 6 + 3 - 1 } else { 12 + 6 + 3 };
    assert_eq!(ckpt_runs, 2 * blocks, "checkpointed block runs");
    let mut worst = 0.0f64;
    for (k, g) in &plain {
        assert!(g.defined(), "{k} got no gradient without checkpointing");
        let h = &ckpt[k];
        assert!(h.defined(), "{k} got no gradient with checkpointing");
        let d = (g - h).abs().max().double_value(&[]);
        worst = worst.max(d);
        assert!(d <= 1e-6, "{k}: gradients differ by {d}");
    }
    eprintln!("{} parameters, largest gradient difference {worst:.1e}", plain.len());
}

#[test]
fn checkpointed_gradients_equal_plain_ones() {
    compare(false);
}

#[test]
fn checkpointed_lora_gradients_equal_plain_ones_on_a_frozen_base() {
    compare(true);
}

/// ‖a − b‖ / ‖b‖ over every tensor together.
fn relative_l2(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    let (mut diff, mut norm) = (0.0, 0.0);
    for (k, g) in b {
        diff += (&a[k] - g).square().sum(Kind::Double).double_value(&[]);
        norm += g.square().sum(Kind::Double).double_value(&[]);
    }
    (diff / norm).sqrt()
}

/// Under bf16 autocast the recomputation casts the weights again (autocast's
/// cache is off there, so the copies do not pile up for the whole backward
/// pass). The gradients are not bit-equal to the plain bf16 ones (the forward
/// pass runs its blocks without autograd, where libtorch may take other bf16
/// kernels, and bf16 rounds the difference up), but checkpointing must add far
/// less error than bf16 itself does against float32.
#[test]
fn checkpointed_bf16_autocast_gradients_stay_within_bf16_noise() {
    let (fp32, _) = grads_with(false, false, MixedPrecision::No);
    let (plain, _) = grads_with(false, false, MixedPrecision::Bf16);
    let (ckpt, runs) = grads_with(true, false, MixedPrecision::Bf16);
    assert_eq!(runs, 2 * (12 + 6 + 3));
    let bf16_error = relative_l2(&plain, &fp32);
    let checkpointing_error = relative_l2(&ckpt, &plain);
    eprintln!("bf16 autocast: gradients {bf16_error:.2e} from float32; checkpointed {checkpointing_error:.2e} from plain bf16");
    assert!(checkpointing_error < 0.5 * bf16_error, "checkpointing adds {checkpointing_error:.2e}, bf16 itself {bf16_error:.2e}");
}

#[test]
fn no_recomputation_without_gradients() {
    let mut m = tiny(false);
    m.unet.set_gradient_checkpointing(true);
    let r = reference("tiny-sd1");
    let before = block_runs();
    let _g = tch::no_grad_guard();
    let _ = m.unet.forward(&r["unet.sample"], &r["unet.timestep"], &Conditioning::text(r["unet.encoder_hidden_states"].shallow_clone()));
    assert_eq!(block_runs(), before, "sampling must take the plain path");
}

// ---- memory ------------------------------------------------------------------------

/// A UNet shaped like SD 1.5's (4 levels, 2 layers each, 16 transformers, 22 resnets)
/// at a tenth of its width with 2 heads, and a 4-layer CLIP; random weights (memory
/// does not depend on values).
fn medium() -> (UNet2DConditionModel, ClipTextTransformer, Vec<Tensor>) {
    let ucfg = UNetConfig {
        block_out_channels: vec![32, 64, 128, 128],
        cross_attention_dim: PerBlock::One(128),
        attention_head_dim: PerBlock::One(2),
        ..UNetConfig::sd_v1_5()
    };
    let ccfg = ClipConfig {
        vocab_size: 1000,
        hidden_size: 128,
        intermediate_size: 512,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        ..ClipConfig::sd_v1()
    };
    let uw = Weights::random("UNet", 1, Device::Cpu, Kind::Float);
    let unet = UNet2DConditionModel::new(&uw, &ucfg, AttentionBackend::Default).unwrap();
    let cw = Weights::random("text encoder", 2, Device::Cpu, Kind::Float);
    let clip = ClipTextTransformer::new(&cw, &ccfg, false).unwrap();
    let params = uw.parameters().into_iter().chain(cw.parameters()).map(|(_, t)| t.set_requires_grad(true)).collect();
    (unet, clip, params)
}

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Run by `checkpointing_lowers_peak_memory` in a child process: one forward +
/// backward pass at 32×32 latents (256 px), batch 1; prints the peak RSS above the RSS
/// before the pass.
#[test]
#[ignore = "run in a child process by checkpointing_lowers_peak_memory"]
fn memory_child() {
    let on = std::env::var("DBT_CKPT").map(|v| v == "on").unwrap_or(false);
    let (mut unet, mut clip, params) = medium();
    unet.set_gradient_checkpointing(on);
    clip.set_gradient_checkpointing(on);
    let mut rng = CpuRng::new(0);
    let sample = rng.randn(&[1, 4, 32, 32]);
    let ids = rng.randint(0, 1000, &[1, 77]);
    let t = Tensor::from_slice(&[500i64]);
    // Reset the high-water mark to the current RSS (Linux: clear_refs 5).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let base = status_kb("VmRSS:");
    let start = std::time::Instant::now();
    let context = clip.forward(&ids, 1);
    let out = unet.forward(&sample, &t, &Conditioning::text(context.shallow_clone()));
    (out - &sample).square().mean(Kind::Float).backward();
    let peak = status_kb("VmHWM:");
    let grads_kb: i64 = params.iter().map(|p| p.grad().numel() as i64 * 4 / 1024).sum();
    println!(
        "MEASURE checkpointing={on} reset={reset} base_kb={base} peak_above_base_kb={} grads_kb={grads_kb} secs={:.2}",
        peak.saturating_sub(base),
        start.elapsed().as_secs_f64()
    );
}

/// (peak above the model, gradient bytes) in KiB, and the child's line.
fn measure(on: bool) -> (u64, u64, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["memory_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("DBT_CKPT", if on { "on" } else { "off" })
        .env("OMP_NUM_THREADS", "2")
        // Every block of 64 KiB or more gets its own mmap, returned on free: the
        // resident-set peak then follows the live tensors instead of whatever glibc's
        // heap happened to keep (which made the figure vary with CPU load).
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = stdout.lines().find_map(|l| l.find("MEASURE").map(|i| &l[i..])).unwrap_or_else(|| {
        panic!("child failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    });
    let field = |name: &str| -> u64 {
        line.split_whitespace().find_map(|f| f.strip_prefix(name)).unwrap().parse().unwrap()
    };
    (field("peak_above_base_kb="), field("grads_kb="), line.to_string())
}

/// The gradients themselves (the same either way) are taken off the peak; what is
/// left is activation memory, which checkpointing cuts.
#[test]
fn checkpointing_lowers_peak_memory() {
    let (plain, grads, plain_line) = measure(false);
    let (ckpt, _, ckpt_line) = measure(true);
    eprintln!("{plain_line}\n{ckpt_line}");
    let (plain_act, ckpt_act) = (plain.saturating_sub(grads), ckpt.saturating_sub(grads));
    eprintln!(
        "peak above the model: {} MiB plain, {} MiB checkpointed; without the {} MiB of gradients: {} vs {} MiB",
        plain / 1024,
        ckpt / 1024,
        grads / 1024,
        plain_act / 1024,
        ckpt_act / 1024
    );
    assert!(ckpt_act * 10 < plain_act * 8, "checkpointing should cut activation memory by over 20% ({ckpt_act} vs {plain_act} KiB)");
}
