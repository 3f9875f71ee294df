//! Masked loss (`training.masked_loss`, `concepts[].mask_dir`) on the demo
//! model: area averaging as torch's, masks framed and flipped with their
//! images, the loss as defined, all-white masks exactly no masks, and the
//! warnings and refusals a user sees.

#[path = "train_support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};

use dreambooth::data::buckets::Buckets;
use dreambooth::data::dataset::{self, BatchPlan};
use dreambooth::data::masks;
use dreambooth::train::trainer::Trainer;
use support::*;
use tch::{Device, Kind, Tensor};

/// A run config of `training` lines whose concept takes its masks from `mask_dir`.
fn masked_config(root: &Path, name: &str, data: &Path, mask_dir: Option<&Path>, training: &str) -> PathBuf {
    let mut yaml = config_yaml(root, name, data, training);
    if let Some(dir) = mask_dir {
        let prompt = "    instance_prompt: a photo of sks thing\n";
        yaml = yaml.replacen(prompt, &format!("{prompt}    mask_dir: {}\n", dir.display()), 1);
    }
    let path = root.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A grey mask of `w` × `h` whose pixel (x, y) is `f(x, y)`.
fn save_mask(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)])).save(path).unwrap();
}

fn trained_weights(t: &Trainer) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = t.trainable().iter().map(|(k, p)| (k.clone(), p.detach().copy())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn area_averaging_to_the_latent_grid_matches_torch() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/mask_area.json");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (h, w) = (doc["height"].as_i64().unwrap(), doc["width"].as_i64().unwrap());
    let bytes: Vec<u8> = doc["mask"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
    let mask = Tensor::from_slice(&bytes).view([1, h, w]);
    for case in doc["cases"].as_array().unwrap() {
        let size: Vec<i64> = case["size"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        let want: Vec<f32> = case["weights"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let want = Tensor::from_slice(&want).view([1, 1, size[0], size[1]]);
        let got = masks::loss_weights([(Some(&mask), false)], (size[0], size[1]), 0.0);
        let diff = (&got - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{size:?}: {diff} from torch's F.interpolate(mode=\"area\")");
        // A flipped image's weights are its mask's mirror image (to rounding:
        // each cell sums its pixels in the other order).
        let flipped = masks::loss_weights([(Some(&mask), true)], (size[0], size[1]), 0.0);
        if size[1] != 7 {
            let diff = (&flipped - got.flip([3])).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{size:?}: flipped weights are {diff} from the mirror image");
        }
        // unmasked_weight raises every weight to at least itself, as OneTrainer's clamp.
        let raised = masks::loss_weights([(Some(&mask), false)], (size[0], size[1]), 0.3);
        assert!(raised.equal(&got.clamp_min(0.3)));
    }
}

/// The red channel of a framed example's pixels as 8-bit values `[1, H, W]`.
fn red_channel(pixels: &Tensor) -> Tensor {
    ((pixels.narrow(0, 0, 1) + 1.0) * 127.5).round().to_kind(Kind::Uint8)
}

#[test]
fn masks_are_framed_bucketed_and_flipped_with_their_images() {
    let root = tempfile::tempdir().unwrap();
    let (data, mask_dir) = (root.path().join("data"), root.path().join("masks"));
    std::fs::create_dir_all(&data).unwrap();
    // An asymmetric picture whose red channel is its own mask: wherever the mask
    // goes under scaling, cropping, bucketing and flipping, the red channel goes too.
    let level = |x: u32, y: u32| if x < 40 || (y > 50 && x < 70) { 255 } else { (x * 2 + y) as u8 / 3 };
    for (name, w, h) in [("wide", 150u32, 100u32), ("tall", 64, 112), ("square", 64, 64)] {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([level(x, y), 90, 160])).save(data.join(format!("{name}.png"))).unwrap();
        save_mask(&mask_dir.join(format!("{name}.png")), w, h, level);
    }
    for bucketing in [false, true] {
        let config = masked_config(
            root.path(),
            "frames",
            &data,
            Some(&mask_dir),
            &format!("  masked_loss: true\n  aspect_ratio_bucketing: {bucketing}\n"),
        );
        let config = load(&config);
        let buckets = Buckets::for_run(&config, dreambooth::data::buckets::source_size_multiple(&config.source_checkpoint));
        let examples = dataset::load_instances(&config, &buckets).unwrap();
        assert_eq!(examples.len(), 3);
        for e in &examples {
            let mask = e.mask.as_ref().expect("every image has its mask");
            let (fw, fh) = e.frame();
            assert_eq!(mask.size(), [1, fh as i64, fw as i64]);
            let red = red_channel(&e.pixels);
            let off = (mask.to_kind(Kind::Int) - red.to_kind(Kind::Int)).abs().max().int64_value(&[]);
            assert!(off <= 1, "bucketing {bucketing}, frame {fw}×{fh}: the mask is {off} levels off its image's red channel");
        }
        if bucketing {
            let frames: Vec<(u32, u32)> = examples.iter().map(|e| e.frame()).collect();
            assert!(frames.iter().any(|&(w, h)| w > h) && frames.iter().any(|&(w, h)| w < h), "{frames:?}");
        }
        // Flipped in the batch as the latents are: the weights of a flipped
        // example are the area averages of its flipped red channel.
        let data = dataset::Dataset { instances: examples, classes: vec![Vec::new()], prior_weights: vec![1.0] };
        for (i, e) in data.instances.iter().enumerate() {
            let (fw, fh) = e.frame();
            let latent = (i64::from(fh / 4), i64::from(fw / 4));
            let plan = BatchPlan { items: vec![(false, 0, i, true)], shuffled: vec![None] };
            let weights = data.loss_weights(&plan, latent, 0.0);
            let red = red_channel(&e.pixels).flip([2]);
            let want = masks::area_resize(&(red.to_kind(Kind::Float) / 255.0).unsqueeze(0), latent);
            let off = (&weights - &want).abs().max().double_value(&[]);
            assert!(off <= 1.0 / 255.0 + 1e-6, "a flipped example's weights are {off} off its flipped image");
        }
    }
}

#[test]
fn a_half_mask_gives_the_loss_of_its_definition() {
    use dreambooth::train::step::{denoising_loss, draw_noise, masked_denoising_loss, ExampleWeights, LossInputs, PredictionType};
    let root = tempfile::tempdir().unwrap();
    let (data, mask_dir) = (root.path().join("data"), root.path().join("masks"));
    subject_images(&data, 1);
    // Left half white, right half black: on the 16 × 16 latent grid (factor 4),
    // columns 0..8 weigh 1 and 8..16 weigh 0.
    save_mask(&mask_dir.join("img-0.png"), 64, 64, |x, _| if x < 32 { 255 } else { 0 });
    let config = masked_config(root.path(), "half", &data, Some(&mask_dir), "  masked_loss: true\n");
    let t = Trainer::start(load(&config), quiet()).unwrap();
    let _guard = tch::no_grad_guard();
    let e = &t.data.instances[0];
    let (mean, _) = &e.cached.as_ref().unwrap()[0];
    let latents = mean * t.sd.vae_config.scaling_factor;
    let size = latents.size();
    let plan = BatchPlan { items: vec![(false, 0, 0, false)], shuffled: vec![None] };
    let weights = t.data.loss_weights(&plan, (size[2], size[3]), 0.0);
    let left = Tensor::arange(size[3], (Kind::Int64, Device::Cpu)).lt(size[3] / 2).to_kind(Kind::Float);
    assert!(weights.equal(&left.view([1, 1, 1, -1]).expand([1, 1, size[2], size[3]], false)), "the half mask's weights");
    // The flipped image learns its right half.
    let flipped = BatchPlan { items: vec![(false, 0, 0, true)], shuffled: vec![None] };
    assert!(t.data.loss_weights(&flipped, (size[2], size[3]), 0.0).equal(&weights.flip([3])));

    let schedule = dreambooth::scheduler::NoiseSchedule::new(&t.sd.scheduler_config).unwrap();
    let prediction = PredictionType::from_config(&t.sd.scheduler_config).unwrap();
    let ehs = dreambooth::model::unet::Conditioning::text(t.sd.encode_prompt("a photo of sks thing", 1).hidden);
    let noise = draw_noise(&mut dreambooth::rng::CpuRng::new(5), &size, 1000, 0.0);
    let coefficients = ExampleWeights::all_instance(1).coefficients_tensor();
    let inputs = LossInputs { latents: &latents, noise: &noise.noise, timesteps: &noise.timesteps, conditioning: &ehs, coefficients: &coefficients };
    let masked = masked_denoising_loss(&t.sd.unet, &schedule, prediction, 0.0, &inputs, Some(&weights), &|f| f());
    let plain = denoising_loss(&t.sd.unet, &schedule, prediction, 0.0, &inputs, &|f| f());
    // The definition, in float64 from the prediction and the target: the squared
    // error of the left half's cells, summed, over every cell of the latent.
    let error = (&plain.model_pred - &plain.target).to_kind(Kind::Double).square();
    let cells = error.numel() as f64;
    let want = error.narrow(3, 0, size[3] / 2).sum(Kind::Double).double_value(&[]) / cells;
    let got = masked.loss.double_value(&[]);
    assert!((got - want).abs() <= 1e-6 * want.abs(), "masked loss {got}, by its definition {want}");
    let whole = plain.loss.double_value(&[]);
    assert!(got < whole && got > 0.0, "half the picture's loss {got} against the whole's {whole}");
}

#[test]
fn all_white_masks_train_bit_identically_to_no_masks_and_a_missing_mask_is_named() {
    let root = tempfile::tempdir().unwrap();
    let (data, mask_dir) = (root.path().join("data"), root.path().join("masks"));
    subject_images(&data, 3);
    // img-2 has no mask: it trains unmasked, which is also all-white.
    for k in 0..2 {
        save_mask(&mask_dir.join(format!("img-{k}.png")), 64, 64, |_, _| 255);
    }
    let training = "  steps_per_image: 2\n  random_flip: true\n  batch_size: 2\n";
    let plain = masked_config(root.path(), "plain", &data, None, training);
    let mut a = Trainer::start(load(&plain), quiet()).unwrap();
    a.run().unwrap();
    let masked = masked_config(root.path(), "masked", &data, Some(&mask_dir), &format!("{training}  masked_loss: true\n"));
    let mut b = Trainer::start(load(&masked), quiet()).unwrap();
    assert!(b.data.instances[0].mask.is_some() && b.data.instances[2].mask.is_none());
    b.run().unwrap();
    for ((k, x), (_, y)) in trained_weights(&a).iter().zip(&trained_weights(&b)) {
        assert!(x.equal(y), "{k} differs between all-white masks and no masks");
    }
    let warnings: Vec<String> =
        named_events(&b.run_dir, "warning").iter().map(|w| w["message"].as_str().unwrap().to_string()).collect();
    assert!(
        warnings.iter().any(|w| w.contains("1 image has no mask") && w.contains("img-2.png") && w.contains("unmasked")),
        "{warnings:?}"
    );
    assert!(!warnings.iter().any(|w| w.contains("img-0.png")), "{warnings:?}");
}

#[test]
fn a_black_mask_leaves_only_the_unmasked_weight() {
    let root = tempfile::tempdir().unwrap();
    let (data, mask_dir) = (root.path().join("data"), root.path().join("masks"));
    subject_images(&data, 1);
    save_mask(&mask_dir.join("img-0.png"), 64, 64, |_, _| 0);
    let plain = masked_config(root.path(), "plain", &data, None, "");
    let first_loss = |config: &Path| Trainer::start(load(config), quiet()).unwrap().train_step().unwrap();
    let whole = first_loss(&plain);
    let black = masked_config(root.path(), "black", &data, Some(&mask_dir), "  masked_loss: true\n");
    assert_eq!(first_loss(&black), 0.0, "a black mask with unmasked_weight 0 learns nothing");
    let kept = masked_config(root.path(), "kept", &data, Some(&mask_dir), "  masked_loss: true\n  unmasked_weight: 0.25\n");
    let quarter = first_loss(&kept);
    assert!((quarter - 0.25 * whole).abs() <= 1e-6 * whole, "{quarter} is not a quarter of {whole}");
}

/// The error of starting `config`, its exit status, and whether a run directory was left.
fn refusal(root: &Path, config: &Path, name: &str) -> (String, i32, bool) {
    let err = match dreambooth::config::load_run_config(config) {
        Err(e) => e,
        Ok(c) => match Trainer::start(c, quiet()) {
            Err(e) => e,
            Ok(_) => panic!("{name} started"),
        },
    };
    (dreambooth::error::one_line(&err), dreambooth::error::exit_code(&err), root.join("runs").join(name).exists())
}

#[test]
fn bad_mask_settings_are_one_sentence_before_anything_is_made() {
    let root = tempfile::tempdir().unwrap();
    let (data, mask_dir) = (root.path().join("data"), root.path().join("masks"));
    subject_images(&data, 2);
    let missing = root.path().join("no-such-masks");
    let cases: Vec<(&str, Option<&Path>, &str, Vec<&str>)> = vec![
        ("missing", Some(&missing), "  masked_loss: true\n", vec!["concepts[0].mask_dir", "does not exist"]),
        ("nomasks", None, "  masked_loss: true\n", vec!["training.masked_loss", "mask_dir"]),
        ("weight", Some(&mask_dir), "  masked_loss: true\n  unmasked_weight: 1.5\n", vec!["training.unmasked_weight", "1.5", "between 0 and 1"]),
        ("empty", Some(&mask_dir), "  masked_loss: true\n", vec!["concepts[0].mask_dir", "holds no masks"]),
        ("same", Some(&data), "  masked_loss: true\n", vec!["concepts[0].mask_dir", "is the instance_data_dir"]),
    ];
    std::fs::create_dir_all(&mask_dir).unwrap();
    for (name, dir, training, words) in cases {
        let config = masked_config(root.path(), name, &data, dir, training);
        let (message, status, left) = refusal(root.path(), &config, name);
        assert!(words.iter().all(|w| message.contains(w)), "{name}: {message}");
        assert_eq!(status, 2, "{name}: {message}");
        assert!(!message.contains('\n') && !left, "{name}: {message} (run directory left: {left})");
    }
    // A mask that cannot line up with its image names both files.
    save_mask(&mask_dir.join("img-0.png"), 32, 64, |_, _| 255);
    let config = masked_config(root.path(), "shape", &data, Some(&mask_dir), "  masked_loss: true\n");
    let (message, status, left) = refusal(root.path(), &config, "shape");
    assert!(message.contains("img-0.png") && message.contains("32 × 64") && message.contains("64 × 64"), "{message}");
    assert_eq!(status, 2);
    assert!(!left);
}

#[test]
fn a_mask_folder_without_masked_loss_is_a_warning() {
    let root = tempfile::tempdir().unwrap();
    let (data, mask_dir) = (root.path().join("data"), root.path().join("masks"));
    subject_images(&data, 1);
    save_mask(&mask_dir.join("img-0.png"), 64, 64, |_, _| 0);
    save_mask(&mask_dir.join("img-9.png"), 64, 64, |_, _| 0);
    let config = masked_config(root.path(), "off", &data, Some(&mask_dir), "  steps_per_image: 1\n  unmasked_weight: 0.1\n");
    let mut t = Trainer::start(load(&config), quiet()).unwrap();
    assert!(t.data.instances[0].mask.is_none(), "masks are not loaded when masked_loss is off");
    t.run().unwrap();
    let warnings: Vec<String> =
        named_events(&t.run_dir, "warning").iter().map(|w| w["message"].as_str().unwrap().to_string()).collect();
    assert!(warnings.iter().any(|w| w.contains("concepts[0].mask_dir is set but `training.masked_loss` is off")), "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("`unmasked_weight`") && w.contains("masked_loss: true")), "{warnings:?}");
    // With masked_loss on, a mask that matches no image is named.
    let on = masked_config(root.path(), "on", &data, Some(&mask_dir), "  steps_per_image: 1\n  masked_loss: true\n");
    let mut t = Trainer::start(load(&on), quiet()).unwrap();
    t.run().unwrap();
    let warnings: Vec<String> =
        named_events(&t.run_dir, "warning").iter().map(|w| w["message"].as_str().unwrap().to_string()).collect();
    assert!(warnings.iter().any(|w| w.contains("1 mask matches no image") && w.contains("img-9.png")), "{warnings:?}");
}

#[test]
fn cuda_graphs_take_the_masks_as_inputs() {
    let root = tempfile::tempdir().unwrap();
    let (data, mask_dir) = (root.path().join("data"), root.path().join("masks"));
    subject_images(&data, 1);
    save_mask(&mask_dir.join("img-0.png"), 64, 64, |x, y| if x < 20 || y > 50 { 255 } else { 40 });
    // Random flips change the weights from step to step: a graph replay that kept
    // the weights it was captured with would train differently.
    let training = "  steps_per_image: 5\n  random_flip: true\n  masked_loss: true\n";
    let eager = masked_config(root.path(), "eager", &data, Some(&mask_dir), training);
    let mut a = Trainer::start(load(&eager), quiet()).unwrap();
    a.run().unwrap();
    let graphs = masked_config(root.path(), "graphs", &data, Some(&mask_dir), training);
    let mut b = Trainer::start(load(&graphs), quiet()).unwrap();
    b.simulate_cuda_graphs();
    b.run().unwrap();
    assert_eq!(b.cuda_graph_state(), "captured");
    for ((k, x), (_, y)) in trained_weights(&a).iter().zip(&trained_weights(&b)) {
        assert!(x.equal(y), "{k} differs with CUDA graphs (simulated)");
    }
}

#[test]
fn validation_weights_held_out_photos_by_their_masks() {
    let root = tempfile::tempdir().unwrap();
    let (data, held, mask_dir) = (root.path().join("data"), root.path().join("held"), root.path().join("masks"));
    subject_images(&data, 1);
    subject_images(&held, 2);
    // Masks are looked up by file name in the concept's mask_dir: the held-out
    // photos get names of their own, and black masks.
    for k in 0..2 {
        std::fs::rename(held.join(format!("img-{k}.png")), held.join(format!("held-{k}.png"))).unwrap();
    }
    save_mask(&mask_dir.join("img-0.png"), 64, 64, |_, _| 255);
    save_mask(&mask_dir.join("held-0.png"), 64, 64, |_, _| 0);
    save_mask(&mask_dir.join("held-1.png"), 64, 64, |_, _| 0);
    let with_held = |path: &Path| {
        let yaml = std::fs::read_to_string(path).unwrap();
        let prompt = "    instance_prompt: a photo of sks thing\n";
        std::fs::write(path, yaml.replacen(prompt, &format!("{prompt}    validation_data_dir: {}\n", held.display()), 1)).unwrap();
    };
    let training = "  steps_per_image: 1\n  validate_every_n_epochs: 1\n";
    let plain = masked_config(root.path(), "plain", &data, None, training);
    with_held(&plain);
    let masked = masked_config(root.path(), "masked", &data, Some(&mask_dir), &format!("{training}  masked_loss: true\n  unmasked_weight: 0.25\n"));
    with_held(&masked);
    let first_validation = |config: &Path| {
        let mut t = Trainer::start(load(config), quiet()).unwrap();
        t.run().unwrap();
        let warnings = named_events(&t.run_dir, "warning");
        assert!(!warnings.iter().any(|w| w["message"].as_str().unwrap().contains("held-")), "{warnings:?}");
        named_events(&t.run_dir, "validation")[0]["loss"].as_f64().unwrap()
    };
    let whole = first_validation(&plain);
    let weighted = first_validation(&masked);
    // Black held-out masks keep a quarter of every cell: a quarter of the loss.
    assert!((weighted - 0.25 * whole).abs() <= 1e-6 * whole, "masked validation {weighted}, unmasked {whole}");
}

#[test]
fn a_masked_run_resumes_exactly() {
    let root = tempfile::tempdir().unwrap();
    let (data, mask_dir) = (root.path().join("data"), root.path().join("masks"));
    subject_images(&data, 2);
    save_mask(&mask_dir.join("img-0.png"), 64, 64, |x, _| if x < 40 { 255 } else { 0 });
    let training = "  steps_per_image: 2\n  random_flip: true\n  masked_loss: true\n  unmasked_weight: 0.1\n";
    let full = masked_config(root.path(), "full", &data, Some(&mask_dir), training);
    let mut a = Trainer::start(load(&full), quiet()).unwrap();
    a.run().unwrap();
    let log = std::fs::read_to_string(a.run_dir.join("train.log")).unwrap();
    assert!(log.contains("masked loss: 1 of 2 instance images have a mask"), "{log}");
    let cut = masked_config(root.path(), "cut", &data, Some(&mask_dir), training);
    let b = stopped_and_resumed(&cut, 2);
    for ((k, x), (_, y)) in trained_weights(&a).iter().zip(&trained_weights(&b)) {
        assert!(x.equal(y), "{k} differs after a stop and resume");
    }
}
