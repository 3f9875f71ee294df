//! The demo's pictures, drawn in code: the subject it teaches (a yellow
//! plus-shaped cross on blue, a figure the pretrained model never saw) and
//! unrelated pictures of the kind it was pretrained on, with their captions.
//! Colours are scripts/pretrain_demo_model.py's palette, so the model knows
//! their names.

use std::path::Path;

use anyhow::Context;
use image::{Rgb, RgbImage};

const SIZE: u32 = 64;
const YELLOW: [u8; 3] = [240, 210, 40];
const BLUE: [u8; 3] = [30, 60, 200];
const RED: [u8; 3] = [220, 40, 40];
const GREEN: [u8; 3] = [40, 170, 60];

/// Where the subject is drawn: a plus-shaped cross, its centre, arm length
/// (centre to tip), arm half-width and turn (radians).
struct Cross {
    cx: f64,
    cy: f64,
    arm: f64,
    half_width: f64,
    turn: f64,
}

impl Cross {
    /// Whether pixel centre (x, y) is inside one of its two bars.
    fn contains(&self, x: f64, y: f64) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let (sin, cos) = self.turn.sin_cos();
        let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
        (u.abs() < self.arm && v.abs() < self.half_width) || (v.abs() < self.arm && u.abs() < self.half_width)
    }
}

fn cross_picture(cross: &Cross) -> RgbImage {
    RgbImage::from_fn(SIZE, SIZE, |x, y| Rgb(if cross.contains(f64::from(x) + 0.5, f64::from(y) + 0.5) { YELLOW } else { BLUE }))
}

fn save(img: &RgbImage, path: &Path) -> anyhow::Result<()> {
    img.save(path).with_context(|| format!("cannot write {}", path.display()))
}

fn create(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes one picture of the subject per placement (centre x, y, arm length, turn).
fn write_crosses(dir: &Path, stem: &str, placements: &[(f64, f64, f64, f64)]) -> anyhow::Result<()> {
    create(dir)?;
    for (k, &(cx, cy, arm, turn)) in placements.iter().enumerate() {
        save(&cross_picture(&Cross { cx, cy, arm, half_width: 0.32 * arm, turn }), &dir.join(format!("{stem}-{k}.png")))?;
    }
    Ok(())
}

/// The subject's training pictures: the cross a little moved, sized and turned per picture.
pub fn write_subject(dir: &Path) -> anyhow::Result<()> {
    write_crosses(dir, "cross", &[(31.0, 32.0, 22.0, 0.0), (33.0, 31.0, 20.0, 0.12), (32.0, 34.0, 23.0, -0.08), (30.0, 30.0, 21.0, 0.05)])
}

/// Held-out pictures of the subject (placements the run never trains on), for its loss.
pub fn write_subject_held_out(dir: &Path) -> anyhow::Result<()> {
    write_crosses(dir, "cross-held-out", &[(30.0, 33.0, 21.0, 0.1), (34.0, 31.0, 22.0, -0.04)])
}

/// Pictures like the pretraining set's, each with its caption in a `.txt`
/// beside it: what the run must not forget.
pub fn write_unrelated(dir: &Path) -> anyhow::Result<()> {
    create(dir)?;
    let pictures: [(&str, [u8; 3], [u8; 3], Box<dyn Fn(f64, f64) -> bool>); 4] = [
        ("a red circle on a green background", RED, GREEN, Box::new(|x, y| (x - 30.0).powi(2) + (y - 34.0).powi(2) < 18.0f64.powi(2))),
        ("a blue square on a yellow background", BLUE, YELLOW, Box::new(|x: f64, y: f64| (x - 34.0).abs() < 15.0 && (y - 30.0).abs() < 15.0)),
        ("a yellow circle on a blue background", YELLOW, BLUE, Box::new(|x, y| (x - 33.0).powi(2) + (y - 31.0).powi(2) < 17.0f64.powi(2))),
        ("a green triangle on a red background", GREEN, RED, Box::new(|x: f64, y: f64| y > 14.0 && y < 50.0 && (x - 32.0).abs() < (y - 14.0) * 0.58)),
    ];
    for (k, (caption, fg, bg, inside)) in pictures.iter().enumerate() {
        let img = RgbImage::from_fn(SIZE, SIZE, |x, y| Rgb(if inside(f64::from(x) + 0.5, f64::from(y) + 0.5) { *fg } else { *bg }));
        save(&img, &dir.join(format!("unrelated-{k}.png")))?;
        let caption_path = dir.join(format!("unrelated-{k}.txt"));
        std::fs::write(&caption_path, caption).with_context(|| format!("cannot write {}", caption_path.display()))?;
    }
    Ok(())
}
