//! Paired bootstrap intervals of metric differences between detectors scored on the same
//! inputs (`eval --bank A --bank B --bootstrap N`): each replicate resamples the ID inputs and
//! every OOD set with replacement, once, and scores every row on that same resample, so the
//! interval reflects the difference between detectors rather than the luck of the sample.

use serde::Serialize;

use super::metrics::{MetricError, evaluate};
use crate::detect::prototypes::numpy_quantile;
use crate::detect::rng::SplitMix64;

/// One detector's scores: on the ID inputs and on each OOD set (the same inputs, in the same
/// order, for every row compared). `id[s]` are the ID scores paired with OOD set s: the same
/// slice for a static detector, one per set for the adaptive one (its memory depends on the
/// stream it saw).
#[derive(Debug, Clone)]
pub struct RowScores<'a> {
    pub id: Vec<&'a [f64]>,
    pub ood: Vec<&'a [f64]>,
}

/// A difference (row − first row) on the full data and its percentile interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub diff: f64,
    pub lo: f64,
    pub hi: f64,
}

/// AUROC and FPR95 differences.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MetricDiff {
    pub auroc: Interval,
    pub fpr95: Interval,
}

/// One row's differences against the first: per OOD set (in input order) and of the average
/// over the sets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowDiff {
    pub sets: Vec<MetricDiff>,
    pub average: MetricDiff,
}

/// Replicate `r`'s generator: independent of how replicates are split across threads.
fn replicate_rng(seed: u64, r: usize) -> SplitMix64 {
    let mut mix = SplitMix64(seed ^ (r as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    SplitMix64(mix.next_u64())
}

/// (AUROC, FPR95) per set of every row, on the index resample `pick` (None: the data).
fn metrics(
    rows: &[RowScores<'_>],
    id_pick: Option<&[usize]>,
    ood_pick: Option<&[Vec<usize>]>,
) -> Result<Vec<Vec<(f64, f64)>>, MetricError> {
    let take = |v: &[f64], pick: Option<&[usize]>| -> Vec<f64> {
        match pick {
            Some(p) => p.iter().map(|&i| v[i]).collect(),
            None => v.to_vec(),
        }
    };
    rows.iter()
        .map(|r| {
            r.ood
                .iter()
                .enumerate()
                .map(|(s, o)| {
                    let id = take(r.id.get(s).copied().unwrap_or(&[]), id_pick);
                    let m = evaluate(&id, &take(o, ood_pick.map(|p| p[s].as_slice())))?;
                    Ok((m.auroc, m.fpr95))
                })
                .collect()
        })
        .collect()
}

/// Differences of every row after the first against the first, with `n` paired bootstrap
/// replicates (seeded; the same result on any number of threads) giving the 2.5 and 97.5
/// percentiles (numpy's linear quantile). Every row must have the same input counts.
pub fn paired_bootstrap(
    rows: &[RowScores<'_>],
    n: usize,
    seed: u64,
) -> Result<Vec<RowDiff>, MetricError> {
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let n_id = first.id.first().map_or(0, |v| v.len());
    let n_ood: Vec<usize> = first.ood.iter().map(|o| o.len()).collect();
    let n_sets = n_ood.len();
    // diffs[row][set or n_sets = average] = (ΔAUROC, ΔFPR95) of one evaluation.
    let diffs = |m: &[Vec<(f64, f64)>]| -> Vec<Vec<(f64, f64)>> {
        m[1..]
            .iter()
            .map(|row| {
                let mut d: Vec<(f64, f64)> = row
                    .iter()
                    .zip(&m[0])
                    .map(|(a, b)| (a.0 - b.0, a.1 - b.1))
                    .collect();
                let k = d.len().max(1) as f64;
                let avg = d.iter().fold((0.0, 0.0), |s, x| (s.0 + x.0, s.1 + x.1));
                d.push((avg.0 / k, avg.1 / k));
                d
            })
            .collect()
    };
    let point = diffs(&metrics(rows, None, None)?);
    let replicate = |r: usize| -> Result<Vec<Vec<(f64, f64)>>, MetricError> {
        let mut rng = replicate_rng(seed, r);
        let id: Vec<usize> = (0..n_id).map(|_| rng.below(n_id)).collect();
        let ood: Vec<Vec<usize>> = n_ood
            .iter()
            .map(|&k| (0..k).map(|_| rng.below(k)).collect())
            .collect();
        Ok(diffs(&metrics(rows, Some(&id), Some(&ood))?))
    };
    // Replicates are independent: spread them over the cores, each keeping its own order.
    let threads = crate::available_cores().clamp(1, n.max(1));
    let per = n.div_ceil(threads).max(1);
    let chunks: Vec<Result<Vec<_>, MetricError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|start| {
                let replicate = &replicate;
                sc.spawn(move || (start..(start + per).min(n)).map(replicate).collect())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut reps = Vec::with_capacity(n);
    for c in chunks {
        reps.extend(c?);
    }
    let interval = |row: usize, k: usize, auroc: bool| -> Interval {
        let pick = |d: &(f64, f64)| if auroc { d.0 } else { d.1 };
        let diff = pick(&point[row][k]);
        let mut v: Vec<f64> = reps.iter().map(|rep| pick(&rep[row][k])).collect();
        if v.is_empty() {
            return Interval {
                diff,
                lo: diff,
                hi: diff,
            };
        }
        v.sort_unstable_by(f64::total_cmp);
        Interval {
            diff,
            lo: numpy_quantile(&v, 0.025),
            hi: numpy_quantile(&v, 0.975),
        }
    };
    let metric = |row: usize, k: usize| MetricDiff {
        auroc: interval(row, k, true),
        fpr95: interval(row, k, false),
    };
    Ok((0..rows.len() - 1)
        .map(|row| RowDiff {
            sets: (0..n_sets).map(|k| metric(row, k)).collect(),
            average: metric(row, n_sets),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(n: usize, shift: f64, seed: u64) -> Vec<f64> {
        let mut rng = SplitMix64(seed);
        (0..n)
            .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 + shift)
            .collect()
    }

    #[test]
    fn a_monotone_transform_of_the_first_row_differs_by_exactly_zero() {
        let id = scores(200, 0.3, 1);
        let ood = [scores(150, 0.0, 2), scores(80, 0.1, 3)];
        let id2: Vec<f64> = id.iter().map(|x| 3.0 * x - 1.0).collect();
        let ood2: Vec<Vec<f64>> = ood
            .iter()
            .map(|o| o.iter().map(|x| 3.0 * x - 1.0).collect())
            .collect();
        let rows = [
            RowScores {
                id: vec![&id, &id],
                ood: ood.iter().map(Vec::as_slice).collect(),
            },
            RowScores {
                id: vec![&id2, &id2],
                ood: ood2.iter().map(Vec::as_slice).collect(),
            },
        ];
        let d = paired_bootstrap(&rows, 200, 7).unwrap();
        let zero = Interval {
            diff: 0.0,
            lo: 0.0,
            hi: 0.0,
        };
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].sets.len(), 2);
        for m in d[0].sets.iter().chain([&d[0].average]) {
            assert_eq!(m.auroc, zero);
            assert_eq!(m.fpr95, zero);
        }
    }

    /// A perfect detector against a chance one: the point difference is the full-data
    /// difference, the interval excludes 0, and a fixed seed gives the same interval again.
    #[test]
    fn a_better_row_has_an_interval_above_zero_and_the_seed_fixes_it() {
        let id = scores(300, 0.0, 11);
        let ood = [scores(300, 0.0, 12)];
        let id_perfect: Vec<f64> = id.iter().map(|x| x + 2.0).collect();
        let rows = [
            RowScores {
                id: vec![&id],
                ood: ood.iter().map(Vec::as_slice).collect(),
            },
            RowScores {
                id: vec![&id_perfect],
                ood: ood.iter().map(Vec::as_slice).collect(),
            },
        ];
        let base = evaluate(&id, &ood[0]).unwrap();
        let d = paired_bootstrap(&rows, 300, 5).unwrap();
        let a = d[0].sets[0].auroc;
        assert!((a.diff - (1.0 - base.auroc)).abs() < 1e-12);
        assert!(
            a.lo > 0.0 && a.lo <= a.diff && a.diff <= a.hi + 1e-12,
            "{a:?}"
        );
        let f = d[0].average.fpr95;
        assert!(f.hi < 0.0, "{f:?}");
        assert_eq!(paired_bootstrap(&rows, 300, 5).unwrap(), d);
        assert_ne!(paired_bootstrap(&rows, 300, 6).unwrap(), d);
        // Without replicates the interval is the point.
        let d0 = paired_bootstrap(&rows, 0, 5).unwrap();
        assert_eq!(d0[0].sets[0].auroc.lo, d0[0].sets[0].auroc.diff);
    }
}
