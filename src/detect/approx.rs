//! Approximate OLE scoring for outlier banks too large for an exact GEMM per batch.
//!
//! method.md §8 forbids truncating the softmax denominator to an ANN top-k: at s = 50 the many
//! rows just below the best one still carry much of the mass. So beyond
//! [`ApproxParams::exact_limit`] outlier rows, the outlier part of the denominator
//! Σ_k e^{l_k − m} is split in two:
//!
//! - **head** H: the `candidates` outlier rows the HNSW index returns for the image, summed
//!   exactly;
//! - **tail**: every other row, estimated from a fixed, seeded uniform sample S of the outlier
//!   rows as `(M − |H|) / |S∖H| · Σ_{j ∈ S∖H} e^{l_j − m}`.
//!
//! This is the top-k-plus-sampled-tail estimator of a partition function (Mussmann & Ermon,
//! "Learning and Inference via Maximum Inner Product Search", ICML 2016). Given H, S∖H is a
//! uniform sample of the rows outside H, so the tail estimate is unbiased; the ID rows T (the
//! numerator) and T̄ stay exact. Within the limit, scoring is exact.
//!
//! Measured on 2 cores (benches/approx.rs, 1,000 ID + 100,000 clustered outlier rows, D = 512):
//! exact 2.0 ms per image; approximate 1.0 / 1.7 / 2.8 ms with a head of 64 / 128 / 256 rows.
//! The default head is 256 because on clustered banks smaller heads miss part of the nearest
//! cluster and the estimate's spread grows (the unit test's p95 relative error: 0.52 at 64,
//! 0.12 at 128, 0.01 at 256).
//!
//! Only the outlier-based scores use it (`ole`, `ole-max`, `ole-penalty`); `neglabel` groups
//! its negatives and is always exact.

use std::sync::Arc;

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use super::index::VectorIndex;
use super::score::{ScoreError, SplitMix64};

/// When and how outlier banks are scored approximately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApproxParams {
    /// Banks with more outlier rows than this are scored approximately; within it, exactly.
    pub exact_limit: usize,
    /// Head size K: outlier rows per image taken from the HNSW index and summed exactly.
    pub candidates: usize,
    /// HNSW search breadth for the head (at least `candidates`).
    pub ef_search: usize,
    /// Size of the fixed uniform sample that estimates the tail.
    pub tail_sample: usize,
    /// Seed of the tail sample.
    pub seed: u64,
}

impl Default for ApproxParams {
    fn default() -> Self {
        ApproxParams {
            // Measured (benches/approx.rs, 2 cores): exact costs ~16 µs per 1,000 outlier rows
            // per image, linear in the rows (1.65 ms at 100,000); the approximate path with a
            // 256-row head costs ~3.2 ms per image at 100,000 rows and grows only with the
            // HNSW depth. The crossover lies near 200,000 rows.
            exact_limit: 200_000,
            candidates: 256,
            ef_search: 256,
            tail_sample: 4096,
            seed: 0,
        }
    }
}

impl ApproxParams {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), ScoreError> {
        let bad = |name, value: usize, reason| {
            Err(ScoreError::InvalidParam {
                name,
                value: value.to_string(),
                reason,
            })
        };
        if self.candidates == 0 {
            return bad("approx.candidates", 0, "must be >= 1");
        }
        if self.tail_sample == 0 {
            return bad(
                "approx.tail_sample",
                0,
                "must be >= 1 (the tail of the denominator is never dropped)",
            );
        }
        Ok(())
    }

    /// Whether a bank with `n_outliers` outlier rows is scored approximately.
    pub fn applies_to(&self, n_outliers: usize) -> bool {
        n_outliers > self.exact_limit
    }
}

/// The state of approximate scoring: the outlier index and the tail sample.
#[derive(Clone)]
pub(crate) struct Approx {
    pub index: Arc<VectorIndex>,
    pub params: ApproxParams,
    /// Sorted outlier row ids of the tail sample S.
    pub sample_ids: Vec<usize>,
    /// Those rows, contiguous, for one GEMM per batch.
    pub sample_rows: Array2<f32>,
}

impl std::fmt::Debug for Approx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approx")
            .field("params", &self.params)
            .field("index_rows", &self.index.len())
            .field("sample", &self.sample_ids.len())
            .finish()
    }
}

impl Approx {
    /// `outliers` are the scorer's normalised outlier rows; `index` must index exactly them.
    pub fn new(
        outliers: ArrayView2<'_, f32>,
        index: Arc<VectorIndex>,
        params: ApproxParams,
    ) -> Result<Approx, ScoreError> {
        params.validate()?;
        if index.len() != outliers.nrows() {
            return Err(ScoreError::ShapeMismatch {
                what: "HNSW index rows (must equal the outlier rows)",
                expected: outliers.nrows(),
                got: index.len(),
            });
        }
        let sample_ids = uniform_sample(outliers.nrows(), params.tail_sample, params.seed);
        let mut sample_rows = Array2::<f32>::zeros((sample_ids.len(), outliers.ncols()));
        for (mut dst, &i) in sample_rows.rows_mut().into_iter().zip(&sample_ids) {
            dst.assign(&outliers.row(i));
        }
        Ok(Approx {
            index,
            params,
            sample_ids,
            sample_rows,
        })
    }
}

/// `min(k, n)` distinct indices of `0..n`, uniformly at random (seeded partial Fisher–Yates
/// with SplitMix64, portable across releases), sorted.
pub fn uniform_sample(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let k = k.min(n);
    let mut rng = SplitMix64(seed);
    // Sparse Fisher–Yates: only the touched positions are stored, so a sample of 4,096 from
    // 10⁶ rows costs 4,096 steps, not an array of 10⁶ indices.
    let mut moved = std::collections::HashMap::<usize, usize>::with_capacity(2 * k);
    let mut out = Vec::with_capacity(k);
    for i in 0..k {
        let j = i + rng.below(n - i);
        let vj = *moved.get(&j).unwrap_or(&j);
        let vi = *moved.get(&i).unwrap_or(&i);
        moved.insert(j, vi);
        out.push(vj);
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_distinct_sorted_seeded_and_complete_when_k_ge_n() {
        let s = uniform_sample(1000, 100, 7);
        assert_eq!(s.len(), 100);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(s.iter().all(|&i| i < 1000));
        assert_eq!(s, uniform_sample(1000, 100, 7));
        assert_ne!(s, uniform_sample(1000, 100, 8));
        assert_eq!(uniform_sample(5, 10, 1), vec![0, 1, 2, 3, 4]);
        // Roughly uniform: the mean index of a large sample is near n/2.
        let big = uniform_sample(100_000, 20_000, 3);
        let mean = big.iter().sum::<usize>() as f64 / big.len() as f64;
        assert!((mean - 50_000.0).abs() < 1_500.0, "{mean}");
    }

    #[test]
    fn parameters_are_validated() {
        let p = ApproxParams {
            tail_sample: 0,
            ..ApproxParams::default()
        };
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("never dropped")
        );
        assert!(ApproxParams::default().applies_to(200_001));
        assert!(!ApproxParams::default().applies_to(200_000));
    }
}
