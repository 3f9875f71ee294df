//! Samplers and the training noise schedule against diffusers 0.42
//! (tests/fixtures/reference/schedulers.json and the `train.*` tensors).

use std::path::PathBuf;

use dreambooth::error::{exit_code, UsageError};
use dreambooth::scheduler::{build_sampler, NoiseSchedule, SchedulerConfig, SAMPLER_NAMES};
use serde_json::Value;
use tch::{Kind, Tensor};

const MODELS: [&str; 2] = ["tiny-sd1", "tiny-sd2"];
/// Timesteps and sigmas: schedule values (1e-6, relative above 1).
const SCHEDULE_TOL: f64 = 1e-6;
/// Step outputs (1e-5, relative above 1).
const STEP_TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    let path = fixtures().join("reference/schedulers.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("schedulers.json parses")
}

fn model_config(model: &str) -> SchedulerConfig {
    let path = fixtures().join("models").join(model).join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("scheduler_config.json parses")
}

fn floats(value: &Value) -> Vec<f64> {
    value.as_array().expect("a list").iter().map(|v| v.as_f64().expect("a number")).collect()
}

/// Largest error relative to max(1, |reference|).
fn max_error(ours: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "lengths differ");
    ours.iter().zip(reference).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f64::max)
}

fn tensor_values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).expect("tensor values")
}

fn tensor_from(values: &[f64], shape: &[i64]) -> Tensor {
    Tensor::from_slice(values).to_kind(Kind::Float).reshape(shape)
}

#[test]
fn timesteps_and_sigmas_match_diffusers() {
    let reference = reference();
    for model in MODELS {
        let config = model_config(model);
        for name in SAMPLER_NAMES {
            for steps in [8usize, 25] {
                let expected = &reference[model][name][steps.to_string()];
                let sampler = build_sampler(name, &config, steps).expect("sampler builds");
                let what = format!("{model} {name} {steps} steps");
                let err = max_error(sampler.timesteps(), &floats(&expected["timesteps"]));
                assert!(err <= SCHEDULE_TOL, "{what}: timesteps off by {err:e}");
                match (sampler.sigmas(), expected.get("sigmas")) {
                    (Some(ours), Some(theirs)) => {
                        let ours: Vec<f64> = ours.iter().map(|&s| s as f64).collect();
                        let err = max_error(&ours, &floats(theirs));
                        assert!(err <= SCHEDULE_TOL, "{what}: sigmas off by {err:e}");
                    }
                    (None, None) => {}
                    (ours, theirs) => panic!("{what}: sigmas present here {} vs reference {}", ours.is_some(), theirs.is_some()),
                }
                let init = expected["init_noise_sigma"].as_f64().expect("init_noise_sigma");
                let err = max_error(&[sampler.init_noise_sigma()], &[init]);
                assert!(err <= SCHEDULE_TOL, "{what}: init_noise_sigma {} vs {init}", sampler.init_noise_sigma());
            }
        }
    }
}

#[test]
fn first_steps_match_diffusers() {
    let reference = reference();
    let check = &reference["step_check"];
    let shape: Vec<i64> = check["shape"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let steps = check["num_inference_steps"].as_u64().unwrap() as usize;
    let model_outputs: Vec<Tensor> =
        check["model_outputs"].as_array().unwrap().iter().map(|v| tensor_from(&floats(v), &shape)).collect();
    let mut worst = Vec::new();
    for model in MODELS {
        let config = model_config(model);
        for name in SAMPLER_NAMES {
            let expected = reference[model][name]["step_check"].as_array().unwrap();
            let mut sampler = build_sampler(name, &config, steps).expect("sampler builds");
            let mut sample = tensor_from(&floats(&check["sample"]), &shape);
            // euler-a's noise: a generator seeded as the fixture's torch.manual_seed.
            let mut rng = dreambooth::rng::CpuRng::new(check["euler_a_noise_seed"].as_u64().unwrap());
            let mut worst_here: f64 = 0.0;
            for (i, (model_output, step)) in model_outputs.iter().zip(expected).enumerate() {
                let what = format!("{model} {name} step {i}");
                let t = step["timestep"].as_f64().unwrap();
                assert!((sampler.timesteps()[i] - t).abs() <= SCHEDULE_TOL * t.max(1.0), "{what}: timestep");
                let scaled = sampler.scale_model_input(&sample, i);
                let err = max_error(&tensor_values(&scaled), &floats(&step["scale_model_input"]));
                assert!(err <= STEP_TOL, "{what}: scale_model_input off by {err:e}");
                sample = sampler.step(model_output, i, &sample, &mut rng);
                let err = max_error(&tensor_values(&sample), &floats(&step["prev_sample"]));
                assert!(err <= STEP_TOL, "{what}: prev_sample off by {err:e}");
                worst_here = worst_here.max(err);
            }
            worst.push(format!("{model} {name}: {worst_here:.2e}"));
        }
    }
    eprintln!("max step error per sampler:\n  {}", worst.join("\n  "));
}

#[test]
fn training_schedule_matches_ddpm() {
    for model in MODELS {
        let path = fixtures().join("reference").join(format!("{model}.safetensors"));
        let tensors = Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let get = |key: &str| {
            tensors.iter().find(|(k, _)| k == key).map(|(_, t)| t.shallow_clone()).unwrap_or_else(|| panic!("{key}"))
        };
        let config = model_config(model);
        let schedule = NoiseSchedule::new(&config).expect("schedule builds");
        let (latents, noise, timesteps) = (get("train.latents"), get("train.noise"), get("train.timesteps"));
        let noisy = schedule.add_noise(&latents, &noise, &timesteps);
        let err = max_error(&tensor_values(&noisy), &tensor_values(&get("train.noisy_latents")));
        assert!(err <= STEP_TOL, "{model}: add_noise off by {err:e}");
        let target = match config.prediction_type.as_str() {
            "v_prediction" => schedule.velocity(&latents, &noise, &timesteps),
            _ => noise.shallow_clone(),
        };
        let err = max_error(&tensor_values(&target), &tensor_values(&get("train.target")));
        assert!(err <= STEP_TOL, "{model}: training target off by {err:e}");
        // SNR = alpha_bar / (1 - alpha_bar).
        let snr = tensor_values(&schedule.snr(&timesteps));
        let alphas = tensor_values(schedule.alphas_cumprod());
        for (s, t) in snr.iter().zip(tensor_values(&timesteps)) {
            let a = alphas[t as usize];
            assert!((s - a / (1.0 - a)).abs() <= 1e-4 * s.max(1.0), "{model}: snr at {t}");
        }
    }
}

#[test]
fn unknown_sampler_is_a_usage_error_naming_the_valid_ones() {
    let err = build_sampler("heun", &SchedulerConfig::stable_diffusion(), 20).err().expect("an error");
    assert!(err.downcast_ref::<UsageError>().is_some());
    assert_eq!(exit_code(&err), 2);
    let message = err.to_string();
    for name in SAMPLER_NAMES {
        assert!(message.contains(name), "{message}");
    }
}

#[test]
fn bad_config_values_name_the_key() {
    let cases: [(&str, fn(&mut SchedulerConfig)); 4] = [
        ("beta_schedule", |c| c.beta_schedule = "cubic".into()),
        ("prediction_type", |c| c.prediction_type = "noise".into()),
        ("timestep_spacing", |c| c.timestep_spacing = Some("sideways".into())),
        ("trained_betas", |c| c.trained_betas = Some(vec![0.1; 3])),
    ];
    for (key, spoil) in cases {
        let mut config = SchedulerConfig::stable_diffusion();
        spoil(&mut config);
        for name in SAMPLER_NAMES {
            let err = build_sampler(name, &config, 10).err().unwrap_or_else(|| panic!("{name} accepted bad {key}"));
            assert_eq!(exit_code(&err), 2, "{name}: {err}");
            assert!(err.to_string().contains(key), "{name}: {err}");
        }
    }
    let err = build_sampler("ddim", &SchedulerConfig::stable_diffusion(), 0).err().expect("0 steps refused");
    assert_eq!(exit_code(&err), 2);
}
