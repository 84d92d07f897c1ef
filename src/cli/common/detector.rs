//! Detector flags shared by `score`, `eval` and `calibrate`, and bank loading.

use std::path::Path;

use anyhow::Context;
use oodgate::detect::approx::ApproxParams;
use oodgate::detect::bank::Bank;
use oodgate::detect::detector::{DetectorSpec, ThresholdChoice};
use oodgate::detect::method::Method;

pub fn load_bank(path: &Path) -> anyhow::Result<Bank> {
    Bank::load(path).with_context(|| format!("loading bank {}", path.display()))
}

/// Approximate scoring of large outlier banks (the `detector.exact_limit` family of keys).
#[derive(Debug, Clone, clap::Args)]
pub struct ApproxArgs {
    /// Banks with more outlier rows than this are scored approximately: an HNSW head summed
    /// exactly plus a sampled estimate of the rest of the softmax denominator.
    #[arg(long, default_value_t = ApproxParams::default().exact_limit)]
    pub exact_limit: usize,
    /// Approximate scoring: outlier rows per image taken from HNSW.
    #[arg(long, default_value_t = ApproxParams::default().candidates)]
    pub approx_candidates: usize,
    /// Approximate scoring: HNSW search breadth.
    #[arg(long, default_value_t = ApproxParams::default().ef_search)]
    pub approx_ef_search: usize,
    /// Approximate scoring: size of the uniform sample that estimates the tail.
    #[arg(long, default_value_t = ApproxParams::default().tail_sample)]
    pub approx_tail_sample: usize,
}

impl ApproxArgs {
    pub fn params(&self) -> ApproxParams {
        ApproxParams {
            exact_limit: self.exact_limit,
            candidates: self.approx_candidates,
            ef_search: self.approx_ef_search,
            tail_sample: self.approx_tail_sample,
            seed: 0,
        }
    }
}

/// A detector spec for scores only (`eval`, `calibrate`): no threshold, no explanations.
pub fn scoring_spec(method: Method, scale: Option<f32>, approx: &ApproxArgs) -> DetectorSpec {
    DetectorSpec {
        method,
        scale,
        threshold: ThresholdChoice::None,
        top_k: 0,
        approx: approx.params(),
    }
}
