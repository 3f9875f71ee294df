//! LR schedules equal diffusers' get_scheduler at every step (fixture from
//! tests/fixtures/make_lr_fixtures.py).

use dreambooth::config::schema::LrScheduler;
use dreambooth::train::lr_schedule::LrSchedule;

#[test]
fn schedules_match_diffusers_at_every_step() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/reference/lr_schedules.json");
    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let kind = match case["name"].as_str().unwrap() {
            "constant" => LrScheduler::Constant,
            "constant_with_warmup" => LrScheduler::ConstantWithWarmup,
            "linear" => LrScheduler::LinearWithWarmup,
            "polynomial" => LrScheduler::Polynomial,
            "cosine" => LrScheduler::Cosine,
            "cosine_with_restarts" => LrScheduler::CosineWithRestarts,
            other => panic!("unknown case {other}"),
        };
        let schedule = LrSchedule {
            kind,
            base_lr: case["base_lr"].as_f64().unwrap(),
            warmup_steps: case["warmup"].as_u64().unwrap(),
            total_steps: case["total"].as_u64().unwrap(),
            power: case["power"].as_f64().unwrap_or(1.0),
            lr_end: case["lr_end"].as_f64().unwrap_or(1e-7),
            cycles: case["cycles"].as_u64().unwrap_or(1) as u32,
        };
        // A second parameter group at its own rate (the text encoder's) follows
        // the same schedule, scaled: diffusers' param groups under one LambdaLR.
        let scale = case["second_group_scale"].as_f64().unwrap();
        for (step, want) in case["second_group_lrs"].as_array().unwrap().iter().enumerate() {
            let (want, got) = (want.as_f64().unwrap(), schedule.lr_at(step as u64) * scale);
            assert!((got - want).abs() <= 1e-18 + 1e-12 * want.abs(), "{kind:?} second group, step {step}: {got} vs {want}");
        }
        for (step, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = schedule.lr_at(step as u64);
            assert!((got - want).abs() <= 1e-18 + 1e-12 * want.abs(), "{kind:?} step {step}: {got} vs {want}");
        }
    }
}
