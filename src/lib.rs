//! oodgate: filter image streams for out-of-distribution content with CLIP and Outlier Label
//! Exposure (OLE, arXiv 2406.01170).
//!
//! The modules follow the data flow:
//! - [`model`] turns pixels and words into L2-normalised CLIP embeddings (ONNX Runtime).
//! - [`detect`] is the method: label banks, outlier prototypes, every score, the bank file.
//! - [`bank_build`] makes banks: label corpora, label embeddings through [`model`], the
//!   construction of the outlier rows and the import of precomputed matrices.
//! - [`eval`] measures and calibrates scores (AUROC, FPR95, AUPR, thresholds).
//! - [`stream`] is the NATS JetStream daemon that routes messages by decision.
//! - [`shards`] reads and writes datasets held as webdataset or parquet shards (`filter`).

pub mod bank_build;
pub mod config;
pub mod detect;
pub mod eval;
pub mod http;
pub mod model;
pub mod npy;
pub mod shards;
pub mod stream;

/// Cores this process may use (1 when unknown): the one place that asks.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
