//! `generate` equals diffusers' StableDiffusionPipeline: every sampler, two seeds,
//! both tiny architectures, images within 2/255 of the reference.

mod common;

use common::{max_abs_diff, model, reference};
use dreambooth::model::attention::AttentionBackend;
use dreambooth::pipeline::{SampleRequest, StableDiffusion};
use tch::Device;

const SAMPLERS: [&str; 6] = ["ddim", "pndm", "lms", "euler", "euler-a", "dpmpp-2m"];

fn request(sampler: &str, seed: u64) -> SampleRequest {
    SampleRequest {
        prompt: "a photo of sks dog".into(),
        negative: "blurry".into(),
        seed,
        steps: 8,
        sampler: sampler.into(),
        guidance: 7.5,
        width: 32,
        height: 32,
        clip_skip: 1,
    }
}

fn check_model(folder: &str) {
    let refs = reference(folder);
    let sd = StableDiffusion::load(&model(folder), None, Device::Cpu, AttentionBackend::Default).unwrap();
    let mut worst = 0.0f64;
    for sampler in SAMPLERS {
        for seed in [0u64, 1234] {
            let image = sd.text_to_image(&request(sampler, seed), |_, _| {}).unwrap();
            let want = &refs[&format!("image.{sampler}.seed{seed}")];
            let diff = max_abs_diff(&image, want);
            worst = worst.max(diff);
            assert!(diff <= 2.0 / 255.0, "{folder} {sampler} seed {seed}: max abs diff {diff}");
        }
    }
    eprintln!("{folder}: worst image difference {worst:.2e} (limit {:.2e})", 2.0 / 255.0);
}

#[test]
fn sd1_images_match_diffusers_for_every_sampler() {
    check_model("tiny-sd1");
}

#[test]
fn sd2_images_match_diffusers_for_every_sampler() {
    check_model("tiny-sd2");
}

/// The single file and the folder of the same model give the same image, bit for bit.
/// DDIM uses `leading` spacing either way; euler-a (which also draws noise every
/// step) is compared with the folder's scheduler config given as --model-config,
/// since the SD 2 folder's config has no `timestep_spacing` and a single file
/// gets diffusers' single-file default (`leading`).
#[test]
fn single_file_and_folder_give_identical_images() {
    for (folder, file) in [("tiny-sd1", "tiny-sd1.safetensors"), ("tiny-sd1", "tiny-sd1.ckpt"), ("tiny-sd2", "tiny-sd2.safetensors")] {
        let a = StableDiffusion::load(&model(folder), None, Device::Cpu, AttentionBackend::Default).unwrap();
        let inferred = StableDiffusion::load(&model(file), None, Device::Cpu, AttentionBackend::Default).unwrap();
        let configured =
            StableDiffusion::load(&model(file), Some(&model(folder)), Device::Cpu, AttentionBackend::Default).unwrap();
        for (b, sampler) in [(&inferred, "ddim"), (&configured, "euler-a")] {
            let ia = a.text_to_image(&request(sampler, 7), |_, _| {}).unwrap();
            let ib = b.text_to_image(&request(sampler, 7), |_, _| {}).unwrap();
            assert_eq!(max_abs_diff(&ia, &ib), 0.0, "{folder} vs {file} with {sampler}");
        }
    }
}

/// The CLI writes a PNG equal (after 8-bit rounding) to the reference image.
#[test]
fn generate_command_writes_the_reference_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sub/img.png");
    let m = model("tiny-sd1");
    let (code, _, err) = common::run_cli(&[
        "generate", "--model", m.to_str().unwrap(), "--prompt", "a photo of sks dog", "--negative", "blurry",
        "--seed", "1234", "--steps", "8", "--scheduler", "dpmpp-2m", "--device", "cpu", "--out", out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stderr: {err}");
    let png = image::open(&out).unwrap().to_rgb8();
    let refs = reference("tiny-sd1");
    let want = &refs["image.dpmpp-2m.seed1234"];
    assert_eq!((png.width(), png.height()), (32, 32));
    let got = tch::Tensor::from_slice(png.as_raw()).view([32, 32, 3]).to_kind(tch::Kind::Float) / 255.0;
    let diff = max_abs_diff(&got, want);
    assert!(diff <= 2.5 / 255.0, "png differs by {diff}");
}

/// Reads a PNG the CLI wrote as a [height, width, 3] float tensor in 0..1.
fn png_tensor(path: &std::path::Path) -> tch::Tensor {
    let png = image::open(path).unwrap().to_rgb8();
    let (w, h) = (png.width() as i64, png.height() as i64);
    tch::Tensor::from_slice(png.as_raw()).view([h, w, 3]).to_kind(tch::Kind::Float) / 255.0
}

/// `--clip-skip 2` conditions on the penultimate layer through the final layer
/// norm, as diffusers' `clip_skip=1` (reference/clip_skip.safetensors from
/// make_clip_skip_fixture.py): the embeddings and the image match. The negative
/// prompt skips the layer too, as in AUTOMATIC1111 (diffusers' encode_prompt
/// skips it for the positive prompt only; the fixture says how it is made).
#[test]
fn clip_skip_matches_diffusers() {
    let refs = reference("clip_skip");
    let sd = StableDiffusion::load(&model("tiny-sd1"), None, Device::Cpu, AttentionBackend::Default).unwrap();
    for (prompt, key) in [("a photo of sks dog", "embeds.prompt"), ("blurry", "embeds.negative")] {
        let got = tch::no_grad(|| sd.encode_prompt(prompt, 2)).hidden;
        let diff = max_abs_diff(&got, &refs[key]);
        assert!(diff < 1e-5, "{key}: max abs diff {diff}");
    }
    let dir = tempfile::tempdir().unwrap();
    let m = model("tiny-sd1");
    let generate = |skip: &str, name: &str| {
        let out = dir.path().join(name);
        let (code, _, err) = common::run_cli(&[
            "generate", "--model", m.to_str().unwrap(), "--prompt", "a photo of sks dog", "--negative", "blurry",
            "--seed", "1234", "--steps", "8", "--scheduler", "ddim", "--device", "cpu", "--clip-skip", skip,
            "--out", out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "stderr: {err}");
        png_tensor(&out)
    };
    let skipped = generate("2", "skip2.png");
    let diff = max_abs_diff(&skipped, &refs["image.ddim.seed1234"]);
    assert!(diff <= 2.5 / 255.0, "png differs by {diff}");
    let last = max_abs_diff(&generate("1", "skip1.png"), &reference("tiny-sd1")["image.ddim.seed1234"]);
    assert!(last <= 2.5 / 255.0, "--clip-skip 1 is the default image: differs by {last}");
    let (code, _, err) = common::run_cli(&[
        "generate", "--model", m.to_str().unwrap(), "--prompt", "x", "--device", "cpu", "--clip-skip", "9",
        "--out", dir.path().join("no.png").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--clip-skip 9 must be between 1"), "{err}");
}

/// `--vae` draws with a VAE of its own (reference/vae.safetensors from
/// make_vae_fixture.py: diffusers' pipeline on tiny-sd1 with that VAE). The same VAE as
/// AUTOMATIC1111's LDM-layout file, as a `*.vae.pt` and as a diffusers folder gives
/// diffusers' image; one that cannot fit the model is one sentence.
#[test]
fn a_vae_of_its_own_matches_diffusers() {
    let refs = reference("vae");
    let dir = tempfile::tempdir().unwrap();
    let m = model("tiny-sd1");
    let generate = |vae: &std::path::Path, name: &str| {
        let out = dir.path().join(name);
        let (code, _, err) = common::run_cli(&[
            "generate", "--model", m.to_str().unwrap(), "--vae", vae.to_str().unwrap(), "--prompt", "a photo of sks dog",
            "--negative", "blurry", "--seed", "1234", "--steps", "8", "--scheduler", "ddim", "--device", "cpu",
            "--width", "32", "--height", "32", "--out", out.to_str().unwrap(),
        ]);
        (code, err, out)
    };
    for vae in ["tiny-vae.safetensors", "tiny-vae.pt", "tiny-vae", "tiny-vae/diffusion_pytorch_model.safetensors"] {
        let (code, err, out) = generate(&model(vae), &format!("{vae}.png"));
        assert_eq!(code, 0, "{vae}: {err}");
        let image = png_tensor(&out);
        let diff = max_abs_diff(&image, &refs["image.ddim.seed1234"]);
        assert!(diff <= 2.5 / 255.0, "{vae}: png differs from diffusers' by {diff}");
        assert!(max_abs_diff(&image, &refs["image.own_vae.seed1234"]) > 0.05, "{vae} made no difference");
    }
    for (vae, says) in [
        (model("trained-vae"), "downsamples 4× and this model's VAE 2×"),
        (model("tiny-sd1/unet"), "holds a UNet2DConditionModel, not an AutoencoderKL"),
        (model("tiny-sd1/unet/diffusion_pytorch_model.safetensors"), "holds no VAE: it has no `encoder.conv_in.weight`"),
        (model("tiny-sd2.safetensors"), "does not fit this model: `decoder.up_blocks.1.resnets.0.conv1.bias` is [64], the model's is [32]"),
        (model("no-such-vae"), "does not exist"),
    ] {
        let (code, err, _) = generate(&vae, "refused.png");
        assert_ne!(code, 0);
        assert!(err.contains(says) && err.trim().lines().count() == 1, "{}: {err}", vae.display());
    }
    // `models` names a VAE file as one, with where it goes.
    let (code, out, err) = common::run_cli(&["models", model("").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.contains("tiny-vae.safetensors")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("a VAE, not a model: use it with a run config's `vae` or `generate --vae`"), "{line}");
}
