//! The training set: every concept's instance images (with their prompt or
//! per-image caption) and class images for prior preservation, already resized
//! and cropped; optionally their VAE latent distributions, cached once. The data
//! order (a shuffled permutation per epoch, the flip draws, each concept's
//! class-image cursor) comes from a private generator and is part of the
//! checkpoint, so a resumed run sees the same batches.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::images::{list_images, load_rgb, resize_center_crop, to_tensor, ImageFile};
use super::prompts::{self, Role};
use crate::config::schema::{Concept, RunConfig};
use crate::error::usage;
use crate::rng::CpuRng;

/// One image of the training set.
pub struct Example {
    /// `[3, H, W]` in [-1, 1], on the CPU.
    pub pixels: Tensor,
    pub prompt: String,
    pub concept: usize,
    /// Token ids of `prompt` (filled by [`Dataset::tokenize`]).
    pub ids: Vec<i64>,
    /// `cache_latents`: (mean, std) of the VAE's latent distribution, as is and flipped.
    pub cached: Option<[(Tensor, Tensor); 2]>,
}

/// Instance images of every concept and, per concept, its class images.
pub struct Dataset {
    pub instances: Vec<Example>,
    /// `classes[c]`: concept c's class images (empty: no prior preservation).
    pub classes: Vec<Vec<Example>>,
    /// Each concept's prior_loss_weight.
    pub prior_weights: Vec<f64>,
}

/// Loads the images of a folder as examples, each with the prompt `prompt_of`
/// gives it; every image is decoded now, so a bad file stops the run before
/// anything is written.
pub fn load_folder(
    dir: &Path,
    what: &str,
    prompt_of: impl Fn(&ImageFile) -> String,
    concept: usize,
    resolution: i64,
    limit: Option<usize>,
) -> anyhow::Result<Vec<Example>> {
    let mut files = list_images(dir, what)?;
    if let Some(n) = limit {
        files.truncate(n);
    }
    files
        .into_iter()
        .map(|f| {
            let img = load_rgb(&f.path)?;
            let img = resize_center_crop(&img, resolution as u32);
            Ok(Example { pixels: to_tensor(&img), prompt: prompt_of(&f), concept, ids: Vec::new(), cached: None })
        })
        .collect()
}

/// An instance image's prompt: the concept's instance prompt with its
/// `[filewords]` and tokens filled in.
pub fn instance_prompt(concept: &Concept, image: &ImageFile) -> String {
    prompts::build(&concept.instance_prompt, &prompts::file_words(image), concept, Role::Instance)
}

/// A class image's prompt. With `[filewords]` in the class prompt, a class
/// image's caption file is its whole prompt (the trainer writes the prompt it
/// generated the image with there, as the AUTOMATIC1111 extension does).
pub fn class_prompt(concept: &Concept, image: &ImageFile) -> String {
    match &image.caption {
        Some(caption) if prompts::uses_filewords(&concept.class_prompt) && !caption.is_empty() => caption.clone(),
        _ => prompts::build(&concept.class_prompt, &prompts::file_words(image), concept, Role::Class),
    }
}

/// Every concept's instance images; an empty folder is a usage error.
pub fn load_instances(config: &RunConfig) -> anyhow::Result<Vec<Example>> {
    let mut all = Vec::new();
    for (i, c) in config.concepts.iter().enumerate() {
        let what = format!("concepts[{i}].instance_data_dir");
        let examples = load_folder(&c.instance_data_dir, &what, |f| instance_prompt(c, f), i, config.resolution, None)?;
        if examples.is_empty() {
            return Err(usage(format!(
                "{what} {} holds no images (png, jpg, jpeg, webp, bmp)",
                c.instance_data_dir.display()
            )));
        }
        all.extend(examples);
    }
    Ok(all)
}

/// A note for the log when a folder has caption files its prompt does not use
/// (no `[filewords]`): the captions are read only where the prompt asks.
pub fn unused_captions_note(dir: &Path, what: &str, prompt: &str) -> Option<String> {
    if prompts::uses_filewords(prompt) {
        return None;
    }
    let captioned = list_images(dir, what).ok()?.iter().filter(|f| f.caption.is_some()).count();
    (captioned > 0).then(|| {
        format!(
            "{what}: {captioned} images have a caption (.txt) that is not used; put [filewords] in the prompt to train on them"
        )
    })
}

impl Dataset {
    /// Fills every example's token ids for a text encoder of `positions`
    /// positions reading `max_token_length` tokens; returns the distinct prompts
    /// longer than that, which are cut there.
    pub fn tokenize(&mut self, tokenizer: &crate::tokenizer::ClipTokenizer, positions: usize, max_token_length: usize) -> Vec<String> {
        let mut cut = Vec::new();
        let readable = max_token_length.max(positions.saturating_sub(2)) + 2;
        for e in self.instances.iter_mut().chain(self.classes.iter_mut().flatten()) {
            e.ids = tokenizer.encode_chunked(&e.prompt, max_token_length, positions);
            if tokenizer.encode(&e.prompt).len() > readable && !cut.contains(&e.prompt) {
                cut.push(e.prompt.clone());
            }
        }
        cut
    }

    pub fn has_prior(&self) -> bool {
        self.classes.iter().any(|c| !c.is_empty())
    }

    /// Encodes every image (and its mirror image) once with `encode`, which returns
    /// the latent distribution's (mean, std) for a `[1, 3, H, W]` batch.
    pub fn cache_latents(&mut self, encode: &dyn Fn(&Tensor) -> (Tensor, Tensor)) {
        for e in self.instances.iter_mut().chain(self.classes.iter_mut().flatten()) {
            let x = e.pixels.unsqueeze(0);
            let plain = encode(&x);
            let flipped = encode(&x.flip([3]));
            e.cached = Some([plain, flipped]);
        }
    }
}

/// Where the data order stands: saved with checkpoints.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataState {
    /// Completed passes over the instance images.
    pub epoch: u64,
    /// Next index into `order`.
    pub position: usize,
    /// This epoch's shuffled instance indices (empty before the epoch's first batch).
    pub order: Vec<i64>,
    /// Next class image of each concept.
    pub class_cursor: Vec<usize>,
}

impl DataState {
    pub fn new(concepts: usize) -> Self {
        DataState { epoch: 0, position: 0, order: Vec::new(), class_cursor: vec![0; concepts] }
    }
}

/// One micro-batch: which examples, flipped or not.
pub struct BatchPlan {
    /// (is_class, concept, index within instances or classes[concept], flipped)
    pub items: Vec<(bool, usize, usize, bool)>,
    /// With `shuffle_tags`, each item's prompt with its tags reordered (None:
    /// the example's own prompt, already tokenized).
    pub shuffled: Vec<Option<String>>,
}

/// Takes the next micro-batch of up to `batch_size` instance examples (the last
/// one of an epoch may be smaller), each followed by a class example of its
/// concept when that concept has class images.
pub fn next_batch(
    data: &Dataset,
    state: &mut DataState,
    rng: &mut CpuRng,
    batch_size: usize,
    random_flip: bool,
    shuffle_tags: bool,
) -> BatchPlan {
    let n = data.instances.len();
    if state.order.is_empty() {
        let perm = rng.randperm(n as i64);
        state.order = Vec::<i64>::try_from(&perm).expect("randperm gives int64");
        state.position = 0;
    }
    let end = (state.position + batch_size).min(n);
    let picked: Vec<usize> = state.order[state.position..end].iter().map(|&i| i as usize).collect();
    state.position = end;
    if state.position >= n {
        state.epoch += 1;
        state.position = 0;
        state.order.clear();
    }
    let flip = |rng: &mut CpuRng| random_flip && rng.rand(&[1]).double_value(&[0]) < 0.5;
    let mut items = Vec::new();
    let mut class_items = Vec::new();
    for i in picked {
        let concept = data.instances[i].concept;
        items.push((false, concept, i, flip(rng)));
        let classes = &data.classes[concept];
        if !classes.is_empty() {
            let j = state.class_cursor[concept] % classes.len();
            state.class_cursor[concept] = (j + 1) % classes.len();
            class_items.push((true, concept, j, flip(rng)));
        }
    }
    // Instance examples first, then class examples, as diffusers' collate_fn.
    items.extend(class_items);
    // Without shuffling nothing is copied: every step would clone each prompt.
    let shuffled = items
        .iter()
        .map(|&(c, k, i, _)| {
            let prompt = &data.example(c, k, i).prompt;
            let out = shuffle_tags.then(|| prompts::shuffle_tags(prompt, rng))?;
            (out != *prompt).then_some(out)
        })
        .collect();
    BatchPlan { items, shuffled }
}

impl Dataset {
    pub fn example(&self, is_class: bool, concept: usize, index: usize) -> &Example {
        if is_class { &self.classes[concept][index] } else { &self.instances[index] }
    }

    /// Pixels `[B, 3, H, W]` of a plan (flips applied), on `device`.
    pub fn pixels(&self, plan: &BatchPlan, device: Device) -> Tensor {
        let images: Vec<Tensor> = plan
            .items
            .iter()
            .map(|&(c, k, i, flip)| {
                let p = &self.example(c, k, i).pixels;
                if flip { p.flip([2]) } else { p.shallow_clone() }
            })
            .collect();
        crate::device::upload(&Tensor::stack(&images, 0), device).to_kind(Kind::Float)
    }
}
