//! `concepts[].validation_split`: a share of a concept's own photos held out
//! of training for the validation loss, as kohya's `validation_split`, for
//! users without a separate folder of held-out photos. Which photos is drawn
//! from the run's seed, so a resumed run holds out the same ones.

use std::path::PathBuf;

use crate::config::schema::{Concept, RunConfig};
use crate::data::images::{list_images, ImageFile};
use crate::error::usage;
use crate::rng::CpuRng;

/// Where the hold-out generator's seed starts from the run's `seed` (apart
/// from the trainer's generators and the validation noise's).
const SEED_OFFSET: u64 = 1 << 21;

/// How many of `n` photos a split of `share` holds out: rounded, at least one,
/// and never all (one at least trains).
pub fn held_out_count(n: usize, share: f64) -> usize {
    if share <= 0.0 || n < 2 {
        return 0;
    }
    ((n as f64 * share).round() as usize).clamp(1, n - 1)
}

/// The split's settings checked before anything is loaded.
pub fn check(config: &RunConfig) -> anyhow::Result<()> {
    for (i, c) in config.concepts.iter().enumerate() {
        let share = c.validation_split;
        if share == 0.0 {
            continue;
        }
        if !(0.0..1.0).contains(&share) || !share.is_finite() {
            return Err(usage(format!(
                "concepts[{i}].validation_split is {share}: it is the share of the photos held out, from 0 up to (not including) 1, e.g. 0.2"
            )));
        }
        if c.validation_data_dir.is_some() {
            return Err(usage(format!(
                "concepts[{i}] has both a validation_data_dir and a validation_split: held-out photos come from one or the other"
            )));
        }
        let what = format!("concepts[{i}].instance_data_dir");
        let n = list_images(&c.instance_data_dir, &what)?.len();
        if n < 2 {
            return Err(usage(format!(
                "concepts[{i}].validation_split needs at least 2 photos in {} (one to train on, one to hold out); it has {n}",
                c.instance_data_dir.display()
            )));
        }
    }
    Ok(())
}

/// A concept's instance photos split into (trained on, held out), in file order.
pub fn split_photos(concept: &Concept, index: usize, seed: u64, what: &str) -> anyhow::Result<(Vec<ImageFile>, Vec<ImageFile>)> {
    let files = list_images(&concept.instance_data_dir, what)?;
    let count = held_out_count(files.len(), concept.validation_split);
    if count == 0 {
        return Ok((files, Vec::new()));
    }
    let mut rng = CpuRng::new(seed.wrapping_add(SEED_OFFSET + index as u64));
    let order = Vec::<i64>::try_from(&rng.randperm(files.len() as i64)).expect("randperm gives int64");
    let mut held = vec![false; files.len()];
    for &k in &order[..count] {
        held[k as usize] = true;
    }
    let (mut train, mut held_out) = (Vec::new(), Vec::new());
    for (file, held) in files.into_iter().zip(held) {
        if held { held_out.push(file) } else { train.push(file) }
    }
    Ok((train, held_out))
}

/// The held-out photos' paths of every concept with a split (for the log).
pub fn held_out_paths(config: &RunConfig) -> anyhow::Result<Vec<(usize, Vec<PathBuf>)>> {
    let mut out = Vec::new();
    for (i, c) in config.concepts.iter().enumerate().filter(|(_, c)| c.validation_split > 0.0) {
        let (_, held) = split_photos(c, i, config.seed, &format!("concepts[{i}].instance_data_dir"))?;
        out.push((i, held.into_iter().map(|f| f.path).collect()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_holds_out_at_least_one_and_never_all() {
        assert_eq!(held_out_count(10, 0.2), 2);
        assert_eq!(held_out_count(5, 0.2), 1);
        assert_eq!(held_out_count(3, 0.01), 1);
        assert_eq!(held_out_count(2, 0.9), 1);
        assert_eq!(held_out_count(1, 0.5), 0);
        assert_eq!(held_out_count(8, 0.0), 0);
    }
}
