//! Data-parallel training over PyTorch's c10d engine: the process group and its
//! collectives (group.rs), gradient averaging in buckets (buckets.rs), started
//! during the backward pass (overlap.rs), and the
//! `--nproc` launcher (launch.rs). A run alone never touches any of it.

pub mod buckets;
pub mod group;
pub mod launch;
pub mod overlap;
pub mod share;

pub use group::{current, is_writer, rank, world_size, ProcessGroup};
