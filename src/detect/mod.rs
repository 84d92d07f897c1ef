//! The OLE method and its baselines: pure math on embeddings, no I/O beyond the bank file.

pub mod approx;
pub mod bank;
pub mod build;
pub mod cosine;
pub mod detector;
pub mod embed_cache;
pub mod index;
pub mod labels;
pub mod prototypes;
pub mod pyrandom;
pub mod score;
pub mod wordnet;
