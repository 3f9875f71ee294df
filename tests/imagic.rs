//! Imagic on the tiny SD 1 fixture model at 32×32: stage (a) lowers the
//! reconstruction loss and moves the embedding, stage (b) lowers it further by
//! changing the UNet, interpolation, determinism, exact resume and the
//! embeddings file. Learning rates are larger than at full scale (random tiny
//! model, few steps).

mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;

use dreambooth::checkpoint::load_model;
use dreambooth::config::schema::Optimizer as OptimizerKind;
use dreambooth::model::attention::AttentionBackend;
use dreambooth::model::unet::UNet2DConditionModel;
use dreambooth::model::weights::Weights;
use dreambooth::pipeline::StableDiffusion;
use dreambooth::rng::CpuRng;
use dreambooth::scheduler::NoiseSchedule;
use dreambooth::train::adamw::AdamWConfig;
use dreambooth::train::imagic::{self, Denoiser, EmbeddingOptimization, Stage};
use dreambooth::train::optimizer::Optimizer;
use tch::{Device, Kind, Tensor};

const PROMPT: &str = "a photo of a red cat";

/// The tiny model: the pipeline (text encoder, VAE) and a separately built UNet
/// whose parameters we hold (the pipeline keeps none).
struct Setup {
    sd: StableDiffusion,
    unet: UNet2DConditionModel,
    unet_params: Vec<(String, Tensor)>,
    schedule: NoiseSchedule,
    latents: Tensor,
    target: Tensor,
}

fn setup() -> Setup {
    // Tiny tensors: one thread avoids OpenMP spinning on a busy machine.
    tch::set_num_threads(1);
    let path = common::model("tiny-sd1");
    let sd = StableDiffusion::from_loaded(load_model(&path, None).unwrap(), Device::Cpu, Kind::Float, AttentionBackend::Default)
        .unwrap();
    let m = load_model(&path, None).unwrap();
    let w = Weights::new("UNet", m.unet, Device::Cpu, Kind::Float);
    let unet = UNet2DConditionModel::new(&w, &m.unet_config, AttentionBackend::Default).unwrap();
    let unet_params = w.parameters();
    w.release();
    let schedule = NoiseSchedule::new(&sd.scheduler_config).unwrap();
    // A 32×32 picture: a red disc on a blue-to-green gradient, in [-1, 1].
    let ys = Tensor::arange(32, (Kind::Float, Device::Cpu)).view([32, 1]).expand([32, 32], false);
    let xs = Tensor::arange(32, (Kind::Float, Device::Cpu)).view([1, 32]).expand([32, 32], false);
    let disc = ((&xs - 16.0).square() + (&ys - 12.0).square()).lt(64.0).to_kind(Kind::Float);
    let red = &disc * 2.0 - 1.0;
    let green = (1.0 - &disc) * (&xs / 31.0 * 2.0 - 1.0);
    let blue = (1.0 - &disc) * (1.0 - &xs / 31.0 * 2.0);
    let image = Tensor::stack(&[red, green, blue], 0).unsqueeze(0);
    let latents = imagic::encode_latents(&sd.vae, sd.vae_config.scaling_factor, &image, &mut CpuRng::new(5));
    let target = tch::no_grad(|| sd.encode_prompt(PROMPT, 1)).hidden;
    Setup { sd, unet, unet_params, schedule, latents, target }
}

impl Setup {
    fn denoiser(&self) -> Denoiser<'_> {
        Denoiser::new(&self.unet, &self.schedule, &self.sd.scheduler_config).unwrap()
    }

    /// Reconstruction loss on a fixed set of 16 (noise, timestep) draws.
    fn eval_loss(&self, embedding: &Tensor) -> f64 {
        let d = self.denoiser();
        let (noise, timesteps) = d.draw(&self.latents, 16, &mut CpuRng::new(999));
        tch::no_grad(|| d.loss_with(&self.latents, embedding, &noise, &timesteps).double_value(&[]))
    }
}

fn adam(lr_free_weight_decay: f64) -> AdamWConfig {
    AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: lr_free_weight_decay }
}

#[test]
fn stages_a_and_b_lower_the_reconstruction_loss() {
    let s = setup();
    let d = s.denoiser();
    let before = s.eval_loss(&s.target);
    // Full scale: ~500 steps at 1e-3, then the UNet at ~1e-6.
    let (a_steps, a_lr, b_steps, b_lr) = (40, 1e-1, 10, 2e-4);

    // (a) The embedding moves and the frozen UNet reconstructs better.
    let mut seen = Vec::new();
    let mut rng = CpuRng::new(1);
    let optimized = imagic::optimize_embedding(&d, &s.latents, &s.target, a_steps, a_lr, &mut rng, |p| {
        assert_eq!(p.stage, Stage::Embedding);
        seen.push(p.step);
        ControlFlow::Continue(())
    });
    assert_eq!(seen, (1..=a_steps).collect::<Vec<_>>());
    let after_a = s.eval_loss(&optimized);
    let moved = (&optimized - &s.target).abs().max().double_value(&[]);
    for (key, p) in &s.unet_params {
        assert!(!p.requires_grad() && !p.grad().defined(), "stage (a) touched UNet parameter `{key}`");
    }

    // (b) With e_opt fixed, the UNet changes and reconstructs better still.
    let originals: Vec<Tensor> = s.unet_params.iter().map(|(_, p)| p.detach().copy()).collect();
    let mut optimizer = Optimizer::new(OptimizerKind::Adamw, s.unet_params.iter().map(|(k, p)| (k.clone(), p.shallow_clone())).collect(), adam(0.0));
    imagic::fine_tune_unet(&d, &s.latents, &optimized, &mut optimizer, b_steps, b_lr, &mut rng, |p| {
        assert_eq!(p.stage, Stage::UNet);
        ControlFlow::Continue(())
    });
    let after_b = s.eval_loss(&optimized);
    let changed = s.unet_params.iter().zip(&originals).filter(|((_, p), o)| !p.equal(o)).count();
    for (key, p) in &s.unet_params {
        assert!(!p.requires_grad(), "`{key}` still requires grad after stage (b)");
    }
    eprintln!(
        "reconstruction loss: e_tgt {before:.5}, after (a) {after_a:.5} (embedding moved up to {moved:.4}), \
         after (b) {after_b:.5}; {changed} of {} UNet tensors changed",
        s.unet_params.len()
    );
    assert!(moved > 0.1, "the embedding barely moved ({moved})");
    assert!(after_a < before * 0.95, "stage (a) did not lower the loss: {before} -> {after_a}");
    assert!(after_b < after_a * 0.9, "stage (b) did not lower the loss further: {after_a} -> {after_b}");
    assert!(changed * 10 >= s.unet_params.len() * 9, "only {changed} UNet tensors changed");
}

#[test]
fn interpolation_ends_are_exact() {
    tch::manual_seed(2);
    let target = Tensor::randn([1, 77, 64], (Kind::Float, Device::Cpu));
    let optimized = Tensor::randn([1, 77, 64], (Kind::Float, Device::Cpu));
    assert!(imagic::interpolate(&target, &optimized, 1.0).equal(&target));
    assert!(imagic::interpolate(&target, &optimized, 0.0).equal(&optimized));
    let mid = imagic::interpolate(&target, &optimized, 0.7);
    let want = &target * 0.7 + &optimized * 0.3;
    assert!(common::max_abs_diff(&mid, &want) < 1e-6);
}

#[test]
fn a_seed_gives_the_same_embedding_and_resume_is_exact() {
    let s = setup();
    let d = s.denoiser();
    let run = |seed: u64, steps: usize| {
        imagic::optimize_embedding(&d, &s.latents, &s.target, steps, 1e-2, &mut CpuRng::new(seed), |_| {
            ControlFlow::Continue(())
        })
    };
    let first = run(7, 6);
    assert!(first.equal(&run(7, 6)), "same seed, different embedding");
    assert!(!first.equal(&run(8, 6)), "a different seed gave the same embedding");

    // Stop after 3 steps, save state and RNG, resume in a fresh object: same 6-step result.
    let mut rng = CpuRng::new(7);
    let mut stage = EmbeddingOptimization::new(&s.target);
    for _ in 0..3 {
        stage.step(&d, &s.latents, 1e-2, &mut rng);
    }
    let state: HashMap<String, Tensor> = stage.state_tensors().into_iter().collect();
    let rng_state = rng.state();
    let mut resumed = EmbeddingOptimization::load_state(&state, stage.steps_taken()).unwrap();
    let mut rng = CpuRng::new(0);
    rng.set_state(&rng_state).unwrap();
    for _ in 0..3 {
        resumed.step(&d, &s.latents, 1e-2, &mut rng);
    }
    assert!(resumed.optimized().equal(&first), "resumed stage (a) differs from the straight run");
}

#[test]
fn embeddings_file_round_trips() {
    tch::manual_seed(3);
    let target = Tensor::randn([1, 77, 64], (Kind::Float, Device::Cpu));
    let optimized = &target + 0.01;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imagic.safetensors");
    imagic::save_embeddings(&path, &target, &optimized, PROMPT).unwrap();
    let (t, o, prompt) = imagic::load_embeddings(&path).unwrap();
    assert!(t.equal(&target) && o.equal(&optimized));
    assert_eq!(prompt, PROMPT);

    let other = dir.path().join("other.safetensors");
    Tensor::write_safetensors(&[("x", &target)], &other).unwrap();
    let err = imagic::load_embeddings(&other).unwrap_err().to_string();
    assert!(err.contains("other.safetensors") && err.contains("not an Imagic embeddings file"), "{err}");
}
