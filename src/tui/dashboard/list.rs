//! `dreambooth runs [DIR]`: one line per run directory under DIR, read the way
//! the dashboard reads a run (status from the lock and the event log, steps,
//! last loss, the lowest validation loss and its epoch, newest checkpoint), for
//! finding a run again after an SSH session ended.

use std::path::{Path, PathBuf};

use super::state::{DashboardState, Preparing, RunStatus};
use crate::error::usage;

/// A run's line: name, status, steps, last loss, lowest validation loss, newest checkpoint.
pub struct RunLine {
    pub dir: PathBuf,
    pub name: String,
    pub status: String,
    pub steps: String,
    pub loss: String,
    /// The lowest held-out validation loss and its epoch (`0.1234 @ epoch 6`), "-" without one.
    pub validation: String,
    pub checkpoint: String,
    /// A data-parallel run's world size and each rank's memory (`2: 1.2, 1.3 GiB`), "-" alone.
    pub processes: String,
}

fn status_word(state: &DashboardState) -> String {
    match &state.status {
        RunStatus::Live => match &state.preparing {
            Some(Preparing::Loading) => "loading".into(),
            Some(Preparing::ClassImages { done, total, .. }) => format!("class images {done}/{total}"),
            None => "training".into(),
        },
        RunStatus::Paused => "paused".into(),
        RunStatus::Finished => "finished".into(),
        RunStatus::Failed(_) => "failed".into(),
        RunStatus::Stopped => "stopped".into(),
        RunStatus::NotRunning => "not running".into(),
    }
}

/// Orders names as people number them: `dog-v2` before `dog-v10`.
fn natural_order(a: &str, b: &str) -> std::cmp::Ordering {
    // Runs of digits compare as numbers, everything else character by character.
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        for (i, c) in s.char_indices().skip(1) {
            let prev = s[..i].chars().next_back().is_some_and(|p| p.is_ascii_digit());
            if prev != c.is_ascii_digit() {
                out.push((prev, &s[start..i]));
                start = i;
            }
        }
        if !s.is_empty() {
            out.push((s[start..].chars().next().is_some_and(|c| c.is_ascii_digit()), &s[start..]));
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, sa), (db, sb)) in ca.iter().zip(&cb) {
        let order = if *da && *db {
            let (ta, tb) = (sa.trim_start_matches('0'), sb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            sa.cmp(sb)
        };
        if order.is_ne() {
            return order;
        }
    }
    ca.len().cmp(&cb.len()).then_with(|| a.cmp(b))
}

/// The run directories under `dir` (folders holding a config.yaml), by name in
/// natural order.
pub fn run_lines(dir: &Path, now: f64) -> anyhow::Result<Vec<RunLine>> {
    let entries = std::fs::read_dir(dir).map_err(|e| usage(format!("cannot read the runs folder {}: {e}", dir.display())))?;
    let mut dirs: Vec<PathBuf> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("config.yaml").is_file()).collect();
    dirs.sort_by(|a, b| natural_order(&a.to_string_lossy(), &b.to_string_lossy()));
    Ok(dirs
        .into_iter()
        .map(|run| {
            let state = DashboardState::load(&run, now);
            let step = state.last_step().map_or(0, |s| s.step);
            let steps = match state.total_steps {
                Some(total) => format!("{step}/{total}"),
                None => step.to_string(),
            };
            let loss = state.last_step().map_or_else(|| "-".into(), |s| format!("{:.4}", s.loss));
            let validation = state
                .lowest_validation()
                .and_then(|v| Some(format!("{:.4} @ epoch {}", v.loss?, v.epoch)))
                .unwrap_or_else(|| "-".into());
            let checkpoint = crate::train::checkpoint::list_checkpoints(&run)
                .last()
                .map_or_else(|| "-".into(), |(step, _)| format!("step {step}"));
            let processes = match (state.world_size, state.rank_memory.as_slice()) {
                (1, _) => "-".to_string(),
                (world, []) => world.to_string(),
                (world, memory) => {
                    let each: Vec<String> = memory.iter().map(|&b| format!("{:.1}", b as f64 / (1u64 << 30) as f64)).collect();
                    format!("{world}: {} GiB", each.join(", "))
                }
            };
            RunLine { name: state.name.clone(), status: status_word(&state), steps, loss, validation, checkpoint, processes, dir: run }
        })
        .collect())
}

/// The table `dreambooth runs` prints, columns aligned; the VALIDATION column
/// (lowest validation loss @ its epoch) only when some run measured one, the
/// PROCESSES column (world size: each rank's memory) only when some run had several.
pub fn format_table(lines: &[RunLine]) -> String {
    let validated = lines.iter().any(|l| l.validation != "-");
    let parallel = lines.iter().any(|l| l.processes != "-");
    let pick = |cells: [String; 8]| -> Vec<String> {
        cells.into_iter().enumerate().filter(|(i, _)| (validated || *i != 4) && (parallel || *i != 6)).map(|(_, c)| c).collect()
    };
    let header = pick(["RUN", "STATUS", "STEP", "LOSS", "VALIDATION", "CHECKPOINT", "PROCESSES", "FOLDER"].map(String::from));
    let rows: Vec<Vec<String>> = lines
        .iter()
        .map(|l| {
            pick([
                l.name.clone(),
                l.status.clone(),
                l.steps.clone(),
                l.loss.clone(),
                l.validation.clone(),
                l.checkpoint.clone(),
                l.processes.clone(),
                l.dir.display().to_string(),
            ])
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, &w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = line(&header);
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

pub fn runs_command(dir: &Path) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let lines = run_lines(dir, now)?;
    if lines.is_empty() {
        println!("no runs in {}", dir.display());
        return Ok(());
    }
    print!("{}", format_table(&lines));
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbered_runs_sort_by_their_numbers() {
        let mut names = vec!["dog-v10", "dog-v2", "cat", "dog-v1", "dog-v02b", "dog", "dog-v2a"];
        names.sort_by(|a, b| super::natural_order(a, b));
        assert_eq!(names, ["cat", "dog", "dog-v1", "dog-v2", "dog-v2a", "dog-v02b", "dog-v10"]);
    }
}
