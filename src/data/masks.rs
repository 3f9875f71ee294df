//! Masked loss (`training.masked_loss`): each instance image may have a mask in
//! its concept's `mask_dir`, a picture with the image's file stem (`dog-1.png`
//! for `dog-1.jpg`) whose grey level weights the loss where it lies: white
//! learns, black is ignored, grey is a weight in between (kohya's
//! `--masked_loss` with a `conditioning_data_dir`, OneTrainer's masked
//! training). A mask is decoded with the image's limits and EXIF rotation,
//! framed exactly as its image (same cover-scale and centre cut, flipped with
//! it) and kept at pixel size; each batch reduces it to the latent grid by area
//! averaging (torch's `F.interpolate(mode="area")`, as kohya does) and raises
//! it to at least `training.unmasked_weight` (OneTrainer's clamp). The loss is
//! not divided by the mask's area (kohya's and OneTrainer's default): a small
//! subject gives a small loss, and an all-white mask is exactly no mask.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::GrayImage;
use tch::{Kind, Tensor};

use super::images::{is_image, list_images, load_gray, resize_cover_crop};
use crate::config::schema::RunConfig;
use crate::error::usage;

/// The masks of a folder by file stem.
#[derive(Debug, Clone, Default)]
pub struct MaskFolder {
    by_stem: BTreeMap<String, PathBuf>,
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

impl MaskFolder {
    /// The masks of `dir`; `what` names the key in errors. A folder without a
    /// single mask is refused: it is the wrong folder.
    pub fn read(dir: &Path, what: &str) -> anyhow::Result<MaskFolder> {
        if !dir.exists() {
            return Err(usage(format!("{what} {} does not exist", dir.display())));
        }
        if !dir.is_dir() {
            return Err(usage(format!("{what} {} is not a folder", dir.display())));
        }
        let entries = std::fs::read_dir(dir).map_err(|e| usage(format!("cannot read the folder {what} {}: {e}", dir.display())))?;
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file() && is_image(p)).collect();
        // Sorted: of two masks with one stem (`a.png`, `a.jpg`) the same one is always taken.
        paths.sort();
        let mut by_stem = BTreeMap::new();
        for path in paths {
            by_stem.entry(stem(&path)).or_insert(path);
        }
        if by_stem.is_empty() {
            return Err(usage(format!(
                "{what} {} holds no masks ({}); give each instance image a mask with its file name",
                dir.display(),
                super::images::IMAGE_EXTENSIONS.join(", ")
            )));
        }
        Ok(MaskFolder { by_stem })
    }

    /// The mask of the image at `image`: the one with its file stem.
    pub fn mask_for(&self, image: &Path) -> Option<&Path> {
        self.by_stem.get(&stem(image)).map(PathBuf::as_path)
    }
}

/// The mask folders of a run: one per concept, `None` where the concept has
/// none or `masked_loss` is off. Errors name the key.
pub fn mask_folders(config: &RunConfig) -> anyhow::Result<Vec<Option<MaskFolder>>> {
    config
        .concepts
        .iter()
        .enumerate()
        .map(|(i, c)| match (&c.mask_dir, config.training.masked_loss) {
            (Some(dir), true) => MaskFolder::read(dir, &format!("concepts[{i}].mask_dir")).map(Some),
            _ => Ok(None),
        })
        .collect()
}

/// The mask settings checked before anything is written or loaded: every
/// `mask_dir` of a masked run is a folder of masks, apart from the photos.
pub fn check(config: &RunConfig) -> anyhow::Result<()> {
    if !config.training.masked_loss || config.training.train_imagic_only {
        return Ok(());
    }
    for (i, c) in config.concepts.iter().enumerate() {
        let Some(dir) = &c.mask_dir else { continue };
        let same = dir.canonicalize().ok().is_some_and(|d| Some(d) == c.instance_data_dir.canonicalize().ok());
        if same {
            return Err(usage(format!(
                "concepts[{i}].mask_dir {} is the instance_data_dir: masks go in a folder of their own, named as their images",
                dir.display()
            )));
        }
        MaskFolder::read(dir, &format!("concepts[{i}].mask_dir"))?;
    }
    Ok(())
}

/// Names up to `shown` of `names`, and how many more there are.
fn some_of(names: &[String], shown: usize) -> String {
    let more = if names.len() > shown { format!(" and {} more", names.len() - shown) } else { String::new() };
    format!("{}{more}", names.iter().take(shown).cloned().collect::<Vec<_>>().join(", "))
}

/// Warnings about a run's masks, read from the folders: images without a mask
/// (named: they train unmasked), masks that match no image, trained or held
/// out (a misspelt name), and mask folders that `masked_loss: false` leaves unused.
pub fn warnings(config: &RunConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    for (i, c) in config.concepts.iter().enumerate() {
        let Some(dir) = &c.mask_dir else { continue };
        if !config.training.masked_loss {
            warnings.push(format!(
                "concepts[{i}].mask_dir is set but `training.masked_loss` is off: the masks are not used"
            ));
            continue;
        }
        let what = format!("concepts[{i}].mask_dir");
        let (Ok(masks), Ok(images)) =
            (MaskFolder::read(dir, &what), list_images(&c.instance_data_dir, &format!("concepts[{i}].instance_data_dir")))
        else {
            continue;
        };
        let file_name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let unmasked: Vec<String> =
            images.iter().filter(|f| masks.mask_for(&f.path).is_none()).map(|f| file_name(&f.path)).collect();
        if !unmasked.is_empty() {
            let (n, have) = if unmasked.len() == 1 { ("1 image has".to_string(), "it trains") } else { (format!("{} images have", unmasked.len()), "they train") };
            warnings.push(format!(
                "concepts[{i}]: {n} no mask in {} ({have} unmasked, every pixel counting): {}",
                dir.display(),
                some_of(&unmasked, 10)
            ));
        }
        // Held-out photos take their masks from the same folder (validation).
        let held_out = c.validation_data_dir.as_deref().and_then(|d| list_images(d, "validation_data_dir").ok()).unwrap_or_default();
        let stems: Vec<String> = images.iter().chain(&held_out).map(|f| stem(&f.path)).collect();
        let orphans: Vec<String> =
            masks.by_stem.iter().filter(|(s, _)| !stems.contains(s)).map(|(_, p)| file_name(p)).collect();
        if !orphans.is_empty() {
            warnings.push(format!(
                "concepts[{i}].mask_dir {}: {} no image of {} (a mask takes its image's file name): {}",
                dir.display(),
                if orphans.len() == 1 { "1 mask matches".to_string() } else { format!("{} masks match", orphans.len()) },
                c.instance_data_dir.display(),
                some_of(&orphans, 5)
            ));
        }
    }
    warnings
}

/// The mask at `path` for an image of `image_size` (width, height, EXIF
/// rotation applied) framed in `frame` as [`resize_cover_crop`] frames the
/// image. A mask of another size but the image's shape is scaled to the image
/// first; one of another shape cannot line up and is refused.
pub fn load_mask(path: &Path, image: &Path, image_size: (u32, u32), frame: (u32, u32)) -> anyhow::Result<GrayImage> {
    let mut mask = load_gray(path)?;
    let (mw, mh) = mask.dimensions();
    let (iw, ih) = image_size;
    if (mw, mh) != (iw, ih) {
        let ratio = (f64::from(mw) / f64::from(mh)) / (f64::from(iw) / f64::from(ih));
        if (ratio - 1.0).abs() > 0.01 {
            return Err(usage(format!(
                "the mask {} is {mw} × {mh} pixels but its image {} is {iw} × {ih}: a mask must have its image's shape",
                path.display(),
                image.display()
            )));
        }
        mask = image::imageops::resize(&mask, iw, ih, FilterType::Triangle);
    }
    Ok(resize_cover_crop(&mask, frame.0, frame.1))
}

/// A framed mask as a `[1, H, W]` uint8 tensor (255: white), as examples keep it.
pub fn to_tensor(mask: &GrayImage) -> Tensor {
    let (w, h) = mask.dimensions();
    Tensor::from_slice(mask.as_raw()).view([1, h as i64, w as i64])
}

/// The loss weights `[B, 1, h, w]` (float32, CPU) of a batch on a latent grid
/// of `latent` (height, width): each example's mask (flipped when its image is)
/// as a weight in [0, 1], area-averaged to the grid and raised to at least
/// `unmasked_weight`; 1 everywhere for an example without one. White stays
/// exactly 1 (255/255, a mean of ones), so an all-white mask changes nothing.
pub fn loss_weights<'a>(masks: impl IntoIterator<Item = (Option<&'a Tensor>, bool)>, latent: (i64, i64), unmasked_weight: f64) -> Tensor {
    let rows: Vec<Tensor> = masks
        .into_iter()
        .map(|(mask, flip)| match mask {
            None => Tensor::ones([1, 1, latent.0, latent.1], (Kind::Float, tch::Device::Cpu)),
            Some(m) => {
                let m = if flip { m.flip([2]) } else { m.shallow_clone() };
                let weight = (m.to_kind(Kind::Float) / 255.0).unsqueeze(0);
                let pooled = area_resize(&weight, latent);
                if unmasked_weight > 0.0 { pooled.clamp_min(unmasked_weight) } else { pooled }
            }
        })
        .collect();
    Tensor::cat(&rows, 0)
}

/// `F.interpolate(x, size, mode="area")` of a `[N, C, H, W]` tensor: torch's
/// area mode is adaptive average pooling (each output cell the mean of the
/// input cells it covers).
pub fn area_resize(x: &Tensor, size: (i64, i64)) -> Tensor {
    x.adaptive_avg_pool2d([size.0, size.1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_found_by_stem_and_an_empty_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = MaskFolder::read(dir.path(), "concepts[0].mask_dir").unwrap_err().to_string();
        assert!(err.contains("holds no masks"), "{err}");
        GrayImage::new(4, 4).save(dir.path().join("dog-1.png")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let masks = MaskFolder::read(dir.path(), "concepts[0].mask_dir").unwrap();
        assert_eq!(masks.mask_for(Path::new("/photos/dog-1.jpg")), Some(dir.path().join("dog-1.png").as_path()));
        assert_eq!(masks.mask_for(Path::new("/photos/dog-2.jpg")), None);
        let err = MaskFolder::read(&dir.path().join("nope"), "concepts[0].mask_dir").unwrap_err().to_string();
        assert!(err.contains("concepts[0].mask_dir") && err.contains("does not exist"), "{err}");
    }

    #[test]
    fn white_weighs_exactly_one_and_grey_its_level() {
        let white = Tensor::full([1, 8, 8], 255, (Kind::Uint8, tch::Device::Cpu));
        let w = loss_weights([(Some(&white), false), (None, true)], (2, 2), 0.0);
        assert_eq!(w.size(), [2, 1, 2, 2]);
        assert!(w.equal(&Tensor::ones([2, 1, 2, 2], (Kind::Float, tch::Device::Cpu))));
        let black = Tensor::zeros([1, 8, 8], (Kind::Uint8, tch::Device::Cpu));
        let w = loss_weights([(Some(&black), false)], (2, 2), 0.25);
        assert!(w.equal(&Tensor::full([1, 1, 2, 2], 0.25, (Kind::Float, tch::Device::Cpu))));
    }

    #[test]
    fn a_mask_of_another_shape_is_refused_and_a_smaller_one_scaled() {
        let dir = tempfile::tempdir().unwrap();
        let mask = dir.path().join("m.png");
        GrayImage::from_pixel(10, 20, image::Luma([255])).save(&mask).unwrap();
        let err = load_mask(&mask, Path::new("a.jpg"), (40, 20), (16, 16)).unwrap_err().to_string();
        assert!(err.contains("10 × 20") && err.contains("40 × 20") && err.contains("a.jpg"), "{err}");
        let framed = load_mask(&mask, Path::new("a.jpg"), (20, 40), (16, 32)).unwrap();
        assert_eq!(framed.dimensions(), (16, 32));
        assert!(framed.pixels().all(|p| p.0[0] == 255));
    }
}
