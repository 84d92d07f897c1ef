//! Decision thresholds from held-out ID scores (docs/method.md §8 "Decision", §10).
//!
//! Decision rule: an image is **OOD iff S < λ**, so an ID image passes iff S ≥ λ.

use crate::detect::adaptive::{AdaptiveCalibration, FloorCalibration};
use ndarray::{Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use super::metrics::{MetricError, check_scores};

/// A calibrated threshold and what it achieves on the calibration set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TprThreshold {
    /// λ: OOD iff S < λ. Always one of the calibration scores.
    pub threshold: f64,
    /// The TPR that was asked for.
    pub target_tpr: f64,
    /// #{S ≥ λ} / n on the calibration set (≥ `target_tpr`; larger only through ties at λ).
    pub achieved_tpr: f64,
    /// #{S ≥ λ}.
    pub n_pass: usize,
    /// Number of calibration scores.
    pub n: usize,
}

/// The largest threshold λ that keeps at least a fraction `tpr` of the ID scores (S ≥ λ).
///
/// Precisely: let `k` be the smallest integer with `k / n ≥ tpr` (evaluated in f64, the same
/// way `achieved_tpr` is), and s₍₁₎ ≤ … ≤ s₍ₙ₎ the sorted scores; then λ = s₍ₙ₋ₖ₊₁₎, the k-th
/// largest score. Hence #{S ≥ λ} ≥ k, and any λ' > λ keeps at most k − 1 scores (< tpr).
/// With `tpr = 0.95` this is the ID 5th percentile of docs/method.md §8 (for n = 20: the 2nd smallest
/// score).
///
/// Errors: empty set, a NaN score, or `tpr` outside (0, 1].
pub fn threshold_for_tpr(id_scores: &[f64], tpr: f64) -> Result<TprThreshold, MetricError> {
    check_scores("ID", id_scores)?;
    if !(tpr > 0.0 && tpr <= 1.0) {
        return Err(MetricError::InvalidTpr {
            tpr,
            range: "(0, 1]",
        });
    }
    let n = id_scores.len();
    let nf = n as f64;
    // Smallest k in 1..=n with k/n ≥ tpr, robust to rounding of tpr·n.
    let mut k = ((tpr * nf).ceil() as usize).clamp(1, n);
    while k > 1 && (k - 1) as f64 / nf >= tpr {
        k -= 1;
    }
    while k < n && (k as f64) / nf < tpr {
        k += 1;
    }
    let mut sorted = id_scores.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let threshold = sorted[n - k];
    let n_pass = id_scores.iter().filter(|&&s| s >= threshold).count();
    Ok(TprThreshold {
        threshold,
        target_tpr: tpr,
        achieved_tpr: n_pass as f64 / nf,
        n_pass,
        n,
    })
}

/// The adaptive detector's thresholds from the same ID scores (docs/adaptive.md §2):
/// `admit_below` = the score keeping 1 − q_out of them (Q_ID(q_out)), `max_penalty` = the
/// threshold at TPR `tpr − epsilon` minus the one at `tpr` (Q_ID(q0 + ε) − Q_ID(q0)).
pub fn adaptive_calibration(
    id_scores: &[f64],
    tpr: f64,
    q_out: f64,
    epsilon: f64,
) -> Result<AdaptiveCalibration, MetricError> {
    let lambda = threshold_for_tpr(id_scores, tpr)?.threshold;
    let admit_below = threshold_for_tpr(id_scores, 1.0 - q_out)?.threshold;
    let upper = threshold_for_tpr(id_scores, tpr - epsilon)?.threshold;
    Ok(AdaptiveCalibration {
        admit_below,
        max_penalty: (upper - lambda).max(0.0),
        q_out,
        epsilon,
        floor: None,
    })
}

/// Why no floor could be chosen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FloorError {
    #[error(
        "the adaptive floor needs more than k = {k} ID inputs (one's k-th nearest neighbour among the others), got {n}"
    )]
    TooFew { n: usize, k: usize },
    #[error("the adaptive floor quantile {0} is outside (0, 1)")]
    Quantile(f64),
    #[error("ID embedding #{0} is zero or not finite")]
    BadRow(usize),
}

/// The adaptive floor b from ID embeddings (docs/adaptive.md §2, [`FloorCalibration`]): an
/// evenly spaced sample of at most `sample` rows (the memory's size), each row's k-th largest
/// cosine to the other sampled rows, and of those the value at `quantile` (the
/// ⌈quantile·n⌉-th smallest).
pub fn adaptive_floor(
    emb: ArrayView2<f32>,
    k: usize,
    quantile: f64,
    sample: usize,
) -> Result<FloorCalibration, FloorError> {
    if !(quantile > 0.0 && quantile < 1.0) {
        return Err(FloorError::Quantile(quantile));
    }
    let total = emb.nrows();
    let n = total.min(sample.max(1));
    if k == 0 || n <= k {
        return Err(FloorError::TooFew { n, k });
    }
    // Row i·total/n for i < n: spread over the whole input, whatever order it came in.
    let mut x = Array2::<f32>::zeros((n, emb.ncols()));
    for (i, mut row) in x.axis_iter_mut(Axis(0)).enumerate() {
        let src = emb.row(i * total / n);
        let norm = src.dot(&src).sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            return Err(FloorError::BadRow(i * total / n));
        }
        row.assign(&src.mapv(|v| v / norm));
    }
    let gram = x.dot(&x.t());
    let mut kth: Vec<f64> = gram
        .axis_iter(Axis(0))
        .enumerate()
        .map(|(i, row)| {
            let mut others: Vec<f32> = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, &c)| c)
                .collect();
            // The k-th largest: index k − 1 of the descending order.
            let (_, v, _) = others.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            f64::from(*v)
        })
        .collect();
    kth.sort_unstable_by(f64::total_cmp);
    let at = ((quantile * n as f64).ceil() as usize).clamp(1, n) - 1;
    Ok(FloorCalibration {
        value: kth[at],
        quantile,
        k,
        n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 scores 0.00, 0.01, …, 0.99: TPR 0.95 keeps the 95 largest (λ = 0.05), 0.99 keeps 99
    /// (admit below 0.01), 0.92 keeps 92 (0.08), so the largest penalty is 0.08 − 0.05.
    /// Five unit vectors in the plane at 0°, 10°, 20°, 30° and 90°, k = 2: the 2nd largest
    /// cosine to the others is cos 20° for 0° (10°, 20°), cos 10° for 10° (0°, 20° tie at 10°,
    /// both count), cos 10° for 20°, cos 20° for 30°, cos 70° for 90° (30°, then 20°).
    /// Sorted: cos 70°, cos 20°, cos 20°, cos 10°, cos 10°; quantile 0.5 takes the 3rd
    /// (⌈2.5⌉), 0.9 the 5th. Scaling a row changes nothing; a sample of 3 takes rows 0, 1, 3.
    #[test]
    fn adaptive_floor_by_hand() {
        let deg = [0.0f64, 10.0, 20.0, 30.0, 90.0];
        let mut x = Array2::<f32>::zeros((5, 2));
        for (i, d) in deg.iter().enumerate() {
            let scale = (i + 1) as f64;
            x[[i, 0]] = (scale * d.to_radians().cos()) as f32;
            x[[i, 1]] = (scale * d.to_radians().sin()) as f32;
        }
        let cos = |d: f64| d.to_radians().cos();
        let f = adaptive_floor(x.view(), 2, 0.5, 100).unwrap();
        assert_eq!((f.k, f.n, f.quantile), (2, 5, 0.5));
        assert!((f.value - cos(20.0)).abs() < 1e-6, "{f:?}");
        let f = adaptive_floor(x.view(), 2, 0.9, 100).unwrap();
        assert!((f.value - cos(10.0)).abs() < 1e-6, "{f:?}");
        let f = adaptive_floor(x.view(), 1, 0.5, 100).unwrap();
        // 1st largest: 10°, 10°, 10°, 10°, 60° -> sorted cos 60°, cos 10° x4; the 3rd.
        assert!((f.value - cos(10.0)).abs() < 1e-6, "{f:?}");
        // Sample of 3: rows 0, 1, 3 (0°, 10°, 30°); k = 1: cos 10°, cos 10°, cos 20°.
        let f = adaptive_floor(x.view(), 1, 0.34, 3).unwrap();
        assert_eq!(f.n, 3);
        assert!((f.value - cos(10.0)).abs() < 1e-6, "{f:?}");
        let f = adaptive_floor(x.view(), 1, 0.99, 3).unwrap();
        assert!((f.value - cos(10.0)).abs() < 1e-6, "{f:?}");
        assert_eq!(
            adaptive_floor(x.view(), 5, 0.5, 100),
            Err(FloorError::TooFew { n: 5, k: 5 })
        );
        assert_eq!(
            adaptive_floor(x.view(), 2, 1.0, 100),
            Err(FloorError::Quantile(1.0))
        );
        x.row_mut(3).fill(0.0);
        assert_eq!(
            adaptive_floor(x.view(), 2, 0.5, 100),
            Err(FloorError::BadRow(3))
        );
    }

    #[test]
    fn adaptive_thresholds_by_hand() {
        let s: Vec<f64> = (0..100).map(|i| f64::from(i) / 100.0).collect();
        let c = adaptive_calibration(&s, 0.95, 0.01, 0.03).unwrap();
        assert_eq!(c.admit_below, 0.01);
        assert!((c.max_penalty - 0.03).abs() < 1e-12, "{c:?}");
        assert!(adaptive_calibration(&s, 0.95, 1.5, 0.03).is_err());
    }

    /// The next distinct score above λ, if any.
    fn next_above(scores: &[f64], lambda: f64) -> Option<f64> {
        scores
            .iter()
            .copied()
            .filter(|&s| s > lambda)
            .min_by(f64::total_cmp)
    }

    fn pass_rate(scores: &[f64], lambda: f64) -> f64 {
        scores.iter().filter(|&&s| s >= lambda).count() as f64 / scores.len() as f64
    }

    fn check_maximal(scores: &[f64], tpr: f64) -> TprThreshold {
        let t = threshold_for_tpr(scores, tpr).unwrap();
        assert!(t.achieved_tpr >= tpr, "{t:?}");
        assert_eq!(t.achieved_tpr, pass_rate(scores, t.threshold));
        assert!(scores.contains(&t.threshold));
        if let Some(next) = next_above(scores, t.threshold) {
            assert!(
                pass_rate(scores, next) < tpr,
                "{t:?}: raising λ to {next} still passes"
            );
        }
        t
    }

    #[test]
    fn fifth_percentile_of_twenty() {
        let scores: Vec<f64> = (1..=20).map(f64::from).collect();
        let t = check_maximal(&scores, 0.95);
        assert_eq!(t.threshold, 2.0);
        assert_eq!((t.n_pass, t.n), (19, 20));
        assert_eq!(t.achieved_tpr, 0.95);
        assert_eq!(check_maximal(&scores, 1.0).threshold, 1.0);
        assert_eq!(check_maximal(&scores, 0.05).threshold, 20.0);
        assert_eq!(check_maximal(&scores, 0.051).threshold, 19.0);
    }

    #[test]
    fn ties_at_the_threshold() {
        let scores = [0.1, 0.5, 0.5, 0.5, 0.9];
        let t = check_maximal(&scores, 0.8);
        assert_eq!(t.threshold, 0.5);
        assert_eq!(t.achieved_tpr, 0.8);
        let t = check_maximal(&scores, 0.3);
        assert_eq!(t.threshold, 0.5);
        assert_eq!(t.achieved_tpr, 0.8); // ties make it exceed the target
        let all = [0.7; 6];
        let t = check_maximal(&all, 0.5);
        assert_eq!((t.threshold, t.achieved_tpr), (0.7, 1.0));
    }

    #[test]
    fn maximal_on_many_sets() {
        // Deterministic pseudo-random sets with and without ties.
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for n in [1usize, 2, 3, 7, 19, 20, 21, 100, 1000, 1001] {
            for levels in [3u64, 1 << 40] {
                let scores: Vec<f64> = (0..n).map(|_| (next() % levels) as f64 / 7.0).collect();
                for tpr in [0.01, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
                    check_maximal(&scores, tpr);
                }
            }
        }
    }

    #[test]
    fn errors() {
        assert_eq!(
            threshold_for_tpr(&[], 0.95),
            Err(MetricError::Empty { which: "ID" })
        );
        assert!(matches!(
            threshold_for_tpr(&[0.1, f64::NAN], 0.95),
            Err(MetricError::NaN { index: 1, .. })
        ));
        for bad in [0.0, -0.5, 1.01, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                threshold_for_tpr(&[0.1, 0.2], bad),
                Err(MetricError::InvalidTpr { .. })
            ));
        }
    }
}
