//! k-means (k-means++ then Lloyd) and the blocked-GEMM helpers it shares with the prototype
//! steps; its own file because OPL clustering is generic and the largest piece of the build.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, s};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::pyrandom::PyRandom;

/// Rows per GEMM block: bounds a similarity block to `ROW_BLOCK × columns` f32 per thread
/// (8 MiB for K = 500).
pub const ROW_BLOCK: usize = 4096;

/// Inputs that must be unit vectors (label embeddings, T, prototypes) may deviate from norm 1 by
/// at most this much; larger deviations mean a wrong matrix was passed and are rejected.
pub const UNIT_NORM_TOL: f32 = 1e-3;

/// Below this many f32 values in the data, k-means++ updates distances on one thread: spawning
/// costs more than it saves.
const PAR_MIN_VALUES: usize = 1 << 22;

/// Everything that can go wrong while building outlier prototypes.
///
/// Shared by k-means and the prototype steps; it lives here, in the lower of the two files,
/// so that [`super::prototypes`] can use k-means without an import cycle (it re-exports it).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ProtoError {
    /// A matrix that must hold data has no rows or no columns.
    #[error("{what} is empty ({rows} rows × {cols} columns)")]
    Empty {
        /// Which input.
        what: &'static str,
        /// Its number of rows.
        rows: usize,
        /// Its number of columns.
        cols: usize,
    },
    /// Two inputs disagree on the embedding dimension.
    #[error("{what} has {found} columns but the embedding dimension is {expected}")]
    DimensionMismatch {
        /// Which input.
        what: &'static str,
        /// The dimension of the other inputs.
        expected: usize,
        /// This input's number of columns.
        found: usize,
    },
    /// A NaN or infinity in the input.
    #[error("{what} has a non-finite value at row {row}, column {col}")]
    NonFinite {
        /// Which input.
        what: &'static str,
        /// Row of the first non-finite value.
        row: usize,
        /// Column of the first non-finite value.
        col: usize,
    },
    /// A row that must be an L2-normalised embedding is not.
    #[error(
        "{what} row {row} has L2 norm {norm}, but embeddings must be unit vectors (1 ± {tol})",
        tol = UNIT_NORM_TOL
    )]
    NotUnitNorm {
        /// Which input.
        what: &'static str,
        /// The offending row.
        row: usize,
        /// Its norm.
        norm: f32,
    },
    /// k-means asked for no clusters.
    #[error("k-means needs at least one cluster, got k = 0")]
    ZeroClusters,
    /// k-means asked for more clusters than points.
    #[error("k-means with k = {k} clusters needs at least {k} points, got {n}")]
    TooManyClusters {
        /// Requested clusters.
        k: usize,
        /// Available points.
        n: usize,
    },
    /// OPL asked for more prototypes than there are outlier labels.
    #[error(
        "K = {k} outlier prototypes requested but only {labels} outlier labels were given; \
         lower K or supply more labels"
    )]
    TooFewLabels {
        /// Requested prototypes K.
        k: usize,
        /// Number of outlier-label embeddings N.
        labels: usize,
    },
    /// The refinement quantile is outside [0, 1] (or NaN).
    #[error("refinement quantile q must lie in [0, 1], got {0}")]
    InvalidQuantile(f64),
    /// Some other parameter is out of range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParam {
        /// Parameter name.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// An ID component is too small to supply the boundary embeddings HOPG needs.
    #[error(
        "HOPG: ID component {component} has {size} members, fewer than the {needed} boundary \
         embeddings needed per component (component sizes: {sizes:?}); lower \
         hopg.per_cluster or hopg.clusters"
    )]
    ComponentTooSmall {
        /// Index of the (first) offending component.
        component: usize,
        /// Its number of members.
        size: usize,
        /// Boundary embeddings needed per component.
        needed: usize,
        /// Sizes of all components.
        sizes: Vec<usize>,
    },
    /// A centroid has (numerically) zero length, so its direction is undefined.
    #[error("cluster {cluster} has a zero-length mean; its prototype direction is undefined")]
    DegenerateCentroid {
        /// The cluster.
        cluster: usize,
    },
}

// ---------------------------------------------------------------------------------------------
// Validation and small numeric helpers
// ---------------------------------------------------------------------------------------------

/// Checks shape, finiteness and (optionally) unit row norms of an input matrix.
pub(crate) fn validate(
    what: &'static str,
    m: ArrayView2<f32>,
    dim: Option<usize>,
    unit: bool,
) -> Result<(), ProtoError> {
    let (rows, cols) = m.dim();
    if rows == 0 || cols == 0 {
        return Err(ProtoError::Empty { what, rows, cols });
    }
    if let Some(expected) = dim
        && cols != expected
    {
        return Err(ProtoError::DimensionMismatch {
            what,
            expected,
            found: cols,
        });
    }
    for (row, r) in m.outer_iter().enumerate() {
        let mut sq = 0.0f64;
        for (col, &v) in r.iter().enumerate() {
            if !v.is_finite() {
                return Err(ProtoError::NonFinite { what, row, col });
            }
            sq += f64::from(v) * f64::from(v);
        }
        let norm = sq.sqrt() as f32;
        if unit && (norm - 1.0).abs() > UNIT_NORM_TOL {
            return Err(ProtoError::NotUnitNorm { what, row, norm });
        }
    }
    Ok(())
}

/// The data as one row-major slice, copying only when the view is not already contiguous.
fn row_major(m: ArrayView2<'_, f32>) -> std::borrow::Cow<'_, [f32]> {
    match m.to_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(m.iter().copied().collect()),
    }
}

/// Squared Euclidean distance, 16 independent lanes so that it vectorises.
fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += (x - y) * (x - y);
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            let t = x[l] - y[l];
            acc[l] += t * t;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Squared norm accumulated in f64.
pub(crate) fn sq_norm_f64<'a>(v: impl IntoIterator<Item = &'a f32>) -> f64 {
    v.into_iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// Number of worker threads for the parallel parts.
fn worker_threads() -> usize {
    crate::available_cores()
}

/// For each block of at most [`ROW_BLOCK`] rows of `a`, computes `G = a_block · bᵀ` with one GEMM
/// and calls `f(first_row, G, out_block)`, where `out_block` is the matching part of `out`
/// (`out.len() == a.nrows()`). Blocks are spread over the available cores; block boundaries do
/// not depend on the thread count, so results are identical for any number of threads.
fn blocked_gemm_rows<T, F>(a: ArrayView2<f32>, b: ArrayView2<f32>, out: &mut [T], f: F)
where
    T: Send,
    F: Fn(usize, ArrayView2<f32>, &mut [T]) + Sync,
{
    let n = a.nrows();
    debug_assert_eq!(out.len(), n);
    debug_assert_eq!(a.ncols(), b.ncols());
    if n == 0 {
        return;
    }
    let bt = b.t();
    let cols = b.nrows();
    let run = |blocks: &mut [(usize, &mut [T])]| {
        let mut g = Array2::<f32>::zeros((ROW_BLOCK.min(n), cols));
        for (start, chunk) in blocks.iter_mut() {
            let rows = chunk.len();
            let mut gv = g.slice_mut(s![..rows, ..]);
            general_mat_mul(
                1.0,
                &a.slice(s![*start..*start + rows, ..]),
                &bt,
                0.0,
                &mut gv,
            );
            f(*start, gv.view(), chunk);
        }
    };
    let mut blocks: Vec<(usize, &mut [T])> = out
        .chunks_mut(ROW_BLOCK)
        .enumerate()
        .map(|(i, c)| (i * ROW_BLOCK, c))
        .collect();
    let threads = worker_threads().min(blocks.len());
    if threads <= 1 {
        run(&mut blocks);
        return;
    }
    let per_thread = blocks.len().div_ceil(threads);
    let run = &run;
    std::thread::scope(|scope| {
        for group in blocks.chunks_mut(per_thread) {
            scope.spawn(move || run(group));
        }
    });
}

/// Per row of `a`: the index and value of the largest ⟨a_i, b_j⟩ over rows j of `b` (first index
/// on ties). `b` must have at least one row.
pub(crate) fn row_argmax(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Vec<(usize, f32)> {
    let mut out = vec![(0usize, f32::NEG_INFINITY); a.nrows()];
    blocked_gemm_rows(a, b, &mut out, |_, g, block| {
        for (row, slot) in g.outer_iter().zip(block.iter_mut()) {
            let mut best = (0usize, f32::NEG_INFINITY);
            for (j, &v) in row.iter().enumerate() {
                if v > best.1 {
                    best = (j, v);
                }
            }
            *slot = best;
        }
    });
    out
}

// ---------------------------------------------------------------------------------------------
// k-means
// ---------------------------------------------------------------------------------------------

/// Parameters of [`kmeans`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KMeansParams {
    /// Number of clusters K (1 ≤ K ≤ number of points).
    pub k: usize,
    /// Maximum number of Lloyd iterations (assignment steps); at least 1. Default 100.
    pub max_iter: usize,
    /// Seed of the k-means++ initialisation ([`PyRandom`]).
    pub seed: u64,
}

impl KMeansParams {
    /// `k` clusters, seed `seed`, at most 100 iterations.
    pub fn new(k: usize, seed: u64) -> Self {
        Self {
            k,
            max_iter: 100,
            seed,
        }
    }
}

impl Default for KMeansParams {
    /// The OPL defaults of docs/method.md §5: K = 500, 100 iterations, seed 42.
    fn default() -> Self {
        Self::new(500, 42)
    }
}

/// Output of [`kmeans`].
#[derive(Clone, Debug, PartialEq)]
pub struct KMeansResult {
    /// K × D centroids, each the exact mean of its members in `labels` (accumulated in f64).
    pub centroids: Array2<f32>,
    /// Cluster of each input row.
    pub labels: Vec<usize>,
    /// Members per cluster; all non-zero.
    pub sizes: Vec<usize>,
    /// Lloyd iterations run (assignment steps, including the final one that changed nothing).
    pub iterations: usize,
    /// Whether the last assignment step changed no label (otherwise `max_iter` was reached).
    pub converged: bool,
    /// Σ‖x − c‖² at the last assignment step, each point to its nearest centroid.
    pub inertia: f64,
    /// How many times an empty cluster was re-seeded.
    pub empty_reseeds: usize,
}

/// k-means on the rows of `data` (N × D): k-means++ initialisation, then Lloyd iterations until no
/// assignment changes or `max_iter` assignment steps have run.
///
/// - **Initialisation:** standard single-candidate k-means++ (Arthur & Vassilvitskii 2007): the
///   first centre is a uniform random row, each further centre a row drawn with probability
///   ∝ D(x)², the squared distance to its nearest chosen centre. scikit-learn's *greedy* variant
///   (2 + ⌊ln k⌋ candidates per step, keep the best) is not used: it costs that many times more
///   distance passes and §5 only asks for a seeded k-means++ stand-in for the GMM, whose
///   centroids are not reproducible bit-for-bit anyway. If every remaining D(x)² is zero (more
///   clusters than distinct points), the centre is a uniform random row.
/// - **Assignment:** ‖x − c‖² = ‖x‖² + ‖c‖² − 2⟨x, c⟩, with ⟨x, c⟩ from one GEMM
///   `data_block · centroidsᵀ` per [`ROW_BLOCK`] rows (blocks split over the cores), and the
///   argmin per row (first index on ties). Valid for any vectors, not only unit ones.
/// - **Update:** centroids = means of their members, summed in f64 in row order.
/// - **Empty clusters:** each is re-seeded with the point farthest from its centroid (at the
///   assignment just made) among clusters that have more than one member; the point moves to
///   the empty cluster, which then has it as its centroid.
///
/// **Cost.** One Lloyd iteration is N·K·D multiply-adds, 2·10¹⁰ for N = 80 000, K = 500,
/// D = 512; k-means++ costs as many, but as K bandwidth-bound passes over the data. Measured
/// on the development machine (2 cores of an AMD EPYC with AVX2/FMA, release build, random unit
/// vectors, D = 512, K = 500, with other builds sharing the cores):
///
/// | N | threads | k-means++ | Lloyd iteration |
/// |---|---|---|---|
/// | 20 000 | 2 | 0.6–3.1 s | 0.09–0.23 s (45–110 GFLOP/s) |
/// | 20 000 | 1 | 1.1–1.8 s | 0.15–0.25 s |
/// | 80 000 | 2 | 5.3–6.5 s | 0.56–0.70 s |
///
/// (the spread is the load from other processes), so a full OPL run at N = 80 000 takes about
/// a minute at worst (100 iterations), and a few seconds at the reference list's N = 10 848.
///
/// **Why not linfa-clustering.** linfa-clustering 0.8.1 is built on ndarray 0.16, not the 0.17
/// the rest of the crate uses, so every call would copy between two ndarray versions and the
/// build would carry both. It also computes distances point by point
/// (`closest_centroid` loops over the centroids for each observation) instead of one GEMM per
/// block, which is the whole cost here. Measured in a scratch project on the same machine
/// (linfa-clustering 0.8.1, default k-means++ init, `n_runs(1)`, rayon on 2 cores): N = 2 000,
/// D = 512, K = 500 took 169 s for initialisation plus one iteration and 199 s with three, about
/// 15 s per iteration against 0.02–0.03 s here.
///
/// Errors: empty data, non-finite values, k = 0, k > N, `max_iter` = 0.
pub fn kmeans(data: ArrayView2<f32>, p: &KMeansParams) -> Result<KMeansResult, ProtoError> {
    validate("k-means data", data, None, false)?;
    let n = data.nrows();
    if p.k == 0 {
        return Err(ProtoError::ZeroClusters);
    }
    if p.k > n {
        return Err(ProtoError::TooManyClusters { k: p.k, n });
    }
    if p.max_iter == 0 {
        return Err(ProtoError::InvalidParam {
            name: "max_iter",
            reason: "k-means needs at least one iteration".into(),
        });
    }
    let flat = row_major(data);
    let init = kmeans_plus_plus(&flat, data.ncols(), p.k, p.seed);
    Ok(lloyd(data, &flat, init, p.max_iter))
}

/// `closest[i] = min(closest[i], ‖x_i − center‖²)` (or `=` when `first`), split over the cores
/// for large data.
fn update_closest(flat: &[f32], d: usize, center: &[f32], closest: &mut [f32], first: bool) {
    let work = |rows: &[f32], out: &mut [f32]| {
        for (x, c) in rows.chunks_exact(d).zip(out.iter_mut()) {
            let v = sq_dist(x, center);
            if first || v < *c {
                *c = v;
            }
        }
    };
    let threads = if flat.len() >= PAR_MIN_VALUES {
        worker_threads()
    } else {
        1
    };
    if threads <= 1 {
        work(flat, closest);
        return;
    }
    let per = closest.len().div_ceil(threads);
    let work = &work;
    std::thread::scope(|scope| {
        for (rows, out) in flat.chunks(per * d).zip(closest.chunks_mut(per)) {
            scope.spawn(move || work(rows, out));
        }
    });
}

/// k-means++ seeding; returns K × D initial centres (copies of data rows).
fn kmeans_plus_plus(flat: &[f32], d: usize, k: usize, seed: u64) -> Array2<f32> {
    let n = flat.len() / d;
    let mut rng = PyRandom::new(seed);
    let mut centers = Array2::<f32>::zeros((k, d));
    let mut closest = vec![0.0f32; n];
    let row = |i: usize| &flat[i * d..(i + 1) * d];
    let mut idx = rng.randbelow(n as u64) as usize;
    for j in 0..k {
        if j > 0 {
            let total: f64 = closest.iter().map(|&v| f64::from(v)).sum();
            idx = if total > 0.0 && total.is_finite() {
                let r = rng.random() * total;
                let mut cum = 0.0f64;
                let mut chosen = None;
                let mut last_positive = 0;
                for (i, &v) in closest.iter().enumerate() {
                    if v > 0.0 {
                        cum += f64::from(v);
                        last_positive = i;
                        if cum > r {
                            chosen = Some(i);
                            break;
                        }
                    }
                }
                chosen.unwrap_or(last_positive)
            } else {
                rng.randbelow(n as u64) as usize
            };
        }
        let c = row(idx);
        for (dst, &src) in centers.row_mut(j).iter_mut().zip(c) {
            *dst = src;
        }
        update_closest(flat, d, c, &mut closest, j == 0);
    }
    centers
}

/// Lloyd iterations from the given initial centroids (K ≥ 1, K ≤ N, `max_iter` ≥ 1).
fn lloyd(
    data: ArrayView2<f32>,
    flat: &[f32],
    mut centroids: Array2<f32>,
    max_iter: usize,
) -> KMeansResult {
    let (n, d) = data.dim();
    let k = centroids.nrows();
    let xn: Vec<f32> = flat
        .chunks_exact(d)
        .map(|x| sq_norm_f64(x) as f32)
        .collect();
    let mut labels = vec![usize::MAX; n];
    let mut assign = vec![(0usize, 0.0f32); n];
    let mut sizes = vec![0usize; k];
    let mut iterations = 0;
    let mut converged = false;
    let mut inertia = 0.0f64;
    let mut empty_reseeds = 0;
    for _ in 0..max_iter {
        iterations += 1;
        let cn: Vec<f32> = centroids
            .outer_iter()
            .map(|c| sq_norm_f64(c.iter()) as f32)
            .collect();
        blocked_gemm_rows(data, centroids.view(), &mut assign, |start, g, block| {
            for (r, (row, slot)) in g.outer_iter().zip(block.iter_mut()).enumerate() {
                let mut best = 0usize;
                let mut best_v = f32::INFINITY;
                for (j, (&gv, &cv)) in row.iter().zip(&cn).enumerate() {
                    let v = cv - 2.0 * gv;
                    if v < best_v {
                        best_v = v;
                        best = j;
                    }
                }
                *slot = (best, (xn[start + r] + best_v).max(0.0));
            }
        });
        let mut changed = 0usize;
        inertia = 0.0;
        for (l, &(a, dist)) in labels.iter_mut().zip(&assign) {
            if *l != a {
                changed += 1;
                *l = a;
            }
            inertia += f64::from(dist);
        }
        if changed == 0 {
            // Centroids are already the means of these labels (previous update).
            converged = true;
            break;
        }
        empty_reseeds +=
            update_centroids(flat, d, &mut labels, &assign, &mut centroids, &mut sizes);
    }
    KMeansResult {
        centroids,
        labels,
        sizes,
        iterations,
        converged,
        inertia,
        empty_reseeds,
    }
}

/// Recomputes centroids as member means, re-seeding empty clusters; returns how many were
/// re-seeded. `assign[i].1` is point i's squared distance to its centroid before the update.
fn update_centroids(
    flat: &[f32],
    d: usize,
    labels: &mut [usize],
    assign: &[(usize, f32)],
    centroids: &mut Array2<f32>,
    sizes: &mut [usize],
) -> usize {
    let k = centroids.nrows();
    let mut sums = vec![0.0f64; k * d];
    sizes.fill(0);
    for (x, &l) in flat.chunks_exact(d).zip(labels.iter()) {
        sizes[l] += 1;
        for (s, &v) in sums[l * d..(l + 1) * d].iter_mut().zip(x) {
            *s += f64::from(v);
        }
    }
    let empty: Vec<usize> = (0..k).filter(|&c| sizes[c] == 0).collect();
    if !empty.is_empty() {
        let n = labels.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by(|&a, &b| assign[b].1.total_cmp(&assign[a].1).then(a.cmp(&b)));
        let mut next = 0;
        for &c in &empty {
            while next < n && sizes[labels[order[next]]] <= 1 {
                next += 1;
            }
            // k ≤ n guarantees a cluster with two or more members while one is empty.
            let Some(&p) = order.get(next) else { break };
            next += 1;
            let old = labels[p];
            let x = &flat[p * d..(p + 1) * d];
            sizes[old] -= 1;
            for (s, &v) in sums[old * d..(old + 1) * d].iter_mut().zip(x) {
                *s -= f64::from(v);
            }
            sizes[c] = 1;
            for (s, &v) in sums[c * d..(c + 1) * d].iter_mut().zip(x) {
                *s = f64::from(v);
            }
            labels[p] = c;
        }
    }
    for (c, mut row) in centroids.outer_iter_mut().enumerate() {
        if sizes[c] == 0 {
            continue; // unreachable while k ≤ n; keeps the previous centroid
        }
        let count = sizes[c] as f64;
        for (dst, &s) in row.iter_mut().zip(&sums[c * d..(c + 1) * d]) {
            *dst = (s / count) as f32;
        }
    }
    empty.len()
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Deterministic unit-vector fixtures shared by the k-means and prototype tests.
    use ndarray::Array2;

    use crate::detect::pyrandom::PyRandom;

    /// A standard normal draw (Box–Muller on CPython's generator).
    pub fn gauss(rng: &mut PyRandom) -> f64 {
        let u1 = 1.0 - rng.random();
        let u2 = rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `m` with unit rows ([`crate::detect::norm::normalize_rows`]).
    pub fn normalize_rows(mut m: Array2<f32>) -> Array2<f32> {
        crate::detect::norm::normalize_rows(&mut m);
        m
    }

    /// `n` random unit vectors in R^d.
    pub fn random_unit(n: usize, d: usize, seed: u64) -> Array2<f32> {
        let mut rng = PyRandom::new(seed);
        normalize_rows(Array2::from_shape_fn((n, d), |_| gauss(&mut rng) as f32))
    }

    /// Unit vectors scattered (Gaussian noise of scale `noise`) around the given unit centres,
    /// `sizes[j]` of them around centre j; returns the points and their true cluster.
    pub fn clustered(
        centers: &Array2<f32>,
        sizes: &[usize],
        noise: f64,
        seed: u64,
    ) -> (Array2<f32>, Vec<usize>) {
        let mut rng = PyRandom::new(seed);
        let d = centers.ncols();
        let n: usize = sizes.iter().sum();
        let mut out = Array2::<f32>::zeros((n, d));
        let mut truth = Vec::with_capacity(n);
        let mut i = 0;
        for (j, &size) in sizes.iter().enumerate() {
            for _ in 0..size {
                for (dst, &c) in out.row_mut(i).iter_mut().zip(centers.row(j)) {
                    *dst = (f64::from(c) + noise * gauss(&mut rng)) as f32;
                }
                truth.push(j);
                i += 1;
            }
        }
        (normalize_rows(out), truth)
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use ndarray::{Array1, Axis};

    /// Asserts that the clustering `labels` equals the ground truth up to renaming.
    fn assert_same_partition(labels: &[usize], truth: &[usize], k: usize) {
        let mut map = vec![usize::MAX; k];
        for (&l, &t) in labels.iter().zip(truth) {
            if map[t] == usize::MAX {
                map[t] = l;
            }
            assert_eq!(map[t], l, "true cluster {t} is split");
        }
        let mut used = map.clone();
        used.sort_unstable();
        used.dedup();
        assert_eq!(used.len(), k, "two true clusters merged: {map:?}");
    }

    #[test]
    fn kmeans_recovers_separated_clusters() {
        // 9 000 points: several GEMM blocks, so the multi-block / multi-thread path runs.
        let centers = random_unit(6, 16, 3);
        let sizes = [1500, 1200, 1800, 1500, 1000, 2000];
        let (data, truth) = clustered(&centers, &sizes, 0.02, 4);
        let r = kmeans(data.view(), &KMeansParams::new(6, 42)).unwrap();
        assert!(r.converged);
        assert!(r.iterations <= 100);
        assert_same_partition(&r.labels, &truth, 6);
        let mut got = r.sizes.clone();
        got.sort_unstable();
        let mut want = sizes.to_vec();
        want.sort_unstable();
        assert_eq!(got, want);
        // Centroids are the member means.
        for (c, centroid) in r.centroids.outer_iter().enumerate() {
            let members: Vec<usize> = (0..data.nrows()).filter(|&i| r.labels[i] == c).collect();
            let mean: Array1<f32> = data.select(Axis(0), &members).mean_axis(Axis(0)).unwrap();
            for (a, b) in centroid.iter().zip(mean.iter()) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn kmeans_reseeds_empty_clusters() {
        let centers = random_unit(2, 4, 5);
        let (data, _) = clustered(&centers, &[20, 20], 0.05, 6);
        let mut init = Array2::<f32>::from_elem((3, 4), 100.0);
        init.row_mut(0).assign(&data.row(0));
        init.row_mut(1).assign(&data.row(20));
        let flat = row_major(data.view());
        let r = lloyd(data.view(), &flat, init, 100);
        assert!(r.empty_reseeds >= 1);
        assert!(r.sizes.iter().all(|&s| s > 0), "{:?}", r.sizes);
        assert_eq!(r.sizes.iter().sum::<usize>(), 40);
        assert!(
            r.centroids.iter().all(|&v| v.abs() < 2.0),
            "far centroid survived"
        );

        // All points identical: more clusters than distinct points must not panic and must
        // leave no cluster empty.
        let same = Array2::from_elem((6, 3), 0.5f32);
        let r = kmeans(same.view(), &KMeansParams::new(3, 1)).unwrap();
        assert!(r.sizes.iter().all(|&s| s > 0), "{:?}", r.sizes);
    }

    #[test]
    fn kmeans_rejects_bad_input() {
        let data = random_unit(10, 4, 7);
        let err = kmeans(data.view(), &KMeansParams::new(0, 1)).unwrap_err();
        assert_eq!(err, ProtoError::ZeroClusters);
        let err = kmeans(data.view(), &KMeansParams::new(11, 1)).unwrap_err();
        assert_eq!(err, ProtoError::TooManyClusters { k: 11, n: 10 });
        let mut bad = data.clone();
        bad[[3, 2]] = f32::NAN;
        let err = kmeans(bad.view(), &KMeansParams::new(2, 1)).unwrap_err();
        assert_eq!(
            err,
            ProtoError::NonFinite {
                what: "k-means data",
                row: 3,
                col: 2
            }
        );
        let empty = Array2::<f32>::zeros((0, 4));
        assert!(matches!(
            kmeans(empty.view(), &KMeansParams::new(1, 1)),
            Err(ProtoError::Empty { .. })
        ));
        let p = KMeansParams {
            k: 2,
            max_iter: 0,
            seed: 1,
        };
        assert!(matches!(
            kmeans(data.view(), &p),
            Err(ProtoError::InvalidParam { .. })
        ));
    }

    /// Timing of the OPL-sized k-means; run with
    /// `cargo test --release --lib detect::kmeans::tests::kmeans_timing -- --ignored --nocapture`
    /// (`KMEANS_TIMING_N` sets N, default 20 000).
    #[test]
    #[ignore = "timing, ~30 s"]
    fn kmeans_timing() {
        let n = std::env::var("KMEANS_TIMING_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let (d, k, iters) = (512, 500, 5);
        let data = random_unit(n, d, 1);
        let flat = row_major(data.view());
        let t = std::time::Instant::now();
        let init = kmeans_plus_plus(&flat, d, k, 42);
        let t_init = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let r = lloyd(data.view(), &flat, init, iters);
        let t_lloyd = t.elapsed().as_secs_f64();
        println!(
            "N={n} D={d} K={k} threads={}: k-means++ {t_init:.2} s, {} Lloyd iterations \
             {t_lloyd:.2} s = {:.3} s/iteration ({:.1} GFLOP/s)",
            worker_threads(),
            r.iterations,
            t_lloyd / r.iterations as f64,
            2.0 * (n * d * k) as f64 * r.iterations as f64 / t_lloyd / 1e9
        );
    }
}
