//! Instance and class images: found in a folder, decoded (png, jpg, webp, bmp,
//! tiff, gif: its first frame), EXIF
//! rotation applied, grayscale/alpha made RGB, resized so the short side is the
//! training resolution (bilinear) and centre-cropped, as diffusers' DreamBooth
//! example does. Optional per-image captions in `<image>.txt`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageBuffer, ImageDecoder, ImageReader, Pixel, RgbImage};
use tch::{Kind, Tensor};

use crate::error::usage;

pub const IMAGE_EXTENSIONS: [&str; 8] = ["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif"];

/// One training image with its optional caption (text of `<stem>.txt`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFile {
    pub path: PathBuf,
    pub caption: Option<String>,
}

pub(crate) fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// The images of `dir`, sorted by file name (a stable data order for exact resume).
/// `what` names the folder's role in errors ("concepts[0].instance_data_dir").
pub fn list_images(dir: &Path, what: &str) -> anyhow::Result<Vec<ImageFile>> {
    if !dir.exists() {
        return Err(usage(format!("{what} {} does not exist", dir.display())));
    }
    if !dir.is_dir() {
        return Err(usage(format!("{what} {} is not a folder", dir.display())));
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let caption_path = path.with_extension("txt");
        let caption = if caption_path.is_file() {
            Some(read_caption(&caption_path)?)
        } else {
            None
        };
        files.push(ImageFile { path, caption });
    }
    Ok(files)
}

/// What of `dir` [`list_images`] does not read: (files, subfolders), sorted, not
/// counting captions and hidden files (`.DS_Store`); nothing for a folder that
/// cannot be read.
pub fn skipped_files(dir: &Path) -> (Vec<String>, Vec<String>) {
    let mut files = Vec::new();
    let mut folders = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return (files, folders) };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            folders.push(format!("{name}/"));
        } else if !is_image(&path) && path.extension().is_none_or(|e| !e.eq_ignore_ascii_case("txt")) {
            files.push(name);
        }
    }
    files.sort();
    folders.sort();
    (files, folders)
}

/// A note for the log about what in `dir` is not read: files that are neither
/// images of a known format nor captions (an iPhone's `.heic`, a `.psd`), and
/// subfolders (not searched).
pub fn skipped_files_note(dir: &Path, what: &str) -> Option<String> {
    let (files, folders) = skipped_files(dir);
    if files.is_empty() && folders.is_empty() {
        return None;
    }
    let list = |names: &[String]| {
        let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
        let more = if names.len() > 3 { format!(" and {} more", names.len() - 3) } else { String::new() };
        format!("{}{more}", shown.join(", "))
    };
    let mut parts = Vec::new();
    if !files.is_empty() {
        let (formats, last) = IMAGE_EXTENSIONS.split_at(IMAGE_EXTENSIONS.len() - 1);
        let (are, them) = if files.len() == 1 { ("file is", "it") } else { ("files are", "them") };
        parts.push(format!(
            "{} {are} skipped (not {} or {}; convert {them} to train on {them}): {}",
            files.len(),
            formats.join(", "),
            last[0],
            list(&files)
        ));
    }
    if !folders.is_empty() {
        parts.push(format!("subfolders are not searched: {}", list(&folders)));
    }
    Some(format!("{what} {}: {}", dir.display(), parts.join("; ")))
}

/// A caption's text, trimmed. Windows editors start UTF-8 files with a byte-order
/// mark, which would otherwise become a token of every prompt made from it.
fn read_caption(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read the caption {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| {
        usage(format!("the caption {} is not UTF-8 text; save it as UTF-8", path.display()))
    })?;
    Ok(text.trim_start_matches('\u{feff}').trim().to_string())
}

fn not_image(path: &Path, e: &dyn std::fmt::Display) -> anyhow::Error {
    usage(format!("{} is not a readable image ({e})", path.display()))
}

/// The largest image side decoded: past any camera's (a 200-megapixel sensor is
/// about 16 000 × 12 000), so only a decompression bomb or a broken header reaches it.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// The most memory one image's decoder may take (a 16384² 16-bit RGBA image is 2 GiB).
pub const MAX_DECODE_BYTES: u64 = 4 << 30;

/// The decoder for `path`'s format (told by its bytes), its header read, with
/// its size checked against the limits before any pixel is decoded: a PNG of a
/// few MB can declare 50 000 × 50 000 pixels (7.5 GB as RGB).
fn open_decoder(path: &Path) -> anyhow::Result<Box<dyn ImageDecoder>> {
    let mut reader = ImageReader::open(path)
        .with_context(|| format!("cannot read the image {}", path.display()))?
        .with_guessed_format()
        .map_err(|e| not_image(path, &e))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| decode_error(path, &e))?;
    let (w, h) = decoder.dimensions();
    if w.max(h) > MAX_IMAGE_SIDE || decoder.total_bytes() > MAX_DECODE_BYTES {
        return Err(usage(format!(
            "the image {} is {w} × {h} pixels, past the {MAX_IMAGE_SIDE} × {MAX_IMAGE_SIDE} (and {} GiB decoded) this program \
             reads; scale it down (or remove it: it may be a decompression bomb)",
            path.display(),
            MAX_DECODE_BYTES >> 30
        )));
    }
    Ok(Box::new(decoder))
}

/// A decoding failure in words: a decoder's own memory limit is named as such.
fn decode_error(path: &Path, e: &image::ImageError) -> anyhow::Error {
    match e {
        image::ImageError::Limits(_) => usage(format!(
            "the image {} needs more than the {} GiB this program lets one image's decoder take; scale it down",
            path.display(),
            MAX_DECODE_BYTES >> 30
        )),
        _ => not_image(path, e),
    }
}

/// Decodes `path` (within the size limits) with its EXIF orientation applied.
fn load_oriented(path: &Path) -> anyhow::Result<DynamicImage> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read the image {}", path.display()))?;
    if meta.len() == 0 {
        return Err(usage(format!("the image {} is empty (0 bytes)", path.display())));
    }
    let mut decoder = open_decoder(path)?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(path, &e))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Decodes `path` with its EXIF orientation applied, as 8-bit RGB.
pub fn load_rgb(path: &Path) -> anyhow::Result<RgbImage> {
    Ok(load_oriented(path)?.to_rgb8())
}

/// Decodes `path` with its EXIF orientation applied, as 8-bit grey levels (a
/// colour image's luma; a mask's alpha channel is not read).
pub fn load_gray(path: &Path) -> anyhow::Result<GrayImage> {
    Ok(load_oriented(path)?.to_luma8())
}

/// Short side to `size` (bilinear), then the centre `size`×`size` square.
pub fn resize_center_crop(img: &RgbImage, size: u32) -> RgbImage {
    resize_cover_crop(img, size, size)
}

/// Scaled (bilinear) so that it covers `width`×`height`, then the centre
/// `width`×`height` cut out: the frame of an aspect-ratio bucket (an image's,
/// or its mask's).
pub fn resize_cover_crop<P>(img: &ImageBuffer<P, Vec<P::Subpixel>>, width: u32, height: u32) -> ImageBuffer<P, Vec<P::Subpixel>>
where
    P: Pixel + 'static,
{
    let (w, h) = img.dimensions();
    let cover = CoverCrop::of(w, h, width, height);
    let resized = image::imageops::resize(img, cover.resized.0, cover.resized.1, FilterType::Triangle);
    image::imageops::crop_imm(&resized, cover.left, cover.top, width, height).to_image()
}

/// Where [`resize_cover_crop`] puts an image: the size it is scaled to
/// (width, height) and the crop's top-left corner in that scaled image (what
/// SDXL's crop ids say, as diffusers' and kohya's SDXL trainers count them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoverCrop {
    pub resized: (u32, u32),
    pub top: u32,
    pub left: u32,
}

impl CoverCrop {
    pub fn of(w: u32, h: u32, width: u32, height: u32) -> Self {
        let scale = (width as f64 / w as f64).max(height as f64 / h as f64);
        let (nw, nh) = (((w as f64 * scale).round() as u32).max(width), ((h as f64 * scale).round() as u32).max(height));
        CoverCrop { resized: (nw, nh), top: (nh - height) / 2, left: (nw - width) / 2 }
    }
}

/// An image's width and height as [`load_rgb`] will return it (EXIF rotation
/// applied), read from its header without decoding the pixels.
pub fn oriented_dimensions(path: &Path) -> anyhow::Result<(u32, u32)> {
    let mut decoder = open_decoder(path)?;
    let (w, h) = decoder.dimensions();
    use image::metadata::Orientation::*;
    Ok(match decoder.orientation().unwrap_or(NoTransforms) {
        Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH => (h, w),
        _ => (w, h),
    })
}

/// `[3, H, W]` float32 in [-1, 1], the VAE's input range.
pub fn to_tensor(img: &RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    Tensor::from_slice(img.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 127.5
        - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_sorted_images_with_captions_and_skips_other_files() {
        let dir = tempfile::tempdir().unwrap();
        RgbImage::new(8, 8).save(dir.path().join("b.png")).unwrap();
        RgbImage::new(8, 8).save(dir.path().join("a.jpg")).unwrap();
        std::fs::write(dir.path().join("a.txt"), "\u{feff}a dog, sitting \r\n").unwrap();
        std::fs::write(dir.path().join("notes.md"), "x").unwrap();
        let files = list_images(dir.path(), "instance_data_dir").unwrap();
        let names: Vec<_> = files.iter().map(|f| f.path.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["a.jpg", "b.png"]);
        assert_eq!(files[0].caption.as_deref(), Some("a dog, sitting"));
        assert_eq!(files[1].caption, None);
    }

    #[test]
    fn bad_images_are_one_sentence_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.png");
        std::fs::write(&empty, b"").unwrap();
        let err = load_rgb(&empty).unwrap_err().to_string();
        assert!(err.contains("empty.png") && err.contains("0 bytes"), "{err}");
        let fake = dir.path().join("fake.jpg");
        std::fs::write(&fake, b"hello, I am text").unwrap();
        let err = load_rgb(&fake).unwrap_err().to_string();
        assert!(err.contains("fake.jpg") && err.contains("not a readable image"), "{err}");
        RgbImage::new(8, 8).save(dir.path().join("latin1.png")).unwrap();
        std::fs::write(dir.path().join("latin1.txt"), b"caf\xe9").unwrap();
        let err = list_images(dir.path(), "instance_data_dir").unwrap_err().to_string();
        assert!(err.contains("latin1.txt is not UTF-8 text; save it as UTF-8"), "{err}");
        let err = list_images(&dir.path().join("missing"), "instance_data_dir").unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn crop_is_square_and_centred() {
        let mut img = RgbImage::new(40, 20);
        // A red stripe in the middle columns survives the centre crop.
        for y in 0..20 {
            for x in 18..22 {
                img.put_pixel(x, y, image::Rgb([255, 0, 0]));
            }
        }
        let out = resize_center_crop(&img, 10);
        assert_eq!(out.dimensions(), (10, 10));
        assert!(out.get_pixel(5, 5)[0] > 100);
        assert!(out.get_pixel(0, 5)[0] < 50);
        let t = to_tensor(&out);
        assert_eq!(t.size(), [3, 10, 10]);
        // A bucket's frame of the same picture keeps all of it.
        let wide = resize_cover_crop(&img, 20, 10);
        assert_eq!(wide.dimensions(), (20, 10));
        assert!(wide.get_pixel(10, 5)[0] > 100 && wide.get_pixel(0, 5)[0] < 50);
        assert!(t.max().double_value(&[]) <= 1.0 && t.min().double_value(&[]) >= -1.0);
    }

    #[test]
    fn grayscale_and_alpha_become_rgb() {
        let dir = tempfile::tempdir().unwrap();
        let gray = dir.path().join("g.png");
        image::GrayImage::from_pixel(4, 4, image::Luma([200])).save(&gray).unwrap();
        assert_eq!(*load_rgb(&gray).unwrap().get_pixel(0, 0), image::Rgb([200, 200, 200]));
        let rgba = dir.path().join("a.png");
        image::RgbaImage::from_pixel(4, 4, image::Rgba([10, 20, 30, 0])).save(&rgba).unwrap();
        assert_eq!(*load_rgb(&rgba).unwrap().get_pixel(0, 0), image::Rgb([10, 20, 30]));
    }

    #[test]
    fn tiff_and_the_first_frame_of_a_gif_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let tiff = dir.path().join("scan.TIF");
        image::RgbImage::from_pixel(6, 4, image::Rgb([1, 2, 3])).save(&tiff).unwrap();
        assert_eq!(*load_rgb(&tiff).unwrap().get_pixel(5, 3), image::Rgb([1, 2, 3]));
        let gif = dir.path().join("clip.gif");
        let frame = |v: u8| image::Frame::new(image::RgbaImage::from_pixel(4, 4, image::Rgba([v, v, v, 255])));
        let mut encoder = image::codecs::gif::GifEncoder::new(std::fs::File::create(&gif).unwrap());
        encoder.encode_frames([frame(255), frame(0)]).unwrap();
        drop(encoder);
        assert_eq!(*load_rgb(&gif).unwrap().get_pixel(0, 0), image::Rgb([255, 255, 255]));
        assert_eq!(list_images(dir.path(), "instance_data_dir").unwrap().len(), 2);
    }

    #[test]
    fn what_is_not_read_is_named_and_hidden_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(skipped_files_note(dir.path(), "concepts[0].instance_data_dir"), None);
        RgbImage::new(8, 8).save(dir.path().join("a.png")).unwrap();
        std::fs::write(dir.path().join("a.txt"), "a dog").unwrap();
        std::fs::write(dir.path().join(".DS_Store"), "x").unwrap();
        assert_eq!(skipped_files_note(dir.path(), "concepts[0].instance_data_dir"), None);
        for name in ["IMG_1.HEIC", "IMG_2.HEIC", "IMG_3.HEIC", "layers.psd"] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        std::fs::create_dir(dir.path().join("more")).unwrap();
        let note = skipped_files_note(dir.path(), "concepts[0].instance_data_dir").unwrap();
        assert_eq!(
            note,
            format!(
                "concepts[0].instance_data_dir {}: 4 files are skipped (not png, jpg, jpeg, webp, bmp, tif, tiff or gif; \
                 convert them to train on them): IMG_1.HEIC, IMG_2.HEIC, IMG_3.HEIC and 1 more; subfolders are not searched: more/",
                dir.path().display()
            )
        );
    }
}
