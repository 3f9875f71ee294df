//! Each rank's share of one global batch: every rank draws the same global
//! batch (world × batch_size examples, from the same seeded data order) and
//! trains on a contiguous run of its rows. An instance example and the class
//! examples that follow it stay together, so the prior term keeps its pairs.

use std::ops::Range;

use crate::data::dataset::BatchPlan;

/// The rows of `plan` that `rank` of `world` trains on, and that part of the plan.
/// Groups (an instance and its class examples) go to ranks in order, as evenly as
/// they divide; a rank may get none at an epoch's short last batch.
pub fn take_share(plan: &BatchPlan, rank: usize, world: usize) -> (BatchPlan, Range<usize>) {
    if world <= 1 {
        return (BatchPlan { items: plan.items.clone(), shuffled: plan.shuffled.clone() }, 0..plan.items.len());
    }
    let starts: Vec<usize> = plan.items.iter().enumerate().filter(|(_, item)| !item.0).map(|(i, _)| i).collect();
    let groups = starts.len();
    // Group g goes to rank g·world / groups: contiguous, rank 0 first when short.
    let owner = |g: usize| g * world / groups.max(1);
    let mine: Vec<usize> = (0..groups).filter(|&g| owner(g) == rank).collect();
    let rows = match (mine.first(), mine.last()) {
        (Some(&first), Some(&last)) => starts[first]..starts.get(last + 1).copied().unwrap_or(plan.items.len()),
        _ => 0..0,
    };
    let share = BatchPlan { items: plan.items[rows.clone()].to_vec(), shuffled: plan.shuffled[rows.clone()].to_vec() };
    (share, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(items: &[bool]) -> BatchPlan {
        BatchPlan {
            items: items.iter().enumerate().map(|(i, &class)| (class, 0, i, false)).collect(),
            shuffled: vec![None; items.len()],
        }
    }

    #[test]
    fn ranks_take_contiguous_groups() {
        let p = plan(&[false, true, false, true]);
        assert_eq!(take_share(&p, 0, 2).1, 0..2);
        assert_eq!(take_share(&p, 1, 2).1, 2..4);
        let p = plan(&[false, false, false]);
        assert_eq!(take_share(&p, 0, 2).1, 0..2);
        assert_eq!(take_share(&p, 1, 2).1, 2..3);
        let p = plan(&[false]);
        assert_eq!(take_share(&p, 0, 2).1, 0..1);
        assert!(take_share(&p, 1, 2).1.is_empty());
        assert_eq!(take_share(&p, 0, 1).1, 0..1);
    }
}
