//! Aspect-ratio buckets (`training.aspect_ratio_bucketing`), as the AUTOMATIC1111
//! extension makes them: frames of about `resolution`² pixels at the ratios
//! 1:1, 5:4, 4:3, 3:2, 16:9 and 2:1 (either way round), each side a multiple of
//! what the model needs. An image trains in the frame nearest its own ratio,
//! scaled to cover it and centre-cut, so a landscape photo keeps its sides
//! instead of losing them to a square crop. A micro-batch holds one frame size.
//! Off, there is one bucket: the `resolution`² square.

use std::path::Path;

use crate::config::schema::RunConfig;

/// The extension's ratios (image_utils.py `make_bucket_resolutions`).
const ASPECT_RATIOS: [(f64, f64); 6] = [(16.0, 9.0), (5.0, 4.0), (4.0, 3.0), (3.0, 2.0), (2.0, 1.0), (1.0, 1.0)];

/// The frame sizes a run trains at, as (width, height) in pixels, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    pub sizes: Vec<(u32, u32)>,
}

impl Buckets {
    /// The one square frame of a run without bucketing.
    pub fn square(resolution: u32) -> Buckets {
        Buckets { sizes: vec![(resolution, resolution)] }
    }

    /// Frames of at most `resolution`² pixels at the extension's ratios, sides
    /// rounded down to `multiple` (frames that would lose a side are dropped).
    pub fn for_resolution(resolution: u32, multiple: u32) -> Buckets {
        let multiple = multiple.max(1);
        let round = |x: f64| (x / multiple as f64).floor() as u32 * multiple;
        let mut sizes = Vec::new();
        for (a, b) in ASPECT_RATIOS {
            let w = round(resolution as f64 * (a / b).sqrt());
            let h = round(resolution as f64 * (b / a).sqrt());
            if w > 0 && h > 0 {
                sizes.push((w, h));
                sizes.push((h, w));
            }
        }
        sizes.sort();
        sizes.dedup();
        if sizes.is_empty() {
            // A resolution below the multiple (refused later, with the model's reason).
            return Buckets::square(resolution);
        }
        Buckets { sizes }
    }

    /// The run's frames: `resolution`² alone, or the buckets when bucketing is on.
    pub fn for_run(config: &RunConfig, multiple: i64) -> Buckets {
        let resolution = config.resolution as u32;
        if config.training.aspect_ratio_bucketing {
            Buckets::for_resolution(resolution, multiple as u32)
        } else {
            Buckets::square(resolution)
        }
    }

    /// The frame whose ratio is nearest `width`:`height` (the first of equals).
    pub fn frame_for(&self, width: u32, height: u32) -> (u32, u32) {
        let ratio = width as f64 / height.max(1) as f64;
        let distance = |&(w, h): &(u32, u32)| (ratio - w as f64 / h as f64).abs();
        let mut best = self.sizes[0];
        for size in &self.sizes[1..] {
            if distance(size) < distance(&best) {
                best = *size;
            }
        }
        best
    }

    pub fn is_single(&self) -> bool {
        self.sizes.len() == 1
    }
}

/// Micro-batches in one pass over images whose frames are `frames`: each frame's
/// images are batched on their own, so every frame's last batch may be short.
pub fn batches_per_epoch(frames: impl IntoIterator<Item = (u32, u32)>, batch_size: u32) -> u64 {
    let mut counts: std::collections::BTreeMap<(u32, u32), u64> = Default::default();
    for f in frames {
        *counts.entry(f).or_default() += 1;
    }
    counts.values().map(|n| n.div_ceil(u64::from(batch_size.max(1)))).sum()
}

/// The side multiple a source model needs, read without loading weights: a
/// diffusers folder's configs, or a single file's as its tensor shapes give them
/// (the run's total steps, counted before the model loads, depend on it under
/// bucketing); 64 (SD 1.x/2.x) when they cannot be read (loading will say why).
pub fn source_size_multiple(source: &Path) -> i64 {
    if source.is_dir() {
        let configs = crate::checkpoint::diffusers::read_configs(source).ok();
        return match configs.and_then(|c| Some((c.unet?, c.vae?))) {
            Some((unet, vae)) => unet.size_multiple(&vae),
            None => 64,
        };
    }
    match crate::vram::model::single_file_configs(source) {
        Ok((unet, vae, _)) => unet.size_multiple(&vae),
        Err(_) => 64,
    }
}

/// Micro-batches per epoch of a config's instance images as the trainer will
/// batch them, read from the folders before training (None: a folder or an
/// image cannot be read; the trainer will say why).
pub fn planned_batches_per_epoch(config: &RunConfig) -> Option<u64> {
    let t = &config.training;
    let mut frames = Vec::new();
    let buckets = Buckets::for_run(config, source_size_multiple(&config.source_checkpoint));
    for (i, concept) in config.concepts.iter().enumerate() {
        let what = format!("concepts[{i}].instance_data_dir");
        for file in super::images::list_images(&concept.instance_data_dir, &what).ok()? {
            if buckets.is_single() {
                frames.push(buckets.sizes[0]);
            } else {
                let (w, h) = super::images::oriented_dimensions(&file.path).ok()?;
                frames.push(buckets.frame_for(w, h));
            }
        }
    }
    Some(batches_per_epoch(frames, t.batch_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_buckets_at_512_are_the_extensions_ratios_in_64_pixel_steps() {
        let b = Buckets::for_resolution(512, 64);
        assert_eq!(
            b.sizes,
            [(320, 704), (384, 576), (384, 640), (448, 512), (512, 448), (512, 512), (576, 384), (640, 384), (704, 320)]
        );
        assert!(b.sizes.iter().all(|&(w, h)| w * h <= 512 * 512 && w % 64 == 0 && h % 64 == 0));
        assert_eq!(b.frame_for(1920, 1080), (640, 384));
        assert_eq!(b.frame_for(1080, 1920), (384, 640));
        assert_eq!(b.frame_for(1000, 1000), (512, 512));
        assert_eq!(b.frame_for(3000, 1000), (704, 320));
        assert_eq!(b.frame_for(1200, 1000), (512, 448));
    }

    #[test]
    fn small_resolutions_drop_frames_that_lose_a_side() {
        let b = Buckets::for_resolution(32, 16);
        assert!(b.sizes.iter().all(|&(w, h)| w > 0 && h > 0));
        assert!(b.sizes.contains(&(32, 32)) && b.sizes.contains(&(32, 16)) && b.sizes.contains(&(16, 32)));
        assert!(Buckets::square(64).is_single());
    }

    #[test]
    fn each_frames_images_are_batched_apart() {
        let frames = [(64, 64), (64, 32), (64, 64), (64, 64), (32, 64)];
        assert_eq!(batches_per_epoch(frames, 2), 2 + 1 + 1);
        assert_eq!(batches_per_epoch([(8, 8); 5], 2), 3);
    }
}
