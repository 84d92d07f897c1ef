//! Detector flags shared by `score`, `filter`, `eval` and `calibrate`, and bank loading.

use std::path::Path;

use anyhow::Context;
use oodgate::detect::adaptive::{AdaptiveMemory, AdaptiveParams};
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

/// The adaptive detector's memory (docs/adaptive.md), for the offline commands; its
/// thresholds come from the bank's calibration of the method (`calibrate --write`).
#[derive(Debug, Clone, clap::Args)]
pub struct AdaptiveArgs {
    /// Also score with the adaptive detector: the inputs are processed as one stream, each
    /// seeing the confident-OOD images admitted before it.
    #[arg(long)]
    pub adaptive: bool,
    /// Adaptive: memory entries at most.
    #[arg(long, default_value_t = AdaptiveParams::default().capacity)]
    pub adaptive_capacity: usize,
    /// Adaptive: k of the k-th largest cosine to the memory.
    #[arg(long, default_value_t = AdaptiveParams::default().k)]
    pub adaptive_k: usize,
    /// Adaptive: cosines at or below this floor add no penalty [default: the floor the bank's
    /// calibration chose from ID inputs, else 0.75].
    #[arg(long)]
    pub adaptive_floor: Option<f32>,
    /// Adaptive: entries per predicted ID class at most.
    #[arg(long, default_value_t = AdaptiveParams::default().bucket_cap)]
    pub adaptive_bucket_cap: usize,
    /// Adaptive: admissions per 1,000 consecutive inputs at most.
    #[arg(long, default_value_t = AdaptiveParams::default().admit_per_mille)]
    pub adaptive_admit_per_mille: usize,
}

impl AdaptiveArgs {
    pub fn params(&self) -> AdaptiveParams {
        AdaptiveParams {
            capacity: self.adaptive_capacity,
            k: self.adaptive_k,
            floor: self
                .adaptive_floor
                .unwrap_or(oodgate::detect::adaptive::FALLBACK_FLOOR),
            bucket_cap: self.adaptive_bucket_cap,
            admit_per_mille: self.adaptive_admit_per_mille,
            // Offline inputs carry no producer time.
            max_age_ms: 0,
        }
    }

    /// A fresh memory for `method` on `bank`, with the bank's calibration of the method.
    pub fn memory(&self, bank: &Bank, method: Method) -> anyhow::Result<AdaptiveMemory> {
        let calib = bank
            .meta
            .thresholds
            .get(method.as_str())
            .and_then(|t| t.adaptive)
            .with_context(|| {
                format!(
                    "the bank has no adaptive calibration for method {method}: run\n  oodgate \
                     calibrate --bank BANK --method {method} --id ID_INPUTS... --write\non \
                     held-out ID inputs (it stores the admission threshold and the largest \
                     penalty beside the threshold)"
                )
            })?;
        let params = AdaptiveParams {
            floor: calib.resolve_floor(self.adaptive_floor),
            ..self.params()
        };
        Ok(AdaptiveMemory::new(params, calib, bank.meta.dim)?)
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

/// The flags of a command that decides (`score`, `filter`): method, threshold, scale,
/// explanations and approximate scoring.
#[derive(Debug, Clone, clap::Args)]
pub struct DecisionArgs {
    /// Score method: ole, ole-max, ole-penalty, clipn-atd, clipn-ctw, mcm, energy, max-logit,
    /// neglabel.
    #[arg(long, default_value = "ole")]
    pub method: Method,
    /// Decision threshold: OOD iff score < X (default: the bank's calibrated threshold).
    #[arg(long, allow_negative_numbers = true)]
    pub threshold: Option<f64>,
    /// Logit scale s = 1/T (default: the bank's, else the method's, e.g. 50 for ole).
    #[arg(long)]
    pub scale: Option<f32>,
    /// Nearest ID labels and outlier words reported per input (0 = none).
    #[arg(long, default_value_t = 3)]
    pub top_k: usize,
    #[command(flatten)]
    pub approx: ApproxArgs,
}

impl DecisionArgs {
    pub fn spec(&self) -> DetectorSpec {
        DetectorSpec {
            method: self.method,
            scale: self.scale,
            threshold: self
                .threshold
                .map_or(ThresholdChoice::FromBank, ThresholdChoice::Given),
            top_k: self.top_k,
            approx: self.approx.params(),
        }
    }
}
