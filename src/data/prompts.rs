//! Each image's training prompt, as the AUTOMATIC1111 DreamBooth extension builds
//! it: `[filewords]` in a concept's prompt stands for the image's own words (its
//! `<image>.txt`, or else its file name without leading numbers), and the
//! concept's `instance_token` / `class_token` are put in or taken out so that
//! instance prompts name the subject and class prompts only its class (the
//! extension's wiki, "Class Explained": with instance token "Arnold
//! Schwarzenegger" and class token "man", the caption "Arnold Schwarzenegger,
//! man, suit" becomes "man, suit" for a class image).

use regex::Regex;

use super::images::ImageFile;
use crate::config::schema::Concept;

/// The placeholder a prompt uses for an image's own words.
pub const FILEWORDS: &str = "[filewords]";

pub fn uses_filewords(prompt: &str) -> bool {
    prompt.contains(FILEWORDS)
}

/// The image's own words: its caption file's text, or its file name without
/// the numbers and dashes it starts with ("003-a dog on grass.jpg" → "a dog on grass").
pub fn file_words(image: &ImageFile) -> String {
    if let Some(caption) = &image.caption {
        return caption.clone();
    }
    let stem = image.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    stem.trim_start_matches(|c: char| c.is_ascii_digit() || c == '-').trim_start().to_string()
}

/// Whether the prompt is for an instance image (it names the subject) or a
/// class image (it names only the class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Instance,
    Class,
}

/// `template` with `[filewords]` replaced by `words`, then the concept's tokens applied.
pub fn build(template: &str, words: &str, concept: &Concept, role: Role) -> String {
    let text = template.replace(FILEWORDS, words);
    let text = apply_tokens(&text, concept.instance_token.trim(), concept.class_token.trim(), role);
    tidy(&text)
}

/// A whole word, case-insensitive ("dog" matches "Dog," but not "dogs").
fn word(token: &str) -> Regex {
    Regex::new(&format!(r"(?i)\b{}\b", regex::escape(token))).expect("an escaped token is a valid pattern")
}

fn apply_tokens(text: &str, instance: &str, class: &str, role: Role) -> String {
    let has = |token: &str| !token.is_empty() && word(token).is_match(text);
    match role {
        Role::Instance if !instance.is_empty() && !class.is_empty() => {
            if has(instance) {
                text.to_string()
            } else if has(class) {
                // "a photo of a dog" → "a photo of sks dog": the subject's token
                // goes before its class word, the article goes.
                let with_article = Regex::new(&format!(r"(?i)\b(?:a|an|the)\s+({})\b", regex::escape(class))).expect("valid pattern");
                let text = with_article.replace_all(text, "$1");
                word(class).replace_all(&text, regex::NoExpand(&format!("{instance} {class}"))).into_owned()
            } else {
                format!("{instance}, {text}")
            }
        }
        Role::Instance if !instance.is_empty() && !has(instance) => format!("{instance}, {text}"),
        Role::Class if !instance.is_empty() && has(instance) => {
            let replacement = if has(class) || class.is_empty() { "" } else { class };
            let text = word(instance).replace_all(text, regex::NoExpand(replacement)).into_owned();
            if !class.is_empty() && !word(class).is_match(&text) { format!("{class}, {text}") } else { text }
        }
        Role::Class if !class.is_empty() && !has(class) => format!("{class}, {text}"),
        _ => text.to_string(),
    }
}

/// `prompt`'s comma-separated tags after the first in an order drawn from
/// `rng` (the first, usually the subject's token, stays in front); a prompt of
/// fewer than three tags comes back as it is, with no draw.
pub fn shuffle_tags(prompt: &str, rng: &mut crate::rng::CpuRng) -> String {
    let tags: Vec<&str> = prompt.split(',').map(str::trim).collect();
    if tags.len() < 3 {
        return prompt.to_string();
    }
    let order = Vec::<i64>::try_from(&rng.randperm(tags.len() as i64 - 1)).expect("randperm gives int64");
    let mut out = vec![tags[0]];
    out.extend(order.iter().map(|&i| tags[i as usize + 1]));
    out.join(", ")
}

/// Runs of white space become one space; separators left dangling by a removed
/// token ("sks, man" → ", man") go.
fn tidy(text: &str) -> String {
    let spaces = Regex::new(r"\s+").expect("valid pattern");
    let text = spaces.replace_all(text, " ");
    let empty_items = Regex::new(r"(^|,)\s*(,\s*)+").expect("valid pattern");
    let text = empty_items.replace_all(&text, "$1 ");
    let text = Regex::new(r"\s+,").expect("valid pattern").replace_all(&text, ",");
    text.trim().trim_start_matches(',').trim_end_matches(',').trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn concept(instance_token: &str, class_token: &str) -> Concept {
        Concept {
            instance_data_dir: PathBuf::from("data"),
            instance_prompt: String::new(),
            instance_token: instance_token.into(),
            class_token: class_token.into(),
            class_prompt: String::new(),
            class_data_dir: None,
            num_class_images: 0,
            class_negative_prompt: String::new(),
            class_guidance_scale: None,
            class_infer_steps: None,
            prior_loss_weight: 1.0,
            sample_prompts: Vec::new(),
            validation_data_dir: None,
            validation_split: 0.0,
            mask_dir: None,
        }
    }

    fn image(name: &str, caption: Option<&str>) -> ImageFile {
        ImageFile { path: PathBuf::from("data").join(name), caption: caption.map(str::to_string) }
    }

    #[test]
    fn file_words_are_the_caption_or_the_file_name() {
        assert_eq!(file_words(&image("1.png", Some("a dog, sitting"))), "a dog, sitting");
        assert_eq!(file_words(&image("003-a dog on grass.jpg", None)), "a dog on grass");
        assert_eq!(file_words(&image("portrait of me.webp", None)), "portrait of me");
    }

    /// The extension wiki's own example ("Class Explained").
    #[test]
    fn class_captions_lose_the_instance_token_and_keep_the_class() {
        let c = concept("Arnold Schwarzenegger", "man");
        let captions = [
            ("Arnold Schwarzenegger, man, sunglasses, black coat, muscular, scene from Terminator", "man, sunglasses, black coat, muscular, scene from Terminator"),
            ("Arnold Schwarzenegger, man, suit, red tie, smiling", "man, suit, red tie, smiling"),
            ("Arnold Schwarzenegger, muscular, smiling, man, flexing, black and white", "muscular, smiling, man, flexing, black and white"),
        ];
        for (caption, class_caption) in captions {
            assert_eq!(build("[filewords]", caption, &c, Role::Class), class_caption);
            // Instance prompts that already name both stay as they are.
            assert_eq!(build("[filewords]", caption, &c, Role::Instance), caption);
        }
    }

    #[test]
    fn instance_prompts_gain_the_token_before_the_class_word() {
        let c = concept("sks", "dog");
        assert_eq!(build("a photo of [filewords]", "a dog on the beach", &c, Role::Instance), "a photo of sks dog on the beach");
        assert_eq!(build("[filewords]", "The Dog sleeps", &c, Role::Instance), "sks dog sleeps");
        // A caption without the class word: the token goes in front.
        assert_eq!(build("[filewords]", "on the beach", &c, Role::Instance), "sks, on the beach");
        // "dogs" is not the word "dog".
        assert_eq!(build("[filewords]", "two dogs", &c, Role::Instance), "sks, two dogs");
    }

    #[test]
    fn class_prompts_name_the_class_instead_of_the_subject() {
        let c = concept("sks", "dog");
        assert_eq!(build("[filewords]", "a photo of sks on grass", &c, Role::Class), "a photo of dog on grass");
        assert_eq!(build("[filewords]", "a photo of sks dog", &c, Role::Class), "a photo of dog");
        assert_eq!(build("[filewords]", "on grass", &c, Role::Class), "dog, on grass");
    }

    #[test]
    fn one_token_alone_is_put_in_front_once() {
        assert_eq!(build("[filewords]", "on grass", &concept("sks", ""), Role::Instance), "sks, on grass");
        assert_eq!(build("a photo of sks", "", &concept("sks", ""), Role::Instance), "a photo of sks");
        assert_eq!(build("[filewords]", "on grass", &concept("", "dog"), Role::Class), "dog, on grass");
        assert_eq!(build("[filewords]", "on grass", &concept("", "dog"), Role::Instance), "on grass");
    }

    #[test]
    fn without_tokens_or_placeholder_the_prompt_is_kept() {
        let c = concept("", "");
        assert_eq!(build("a photo of sks dog", "ignored", &c, Role::Instance), "a photo of sks dog");
        assert_eq!(build("sks  [filewords] ", "a dog,  running", &c, Role::Instance), "sks a dog, running");
        assert!(uses_filewords("tchnclr [filewords]"));
        assert!(!uses_filewords("tchnclr"));
    }
}
