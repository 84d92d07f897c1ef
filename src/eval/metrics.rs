//! AUROC, FPR at a TPR, AUPR-In/Out (docs/method.md §10).
//!
//! ID is the positive class and a higher score means ID. Everything is computed in f64 from one
//! sort of the pooled scores with tied scores grouped (O(n log n)). Metrics are fractions in
//! [0, 1]; multiply by 100 for reports. A NaN score is an error; ±∞ are ordinary scores.
//! `-0.0` and `0.0` are the same score.
//!
//! Reference values for the tests come from scikit-learn / scipy
//! (`tests/fixtures/metrics/make_cases.py`).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors from the metric and calibration functions.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MetricError {
    /// A score set is empty.
    #[error("the {which} score set is empty")]
    Empty { which: &'static str },
    /// A score is NaN.
    #[error("{which} score #{index} is NaN (a NaN score is an error)")]
    NaN { which: &'static str, index: usize },
    /// A target TPR is out of range.
    #[error("target TPR {tpr} is outside {range}")]
    InvalidTpr { tpr: f64, range: &'static str },
}

/// The headline metrics of one ID-vs-OOD evaluation (fractions, not percent).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// P(S_ID > S_OOD) + ½·P(S_ID = S_OOD).
    pub auroc: f64,
    /// FPR at TPR = 0.95 by the §10 linear interpolation.
    pub fpr95: f64,
    /// Average precision with ID positive and score S.
    pub aupr_in: f64,
    /// Average precision with OOD positive and score −S.
    pub aupr_out: f64,
    /// Number of ID scores (AUPR depends on the ID:OOD ratio).
    pub n_id: usize,
    /// Number of OOD scores.
    pub n_ood: usize,
}

/// Reject empty sets and NaN scores.
pub(crate) fn check_scores(which: &'static str, scores: &[f64]) -> Result<(), MetricError> {
    if scores.is_empty() {
        return Err(MetricError::Empty { which });
    }
    match scores.iter().position(|v| v.is_nan()) {
        Some(index) => Err(MetricError::NaN { which, index }),
        None => Ok(()),
    }
}

/// One distinct score with how many positives (`pos`) and negatives (`neg`) have it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Group {
    score: f64,
    pos: u64,
    neg: u64,
}

/// Distinct scores in descending order with their counts. Inputs are checked (non-empty,
/// no NaN) by the caller.
fn groups_desc(pos: &[f64], neg: &[f64]) -> Vec<Group> {
    // `+ 0.0` maps −0.0 to +0.0 so that `total_cmp` groups them.
    let mut all: Vec<(f64, bool)> = pos
        .iter()
        .map(|&s| (s + 0.0, true))
        .chain(neg.iter().map(|&s| (s + 0.0, false)))
        .collect();
    all.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let mut out: Vec<Group> = Vec::new();
    for (score, is_pos) in all {
        let same = out
            .last()
            .is_some_and(|g| g.score.total_cmp(&score) == Ordering::Equal);
        if !same {
            out.push(Group {
                score,
                pos: 0,
                neg: 0,
            });
        }
        if let Some(g) = out.last_mut() {
            if is_pos {
                g.pos += 1;
            } else {
                g.neg += 1;
            }
        }
    }
    out
}

fn auroc_from_groups(groups: &[Group], n_pos: u64, n_neg: u64) -> f64 {
    // 2·U in exact integers: each positive beats the negatives strictly below it and ties ½.
    let mut neg_above: u64 = 0;
    let mut twice_u: u128 = 0;
    for g in groups {
        let below = n_neg - neg_above - g.neg;
        twice_u +=
            2 * u128::from(g.pos) * u128::from(below) + u128::from(g.pos) * u128::from(g.neg);
        neg_above += g.neg;
    }
    twice_u as f64 / (2.0 * n_pos as f64 * n_neg as f64)
}

/// Average precision Σ (R_n − R_{n−1})·P_n over the groups in the given order (descending
/// thresholds for the positive class).
fn ap_from_groups<'a>(
    groups: impl Iterator<Item = &'a Group>,
    pos_of: impl Fn(&Group) -> u64,
    neg_of: impl Fn(&Group) -> u64,
    n_pos: u64,
) -> f64 {
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut prev_recall = 0.0f64;
    let mut ap = 0.0f64;
    for g in groups {
        tp += pos_of(g);
        fp += neg_of(g);
        if pos_of(g) == 0 {
            continue; // ΔR = 0
        }
        let recall = tp as f64 / n_pos as f64;
        let precision = tp as f64 / (tp + fp) as f64;
        ap += (recall - prev_recall) * precision;
        prev_recall = recall;
    }
    ap
}

fn roc_from_groups(groups: &[Group], n_pos: u64, n_neg: u64) -> Vec<(f64, f64, f64)> {
    let mut out = Vec::with_capacity(groups.len() + 1);
    out.push((0.0, 0.0, f64::INFINITY));
    let (mut tp, mut fp) = (0u64, 0u64);
    for g in groups {
        tp += g.pos;
        fp += g.neg;
        out.push((fp as f64 / n_neg as f64, tp as f64 / n_pos as f64, g.score));
    }
    out
}

fn check_tpr(tpr: f64) -> Result<(), MetricError> {
    if (0.0..=1.0).contains(&tpr) {
        Ok(())
    } else {
        Err(MetricError::InvalidTpr {
            tpr,
            range: "[0, 1]",
        })
    }
}

/// docs/method.md §10: i = first index with TPR_i ≥ t; exact hit → FPR_i (the smallest FPR at
/// that TPR); otherwise linear interpolation between points i−1 and i.
fn fpr_at_tpr_from_roc(roc: &[(f64, f64, f64)], target: f64) -> f64 {
    let Some(i) = roc.iter().position(|&(_, tpr, _)| tpr >= target) else {
        // Unreachable: the last point has TPR = 1 ≥ target.
        return 1.0;
    };
    let (fpr_i, tpr_i, _) = roc[i];
    if i == 0 || tpr_i == target {
        return fpr_i;
    }
    let (fpr_p, tpr_p, _) = roc[i - 1];
    fpr_p + (fpr_i - fpr_p) * (target - tpr_p) / (tpr_i - tpr_p)
}

/// AUROC = P(S_ID > S_OOD) + ½·P(S_ID = S_OOD) (Mann–Whitney; equals the trapezoidal area
/// under the ROC with tied scores grouped, i.e. sklearn's `roc_auc_score`).
pub fn auroc(id: &[f64], ood: &[f64]) -> Result<f64, MetricError> {
    check_scores("ID", id)?;
    check_scores("OOD", ood)?;
    let groups = groups_desc(id, ood);
    Ok(auroc_from_groups(
        &groups,
        id.len() as u64,
        ood.len() as u64,
    ))
}

/// ROC points `(fpr, tpr, threshold)`: `(0, 0, +∞)` first, then one point per distinct score
/// τ₁ > τ₂ > … with TPR_i = #{ID ≥ τ_i}/n_ID and FPR_i = #{OOD ≥ τ_i}/n_OOD; the last point is
/// (1, 1). Same as sklearn `roc_curve(..., drop_intermediate=False)`.
pub fn roc_curve(id: &[f64], ood: &[f64]) -> Result<Vec<(f64, f64, f64)>, MetricError> {
    check_scores("ID", id)?;
    check_scores("OOD", ood)?;
    let groups = groups_desc(id, ood);
    Ok(roc_from_groups(&groups, id.len() as u64, ood.len() as u64))
}

/// FPR at the given TPR (e.g. 0.95 for FPR95) by the linear interpolation of docs/method.md §10:
/// with i the first ROC index whose TPR_i ≥ `tpr`,
/// `FPR_{i−1} + (FPR_i − FPR_{i−1})·(tpr − TPR_{i−1})/(TPR_i − TPR_{i−1})`; an exact hit
/// returns FPR_i, the smallest FPR at that TPR.
///
/// This is scipy's `interp1d(tpr, fpr)` on its own `searchsorted` code path. Recent scipy
/// delegates 1-D float64 input to `numpy.interp`, which on an exact hit returns the *largest*
/// FPR at that TPR instead; the two differ only at exact hits (see the fixture's
/// `fpr_at_np_interp`).
pub fn fpr_at_tpr(id: &[f64], ood: &[f64], tpr: f64) -> Result<f64, MetricError> {
    check_tpr(tpr)?;
    let roc = roc_curve(id, ood)?;
    Ok(fpr_at_tpr_from_roc(&roc, tpr))
}

/// Average precision of `pos` against `neg` (higher score = positive):
/// AP = Σ_n (R_n − R_{n−1})·P_n over descending distinct thresholds, tied scores grouped
/// (sklearn `average_precision_score`).
///
/// AUPR-In = `average_precision(id, ood)`; AUPR-Out = AP with OOD positive and score −S,
/// which [`evaluate`] computes without negating.
pub fn average_precision(pos: &[f64], neg: &[f64]) -> Result<f64, MetricError> {
    check_scores("positive", pos)?;
    check_scores("negative", neg)?;
    let groups = groups_desc(pos, neg);
    Ok(ap_from_groups(
        groups.iter(),
        |g| g.pos,
        |g| g.neg,
        pos.len() as u64,
    ))
}

/// All headline metrics from one sort.
pub fn evaluate(id: &[f64], ood: &[f64]) -> Result<Metrics, MetricError> {
    check_scores("ID", id)?;
    check_scores("OOD", ood)?;
    let (n_id, n_ood) = (id.len() as u64, ood.len() as u64);
    let groups = groups_desc(id, ood);
    let roc = roc_from_groups(&groups, n_id, n_ood);
    Ok(Metrics {
        auroc: auroc_from_groups(&groups, n_id, n_ood),
        fpr95: fpr_at_tpr_from_roc(&roc, 0.95),
        aupr_in: ap_from_groups(groups.iter(), |g| g.pos, |g| g.neg, n_id),
        // Score −S in descending order = S ascending; OOD is the positive class.
        aupr_out: ap_from_groups(groups.iter().rev(), |g| g.neg, |g| g.pos, n_ood),
        n_id: id.len(),
        n_ood: ood.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Deserialize)]
    struct Fixture {
        generator: String,
        tprs: Vec<f64>,
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    struct Case {
        name: String,
        id: Vec<f64>,
        ood: Vec<f64>,
        auroc: f64,
        fpr95: f64,
        fpr_at: BTreeMap<String, f64>,
        fpr_at_np_interp: BTreeMap<String, f64>,
        aupr_in: f64,
        aupr_out: f64,
    }

    fn fixture() -> Fixture {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/metrics/cases.json"
        );
        let text = std::fs::read_to_string(path).expect("fixture present in the repository");
        serde_json::from_str(&text).expect("fixture is valid JSON")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12
    }

    #[test]
    fn matches_sklearn_fixture() {
        let fx = fixture();
        assert!(fx.generator.contains("scikit-learn"));
        assert!(fx.cases.len() >= 8);
        for c in &fx.cases {
            let m = evaluate(&c.id, &c.ood).unwrap();
            let n = &c.name;
            assert!(
                close(m.auroc, c.auroc),
                "{n}: auroc {} vs {}",
                m.auroc,
                c.auroc
            );
            assert!(
                close(m.fpr95, c.fpr95),
                "{n}: fpr95 {} vs {}",
                m.fpr95,
                c.fpr95
            );
            assert!(
                close(m.aupr_in, c.aupr_in),
                "{n}: aupr_in {} vs {}",
                m.aupr_in,
                c.aupr_in
            );
            assert!(
                close(m.aupr_out, c.aupr_out),
                "{n}: aupr_out {} vs {}",
                m.aupr_out,
                c.aupr_out
            );
            assert_eq!((m.n_id, m.n_ood), (c.id.len(), c.ood.len()));
            // The stand-alone functions agree with `evaluate`.
            assert_eq!(auroc(&c.id, &c.ood).unwrap(), m.auroc);
            assert_eq!(average_precision(&c.id, &c.ood).unwrap(), m.aupr_in);
            let neg = |v: &[f64]| v.iter().map(|s| -s).collect::<Vec<_>>();
            let out = average_precision(&neg(&c.ood), &neg(&c.id)).unwrap();
            assert!(close(out, m.aupr_out), "{n}: {out} vs {}", m.aupr_out);
            for &t in &fx.tprs {
                let key = format!("{t}");
                let want = c.fpr_at[&key];
                let got = fpr_at_tpr(&c.id, &c.ood, t).unwrap();
                assert!(close(got, want), "{n}: fpr@{t} {got} vs {want}");
            }
        }
    }

    #[test]
    fn fixture_documents_the_np_interp_difference() {
        // Recent scipy's interp1d (via numpy.interp) picks the largest FPR on an exact TPR hit;
        // §10 picks the smallest. The `exact_hit_95` case has 20 ID scores: TPR hits 0.95.
        let fx = fixture();
        let c = fx
            .cases
            .iter()
            .find(|c| c.name == "exact_hit_95")
            .expect("case present");
        let ours = fpr_at_tpr(&c.id, &c.ood, 0.95).unwrap();
        assert!(close(ours, c.fpr_at["0.95"]));
        assert!(c.fpr_at_np_interp["0.95"] > ours);
        // Away from exact hits the two agree.
        for c in &fx.cases {
            for &t in &fx.tprs {
                let key = format!("{t}");
                let roc = roc_curve(&c.id, &c.ood).unwrap();
                if !roc.iter().any(|p| p.1 == t) {
                    assert!(
                        close(c.fpr_at[&key], c.fpr_at_np_interp[&key]),
                        "{}",
                        c.name
                    );
                }
            }
        }
    }

    #[test]
    fn auroc_hand_examples() {
        assert_eq!(auroc(&[0.9, 0.8, 0.7], &[0.1, 0.2]).unwrap(), 1.0);
        assert_eq!(auroc(&[0.1, 0.2], &[0.9, 0.8, 0.7]).unwrap(), 0.0);
        assert_eq!(auroc(&[0.5; 4], &[0.5; 7]).unwrap(), 0.5);
        // Pairs: (3 > 2), (3 > 1), (2 = 2 → ½), (2 > 1): 3.5 / 4.
        assert_eq!(auroc(&[3.0, 2.0], &[2.0, 1.0]).unwrap(), 0.875);
        // −0.0 and 0.0 are one score.
        assert_eq!(auroc(&[0.0], &[-0.0]).unwrap(), 0.5);
        // Infinities are ordinary scores.
        assert_eq!(auroc(&[f64::INFINITY], &[f64::MAX]).unwrap(), 1.0);
        assert_eq!(auroc(&[f64::INFINITY], &[f64::INFINITY]).unwrap(), 0.5);
        // Swapping the classes complements the AUROC.
        let (a, b) = ([0.3, 0.9, 0.5, 0.5, 0.1], [0.5, 0.2, 0.8]);
        assert!((auroc(&a, &b).unwrap() + auroc(&b, &a).unwrap() - 1.0).abs() < 1e-15);
    }

    #[test]
    fn roc_and_fpr_hand_examples() {
        // id {1, 1}, ood {1, 0}: (0,0,∞), (½, 1, 1), (1, 1, 0).
        let roc = roc_curve(&[1.0, 1.0], &[1.0, 0.0]).unwrap();
        assert_eq!(
            roc,
            vec![(0.0, 0.0, f64::INFINITY), (0.5, 1.0, 1.0), (1.0, 1.0, 0.0)]
        );
        // Interpolated on the tie's diagonal: 0 + ½·0.95.
        assert!((fpr_at_tpr(&[1.0, 1.0], &[1.0, 0.0], 0.95).unwrap() - 0.475).abs() < 1e-15);
        // id {3, 2}, ood {2.5, 1}: exact hit at TPR ½ returns the smallest FPR (0), not ½.
        let (id, ood) = ([3.0, 2.0], [2.5, 1.0]);
        let roc = roc_curve(&id, &ood).unwrap();
        assert_eq!(
            roc.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(),
            vec![(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
        assert_eq!(fpr_at_tpr(&id, &ood, 0.5).unwrap(), 0.0);
        assert_eq!(fpr_at_tpr(&id, &ood, 0.75).unwrap(), 0.5);
        assert_eq!(fpr_at_tpr(&id, &ood, 0.0).unwrap(), 0.0);
        assert_eq!(fpr_at_tpr(&id, &ood, 1.0).unwrap(), 0.5);
        // Thresholds strictly descending after the prepended point.
        assert!(roc.windows(2).all(|w| w[0].2 > w[1].2));
    }

    #[test]
    fn average_precision_hand_example() {
        // pos {1, 0.5}, neg {0.7}: thresholds 1 (R ½, P 1), 0.7 (R ½), 0.5 (R 1, P ⅔).
        let ap = average_precision(&[1.0, 0.5], &[0.7]).unwrap();
        assert!((ap - (0.5 + 0.5 * 2.0 / 3.0)).abs() < 1e-15);
        assert_eq!(average_precision(&[2.0, 3.0], &[1.0]).unwrap(), 1.0);
        // All tied: one threshold, AP = prevalence.
        assert!((average_precision(&[0.5; 3], &[0.5; 2]).unwrap() - 0.6).abs() < 1e-15);
    }

    #[test]
    fn errors() {
        assert_eq!(auroc(&[], &[1.0]), Err(MetricError::Empty { which: "ID" }));
        assert_eq!(auroc(&[1.0], &[]), Err(MetricError::Empty { which: "OOD" }));
        assert_eq!(
            evaluate(&[1.0, f64::NAN], &[0.0]),
            Err(MetricError::NaN {
                which: "ID",
                index: 1
            })
        );
        assert!(matches!(
            roc_curve(&[1.0], &[f64::NAN]),
            Err(MetricError::NaN {
                which: "OOD",
                index: 0
            })
        ));
        assert!(matches!(
            average_precision(&[], &[1.0]),
            Err(MetricError::Empty { .. })
        ));
        for bad in [-0.1, 1.5, f64::NAN] {
            assert!(matches!(
                fpr_at_tpr(&[1.0], &[0.0], bad),
                Err(MetricError::InvalidTpr { .. })
            ));
        }
    }

    #[test]
    fn metrics_serialize() {
        let m = evaluate(&[0.9, 0.8], &[0.1]).unwrap();
        let v = serde_json::to_value(m).unwrap();
        for k in ["auroc", "fpr95", "aupr_in", "aupr_out", "n_id", "n_ood"] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["n_id"], 2);
    }
}
