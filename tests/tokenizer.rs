//! The CLIP tokenizer against transformers' CLIPTokenizer (tests/fixtures/reference/tokens.json).

use std::path::{Path, PathBuf};

use dreambooth::tokenizer::ClipTokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Reference {
    prompts: Vec<String>,
    sd1: Vec<Vec<i64>>,
    sd2: Vec<Vec<i64>>,
}

fn reference() -> Reference {
    let path = fixtures().join("reference/tokens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("tokens.json parses");
    let ids = |key: &str| -> Vec<Vec<i64>> { serde_json::from_value(json[key].clone()).expect("id lists") };
    Reference { prompts: serde_json::from_value(json["prompts"].clone()).expect("prompts"), sd1: ids("sd1"), sd2: ids("sd2") }
}

fn check_all(tok: &ClipTokenizer, prompts: &[String], expected: &[Vec<i64>], what: &str) {
    assert_eq!(prompts.len(), expected.len());
    for (prompt, want) in prompts.iter().zip(expected) {
        assert_eq!(&tok.encode_padded(prompt, 77), want, "{what}: prompt {prompt:?}");
    }
}

#[test]
fn openai_vocabulary_builtin() {
    let tok = ClipTokenizer::openai().unwrap();
    assert_eq!(tok.encode("a photo of a cat"), vec![49406, 320, 1125, 539, 320, 2368, 49407]);
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(tok.pad_id(), 49407);
}

#[test]
fn sd1_folder_matches_transformers() {
    let r = reference();
    let tok = ClipTokenizer::from_folder(&fixtures().join("models/tiny-sd1/tokenizer")).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.vocab_size()), (49406, 49407, 49407, 49408));
    check_all(&tok, &r.prompts, &r.sd1, "sd1 folder");
}

#[test]
fn sd2_folder_matches_transformers() {
    let r = reference();
    let tok = ClipTokenizer::from_folder(&fixtures().join("models/tiny-sd2/tokenizer")).unwrap();
    assert_eq!(tok.pad_id(), 0);
    check_all(&tok, &r.prompts, &r.sd2, "sd2 folder");
}

#[test]
fn builtin_equals_folders() {
    let r = reference();
    let sd1 = ClipTokenizer::openai().unwrap();
    check_all(&sd1, &r.prompts, &r.sd1, "openai()");
    let sd2 = ClipTokenizer::openai().unwrap().with_pad_token("!").unwrap();
    check_all(&sd2, &r.prompts, &r.sd2, "openai().with_pad_token(\"!\")");
}

#[test]
fn token_lookup() {
    let tok = ClipTokenizer::openai().unwrap();
    assert_eq!(tok.token_id("<|endoftext|>"), Some(49407));
    assert_eq!(tok.token_id("sks</w>"), Some(48136));
    assert_eq!(tok.token_id("no such token"), None);
}

/// Special-token behaviour checked against transformers 5.24 by hand.
#[test]
fn special_tokens_like_transformers() {
    let sd1 = ClipTokenizer::openai().unwrap();
    // A special token typed in a prompt is the token; a capitalised one is plain text.
    assert_eq!(sd1.encode("<|endoftext|>x"), vec![49406, 49407, 343, 49407]);
    assert_eq!(sd1.encode("a <|ENDOFTEXT|> b"), vec![49406, 320, 27, 347, 40786, 4160, 91, 285, 321, 49407]);
    assert_eq!(sd1.encode("wow!!! yes"), vec![49406, 2781, 995, 1958, 49407]);
    // SD 2's pad token "!" is special too: each "!" is id 0.
    let sd2 = ClipTokenizer::openai().unwrap().with_pad_token("!").unwrap();
    assert_eq!(sd2.encode("wow!!! yes"), vec![49406, 2781, 0, 0, 0, 1958, 49407]);
}

/// The hub's SD layout: AddedToken objects with `normalized: true` (matched after lower
/// casing), and special_tokens_map.json's pad token winning over tokenizer_config.json's.
#[test]
fn hub_style_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/tiny-sd1/tokenizer");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let added = |c: &str| format!(r#"{{"content": "{c}", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false}}"#);
    let map = format!(
        r#"{{"bos_token": {}, "eos_token": {}, "pad_token": "!", "unk_token": {}}}"#,
        added("<|startoftext|>"),
        added("<|endoftext|>"),
        added("<|endoftext|>")
    );
    std::fs::write(dir.path().join("special_tokens_map.json"), map).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"pad_token": "<|endoftext|>", "model_max_length": 77}"#).unwrap();
    let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
    assert_eq!(tok.pad_id(), 0);
    assert_eq!(tok.encode("a <|ENDOFTEXT|> b"), vec![49406, 320, 49407, 321, 49407]);
    assert_eq!(tok.encode("hello!"), vec![49406, 3306, 0, 49407]);
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_folder(dir.path()).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "{err}");

    std::fs::write(dir.path().join("vocab.json"), "{\"a\": 0}").unwrap();
    let err = ClipTokenizer::from_folder(dir.path()).unwrap_err().to_string();
    assert!(err.contains("merges.txt"), "{err}");

    std::fs::write(dir.path().join("vocab.json"), "{not json").unwrap();
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\n").unwrap();
    let err = ClipTokenizer::from_folder(dir.path()).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "{err}");

    let err = ClipTokenizer::openai().unwrap().with_pad_token("<pad>").unwrap_err().to_string();
    assert!(err.contains("<pad>"), "{err}");
}

/// Bulk comparison with transformers, for development: `TOKENIZER_COMPARE=file.json`
/// (same layout as tokens.json: "prompts", "sd1", optional "sd2";
/// ids unpadded, or padded to "max_len" when given).
#[test]
fn bulk_comparison_from_env() {
    let Ok(path) = std::env::var("TOKENIZER_COMPARE") else { return };
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let prompts: Vec<String> = serde_json::from_value(json["prompts"].clone()).unwrap();
    let want: Vec<Vec<i64>> = serde_json::from_value(json["sd1"].clone()).unwrap();
    let len = json["max_len"].as_u64().map(|n| n as usize);
    let mut bad = 0;
    let sd1 = ClipTokenizer::openai().unwrap();
    let sd2 = ClipTokenizer::openai().unwrap().with_pad_token("!").unwrap();
    let want2: Vec<Vec<i64>> = serde_json::from_value(json["sd2"].clone()).unwrap_or_default();
    let cases = want.iter().map(|w| (&sd1, w)).zip(prompts.iter()).chain(want2.iter().map(|w| (&sd2, w)).zip(prompts.iter()));
    for ((tok, w), p) in cases {
        let got = match len {
            Some(n) => tok.encode_padded(p, n),
            None => tok.encode(p),
        };
        if &got != w {
            bad += 1;
            if bad <= 20 {
                eprintln!("MISMATCH {p:?} ({:?})\n  got  {got:?}\n  want {w:?}", p.chars().map(|c| format!("{:x}", c as u32)).collect::<Vec<_>>());
            }
        }
    }
    eprintln!("{} prompts, {bad} mismatches", prompts.len());
    assert_eq!(bad, 0);
}

/// Same, for tokenizer folders: `TOKENIZER_COMPARE_FOLDERS=file.json` with "prompts",
/// "max_len" and "folders": {folder path: [ids per prompt]}.
#[test]
fn folder_comparison_from_env() {
    let Ok(path) = std::env::var("TOKENIZER_COMPARE_FOLDERS") else { return };
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let prompts: Vec<String> = serde_json::from_value(json["prompts"].clone()).unwrap();
    let max_len = json["max_len"].as_u64().unwrap() as usize;
    let base = Path::new(&path).parent().unwrap();
    let mut bad = 0;
    for (folder, want) in json["folders"].as_object().unwrap() {
        let tok = ClipTokenizer::from_folder(&base.join(folder)).unwrap();
        let want: Vec<Vec<i64>> = serde_json::from_value(want.clone()).unwrap();
        for (p, w) in prompts.iter().zip(&want) {
            let got = tok.encode_padded(p, max_len);
            if &got != w {
                bad += 1;
                eprintln!("MISMATCH {folder} {p:?}\n  got  {got:?}\n  want {w:?}");
            }
        }
    }
    eprintln!("{} prompts, {bad} mismatches", prompts.len());
    assert_eq!(bad, 0);
}

/// `max_token_length` past one window: kohya's layout (train_util.py
/// `get_input_ids`): the prompt padded to max_token_length + 2, cut into 75-token
/// windows, each between the start token and the sequence's last token; with a
/// pad token that is not the end token (SD 2.x), a full window ends in the end
/// token and an empty one starts with it.
#[test]
fn long_prompts_are_laid_out_in_windows_of_75() {
    let sd1 = ClipTokenizer::openai().unwrap();
    let (bos, eos) = (sd1.bos_id(), sd1.eos_id());
    let words = |n: usize| vec!["cat"; n].join(" ");
    let cat = sd1.encode("cat")[1];
    // One window: exactly encode_padded.
    assert_eq!(sd1.encode_chunked("a cat", 75, 77), sd1.encode_padded("a cat", 77));
    // 100 tokens in 150: the first window full, the second with the remaining 25.
    let ids = sd1.encode_chunked(&words(100), 150, 77);
    assert_eq!(ids.len(), 154);
    let (w1, w2) = ids.split_at(77);
    assert_eq!(w1[0], bos);
    assert!(w1[1..76].iter().all(|&t| t == cat));
    assert_eq!(w1[76], eos);
    assert_eq!(w2[0], bos);
    assert!(w2[1..26].iter().all(|&t| t == cat), "{w2:?}");
    assert!(w2[26..].iter().all(|&t| t == eos));
    // Past 225 tokens the text is cut; three windows.
    let ids = sd1.encode_chunked(&words(300), 225, 77);
    assert_eq!(ids.len(), 231);
    assert!(ids.chunks(77).all(|w| w[0] == bos && w[1..76].iter().all(|&t| t == cat) && w[76] == eos));

    let sd2 = ClipTokenizer::openai().unwrap().with_pad_token("!").unwrap();
    let pad = sd2.pad_id();
    assert_ne!(pad, eos);
    let ids = sd2.encode_chunked(&words(100), 150, 77);
    let (w1, w2) = ids.split_at(77);
    // The sequence ends in padding, so a full window gets its end token put in.
    assert_eq!((w1[75], w1[76]), (cat, eos));
    assert_eq!(&w2[25..28], &[cat, eos, pad]);
    let ids = sd2.encode_chunked("a cat", 150, 77);
    // An empty window: start, end, then padding.
    assert_eq!(&ids[77..80], &[bos, eos, pad]);
    assert!(ids[80..].iter().all(|&t| t == pad));
}
