//! The VRAM presets and the estimator: presets load through the config loader,
//! the estimator's parameter shapes are the checkpoint's, its arithmetic follows
//! the settings, and its peak agrees with a measured training step on the CPU.

#[path = "train_support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dreambooth::config::presets::BUILTIN;
use dreambooth::config::schema::{MixedPrecision, Optimizer};
use dreambooth::model::attention::AttentionBackend;
use dreambooth::model::family::Architecture;
use dreambooth::model::config::{ClipConfig, UNetConfig, VaeConfig};
use dreambooth::vram::estimate::optimizer_bytes;
use dreambooth::vram::model::count;
use dreambooth::vram::shapes::Layer;
use dreambooth::vram::{estimate, with_cuda_overhead, ModelShapes, Plan};

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
    let m = ModelShapes::from_configs(&Architecture::Sd1, &unet, &vae, &[text], "configs");
    assert_eq!(keys_and_shapes(&m.unet), index_of(&dir.join("unet/diffusion_pytorch_model.safetensors"), ""));
    let mut vae_layers = m.vae_encoder.clone();
    vae_layers.extend(m.vae_decoder.clone());
    assert_eq!(keys_and_shapes(&vae_layers), index_of(&dir.join("vae/diffusion_pytorch_model.safetensors"), ""));
    assert_eq!(m.text_encoders.len(), 1);
    assert_eq!(keys_and_shapes(&m.text_encoders[0].layers), index_of(&dir.join("text_encoder/model.safetensors"), "text_model."));
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
    assert_eq!(count(&single.text_encoders[0].layers), count(&folder.text_encoders[0].layers));
}

#[test]
fn sd15_parameter_counts_are_the_published_ones() {
    let m = ModelShapes::sd15();
    assert_eq!(count(&m.unet), 859_520_964);
    assert_eq!(count(&m.text_encoders[0].layers), 123_060_480);
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
    let base = Plan { attention: AttentionBackend::Explicit, mixed: MixedPrecision::No, ..sd15_plan() };
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
    let names: Vec<&str> = rated.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["cpu", "6gb", "8gb", "12gb", "16gb", "24gb", "48gb"], "SD models get the SD presets");
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

fn tiny_sdxl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sdxl")
}

/// SDXL's shapes from its configs are every tensor of the tiny SDXL folder, key
/// and shape: the UNet with its added embedding, the VAE, both text encoders
/// (the second with its `text_projection`).
#[test]
fn sdxl_shapes_from_configs_are_the_checkpoints_tensors() {
    let dir = tiny_sdxl();
    let read = |sub: &str| std::fs::read_to_string(dir.join(sub).join("config.json")).unwrap();
    let unet: UNetConfig = serde_json::from_str(&read("unet")).unwrap();
    let vae: VaeConfig = serde_json::from_str(&read("vae")).unwrap();
    let text: Vec<ClipConfig> =
        ["text_encoder", "text_encoder_2"].iter().map(|sub| serde_json::from_str(&read(sub)).unwrap()).collect();
    let m = ModelShapes::from_configs(&Architecture::Sdxl, &unet, &vae, &text, "configs");
    let unet_index = index_of(&dir.join("unet/diffusion_pytorch_model.safetensors"), "");
    assert!(unet_index.contains_key("add_embedding.linear_1.weight"), "the fixture has SDXL's added embedding");
    assert_eq!(keys_and_shapes(&m.unet), unet_index);
    let mut vae_layers = m.vae_encoder.clone();
    vae_layers.extend(m.vae_decoder.clone());
    assert_eq!(keys_and_shapes(&vae_layers), index_of(&dir.join("vae/diffusion_pytorch_model.safetensors"), ""));
    let names: Vec<&str> = m.text_encoders.iter().map(|e| e.role.name).collect();
    assert_eq!(names, ["text_encoder", "text_encoder_2"]);
    for e in &m.text_encoders {
        let index = index_of(&dir.join(e.role.name).join("model.safetensors"), "text_model.");
        assert_eq!(keys_and_shapes(&e.layers), index, "{}", e.role.name);
    }
    assert!(keys_and_shapes(&m.text_encoders[1].layers).contains_key("text_projection.weight"));
    assert_eq!(m.text_encoders[1].pooled_width(), Some(text[1].projection_dim));
    // Reading the folder itself gives the same, and says it is SDXL.
    let from_disk = ModelShapes::from_checkpoint(&dir).unwrap();
    assert_eq!(from_disk.family, Architecture::Sdxl);
    assert_eq!(keys_and_shapes(&from_disk.unet), keys_and_shapes(&m.unet));
    for (a, b) in from_disk.text_encoders.iter().zip(&m.text_encoders) {
        assert_eq!(keys_and_shapes(&a.layers), keys_and_shapes(&b.layers));
    }
}

/// The Stability-AI single file of the tiny SDXL model gives the folder's shapes.
#[test]
fn an_sdxl_single_file_gives_the_folders_shapes() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sdxl.safetensors");
    let single = ModelShapes::from_checkpoint(&file).unwrap();
    let folder = ModelShapes::from_checkpoint(&tiny_sdxl()).unwrap();
    assert_eq!(single.family, Architecture::Sdxl);
    assert_eq!(keys_and_shapes(&single.unet), keys_and_shapes(&folder.unet));
    assert_eq!(keys_and_shapes(&single.vae_encoder), keys_and_shapes(&folder.vae_encoder));
    assert_eq!(keys_and_shapes(&single.vae_decoder), keys_and_shapes(&folder.vae_decoder));
    assert_eq!(single.text_encoders.len(), 2);
    for (a, b) in single.text_encoders.iter().zip(&folder.text_encoders) {
        assert_eq!(keys_and_shapes(&a.layers), keys_and_shapes(&b.layers), "{}", a.role.name);
    }
}

/// SDXL base 1.0: UNet 2.567 B, CLIP ViT-L 123 M, OpenCLIP bigG with its projection 695 M.
#[test]
fn sdxl_parameter_counts_are_the_published_ones() {
    let m = ModelShapes::sdxl();
    assert_eq!(m.family, Architecture::Sdxl);
    assert_eq!(count(&m.unet), 2_567_463_684);
    assert_eq!(count(&m.text_encoders[0].layers), 123_060_480);
    assert_eq!(count(&m.text_encoders[1].layers), 694_659_840);
    assert_eq!(count(&m.vae_encoder) + count(&m.vae_decoder), 83_653_863);
}

fn sdxl_plan(training: &str) -> Plan {
    let text = format!("{MINIMAL}resolution: 1024\ntraining:\n{training}");
    let c = dreambooth::config::parse_run_config(&text, "t", Path::new(".")).unwrap();
    Plan::from_config(&c)
}

/// SDXL's first encoder stops at its penultimate layer: its last layer and final
/// norm neither keep activations nor get gradients. Training the text encoder
/// trains both, at their own adapters' rank.
#[test]
fn sdxl_text_encoders_train_together_and_the_first_stops_early() {
    let m = ModelShapes::sdxl();
    let first = &m.text_encoders[0];
    let last_block = first.layers.iter().rposition(|l| l.name.starts_with("encoder.layers.")).unwrap();
    assert!(!first.runs(last_block) && first.runs(last_block - 1));
    assert!(!first.runs(first.layers.iter().position(|l| l.name == "final_layer_norm").unwrap()));
    assert!((0..m.text_encoders[1].layers.len()).all(|i| m.text_encoders[1].runs(i)), "the pooled encoder runs all");

    let lora_te = sdxl_plan("  use_lora: true\n  lora_rank: 4\n  text_encoder_train_ratio: 1\n  lora_text_encoder_rank: 4\n");
    let (r4, r8) = (estimate(&m, &lora_te), estimate(&m, &Plan { lora_text_encoder_rank: 8, ..lora_te.clone() }));
    // q/k/v/out adapters of CLIP-L's 12 layers (768 wide) and bigG's 32 (1280 wide).
    assert_eq!(r8.trained_params - r4.trained_params, 4 * (12 * 4 * (768 + 768) + 32 * 4 * (1280 + 1280)));
    let full_te = estimate(&m, &sdxl_plan("  text_encoder_train_ratio: 1\n"));
    assert_eq!(full_te.trained_params, 2_567_463_684 + 123_060_480 + 694_659_840);
    // Checkpoints hold the UNet and both encoders in float32, and AdamW's two moments.
    assert_eq!(full_te.checkpoint_bytes, full_te.trained_params * 12);
}

/// Frozen text encoders: each prompt's states (and SDXL's pooled embedding) are
/// cached on the device, in the encoders' bf16.
#[test]
fn frozen_encoders_cached_states_are_counted() {
    let m = ModelShapes::sdxl();
    let e = estimate(&m, &sdxl_plan("  use_lora: true\n"));
    let row = e.rows.iter().find(|r| r.what.starts_with("cached text states")).expect("a cached states row");
    assert_eq!(row.bytes, (77 * (768 + 1280) + 1280) * 2, "one prompt's states and pooled embedding, bf16");
    assert!(row.what.contains("pooled embedding"), "{}", row.what);
    // A class prompt doubles them; a text encoder that trains has none cached.
    let text = format!("{MINIMAL}    class_prompt: a photo of a dog\nresolution: 1024\ntraining:\n  use_lora: true\n");
    let c = dreambooth::config::parse_run_config(&text, "t", Path::new(".")).unwrap();
    let two = estimate(&m, &Plan::from_config(&c));
    assert_eq!(two.rows.iter().find(|r| r.what.starts_with("cached text states")).unwrap().bytes, 2 * row.bytes);
    let training = estimate(&m, &sdxl_plan("  use_lora: true\n  text_encoder_train_ratio: 0.5\n"));
    assert!(!training.rows.iter().any(|r| r.what.starts_with("cached text states")));
}

/// `fused_backward` never holds the whole set of gradients: a full SDXL UNet
/// with 8-bit AdamW needs about its float32 gradients (9.6 GiB) less, which is
/// what takes it under 24 GB (kohya: 8-bit AdamW without it does not fit).
#[test]
fn fused_backward_drops_the_gradients_from_the_peak() {
    let m = ModelShapes::sdxl();
    let plain = sdxl_plan(
        "  optimizer: adamw_8bit\n  max_grad_norm: 0\n  gradient_checkpointing: true\n  attention: xformers\n",
    );
    let fused = Plan { fused_backward: true, ..plain.clone() };
    let (p, f) = (estimate(&m, &plain), estimate(&m, &fused));
    eprintln!("{}\n{}", dreambooth::vram::render(&p, "plain"), dreambooth::vram::render(&f, "fused"));
    // The plain run peaks in its optimizer step, over every gradient; the fused
    // one at the end of its forward pass, with no gradient at all.
    let grads = 2_567_463_684u64 * 4;
    let phase = |e: &dreambooth::vram::Estimate, name: &str| e.phases.iter().find(|(p, _)| *p == name).map_or(0, |(_, b)| *b);
    assert!(phase(&p, "optimizer step") > grads, "{:?}", p.phases);
    let update = f.rows.iter().find(|r| r.what == "gradient + optimizer update").expect("the fused update's row");
    assert!(update.bytes < 1 << 30, "one tensor's gradient and update: {} bytes", update.bytes);
    assert!(p.peak - f.peak > 4 << 30, "plain {} vs fused {}", p.peak, f.peak);
    assert!(!f.phases.iter().any(|(phase, _)| *phase == "optimizer step"), "{:?}", f.phases);
    assert!(with_cuda_overhead(p.peak) > 24 << 30, "8-bit AdamW without fusing needs {} bytes", with_cuda_overhead(p.peak));
    assert!(with_cuda_overhead(f.peak) <= 24 << 30, "fused needs {} bytes", with_cuda_overhead(f.peak));
    assert_eq!(p.resident, f.resident, "the weights and optimizer state are the same");
}

/// Each SDXL preset fits its tier at 1024 on SDXL base's shapes, with and
/// without prior preservation (which doubles the batch), and an SDXL model gets
/// the SDXL presets (and `cpu`) only.
#[test]
fn the_sdxl_presets_fit_their_tiers_at_1024() {
    let m = ModelShapes::sdxl();
    for (ratio, class) in [("0", ""), ("0.7", ""), ("0.7", "    class_prompt: a photo of a dog\n")] {
        let text = format!("{MINIMAL}{class}resolution: 1024\ntraining:\n  text_encoder_train_ratio: {ratio}\n");
        let c = dreambooth::config::parse_run_config(&text, "t", Path::new(".")).unwrap();
        let rated = dreambooth::vram::rate_presets(&c, &m);
        let names: Vec<&str> = rated.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["cpu", "sdxl-12gb", "sdxl-16gb", "sdxl-24gb", "sdxl-48gb"]);
        for (name, need) in rated {
            let preset = dreambooth::vram::with_preset(&c, &name).unwrap();
            assert_eq!(preset.resolution, 1024, "{name}");
            let e = estimate(&m, &Plan::from_config(&preset));
            let prior = if class.is_empty() { "" } else { ", prior preservation" };
            eprintln!("{}", dreambooth::vram::render(&e, &format!("{name}, text_encoder_train_ratio {ratio}{prior}")));
            eprintln!(
                "{name} (config ratio {ratio}{prior}, preset ratio {}): peak {:.2} GiB during the {}, card needs {:.2} GiB",
                preset.training.text_encoder_train_ratio,
                e.peak as f64 / (1u64 << 30) as f64,
                e.peak_phase,
                need as f64 / (1u64 << 30) as f64
            );
            if let Some(tier) = dreambooth::vram::tier_bytes(&name) {
                assert!(need <= tier, "preset {name} needs {need} bytes");
            }
        }
    }
    let load = |name: &str| {
        let text = format!("{MINIMAL}preset: {name}\n");
        dreambooth::config::parse_run_config(&text, "t", Path::new(".")).unwrap().training
    };
    assert!(load("sdxl-12gb").use_lora && load("sdxl-16gb").use_lora && !load("sdxl-24gb").use_lora);
    assert!(load("sdxl-24gb").fused_backward && load("sdxl-24gb").optimizer == Optimizer::Adamw8bit);
    assert!(load("sdxl-24gb").text_encoder_train_ratio == 0.0 && load("sdxl-48gb").text_encoder_train_ratio > 0.0);
    assert_eq!(dreambooth::vram::tier_bytes("sdxl-24gb"), Some(24 << 30));
}

/// `dreambooth vram` on an SDXL run names both text encoders and the cached states.
#[test]
fn vram_command_on_an_sdxl_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, MINIMAL.replace("m.safetensors", &tiny_sdxl().display().to_string()) + "preset: sdxl-24gb\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth")).arg("vram").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["UNet add_embedding", "text encoder 2", "cached text states + pooled embedding", "gradient + optimizer update"] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    assert!(!text.contains("optimizer step"), "a fused step has no optimizer phase:\n{text}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth")).arg("presets").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("sdxl-24gb") && text.contains("SDXL at 1024"), "{text}");
}


/// Full-size SDXL base 1.0 in Stability-AI's single-file layout: its keys and
/// shapes (src/checkpoint/testdata/make_sdxl_shapes.py) and the diffusers keys
/// they map to.
fn sdxl_base_layout() -> serde_json::Value {
    let gz = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/checkpoint/testdata/sdxl_shapes.json.gz")).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut text).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A safetensors file with `shapes`' tensors (fp16) whose data is a hole: the
/// header is real, the 7 GB after it take no disk.
fn sparse_safetensors(path: &Path, shapes: &serde_json::Map<String, serde_json::Value>) {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (key, shape) in shapes {
        let numel: u64 = shape.as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product();
        let end = offset + 2 * numel;
        header.insert(key.clone(), serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut file = std::fs::File::create(path).unwrap();
    std::io::Write::write_all(&mut file, &(text.len() as u64).to_le_bytes()).unwrap();
    std::io::Write::write_all(&mut file, &text).unwrap();
    file.set_len(8 + text.len() as u64 + offset).unwrap();
}

/// `ModelShapes::sdxl()` is SDXL base 1.0 tensor for tensor: the diffusers keys
/// of the real model, and the shapes a full-size Stability-AI single file gives
/// through the loader's inference.
#[test]
fn sdxl_base_shapes_are_a_full_size_single_files() {
    let layout = sdxl_base_layout();
    let m = ModelShapes::sdxl();
    let keys = |layers: &[Layer]| keys_and_shapes(layers).into_keys().collect::<Vec<_>>();
    let expected = |part: &str| -> Vec<String> {
        layout["sdxl_diffusers"][part].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect()
    };
    assert_eq!(keys(&m.unet), expected("unet"));
    let mut vae = m.vae_encoder.clone();
    vae.extend(m.vae_decoder.clone());
    assert_eq!(keys(&vae), expected("vae"));
    assert_eq!(keys(&m.text_encoders[0].layers), expected("text_encoder"));
    assert_eq!(keys(&m.text_encoders[1].layers), expected("text_encoder_2"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sd_xl_base_1.0.safetensors");
    sparse_safetensors(&file, layout["sdxl"].as_object().unwrap());
    let single = ModelShapes::from_checkpoint(&file).unwrap();
    assert_eq!(single.family, Architecture::Sdxl);
    assert_eq!(keys_and_shapes(&single.unet), keys_and_shapes(&m.unet));
    assert_eq!(keys_and_shapes(&single.vae_encoder), keys_and_shapes(&m.vae_encoder));
    assert_eq!(keys_and_shapes(&single.vae_decoder), keys_and_shapes(&m.vae_decoder));
    for (a, b) in single.text_encoders.iter().zip(&m.text_encoders) {
        assert_eq!(keys_and_shapes(&a.layers), keys_and_shapes(&b.layers), "{}", a.role.name);
    }
    // The same run estimated from the file and from the built-in shapes.
    let plan = sdxl_plan("  optimizer: adamw_8bit\n  fused_backward: true\n  max_grad_norm: 0\n  gradient_checkpointing: true\n");
    assert_eq!(estimate(&single, &plan).peak, estimate(&m, &plan).peak);
}

/// An SDXL run's checkpoint, as the trainer plans it from its tensors, is what
/// the estimator computes from the shapes alone: both text encoders' weights
/// when they train (full) or their adapters (LoRA), EMA, 8-bit optimizer state.
#[test]
fn the_sdxl_checkpoint_size_is_the_trainers() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    support::subject_images(&data, 2);
    let model = support::fixture_model("tiny-sdxl");
    for (name, training) in [
        ("full", "  use_ema: true\n  optimizer: adamw_8bit\n  text_encoder_train_ratio: 0.5\n"),
        ("lora", "  use_lora: true\n  lora_layers: transformer\n  text_encoder_train_ratio: 1\n"),
        ("frozen", "  optimizer: adamw_8bit\n  fused_backward: true\n  max_grad_norm: 0\n"),
    ] {
        let config = support::load(&support::write_config_over(&model, root.path(), name, &data, training));
        let t = dreambooth::train::trainer::Trainer::start(config.clone(), support::quiet()).unwrap();
        let e = estimate(&ModelShapes::for_run(&config).unwrap(), &Plan::from_config(&config));
        assert_eq!(e.checkpoint_bytes, t.checkpoint_bytes(), "{name}");
    }
}
