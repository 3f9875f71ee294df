//! The fit check and the decode limits (issue 19): a run or a drawing the device
//! cannot hold is refused in one sentence with exit status 2 before anything large
//! is allocated, leaving no run directory and an existing one untouched; `--force`
//! and `training.skip_fit_check` start anyway; a resolution past 8192 is a config
//! error; a decompression-bomb PNG and a truncated file are one sentence naming
//! the file. `DREAMBOOTH_MEMORY_AVAILABLE` stands in for a small device.

#[path = "train_support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};

use support::{fixture_model, subject_images, write_config};

/// Runs the binary with `env` set; (exit status, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth"));
    cmd.args(args).env("OMP_NUM_THREADS", "2").env_remove("DREAMBOOTH_MEMORY_AVAILABLE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the dreambooth binary runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// One line on stderr, "error: ...", no panic, exit status 2.
fn assert_one_sentence(code: i32, err: &str) {
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert_eq!(code, 2, "{err}");
}

const TINY_ROOM: (&str, &str) = ("DREAMBOOTH_MEMORY_AVAILABLE", "1000");

fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push((p.clone(), std::fs::metadata(&p).unwrap().len()));
        }
    }
    out.sort();
    out
}

#[test]
fn a_run_that_cannot_fit_is_refused_and_leaves_no_run_directory() {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    subject_images(&images, 1);
    // A box with room for this run at 64 pixels, asked for 256.
    let config = write_config(root.path(), "small-box", &images, "");
    let at_64 = support::load(&config);
    let shapes = dreambooth::vram::ModelShapes::for_run(&at_64).unwrap();
    let room = dreambooth::vram::fit::run_need(&at_64, &shapes, tch::Device::Cpu).to_string();
    let text = std::fs::read_to_string(&config).unwrap().replace("resolution: 64", "resolution: 256");
    std::fs::write(&config, text).unwrap();
    let (code, err) = run(&["train", config.to_str().unwrap()], &[("DREAMBOOTH_MEMORY_AVAILABLE", &room)]);
    assert_one_sentence(code, &err);
    for needle in ["this run needs about", "MiB are available", "would fit", "--force", "training.skip_fit_check: true"] {
        assert!(err.contains(needle), "{needle:?} in: {err}");
    }
    assert!(!root.path().join("runs").join("small-box").exists(), "a refused run leaves no run directory");

    // On the machine itself: an explicit-attention run at 8192 wants terabytes of
    // score matrices anywhere; the sentence names a resolution that fits.
    let config = write_config(root.path(), "huge", &images, "  attention: explicit\n");
    let text = std::fs::read_to_string(&config).unwrap().replace("resolution: 64", "resolution: 8192");
    std::fs::write(&config, text).unwrap();
    let started = std::time::Instant::now();
    let (code, err) = run(&["train", config.to_str().unwrap()], &[]);
    assert_one_sentence(code, &err);
    assert!(err.contains("of memory available") && err.contains("`resolution: "), "{err}");
    assert!(!root.path().join("runs").join("huge").exists());
    // Refused before the images are decoded at 8192² (no timing asserted, only that it ended).
    let _ = started.elapsed();
}

#[test]
fn force_and_the_config_key_start_anyway_and_resume_is_checked_too() {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    subject_images(&images, 1);
    let config = write_config(root.path(), "forced", &images, "  steps_per_image: 1\n");
    let (code, err) = run(&["train", config.to_str().unwrap(), "--plain", "--force"], &[TINY_ROOM]);
    assert_eq!(code, 0, "{err}");
    let run_dir = root.path().join("runs").join("forced");
    assert!(run_dir.join("config.yaml").is_file());

    let config = write_config(root.path(), "keyed", &images, "  steps_per_image: 1\n  skip_fit_check: true\n");
    let (code, err) = run(&["train", config.to_str().unwrap(), "--plain"], &[TINY_ROOM]);
    assert_eq!(code, 0, "{err}");

    // resume: refused the same way, the run directory as it was.
    let before = files_under(&run_dir);
    let (code, err) = run(&["resume", run_dir.to_str().unwrap(), "--steps-per-image", "2"], &[TINY_ROOM]);
    assert_one_sentence(code, &err);
    assert!(err.contains("this run needs about"), "{err}");
    assert_eq!(files_under(&run_dir), before, "a refused resume changes nothing in the run");
    let (code, err) = run(&["resume", run_dir.to_str().unwrap(), "--plain", "--force"], &[TINY_ROOM]);
    assert_eq!(code, 0, "a finished run, forced past the check, says it has trained all its steps: {err}");
    assert!(err.contains("has trained all its"), "{err}");
}

#[test]
fn generate_is_checked_before_the_model_loads_and_bounded() {
    let root = tempfile::tempdir().unwrap();
    let model = fixture_model("tiny-sd1");
    let out = root.path().join("o.png");
    let call = |extra: &[&str], env: &[(&str, &str)]| {
        let mut a = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "a dog", "--steps", "1"];
        a.extend_from_slice(&["--device", "cpu", "--out", out.to_str().unwrap()]);
        a.extend_from_slice(extra);
        run(&a, env)
    };
    let (code, err) = call(&[], &[TINY_ROOM]);
    assert_one_sentence(code, &err);
    assert!(err.contains("drawing 32×32 needs about") && err.contains("--force draws anyway"), "{err}");
    assert!(!out.exists());
    let (code, err) = call(&["--width", "9000"], &[]);
    assert_one_sentence(code, &err);
    assert!(err.contains("--width 9000 is above 8192"), "{err}");
    let (code, err) = call(&["--width", "64", "--height", "64", "--force"], &[TINY_ROOM]);
    assert_eq!(code, 0, "{err}");
    assert!(out.is_file());
}

#[test]
fn a_resolution_past_8192_is_a_config_error() {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    subject_images(&images, 1);
    for resolution in ["16384", "1000000"] {
        let config = write_config(root.path(), "typo", &images, "");
        let text = std::fs::read_to_string(&config).unwrap().replace("resolution: 64", &format!("resolution: {resolution}"));
        std::fs::write(&config, text).unwrap();
        let (code, err) = run(&["train", config.to_str().unwrap()], &[]);
        assert_one_sentence(code, &err);
        assert!(err.contains(&format!("`resolution` {resolution} must be a multiple of 8 from 64 to 8192")), "{err}");
        assert!(!root.path().join("runs").join("typo").exists());
    }
}

/// A valid 1-bit grayscale PNG of `side` × `side` black pixels whose IDAT is a
/// hand-made deflate stream (fixed Huffman codes: one literal 0, then matches of
/// 258 at distance 1): 50 000² pixels in about 2 MB, 7.5 GB once decoded as RGB.
fn bomb_png(path: &Path, side: u32) {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        /// `count` bits of `value`, least significant first (deflate's order for headers and extra bits).
        fn put(&mut self, value: u64, count: u32) {
            self.acc |= value << self.n;
            self.n += count;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// A Huffman code, most significant bit first.
        fn code(&mut self, code: u64, len: u32) {
            let reversed = (0..len).fold(0, |r, i| r | (((code >> i) & 1) << (len - 1 - i)));
            self.put(reversed, len);
        }
    }
    let total: u64 = u64::from(side) * (1 + u64::from(side).div_ceil(8));
    let mut b = Bits { out: vec![0x78, 0x01], acc: 0, n: 0 };
    b.put(1, 1); // BFINAL
    b.put(1, 2); // fixed Huffman codes
    b.code(0x30, 8); // literal 0
    let rest = total - 1;
    for _ in 0..rest / 258 {
        b.code(0xC5, 8); // length 258 (symbol 285)
        b.code(0, 5); // distance 1
    }
    for _ in 0..rest % 258 {
        b.code(0x30, 8);
    }
    b.code(0, 7); // end of block
    if b.n > 0 {
        b.put(0, 8 - b.n);
    }
    let adler = ((total % 65521) << 16) | 1;
    b.out.extend_from_slice(&(adler as u32).to_be_bytes());
    let chunk = |png: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        png.extend_from_slice(&crc.finalize().to_be_bytes());
    };
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[1, 0, 0, 0, 0]); // 1 bit, grayscale, deflate, no filter variant, not interlaced
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &b.out);
    chunk(&mut png, b"IEND", &[]);
    std::fs::write(path, png).unwrap();
}

#[test]
fn the_bomb_png_is_a_real_png() {
    // The same construction at 64²: the image crate decodes it to black pixels.
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.png");
    bomb_png(&small, 64);
    let img = dreambooth::data::images::load_rgb(&small).unwrap();
    assert_eq!(img.dimensions(), (64, 64));
    assert!(img.pixels().all(|p| p.0 == [0, 0, 0]));
}

#[test]
fn a_decompression_bomb_and_a_truncated_image_are_one_sentence_naming_the_file() {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    subject_images(&images, 1);
    let bomb = images.join("bomb.png");
    bomb_png(&bomb, 50_000);
    assert!(std::fs::metadata(&bomb).unwrap().len() < 4 << 20, "a few MB on disk");
    let err = dreambooth::data::images::load_rgb(&bomb).unwrap_err().to_string();
    assert!(err.contains("bomb.png is 50000 × 50000 pixels, past the 16384 × 16384"), "{err}");
    let config = write_config(root.path(), "bombed", &images, "");
    let (code, err) = run(&["train", config.to_str().unwrap()], &[]);
    assert_one_sentence(code, &err);
    assert!(err.contains("bomb.png is 50000 × 50000 pixels"), "{err}");
    assert!(!root.path().join("runs").join("bombed").exists());

    // Cut in half: a decoding error naming the file, still no run directory.
    std::fs::remove_file(&bomb).unwrap();
    let whole = std::fs::read(images.join("img-0.png")).unwrap();
    std::fs::write(images.join("cut.png"), &whole[..whole.len() / 2]).unwrap();
    let (code, err) = run(&["train", config.to_str().unwrap()], &[]);
    assert_one_sentence(code, &err);
    assert!(err.contains("cut.png is not a readable image"), "{err}");
    assert!(!root.path().join("runs").join("bombed").exists());
}

#[test]
fn the_machine_reports_its_memory() {
    let room = dreambooth::vram::fit::room(tch::Device::Cpu).expect("MemAvailable is read on Linux");
    assert!(room.bytes > 0 && room.what.contains("GiB"), "{room:?}");
}

const SD15_RUN: &str =
    "name: dog\nsource_checkpoint: m.safetensors\nconcepts:\n  - instance_data_dir: data\n    instance_prompt: a photo of sks dog\n";

#[test]
fn on_a_gpu_the_largest_preset_that_fits_is_named() {
    use dreambooth::vram::{fit::what_fits, ModelShapes};
    let c = dreambooth::config::parse_run_config(SD15_RUN, "t", Path::new(".")).unwrap();
    let m = ModelShapes::sd15();
    let gpu = tch::Device::Cuda(0);
    // The full UNet with AdamW in bf16 at 512 needs more than a 12 GB card has; 12gb and
    // 16gb both fit (8-bit AdamW), and the larger tier (no checkpointing) is named.
    assert!(dreambooth::vram::fit::run_need(&c, &m, gpu) > 12 << 30);
    let fix = what_fits(&c, &m, gpu, 12 << 30);
    assert!(fix.starts_with("`preset: 16gb` would fit ("), "{fix}");
    assert!(what_fits(&c, &m, gpu, 4 << 30).starts_with("`preset: 8gb` would fit"), "a LoRA tier for 4 GiB");
    // No preset at all: the weights alone are over 1 GiB.
    assert!(what_fits(&c, &m, gpu, 1 << 30).starts_with("no setting checked fits"));
    // On the CPU, no tiers: memory savers, only those needed. A byte short of the
    // full fine-tune, whose peak is its optimizer step: 8-bit AdamW alone does it.
    let cpu = tch::Device::Cpu;
    let need = dreambooth::vram::fit::run_need(&c, &m, cpu);
    assert_eq!(what_fits(&c, &m, cpu, need - 1), "`training.optimizer: adamw_8bit` would fit (9.3 GiB)");
    // A resolution past the family's own size is the likely mistake: it is named first.
    let mut big = c.clone();
    big.resolution = 2048;
    let fix = what_fits(&big, &m, cpu, need);
    assert!(fix.starts_with("`resolution: ") && fix.contains("would fit"), "{fix}");
}

#[test]
fn sampling_is_estimated_from_the_weights_and_the_size() {
    use dreambooth::vram::{estimate_sampling, ModelShapes, SamplingPlan};
    let m = ModelShapes::sd15();
    let plan = SamplingPlan { width: 512, height: 512, batch: 2, half: true, attention: Default::default() };
    let e = estimate_sampling(&m, &plan);
    // fp16 UNet and text encoder (983 M parameters) and the float32 VAE (83.7 M).
    let weights = (859_520_964u64 + 123_060_480) * 2 + 83_653_863 * 4;
    assert_eq!(e.resident, weights);
    assert!(e.peak > e.resident && e.peak < e.resident + (2 << 30), "{}", e.peak);
    let big = estimate_sampling(&m, &SamplingPlan { width: 2048, height: 2048, ..plan.clone() });
    assert!(big.peak > e.peak);
    let fp32 = estimate_sampling(&m, &SamplingPlan { half: false, ..plan.clone() });
    assert!(fp32.resident > e.resident);
}
