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

fn dreambooth(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth")).args(args).env("OMP_NUM_THREADS", "2").output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into())
}

/// `dreambooth generate` with the demo sampling settings, plus `extra` flags, in
/// this process (the CLI's own command function); the image's bytes.
fn generate(model: &Path, out: &Path, extra: &[&str]) -> Vec<u8> {
    use clap::Parser;
    let mut args = vec!["dreambooth", "generate", "--model", model.to_str().unwrap(), "--prompt", "a photo of sks thing", "--seed", "3",
                        "--steps", "3", "--width", "64", "--height", "64", "--device", "cpu", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    dreambooth::cli::run(dreambooth::cli::Cli::try_parse_from(args).unwrap()).unwrap();
    image::open(out).unwrap().to_rgb8().into_raw()
}

/// `dreambooth export` in this process.
fn export(run: &Path, format: &str, out: &Path, step: Option<u64>) {
    dreambooth::train::export::export(run, format, out, step, false).unwrap();
}

fn sorted(v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    let mut v = v;
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn lora_trains_only_adapters_saves_kohya_files_and_resumes_exactly() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 1);
    let training = "  steps_per_image: 3\n  learning_rate: 5.0e-3\n  use_lora: true\n  lora_rank: 2\n  lora_alpha: 2\n  text_encoder_train_ratio: 1.0\n";
    let cfg = write_config(root.path(), "lora-steps", &data, training);
    let mut t = Trainer::start(load(&cfg), quiet()).unwrap();
    let snap = |v: &[(String, Tensor)]| v.iter().map(|(k, t)| (k.clone(), t.detach().copy())).collect::<Vec<_>>();
    let (unet0, text0, adapters0) = (snap(&t.params.unet), snap(&t.params.text_encoder("text_encoder")), snap(t.trainable()));
    assert!(adapters0.iter().any(|(k, _)| k.starts_with("lora_unet_")) && adapters0.iter().any(|(k, _)| k.starts_with("lora_te_")));
    t.train_step().unwrap();
    t.train_step().unwrap();
    assert_bit_identical(&unet0, &snap(&t.params.unet));
    assert_bit_identical(&text0, &snap(&t.params.text_encoder("text_encoder")));
    let moved = adapters0.iter().zip(t.trainable()).filter(|((_, a), (_, b))| !a.equal(b)).count();
    assert!(moved > adapters0.len() / 2, "only {moved} of {} adapter tensors trained", adapters0.len());
    let dir = t.checkpoint().unwrap();
    assert!(dir.join("lora.safetensors").is_file());
    assert!(!dir.join("unet.safetensors").exists() && !dir.join("text_encoder.safetensors").exists());
    let file = Tensor::read_safetensors(dir.join("lora.safetensors")).unwrap();
    assert!(file.iter().any(|(k, _)| k == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"));
    assert!(file.iter().any(|(k, _)| k == "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"));
    drop(t);

    // Resume: the adapters reload exactly.
    let (full, cut_dir) = full_and_resumed(root.path(), "lora", &data, training);
    let lora_of = |run: &Path| {
        let (_, dir) = dreambooth::train::checkpoint::find_checkpoint(run, None).unwrap();
        sorted(Tensor::read_safetensors(dir.join("lora.safetensors")).unwrap())
    };
    assert_bit_identical(&lora_of(&full.run_dir), &lora_of(&cut_dir));

    // The file is a LoRA generate reads, and it changes the image.
    let run = full.run_dir.clone();
    drop(full);
    let exported = root.path().join("out/sks.safetensors");
    export(&run, "lora", &exported, None);
    let base = generate(&demo_model(), &root.path().join("base.png"), &[]);
    let with_lora = generate(&demo_model(), &root.path().join("lora.png"), &["--lora", exported.to_str().unwrap()]);
    assert_ne!(base, with_lora, "the LoRA did not change the image");
    // Merged export = base + LoRA.
    let merged = root.path().join("merged");
    export(&run, "diffusers", &merged, None);
    assert_eq!(generate(&merged, &root.path().join("merged.png"), &[]), with_lora);
    // generate --model RUN_DIR merges the run's LoRA the same way.
    assert_eq!(generate(&run, &root.path().join("run.png"), &[]), with_lora);
}

/// A concept without `sample_prompts` is previewed with its instance prompt as its
/// first image trains on it (`[filewords]` filled in, the instance token put in).
#[test]
fn previews_without_sample_prompts_use_the_instance_prompt() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 2);
    std::fs::write(data.join("img-0.txt"), "a red dog on grass").unwrap();
    let mut c = load(&write_config(root.path(), "no-sample-prompts", &data, "  steps_per_image: 1\n  save_preview_every_n_epochs: 1\n"));
    c.concepts[0].instance_prompt = "a photo of [filewords]".into();
    c.concepts[0].instance_token = "sks".into();
    c.concepts[0].class_token = "dog".into();
    assert!(c.concepts[0].sample_prompts.is_empty());
    let mut t = Trainer::start(c, quiet()).unwrap();
    assert_eq!(t.run().unwrap(), dreambooth::train::trainer::Outcome::Finished);
    let samples = named_events(&t.run_dir, "sample");
    assert_eq!(samples.len(), 1, "{samples:?}");
    assert_eq!(samples[0]["prompts"], serde_json::json!(["a photo of a red sks dog on grass"]));
    assert!(t.run_dir.join("samples/step-000002-0.png").is_file());
}

/// `sample_before_training` draws the previews at step 0 (what the source
/// model makes of the prompt) and leaves training exactly as it was.
#[test]
fn previews_before_training_leave_the_run_unchanged() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 2);
    let training = "  steps_per_image: 1\n  save_preview_every_n_epochs: 1\n";
    let run = |name: &str, before: bool| {
        let mut c = load(&write_config(root.path(), name, &data, training));
        c.concepts[0].sample_prompts = vec!["a photo of sks thing".into()];
        c.training.sample_before_training = before;
        let mut t = Trainer::start(c, quiet()).unwrap();
        assert_eq!(t.run().unwrap(), dreambooth::train::trainer::Outcome::Finished);
        t.run_dir.clone()
    };
    let (plain, before) = (run("plain", false), run("before", true));
    let steps: Vec<u64> = named_events(&before, "sample").iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![0, 2]);
    assert!(before.join("samples/step-000000-0.png").is_file());
    assert!(!plain.join("samples/step-000000-0.png").exists());
    // The source model's image differs from the trained one's.
    let read = |dir: &Path, step: &str| std::fs::read(dir.join(format!("samples/step-{step}-0.png"))).unwrap();
    assert_ne!(read(&before, "000000"), read(&before, "000002"));
    assert_eq!(read(&before, "000002"), read(&plain, "000002"));
    assert_bit_identical(&final_unet(&before), &final_unet(&plain));
}

/// Under mixed precision the networks that never train are stored in the half
/// dtype (diffusers' `weight_dtype`); what trains stays float32.
#[test]
fn frozen_networks_are_stored_in_bf16_under_mixed_precision() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 1);
    // The distinct dtypes of a list of tensors.
    let kinds = |v: &[(String, Tensor)]| {
        let mut k: Vec<String> = v.iter().map(|(_, t)| format!("{:?}", t.kind())).collect();
        k.sort();
        k.dedup();
        k
    };
    let (bf16, fp32) = (vec!["BFloat16".to_string()], vec!["Float".to_string()]);

    // LoRA: base UNet and text encoder in bf16, adapters float32; training and
    // previews run on them.
    let lora = "  steps_per_image: 2\n  learning_rate: 5.0e-3\n  use_lora: true\n  lora_rank: 2\n  mixed_precision: bf16\n  save_preview_every_n_epochs: 2\n";
    let with_previews = |name: &str, training: &str| {
        let mut c = load(&write_config(root.path(), name, &data, training));
        c.concepts[0].sample_prompts = vec!["a photo of sks thing".into()];
        c
    };
    let mut t = Trainer::start(with_previews("lora-bf16", lora), quiet()).unwrap();
    assert_eq!(kinds(&t.params.unet), bf16);
    assert_eq!(kinds(&t.params.text_encoder("text_encoder")), bf16);
    assert_eq!(kinds(&t.params.vae), fp32);
    assert_eq!(kinds(t.trainable()), fp32);
    let adapters0: Vec<Tensor> = t.trainable().iter().map(|(_, p)| p.detach().copy()).collect();
    assert_eq!(t.run().unwrap(), dreambooth::train::trainer::Outcome::Finished);
    let moved = adapters0.iter().zip(t.trainable()).filter(|(a, (_, b))| !a.equal(b)).count();
    assert!(moved > adapters0.len() / 2, "only {moved} of {} adapter tensors trained", adapters0.len());
    assert!(t.run_dir.join("samples/step-000002-0.png").is_file());
    let log = std::fs::read_to_string(t.run_dir.join("train.log")).unwrap();
    assert!(log.contains("the frozen base UNet and text encoder are stored in BFloat16"), "{log}");
    drop(t);

    // Full fine-tune with the text encoder frozen: only the text encoder is bf16.
    let full = "  steps_per_image: 1\n  mixed_precision: bf16\n  save_preview_every_n_epochs: 1\n";
    let mut t = Trainer::start(with_previews("full-bf16", full), quiet()).unwrap();
    assert_eq!(kinds(&t.params.unet), fp32);
    assert_eq!(kinds(&t.params.text_encoder("text_encoder")), bf16);
    t.run().unwrap();
    assert!(t.run_dir.join("samples/step-000001-0.png").is_file());
    drop(t);

    // A text encoder that trains stays float32; so does everything without mixed precision.
    let te = "  steps_per_image: 1\n  mixed_precision: bf16\n  text_encoder_train_ratio: 0.5\n";
    let t = Trainer::start(load(&write_config(root.path(), "te-bf16", &data, te)), quiet()).unwrap();
    assert_eq!(kinds(&t.params.text_encoder("text_encoder")), fp32);
    drop(t);
    let t = Trainer::start(load(&write_config(root.path(), "lora-fp32", &data, "  use_lora: true\n")), quiet()).unwrap();
    assert_eq!(kinds(&t.params.unet), fp32);
    assert_eq!(kinds(&t.params.text_encoder("text_encoder")), fp32);
}

#[test]
fn lora_with_ema_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 1);
    let cfg = write_config(root.path(), "lora-ema", &data, "  use_lora: true\n  use_ema: true\n");
    let err = Trainer::start(load(&cfg), quiet()).err().expect("refused").to_string();
    assert!(err.contains("use_ema") && err.contains("use_lora"), "{err}");
}

/// Largest absolute difference between two weight lists.
fn max_difference(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    a.iter().zip(b).map(|((_, x), (_, y))| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max)
}

/// Gradients of the trainable tensors for one fixed denoising loss (the same
/// noise and timestep for every call), through the trainer's model as set up.
fn first_gradients(t: &Trainer, data: &Path) -> Vec<(String, Tensor)> {
    use dreambooth::train::step::{denoising_loss, draw_noise, ExampleWeights, LossInputs, PredictionType};
    let example = &dreambooth::data::dataset::load_folder(data, "eval", |_| "a photo of sks thing".into(), 0, &dreambooth::data::buckets::Buckets::square(64), None).unwrap()[0];
    let schedule = dreambooth::scheduler::NoiseSchedule::new(&t.sd.scheduler_config).unwrap();
    let prediction = PredictionType::from_config(&t.sd.scheduler_config).unwrap();
    let latents = tch::no_grad(|| t.sd.vae.encode(&example.pixels.unsqueeze(0)).mean * t.sd.vae_config.scaling_factor);
    let ehs = dreambooth::model::unet::Conditioning::text(t.sd.encode_prompt("a photo of sks thing", 1).hidden);
    let noise = draw_noise(&mut dreambooth::rng::CpuRng::new(5), &latents.size(), 1000, 0.0);
    let weights = ExampleWeights::all_instance(1);
    let inputs = LossInputs { latents: &latents, noise: &noise.noise, timesteps: &noise.timesteps, conditioning: &ehs, coefficients: &weights.coefficients_tensor() };
    denoising_loss(&t.sd.unet, &schedule, prediction, 0.0, &inputs, &|f| f()).loss.backward();
    let out = t.trainable().iter().map(|(k, p)| (k.clone(), p.grad().copy())).collect();
    for (_, p) in t.trainable() {
        dreambooth::rng::set_grad_to_none(p);
    }
    out
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients_and_weights() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 1);
    let lr = 1.0e-4;
    for (name, extra) in [("full", "  text_encoder_train_ratio: 1.0\n"), ("lora", "  use_lora: true\n  text_encoder_train_ratio: 1.0\n")] {
        let mut grads = Vec::new();
        let mut weights = Vec::new();
        for gc in ["false", "true"] {
            let training = format!("{extra}  learning_rate: {lr:e}\n  gradient_checkpointing: {gc}\n");
            let cfg = write_config(root.path(), &format!("{name}-gc-{gc}"), &data, &training);
            let mut t = Trainer::start(load(&cfg), quiet()).unwrap();
            grads.push(first_gradients(&t, &data));
            for _ in 0..2 {
                t.train_step().unwrap();
            }
            let mut w: Vec<(String, Tensor)> = t.trainable().iter().map(|(k, t)| (k.clone(), t.detach().copy())).collect();
            w.extend(t.params.unet.iter().chain(t.params.text_encoder("text_encoder")).map(|(k, t)| (k.clone(), t.detach().copy())));
            weights.push(w);
        }
        assert!(grads[0].iter().all(|(_, g)| g.defined()), "{name}: a trainable tensor got no gradient");
        let dg = max_difference(&grads[0], &grads[1]);
        let dw = max_difference(&weights[0], &weights[1]);
        eprintln!("{name}: with gradient checkpointing, gradients differ by at most {dg:e}, weights after 2 AdamW steps by {dw:e}");
        assert!(dg <= 1e-6, "{name}: gradients differ by {dg} with gradient checkpointing");
        // AdamW divides by √v + ε, so a last-bit difference in a gradient that is
        // itself near zero can move that element by up to lr: compare with lr.
        assert!(dw <= 0.5 * lr, "{name}: weights differ by {dw} with gradient checkpointing");
    }
}

#[test]
fn generate_from_a_run_directory_equals_export_then_generate() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 1);
    let training = "  steps_per_image: 2\n  learning_rate: 1.0e-3\n  use_ema: true\n  ema_decay: 0.5\n  text_encoder_train_ratio: 1.0\n  save_model_every_n_epochs: 1\n";
    let cfg = write_config(root.path(), "gen", &data, training);
    let mut t = Trainer::start(load(&cfg), quiet()).unwrap();
    t.run().unwrap();
    drop(t);
    let run = root.path().join("runs/gen");
    let base = generate(&demo_model(), &root.path().join("base.png"), &[]);
    for step in [None, Some(1u64)] {
        let flag = step.map(|s| s.to_string());
        let extra: Vec<&str> = flag.as_deref().map(|s| vec!["--step", s]).unwrap_or_default();
        let exported = root.path().join(format!("export-{step:?}"));
        export(&run, "diffusers", &exported, step);
        let from_export = generate(&exported, &root.path().join("a.png"), &[]);
        // The one trip through the binary: the CLI contract itself.
        let out = root.path().join("b.png");
        let mut args = vec!["generate", "--model", run.to_str().unwrap(), "--prompt", "a photo of sks thing", "--seed", "3",
                            "--steps", "3", "--width", "64", "--height", "64", "--device", "cpu", "--out", out.to_str().unwrap()];
        args.extend_from_slice(&extra);
        let (code, err) = dreambooth(&args);
        assert_eq!(code, 0, "{err}");
        let from_run = image::open(&out).unwrap().to_rgb8().into_raw();
        assert_eq!(from_run, from_export, "step {step:?}: generate --model RUN_DIR differs from export + generate");
        assert_ne!(from_run, base, "step {step:?}: the trained run gives the base model's image");
    }
    let (code, err) = dreambooth(&["generate", "--model", run.to_str().unwrap(), "--step", "7", "--prompt", "x", "--out",
                                   root.path().join("c.png").to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no checkpoint of step 7"), "{err}");
}

#[test]
fn step_records_report_the_memory_in_use() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 1);
    let cfg = write_config(root.path(), "mem", &data, "  steps_per_image: 1\n");
    let mut t = Trainer::start(load(&cfg), quiet()).unwrap();
    t.run().unwrap();
    let steps: Vec<u64> = dreambooth::run::events::read_events(&t.run_dir)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            dreambooth::run::events::Event::Step(s) => Some(s.vram_bytes),
            _ => None,
        })
        .collect();
    // On the CPU: the process's resident memory, at least the model's few MB.
    assert!(!steps.is_empty() && steps.iter().all(|&b| b > 1 << 20), "{steps:?}");
    let done = &named_events(&t.run_dir, "done")[0];
    assert!(done["vram_peak_bytes"].as_u64().unwrap() >= steps[0], "{done:?}");
}

/// Imagic's reconstruction loss: the denoising loss of the image's latents
/// under `embedding`, over fixed noise and timesteps.
fn reconstruction_loss(t: &Trainer, latents: &Tensor, embedding: &Tensor) -> f64 {
    use dreambooth::train::imagic::Denoiser;
    let _guard = tch::no_grad_guard();
    let schedule = dreambooth::scheduler::NoiseSchedule::new(&t.sd.scheduler_config).unwrap();
    let denoiser = Denoiser::new(&t.sd.unet, &schedule, &t.sd.scheduler_config).unwrap();
    let (noise, timesteps) = denoiser.draw(latents, 16, &mut dreambooth::rng::CpuRng::new(11));
    denoiser.loss_with(latents, embedding, &noise, &timesteps).double_value(&[])
}

#[test]
fn imagic_run_writes_its_files_and_learns_to_reconstruct_the_image() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 2);
    let training = "  train_imagic_only: true\n  steps_per_image: 6\n  learning_rate: 5.0e-4\n  save_preview_every_n_epochs: 3\n  \
                    pause_after_n_epochs: 4\n  pause_seconds: 1\n  offset_noise: 0.1\n";
    let cfg = write_config(root.path(), "imagic", &data, training);
    let mut config = load(&cfg);
    config.concepts[0].class_prompt = "a photo of a thing".into();
    config.concepts[0].num_class_images = 2;
    let mut t = Trainer::start(config, quiet()).unwrap();
    let warnings: Vec<String> = named_events(&t.run_dir, "warning").iter().map(|w| w["message"].as_str().unwrap().to_string()).collect();
    assert!(warnings.iter().any(|w| w.ends_with(": `offset_noise` does not apply to it")), "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("no class images are made")), "{warnings:?}");
    // Its UNet stage cannot run without the UNet training: refused before anything starts.
    let mut frozen = t.config.clone();
    frozen.training.train_unet = false;
    frozen.training.text_encoder_train_ratio = 0.5;
    let refused = dreambooth::train::trainer::check_supported(&frozen).unwrap_err().to_string();
    assert!(refused.contains("cannot be combined with `train_unet: false`"), "{refused}");
    assert!(!t.run_dir.join("class_images").exists(), "Imagic made class images");
    let example = &t.data.instances[0];
    let latents = tch::no_grad(|| t.sd.vae.encode(&example.pixels.unsqueeze(0)).mean * t.sd.vae_config.scaling_factor);
    let target = tch::no_grad(|| t.sd.encode_prompt("a photo of sks thing", 1)).hidden;
    let before = reconstruction_loss(&t, &latents, &target);
    assert_eq!(t.run().unwrap(), dreambooth::train::trainer::Outcome::Finished);
    let run = t.run_dir.clone();
    let (step, dir) = dreambooth::train::checkpoint::find_checkpoint(&run, None).unwrap();
    assert_eq!(step, 9, "3 embedding steps + 6 UNet steps");
    assert!(dir.join("unet.safetensors").is_file());
    let (file_target, optimized, prompt) =
        dreambooth::train::imagic::load_embeddings(&dir.join("imagic_embeddings.safetensors")).unwrap();
    assert_eq!(prompt, "a photo of sks thing");
    assert!(file_target.equal(&target));
    assert!(!optimized.equal(&target), "the embedding did not move");
    let after = reconstruction_loss(&t, &latents, &optimized);
    eprintln!("Imagic reconstruction loss {before:.4} -> {after:.4}");
    assert!(after < 0.8 * before, "reconstruction loss went from {before} to {after}");
    assert_eq!(step_count(&run), 9);
    let names = event_names(&run);
    assert_eq!(names.last().map(String::as_str), Some("done"), "{names:?}");
    assert!(names.iter().any(|n| n == "warning"), "no warning about the second image: {names:?}");
    let start = &named_events(&run, "start")[0];
    assert_eq!(start["imagic"]["embedding_steps"], 3);
    assert_eq!(start["imagic"]["unet_steps"], 6);
    assert!(run.join("samples/step-000006-0.png").is_file() && run.join("samples/step-000009-0.png").is_file());
    // A UNet step is an epoch of the one image: the pause comes after the 4th (step 3 + 4).
    let pauses = named_events(&run, "pause");
    assert_eq!(pauses.len(), 1, "{pauses:?}");
    assert_eq!((pauses[0]["step"].as_u64(), pauses[0]["reason"].as_str()), (Some(7), Some("after epoch 4")));
}

fn imagic_embeddings(run: &Path) -> (Tensor, Tensor) {
    let (_, dir) = dreambooth::train::checkpoint::find_checkpoint(run, None).unwrap();
    let (target, optimized, _) = dreambooth::train::imagic::load_embeddings(&dir.join("imagic_embeddings.safetensors")).unwrap();
    (target, optimized)
}

#[test]
fn an_imagic_run_stopped_in_either_stage_resumes_bit_identically() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 1);
    // 3 embedding steps, then 6 UNet steps; an EMA so its state is resumed too.
    let training = "  train_imagic_only: true\n  steps_per_image: 6\n  learning_rate: 5.0e-4\n  use_ema: true\n";
    let mut full = Trainer::start(load(&write_config(root.path(), "whole", &data, training)), quiet()).unwrap();
    full.run().unwrap();
    let whole = full.run_dir.clone();
    drop(full);

    let mut cut = Trainer::start(load(&write_config(root.path(), "cut", &data, training)), quiet()).unwrap();
    let run = cut.run_dir.clone();
    // Stopped inside stage (a) (after 2 of its 3 steps), then inside stage (b).
    cut.stop_at_step = Some(2);
    assert_eq!(cut.run().unwrap(), dreambooth::train::trainer::Outcome::Stopped);
    drop(cut);
    let mut cut = Trainer::resume(&run, quiet()).unwrap();
    assert_eq!(cut.step, 2);
    cut.stop_at_step = Some(5);
    assert_eq!(cut.run().unwrap(), dreambooth::train::trainer::Outcome::Stopped);
    drop(cut);
    let mut cut = Trainer::resume(&run, quiet()).unwrap();
    assert_eq!(cut.step, 5);
    assert_eq!(cut.run().unwrap(), dreambooth::train::trainer::Outcome::Finished);
    drop(cut);

    assert_bit_identical(&final_unet(&run), &final_unet(&whole));
    let ema = |r: &Path| {
        let (_, dir) = dreambooth::train::checkpoint::find_checkpoint(r, None).unwrap();
        let mut v = Tensor::read_safetensors(dir.join("ema_unet.safetensors")).unwrap();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_bit_identical(&ema(&run), &ema(&whole));
    let ((t1, o1), (t2, o2)) = (imagic_embeddings(&run), imagic_embeddings(&whole));
    assert!(t1.equal(&t2) && o1.equal(&o2), "the embeddings differ after resume");
    assert_eq!(step_count(&run), 9, "each step once");
}
