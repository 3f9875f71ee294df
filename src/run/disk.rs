//! Disk room for a run's checkpoints: how many are on disk at once, the bytes
//! they take, and whether the run directory's file system has that much free,
//! so a run that would fill the disk says so at the start, not hours in.

use std::path::Path;

/// Checkpoints on disk at the fullest moment of a run that saves `saves` times
/// and keeps the newest `keep` (0: all). A new checkpoint is complete before
/// the oldest is deleted, so keeping k briefly holds k + 1.
pub fn checkpoints_on_disk(saves: u64, keep: u32) -> u64 {
    if keep == 0 {
        saves
    } else {
        saves.min(u64::from(keep) + 1)
    }
}

/// Checkpoints a run of `epochs` epochs writes when it saves every `every`
/// epochs (0: only at the end); the end is always saved.
pub fn checkpoint_saves(epochs: u64, every: u32) -> u64 {
    if every == 0 {
        return 1;
    }
    let every = u64::from(every);
    (epochs / every + u64::from(!epochs.is_multiple_of(every))).max(1)
}

/// Bytes free to this user on the file system holding `path` (None: unknown).
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: a valid C string and a buffer of the right type for statvfs to fill.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    Some(stat.f_bavail * stat.f_frsize)
}

/// `12.3 GiB`, or `45.6 MiB` under a GiB.
pub fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// The warning when the `needed` bytes of checkpoints still to be written will
/// not fit in `free`.
pub fn shortfall_warning(needed: u64, each: u64, at_once: u64, free: u64, run_dir: &Path) -> Option<String> {
    (needed > free).then(|| {
        format!(
            "the checkpoints still to be written need about {} (up to {at_once} on disk at once, {} each) but {} has {} free: \
             lower keep_last_checkpoints or save more rarely (save_model_every_n_epochs), or free some space",
            size(needed),
            size(each),
            run_dir.display(),
            size(free)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_count_the_end_once() {
        assert_eq!(checkpoint_saves(100, 25), 4);
        assert_eq!(checkpoint_saves(110, 25), 5, "4 on the way, then the end");
        assert_eq!(checkpoint_saves(10, 0), 1);
        assert_eq!(checkpoint_saves(3, 25), 1);
    }

    #[test]
    fn keeping_k_holds_k_plus_one_for_a_moment() {
        assert_eq!(checkpoints_on_disk(8, 3), 4);
        assert_eq!(checkpoints_on_disk(2, 3), 2);
        assert_eq!(checkpoints_on_disk(8, 0), 8);
    }

    #[test]
    fn a_shortfall_names_the_sizes_and_the_fixes() {
        let w = shortfall_warning(40 << 30, 10 << 30, 4, 20 << 30, Path::new("runs/dog")).unwrap();
        assert!(w.contains("need about 40.0 GiB (up to 4 on disk at once, 10.0 GiB each) but runs/dog has 20.0 GiB free"), "{w}");
        assert_eq!(size(3 << 19), "1.5 MiB");
        assert!(shortfall_warning(1 << 30, 1 << 30, 1, 2 << 30, Path::new(".")).is_none());
        assert!(free_bytes(Path::new("/")).is_some_and(|b| b > 0));
    }
}
