//! The three networks against diffusers/transformers outputs on the tiny fixture
//! models (tests/fixtures/reference/<model>.safetensors, made by make_fixtures.py).

use dreambooth::model::unet::Conditioning;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dreambooth::model::attention::AttentionBackend;
use dreambooth::model::clip::ClipTextTransformer;
use dreambooth::model::config::{ClipConfig, UNetConfig, VaeConfig};
use dreambooth::model::init::{random_clip, random_unet, random_vae};
use dreambooth::model::unet::UNet2DConditionModel;
use dreambooth::model::vae::AutoencoderKL;
use dreambooth::model::weights::Weights;
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A .safetensors file as float32 (f16/bf16 widened) or int64 tensors, with
/// `strip` removed from the front of keys that have it.
fn read_safetensors(path: &Path, strip: &str) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let kind = match view.dtype() {
                Dtype::F32 => Kind::Float,
                Dtype::F16 => Kind::Half,
                Dtype::BF16 => Kind::BFloat16,
                Dtype::I64 => Kind::Int64,
                other => panic!("{}: tensor {name} has unexpected dtype {other:?}", path.display()),
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let t = Tensor::from_data_size(view.data(), &shape, kind);
            let t = if matches!(kind, Kind::Half | Kind::BFloat16) { t.to_kind(Kind::Float) } else { t };
            (name.strip_prefix(strip).unwrap_or(&name).to_string(), t)
        })
        .collect()
}

fn config<T: serde::de::DeserializeOwned>(model: &str, component: &str) -> T {
    let path = fixtures().join("models").join(model).join(component).join("config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn weights(model: &str, component: &str, file: &str, name: &str) -> Weights {
    let path = fixtures().join("models").join(model).join(component).join(file);
    Weights::new(name, read_safetensors(&path, "text_model."), Device::Cpu, Kind::Float)
}

fn reference(model: &str) -> HashMap<String, Tensor> {
    read_safetensors(&fixtures().join("reference").join(format!("{model}.safetensors")), "")
}

fn unet_weights(model: &str) -> (Weights, UNetConfig) {
    (weights(model, "unet", "diffusion_pytorch_model.safetensors", "UNet"), config(model, "unet"))
}

/// Largest |a - b| / max(1, |b|): absolute for small values, relative for large.
fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let diff = (a - b).abs() / b.abs().clamp_min(1.0);
    diff.max().double_value(&[])
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let err = max_err(got, want);
    eprintln!("{what}: max error {err:.3e}");
    assert!(err <= tol, "{what}: max error {err:.3e} over {tol:.0e}");
}

fn text_encoder_matches(model: &str) {
    let r = reference(model);
    let w = weights(model, "text_encoder", "model.safetensors", "text encoder");
    let cfg: ClipConfig = config(model, "text_encoder");
    let clip = ClipTextTransformer::new(&w, &cfg, false).expect("text encoder builds");
    assert!(w.unused_keys().is_empty(), "unused text encoder keys: {:?}", w.unused_keys());
    let ids = &r["text.ids"];
    tch::no_grad(|| {
        check(&format!("{model} text.hidden"), &clip.forward(ids, 1), &r["text.hidden"], 1e-4);
        check(&format!("{model} text.hidden_skip2"), &clip.forward(ids, 2), &r["text.hidden_skip2"], 1e-4);
    });
}

fn unet_matches(model: &str) {
    let r = reference(model);
    let (w, cfg) = unet_weights(model);
    let unet = UNet2DConditionModel::new(&w, &cfg, AttentionBackend::Default).expect("UNet builds");
    assert!(w.unused_keys().is_empty(), "unused UNet keys: {:?}", w.unused_keys());
    let out = tch::no_grad(|| unet.forward(&r["unet.sample"], &r["unet.timestep"], &Conditioning::text(r["unet.encoder_hidden_states"].shallow_clone())));
    check(&format!("{model} unet.out"), &out, &r["unet.out"], 1e-4);
}

fn vae_matches(model: &str) {
    let r = reference(model);
    let w = weights(model, "vae", "diffusion_pytorch_model.safetensors", "VAE");
    let cfg: VaeConfig = config(model, "vae");
    let vae = AutoencoderKL::new(&w, &cfg).expect("VAE builds");
    assert!(w.unused_keys().is_empty(), "unused VAE keys: {:?}", w.unused_keys());
    tch::no_grad(|| {
        let dist = vae.encode(&r["vae.image"]);
        check(&format!("{model} vae.mean"), &dist.mean, &r["vae.mean"], 1e-4);
        check(&format!("{model} vae.logvar"), &dist.logvar, &r["vae.logvar"], 1e-4);
        check(&format!("{model} vae.decoded"), &vae.decode(&r["vae.latents"]), &r["vae.decoded"], 1e-4);
    });
}

#[test]
fn sd1_text_encoder_matches_transformers() {
    text_encoder_matches("tiny-sd1");
}

#[test]
fn sd2_text_encoder_matches_transformers() {
    text_encoder_matches("tiny-sd2");
}

#[test]
fn sd1_unet_matches_diffusers() {
    unet_matches("tiny-sd1");
}

#[test]
fn sd2_unet_matches_diffusers() {
    unet_matches("tiny-sd2");
}

#[test]
fn sd1_vae_matches_diffusers() {
    vae_matches("tiny-sd1");
}

#[test]
fn sd2_vae_matches_diffusers() {
    vae_matches("tiny-sd2");
}

/// The UNet's gradients equal torch autograd's for diffusers' training step.
#[test]
fn sd1_unet_gradients_match_diffusers() {
    let r = reference("tiny-sd1");
    let (w, cfg) = unet_weights("tiny-sd1");
    let unet = UNet2DConditionModel::new(&w, &cfg, AttentionBackend::Default).expect("UNet builds");
    let params: HashMap<String, Tensor> = w.parameters().into_iter().collect();
    for p in params.values() {
        let _ = p.set_requires_grad(true);
    }
    let pred = unet.forward(&r["train.noisy_latents"], &r["train.timesteps"], &Conditioning::text(r["train.encoder_hidden_states"].shallow_clone()));
    check("train.model_pred", &pred.detach(), &r["train.model_pred"], 1e-4);
    let loss = pred.mse_loss(&r["train.target"], tch::Reduction::Mean);
    check("train.loss", &loss.detach(), &r["train.loss"], 1e-5);
    loss.backward();
    for (key, want) in r.iter().filter_map(|(k, v)| k.strip_prefix("train.grad.").map(|n| (n, v))) {
        let grad = params[key].grad();
        // Gradients are small: compare against 1e-4 of their own scale too.
        let scale = want.abs().max().double_value(&[]).max(1e-3);
        let err = (&grad - want).abs().max().double_value(&[]) / scale;
        eprintln!("grad {key}: max error relative to its scale {err:.3e}");
        assert!(err < 1e-3, "gradient of {key} differs: {err:.3e}");
    }
}

#[test]
fn every_fixture_key_is_used_and_time_embedding_takes_floats() {
    // unused_keys are checked in each comparison above; here: a float scalar timestep
    // gives the same output as the int64 batch.
    let r = reference("tiny-sd2");
    let (w, cfg) = unet_weights("tiny-sd2");
    let unet = UNet2DConditionModel::new(&w, &cfg, AttentionBackend::Default).expect("UNet builds");
    tch::no_grad(|| {
        let sample = r["unet.sample"].narrow(0, 0, 1);
        let ehs = r["unet.encoder_hidden_states"].narrow(0, 0, 1);
        let a = unet.forward(&sample, &Tensor::from(999.0f32), &Conditioning::text(ehs.shallow_clone()));
        let b = unet.forward(&sample, &Tensor::from_slice(&[999i64]), &Conditioning::text(ehs.shallow_clone()));
        check("scalar float timestep", &a, &b, 1e-6);
        check("batch of one vs reference", &a, &r["unet.out"].narrow(0, 0, 1), 1e-4);
    });
}

#[test]
fn wrong_shape_names_the_key() {
    let cfg: UNetConfig = config("tiny-sd1", "unet");
    let mut tensors = read_safetensors(
        &fixtures().join("models/tiny-sd1/unet/diffusion_pytorch_model.safetensors"),
        "",
    );
    let key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    tensors.insert(key.to_string(), Tensor::zeros([32, 65], (Kind::Float, Device::Cpu)));
    let w = Weights::new("UNet", tensors, Device::Cpu, Kind::Float);
    let err = UNet2DConditionModel::new(&w, &cfg, AttentionBackend::Default).expect_err("a wrong shape is refused");
    let msg = format!("{err:#}");
    assert!(msg.contains(key) && msg.contains("[32, 65]") && msg.contains("[32, 64]"), "{msg}");

    let mut tensors = read_safetensors(&fixtures().join("models/tiny-sd1/vae/diffusion_pytorch_model.safetensors"), "");
    tensors.remove("decoder.mid_block.attentions.0.to_q.bias");
    let w = Weights::new("VAE", tensors, Device::Cpu, Kind::Float);
    let msg = format!("{:#}", AutoencoderKL::new(&w, &config("tiny-sd1", "vae")).expect_err("a missing key is refused"));
    assert!(msg.contains("decoder.mid_block.attentions.0.to_q.bias"), "{msg}");
}

#[test]
fn bad_configs_are_errors_not_panics() {
    let mut cfg: UNetConfig = config("tiny-sd1", "unet");
    cfg.norm_num_groups = 5;
    let msg = format!("{:#}", random_unet(&cfg, 0).expect_err("groups must divide channels"));
    assert!(msg.contains("groups"), "{msg}");
    let mut cfg: UNetConfig = config("tiny-sd1", "unet");
    cfg.down_block_types[0] = "SimpleCrossAttnDownBlock2D".into();
    let msg = format!("{:#}", random_unet(&cfg, 0).expect_err("unknown block"));
    assert!(msg.contains("SimpleCrossAttnDownBlock2D"), "{msg}");
    let mut cfg: ClipConfig = config("tiny-sd1", "text_encoder");
    cfg.hidden_act = "tanh".into();
    assert!(random_clip(&cfg, 0).is_err());
}

/// Random weights cover exactly the fixture's keys and shapes, are reproducible,
/// and give finite outputs.
#[test]
fn random_weights_match_the_checkpoint_layout() {
    for model in ["tiny-sd1", "tiny-sd2"] {
        let unet_cfg: UNetConfig = config(model, "unet");
        let vae_cfg: VaeConfig = config(model, "vae");
        let clip_cfg: ClipConfig = config(model, "text_encoder");
        let made = [
            (random_unet(&unet_cfg, 7).unwrap(), "unet/diffusion_pytorch_model.safetensors"),
            (random_vae(&vae_cfg, 7).unwrap(), "vae/diffusion_pytorch_model.safetensors"),
            (random_clip(&clip_cfg, 7).unwrap(), "text_encoder/model.safetensors"),
        ];
        for (random, file) in &made {
            let real = read_safetensors(&fixtures().join("models").join(model).join(file), "text_model.");
            let mut a: Vec<_> = random.iter().map(|(k, t)| (k.clone(), t.size())).collect();
            let mut b: Vec<_> = real.iter().map(|(k, t)| (k.clone(), t.size())).collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "{model} {file}");
        }
        let again = random_unet(&unet_cfg, 7).unwrap();
        let other = random_unet(&unet_cfg, 8).unwrap();
        let k = "conv_in.weight";
        assert!(again[k].equal(&made[0].0[k]));
        assert!(!other[k].equal(&made[0].0[k]));

        let w = Weights::new("UNet", made[0].0.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect(), Device::Cpu, Kind::Float);
        let unet = UNet2DConditionModel::new(&w, &unet_cfg, AttentionBackend::Default).unwrap();
        let cross = unet_cfg.cross_attention_dim.at(0);
        let out = tch::no_grad(|| {
            unet.forward(
                &Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu)),
                &Tensor::from(500i64),
                &Conditioning::text(Tensor::randn([1, 77, cross], (Kind::Float, Device::Cpu))),
            )
        });
        assert_eq!(out.size(), vec![1, 4, 8, 8]);
        assert!(bool::try_from(out.isfinite().all()).unwrap());
    }
}

/// Loaded in bfloat16 the modules run end to end in bfloat16 (no float32 tensor
/// made inside forward leaks in) and stay close to the float32 reference.
#[test]
fn modules_run_in_bfloat16() {
    let model = "tiny-sd2";
    let r = reference(model);
    let bf = |t: &Tensor| t.to_kind(Kind::BFloat16);
    let load = |component: &str, file: &str, name: &str| {
        let path = fixtures().join("models").join(model).join(component).join(file);
        Weights::new(name, read_safetensors(&path, "text_model."), Device::Cpu, Kind::BFloat16)
    };
    tch::no_grad(|| {
        let clip = ClipTextTransformer::new(&load("text_encoder", "model.safetensors", "text encoder"), &config(model, "text_encoder"), false).unwrap();
        let hidden = clip.forward(&r["text.ids"], 1);
        assert_eq!(hidden.kind(), Kind::BFloat16);
        check("bf16 text.hidden", &hidden.to_kind(Kind::Float), &r["text.hidden"], 0.15);

        let unet = UNet2DConditionModel::new(&load("unet", "diffusion_pytorch_model.safetensors", "UNet"), &config(model, "unet"), AttentionBackend::Default).unwrap();
        let out = unet.forward(&bf(&r["unet.sample"]), &r["unet.timestep"], &Conditioning::text(bf(&r["unet.encoder_hidden_states"])));
        assert_eq!(out.kind(), Kind::BFloat16);
        check("bf16 unet.out", &out.to_kind(Kind::Float), &r["unet.out"], 0.15);

        let vae = AutoencoderKL::new(&load("vae", "diffusion_pytorch_model.safetensors", "VAE"), &config(model, "vae")).unwrap();
        let dist = vae.encode(&bf(&r["vae.image"]));
        assert_eq!(dist.sample(&mut dreambooth::rng::CpuRng::new(0)).kind(), Kind::BFloat16);
        check("bf16 vae.mean", &dist.mean.to_kind(Kind::Float), &r["vae.mean"], 0.1);
        let decoded = vae.decode(&bf(&r["vae.latents"]));
        check("bf16 vae.decoded", &decoded.to_kind(Kind::Float), &r["vae.decoded"], 0.15);
    });
}

/// `sample` draws from the given CPU generator: `mean + std * randn` with its first draw,
/// the same as a freshly seeded global generator's.
#[test]
fn vae_sample_uses_the_given_cpu_generator() {
    let r = reference("tiny-sd1");
    let w = weights("tiny-sd1", "vae", "diffusion_pytorch_model.safetensors", "VAE");
    let vae = AutoencoderKL::new(&w, &config("tiny-sd1", "vae")).unwrap();
    tch::no_grad(|| {
        let dist = vae.encode(&r["vae.image"]);
        let a = dist.sample(&mut dreambooth::rng::CpuRng::new(1234));
        tch::manual_seed(1234);
        let eps = Tensor::randn(dist.mean.size(), (Kind::Float, Device::Cpu));
        check("sample", &a, &(&dist.mean + &dist.std * eps), 0.0);
        check("std", &dist.std, &(&r["vae.logvar"] * 0.5).exp(), 1e-4);
    });
}
