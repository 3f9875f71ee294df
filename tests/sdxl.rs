//! SDXL against diffusers (`tests/fixtures/make_sdxl_fixtures.py`, a tiny random
//! SDXL unlike diffusers' own test configs): both text encoders and the prompt
//! conditioning `StableDiffusionXLPipeline.encode_prompt` builds, the UNet with
//! its added conditions, the VAE, and images from every sampler.

mod common;

use common::{close, max_abs_diff, model, reference, sdxl_request};
use dreambooth::checkpoint::{load_model, Architecture};
use dreambooth::conditioning::{PromptEmbeds, SizeIds};
use dreambooth::model::attention::AttentionBackend;
use dreambooth::model::family::HiddenStates;
use dreambooth::model::unet::{Conditioning, TextTime};
use dreambooth::pipeline::{SampleRequest, StableDiffusion};
use tch::{Device, Kind, Tensor};

const SAMPLERS: [&str; 6] = ["ddim", "pndm", "lms", "euler", "euler-a", "dpmpp-2m"];

fn sdxl() -> StableDiffusion {
    StableDiffusion::load(&model("tiny-sdxl"), None, Device::Cpu, AttentionBackend::Default).unwrap()
}



#[test]
fn the_folder_loads_as_sdxl_with_both_encoders() {
    let m = load_model(&model("tiny-sdxl"), None).unwrap();
    assert_eq!(m.architecture, Architecture::Sdxl);
    let names: Vec<&str> = m.text_encoders.iter().map(|t| t.role.name).collect();
    assert_eq!(names, ["text_encoder", "text_encoder_2"]);
    assert!(m.force_zeros_for_empty_prompt);
    assert!((m.vae_config.scaling_factor - 0.13025).abs() < 1e-9);
    assert!(m.text_encoders[1].tensors.contains_key("text_projection.weight"));
}

#[test]
fn text_encoders_match_transformers() {
    let r = reference("tiny-sdxl");
    let sd = sdxl();
    let (e1, e2) = (&sd.text.encoders[0], &sd.text.encoders[1]);
    tch::no_grad(|| {
        assert_eq!(Tensor::from_slice(&e1.tokenizer.encode_padded("a photo of sks dog", 77)), r["text.ids1"].get(0));
        assert_eq!(Tensor::from_slice(&e2.tokenizer.encode_padded("blurry", 77)), r["text.ids2"].get(1));
        let s1 = e1.model.encode(&r["text.ids1"], HiddenStates::Penultimate, 1, false);
        close("text.hidden1", &s1.hidden, &r["text.hidden1"], 1e-4);
        close("text.last1", &e1.model.forward(&r["text.ids1"], 1), &r["text.last1"], 1e-4);
        let s2 = e2.model.encode(&r["text.ids2"], HiddenStates::Penultimate, 1, true);
        close("text.hidden2", &s2.hidden, &r["text.hidden2"], 1e-4);
        close("text.pooled2", &s2.pooled.unwrap(), &r["text.pooled2"], 1e-4);
        close("text.last2", &e2.model.forward(&r["text.ids2"], 1), &r["text.last2"], 1e-4);
    });
}

#[test]
fn prompt_conditioning_matches_encode_prompt() {
    let r = reference("tiny-sdxl");
    let sd = sdxl();
    tch::no_grad(|| {
        let prompt = sd.encode_prompt("a photo of sks dog", 1);
        close("prompt_embeds", &prompt.hidden, &r["text.prompt_embeds"], 1e-4);
        close("pooled", prompt.pooled.as_ref().unwrap(), &r["text.pooled"], 1e-4);
        let negative = sd.text.encode_negative("blurry", 1, &prompt);
        close("negative_prompt_embeds", &negative.hidden, &r["text.negative_prompt_embeds"], 1e-4);
        close("negative_pooled", negative.pooled.as_ref().unwrap(), &r["text.negative_pooled"], 1e-4);
        // force_zeros_for_empty_prompt: an empty negative prompt is zeros.
        let zero = sd.text.encode_negative("", 1, &prompt);
        assert_eq!(zero.hidden, r["text.zero_negative_prompt_embeds"]);
        assert_eq!(zero.pooled.unwrap(), r["text.zero_negative_pooled"]);
        // AUTOMATIC1111's clip skip 2 = diffusers' clip_skip=1: one layer further
        // back for the states, the pooled output unchanged.
        let skipped = sd.encode_prompt("a photo of sks dog", 2);
        close("skip_prompt_embeds", &skipped.hidden, &r["text.skip_prompt_embeds"], 1e-4);
        close("skip_pooled", skipped.pooled.as_ref().unwrap(), &r["text.skip_pooled"], 1e-4);
    });
}

#[test]
fn unet_with_added_conditions_matches_diffusers() {
    let r = reference("tiny-sdxl");
    let sd = sdxl();
    let cond = Conditioning {
        encoder_hidden_states: r["unet.encoder_hidden_states"].shallow_clone(),
        text_time: Some(TextTime { text_embeds: r["unet.text_embeds"].shallow_clone(), time_ids: r["unet.time_ids"].shallow_clone() }),
    };
    let out = tch::no_grad(|| sd.unet.forward(&r["unet.sample"], &r["unet.timestep"], &cond));
    close("unet.out", &out, &r["unet.out"], 1e-4);
    // The same through the conditioner's own size ids.
    let text = PromptEmbeds { hidden: r["unet.encoder_hidden_states"].shallow_clone(), pooled: Some(r["unet.text_embeds"].shallow_clone()) };
    let sizes = [
        SizeIds { original: (32, 48), crop_top_left: (0, 0), target: (32, 48) },
        SizeIds { original: (72, 56), crop_top_left: (4, 8), target: (64, 64) },
    ];
    let cond = sd.text.conditioning(&text, &sizes);
    assert_eq!(cond.text_time.as_ref().unwrap().time_ids, r["unet.time_ids"]);
}

#[test]
fn vae_matches_diffusers() {
    let r = reference("tiny-sdxl");
    let sd = sdxl();
    tch::no_grad(|| {
        let dist = sd.vae.encode(&r["vae.image"]);
        close("vae.mean", &dist.mean, &r["vae.mean"], 1e-4);
        close("vae.decoded", &sd.vae.decode(&r["vae.latents"]), &r["vae.decoded"], 1e-4);
    });
}

#[test]
fn images_match_diffusers_for_every_sampler() {
    let r = reference("tiny-sdxl");
    let sd = sdxl();
    let mut worst = 0.0f64;
    for sampler in SAMPLERS {
        for seed in [0u64, 1234] {
            let image = sd.text_to_image(&sdxl_request(sampler, seed), |_, _| {}).unwrap();
            let d = max_abs_diff(&image, &r[&format!("image.{sampler}.seed{seed}")]);
            worst = worst.max(d);
            assert!(d <= 2.0 / 255.0, "{sampler} seed {seed}: max abs diff {d}");
        }
    }
    eprintln!("tiny-sdxl: worst image difference {worst:.2e}");
}

#[test]
fn guidance_empty_negative_default_size_and_micro_conditioning_match_diffusers() {
    let r = reference("tiny-sdxl");
    let sd = sdxl();
    let euler = sdxl_request("euler", 0);
    let check = |what: &str, image: Tensor| {
        let d = max_abs_diff(&image, &r[what]);
        assert!(d <= 2.0 / 255.0, "{what}: max abs diff {d}");
    };
    check("image.zero_negative", sd.text_to_image(&SampleRequest { negative: String::new(), ..euler.clone() }, |_, _| {}).unwrap());
    check("image.no_cfg", sd.text_to_image(&SampleRequest { guidance: 1.0, ..euler.clone() }, |_, _| {}).unwrap());
    assert_eq!(sd.default_size(), 64);
    check("image.default_size", sd.text_to_image(&SampleRequest { width: 64, height: 64, ..euler.clone() }, |_, _| {}).unwrap());
    let prompt = tch::no_grad(|| sd.encode_prompt(&euler.prompt, 1));
    let micro = SizeIds { original: (96, 80), crop_top_left: (8, 4), target: (32, 48) };
    check("image.micro", sd.text_to_image_with_embeddings(&euler, &prompt, micro, |_, _| {}).unwrap());
}

/// The whole pipeline in bfloat16 runs and stays near the float32 image (the VAE
/// stays float32, as SDXL's overflows in half precision).
#[test]
fn half_precision_sampling_stays_finite() {
    let m = load_model(&model("tiny-sdxl"), None).unwrap();
    let sd = StableDiffusion::from_loaded(m, Device::Cpu, Kind::BFloat16, AttentionBackend::Default).unwrap();
    let image = sd.text_to_image(&sdxl_request("euler", 0), |_, _| {}).unwrap();
    assert!(bool::try_from(image.isfinite().all()).unwrap());
    let d = max_abs_diff(&image, &reference("tiny-sdxl")["image.euler.seed0"]);
    assert!(d < 0.1, "bf16 image differs by {d}");
}

/// One SDXL DreamBooth step with both text encoders trained, against diffusers'
/// SDXL training scripts: conditioning through both encoders with gradients,
/// size ids, loss, gradients in the UNet and both encoders, weights after one
/// torch AdamW step (lr 1e-3, weight decay 1e-2), and the loss after it.
#[test]
fn one_training_step_through_unet_and_both_encoders_matches_diffusers() {
    use dreambooth::scheduler::NoiseSchedule;
    use dreambooth::train::adamw::{AdamW, AdamWConfig};
    use dreambooth::train::step::{denoising_loss, ExampleWeights, LossInputs, PredictionType};

    let r = reference("tiny-sdxl");
    let loaded = load_model(&model("tiny-sdxl"), None).unwrap();
    let (sd, params) =
        StableDiffusion::from_loaded_with_parameters(loaded, Device::Cpu, Kind::Float, AttentionBackend::Default).unwrap();
    let schedule = NoiseSchedule::new(&sd.scheduler_config).unwrap();
    let prediction = PredictionType::from_config(&sd.scheduler_config).unwrap();
    // Optimizer keys as the trainer spells them, and the reference's names.
    let mut all: Vec<(String, Tensor)> = params.unet.iter().map(|(k, t)| (format!("unet.{k}"), t.shallow_clone())).collect();
    all.extend(params.text_tensors().map(|(name, (k, t))| (format!("{name}.{k}"), t.shallow_clone())));
    for (_, p) in &all {
        let _ = p.set_requires_grad(true);
    }
    let reference_name = |key: &str| -> String {
        // transformers keeps `text_model.` inside each encoder, beside `text_projection`.
        for name in ["text_encoder_2.", "text_encoder."] {
            if let Some(rest) = key.strip_prefix(name) {
                return if rest.starts_with("text_projection") { key.to_string() } else { format!("{name}text_model.{rest}") };
            }
        }
        key.to_string()
    };
    let checked = [
        "unet.conv_in.weight",
        "unet.add_embedding.linear_1.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "unet.down_blocks.2.attentions.0.transformer_blocks.2.ff.net.0.proj.weight",
        "unet.mid_block.resnets.0.conv1.weight",
        "unet.conv_out.bias",
        "text_encoder.encoder.layers.0.self_attn.q_proj.weight",
        "text_encoder_2.encoder.layers.1.mlp.fc1.weight",
        "text_encoder_2.text_projection.weight",
    ];

    let ids = Tensor::cat(&[&r["train.ids1"], &r["train.ids2"]], 1);
    let text = sd.text.encode_ids(&ids, 1);
    close("train.prompt_embeds", &text.hidden, &r["train.prompt_embeds"], 1e-4);
    close("train.pooled", text.pooled.as_ref().unwrap(), &r["train.pooled"], 1e-4);
    let sizes = [
        SizeIds { original: (64, 64), crop_top_left: (0, 0), target: (64, 64) },
        SizeIds { original: (80, 72), crop_top_left: (8, 4), target: (64, 64) },
    ];
    let cond = sd.text.conditioning(&text, &sizes);
    assert_eq!(cond.text_time.as_ref().unwrap().time_ids, r["train.time_ids"]);
    let weights = ExampleWeights::all_instance(2);
    let inputs = LossInputs {
        latents: &r["train.latents"],
        noise: &r["train.noise"],
        timesteps: &r["train.timesteps"],
        conditioning: &cond,
        coefficients: &weights.coefficients_tensor(),
    };
    let no_autocast = |f: &dyn Fn() -> Tensor| f();
    let out = denoising_loss(&sd.unet, &schedule, prediction, 0.0, &inputs, &no_autocast);
    close("train.model_pred", &out.model_pred, &r["train.model_pred"], 1e-4);
    let d = max_abs_diff(&out.loss, &r["train.loss"]);
    assert!(d < 1e-5, "loss {} vs {} (diff {d})", out.loss.double_value(&[]), r["train.loss"].double_value(&[]));
    out.loss.backward();

    let by_key: std::collections::HashMap<_, _> = all.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    for key in checked {
        let want = &r[&format!("train.grad.{}", reference_name(key))];
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        let d = max_abs_diff(&by_key[key].grad(), want);
        assert!(d / scale < 1e-4, "grad of {key} differs by {d} (max {scale})");
    }
    let mut opt = AdamW::new(all.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect(), AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 1e-2,
    });
    opt.step(1e-3);
    for key in checked {
        // As in train_step.rs: 1e-6 where the gradient is well above AdamW's eps.
        let name = reference_name(key);
        let want = &r[&format!("train.step1.{name}")];
        let clear = r[&format!("train.grad.{name}")].abs().gt(1e-6);
        let diff = (&by_key[key] - want).abs();
        let d_clear = diff.masked_select(&clear).max().double_value(&[]);
        assert!(d_clear < 1e-6, "{key} after one AdamW step differs by {d_clear}");
        assert!(diff.max().double_value(&[]) < 1e-3, "{key} after one AdamW step is off somewhere");
    }
    let after = tch::no_grad(|| {
        let text = sd.text.encode_ids(&ids, 1);
        let cond = sd.text.conditioning(&text, &sizes);
        let inputs = LossInputs { conditioning: &cond, ..inputs };
        denoising_loss(&sd.unet, &schedule, prediction, 0.0, &inputs, &no_autocast).loss
    });
    close("train.loss_after_step1", &after, &r["train.loss_after_step1"], 1e-4);
}

/// `generate` on an SDXL folder draws with the family's defaults (euler,
/// guidance 5.0), as `StableDiffusionXLPipeline` does, and writes the reference image.
#[test]
fn generate_command_uses_sdxl_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img.png");
    let m = model("tiny-sdxl");
    let (code, _, err) = common::run_cli(&[
        "generate", "--model", m.to_str().unwrap(), "--prompt", "a photo of sks dog", "--negative", "blurry",
        "--seed", "0", "--steps", "8", "--width", "48", "--height", "32", "--device", "cpu", "--out", out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stderr: {err}");
    assert!(err.contains("of euler"), "stderr: {err}");
    let png = image::open(&out).unwrap().to_rgb8();
    assert_eq!((png.width(), png.height()), (48, 32));
    let got = Tensor::from_slice(png.as_raw()).view([32, 48, 3]).to_kind(Kind::Float) / 255.0;
    let d = max_abs_diff(&got, &reference("tiny-sdxl")["image.euler.seed0"]);
    assert!(d <= 2.5 / 255.0, "png differs by {d}");
}
