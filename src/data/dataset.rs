//! The training set: every concept's instance images (with their prompt or
//! per-image caption) and class images for prior preservation, already resized
//! and cropped; optionally their VAE latent distributions, cached once. The data
//! order (a shuffled permutation per epoch, the flip draws, each concept's
//! class-image cursor) comes from a private generator and is part of the
//! checkpoint, so a resumed run sees the same batches.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::buckets::Buckets;
use super::images::{list_images, load_rgb, resize_cover_crop, to_tensor, CoverCrop, ImageFile};
use super::holdout;
use super::masks::{self, MaskFolder};
use super::prompts::{self, Role};
use crate::conditioning::{SizeIds, TextConditioner};
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
    /// SDXL's size and crop ids: the image's own size, where its frame was cut
    /// from the scaled image, the frame's size (unflipped; see [`Example::size_ids`]).
    pub sizes: SizeIds,
    /// The width the image was scaled to before its frame was cut (to mirror the crop).
    pub scaled_width: i64,
    /// `cache_latents`: (mean, std) of the VAE's latent distribution, as is and flipped.
    pub cached: Option<[(Tensor, Tensor); 2]>,
    /// `masked_loss`: its mask framed as `pixels`, `[1, H, W]` uint8 (see data/masks.rs).
    pub mask: Option<Tensor>,
}

/// Instance images of every concept and, per concept, its class images.
pub struct Dataset {
    pub instances: Vec<Example>,
    /// `classes[c]`: concept c's class images (empty: no prior preservation).
    pub classes: Vec<Vec<Example>>,
    /// Each concept's prior_loss_weight.
    pub prior_weights: Vec<f64>,
}

impl Example {
    /// The frame it trains in, (width, height) in pixels.
    pub fn frame(&self) -> (u32, u32) {
        let size = self.pixels.size();
        (size[2] as u32, size[1] as u32)
    }

    /// Its size ids as trained: a flipped image's crop is counted from the
    /// other side, as kohya's SDXL trainer counts it.
    pub fn size_ids(&self, flipped: bool) -> SizeIds {
        let mut ids = self.sizes;
        if flipped {
            ids.crop_top_left.1 = self.scaled_width - self.sizes.crop_top_left.1 - self.sizes.target.1;
        }
        ids
    }
}

/// Loads the images of a folder as examples, each with the prompt `prompt_of`
/// gives it, framed in its bucket; every image is decoded now, so a bad file
/// stops the run before anything is written.
pub fn load_folder(
    dir: &Path,
    what: &str,
    prompt_of: impl Fn(&ImageFile) -> String,
    concept: usize,
    buckets: &Buckets,
    limit: Option<usize>,
) -> anyhow::Result<Vec<Example>> {
    load_folder_with_masks(dir, what, prompt_of, concept, buckets, limit, None)
}

/// [`load_folder`], each image with its mask from `masks` when it has one,
/// framed as the image is.
pub fn load_folder_with_masks(
    dir: &Path,
    what: &str,
    prompt_of: impl Fn(&ImageFile) -> String,
    concept: usize,
    buckets: &Buckets,
    limit: Option<usize>,
    masks: Option<&MaskFolder>,
) -> anyhow::Result<Vec<Example>> {
    let mut files = list_images(dir, what)?;
    if let Some(n) = limit {
        files.truncate(n);
    }
    load_files_with_masks(files, prompt_of, concept, buckets, masks)
}

/// Images `files` (of one folder) decoded, framed and with their masks.
pub fn load_files_with_masks(
    files: Vec<ImageFile>,
    prompt_of: impl Fn(&ImageFile) -> String,
    concept: usize,
    buckets: &Buckets,
    masks: Option<&MaskFolder>,
) -> anyhow::Result<Vec<Example>> {
    files
        .into_iter()
        .map(|f| {
            let img = load_rgb(&f.path)?;
            let (width, height) = buckets.frame_for(img.width(), img.height());
            let cover = CoverCrop::of(img.width(), img.height(), width, height);
            let sizes = SizeIds {
                original: (i64::from(img.height()), i64::from(img.width())),
                crop_top_left: (i64::from(cover.top), i64::from(cover.left)),
                target: (i64::from(height), i64::from(width)),
            };
            let scaled_width = i64::from(cover.resized.0);
            let mask = match masks.and_then(|m| m.mask_for(&f.path)) {
                Some(path) => Some(masks::to_tensor(&masks::load_mask(path, &f.path, img.dimensions(), (width, height))?)),
                None => None,
            };
            let img = resize_cover_crop(&img, width, height);
            Ok(Example { pixels: to_tensor(&img), prompt: prompt_of(&f), concept, ids: Vec::new(), sizes, scaled_width, cached: None, mask })
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
pub fn load_instances(config: &RunConfig, buckets: &Buckets) -> anyhow::Result<Vec<Example>> {
    let mut all = Vec::new();
    let mask_folders = masks::mask_folders(config)?;
    for ((i, c), masks) in config.concepts.iter().enumerate().zip(&mask_folders) {
        let what = format!("concepts[{i}].instance_data_dir");
        // A concept's `validation_split` photos are held out (data/holdout.rs).
        let (files, _) = holdout::split_photos(c, i, config.seed, &what)?;
        let examples = load_files_with_masks(files, |f| instance_prompt(c, f), i, buckets, masks.as_ref())?;
        if examples.is_empty() {
            return Err(usage(format!(
                "{what} {} holds no images ({})",
                c.instance_data_dir.display(),
                crate::data::images::IMAGE_EXTENSIONS.join(", ")
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
    pub fn tokenize(&mut self, text: &TextConditioner) -> Vec<String> {
        let mut cut = Vec::new();
        for e in self.instances.iter_mut().chain(self.classes.iter_mut().flatten()) {
            e.ids = text.tokenize(&e.prompt);
            if text.is_cut(&e.prompt) && !cut.contains(&e.prompt) {
                cut.push(e.prompt.clone());
            }
        }
        cut
    }

    pub fn has_prior(&self) -> bool {
        self.classes.iter().any(|c| !c.is_empty())
    }

    /// Encodes every image (and its mirror image) once with `encode`, which returns
    /// the latent distribution's (mean, std) for a `[1, 3, H, W]` batch. A VAE
    /// that overflows gives NaN latents, which would train a run to NaN: that is
    /// an error naming the first image it happened to.
    pub fn cache_latents(&mut self, encode: &dyn Fn(&Tensor) -> (Tensor, Tensor)) -> anyhow::Result<()> {
        for e in self.instances.iter_mut().chain(self.classes.iter_mut().flatten()) {
            let x = e.pixels.unsqueeze(0);
            let plain = encode(&x);
            let flipped = encode(&x.flip([3]));
            let finite = [&plain.0, &plain.1, &flipped.0, &flipped.1].iter().all(|t| t.isfinite().all().int64_value(&[]) != 0);
            if !finite {
                anyhow::bail!(
                    "the VAE encoded an image prompted {:?} to NaN or infinite latents: the VAE overflowed (an SDXL VAE in fp16 does; use an fp16-safe `vae` or keep it in float32)",
                    e.prompt
                );
            }
            e.cached = Some([plain, flipped]);
        }
        Ok(())
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

/// Takes the next micro-batch of up to `batch_size` instance examples of one
/// frame (an epoch's last batch of each frame may be smaller), each followed by
/// a class example of its concept and frame when the concept has one.
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
        let perm = Vec::<i64>::try_from(&perm).expect("randperm gives int64");
        state.order = batched_by_frame(&perm, |i| data.instances[i as usize].frame(), batch_size);
        state.position = 0;
    }
    // The order holds each batch's members side by side (`batched_by_frame`):
    // a batch is the run of one frame from here, at most `batch_size` long.
    let frame = data.instances[state.order[state.position] as usize].frame();
    let mut end = state.position;
    while end < n && end - state.position < batch_size.max(1) && data.instances[state.order[end] as usize].frame() == frame {
        end += 1;
    }
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
        if classes.is_empty() {
            continue;
        }
        // The concept's next class image of this frame (with one frame: the next one).
        let start = state.class_cursor[concept] % classes.len();
        let same_frame = (0..classes.len()).map(|d| (start + d) % classes.len()).find(|&j| classes[j].frame() == frame);
        if let Some(j) = same_frame {
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

/// An epoch's permutation reordered so that each batch's members stand side by
/// side: walking the permutation, an image joins its frame's open batch, and a
/// batch is closed when full; the short batches left follow, in the order their
/// frames first came. With one frame this is the permutation itself.
pub fn batched_by_frame(perm: &[i64], frame_of: impl Fn(i64) -> (u32, u32), batch_size: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(perm.len());
    let mut open: Vec<((u32, u32), Vec<i64>)> = Vec::new();
    for &i in perm {
        let frame = frame_of(i);
        let k = match open.iter().position(|(f, _)| *f == frame) {
            Some(k) => k,
            None => {
                open.push((frame, Vec::new()));
                open.len() - 1
            }
        };
        open[k].1.push(i);
        if open[k].1.len() >= batch_size.max(1) {
            out.append(&mut open[k].1);
        }
    }
    for (_, rest) in open {
        out.extend(rest);
    }
    out
}

impl Dataset {
    /// Micro-batches in one pass over the instance images.
    pub fn batches_per_epoch(&self, batch_size: u32) -> u64 {
        super::buckets::batches_per_epoch(self.instances.iter().map(Example::frame), batch_size)
    }

    /// Instance images of concepts with class images, none of them in their
    /// frame: those train without the prior term.
    pub fn instances_without_class_frame(&self) -> usize {
        self.instances
            .iter()
            .filter(|e| {
                let classes = &self.classes[e.concept];
                !classes.is_empty() && !classes.iter().any(|c| c.frame() == e.frame())
            })
            .count()
    }

    /// (frame, instance images, class images) per frame in use, by frame.
    pub fn frame_counts(&self) -> Vec<((u32, u32), usize, usize)> {
        let mut counts: std::collections::BTreeMap<(u32, u32), (usize, usize)> = Default::default();
        for e in &self.instances {
            counts.entry(e.frame()).or_default().0 += 1;
        }
        for e in self.classes.iter().flatten() {
            counts.entry(e.frame()).or_default().1 += 1;
        }
        counts.into_iter().map(|(f, (i, c))| (f, i, c)).collect()
    }

    pub fn example(&self, is_class: bool, concept: usize, index: usize) -> &Example {
        if is_class { &self.classes[concept][index] } else { &self.instances[index] }
    }

    /// The loss weights `[B, 1, h, w]` of a plan on a latent grid of `latent`
    /// (height, width), on the CPU: each example's mask, flipped with it (1 for
    /// class images and images without a mask; see data/masks.rs).
    pub fn loss_weights(&self, plan: &BatchPlan, latent: (i64, i64), unmasked_weight: f64) -> Tensor {
        let masks = plan.items.iter().map(|&(c, k, i, flip)| (self.example(c, k, i).mask.as_ref(), flip));
        masks::loss_weights(masks, latent, unmasked_weight)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_frame_keeps_the_permutation_and_more_keep_each_batch_in_one_frame() {
        let perm = [3, 0, 4, 1, 2];
        assert_eq!(batched_by_frame(&perm, |_| (8, 8), 2), perm);
        // Frames: 0, 1, 2 wide; 3, 4 tall.
        let frame = |i: i64| if i < 3 { (16, 8) } else { (8, 16) };
        let order = batched_by_frame(&perm, frame, 2);
        // 3 and 4 fill a tall batch first, then 0 and 1 a wide one; 2 is left over.
        assert_eq!(order, [3, 4, 0, 1, 2]);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2, 3, 4]);
    }
}
