//! Training data: instance and class images, captions, masks, the latent cache.

pub mod buckets;
pub mod dataset;
pub mod holdout;
pub mod images;
pub mod masks;
pub mod prompts;
