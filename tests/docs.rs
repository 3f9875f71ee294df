//! The README's run config reference names every key the config has, so the
//! documentation cannot fall behind the schema.

use serde_yaml::Value;

#[test]
fn the_readme_names_every_config_key() {
    // Every optional concept key set, so that each is serialised.
    let text = "name: x\nsource_checkpoint: x\npreset: cpu\nconcepts:\n  - instance_data_dir: x\n    \
                instance_prompt: a photo of sks dog\n    instance_token: sks\n    class_token: dog\n    \
                class_prompt: a photo of a dog\n    class_data_dir: c\n    class_negative_prompt: blurry\n    \
                class_guidance_scale: 7.0\n    class_infer_steps: 20\n    \
                validation_data_dir: v\n    mask_dir: m\n";
    let config = dreambooth::config::parse_run_config(text, "a test config", std::path::Path::new(".")).unwrap();
    let Value::Mapping(top) = serde_yaml::to_value(&config).unwrap() else { panic!("a mapping") };
    let mut keys = Vec::new();
    for (k, v) in &top {
        let k = k.as_str().unwrap();
        match v {
            Value::Mapping(section) => keys.extend(section.keys().map(|n| format!("{k}.{}", n.as_str().unwrap()))),
            Value::Sequence(items) if k == "concepts" => {
                let Value::Mapping(concept) = &items[0] else { panic!("a concept mapping") };
                keys.extend(concept.keys().map(|n| format!("concepts[].{}", n.as_str().unwrap())));
            }
            _ => keys.push(k.to_string()),
        }
    }
    if !keys.iter().any(|k| k == "preset") {
        keys.push("preset".into()); // resolved away by the loader, but a key all the same
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("## Run config reference").expect("the README has a run config reference");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let missing: Vec<&String> = keys.iter().filter(|k| !section.contains(&format!("`{k}`"))).collect();
    assert!(missing.is_empty(), "the README's run config reference lacks {missing:?}");
    assert!(keys.len() > 60, "only {} keys found", keys.len());
}
