//! The run directory: events, lock, control requests.

pub mod control;
pub mod events;
pub mod lock;
