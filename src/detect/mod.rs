//! The OLE method and its baselines: pure math on embeddings, no I/O beyond the bank file.

pub mod adaptive;
pub mod approx;
pub mod bank;
pub mod cosine;
pub mod detector;
pub mod index;
pub mod kernels;
pub mod kmeans;
pub mod method;
pub mod neglabel;
pub mod norm;
pub mod prototypes;
pub mod pyrandom;
pub mod rng;
pub mod scorer;
