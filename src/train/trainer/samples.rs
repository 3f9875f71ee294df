//! Images the trainer makes with the model: previews during the run
//! (samples/step-NNNNNN-K.png) and the class images prior preservation needs.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::{Device, Tensor};

use std::sync::atomic::Ordering;

use super::{move_parameters, Preparation, RunLog, StoppedBeforeTraining, Trainer};
use crate::run::control::{self, Request};
use crate::config::schema::{Concept, RunConfig};
use crate::data::buckets::Buckets;
use crate::data::dataset;
use crate::data::images::list_images;
use crate::data::prompts::{file_words, uses_filewords, Role};
use crate::conditioning::SizeIds;
use crate::pipeline::{save_png, SampleRequest, StableDiffusion};
use crate::run::events::Event;
use crate::train::checkpoint as ckpt;

impl Trainer {
    /// Renders every concept's sample prompts into samples/step-NNNNNN-K.png (with
    /// the EMA weights when kept); returns the paths.
    pub fn previews(&mut self) -> anyhow::Result<Vec<PathBuf>> {
        self.flush_step_record()?;
        // Rank 0 of several makes the previews; the others have the same weights.
        if !crate::dist::is_writer() {
            self.last_sample_step = Some(self.step);
            return Ok(Vec::new());
        }
        let prompts: Vec<String> = match &self.imagic {
            // One image from the interpolated embedding (the prompt is its target text).
            Some(_) => vec![self.data.instances[0].prompt.clone()],
            None => self.config.concepts.iter().flat_map(sample_prompts).collect(),
        };
        self.last_sample_step = Some(self.step);
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let dir = self.run_dir.join("samples");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let raw = self.ema.as_ref().map(|ema| {
            let _guard = tch::no_grad_guard();
            let backup: Vec<Tensor> = self.params.unet.iter().map(|(_, p)| p.detach().copy()).collect();
            for ((_, p), (_, s)) in self.params.unet.iter().zip(&ema.shadow) {
                p.shallow_clone().copy_(s);
            }
            backup
        });
        let vae_moved = self.config.training.cache_latents && self.device.is_cuda();
        if vae_moved {
            move_parameters(&self.params.vae, self.device);
        }
        let s = &self.config.sampling;
        let mut paths = Vec::new();
        let mut result = Ok(());
        for (k, prompt) in prompts.iter().enumerate() {
            let req = SampleRequest {
                prompt: prompt.clone(),
                negative: s.negative_prompt.clone(),
                seed: s.seed,
                steps: s.steps,
                sampler: s.scheduler.clone(),
                guidance: s.guidance,
                width: self.config.resolution,
                height: self.config.resolution,
                clip_skip: self.config.training.clip_skip,
            };
            let path = dir.join(format!("{}-{k}.png", ckpt::step_dir_name(self.step)));
            let image = match &self.imagic {
                Some((target, optimized)) => {
                    let cond = crate::train::imagic::interpolate(target, optimized, super::imagic_run::PREVIEW_ETA);
                    let cond = crate::conditioning::PromptEmbeds { hidden: cond, pooled: None };
                    self.sd.text_to_image_with_embeddings(&req, &cond, SizeIds::plain(req.height, req.width), |_, _| {})
                }
                None => self.sd.text_to_image(&req, |_, _| {}),
            };
            match image.and_then(|img| save_png(&img, &path)) {
                Ok(()) => paths.push(path),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if vae_moved {
            move_parameters(&self.params.vae, Device::Cpu);
        }
        if let Some(backup) = raw {
            let _guard = tch::no_grad_guard();
            for ((_, p), b) in self.params.unet.iter().zip(&backup) {
                p.shallow_clone().copy_(b);
            }
        }
        result?;
        let rel: Vec<String> =
            paths.iter().map(|p| p.strip_prefix(&self.run_dir).unwrap_or(p).display().to_string()).collect();
        self.events.write(&Event::named("sample", serde_json::json!({ "step": self.step, "paths": rel, "prompts": prompts })))?;
        self.log.line(&format!("previews: {}", rel.join(", ")));
        Ok(paths)
    }
}

/// A concept's preview prompts; one holding `[filewords]` (the wizard's
/// default when the instance prompt does) takes the words of the instance
/// images in turn, made an instance prompt as in training.
/// A concept's preview prompts; without any, its instance prompt as the first image
/// trains on it (the extension's blank "Sample Image Prompt", and what the wizard offers).
pub(super) fn sample_prompts(c: &Concept) -> Vec<String> {
    let images = list_images(&c.instance_data_dir, "instance_data_dir").unwrap_or_default();
    if c.sample_prompts.is_empty() {
        let words = images.first().map(file_words).unwrap_or_default();
        return vec![crate::data::prompts::build(&c.instance_prompt, &words, c, Role::Instance)];
    }
    c.sample_prompts
        .iter()
        .enumerate()
        .map(|(k, p)| {
            if !uses_filewords(p) {
                return p.clone();
            }
            let words = if images.is_empty() { String::new() } else { file_words(&images[k % images.len()]) };
            crate::data::prompts::build(p, &words, c, Role::Instance)
        })
        .collect()
}

/// Class images of every concept with a class prompt: the first
/// `num_class_images` of its class_data_dir (default: `class_images/concept-N` in
/// the run directory), generating the missing ones with the source model. With
/// `[filewords]` in the class prompt, the images are generated from the instance
/// images' words in turn (the class version of each caption) and each one's
/// prompt is written beside it in `<image>.txt`.
/// With aspect-ratio buckets each one is generated in the frame of the instance
/// image it is paired with in turn, as the extension does, so every frame with
/// instance images has class images to pair them with.
/// With several processes each rank makes its share of the missing images (the
/// n-th missing one goes to rank n mod world; an image's seed and name depend on
/// n alone, so the folder is the same whoever made it), between two barriers.
pub(super) fn prepare_class_images(
    config: &RunConfig,
    run_dir: &Path,
    sd: &StableDiffusion,
    instances: &[dataset::Example],
    buckets: &Buckets,
    log: &mut RunLog,
    preparation: &mut Preparation,
) -> anyhow::Result<Vec<Vec<dataset::Example>>> {
    let mut all = Vec::new();
    for (i, c) in config.concepts.iter().enumerate() {
        // Imagic has no prior term (the trainer warns that the class prompt is unused).
        if c.class_prompt.trim().is_empty() || config.training.train_imagic_only {
            all.push(Vec::new());
            continue;
        }
        let dir = c.class_data_dir.clone().unwrap_or_else(|| run_dir.join("class_images").join(format!("concept-{i}")));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the class_data_dir {}", dir.display()))?;
        let what = format!("concepts[{i}].class_data_dir");
        let have = list_images(&dir, &what)?.len();
        let want = c.num_class_images as usize;
        let group = crate::dist::current();
        let (rank, world) = (crate::dist::rank(), crate::dist::world_size());
        // Every rank has counted and named the missing images before any is written.
        let names = free_names(&dir, have, want.saturating_sub(have));
        if let Some(g) = group.filter(|_| have < want) {
            g.barrier("counting class images", super::CLASS_IMAGES_WAIT)?;
        }
        if have < want {
            let prompts = generation_prompts(c, i)?;
            let frames: Vec<(u32, u32)> = instances.iter().filter(|e| e.concept == i).map(dataset::Example::frame).collect();
            if let Some(release) = preparation.before_class_images.take() {
                release(run_dir)?;
            }
            let share = if world > 1 { format!(", each of {world} processes making its share") } else { String::new() };
            log.line(&format!("generating {} class images for {:?} into {}{share}", want - have, c.class_prompt, dir.display()));
            let progress = |done: usize, path: Option<&Path>| {
                Event::named(
                    "class_images",
                    serde_json::json!({ "concept": i, "done": done, "total": want, "prompt": c.class_prompt,
                                        // Absolute: the dashboard may run from another folder.
                                        "path": path.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()) }),
                )
            };
            preparation.events.write(&progress(have, None))?;
            let bar = crate::pipeline::progress_bar((want - have) as u64);
            let s = &config.sampling;
            for n in (have..want).filter(|n| (n - have) % world == rank) {
                // Between images: each one is written whole, so a stop loses none of them.
                let requested = crate::dist::is_writer() && control::take_one(run_dir, Request::Stop);
                if preparation.stop_flag.load(Ordering::Relaxed) || requested {
                    bar.abandon();
                    return Err(StoppedBeforeTraining.into());
                }
                let prompt = prompts[n % prompts.len()].clone();
                let (width, height) = if frames.is_empty() { buckets.frame_for(1, 1) } else { frames[n % frames.len()] };
                let req = SampleRequest {
                    prompt: prompt.clone(),
                    negative: if c.class_negative_prompt.is_empty() { s.negative_prompt.clone() } else { c.class_negative_prompt.clone() },
                    seed: config.seed.wrapping_add(n as u64),
                    steps: c.class_infer_steps.unwrap_or(s.steps),
                    sampler: s.scheduler.clone(),
                    guidance: c.class_guidance_scale.unwrap_or(s.guidance),
                    width: i64::from(width),
                    height: i64::from(height),
                    clip_skip: config.training.clip_skip,
                };
                let image = sd.text_to_image(&req, |_, _| {})?;
                let path = names[n - have].clone();
                if uses_filewords(&c.class_prompt) {
                    // The caption first: an image without it would be read with the template's words.
                    let caption = path.with_extension("txt");
                    std::fs::write(&caption, &prompt).with_context(|| format!("cannot write {}", caption.display()))?;
                }
                save_png(&image, &path)?;
                bar.inc(1);
                // Counted in the folder: the other ranks' images are there too.
                let done = if world > 1 { list_images(&dir, &what)?.len().min(want) } else { n + 1 };
                preparation.events.write(&progress(done, Some(&path)))?;
                log.line(&format!("class image {done}/{want}: {} ({prompt:?})", path.display()));
            }
            bar.finish_and_clear();
            if let Some(g) = group {
                g.barrier("the other ranks' class images", super::CLASS_IMAGES_WAIT)?;
                preparation.events.write(&progress(want, None))?;
            }
        }
        if let Some(note) = dataset::unused_captions_note(&dir, &what, &c.class_prompt) {
            log.line(&note);
        }
        let examples = dataset::load_folder(&dir, &what, |f| dataset::class_prompt(c, f), i, buckets, Some(want))?;
        all.push(examples);
    }
    Ok(all)
}

/// The prompts class images are generated with: the class prompt, or with
/// `[filewords]` one per instance image (its words made a class caption).
fn generation_prompts(c: &Concept, index: usize) -> anyhow::Result<Vec<String>> {
    let template = |words: &str| crate::data::prompts::build(&c.class_prompt, words, c, Role::Class);
    if !uses_filewords(&c.class_prompt) {
        return Ok(vec![template("")]);
    }
    let images = list_images(&c.instance_data_dir, &format!("concepts[{index}].instance_data_dir"))?;
    let prompts: Vec<String> = images.iter().map(|f| template(&file_words(f))).collect();
    Ok(if prompts.is_empty() { vec![template("")] } else { prompts })
}

/// The names of the `count` images to make: the first free `class-NNNNN.png`
/// from `have` on, chosen before any is written so every rank agrees.
fn free_names(dir: &Path, have: usize, count: usize) -> Vec<PathBuf> {
    (have..).map(|k| dir.join(format!("class-{k:05}.png"))).filter(|p| !p.exists()).take(count).collect()
}
