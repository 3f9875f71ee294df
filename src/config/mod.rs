//! Run configuration: schema, loading with presets, validation.

pub mod load;
pub mod presets;
pub mod schema;
pub mod validate;

pub use load::{load_run_config, parse_run_config};
pub use schema::RunConfig;
