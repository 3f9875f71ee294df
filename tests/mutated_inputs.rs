//! Broken copies of valid files (bytes flipped, runs overwritten with extreme
//! values, cut short, spliced) are refused with an error: the checkpoint
//! readers, the image loader and the config loader never panic, whatever the
//! damage. The seeds are small valid files: `reference/seeds/small.ckpt` (from
//! `tests/fixtures/make_mutation_seeds.py`), and a safetensors file, PNG, JPEG
//! and WebP pictures and a run config written here. The mutations come from a
//! fixed-seed generator, so a failure reproduces.

use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use dreambooth::checkpoint::ckpt::TorchZipFile;
use dreambooth::checkpoint::safetensors_file::SafetensorsFile;
use dreambooth::checkpoint::source::TensorSource;
use tch::{Kind, Tensor};

/// xorshift64*: small, fixed, and the same on every machine.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One damaged copy of `seed`, and what was done to it.
fn mutate(seed: &[u8], draw: &mut Draw) -> (Vec<u8>, String) {
    let mut bytes = seed.to_vec();
    let n = bytes.len();
    match draw.below(5) {
        0 => {
            let flips = 1 + draw.below(8);
            for _ in 0..flips {
                let at = draw.below(n);
                bytes[at] ^= 1 << draw.below(8);
            }
            (bytes, format!("{flips} bit flips"))
        }
        1 => {
            let at = draw.below(n.saturating_sub(4));
            let value = [0x00, 0xff, 0x7f, 0x80][draw.below(4)];
            let run = 1 + draw.below(8);
            for b in bytes.iter_mut().skip(at).take(run) {
                *b = value;
            }
            (bytes, format!("{run} bytes at {at} set to {value:#x}"))
        }
        2 => {
            let keep = draw.below(n);
            bytes.truncate(keep);
            (bytes, format!("cut to {keep} bytes"))
        }
        3 => {
            let (from, to) = (draw.below(n), draw.below(n));
            let len = draw.below(64).min(n - from.max(to));
            bytes.copy_within(from..from + len, to);
            (bytes, format!("{len} bytes copied from {from} to {to}"))
        }
        _ => {
            let at = draw.below(n);
            let len = 1 + draw.below(32);
            bytes.drain(at..(at + len).min(n));
            (bytes, format!("{len} bytes removed at {at}"))
        }
    }
}

/// Runs `read` on `count` damaged copies of `seed`; fails listing the ones that
/// panicked. `read` says whether the copy was accepted: some must be and some
/// not, or the damage never reached past the first check.
fn assert_never_panics(what: &str, seed: &[u8], count: usize, seed_number: u64, read: impl Fn(&[u8]) -> bool) {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut draw = Draw(seed_number);
    let mut panicked = Vec::new();
    let mut accepted = 0;
    for i in 0..count {
        let (bytes, how) = mutate(seed, &mut draw);
        match catch_unwind(AssertUnwindSafe(|| read(&bytes))) {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(_) => panicked.push(format!("#{i}: {how}")),
        }
    }
    std::panic::set_hook(quiet);
    eprintln!("{what}: {accepted} of {count} damaged copies accepted, the others refused");
    assert!(accepted > 0 && accepted < count, "{what}: {accepted} of {count} accepted: the mutations do not test the reader");
    assert!(panicked.is_empty(), "{what}: {} of {count} damaged copies panicked: {:?}", panicked.len(), &panicked[..panicked.len().min(10)]);
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Opens a tensor file and reads every tensor in it; whether all of that worked
/// (an error anywhere is fine).
fn read_all(source: anyhow::Result<impl TensorSource>) -> bool {
    let Ok(source) = source else { return false };
    let mut whole = true;
    for key in source.index().keys() {
        whole &= source.load(key).is_ok();
    }
    whole
}

fn small_ckpt() -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/reference/seeds/small.ckpt")).unwrap()
}

#[test]
fn the_seed_checkpoint_reads_whole() {
    let dir = tempfile::tempdir().unwrap();
    let source = TorchZipFile::open(&write(dir.path(), "small.ckpt", &small_ckpt())).unwrap();
    assert_eq!(source.index().len(), 4);
    let weight = source.load("model.diffusion_model.conv_in.weight").unwrap();
    let bias = source.load("model.diffusion_model.conv_in.bias").unwrap();
    assert!(bias.equal(&weight.get(1)), "a view at an offset into another tensor's storage");
    assert_eq!(source.load("first_stage_model.quant_conv.weight").unwrap().kind(), Kind::Half);
}

#[test]
fn damaged_torch_checkpoints_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let seed = small_ckpt();
    assert_never_panics("ckpt", &seed, 4000, 0x5eed_0001, |bytes| {
        let path = write(dir.path(), "damaged.ckpt", bytes);
        let _ = dreambooth::checkpoint::load_model(&path, None);
        read_all(TorchZipFile::open(&path))
    });
}

#[test]
fn damaged_pickles_are_errors() {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(small_ckpt())).unwrap();
    let name = archive.file_names().find(|n| n.ends_with("data.pkl")).unwrap().to_string();
    let mut pickle = Vec::new();
    archive.by_name(&name).unwrap().read_to_end(&mut pickle).unwrap();
    assert!(dreambooth::checkpoint::pickle::read(&pickle).is_ok(), "the seed pickle reads");
    assert_never_panics("pickle", &pickle, 20000, 0x5eed_0002, |bytes| {
        dreambooth::checkpoint::pickle::read(bytes).is_ok()
    });
}

#[test]
fn damaged_safetensors_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let seed_path = dir.path().join("seed.safetensors");
    let tensors = [
        ("model.diffusion_model.conv_in.weight", Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([4, 3])),
        ("first_stage_model.quant_conv.weight", Tensor::ones([2, 2], (Kind::Half, tch::Device::Cpu))),
        ("cond_stage_model.transformer.text_model.embeddings.position_ids", Tensor::arange(5, (Kind::Int64, tch::Device::Cpu))),
    ];
    Tensor::write_safetensors(&tensors, &seed_path).unwrap();
    let seed = std::fs::read(&seed_path).unwrap();
    assert!(read_all(SafetensorsFile::open(&seed_path)), "the seed reads");
    assert_never_panics("safetensors", &seed, 4000, 0x5eed_0003, |bytes| {
        let path = write(dir.path(), "damaged.safetensors", bytes);
        let _ = dreambooth::checkpoint::load_model(&path, None);
        read_all(SafetensorsFile::open(&path))
    });
}

#[test]
fn damaged_run_configs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let seed = "name: dog\nsource_checkpoint: model.safetensors\nresolution: 512\npreset: 8gb\n\
                concepts:\n  - instance_data_dir: photos\n    instance_prompt: a photo of sks dog\n    \
                class_prompt: a photo of a dog\n    num_class_images: 50\n\
                training:\n  steps_per_image: 150\n  learning_rate: 1.0e-6\n  lr_scheduler: polynomial\n  \
                text_encoder_learning_rate: 5.0e-7\n  max_token_length: 150\nsampling:\n  steps: 30\n  seed: 42\n";
    assert!(dreambooth::config::parse_run_config(seed, "the seed", dir.path()).is_ok(), "the seed config reads");
    assert_never_panics("config", seed.as_bytes(), 5000, 0x5eed_0004, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        dreambooth::config::parse_run_config(&text, "a damaged config", dir.path())
            .is_ok_and(|config| dreambooth::config::validate::validate(&config).is_ok())
    });
}

#[test]
fn damaged_images_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let picture = image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([(x * 10) as u8, (y * 15) as u8, 128]));
    for (ext, format, seed_number) in
        [("png", image::ImageFormat::Png, 0x5eed_0005), ("jpg", image::ImageFormat::Jpeg, 0x5eed_0006), ("webp", image::ImageFormat::WebP, 0x5eed_0007)]
    {
        let mut seed = Vec::new();
        picture.write_to(&mut std::io::Cursor::new(&mut seed), format).unwrap();
        let path = dir.path().join(format!("damaged.{ext}"));
        assert_never_panics(ext, &seed, 1500, seed_number, |bytes| {
            std::fs::write(&path, bytes).unwrap();
            let _ = dreambooth::data::images::oriented_dimensions(&path);
            dreambooth::data::images::load_rgb(&path)
                .is_ok_and(|img| dreambooth::data::images::resize_cover_crop(&img, 16, 8).dimensions() == (16, 8))
        });
    }
}
