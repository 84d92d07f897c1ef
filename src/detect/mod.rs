//! The OLE method and its baselines: pure math on embeddings, no I/O beyond the bank file.

pub mod approx;
pub mod bank;
pub mod build;
pub mod cosine;
pub mod embed_cache;
pub mod index;
pub mod kernels;
pub mod kmeans;
pub mod labels;
pub mod method;
pub mod neglabel;
pub mod norm;
pub mod prototypes;
pub mod pyrandom;
pub mod rng;
pub mod scorer;
pub mod wordnet;
