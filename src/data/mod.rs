//! Training data: instance and class images, captions, the latent cache.

pub mod buckets;
pub mod dataset;
pub mod images;
pub mod prompts;
