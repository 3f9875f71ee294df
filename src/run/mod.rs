//! The run directory: events, lock, control requests, disk room.

pub mod control;
pub mod disk;
pub mod events;
pub mod lock;
pub mod source;
