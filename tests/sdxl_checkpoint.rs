//! SDXL single files in Stability-AI's (`sgm`) layout: `tests/fixtures/models/tiny-sdxl.safetensors`
//! is the folder `tiny-sdxl/` rounded to float16 and written as the released SDXL files are
//! (checked with diffusers' `from_single_file`, see SPEC.md). Loading it, what its shapes say
//! without configs, sampling from it, writing a folder back in that layout, and writing a run's
//! trained weights (the second text encoder above all) into the file's own layout.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use common::{max_abs_diff, model, reference, sdxl_request};
use dreambooth::checkpoint::models::scan;
use dreambooth::checkpoint::write::write_safetensors;
use dreambooth::checkpoint::{
    ldm, load_model, native_resolution, open_single_file, single_file_scheduler_for, Architecture, LoadedModel, ModelFormat,
    TokenizerSource,
};
use dreambooth::error::one_line;
use dreambooth::model::attention::AttentionBackend;
use dreambooth::pipeline::StableDiffusion;
use tch::{Device, Kind, Tensor};

fn folder() -> std::path::PathBuf {
    model("tiny-sdxl")
}

fn single_file() -> std::path::PathBuf {
    model("tiny-sdxl.safetensors")
}

fn load(path: &Path, configs: Option<&Path>) -> LoadedModel {
    load_model(path, configs).unwrap_or_else(|e| panic!("{}", one_line(&e)))
}

/// Every component's tensors by (component, key).
fn all_tensors(m: &LoadedModel) -> BTreeMap<(String, String), &Tensor> {
    let mut out = BTreeMap::new();
    for (part, map) in [("unet", &m.unet), ("vae", &m.vae)] {
        out.extend(map.iter().map(|(k, t)| ((part.to_string(), k.clone()), t)));
    }
    for text in &m.text_encoders {
        out.extend(text.tensors.iter().map(|(k, t)| ((text.role.name.to_string(), k.clone()), t)));
    }
    out
}

/// `got` has `want`'s tensors, each equal to `want`'s as `round` leaves it.
fn same_tensors(got: &LoadedModel, want: &LoadedModel, round: impl Fn(&Tensor) -> Tensor) {
    let (got, want) = (all_tensors(got), all_tensors(want));
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "different tensors");
    for (key, w) in &want {
        let g = got[key];
        assert_eq!(g.size(), w.size(), "{key:?}");
        assert!(g.to_kind(Kind::Float).equal(&round(w)), "{key:?} differs");
    }
    assert_eq!(want.len(), 1113, "UNet, VAE and both text encoders");
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}


#[test]
fn single_file_with_model_config_is_the_folder_rounded_to_fp16() {
    let folder_model = load(&folder(), None);
    let m = load(&single_file(), Some(&folder()));
    assert_eq!(m.architecture, Architecture::Sdxl);
    assert_eq!(m.format, ModelFormat::SingleFileSafetensors);
    let names: Vec<&str> = m.text_encoders.iter().map(|t| t.role.name).collect();
    assert_eq!(names, ["text_encoder", "text_encoder_2"]);
    same_tensors(&m, &folder_model, |t| t.to_kind(Kind::Half).to_kind(Kind::Float));
    // The configs, tokenizers and scheduler are the folder's.
    assert_eq!(json(&m.unet_config), json(&folder_model.unet_config));
    assert_eq!(json(&m.vae_config), json(&folder_model.vae_config));
    assert_eq!(json(&m.scheduler_config), json(&folder_model.scheduler_config));
    for (got, want) in m.text_encoders.iter().zip(&folder_model.text_encoders) {
        assert_eq!(json(&got.config), json(&want.config), "{}", got.role.name);
        assert_eq!(got.tokenizer, want.tokenizer, "{}", got.role.name);
    }
    assert!(m.force_zeros_for_empty_prompt);
}

/// Without configs the shapes give every size; SDXL's conventions decide what
/// shapes cannot say. The tiny model's head width (16 in the UNet, 8 and 12 in
/// the text encoders) is not SDXL's 64, so loading it alone is refused.
#[test]
fn single_file_alone_infers_the_folder_but_for_sdxl_conventions() {
    let want = load(&folder(), None);
    let err = one_line(&load_model(&single_file(), None).unwrap_err());
    assert!(err.contains("give --model-config") && err.contains("head width 64"), "{err}");

    let src = open_single_file(&single_file(), ModelFormat::SingleFileSafetensors).unwrap();
    let got = ldm::infer_shapes(src.as_ref(), &Architecture::Sdxl).unwrap();
    let (u, w) = (&got.unet, &want.unet_config);
    assert_eq!((u.in_channels, u.out_channels), (w.in_channels, w.out_channels));
    assert_eq!(u.block_out_channels, w.block_out_channels);
    assert_eq!(u.down_block_types, w.down_block_types);
    assert_eq!(u.up_block_types, w.up_block_types);
    assert_eq!(u.mid_block_type, w.mid_block_type);
    assert_eq!(json(&u.layers_per_block), json(&w.layers_per_block));
    assert_eq!(json(&u.cross_attention_dim), json(&w.cross_attention_dim));
    assert_eq!(json(&u.transformer_layers_per_block), json(&w.transformer_layers_per_block));
    assert_eq!((u.use_linear_projection, u.upcast_attention), (w.use_linear_projection, w.upcast_attention));
    assert_eq!(u.addition_embed_type.as_deref(), Some("text_time"));
    assert_eq!(u.addition_embed_type, w.addition_embed_type);
    assert_eq!(u.addition_time_embed_dim, w.addition_time_embed_dim);
    assert_eq!(u.projection_class_embeddings_input_dim, w.projection_class_embeddings_input_dim);
    // SDXL's conventions: 1024-pixel images, 32 norm groups (the tiny model has 16).
    assert_eq!((u.sample_size, w.sample_size), (128, 16));
    assert_eq!((u.norm_num_groups, w.norm_num_groups), (32, 16));

    let (v, wv) = (&got.vae, &want.vae_config);
    assert_eq!(v.block_out_channels, wv.block_out_channels);
    assert_eq!((v.layers_per_block, v.latent_channels), (wv.layers_per_block, wv.latent_channels));
    assert_eq!((v.in_channels, v.out_channels), (wv.in_channels, wv.out_channels));
    assert_eq!(v.scaling_factor, wv.scaling_factor);
    assert_eq!((v.use_quant_conv, v.use_post_quant_conv, v.mid_block_add_attention), (true, true, true));
    assert_eq!((v.sample_size, wv.sample_size), (1024, 32));
    assert_eq!((v.norm_num_groups, wv.norm_num_groups), (32, 8));

    let texts = got.text_encoders();
    assert_eq!(texts.len(), 2);
    for (t, w) in texts.into_iter().zip(&want.text_encoders) {
        let w = &w.config;
        let name = w.hidden_act.clone();
        assert_eq!((t.vocab_size, t.hidden_size, t.intermediate_size), (w.vocab_size, w.hidden_size, w.intermediate_size), "{name}");
        assert_eq!((t.num_hidden_layers, t.max_position_embeddings), (w.num_hidden_layers, w.max_position_embeddings), "{name}");
        assert_eq!((&t.hidden_act, t.projection_dim, t.layer_norm_eps), (&w.hidden_act, w.projection_dim, w.layer_norm_eps), "{name}");
        assert_eq!((t.bos_token_id, t.eos_token_id, t.pad_token_id), (w.bos_token_id, w.eos_token_id, w.pad_token_id), "{name}");
    }
    // Head counts come from configs: the folder's are not SDXL's width/64.
    assert_eq!(json(&want.unet_config.attention_head_dim), serde_json::json!([2, 3, 4]));
}

/// Configs for every component but no scheduler, tokenizer or model_index:
/// the single file's own defaults for those are SDXL base's, which the folder has too.
#[test]
fn given_configs_leave_sdxl_defaults_for_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    for (sub, file) in [("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json")] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        std::fs::copy(folder().join(sub).join(file), dir.path().join(sub).join(file)).unwrap();
    }
    // Both text encoders' configs are needed before the shapes' conventions may be skipped.
    let err = one_line(&load_model(&single_file(), Some(dir.path())).unwrap_err());
    assert!(err.contains("give --model-config"), "{err}");

    std::fs::create_dir_all(dir.path().join("text_encoder_2")).unwrap();
    std::fs::copy(folder().join("text_encoder_2/config.json"), dir.path().join("text_encoder_2/config.json")).unwrap();
    let m = load(&single_file(), Some(dir.path()));
    let want = load(&folder(), None);
    assert_eq!(json(&m.scheduler_config), json(&want.scheduler_config), "SDXL base's Euler schedule");
    assert_eq!(json(&single_file_scheduler_for(&Architecture::Sdxl)), json(&want.scheduler_config));
    assert!(m.force_zeros_for_empty_prompt, "diffusers' SDXL pipeline default");
    let tokenizers: Vec<&TokenizerSource> = m.text_encoders.iter().map(|t| &t.tokenizer).collect();
    assert_eq!(
        tokenizers,
        [&TokenizerSource::OpenAi { pad_token: "<|endoftext|>".into() }, &TokenizerSource::OpenAi { pad_token: "!".into() }]
    );
    same_tensors(&m, &want, |t| t.to_kind(Kind::Half).to_kind(Kind::Float));
}

#[test]
fn single_file_draws_the_reference_image() {
    let m = load(&single_file(), Some(&folder()));
    let sd = StableDiffusion::from_loaded(m, Device::Cpu, Kind::Float, AttentionBackend::Default).unwrap();
    let image = sd.text_to_image(&sdxl_request("euler", 0), |_, _| {}).unwrap();
    let d = max_abs_diff(&image, &reference("tiny-sdxl")["image.single_file"]);
    eprintln!("tiny-sdxl.safetensors: image difference {d:.2e}");
    assert!(d <= 2.0 / 255.0, "max abs diff {d}");
}

/// The folder in Stability-AI's layout: the fixture file's keys and shapes, and
/// loaded back (with the folder's configs) the folder's tensors bit for bit.
#[test]
fn folder_writes_as_the_fixture_single_file_and_loads_back() {
    let m = load(&folder(), None);
    let written = dreambooth::checkpoint::to_ldm::to_ldm(&m).unwrap();
    let fixture = open_single_file(&single_file(), ModelFormat::SingleFileSafetensors).unwrap();
    let ours: BTreeMap<&String, Vec<i64>> = written.iter().map(|(k, t)| (k, t.size())).collect();
    let theirs: BTreeMap<&String, Vec<i64>> = fixture.index().iter().map(|(k, info)| (k, info.shape.clone())).collect();
    assert_eq!(ours, theirs);
    assert_eq!(ours.len(), 1099);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("written.safetensors");
    write_safetensors(&file, &written, None).unwrap();
    let back = load(&file, Some(&folder()));
    assert_eq!(back.architecture, Architecture::Sdxl);
    same_tensors(&back, &m, |t| t.shallow_clone());
}

/// An SDXL refiner keeps only OpenCLIP bigG, as `conditioner.embedders.0.model`.
#[test]
fn a_refiner_file_is_refused_in_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("refiner.safetensors");
    let t = |shape: &[i64]| Tensor::zeros(shape, (Kind::Half, Device::Cpu));
    let tensors = vec![
        ("model.diffusion_model.input_blocks.0.0.weight".to_string(), t(&[32, 4, 3, 3])),
        ("model.diffusion_model.label_emb.0.0.weight".to_string(), t(&[128, 108])),
        ("conditioner.embedders.0.model.token_embedding.weight".to_string(), t(&[49408, 48])),
        ("conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight".to_string(), t(&[48])),
    ];
    write_safetensors(&file, &tensors, None).unwrap();
    let err = load_model(&file, None).unwrap_err();
    assert_eq!(err.chain().count(), 1, "one message: {err:#}");
    let msg = err.to_string();
    assert!(msg.contains("refiner.safetensors is not a Stable Diffusion 1.x/2.x or SDXL checkpoint"), "{msg}");
    assert!(msg.contains("an SDXL refiner"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn models_lists_the_sdxl_file_and_folder() {
    let entries = scan(&[common::fixtures().join("models")]);
    let by_name = |name: &str| entries.iter().find(|e| e.path.file_name().unwrap() == name).unwrap_or_else(|| panic!("{name} not listed"));
    assert_eq!(by_name("tiny-sdxl").architecture, Ok(Architecture::Sdxl));
    assert_eq!(by_name("tiny-sdxl").format, ModelFormat::Diffusers);
    assert_eq!(by_name("tiny-sdxl.safetensors").architecture, Ok(Architecture::Sdxl));
    assert_eq!(by_name("tiny-sdxl.safetensors").format, ModelFormat::SingleFileSafetensors);
    // The folder states its size (16 latents × 4); an SDXL file is SDXL's 1024.
    assert_eq!(native_resolution(&folder()), Some(64));
    assert_eq!(native_resolution(&single_file()), Some(1024));
}

/// A full fine-tune over the SDXL single file, both text encoders trained: `export
/// --format ldm` puts every trained tensor back under the file's own keys (the
/// second encoder's q/k/v fused into `in_proj`, its projection transposed) and
/// keeps everything else as the file had it.
#[test]
fn export_writes_a_trained_second_text_encoder_into_the_files_layout() {
    let root = tempfile::tempdir().unwrap();
    let run = root.path().join("runs/dog");
    let step = run.join("checkpoints/step-000001");
    std::fs::create_dir_all(&step).unwrap();
    std::fs::write(
        run.join("config.yaml"),
        format!(
            "name: dog\nsource_checkpoint: {}\noutput_dir: {}\nconcepts:\n  - instance_data_dir: {}\n    instance_prompt: a photo of sks dog\n",
            single_file().display(),
            root.path().join("runs").display(),
            root.path().join("data").display()
        ),
    )
    .unwrap();
    std::fs::write(step.join("state.json"), "{}").unwrap();

    // "Trained" weights: the source's, float32, shifted by a known amount.
    let source = load(&single_file(), Some(&folder()));
    let shifted = |map: &HashMap<String, Tensor>, by: f64| -> Vec<(String, Tensor)> {
        map.iter().map(|(k, t)| (k.clone(), t.to_kind(Kind::Float) + by)).collect()
    };
    let unet = shifted(&source.unet, 0.25);
    let text_2 = shifted(&source.text_encoders[1].tensors, 0.5);
    write_safetensors(&step.join("unet.safetensors"), &unet, None).unwrap();
    write_safetensors(&step.join("text_encoder_2.safetensors"), &text_2, None).unwrap();

    let out = root.path().join("exported.safetensors");
    dreambooth::train::export::export(&run, "ldm", &out, None, false).unwrap_or_else(|e| panic!("{}", one_line(&e)));

    // The file's own keys, shapes and dtypes.
    let written = open_single_file(&out, ModelFormat::SingleFileSafetensors).unwrap();
    let original = open_single_file(&single_file(), ModelFormat::SingleFileSafetensors).unwrap();
    let layout = |src: &dyn dreambooth::checkpoint::source::TensorSource| -> Vec<(String, Vec<i64>, Kind)> {
        src.index().iter().map(|(k, i)| (k.clone(), i.shape.clone(), i.kind)).collect()
    };
    assert_eq!(layout(written.as_ref()), layout(original.as_ref()));
    // Untrained parts exactly as the file had them, bit for bit.
    for key in original.index().keys().filter(|k| !k.starts_with("model.diffusion_model.") && !k.starts_with("conditioner.embedders.1.")) {
        assert!(written.load(key).unwrap().equal(&original.load(key).unwrap()), "{key} changed");
    }
    assert!(written.load("conditioner.embedders.1.model.logit_scale").unwrap().equal(&original.load("conditioner.embedders.1.model.logit_scale").unwrap()));

    // Read back, the trained tensors (in the file's float16).
    let back = load(&out, Some(&folder()));
    let half = |t: &Tensor| t.to_kind(Kind::Half).to_kind(Kind::Float);
    let expect = |list: &[(String, Tensor)], got: &HashMap<String, Tensor>, what: &str| {
        assert_eq!(list.len(), got.len(), "{what}");
        for (k, t) in list {
            assert!(got[k].to_kind(Kind::Float).equal(&half(t)), "{what} {k} is not the trained tensor");
        }
    };
    expect(&unet, &back.unet, "UNet");
    expect(&text_2, &back.text_encoders[1].tensors, "text_encoder_2");
    for (k, t) in &source.text_encoders[0].tensors {
        assert!(back.text_encoders[0].tensors[k].equal(t), "text_encoder {k} changed");
    }
    // The transposed projection and one fused in_proj, by hand.
    let projection = written.load("conditioner.embedders.1.model.text_projection").unwrap();
    let trained_projection = text_2.iter().find(|(k, _)| k == "text_projection.weight").unwrap().1.tr();
    assert!(projection.to_kind(Kind::Float).equal(&half(&trained_projection)));
    let in_proj = written.load("conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight").unwrap();
    let get = |k: &str| text_2.iter().find(|(n, _)| n == k).unwrap().1.shallow_clone();
    let fused = Tensor::cat(&[0, 1, 2].map(|i| get(&format!("encoder.layers.3.self_attn.{}_proj.weight", ["q", "k", "v"][i]))), 0);
    assert!(in_proj.to_kind(Kind::Float).equal(&half(&fused)));
}
