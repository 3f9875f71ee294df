//! kohya's SDXL LoRA format against diffusers (`make_sdxl_fixtures.py`): a
//! kohya file names SDXL UNet modules by the Stability-AI (LDM) module path
//! (`lora_unet_input_blocks_4_1_…`), its text encoders `lora_te1_` / `lora_te2_`.
//! Merged or attached, it computes what `StableDiffusionXLPipeline.load_lora_weights`
//! computes; adapters we attach for training are saved under the same names and
//! load back; SD 1.x files on SDXL (and the reverse) are refused in words.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use common::{close, fixtures, max_abs_diff, model, reference, sdxl_request};
use dreambooth::checkpoint::load_model;
use dreambooth::checkpoint::safetensors_file::SafetensorsFile;
use dreambooth::checkpoint::source::TensorSource;
use dreambooth::config::schema::{LoraLayers, Training};
use dreambooth::model::attention::AttentionBackend;
use dreambooth::model::lora::LoraNetwork;
use dreambooth::model::unet::{Conditioning, TextTime};
use dreambooth::pipeline::StableDiffusion;
use dreambooth::train::modules::choose_trainable_parameters;
use tch::{Device, Kind, Tensor};

/// 302 UNet modules (28 transformer blocks × 10 projections, 11 × proj_in/out), 18 + 24 text.
const FIXTURE_MODULES: usize = 344;

fn kohya_file() -> PathBuf {
    fixtures().join("reference/lora/tiny-sdxl-kohya.safetensors")
}

fn refs() -> HashMap<String, Tensor> {
    reference("lora/tiny-sdxl-lora")
}

fn sdxl() -> StableDiffusion {
    StableDiffusion::load(&model("tiny-sdxl"), None, Device::Cpu, AttentionBackend::Default).unwrap()
}



fn unet_out(sd: &StableDiffusion, r: &HashMap<String, Tensor>) -> Tensor {
    let cond = Conditioning {
        encoder_hidden_states: r["unet.encoder_hidden_states"].shallow_clone(),
        text_time: Some(TextTime { text_embeds: r["unet.text_embeds"].shallow_clone(), time_ids: r["unet.time_ids"].shallow_clone() }),
    };
    tch::no_grad(|| sd.unet.forward(&r["unet.sample"], &r["unet.timestep"], &cond))
}

/// UNet output, prompt embeds, pooled embedding and the Euler image against the
/// references with suffix `suffix` (`""` full strength, `".half"` weight 0.5).
fn check_against_diffusers(sd: &StableDiffusion, r: &HashMap<String, Tensor>, suffix: &str, image: &str) {
    close(&format!("unet.out{suffix}"), &unet_out(sd, r), &r[&format!("unet.out{suffix}")], 1e-4);
    let prompt = tch::no_grad(|| sd.encode_prompt("a photo of sks dog", 1));
    close(&format!("text.prompt_embeds{suffix}"), &prompt.hidden, &r[&format!("text.prompt_embeds{suffix}")], 1e-4);
    close(&format!("text.pooled{suffix}"), prompt.pooled.as_ref().unwrap(), &r[&format!("text.pooled{suffix}")], 1e-4);
    let drawn = sd.text_to_image(&sdxl_request("euler", 0), |_, _| {}).unwrap();
    close(image, &drawn, &r[image], 2.0 / 255.0);
}

#[test]
fn merged_kohya_sdxl_lora_matches_diffusers() {
    let r = refs();
    let mut sd = sdxl();
    assert_eq!(sd.merge_lora(&kohya_file(), 1.0).unwrap(), FIXTURE_MODULES, "modules placed");
    check_against_diffusers(&sd, &r, "", "image.lora");
    let base = max_abs_diff(&r["image.lora"], &r["image.base"]);
    assert!(base > 0.05, "the LoRA should change the image (changed by {base})");
}

/// Weight 0.5 equals diffusers' `set_adapters(..., adapter_weights=[0.5])`,
/// which scales the UNet's and both text encoders' adapters alike.
#[test]
fn half_weight_matches_diffusers_adapter_weight() {
    let r = refs();
    let mut sd = sdxl();
    sd.merge_lora(&kohya_file(), 0.5).unwrap();
    check_against_diffusers(&sd, &r, ".half", "image.half");
}

#[test]
fn unmerged_adapters_match_diffusers() {
    let r = refs();
    let mut sd = sdxl();
    let net = sd.attach_lora_file(&kohya_file(), Kind::Float).unwrap();
    assert_eq!(net.modules.len(), FIXTURE_MODULES);
    close("unet.out", &unet_out(&sd, &r), &r["unet.out"], 1e-4);
    let prompt = tch::no_grad(|| sd.encode_prompt("a photo of sks dog", 1));
    close("text.prompt_embeds", &prompt.hidden, &r["text.prompt_embeds"], 1e-4);
    close("text.pooled", prompt.pooled.as_ref().unwrap(), &r["text.pooled"], 1e-4);
}

fn module_names(path: &Path) -> BTreeSet<String> {
    let file = SafetensorsFile::open(path).unwrap();
    file.index().keys().map(|k| k.split_once('.').unwrap().0.to_string()).collect()
}

/// Fresh adapters for a LoRA run on `sd`, as the trainer attaches them.
fn attach_for_training(sd: &mut StableDiffusion, layers: LoraLayers) -> LoraNetwork {
    let loaded = load_model(&model("tiny-sdxl"), None).unwrap();
    let (_, params) = StableDiffusion::from_loaded_with_parameters(loaded, Device::Cpu, Kind::Float, AttentionBackend::Default).unwrap();
    let training = Training {
        use_lora: true,
        lora_rank: 4,
        lora_alpha: 2.0,
        lora_layers: layers,
        text_encoder_train_ratio: 1.0,
        ..Training::default()
    };
    choose_trainable_parameters(&training, sd, &params, 7).unwrap().lora.expect("a LoRA run")
}

/// The block names kohya's SDXL files use behind `lora_unet_`.
fn is_kohya_sdxl_name(name: &str) -> bool {
    let ldm_blocks = ["input_blocks_", "middle_block_", "output_blocks_"];
    match name.strip_prefix("lora_unet_") {
        Some(module) => ldm_blocks.iter().any(|b| module.starts_with(b)),
        None => name.starts_with("lora_te1_text_model_encoder_layers_") || name.starts_with("lora_te2_text_model_encoder_layers_"),
    }
}

/// What a LoRA run on SDXL saves is named as kohya names SDXL modules: for
/// `transformer`, exactly the fixture's modules, which diffusers placed; the
/// resnet and resampler convolutions of `all` by their LDM names. Each file
/// carries `ss_base_model_version` and loads back to the same outputs.
#[test]
fn adapters_attached_for_training_save_kohya_sdxl_names_and_load_back() {
    let r = refs();
    let dir = tempfile::tempdir().unwrap();
    for layers in [LoraLayers::Attention, LoraLayers::Transformer, LoraLayers::All] {
        let mut sd = sdxl();
        let net = attach_for_training(&mut sd, layers);
        // Fresh `up`s are zero; give them values so the round trip means something.
        let mut rng = dreambooth::rng::CpuRng::new(11);
        tch::no_grad(|| {
            for m in &net.modules {
                m.up.shallow_clone().copy_(&(rng.randn(&m.up.size()) * 0.1));
            }
        });
        let path = dir.path().join(format!("{layers:?}.safetensors"));
        net.save(&path, &Default::default()).unwrap();

        let names = module_names(&path);
        assert_eq!(names.len(), net.modules.len());
        let foreign: Vec<&String> = names.iter().filter(|n| !is_kohya_sdxl_name(n)).collect();
        assert!(foreign.is_empty(), "{layers:?}: not kohya SDXL names: {foreign:?}");
        for name in ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_output_blocks_0_1_transformer_blocks_2_attn2_to_out_0", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_3_self_attn_out_proj"] {
            assert!(names.contains(name), "{layers:?}: {name} missing");
        }
        let wide = layers != LoraLayers::Attention;
        for name in ["lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj", "lora_unet_output_blocks_0_1_proj_in", "lora_te2_text_model_encoder_layers_0_mlp_fc1"] {
            assert_eq!(names.contains(name), wide, "{layers:?}: {name}");
        }
        if layers == LoraLayers::Transformer {
            assert_eq!(names, module_names(&kohya_file()), "the fixture's modules");
        }
        let convs = [
            "lora_unet_input_blocks_1_0_in_layers_2",
            "lora_unet_input_blocks_1_0_emb_layers_1",
            "lora_unet_input_blocks_1_0_out_layers_3",
            "lora_unet_input_blocks_3_0_op",
            "lora_unet_input_blocks_4_0_skip_connection",
            "lora_unet_middle_block_2_out_layers_3",
            "lora_unet_output_blocks_2_2_conv",
            "lora_unet_output_blocks_5_2_conv",
            "lora_unet_output_blocks_8_0_skip_connection",
        ];
        for name in convs {
            assert_eq!(names.contains(name), layers == LoraLayers::All, "{layers:?}: {name}");
        }
        let meta = SafetensorsFile::open(&path).unwrap().metadata();
        assert_eq!(meta.get("ss_base_model_version").map(String::as_str), Some("sdxl_base_v1-0"));
        assert_eq!(meta.get("ss_network_module").map(String::as_str), Some("networks.lora"));
        assert_eq!(meta.get("ss_network_dim").map(String::as_str), Some("4"));

        let want_unet = unet_out(&sd, &r);
        let want_text = tch::no_grad(|| sd.encode_prompt("a photo of sks dog", 1));
        let mut fresh = sdxl();
        let loaded = fresh.attach_lora_file(&path, Kind::Float).unwrap();
        assert_eq!(loaded.modules.len(), net.modules.len());
        assert_eq!(max_abs_diff(&unet_out(&fresh, &r), &want_unet), 0.0, "{layers:?}: UNet");
        let got_text = tch::no_grad(|| fresh.encode_prompt("a photo of sks dog", 1));
        assert_eq!(max_abs_diff(&got_text.hidden, &want_text.hidden), 0.0, "{layers:?}: prompt embeds");
        assert_eq!(max_abs_diff(got_text.pooled.as_ref().unwrap(), want_text.pooled.as_ref().unwrap()), 0.0, "{layers:?}: pooled");
    }
}

/// SD 1.x keeps the diffusers-path names and says so in its metadata.
#[test]
fn sd1_adapters_keep_diffusers_names_and_say_sd_v1() {
    let mut sd = StableDiffusion::load(&model("tiny-sd1"), None, Device::Cpu, AttentionBackend::Default).unwrap();
    let loaded = load_model(&model("tiny-sd1"), None).unwrap();
    let (_, params) = StableDiffusion::from_loaded_with_parameters(loaded, Device::Cpu, Kind::Float, AttentionBackend::Default).unwrap();
    let training = Training { use_lora: true, lora_layers: LoraLayers::All, text_encoder_train_ratio: 1.0, ..Training::default() };
    let net = choose_trainable_parameters(&training, &mut sd, &params, 7).unwrap().lora.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sd1.safetensors");
    net.save(&path, &Default::default()).unwrap();
    let names = module_names(&path);
    assert_eq!(names, module_names(&fixtures().join("reference/lora/tiny-sd1-kohya.safetensors")));
    assert!(names.contains("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"));
    assert!(names.contains("lora_unet_down_blocks_0_downsamplers_0_conv"));
    let meta = SafetensorsFile::open(&path).unwrap().metadata();
    assert_eq!(meta.get("ss_base_model_version").map(String::as_str), Some("sd_v1"));
}

/// A text-encoder-only LoRA run still says which family it is for.
#[test]
fn a_text_encoder_only_run_names_its_family() {
    let mut sd = sdxl();
    let loaded = load_model(&model("tiny-sdxl"), None).unwrap();
    let (_, params) = StableDiffusion::from_loaded_with_parameters(loaded, Device::Cpu, Kind::Float, AttentionBackend::Default).unwrap();
    let training = Training { use_lora: true, train_unet: false, text_encoder_train_ratio: 1.0, ..Training::default() };
    let net = choose_trainable_parameters(&training, &mut sd, &params, 7).unwrap().lora.unwrap();
    assert!(net.modules.iter().all(|m| m.name.starts_with("lora_te1_") || m.name.starts_with("lora_te2_")));
    assert_eq!(net.base_model_version, Some("sdxl_base_v1-0"));
}

/// An SD 1.x LoRA on SDXL, and an SDXL LoRA on SD 1.x, fail with one sentence
/// that names the file and says whose names it holds; no weight changes.
#[test]
fn a_lora_for_another_family_is_refused_in_words() {
    let sd1_file = fixtures().join("reference/lora/tiny-sd1-kohya.safetensors");
    let mut sd = sdxl();
    for err in [sd.merge_lora(&sd1_file, 1.0).unwrap_err(), sd.attach_lora_file(&sd1_file, Kind::Float).unwrap_err()] {
        let msg = dreambooth::error::one_line(&err);
        assert!(msg.contains(sd1_file.to_str().unwrap()), "{msg}");
        assert!(msg.contains("an SD 1.x/2.x LoRA") && msg.contains("this SDXL model") && msg.contains("a LoRA for another model family?"), "{msg}");
    }
    close("unet.out (base)", &unet_out(&sd, &refs()), &reference("tiny-sdxl")["unet.out"], 1e-4);

    let mut sd1 = StableDiffusion::load(&model("tiny-sd1"), None, Device::Cpu, AttentionBackend::Default).unwrap();
    let msg = dreambooth::error::one_line(&sd1.merge_lora(&kohya_file(), 1.0).unwrap_err());
    assert!(msg.contains("an SDXL LoRA") && msg.contains("this SD 1.x model") && msg.contains("another model family"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
}
