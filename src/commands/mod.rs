//! The commands a user runs that are not the training loop's own (`generate`).
//! Commands sit on top: they may use every engine module, and no engine module
//! imports them.

pub mod generate;
