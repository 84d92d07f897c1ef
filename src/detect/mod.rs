//! The OLE method and its baselines: pure math on embeddings, no I/O beyond the bank file.

pub mod prototypes;
pub mod pyrandom;
pub mod score;
