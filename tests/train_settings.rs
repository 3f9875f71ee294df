//! One test per training setting, showing it changes what training does.

#[path = "train_support/mod.rs"]
mod support;

use std::path::Path;

use dreambooth::rng::CpuRng;
use dreambooth::train::step::draw_noise;
use dreambooth::train::trainer::Trainer;
use support::*;
use tch::Tensor;

fn snapshot(list: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    list.iter().map(|(k, t)| (k.clone(), t.detach().copy())).collect()
}

fn changed(a: &[(String, Tensor)], b: &[(String, Tensor)], filter: &dyn Fn(&str) -> bool) -> (usize, usize) {
    let mut n = 0;
    let mut total = 0;
    for ((k, x), (_, y)) in a.iter().zip(b) {
        if filter(k) {
            total += 1;
            if !x.equal(y) {
                n += 1;
            }
        }
    }
    (n, total)
}

fn trainer(root: &Path, name: &str, images: usize, training: &str) -> Trainer {
    let data = root.join(format!("data-{name}"));
    subject_images(&data, images);
    let cfg = write_config(root, name, &data, training);
    Trainer::start(load(&cfg), quiet()).unwrap()
}

#[test]
fn offset_noise_shifts_each_channel_mean() {
    let shape = [4, 4, 16, 16];
    let plain = draw_noise(&mut CpuRng::new(1), &shape, 1000, 0.0).noise;
    let offset = draw_noise(&mut CpuRng::new(1), &shape, 1000, 0.5).noise;
    let spread = |t: &Tensor| t.mean_dim(&[2i64, 3][..], false, tch::Kind::Float).std(true).double_value(&[]);
    assert!(spread(&offset) > 4.0 * spread(&plain), "{} vs {}", spread(&offset), spread(&plain));
}

#[test]
fn text_encoder_stops_after_its_ratio_and_layer_norms_can_stay_frozen() {
    let root = tempfile::tempdir().unwrap();
    let mut t = trainer(root.path(), "te", 1, "  steps_per_image: 4\n  text_encoder_train_ratio: 0.5\n  freeze_clip_normalization: true\n");
    assert_eq!(t.text_encoder_steps, 2);
    let start = snapshot(t.params.text_encoder("text_encoder"));
    t.train_step().unwrap();
    t.train_step().unwrap();
    let mid = snapshot(t.params.text_encoder("text_encoder"));
    assert!(t.cached_text_states().is_empty(), "a training text encoder's output was cached");
    let (n, total) = changed(&start, &mid, &|k| !k.contains("layer_norm"));
    assert!(n > total / 2, "text encoder trained only {n} of {total} tensors");
    let (n, _) = changed(&start, &mid, &|k| k.contains("layer_norm"));
    assert_eq!(n, 0, "layer norms changed under freeze_clip_normalization");
    t.train_step().unwrap();
    t.train_step().unwrap();
    let (n, _) = changed(&mid, &snapshot(t.params.text_encoder("text_encoder")), &|_| true);
    assert_eq!(n, 0, "the text encoder kept training after its ratio");
    // Frozen from step 3: its output for the one prompt is computed once, from
    // the trained weights.
    let cached = t.cached_text_states();
    assert_eq!(cached.len(), 1);
    let (ids, states) = cached.iter().next().unwrap();
    assert_eq!(ids, &t.data.instances[0].ids);
    let fresh = tch::no_grad(|| t.sd.text.first().model.forward(&Tensor::from_slice(ids).view([1, -1]), 1));
    assert!(states.hidden.equal(&fresh), "cached text states differ from the trained text encoder's output");
}

/// `text_encoder_learning_rate`: AdamW's first update is linear in the rate, so
/// the text encoder's first step at a quarter of `learning_rate` is a quarter
/// of the step it takes without the key; the UNet's step is the same.
#[test]
fn text_encoder_learning_rate_sets_the_text_encoders_own_step() {
    let root = tempfile::tempdir().unwrap();
    let base = "  steps_per_image: 2\n  text_encoder_train_ratio: 1\n";
    let mut same = trainer(root.path(), "te-lr-same", 1, base);
    let mut own = trainer(root.path(), "te-lr-own", 1, &format!("{base}  text_encoder_learning_rate: 2.5e-5\n"));
    let start = snapshot(same.params.text_encoder("text_encoder"));
    same.train_step().unwrap();
    own.train_step().unwrap();
    let (n, total) = changed(&same.params.unet, &own.params.unet, &|_| true);
    assert_eq!(n, 0, "{n} of {total} UNet tensors differ: the UNet's rate changed");
    let mut largest = 0f64;
    let mut off = 0f64;
    for (((key, a), (_, b)), (_, p)) in same.params.text_encoder("text_encoder").iter().zip(own.params.text_encoder("text_encoder")).zip(&start) {
        let (step_same, step_own) = (a - p, b - p);
        largest = largest.max(step_same.abs().max().double_value(&[]));
        off = off.max((&step_own - &step_same * 0.25).abs().max().double_value(&[]));
        assert!(step_own.abs().max().double_value(&[]) > 0.0 || key.contains("position"), "`{key}` did not train");
    }
    assert!(largest > 5e-5, "the text encoder barely moved ({largest})");
    assert!(off < 1e-3 * largest, "the text encoder's step is not a quarter: off by {off} of {largest}");
    let log = std::fs::read_to_string(own.run_dir.join("train.log")).unwrap();
    assert!(log.contains("text encoder trains for 2 steps at learning rate 2.5e-5"), "{log}");
}

/// A `text_encoder_learning_rate` that does nothing (the text encoder does not train)
/// is warned about when the user set it, not when it is their preset's (6gb sets one).
#[test]
fn an_unused_text_encoder_rate_is_warned_about_only_when_the_user_set_it() {
    let root = tempfile::tempdir().unwrap();
    let warned = |name: &str, preset: &str, training: &str| {
        let data = root.path().join(format!("data-{name}"));
        subject_images(&data, 1);
        let cfg = write_config(root.path(), name, &data, training);
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, format!("{preset}{text}")).unwrap();
        let t = Trainer::start(load(&cfg), quiet()).unwrap();
        named_events(&t.run_dir, "warning")
            .iter()
            .any(|w| w["message"].as_str().unwrap().contains("`text_encoder_learning_rate` is set but the text encoder does not train"))
    };
    assert!(!warned("te-rate-preset", "preset: 6gb\n", "  steps_per_image: 1\n"), "warned about the preset's rate");
    assert!(warned("te-rate-own", "preset: 6gb\n", "  steps_per_image: 1\n  text_encoder_learning_rate: 2.0e-5\n"));
    assert!(warned("te-rate-no-preset", "", "  steps_per_image: 1\n  text_encoder_learning_rate: 5.0e-5\n"));
}

/// The guide's advice that the image count divide by batch × accumulation: a run
/// that breaks it is told what happens (smaller batches; untrained left-overs).
#[test]
fn an_image_count_that_batches_unevenly_is_warned_about() {
    let root = tempfile::tempdir().unwrap();
    let warning = |name: &str, images: usize, training: &str| -> Option<String> {
        let t = trainer(root.path(), name, images, training);
        named_events(&t.run_dir, "warning").iter().map(|w| w["message"].as_str().unwrap().to_string()).find(|w| w.contains("multiple"))
    };
    let smaller = warning("uneven-batch", 3, "  steps_per_image: 1\n  batch_size: 2\n").unwrap();
    assert_eq!(smaller, "3 instance images are not a multiple of batch_size × gradient_accumulation_steps = 2: the last batch of each epoch is smaller");
    let left_over = warning("uneven-accumulation", 4, "  steps_per_image: 1\n  gradient_accumulation_steps: 3\n").unwrap();
    assert!(left_over.ends_with("and accumulation carries across epoch boundaries, and 1 left-over micro-batches at the end are not trained"), "{left_over}");
    assert_eq!(warning("even", 4, "  steps_per_image: 1\n  batch_size: 2\n  gradient_accumulation_steps: 2\n"), None);
}

/// A setting the rest of the config leaves without effect is named in a warning;
/// the same settings where they apply are not.
#[test]
fn settings_without_effect_are_warned_about() {
    let root = tempfile::tempdir().unwrap();
    let warnings = |name: &str, training: &str| -> Vec<String> {
        let t = trainer(root.path(), name, 1, &format!("  steps_per_image: 1\n{training}"));
        named_events(&t.run_dir, "warning").iter().map(|w| w["message"].as_str().unwrap().to_string()).collect()
    };
    let unused = warnings(
        "no-effect",
        "  lr_scheduler: constant\n  lr_warmup_steps: 10\n  lora_rank: 16\n  lora_layers: all\n  ema_decay: 0.5\n  \
         freeze_clip_normalization: true\n  lr_end: 0.0\n",
    );
    for expected in [
        "`lr_warmup_steps` applies to schedulers with a warm-up (not `constant`) only",
        "`lora_rank` and `lora_layers` apply to LoRA runs (`use_lora: true`) only",
        "`ema_decay` applies to runs with `use_ema: true` only",
        "`freeze_clip_normalization` applies to runs that fine-tune the text encoder's weights only",
        "`lr_end` applies to `lr_scheduler: polynomial` only",
    ] {
        assert!(unused.iter().any(|w| w == expected), "no {expected:?} in {unused:?}");
    }
    let used = warnings(
        "with-effect",
        "  lr_scheduler: polynomial\n  lr_warmup_steps: 1\n  lr_end: 0.0\n  use_ema: true\n  ema_decay: 0.5\n  \
         text_encoder_train_ratio: 1.0\n  freeze_clip_normalization: true\n",
    );
    assert!(used.iter().all(|w| !w.contains(" only")), "{used:?}");
}

/// `lora_text_encoder_rank` / `lora_text_encoder_alpha`: the text encoder's
/// adapters get their own rank and alpha, the UNet's keep `lora_rank` / `lora_alpha`.
#[test]
fn text_encoder_lora_has_its_own_rank_and_alpha() {
    let root = tempfile::tempdir().unwrap();
    let t = trainer(
        root.path(),
        "te-rank",
        1,
        "  use_lora: true\n  lora_rank: 4\n  lora_alpha: 4\n  text_encoder_train_ratio: 1\n  \
         lora_text_encoder_rank: 2\n  lora_text_encoder_alpha: 1\n",
    );
    let modules = &t.lora.as_ref().expect("a LoRA run").modules;
    let (text, unet): (Vec<_>, Vec<_>) = modules.iter().partition(|m| m.name.starts_with("lora_te_"));
    assert!(!text.is_empty() && !unet.is_empty());
    assert!(text.iter().all(|m| m.down.size()[0] == 2 && m.alpha == 1.0), "text encoder adapters");
    assert!(unet.iter().all(|m| m.down.size()[0] == 4 && m.alpha == 4.0), "UNet adapters");
}

/// The checkpoint size the trainer plans the disk with (and logs) is what a
/// checkpoint takes on disk, less the files' headers and the small state:
/// full fine-tuning with EMA and 8-bit AdamW, and LoRA with the text encoder.
#[test]
fn the_checkpoint_size_estimate_is_what_the_files_take() {
    let root = tempfile::tempdir().unwrap();
    for (name, training) in [
        ("full", "  steps_per_image: 2\n  use_ema: true\n  optimizer: adamw_8bit\n  text_encoder_train_ratio: 0.5\n"),
        ("lora", "  steps_per_image: 2\n  use_lora: true\n  text_encoder_train_ratio: 1\n"),
        ("locon", "  steps_per_image: 2\n  use_lora: true\n  lora_layers: all\n  text_encoder_train_ratio: 1\n"),
    ] {
        let mut t = trainer(root.path(), name, 1, training);
        t.train_step().unwrap();
        let planned = t.checkpoint_bytes();
        let dir = t.checkpoint().unwrap();
        let on_disk: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        eprintln!("{name}: planned {planned} bytes, wrote {on_disk}");
        assert!(planned <= on_disk && on_disk <= planned + planned / 20 + (256 << 10), "{name}: planned {planned} bytes, wrote {on_disk}");
        let log = std::fs::read_to_string(t.run_dir.join("train.log")).unwrap();
        assert!(log.contains("each checkpoint takes about"), "{log}");
        // `dreambooth vram` plans from the model's shapes alone, and says the same.
        let shapes = dreambooth::vram::ModelShapes::from_checkpoint(&t.config.source_checkpoint).unwrap();
        let estimate = dreambooth::vram::estimate(&shapes, &dreambooth::vram::Plan::from_config(&t.config));
        assert_eq!(estimate.checkpoint_bytes, planned, "{name}: the estimator's checkpoint size");
    }
}

/// `lora_layers` chooses the adapted layers: the attention projections; every
/// Linear of the transformer blocks (feed-forward, proj_in/out; CLIP's MLP); and
/// those with the resnet and resampler convolutions (LoCon adapters: a k×k `down`,
/// a 1×1 `up`). Every adapter trains, and the file loads back as the same adapters.
#[test]
fn lora_layers_choose_the_adapted_layers_and_all_of_them_train() {
    let root = tempfile::tempdir().unwrap();
    let mut counts = Vec::new();
    for layers in ["attention", "transformer", "all"] {
        let training = format!("  use_lora: true\n  lora_layers: {layers}\n  text_encoder_train_ratio: 1\n  learning_rate: 1.0e-3\n");
        let mut t = trainer(root.path(), layers, 1, &training);
        let names: Vec<String> = t.lora.as_ref().unwrap().modules.iter().map(|m| m.name.clone()).collect();
        let has = |part: &str| names.iter().any(|n| n.contains(part));
        assert!(has("_attn1_to_q") && has("_self_attn_q_proj"), "{layers}: attention");
        let wide = layers != "attention";
        assert_eq!(has("_ff_net_0_proj") && has("_ff_net_2") && has("_proj_in") && has("_mlp_fc1"), wide, "{layers}: {names:?}");
        let convs = layers == "all";
        assert_eq!(has("_resnets_0_conv1") && has("_time_emb_proj") && has("_downsamplers_0_conv"), convs, "{layers}");
        if convs {
            let m = t.lora.as_ref().unwrap().modules.iter().find(|m| m.name.ends_with("down_blocks_0_resnets_0_conv1")).unwrap();
            assert_eq!((m.down.size().len(), m.down.size()[2], m.up.size()[2..].to_vec()), (4, 3, vec![1, 1]), "a LoCon adapter");
        }
        let before: Vec<Tensor> = t.lora.as_ref().unwrap().modules.iter().map(|m| m.up.copy()).collect();
        t.train_step().unwrap();
        let modules = &t.lora.as_ref().unwrap().modules;
        let still: Vec<&str> = modules.iter().zip(&before).filter(|(m, b)| m.up.equal(b)).map(|(m, _)| m.name.as_str()).collect();
        assert!(still.is_empty(), "{layers}: adapters that did not train: {still:?}");
        let trained = modules.len();
        let dir = t.checkpoint().unwrap();
        let file = dir.join("lora.safetensors");
        let mut fresh = dreambooth::pipeline::StableDiffusion::load(&t.config.source_checkpoint, None, tch::Device::Cpu, Default::default()).unwrap();
        let loaded =
            fresh.attach_lora_file(&file, tch::Kind::Float).unwrap();
        assert_eq!(loaded.modules.len(), trained, "{layers}: the file's adapters");
        counts.push(trained);
    }
    assert!(counts[0] < counts[1] && counts[1] < counts[2], "{counts:?}");
}

#[test]
fn train_unet_false_keeps_the_unet_fixed() {
    let root = tempfile::tempdir().unwrap();
    let mut t = trainer(root.path(), "nounet", 1, "  train_unet: false\n  text_encoder_train_ratio: 1.0\n");
    let start = snapshot(&t.params.unet);
    t.train_step().unwrap();
    assert_eq!(changed(&start, &snapshot(&t.params.unet), &|_| true).0, 0);
}

#[test]
fn ema_weights_differ_from_the_raw_ones() {
    let root = tempfile::tempdir().unwrap();
    let mut t = trainer(root.path(), "ema", 1, "  use_ema: true\n  ema_decay: 0.9\n");
    let start = snapshot(&t.params.unet);
    for _ in 0..3 {
        t.train_step().unwrap();
    }
    let ema = t.ema.as_ref().unwrap();
    assert_eq!(ema.optimization_step, 3);
    let (n, total) = changed(&ema.shadow, &snapshot(&t.params.unet), &|_| true);
    assert!(n > total / 2, "EMA equals the raw weights in {} of {total}", total - n);
    assert!(changed(&ema.shadow, &start, &|_| true).0 > 0, "EMA never moved");
    let dir = t.checkpoint().unwrap();
    assert!(dir.join("ema_unet.safetensors").is_file());
}

#[test]
fn fp16_overflow_skips_the_step_and_halves_the_scale() {
    let root = tempfile::tempdir().unwrap();
    let mut t = trainer(root.path(), "fp16", 1, "  mixed_precision: fp16\n");
    let start = snapshot(&t.params.unet);
    t.scaler.as_mut().unwrap().scale = 1e300; // the scaled loss overflows
    t.train_step().unwrap();
    assert_eq!(t.skipped_steps, 1);
    assert_eq!(t.scaler.as_ref().unwrap().scale, 5e299);
    assert_eq!(changed(&start, &snapshot(&t.params.unet), &|_| true).0, 0, "a skipped step changed weights");
    t.scaler.as_mut().unwrap().scale = 65536.0;
    t.train_step().unwrap();
    assert_eq!(t.skipped_steps, 1);
    assert!(changed(&start, &snapshot(&t.params.unet), &|_| true).0 > 0);
    let log = std::fs::read_to_string(t.run_dir.join("train.log")).unwrap();
    assert!(log.contains("fp16 autocast on the CPU"), "{log}");
}

#[test]
fn set_grads_to_none_leaves_gradients_undefined() {
    let root = tempfile::tempdir().unwrap();
    let mut t = trainer(root.path(), "none", 1, "  set_grads_to_none: true\n");
    t.train_step().unwrap();
    assert!(t.trainable().iter().all(|(_, p)| !p.grad().defined()));
    let mut t = trainer(root.path(), "zero", 1, "  set_grads_to_none: false\n");
    t.train_step().unwrap();
    assert!(t.trainable().iter().all(|(_, p)| p.grad().defined() && p.grad().abs().max().double_value(&[]) == 0.0));
}

#[test]
fn clip_skip_min_snr_and_cache_latents_change_the_loss() {
    let root = tempfile::tempdir().unwrap();
    let first_loss = |name: &str, training: &str| trainer(root.path(), name, 1, training).train_step().unwrap();
    let base = first_loss("base", "");
    assert_ne!(base, first_loss("skip", "  clip_skip: 2\n"));
    assert_ne!(base, first_loss("snr", "  min_snr_gamma: 0.0001\n"));
    let t = trainer(root.path(), "cached", 1, "  cache_latents: true\n");
    assert!(t.data.instances[0].cached.is_some());
    let mut t = trainer(root.path(), "uncached", 1, "  cache_latents: false\n");
    assert!(t.data.instances[0].cached.is_none());
    t.train_step().unwrap();
}

/// `shuffle_tags` reorders a caption's tags after the first on each draw (the
/// first stays), so the text the UNet is conditioned on changes, and a run
/// without it draws exactly as before.
#[test]
fn shuffle_tags_reorders_the_tags_after_the_first() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 1);
    std::fs::write(data.join("img-0.txt"), "sks thing, red, disc, on blue, round, centred").unwrap();
    let start = |name: &str, training: &str| {
        let cfg = write_config(root.path(), name, &data, training);
        let text = std::fs::read_to_string(&cfg).unwrap().replace("instance_prompt: a photo of sks thing", "instance_prompt: '[filewords]'");
        std::fs::write(&cfg, text).unwrap();
        Trainer::start(load(&cfg), quiet()).unwrap()
    };
    let mut t = start("shuffled", "  shuffle_tags: true\n");
    let mut rng = CpuRng::new(3);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let plan = dreambooth::data::dataset::next_batch(&t.data, &mut t.data_state.clone(), &mut rng, 1, false, true);
        let prompt = plan.shuffled[0].clone().unwrap_or_else(|| t.data.instances[0].prompt.clone());
        assert!(prompt.starts_with("sks thing, "), "{prompt}");
        let mut tags: Vec<&str> = prompt.split(", ").collect();
        tags.sort();
        assert_eq!(tags, ["centred", "disc", "on blue", "red", "round", "sks thing"]);
        seen.insert(prompt);
    }
    assert!(seen.len() > 3, "{seen:?}");
    let shuffled_loss = t.train_step().unwrap();
    let plain_loss = start("plain", "").train_step().unwrap();
    assert_ne!(shuffled_loss, plain_loss);
}

/// `max_token_length: 150` reads a long caption in two windows joined as
/// kohya's trainers join them, where 75 cuts it: the UNet sees other text.
#[test]
fn max_token_length_reads_long_captions_in_windows() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 1);
    std::fs::write(data.join("img-0.txt"), format!("sks thing{}", ", a red disc on blue".repeat(20))).unwrap();
    let start = |name: &str, training: &str| {
        let cfg = write_config(root.path(), name, &data, training);
        let text = std::fs::read_to_string(&cfg).unwrap().replace("instance_prompt: a photo of sks thing", "instance_prompt: '[filewords]'");
        std::fs::write(&cfg, text).unwrap();
        Trainer::start(load(&cfg), quiet()).unwrap()
    };
    let mut long = start("long", "  max_token_length: 150\n  text_encoder_train_ratio: 1.0\n");
    let ids = Tensor::from_slice(&long.data.instances[0].ids).view([1, -1]);
    assert_eq!(ids.size(), [1, 154]);
    let _guard = tch::no_grad_guard();
    let te = &long.sd.text.first().model;
    let joined = te.forward_chunks(&ids, 1, 77);
    assert_eq!(joined.size()[..2], [1, 152]);
    let window = |j: i64| te.forward(&ids.narrow(1, 77 * j, 77), 1);
    let (w0, w1) = (window(0), window(1));
    for (ours, theirs) in [
        (joined.narrow(1, 0, 1), w0.narrow(1, 0, 1)),
        (joined.narrow(1, 1, 75), w0.narrow(1, 1, 75)),
        (joined.narrow(1, 76, 75), w1.narrow(1, 1, 75)),
        (joined.narrow(1, 151, 1), w1.narrow(1, 76, 1)),
    ] {
        assert!(ours.allclose(&theirs, 1e-5, 1e-6, false));
    }
    drop(_guard);
    let log = |t: &Trainer| std::fs::read_to_string(t.run_dir.join("train.log")).unwrap();
    assert!(!log(&long).contains("are cut there"), "{}", log(&long));
    let long_loss = long.train_step().unwrap();
    // Previews encode their prompt and negative prompt the same way.
    long.config.concepts[0].sample_prompts = vec!["sks thing on grass".into()];
    assert_eq!(long.previews().unwrap().len(), 1);
    let mut short = start("short", "  text_encoder_train_ratio: 1.0\n");
    assert!(log(&short).contains("1 prompts are longer than the 75 tokens"), "{}", log(&short));
    assert_ne!(long_loss, short.train_step().unwrap());
    // The frozen encoder's path (its states cached) reads the windows too.
    start("frozen", "  max_token_length: 150\n").train_step().unwrap();
}

#[test]
fn pause_after_epochs_emits_pause_and_resume() {
    let root = tempfile::tempdir().unwrap();
    let mut t = trainer(root.path(), "pause", 1, "  steps_per_image: 2\n  pause_after_n_epochs: 1\n  pause_seconds: 1\n");
    t.run().unwrap();
    let names = event_names(&t.run_dir);
    let pause = names.iter().position(|n| n == "pause").expect("a pause event");
    assert_eq!(names[pause + 1], "resume", "{names:?}");
    assert_eq!(names.iter().filter(|n| *n == "pause").count(), 1, "no pause after the last epoch: {names:?}");
}

#[test]
fn prior_preservation_generates_the_missing_class_images() {
    let root = tempfile::tempdir().unwrap();
    let class_dir = root.path().join("class");
    other_images(&class_dir, 1);
    let data = root.path().join("data");
    subject_images(&data, 1);
    let cfg = write_config(root.path(), "prior", &data, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "    instance_prompt: a photo of sks thing\n",
        &format!(
            "    instance_prompt: a photo of sks thing\n    class_prompt: a photo of a thing\n    class_data_dir: {}\n    num_class_images: 3\n    prior_loss_weight: 0.5\n",
            class_dir.display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let mut t = Trainer::start(load(&cfg), quiet()).unwrap();
    let files = dreambooth::data::images::list_images(&class_dir, "class").unwrap();
    assert_eq!(files.len(), 3);
    assert_eq!(t.data.classes[0].len(), 3);
    t.train_step().unwrap();
}

/// The class-generation keys reach the sampler: each one changes the class image.
#[test]
fn class_generation_settings_change_the_class_images() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    subject_images(&data, 1);
    let class_image = |name: &str, extra: &str| -> Vec<u8> {
        let class_dir = root.path().join(format!("class-{name}"));
        let cfg = write_config(root.path(), name, &data, "");
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            "    instance_prompt: a photo of sks thing\n",
            &format!(
                "    instance_prompt: a photo of sks thing\n    class_prompt: a photo of a thing\n    class_data_dir: {}\n    num_class_images: 1\n{extra}",
                class_dir.display()
            ),
        );
        std::fs::write(&cfg, text).unwrap();
        Trainer::start(load(&cfg), quiet()).unwrap();
        std::fs::read(class_dir.join("class-00000.png")).unwrap()
    };
    let plain = class_image("plain", "");
    assert_eq!(plain, class_image("same", ""), "class images are reproducible");
    for (name, extra) in [
        ("negative", "    class_negative_prompt: blurry\n"),
        ("guidance", "    class_guidance_scale: 1.0\n"),
        ("steps", "    class_infer_steps: 1\n"),
    ] {
        assert_ne!(plain, class_image(name, extra), "{name}");
    }
}

/// `[filewords]` and the concept's tokens give each image its own prompt, and
/// class images are generated from the class version of each caption.
#[test]
fn filewords_and_tokens_give_each_image_its_own_prompt() {
    let root = tempfile::tempdir().unwrap();
    let (data, class_dir) = (root.path().join("data"), root.path().join("class"));
    subject_images(&data, 2);
    std::fs::write(data.join("img-0.txt"), "a thing on grass\n").unwrap();
    std::fs::write(data.join("img-1.txt"), "sks thing, close-up").unwrap();
    let long = "a thing, ".repeat(40);
    let cfg = write_config(root.path(), "filewords", &data, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "    instance_prompt: a photo of sks thing\n",
        &format!(
            "    instance_prompt: a photo of [filewords]\n    instance_token: sks\n    class_token: thing\n    \
             class_prompt: a photo of [filewords]\n    class_data_dir: {}\n    num_class_images: 2\n",
            class_dir.display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let mut t = Trainer::start(load(&cfg), quiet()).unwrap();
    let prompts: Vec<&str> = t.data.instances.iter().map(|e| e.prompt.as_str()).collect();
    assert_eq!(prompts, ["a photo of sks thing on grass", "a photo of sks thing, close-up"]);
    assert_ne!(t.data.instances[0].ids, t.data.instances[1].ids);
    // One class image per instance caption, its prompt (no subject token) beside it.
    let class_prompts: Vec<&str> = t.data.classes[0].iter().map(|e| e.prompt.as_str()).collect();
    assert_eq!(class_prompts, ["a photo of a thing on grass", "a photo of thing, close-up"]);
    for (k, prompt) in class_prompts.iter().enumerate() {
        assert_eq!(std::fs::read_to_string(class_dir.join(format!("class-{k:05}.txt"))).unwrap(), *prompt);
    }
    t.train_step().unwrap();
    // A preview prompt with [filewords] takes the instance images' words in turn.
    t.config.concepts[0].sample_prompts = vec!["[filewords], at night".into(), "[filewords], at night".into()];
    t.previews().unwrap();
    let sample = named_events(&t.run_dir, "sample").pop().unwrap();
    assert_eq!(sample["prompts"], serde_json::json!(["sks thing on grass, at night", "sks thing, close-up, at night"]));

    // A caption longer than CLIP reads is cut, and the log says so.
    std::fs::write(data.join("img-1.txt"), &long).unwrap();
    let cfg_long = write_config(root.path(), "long", &data, "");
    let yaml = std::fs::read_to_string(&cfg_long).unwrap().replace("instance_prompt: a photo of sks thing", "instance_prompt: '[filewords]'");
    std::fs::write(&cfg_long, yaml).unwrap();
    let t = Trainer::start(load(&cfg_long), quiet()).unwrap();
    assert_eq!(t.data.instances[1].ids.len(), 77);
    let log = std::fs::read_to_string(t.run_dir.join("train.log")).unwrap();
    assert!(log.contains("1 prompts are longer than the 75 tokens the text encoder reads"), "{log}");
    // So is a preview prompt, which would otherwise draw less than it says.
    let cfg_preview = write_config(root.path(), "long-preview", &data, "");
    let yaml = std::fs::read_to_string(&cfg_preview)
        .unwrap()
        .replace("instance_prompt: a photo of sks thing", &format!("instance_prompt: a photo of sks thing\n    sample_prompts: [{long:?}]"));
    std::fs::write(&cfg_preview, yaml).unwrap();
    let t = Trainer::start(load(&cfg_preview), quiet()).unwrap();
    let log = std::fs::read_to_string(t.run_dir.join("train.log")).unwrap();
    assert!(log.contains("has 120 tokens and the text encoder reads 75: the rest is cut; `training.max_token_length: 150` or 225 reads more"), "{log}");
    std::fs::write(data.join("img-1.txt"), "sks thing, close-up").unwrap();

    // Captions a prompt does not ask for are not used, and the log says so.
    let cfg = write_config(root.path(), "plain", &data, "");
    let t = Trainer::start(load(&cfg), quiet()).unwrap();
    assert!(t.data.instances.iter().all(|e| e.prompt == "a photo of sks thing"));
    let log = std::fs::read_to_string(t.run_dir.join("train.log")).unwrap();
    assert!(log.contains("2 images have a caption (.txt) that is not used"), "{log}");
}

#[test]
fn a_second_trainer_on_a_live_run_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let mut t = trainer(root.path(), "locked", 1, "");
    t.train_step().unwrap();
    t.checkpoint().unwrap();
    let err = Trainer::resume(&t.run_dir, quiet()).err().expect("refused").to_string();
    assert!(err.contains("in use by another trainer"), "{err}");
}

/// `aspect_ratio_bucketing`: a wide photo trains in a wide frame with its sides
/// kept (a centre square cuts them off), a micro-batch never mixes frames, and
/// class images are generated in the frames of the instance images they pair with.
#[test]
fn aspect_ratio_buckets_keep_the_whole_picture_and_batch_each_frame_apart() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Wide pictures with a red band at the left edge; a tall one and a square one.
    for k in 0..2 {
        image::RgbImage::from_fn(128, 64, |x, _| if x < 12 { image::Rgb([240, 20, 20]) } else { image::Rgb([20, 40, 200 - 50 * k]) })
            .save(data.join(format!("wide-{k}.png")))
            .unwrap();
    }
    image::RgbImage::from_pixel(64, 128, image::Rgb([20, 200, 40])).save(data.join("tall.png")).unwrap();
    image::RgbImage::from_pixel(64, 64, image::Rgb([200, 200, 40])).save(data.join("square.png")).unwrap();
    let class_dir = root.path().join("class");
    let start = |name: &str, bucketing: bool| {
        let cfg = write_config(root.path(), name, &data, &format!("aspect_ratio_bucketing: {bucketing}\nbatch_size: 2"));
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            "    instance_prompt: a photo of sks thing\n",
            &format!(
                "    instance_prompt: a photo of sks thing\n    class_prompt: a photo of a thing\n    class_data_dir: {}\n    num_class_images: 4\n",
                class_dir.join(name).display()
            ),
        );
        std::fs::write(&cfg, text).unwrap();
        Trainer::start(load(&cfg), quiet()).unwrap()
    };
    let red_at_left = |e: &dreambooth::data::dataset::Example| e.pixels.double_value(&[0, 16, 0]) > 0.5;

    let plain = start("square", false);
    assert!(plain.data.instances.iter().all(|e| e.frame() == (64, 64)));
    assert!(!red_at_left(&plain.data.instances[2]), "a centre square cuts off the wide picture's left edge");
    assert_eq!(plain.total_steps, 3 * 2);

    let mut t = start("buckets", true);
    let frames: Vec<(u32, u32)> = t.data.instances.iter().map(|e| e.frame()).collect();
    // Sorted file names: square, tall, wide-0, wide-1.
    assert_eq!(frames[0], (64, 64));
    assert!(frames[1].1 > frames[1].0, "tall frame: {:?}", frames[1]);
    assert!(frames[2].0 > frames[2].1 && frames[3] == frames[2], "wide frames: {frames:?}");
    assert!(red_at_left(&t.data.instances[2]) && red_at_left(&t.data.instances[3]), "the wide frame keeps the left edge");
    // One batch per frame: square, tall, and the two wide ones together.
    assert_eq!(t.total_steps, 3 * 3);
    // The wizard and the dashboard count the same from the folders, before training.
    assert_eq!(dreambooth::data::buckets::planned_batches_per_epoch(&t.config), Some(3));
    assert_eq!(dreambooth::data::buckets::planned_batches_per_epoch(&plain.config), Some(2));
    // Class images are made in the frames of the instance images, in turn.
    let mut class_frames: Vec<(u32, u32)> = t.data.classes[0].iter().map(|e| e.frame()).collect();
    let mut expected = vec![frames[0], frames[1], frames[2], frames[3]];
    class_frames.sort();
    expected.sort();
    assert_eq!(class_frames, expected);
    let on_disk = image::image_dimensions(class_dir.join("buckets").join("class-00001.png")).unwrap();
    assert_eq!(on_disk, frames[1]);
    // Two epochs of plans: every instance once per epoch, one frame per batch, class images of the same frame.
    let mut state = dreambooth::data::dataset::DataState::new(1);
    let mut rng = CpuRng::new(3);
    for _ in 0..2 {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let plan = dreambooth::data::dataset::next_batch(&t.data, &mut state, &mut rng, 2, false, false);
            let frame_of = |&(c, k, i, _): &(bool, usize, usize, bool)| t.data.example(c, k, i).frame();
            let first = frame_of(&plan.items[0]);
            assert!(plan.items.iter().all(|item| frame_of(item) == first), "mixed frames in one batch");
            assert_eq!(plan.items.iter().filter(|item| item.0).count(), plan.items.len() / 2, "each instance has its class image");
            seen.extend(plan.items.iter().filter(|item| !item.0).map(|item| item.2));
        }
        seen.sort();
        assert_eq!(seen, [0, 1, 2, 3]);
    }
    // Class images of one shape only: the other frames' instances train without a prior term, and the log says so.
    std::fs::create_dir_all(class_dir.join("unpaired")).unwrap();
    for k in 0..4 {
        image::RgbImage::from_pixel(64, 64, image::Rgb([90, 90, 90])).save(class_dir.join("unpaired").join(format!("c{k}.png"))).unwrap();
    }
    let unpaired = start("unpaired", true);
    assert_eq!(unpaired.data.instances_without_class_frame(), 3);
    let warned = named_events(&unpaired.run_dir, "warning")
        .iter()
        .any(|w| w["message"].as_str().unwrap().starts_with("3 instance images have no class image in their aspect-ratio bucket"));
    assert!(warned, "no warning about the unpaired frames");
    drop(unpaired);
    // Non-square latents through the UNet, to the end of the run.
    assert!(matches!(t.run().unwrap(), dreambooth::train::trainer::Outcome::Finished));
    assert_eq!(step_count(&t.run_dir), 9);
}
