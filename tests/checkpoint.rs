//! Loading model files: every format gives the same configs and bit-identical
//! tensors as the diffusers folder it was made from (tests/fixtures/SPEC.md),
//! and bad files fail with one sentence naming the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dreambooth::checkpoint::{load_model, models, Architecture, LoadedModel, ModelFormat, TokenizerSource};
use dreambooth::error::one_line;
use tch::{Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

fn load(name: &str) -> LoadedModel {
    load_model(&fixture(name), None).unwrap_or_else(|e| panic!("{}", one_line(&e)))
}

fn error_of(path: &Path, config: Option<&Path>) -> String {
    match load_model(path, config) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => one_line(&e),
    }
}

fn same_tensors(what: &str, got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>) {
    let mut missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let mut extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    missing.sort();
    extra.sort();
    assert!(missing.is_empty() && extra.is_empty(), "{what}: missing {missing:?}, extra {extra:?}");
    for (k, w) in want {
        let g = &got[k];
        assert_eq!(g.size(), w.size(), "{what} `{k}` shape");
        assert_eq!(g.kind(), w.kind(), "{what} `{k}` dtype");
        let (g32, w32) = (g.to_kind(Kind::Double), w.to_kind(Kind::Double));
        assert!(g32.equal(&w32), "{what} `{k}` differs: max abs {}", f64::try_from((g32 - w32).abs().max()).unwrap());
    }
}

/// The config fields the networks and samplers use (not `sample_size`, a default-resolution hint).
fn same_configs(got: &LoadedModel, want: &LoadedModel, compare_spacing: bool) {
    let (g, w) = (&got.unet_config, &want.unet_config);
    assert_eq!(g.in_channels, w.in_channels);
    assert_eq!(g.out_channels, w.out_channels);
    assert_eq!(g.down_block_types, w.down_block_types);
    assert_eq!(g.mid_block_type, w.mid_block_type);
    assert_eq!(g.up_block_types, w.up_block_types);
    assert_eq!(g.block_out_channels, w.block_out_channels);
    let n = w.block_out_channels.len();
    for i in 0..n {
        assert_eq!(g.layers_per_block.at(i), w.layers_per_block.at(i), "layers_per_block {i}");
        assert_eq!(g.heads(i), w.heads(i), "heads of block {i}");
        assert_eq!(g.cross_attention_dim.at(i), w.cross_attention_dim.at(i));
        assert_eq!(g.transformer_layers_per_block.at(i), w.transformer_layers_per_block.at(i));
        assert_eq!(g.only_cross_attention.at(i), w.only_cross_attention.at(i));
    }
    assert_eq!(g.use_linear_projection, w.use_linear_projection);
    assert_eq!(g.upcast_attention, w.upcast_attention);
    assert_eq!(g.norm_num_groups, w.norm_num_groups);
    assert_eq!(g.norm_eps, w.norm_eps);
    assert_eq!(g.flip_sin_to_cos, w.flip_sin_to_cos);
    assert_eq!(g.freq_shift, w.freq_shift);
    assert_eq!(g.act_fn, w.act_fn);

    let (g, w) = (&got.vae_config, &want.vae_config);
    assert_eq!(g.in_channels, w.in_channels);
    assert_eq!(g.out_channels, w.out_channels);
    assert_eq!(g.down_block_types, w.down_block_types);
    assert_eq!(g.up_block_types, w.up_block_types);
    assert_eq!(g.block_out_channels, w.block_out_channels);
    assert_eq!(g.layers_per_block, w.layers_per_block);
    assert_eq!(g.latent_channels, w.latent_channels);
    assert_eq!(g.norm_num_groups, w.norm_num_groups);
    assert_eq!(g.scaling_factor, w.scaling_factor);
    assert_eq!(g.use_quant_conv, w.use_quant_conv);
    assert_eq!(g.use_post_quant_conv, w.use_post_quant_conv);
    assert_eq!(g.mid_block_add_attention, w.mid_block_add_attention);

    let (g, w) = (&got.text_encoders[0].config, &want.text_encoders[0].config);
    assert_eq!(g.vocab_size, w.vocab_size);
    assert_eq!(g.hidden_size, w.hidden_size);
    assert_eq!(g.intermediate_size, w.intermediate_size);
    assert_eq!(g.num_hidden_layers, w.num_hidden_layers);
    assert_eq!(g.num_attention_heads, w.num_attention_heads);
    assert_eq!(g.max_position_embeddings, w.max_position_embeddings);
    assert_eq!(g.hidden_act, w.hidden_act);
    assert_eq!(g.layer_norm_eps, w.layer_norm_eps);
    assert_eq!(g.pad_token_id, w.pad_token_id);
    assert_eq!(g.bos_token_id, w.bos_token_id);
    assert_eq!(g.eos_token_id, w.eos_token_id);

    let (g, w) = (&got.scheduler_config, &want.scheduler_config);
    assert_eq!(g.num_train_timesteps, w.num_train_timesteps);
    assert_eq!(g.beta_start, w.beta_start);
    assert_eq!(g.beta_end, w.beta_end);
    assert_eq!(g.beta_schedule, w.beta_schedule);
    assert_eq!(g.prediction_type, w.prediction_type);
    assert_eq!(g.steps_offset, w.steps_offset);
    assert_eq!(g.set_alpha_to_one, w.set_alpha_to_one);
    assert_eq!(g.clip_sample, w.clip_sample);
    if compare_spacing {
        assert_eq!(g.timestep_spacing, w.timestep_spacing);
    }
}

fn same_model(got: &LoadedModel, want: &LoadedModel, compare_spacing: bool) {
    assert_eq!(got.architecture, want.architecture);
    same_configs(got, want, compare_spacing);
    same_tensors("UNet", &got.unet, &want.unet);
    same_tensors("VAE", &got.vae, &want.vae);
    same_tensors("text encoder", &got.text_encoders[0].tensors, &want.text_encoders[0].tensors);
}

#[test]
fn sd1_single_file_is_inferred_without_sidecar() {
    let folder = load("tiny-sd1");
    let single = load("tiny-sd1.safetensors");
    assert_eq!(single.format, ModelFormat::SingleFileSafetensors);
    assert_eq!(single.architecture, Architecture::Sd1);
    assert_eq!(single.text_encoders[0].tokenizer, TokenizerSource::OpenAi { pad_token: "<|endoftext|>".into() });
    same_model(&single, &folder, true);
}

#[test]
fn sd1_ckpt_matches_the_folder() {
    let folder = load("tiny-sd1");
    let ckpt = load("tiny-sd1.ckpt");
    assert_eq!(ckpt.format, ModelFormat::Ckpt);
    same_model(&ckpt, &folder, true);
}

#[test]
fn sd2_single_file_with_sidecar_matches_the_folder() {
    let folder = load("tiny-sd2");
    let single = load("tiny-sd2.safetensors");
    assert_eq!(single.architecture, Architecture::Sd2);
    assert_eq!(single.scheduler_config.prediction_type, "v_prediction");
    assert_eq!(single.text_encoders[0].tokenizer, TokenizerSource::OpenAi { pad_token: "!".into() });
    // The file's last OpenCLIP block is not part of SD 2's text encoder.
    assert!(!single.text_encoders[0].tensors.keys().any(|k| k.starts_with("encoder.layers.2.")));
    same_model(&single, &folder, false);
}

/// Without the sidecar the shapes and SD 2's conventions give everything but v-prediction.
#[test]
fn sd2_single_file_without_sidecar_infers_all_but_prediction_type() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny-sd2.safetensors");
    std::os::unix::fs::symlink(fixture("tiny-sd2.safetensors"), &file).unwrap();
    let folder = load("tiny-sd2");
    let mut single = load_model(&file, None).unwrap_or_else(|e| panic!("{}", one_line(&e)));
    assert_eq!(single.scheduler_config.prediction_type, "epsilon");
    single.scheduler_config.prediction_type = "v_prediction".into();
    same_model(&single, &folder, false);

    // --model-config: the folder's configs, tokenizer and scheduler win.
    let given = load_model(&file, Some(&fixture("tiny-sd2"))).unwrap_or_else(|e| panic!("{}", one_line(&e)));
    assert_eq!(given.scheduler_config.prediction_type, "v_prediction");
    assert_eq!(given.text_encoders[0].tokenizer, TokenizerSource::Folder(fixture("tiny-sd2").join("tokenizer")));
    same_model(&given, &folder, true);

    // A folder that describes nothing would change nothing: refused, not ignored.
    let empty = tempfile::tempdir().unwrap();
    let err = one_line(&load_model(&file, Some(empty.path())).unwrap_err());
    assert!(err.contains("holds none of unet/config.json"), "{err}");
    let err = one_line(&load_model(&fixture("tiny-sd2"), Some(empty.path())).unwrap_err());
    assert!(err.contains("holds none of unet/config.json"), "{err}");
}

#[test]
fn fp16_folder_keeps_its_dtype() {
    let m = load("tiny-sd2");
    assert_eq!(m.format, ModelFormat::Diffusers);
    assert!(m.unet.values().chain(m.vae.values()).chain(m.text_encoders[0].tensors.values()).all(|t| t.kind() == Kind::Half));
    assert_eq!(m.text_encoders[0].tokenizer, TokenizerSource::Folder(fixture("tiny-sd2").join("tokenizer")));
    assert_eq!(m.scheduler_config.prediction_type, "v_prediction");
}

#[test]
fn text_encoder_keys_come_without_prefix_either_way() {
    for name in ["tiny-sd1", "tiny-sd2", "tiny-sd1.safetensors", "tiny-sd2.safetensors"] {
        let m = load(name);
        let te = &m.text_encoders[0].tensors;
        assert!(te.contains_key("embeddings.token_embedding.weight"), "{name}");
        assert!(te.contains_key("final_layer_norm.weight"), "{name}");
        assert!(!te.keys().any(|k| k.starts_with("text_model.") || k.ends_with("position_ids")), "{name}");
    }
}

#[test]
fn fp16_variant_file_is_used_when_alone() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-sd1");
    for sub in ["unet", "vae", "text_encoder", "scheduler", "tokenizer"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for entry in std::fs::read_dir(src.join(sub)).unwrap() {
            let p = entry.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().replace(".safetensors", ".fp16.safetensors");
            std::os::unix::fs::symlink(&p, dir.path().join(sub).join(name)).unwrap();
        }
    }
    let m = load_model(dir.path(), None).unwrap_or_else(|e| panic!("{}", one_line(&e)));
    same_tensors("UNet", &m.unet, &load("tiny-sd1").unet);
}

#[test]
fn evil_ckpt_is_refused_and_runs_nothing() {
    let marker = Path::new("/tmp/dreambooth_evil_ckpt_ran");
    let _ = std::fs::remove_file(marker);
    let msg = error_of(&fixture("evil.ckpt"), None);
    assert!(msg.contains("evil.ckpt refuses to load"), "{msg}");
    assert!(msg.contains("system`, which could run code"), "{msg}");
    assert!(!marker.exists());
}

#[test]
fn broken_safetensors_are_one_sentence_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixture("tiny-sd1.safetensors")).unwrap();
    let cases: [(&str, Vec<u8>); 4] = [
        ("truncated.safetensors", good[..good.len() / 2].to_vec()),
        ("header-only.safetensors", good[..100].to_vec()),
        ("garbage.safetensors", (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()),
        ("empty.safetensors", Vec::new()),
    ];
    for (name, bytes) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let msg = error_of(&p, None);
        assert!(msg.contains(&format!("{name} is not a valid safetensors file (")), "{msg}");
        assert_eq!(msg.matches('\n').count(), 0);
    }
}

#[test]
fn folder_without_unet_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model_index.json"), "{}").unwrap();
    let msg = error_of(dir.path(), None);
    assert!(msg.contains(&format!("{} has no unet/ folder (not a diffusers model?)", dir.path().display())), "{msg}");
}

#[test]
fn unrelated_safetensors_is_an_unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("classifier.safetensors");
    let w = Tensor::zeros([3, 4], (Kind::Float, tch::Device::Cpu));
    Tensor::write_safetensors(&[("fc.weight", &w), ("fc.bias", &w.get(0))], &p).unwrap();
    let msg = error_of(&p, None);
    assert!(msg.contains("classifier.safetensors is not a Stable Diffusion 1.x/2.x or SDXL checkpoint"), "{msg}");
}

#[test]
fn legacy_and_non_zip_ckpt_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("old.ckpt");
    std::fs::write(&legacy, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
    let msg = error_of(&legacy, None);
    assert!(msg.contains("old.ckpt is a legacy (pre-1.6) PyTorch file, which is not supported: re-save it"), "{msg}");
    let junk = dir.path().join("junk.ckpt");
    std::fs::write(&junk, b"hello").unwrap();
    assert!(error_of(&junk, None).contains("junk.ckpt is not a PyTorch checkpoint"));
}

#[test]
fn models_lists_what_it_finds_and_why_not() {
    let entries = models::scan(&[fixture("")]);
    let by_name = |n: &str| entries.iter().find(|e| e.path.file_name().unwrap() == n).unwrap_or_else(|| panic!("{n} not listed"));
    assert_eq!(by_name("tiny-sd1").architecture, Ok(Architecture::Sd1));
    assert_eq!(by_name("tiny-sd1").format, ModelFormat::Diffusers);
    assert_eq!(by_name("tiny-sd2").architecture, Ok(Architecture::Sd2));
    assert_eq!(by_name("tiny-sd1.ckpt").architecture, Ok(Architecture::Sd1));
    assert_eq!(by_name("tiny-sd2.safetensors").architecture, Ok(Architecture::Sd2));
    assert!(by_name("tiny-sd2.safetensors").has_sidecar);
    assert!(by_name("tiny-sd1.safetensors").size_bytes > 1_000_000);
    let evil = by_name("evil.ckpt").architecture.clone().unwrap_err();
    assert!(evil.contains("could run code"), "{evil}");
}

/// An SD 1.x `v1-inference.yaml`-style sidecar (`num_heads`, conv projection) gives the same model.
#[test]
fn sd1_sidecar_yaml_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny-sd1.safetensors");
    std::os::unix::fs::symlink(fixture("tiny-sd1.safetensors"), &file).unwrap();
    std::fs::write(
        dir.path().join("tiny-sd1.yaml"),
        "model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: 16
    scale_factor: 0.18215
    unet_config:
      params:
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 64
    first_stage_config:
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 32
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [ 1, 2 ]
          num_res_blocks: 1
          attn_resolutions: []
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
",
    )
    .unwrap();
    let m = load_model(&file, None).unwrap_or_else(|e| panic!("{}", one_line(&e)));
    assert_eq!(m.unet_config.sample_size, 16);
    assert_eq!(m.vae_config.sample_size, 32);
    same_model(&m, &load("tiny-sd1"), true);

    // A sidecar that is not YAML is named.
    std::fs::write(dir.path().join("tiny-sd1.yaml"), "model: [unclosed").unwrap();
    let msg = error_of(&file, None);
    assert!(msg.contains("tiny-sd1.yaml is not valid YAML"), "{msg}");
}

/// Older SD 1.x files store the CLIP text model without the `text_model.` level.
#[test]
fn sd1_single_file_without_text_model_level() {
    use dreambooth::checkpoint::safetensors_file::SafetensorsFile;
    let src = SafetensorsFile::open(&fixture("tiny-sd1.safetensors")).unwrap();
    let renamed: Vec<(String, Tensor)> = src
        .load_all()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."), t))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("old-layout.safetensors");
    Tensor::write_safetensors(&renamed, &file).unwrap();
    let m = load_model(&file, None).unwrap_or_else(|e| panic!("{}", one_line(&e)));
    same_model(&m, &load("tiny-sd1"), true);
}

/// The native resolution comes from a folder's configs or a single file's
/// sidecar (`image_size` latents × the VAE's factor); a bare file states none.
#[test]
fn native_resolution_is_read_from_configs() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    assert_eq!(dreambooth::checkpoint::native_resolution(&fixtures.join("tiny-sd1.safetensors")), None);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v2-768.safetensors");
    std::fs::write(&file, b"").unwrap();
    // Stability's v2-inference-v.yaml states 96 latents and four VAE levels (8×).
    let yaml = std::fs::read_to_string(fixtures.join("tiny-sd2.yaml"))
        .unwrap()
        .replace("    image_size: 8\n", "    image_size: 96\n")
        .replace("          ch_mult:\n          - 1\n          - 2\n          - 2\n", "          ch_mult:\n          - 1\n          - 2\n          - 4\n          - 4\n");
    std::fs::write(dir.path().join("v2-768.yaml"), yaml).unwrap();
    assert_eq!(dreambooth::checkpoint::native_resolution(&file), Some(768));
}

/// A LoRA given where a model goes says what it is and how to use it.
#[test]
fn a_lora_file_given_as_a_model_says_so() {
    let lora = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/lora/tiny-sd1-kohya.safetensors");
    let err = dreambooth::checkpoint::load_model(&lora, None).unwrap_err();
    let text = dreambooth::error::one_line(&err);
    assert!(text.contains("a LoRA") && text.contains("generate --lora"), "{text}");
}
