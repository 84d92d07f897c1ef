//! Approximate scoring of outlier banks too large for an exact GEMM per batch (HNSW head plus a
//! sampled tail); its own file so that the exact scorer stays free of the index.

use std::sync::Arc;

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use super::cosine::cosines;
use super::index::VectorIndex;
use super::kernels::{Kernel, argmax, contiguous};
use super::method::{Method, ScoreError, ScoreParams, ScoreRow};
use super::neglabel::NegGrouping;
use super::rng::uniform_sample;

/// When and how outlier banks are scored approximately.
///
/// docs/method.md §8 forbids truncating the softmax denominator to an ANN top-k: at s = 50 the many
/// rows just below the best one still carry much of the mass. So beyond
/// [`ApproxParams::exact_limit`] outlier rows, the outlier part of the denominator
/// Σ_k e^{l_k − m} is split in two:
///
/// - **head** H: the `candidates` outlier rows the HNSW index returns for the image, summed
///   exactly;
/// - **tail**: every other row, estimated from a fixed, seeded uniform sample S of the outlier
///   rows as `(M − |H|) / |S∖H| · Σ_{j ∈ S∖H} e^{l_j − m}`.
///
/// This is the top-k-plus-sampled-tail estimator of a partition function (Mussmann & Ermon,
/// "Learning and Inference via Maximum Inner Product Search", ICML 2016). Given H, S∖H is a
/// uniform sample of the rows outside H, so the tail estimate is unbiased; the ID rows T (the
/// numerator) and T̄ stay exact. Within the limit, scoring is exact.
///
/// Measured on 2 cores (benches/approx.rs, 1,000 ID + 100,000 clustered outlier rows, D = 512):
/// exact 2.0 ms per image; approximate 1.0 / 1.7 / 2.8 ms with a head of 64 / 128 / 256 rows.
/// The default head is 256 because on clustered banks smaller heads miss part of the nearest
/// cluster and the estimate's spread grows (the unit test's p95 relative error: 0.52 at 64,
/// 0.12 at 128, 0.01 at 256).
///
/// Only the outlier-based scores use it (`ole`, `ole-max`, `ole-penalty`); `neglabel` groups
/// its negatives and is always exact.
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

/// What the approximate path reads of the exact scorer's stacked bank.
pub(crate) struct IdRows<'a> {
    /// `[T̄; T]` when the method uses T̄ (`uses_no`), else `T`; unit rows.
    pub w: ArrayView2<'a, f32>,
    /// C, the ID rows.
    pub n_id: usize,
    /// Whether `w` starts with the C rows of T̄.
    pub uses_no: bool,
    /// M, the outlier rows the head and tail stand for.
    pub n_out: usize,
    /// The NegLabel grouping (unused: NegLabel is always exact).
    pub grouping: &'a NegGrouping,
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

    /// The scores of a batch with the outlier rows replaced by the head and the sampled tail
    /// (inputs already checked; never called for NegLabel). `rows` are the scorer's ID rows.
    pub(crate) fn score(
        &self,
        rows: IdRows<'_>,
        x: ArrayView2<'_, f32>,
        method: Method,
        params: &ScoreParams,
        want_outliers: bool,
        mut sink: impl FnMut(ScoreRow),
    ) {
        let IdRows {
            w,
            n_id,
            uses_no,
            n_out,
            grouping,
        } = rows;
        let scores_out = method.uses_outliers();
        let id_lo = if uses_no { n_id } else { 0 };
        let cos = cosines(x, w);
        // Cosines to the tail sample: a second, small GEMM.
        let n_sample = if scores_out { self.sample_ids.len() } else { 0 };
        let sample_cos = if n_sample > 0 {
            cosines(x, self.sample_rows.view())
        } else {
            Array2::zeros((x.nrows(), 0))
        };
        let scale = f64::from(params.scale);
        let beta = f64::from(params.penalty_beta);
        let k_head = self.params.candidates;
        let ef = self.params.ef_search.max(k_head);
        let mut buf = vec![0.0f64; n_id.max(k_head).max(n_sample)];
        let (mut head_ids, mut head_cos, mut tail) = (Vec::new(), Vec::new(), Vec::new());
        // The heads of the whole batch, searched in parallel (the HNSW walk dominates).
        let heads = if scores_out || want_outliers {
            self.index.search_batch(x, k_head, ef)
        } else {
            vec![Vec::new(); x.nrows()]
        };
        let mut owned: Vec<f32> = Vec::new();
        for ((r, row), head) in cos.rows().into_iter().enumerate().zip(heads) {
            let row = contiguous(row, &mut owned);
            let idc = &row[id_lo..id_lo + n_id];
            let noc = if uses_no { &row[..n_id] } else { &[][..] };
            let (top_id, top_id_cos) = argmax(idc);
            head_cos.clear();
            head_cos.extend(head.iter().map(|h| h.1));
            tail.clear();
            let mut tail_weight = 0.0;
            if scores_out {
                head_ids.clear();
                head_ids.extend(head.iter().map(|h| h.0));
                head_ids.sort_unstable();
                for (j, id) in self.sample_ids.iter().enumerate() {
                    if head_ids.binary_search(id).is_err() {
                        tail.push(sample_cos[[r, j]]);
                    }
                }
                if !tail.is_empty() {
                    tail_weight = (n_out - head.len()) as f64 / tail.len() as f64;
                }
            }
            let top_out = head.first().copied();
            let k = Kernel {
                id: idc,
                no: noc,
                out: &head_cos,
                tail: &tail,
                tail_weight,
                top_id,
                id_max: top_id_cos,
                out_max: top_out.map(|t| t.1),
                scale,
            };
            sink(k.score_row(method, beta, grouping, &mut buf, top_out.map(|t| t.0)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
