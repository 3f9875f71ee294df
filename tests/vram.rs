//! The VRAM presets and the estimator: presets load through the config loader,
//! the estimator's parameter shapes are the checkpoint's, its arithmetic follows
//! the settings, and its peak agrees with a measured training step on the CPU.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dreambooth::config::presets::BUILTIN;
use dreambooth::config::schema::{MixedPrecision, Optimizer};
use dreambooth::model::attention::AttentionBackend;
use dreambooth::model::config::{ClipConfig, UNetConfig, VaeConfig};
use dreambooth::vram::estimate::optimizer_bytes;
use dreambooth::vram::model::count;
use dreambooth::vram::shapes::Layer;
use dreambooth::vram::{estimate, ModelShapes, Plan};

const MINIMAL: &str =
    "name: dog\nsource_checkpoint: m.safetensors\nconcepts:\n  - instance_data_dir: data\n    instance_prompt: a photo of sks dog\n";

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd1")
}

#[test]
fn every_preset_loads_through_the_config_loader() {
    let dir = tempfile::tempdir().unwrap();
    let on_disk: Vec<String> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("presets"))
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(on_disk.len(), BUILTIN.len(), "every presets/*.yaml is built in");
    for (name, text) in BUILTIN {
        assert!(on_disk.contains(&name.to_string()), "{name} is in presets/");
        assert!(text.contains("# "), "{name} explains its settings");
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, format!("{MINIMAL}preset: {name}\n")).unwrap();
        let c = dreambooth::config::load_run_config(&path).unwrap_or_else(|e| panic!("preset {name}: {e:#}"));
        assert_eq!(c.preset.as_deref(), Some(*name));
    }
    let load = |name: &str| {
        let path = dir.path().join(format!("{name}.yaml"));
        dreambooth::config::load_run_config(&path).unwrap().training
    };
    assert!(load("6gb").use_lora && load("8gb").use_lora && !load("12gb").use_lora);
    assert_eq!(load("12gb").optimizer, Optimizer::Adamw8bit);
    assert_eq!(load("cpu").mixed_precision, MixedPrecision::No);
    assert!(load("12gb").gradient_checkpointing && !load("24gb").gradient_checkpointing);
}

#[test]
fn a_config_key_overrides_its_preset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, format!("{MINIMAL}preset: 12gb\ntraining:\n  batch_size: 3\n")).unwrap();
    let c = dreambooth::config::load_run_config(&path).unwrap();
    assert_eq!(c.training.batch_size, 3);
    assert!(c.training.gradient_checkpointing, "the preset's other keys stay");
}

fn keys_and_shapes(layers: &[Layer]) -> BTreeMap<String, Vec<i64>> {
    layers.iter().flat_map(|l| &l.params).map(|p| (p.key.clone(), p.shape.clone())).collect()
}

fn index_of(path: &Path, strip: &str) -> BTreeMap<String, Vec<i64>> {
    let f = dreambooth::checkpoint::safetensors_file::SafetensorsFile::open(path).unwrap();
    use dreambooth::checkpoint::source::TensorSource;
    f.index()
        .iter()
        .filter(|(k, _)| !k.ends_with("position_ids"))
        .map(|(k, i)| (k.strip_prefix(strip).unwrap_or(k).to_string(), i.shape.clone()))
        .collect()
}

#[test]
fn shapes_from_configs_are_the_checkpoints_tensors() {
    let dir = tiny();
    let read = |sub: &str| std::fs::read_to_string(dir.join(sub).join("config.json")).unwrap();
    let unet: UNetConfig = serde_json::from_str(&read("unet")).unwrap();
    let vae: VaeConfig = serde_json::from_str(&read("vae")).unwrap();
    let text: ClipConfig = serde_json::from_str(&read("text_encoder")).unwrap();
    let m = ModelShapes::from_configs(&unet, &vae, &text, "configs");
    assert_eq!(keys_and_shapes(&m.unet), index_of(&dir.join("unet/diffusion_pytorch_model.safetensors"), ""));
    let mut vae_layers = m.vae_encoder.clone();
    vae_layers.extend(m.vae_decoder.clone());
    assert_eq!(keys_and_shapes(&vae_layers), index_of(&dir.join("vae/diffusion_pytorch_model.safetensors"), ""));
    assert_eq!(keys_and_shapes(&m.text), index_of(&dir.join("text_encoder/model.safetensors"), "text_model."));
    // Reading the checkpoint itself gives the same.
    let from_disk = ModelShapes::from_checkpoint(&dir).unwrap();
    assert_eq!(keys_and_shapes(&from_disk.unet), keys_and_shapes(&m.unet));
}

#[test]
fn single_file_checkpoints_give_the_same_shapes() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd1.safetensors");
    let single = ModelShapes::from_checkpoint(&file).unwrap();
    let folder = ModelShapes::from_checkpoint(&tiny()).unwrap();
    assert_eq!(count(&single.unet), count(&folder.unet));
    assert_eq!(count(&single.text), count(&folder.text));
}

#[test]
fn sd15_parameter_counts_are_the_published_ones() {
    let m = ModelShapes::sd15();
    assert_eq!(count(&m.unet), 859_520_964);
    assert_eq!(count(&m.text), 123_060_480);
    assert_eq!(count(&m.vae_encoder) + count(&m.vae_decoder), 83_653_863);
}

#[test]
fn eight_bit_state_is_two_bytes_a_parameter_plus_block_scales() {
    assert_eq!(optimizer_bytes(Optimizer::Adamw, 1000), 8000);
    assert_eq!(optimizer_bytes(Optimizer::Adamw8bit, 4095), 8 * 4095, "small tensors keep fp32 state");
    assert_eq!(optimizer_bytes(Optimizer::Adamw8bit, 4096), 2 * 4096 + 2 * 4 * 16);
    // Codes fill whole blocks: each tensor starts at a block of its own in the optimizer's flat buffers.
    assert_eq!(optimizer_bytes(Optimizer::Adamw8bit, 4097), 2 * 17 * 256 + 2 * 4 * 17);
}

fn sd15_plan() -> Plan {
    let c = dreambooth::config::parse_run_config(MINIMAL, "t", Path::new(".")).unwrap();
    Plan::from_config(&c)
}

#[test]
fn memory_savers_lower_the_estimate() {
    let m = ModelShapes::sd15();
    let base = Plan { attention: AttentionBackend::Default, mixed: MixedPrecision::No, ..sd15_plan() };
    let peak = |p: &Plan| estimate(&m, p).peak;
    let b = peak(&base);
    assert!(peak(&Plan { attention: AttentionBackend::Xformers, ..base.clone() }) < b);
    assert!(peak(&Plan { gradient_checkpointing: true, ..base.clone() }) < b);
    assert!(peak(&Plan { optimizer: Optimizer::Adamw8bit, ..base.clone() }) < b);
    assert!(peak(&Plan { use_lora: true, ..base.clone() }) < b);
    assert!(peak(&Plan { batch: 2, ..base.clone() }) > b);
    assert!(peak(&Plan { use_ema: true, ..base.clone() }) > b);
    assert!(peak(&Plan { cache_latents: false, ..base.clone() }) > b);
    assert!(peak(&Plan { set_grads_to_none: false, ..base.clone() }) >= b);
    // Long prompts: three text-encoder passes and 227 cross-attention tokens a prompt.
    assert!(peak(&Plan { token_windows: 3, ..base.clone() }) > b);
    let te = Plan { train_text_encoder: true, ..base.clone() };
    let rows_of = |p: &Plan| estimate(&m, p).rows.iter().map(|r| r.bytes).sum::<i64>();
    assert!(rows_of(&Plan { token_windows: 3, ..te.clone() }) > rows_of(&te));
    // Full float32 fine-tuning: weights + AdamW state alone are 12 B/param.
    let e = estimate(&m, &base);
    assert!(e.resident >= 12 * 859_520_964);
    // LoRA trains only the adapters.
    let lora = estimate(&m, &Plan { use_lora: true, lora_rank: 4, ..base.clone() });
    assert!(lora.trained_params < 2_000_000 && lora.trained_params > 500_000, "{}", lora.trained_params);
    // The text encoder's adapters count at their own rank: CLIP-L's 12 layers of
    // q/k/v/out (768×768) hold 12·4·(768+768)·r parameters.
    let lora_te = Plan { use_lora: true, lora_rank: 4, lora_text_encoder_rank: 4, train_text_encoder: true, ..base.clone() };
    let (r4, r8) = (estimate(&m, &lora_te), estimate(&m, &Plan { lora_text_encoder_rank: 8, ..lora_te.clone() }));
    assert_eq!(r8.trained_params - r4.trained_params, 12 * 4 * (768 + 768) * 4);
}

#[test]
fn the_presets_fit_their_tiers_for_sd15_at_512() {
    let c = dreambooth::config::parse_run_config(MINIMAL, "t", Path::new(".")).unwrap();
    let rated = dreambooth::vram::rate_presets(&c, &ModelShapes::sd15());
    assert_eq!(rated.len(), BUILTIN.len());
    for (name, need) in rated {
        if let Some(tier) = dreambooth::vram::tier_bytes(&name) {
            assert!(need <= tier, "preset {name} needs {need} bytes");
        }
    }
}

#[test]
fn vram_command_prints_a_table_and_a_peak() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, MINIMAL.replace("m.safetensors", &tiny().display().to_string())).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth")).arg("vram").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["UNet down_blocks.0", "text encoder", "optimizer state", "activations saved for backward", "peak (allocated)"] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    // A run directory is estimated from its config.yaml.
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::copy(&path, run.join("config.yaml")).unwrap();
    let from_run = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth")).arg("vram").arg(&run).output().unwrap();
    assert!(from_run.status.success(), "{}", String::from_utf8_lossy(&from_run.stderr));
    assert_eq!(String::from_utf8_lossy(&from_run.stdout), text);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth")).arg("presets").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("12gb") && text.contains("cpu"), "{text}");
}

/// A run's own `vae` folder is sized from its own config; a single VAE file has the
/// source VAE's shapes (training refuses any other), so it changes nothing.
#[test]
fn a_runs_vae_folder_is_sized_from_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let wide = dir.path().join("wide-vae");
    std::fs::create_dir_all(&wide).unwrap();
    let mut vae: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("vae/config.json")).unwrap()).unwrap();
    vae["block_out_channels"] = serde_json::json!([64, 128]);
    std::fs::write(wide.join("config.json"), vae.to_string()).unwrap();
    let config = |vae_line: &str| {
        let text = MINIMAL.replace("m.safetensors", &tiny().display().to_string()) + vae_line;
        dreambooth::config::parse_run_config(&text, "a test config", dir.path()).unwrap()
    };
    let vae_params = |c: &dreambooth::config::RunConfig| {
        let s = ModelShapes::for_run(c).unwrap();
        count(&s.vae_encoder) + count(&s.vae_decoder)
    };
    let own = vae_params(&config(""));
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-vae.safetensors");
    assert_eq!(vae_params(&config(&format!("vae: {}\n", file.display()))), own);
    let wider = vae_params(&config(&format!("vae: {}\n", wide.display())));
    assert!(wider > 3 * own, "{wider} parameters for a VAE twice as wide as {own}");
}
