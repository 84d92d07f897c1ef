//! Outlier Prototype Learning, refinement and Hard Outlier Prototype Generation (method.md §5–§7).
//!
//! The pipeline, as run by [`build_outliers`]:
//!
//! 1. **OPL (§5).** [`kmeans`] with k-means++ initialisation clusters the N outlier-label
//!    embeddings into K groups; [`outlier_prototypes`] re-normalises the centroids,
//!    o_k = normalize(centroid_k). This is the oodgate route: the reference fits a
//!    full-covariance GMM whose initialisation is exactly this k-means.
//! 2. **Refinement (§6).** [`refine`] computes d_k = max_c ⟨o_k, t_c⟩, takes θ as numpy's default
//!    (linear) quantile of {d_k} at q, and keeps the prototypes with d_k < θ (strict).
//! 3. **HOPG (§7).** [`hard_prototypes`] picks 30 boundary ID embeddings in each of 5 clusters of
//!    T, mixes each with its nearest kept prototype, h = normalize(λ·b + (1 − λ)·o*), λ drawn as
//!    CPython's `random.uniform(0, 0.5)` after `random.seed(42)`, and accepts h iff
//!    max_c ⟨h, t_c⟩ < θ.
//! 4. Ô = kept prototypes ‖ accepted hard prototypes, each row with its [`Provenance`] so that a
//!    person can see where it came from ([`nearest_words`] names a prototype by its labels).
//!
//! Every similarity matrix is one GEMM (ndarray → matrixmultiply) per block of at most
//! [`ROW_BLOCK`] rows, so memory stays bounded whatever N is. The k-means assignment step splits
//! its blocks over the available cores with `std::thread::scope`.
//!
//! **Reproducibility.** All randomness comes from [`PyRandom`] (CPython's MT19937), whose
//! output is fixed by its specification rather than by a crate version. Block boundaries do not
//! depend on the number of threads, and every reduction runs in a fixed order, so the same
//! inputs and parameters give bit-identical output on the same machine and build (matrixmultiply
//! picks its SIMD kernel at run time, so a CPU with different features may round differently).

use std::fmt;

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, Axis, s};
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
fn validate(
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
fn sq_norm_f64<'a>(v: impl IntoIterator<Item = &'a f32>) -> f64 {
    v.into_iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// Number of worker threads for the parallel parts.
fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
fn row_argmax(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Vec<(usize, f32)> {
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

/// `v / ‖v‖` computed in f64; `None` when the norm is zero or not finite.
fn normalized(v: &[f64]) -> Option<Vec<f32>> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        return None;
    }
    Some(v.iter().map(|x| (x / norm) as f32).collect())
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
    /// The OPL defaults of method.md §5: K = 500, 100 iterations, seed 42.
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

/// OPL step 2 (§5): o_k = normalize(centroid_k), computed in f64.
///
/// Errors: empty input, non-finite values, a zero-length centroid.
pub fn outlier_prototypes(centroids: ArrayView2<f32>) -> Result<Array2<f32>, ProtoError> {
    validate("centroids", centroids, None, false)?;
    let mut out = Array2::<f32>::zeros(centroids.dim());
    for (cluster, (c, mut o)) in centroids.outer_iter().zip(out.outer_iter_mut()).enumerate() {
        let v: Vec<f64> = c.iter().map(|&x| f64::from(x)).collect();
        let u = normalized(&v).ok_or(ProtoError::DegenerateCentroid { cluster })?;
        for (dst, src) in o.iter_mut().zip(u) {
            *dst = src;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Refinement (§6)
// ---------------------------------------------------------------------------------------------

/// Output of [`refine`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Refinement {
    /// θ = Quantile_q({d_k}), numpy's default linear interpolation, in f64.
    pub theta: f64,
    /// Indices k (ascending) of the prototypes kept, those with d_k < θ.
    pub kept: Vec<usize>,
    /// d_k = max_c ⟨o_k, t_c⟩ for every prototype (f32 GEMM).
    pub max_id_cos: Vec<f32>,
    /// The ID class attaining d_k, for every prototype.
    pub nearest_id: Vec<usize>,
}

/// numpy's default (`method="linear"`) quantile of an ascending, non-empty slice, reproducing
/// numpy 2.x bit-for-bit: h = (n − 1)·q, lo = ⌊h⌋, γ = h − lo, and numpy's `_lerp`, which
/// evaluates `a + (b − a)·γ` for γ < 0.5 and `b − (b − a)·(1 − γ)` for γ ≥ 0.5.
fn numpy_quantile(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let h = (n - 1) as f64 * q;
    if h >= (n - 1) as f64 {
        return sorted[n - 1];
    }
    if h <= 0.0 {
        return sorted[0];
    }
    let lo = h.floor();
    let gamma = h - lo;
    let i = lo as usize;
    let (a, b) = (sorted[i], sorted[i + 1]);
    let diff = b - a;
    if gamma >= 0.5 {
        b - diff * (1.0 - gamma)
    } else {
        a + diff * gamma
    }
}

/// Refinement (§6): d_k = max_c ⟨o_k, t_c⟩, θ = Quantile_q({d_k}) (numpy default, computed in
/// f64 from the f32 cosines), keep the prototypes with d_k < θ (strict).
///
/// With K distinct d_k, q = 0.1 and K = 500 keep exactly 50; q = 1 keeps K − 1.
///
/// `prototypes` (K × D) and `id` (C × D) must be non-empty, finite and have unit rows
/// (±[`UNIT_NORM_TOL`]); q must lie in [0, 1].
pub fn refine(
    prototypes: ArrayView2<f32>,
    id: ArrayView2<f32>,
    q: f64,
) -> Result<Refinement, ProtoError> {
    if !(0.0..=1.0).contains(&q) {
        return Err(ProtoError::InvalidQuantile(q));
    }
    validate("ID embeddings T", id, None, true)?;
    validate("outlier prototypes", prototypes, Some(id.ncols()), true)?;
    let best = row_argmax(prototypes, id);
    let mut sorted: Vec<f64> = best.iter().map(|&(_, v)| f64::from(v)).collect();
    sorted.sort_unstable_by(f64::total_cmp);
    let theta = numpy_quantile(&sorted, q);
    let kept = best
        .iter()
        .enumerate()
        .filter(|(_, (_, v))| f64::from(*v) < theta)
        .map(|(k, _)| k)
        .collect();
    Ok(Refinement {
        theta,
        kept,
        max_id_cos: best.iter().map(|&(_, v)| v).collect(),
        nearest_id: best.iter().map(|&(c, _)| c).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// HOPG (§7)
// ---------------------------------------------------------------------------------------------

/// Parameters of [`hard_prototypes`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HopgParams {
    /// Components of T (the reference's 5-component GMM; here 5-means). Default 5.
    pub clusters: usize,
    /// Boundary embeddings per component. Default 30.
    pub per_cluster: usize,
    /// λ is drawn from [0, `lambda_max`), the weight of the ID side; in [0, 1]. Default 0.5.
    pub lambda_max: f64,
    /// Seed of both the k-means on T and the λ draws (`random.seed`). Default 42.
    pub seed: u64,
    /// Lloyd iterations of the k-means on T. Default 100.
    pub max_iter: usize,
}

impl Default for HopgParams {
    fn default() -> Self {
        Self {
            clusters: 5,
            per_cluster: 30,
            lambda_max: 0.5,
            seed: 42,
            max_iter: 100,
        }
    }
}

/// Provenance of one accepted hard prototype.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HardPrototype {
    /// The boundary ID class b (row of T).
    pub id_class: usize,
    /// The component of T it was taken from.
    pub component: usize,
    /// Its partner o*(b): row index into the `kept` matrix passed to [`hard_prototypes`].
    pub partner: usize,
    /// The mixing weight λ of the ID side.
    pub lambda: f64,
    /// max_c ⟨h, t_c⟩, which is < θ.
    pub max_id_cos: f32,
}

/// Output of [`hard_prototypes`].
#[derive(Clone, Debug, PartialEq)]
pub struct Hopg {
    /// Accepted hard prototypes h, one unit row each (|H| × D).
    pub vectors: Array2<f32>,
    /// Provenance of each row of `vectors`.
    pub accepted: Vec<HardPrototype>,
    /// The boundary ID classes B in draw order (clusters × per_cluster, or empty when no
    /// prototype was kept).
    pub boundary: Vec<usize>,
    /// Iterations of the k-means on T (0 when it was skipped).
    pub kmeans_iterations: usize,
}

/// HOPG (§7).
///
/// 1. k-means with `p.clusters` clusters on T (`id`, C × D), seeded with `p.seed`; for component
///    j, m_j = normalize(mean of its members) and B_j = the `p.per_cluster` members with the
///    smallest ⟨t_c, m_j⟩, in ascending order (ties by class index). B = B_0 ‖ … ‖ B_{J−1}.
/// 2. Partner o*(b) = argmax over the rows of `kept` of ⟨b, o⟩ (first on ties).
/// 3. λ_b = `PyRandom::new(p.seed).uniform(0, p.lambda_max)`, drawn once per b in B's order;
///    h_b = normalize(λ_b·b + (1 − λ_b)·o*(b)) in f64, stored as f32.
/// 4. h_b is accepted iff max_c ⟨h_b, t_c⟩ < θ (f32 GEMM, compared in f64); a zero-length mix
///    (possible only with `lambda_max` > 0.5) is rejected.
///
/// If `kept` has no rows, HOPG yields nothing (no error, no clustering).
///
/// Errors: invalid parameters or inputs; [`ProtoError::ComponentTooSmall`] when a component
/// has fewer than `p.per_cluster` members.
pub fn hard_prototypes(
    id: ArrayView2<f32>,
    kept: ArrayView2<f32>,
    theta: f64,
    p: &HopgParams,
) -> Result<Hopg, ProtoError> {
    if p.clusters == 0 || p.per_cluster == 0 {
        return Err(ProtoError::InvalidParam {
            name: "hopg.clusters / hopg.per_cluster",
            reason: format!(
                "both must be at least 1, got {} and {}",
                p.clusters, p.per_cluster
            ),
        });
    }
    if !(0.0..=1.0).contains(&p.lambda_max) {
        return Err(ProtoError::InvalidParam {
            name: "hopg.lambda_max",
            reason: format!("must lie in [0, 1], got {}", p.lambda_max),
        });
    }
    if theta.is_nan() {
        return Err(ProtoError::InvalidParam {
            name: "theta",
            reason: "is NaN".into(),
        });
    }
    validate("ID embeddings T", id, None, true)?;
    let d = id.ncols();
    if kept.nrows() == 0 {
        return Ok(Hopg {
            vectors: Array2::zeros((0, d)),
            accepted: Vec::new(),
            boundary: Vec::new(),
            kmeans_iterations: 0,
        });
    }
    validate("kept outlier prototypes", kept, Some(d), true)?;
    let c = id.nrows();
    if p.clusters.saturating_mul(p.per_cluster) > c {
        return Err(ProtoError::InvalidParam {
            name: "hopg.clusters × hopg.per_cluster",
            reason: format!(
                "{} × {} boundary embeddings requested but T has only {c} ID classes",
                p.clusters, p.per_cluster
            ),
        });
    }
    let km = kmeans(
        id,
        &KMeansParams {
            k: p.clusters,
            max_iter: p.max_iter,
            seed: p.seed,
        },
    )?;
    if let Some((component, &size)) = km
        .sizes
        .iter()
        .enumerate()
        .find(|&(_, &s)| s < p.per_cluster)
    {
        return Err(ProtoError::ComponentTooSmall {
            component,
            size,
            needed: p.per_cluster,
            sizes: km.sizes.clone(),
        });
    }

    // 1. Boundary embeddings.
    let mut boundary: Vec<(usize, usize)> = Vec::with_capacity(p.clusters * p.per_cluster);
    for (j, centroid) in km.centroids.outer_iter().enumerate() {
        let v: Vec<f64> = centroid.iter().map(|&x| f64::from(x)).collect();
        let m = normalized(&v).ok_or(ProtoError::DegenerateCentroid { cluster: j })?;
        let mut members: Vec<(f64, usize)> = km
            .labels
            .iter()
            .enumerate()
            .filter(|&(_, &l)| l == j)
            .map(|(cls, _)| {
                let sim = id
                    .row(cls)
                    .iter()
                    .zip(&m)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>();
                (sim, cls)
            })
            .collect();
        members.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        boundary.extend(members.iter().take(p.per_cluster).map(|&(_, cls)| (j, cls)));
    }
    let b_mat = id.select(
        Axis(0),
        &boundary.iter().map(|&(_, c)| c).collect::<Vec<_>>(),
    );

    // 2. Partners.
    let partners = row_argmax(b_mat.view(), kept);

    // 3. Mixing with CPython's λ draws.
    let mut rng = PyRandom::new(p.seed);
    let mut candidates = Array2::<f32>::zeros((boundary.len(), d));
    let mut lambdas = Vec::with_capacity(boundary.len());
    let mut valid = Vec::with_capacity(boundary.len());
    for (i, (b, mut h)) in b_mat
        .outer_iter()
        .zip(candidates.outer_iter_mut())
        .enumerate()
    {
        let lambda = rng.uniform(0.0, p.lambda_max);
        lambdas.push(lambda);
        let o = kept.row(partners[i].0);
        let mix: Vec<f64> = b
            .iter()
            .zip(o.iter())
            .map(|(&bv, &ov)| lambda * f64::from(bv) + (1.0 - lambda) * f64::from(ov))
            .collect();
        match normalized(&mix) {
            Some(u) => {
                for (dst, src) in h.iter_mut().zip(u) {
                    *dst = src;
                }
                valid.push(true);
            }
            None => valid.push(false),
        }
    }

    // 4. Rejection against θ.
    let max_cos = row_argmax(candidates.view(), id);
    let mut accepted = Vec::new();
    let mut rows = Vec::new();
    for i in 0..boundary.len() {
        let cos = max_cos[i].1;
        if valid[i] && f64::from(cos) < theta {
            rows.push(i);
            accepted.push(HardPrototype {
                id_class: boundary[i].1,
                component: boundary[i].0,
                partner: partners[i].0,
                lambda: lambdas[i],
                max_id_cos: cos,
            });
        }
    }
    Ok(Hopg {
        vectors: candidates.select(Axis(0), &rows),
        accepted,
        boundary: boundary.iter().map(|&(_, c)| c).collect(),
        kmeans_iterations: km.iterations,
    })
}

// ---------------------------------------------------------------------------------------------
// Explanations
// ---------------------------------------------------------------------------------------------

/// For each prototype (row of `prototypes`), the `n` rows of `words` with the highest cosine,
/// as `(word row, cosine)` in descending order (ties by row index), so that a prototype can be
/// shown to a person by its nearest labels. Fewer than `n` when `words` has fewer rows.
///
/// Cosines are ⟨p, w⟩ / (‖p‖·‖w‖) (0 for a zero row), from one GEMM per [`ROW_BLOCK`] words and
/// a partial selection per block, so memory stays bounded.
///
/// Errors: empty `prototypes`, non-finite values, differing dimensions. Empty `words` or
/// `n = 0` give empty lists.
pub fn nearest_words(
    prototypes: ArrayView2<f32>,
    words: ArrayView2<f32>,
    n: usize,
) -> Result<Vec<Vec<(usize, f32)>>, ProtoError> {
    validate("prototypes", prototypes, None, false)?;
    let mut lists: Vec<Vec<(usize, f32)>> = vec![Vec::new(); prototypes.nrows()];
    if n == 0 || words.nrows() == 0 {
        return Ok(lists);
    }
    validate("word embeddings", words, Some(prototypes.ncols()), false)?;
    let inv = |v: f64| if v > 0.0 { 1.0 / v.sqrt() } else { 0.0 };
    let pinv: Vec<f64> = prototypes
        .outer_iter()
        .map(|r| inv(sq_norm_f64(r.iter())))
        .collect();
    let winv: Vec<f64> = words
        .outer_iter()
        .map(|r| inv(sq_norm_f64(r.iter())))
        .collect();
    let order = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut g = Array2::<f32>::zeros((prototypes.nrows(), ROW_BLOCK.min(words.nrows())));
    let mut start = 0;
    while start < words.nrows() {
        let end = (start + ROW_BLOCK).min(words.nrows());
        let mut gv = g.slice_mut(s![.., ..end - start]);
        general_mat_mul(
            1.0,
            &prototypes,
            &words.slice(s![start..end, ..]).t(),
            0.0,
            &mut gv,
        );
        for ((row, list), &pi) in gv.outer_iter().zip(lists.iter_mut()).zip(&pinv) {
            list.extend(row.iter().enumerate().map(|(j, &v)| {
                let w = start + j;
                (w, (f64::from(v) * pi * winv[w]) as f32)
            }));
            if list.len() > n {
                list.select_nth_unstable_by(n - 1, order);
                list.truncate(n);
            }
        }
        start = end;
    }
    for list in &mut lists {
        list.sort_unstable_by(order);
    }
    Ok(lists)
}

// ---------------------------------------------------------------------------------------------
// The whole construction
// ---------------------------------------------------------------------------------------------

/// Parameters of [`build_outliers`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OplParams {
    /// Number of prototypes K. Default 500.
    pub k: usize,
    /// Refinement quantile q in [0, 1]. Default 0.1.
    pub quantile: f64,
    /// Seed of the k-means++ initialisation. Default 42.
    pub seed: u64,
    /// Lloyd iterations at most. Default 100.
    pub max_iter: usize,
    /// HOPG parameters; `None` skips HOPG (Ô = refined prototypes only). Default on.
    pub hopg: Option<HopgParams>,
    /// Nearest labels recorded per prototype for provenance. Default 5.
    pub nearest_words: usize,
}

impl Default for OplParams {
    fn default() -> Self {
        Self {
            k: 500,
            quantile: 0.1,
            seed: 42,
            max_iter: 100,
            hopg: Some(HopgParams::default()),
            nearest_words: 5,
        }
    }
}

/// Where one row of Ô comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Provenance {
    /// A refined OPL prototype o_k.
    Prototype {
        /// Its k-means cluster k (0..K).
        cluster: usize,
        /// Outlier labels in the cluster.
        size: usize,
        /// Indices of the labels nearest to o_k by cosine, nearest first.
        nearest_words: Vec<usize>,
    },
    /// A HOPG hard prototype h.
    Hard {
        /// The boundary ID class b (row of T).
        id_class: usize,
        /// Row of Ô holding the partner prototype o*(b) (always a `Prototype` row).
        partner: usize,
        /// Mixing weight λ of the ID side.
        lambda: f64,
    },
}

impl fmt::Display for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provenance::Prototype {
                cluster,
                size,
                nearest_words,
            } => write!(
                f,
                "prototype of cluster {cluster} ({size} labels, nearest {nearest_words:?})"
            ),
            Provenance::Hard {
                id_class,
                partner,
                lambda,
            } => write!(
                f,
                "hard prototype: ID class {id_class} mixed with row {partner}, λ = {lambda:.4}"
            ),
        }
    }
}

/// Sizes at each stage of [`build_outliers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OplCounts {
    /// Prototypes after clustering, K.
    pub k: usize,
    /// Prototypes kept by refinement, |O|.
    pub kept: usize,
    /// Boundary ID embeddings tried by HOPG, |B| (0 when HOPG is off or nothing was kept).
    pub boundary: usize,
    /// Hard prototypes accepted, |H|.
    pub accepted: usize,
}

/// Output of [`build_outliers`]: the outlier bank Ô and how it was made.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierSet {
    /// Ô, M × D unit rows: the kept prototypes (ascending k), then the accepted hard prototypes.
    pub vectors: Array2<f32>,
    /// The refinement threshold θ.
    pub theta: f64,
    /// Provenance of each row of `vectors`.
    pub provenance: Vec<Provenance>,
    /// max_c ⟨ô, t_c⟩ of each row of `vectors` (all < θ).
    pub max_id_cos: Vec<f32>,
    /// Stage sizes.
    pub counts: OplCounts,
    /// Lloyd iterations of the OPL k-means.
    pub kmeans_iterations: usize,
    /// Whether the OPL k-means converged before `max_iter`.
    pub kmeans_converged: bool,
}

/// The whole §5–§7 construction: k-means on the outlier-label embeddings (N × D), prototypes,
/// refinement against T (`id`, C × D), HOPG if enabled; returns Ô with provenance.
///
/// Both inputs must be non-empty, finite and have unit rows (±[`UNIT_NORM_TOL`]).
///
/// Errors: those of the stages, and [`ProtoError::TooFewLabels`] when K > N.
pub fn build_outliers(
    outlier_label_embeddings: ArrayView2<f32>,
    id: ArrayView2<f32>,
    p: &OplParams,
) -> Result<OutlierSet, ProtoError> {
    let labels = outlier_label_embeddings;
    if !(0.0..=1.0).contains(&p.quantile) {
        return Err(ProtoError::InvalidQuantile(p.quantile));
    }
    validate("ID embeddings T", id, None, true)?;
    validate("outlier label embeddings", labels, Some(id.ncols()), true)?;
    if p.k == 0 {
        return Err(ProtoError::ZeroClusters);
    }
    if p.k > labels.nrows() {
        return Err(ProtoError::TooFewLabels {
            k: p.k,
            labels: labels.nrows(),
        });
    }
    let km = kmeans(
        labels,
        &KMeansParams {
            k: p.k,
            max_iter: p.max_iter,
            seed: p.seed,
        },
    )?;
    let protos = outlier_prototypes(km.centroids.view())?;
    let refinement = refine(protos.view(), id, p.quantile)?;
    let d = id.ncols();
    let kept = protos.select(Axis(0), &refinement.kept);
    let near = nearest_words(kept.view(), labels, p.nearest_words)?;

    let mut provenance: Vec<Provenance> = refinement
        .kept
        .iter()
        .zip(near)
        .map(|(&k, words)| Provenance::Prototype {
            cluster: k,
            size: km.sizes[k],
            nearest_words: words.into_iter().map(|(w, _)| w).collect(),
        })
        .collect();
    let mut max_id_cos: Vec<f32> = refinement
        .kept
        .iter()
        .map(|&k| refinement.max_id_cos[k])
        .collect();

    let (vectors, boundary, accepted) = match &p.hopg {
        Some(hp) => {
            let hopg = hard_prototypes(id, kept.view(), refinement.theta, hp)?;
            for h in &hopg.accepted {
                provenance.push(Provenance::Hard {
                    id_class: h.id_class,
                    partner: h.partner,
                    lambda: h.lambda,
                });
                max_id_cos.push(h.max_id_cos);
            }
            let mut vectors = Array2::<f32>::zeros((kept.nrows() + hopg.vectors.nrows(), d));
            vectors.slice_mut(s![..kept.nrows(), ..]).assign(&kept);
            vectors
                .slice_mut(s![kept.nrows().., ..])
                .assign(&hopg.vectors);
            (vectors, hopg.boundary.len(), hopg.accepted.len())
        }
        None => (kept, 0, 0),
    };
    Ok(OutlierSet {
        counts: OplCounts {
            k: p.k,
            kept: refinement.kept.len(),
            boundary,
            accepted,
        },
        vectors,
        theta: refinement.theta,
        provenance,
        max_id_cos,
        kmeans_iterations: km.iterations,
        kmeans_converged: km.converged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;

    /// A standard normal draw (Box–Muller on CPython's generator).
    fn gauss(rng: &mut PyRandom) -> f64 {
        let u1 = 1.0 - rng.random();
        let u2 = rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn normalize_rows(mut m: Array2<f32>) -> Array2<f32> {
        for mut r in m.outer_iter_mut() {
            let n = sq_norm_f64(r.iter()).sqrt() as f32;
            r.mapv_inplace(|v| v / n);
        }
        m
    }

    /// `n` random unit vectors in R^d.
    fn random_unit(n: usize, d: usize, seed: u64) -> Array2<f32> {
        let mut rng = PyRandom::new(seed);
        normalize_rows(Array2::from_shape_fn((n, d), |_| gauss(&mut rng) as f32))
    }

    /// Unit vectors scattered (Gaussian noise of scale `noise`) around the given unit centres,
    /// `sizes[j]` of them around centre j; returns the points and their true cluster.
    fn clustered(
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

    fn assert_unit_rows(m: &Array2<f32>) {
        for (i, r) in m.outer_iter().enumerate() {
            let n = sq_norm_f64(r.iter()).sqrt();
            assert!((n - 1.0).abs() < 1e-5, "row {i} has norm {n}");
        }
    }

    fn dot(a: ndarray::ArrayView1<f32>, b: ndarray::ArrayView1<f32>) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| f64::from(x) * f64::from(y))
            .sum()
    }

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
    fn quantile_matches_numpy() {
        // Fixture computed once with numpy 2.4.6:
        //   d = np.array([0.31, 0.12, 0.27, 0.05, 0.44, 0.19, 0.38, 0.27, -0.08, 0.5],
        //                dtype=np.float32).astype(np.float64)
        //   repr(float(np.quantile(d, q)))
        let raw = [
            0.31f32, 0.12, 0.27, 0.05, 0.44, 0.19, 0.38, 0.27, -0.08, 0.5,
        ];
        let mut d: Vec<f64> = raw.iter().map(|&v| f64::from(v)).collect();
        d.sort_unstable_by(f64::total_cmp);
        let expected = [
            (0.0, -0.07999999821186066),
            (0.1, 0.037000000849366194),
            (0.25, 0.1374999973922968),
            (0.35, 0.2019999995827675),
            (0.5, 0.27000001072883606),
            (0.77, 0.3750999957323074),
            (0.9, 0.4459999978542328),
            (1.0, 0.5),
        ];
        for (q, want) in expected {
            assert_eq!(numpy_quantile(&d, q), want, "q = {q}");
        }
        assert_eq!(numpy_quantile(&[0.25], 0.3), 0.25);
    }

    /// K = 500 prototypes in R² with distinct d_k = cos(angle to the single ID class).
    fn fan_of_prototypes() -> (Array2<f32>, Array2<f32>) {
        let id = Array2::from_shape_vec((1, 2), vec![1.0f32, 0.0]).unwrap();
        let protos = Array2::from_shape_fn((500, 2), |(k, j)| {
            let a = 0.1 + 3.0 * ((k * 7) % 500) as f64 / 499.0;
            (if j == 0 { a.cos() } else { a.sin() }) as f32
        });
        (protos, id)
    }

    #[test]
    fn refine_keeps_the_q_fraction_strictly() {
        let (protos, id) = fan_of_prototypes();
        let r = refine(protos.view(), id.view(), 0.1).unwrap();
        assert_eq!(r.kept.len(), 50);
        let mut d: Vec<f32> = r.max_id_cos.clone();
        d.sort_unstable_by(f32::total_cmp);
        d.dedup();
        assert_eq!(d.len(), 500, "fixture must have distinct d_k");
        for &k in &r.kept {
            assert!(
                r.max_id_cos[k] <= d[49],
                "kept a prototype outside the lowest 50"
            );
            assert!(f64::from(r.max_id_cos[k]) < r.theta);
        }
        assert!(r.kept.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            refine(protos.view(), id.view(), 1.0).unwrap().kept.len(),
            499
        );
        assert_eq!(refine(protos.view(), id.view(), 0.0).unwrap().kept.len(), 0);
        for q in [-0.1, 1.1, f64::NAN] {
            assert!(matches!(
                refine(protos.view(), id.view(), q),
                Err(ProtoError::InvalidQuantile(_))
            ));
        }
        let err = refine(protos.view(), (&id * 2.0).view(), 0.1).unwrap_err();
        assert!(
            matches!(err, ProtoError::NotUnitNorm { row: 0, .. }),
            "{err}"
        );
        let err = refine(protos.view(), random_unit(3, 3, 1).view(), 0.1).unwrap_err();
        assert!(matches!(err, ProtoError::DimensionMismatch { .. }), "{err}");
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

    /// ID embeddings T: 5 well-separated groups in R³² with the given sizes.
    fn id_fixture(sizes: &[usize]) -> (Array2<f32>, Vec<usize>) {
        let centers = random_unit(sizes.len(), 32, 11);
        clustered(&centers, sizes, 0.08, 12)
    }

    #[test]
    fn hopg_boundary_mixing_and_rejection() {
        let (id, truth) = id_fixture(&[40, 45, 50, 35, 40]);
        let labels = random_unit(400, 32, 13);
        let km = kmeans(labels.view(), &KMeansParams::new(40, 42)).unwrap();
        let protos = outlier_prototypes(km.centroids.view()).unwrap();
        let r = refine(protos.view(), id.view(), 0.25).unwrap();
        assert_eq!(r.kept.len(), 10);
        let kept = protos.select(Axis(0), &r.kept);
        let h = hard_prototypes(id.view(), kept.view(), r.theta, &HopgParams::default()).unwrap();

        assert_eq!(h.boundary.len(), 150);
        let mut distinct = h.boundary.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 150);
        for group in h.boundary.chunks(30) {
            assert!(group.iter().all(|&c| truth[c] == truth[group[0]]));
        }
        assert!(
            !h.accepted.is_empty(),
            "fixture should accept some hard prototypes"
        );
        assert!(
            h.accepted.len() < 150,
            "fixture should reject some hard prototypes"
        );
        assert_eq!(h.vectors.nrows(), h.accepted.len());
        assert_unit_rows(&h.vectors);

        let mut rng = PyRandom::new(42);
        let lambdas: Vec<f64> = (0..150).map(|_| rng.uniform(0.0, 0.5)).collect();
        for (v, a) in h.vectors.outer_iter().zip(&h.accepted) {
            // Accepted only strictly below θ.
            let max = id
                .outer_iter()
                .map(|t| dot(v, t))
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(max < r.theta + 1e-6, "max cos {max} ≥ θ {}", r.theta);
            assert!(f64::from(a.max_id_cos) < r.theta);
            // λ is the draw at b's position in B.
            let pos = h.boundary.iter().position(|&c| c == a.id_class).unwrap();
            assert_eq!(a.lambda, lambdas[pos]);
            assert_eq!(a.component, pos / 30);
            // The partner is the nearest kept prototype to b.
            let b = id.row(a.id_class);
            let best = (0..kept.nrows())
                .max_by(|&i, &j| dot(b, kept.row(i)).total_cmp(&dot(b, kept.row(j))))
                .unwrap();
            assert_eq!(a.partner, best);
            // h = normalize(λ·b + (1 − λ)·o*).
            let mix: Vec<f64> = b
                .iter()
                .zip(kept.row(a.partner))
                .map(|(&x, &o)| a.lambda * f64::from(x) + (1.0 - a.lambda) * f64::from(o))
                .collect();
            let norm = mix.iter().map(|x| x * x).sum::<f64>().sqrt();
            for (&got, want) in v.iter().zip(&mix) {
                assert!((f64::from(got) - want / norm).abs() < 1e-6);
            }
        }

        // Nothing kept → nothing generated, no error.
        let none = Array2::<f32>::zeros((0, 32));
        let h = hard_prototypes(id.view(), none.view(), r.theta, &HopgParams::default()).unwrap();
        assert_eq!(h.vectors.nrows(), 0);
        assert!(h.accepted.is_empty() && h.boundary.is_empty());
    }

    #[test]
    fn hopg_rejects_small_component() {
        let (id, _) = id_fixture(&[40, 40, 10, 40, 40]);
        let kept = random_unit(3, 32, 14);
        let err = hard_prototypes(id.view(), kept.view(), 0.5, &HopgParams::default()).unwrap_err();
        match &err {
            ProtoError::ComponentTooSmall {
                component,
                size,
                needed,
                sizes,
            } => {
                assert_eq!((*size, *needed), (10, 30));
                assert_eq!(sizes[*component], 10);
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(err.to_string().contains("has 10 members"), "{err}");

        let (small, _) = id_fixture(&[20, 20, 20, 20, 20]);
        let err = hard_prototypes(small.view(), kept.view(), 0.5, &HopgParams::default());
        assert!(matches!(err, Err(ProtoError::InvalidParam { .. })));
        let p = HopgParams {
            lambda_max: 1.5,
            ..HopgParams::default()
        };
        let err = hard_prototypes(id.view(), kept.view(), 0.5, &p);
        assert!(matches!(err, Err(ProtoError::InvalidParam { .. })));
    }

    #[test]
    fn nearest_words_orders_by_cosine() {
        // Words on the unit circle at angles 0, 0.1, …, 0.9 rad; the last one has length 2.
        let mut words = Array2::from_shape_fn((10, 2), |(i, j)| {
            let a = 0.1 * i as f64;
            (if j == 0 { a.cos() } else { a.sin() }) as f32
        });
        words.row_mut(9).mapv_inplace(|v| 2.0 * v);
        let a = 0.42f64;
        let protos = Array2::from_shape_vec((1, 2), vec![a.cos() as f32, a.sin() as f32]).unwrap();
        let near = nearest_words(protos.view(), words.view(), 3).unwrap();
        let idx: Vec<usize> = near[0].iter().map(|&(w, _)| w).collect();
        assert_eq!(idx, [4, 5, 3]);
        assert!((near[0][0].1 - (0.02f32).cos()).abs() < 1e-6);
        let all = nearest_words(protos.view(), words.view(), 50).unwrap();
        assert_eq!(all[0].len(), 10);
        // Word 9 (length 2, 0.48 rad away) is the farthest; its length does not matter.
        assert_eq!(all[0][9].0, 9);
        assert!((all[0][9].1 - (0.48f32).cos()).abs() < 1e-6);
        assert!(all[0].windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(nearest_words(protos.view(), words.view(), 0).unwrap()[0].is_empty());
    }

    fn opl_fixture() -> (Array2<f32>, Array2<f32>) {
        let (id, _) = id_fixture(&[40, 45, 50, 35, 40]);
        (random_unit(600, 32, 21), id)
    }

    fn small_params(seed: u64) -> OplParams {
        OplParams {
            k: 60,
            quantile: 0.25,
            seed,
            ..OplParams::default()
        }
    }

    #[test]
    fn build_outliers_end_to_end() {
        let (labels, id) = opl_fixture();
        let set = build_outliers(labels.view(), id.view(), &small_params(42)).unwrap();
        let c = set.counts;
        assert_eq!(c.k, 60);
        assert_eq!(c.kept, 15); // 25 % of 60, d_k distinct
        assert_eq!(c.boundary, 150);
        assert_eq!(set.vectors.nrows(), c.kept + c.accepted);
        assert_eq!(set.provenance.len(), set.vectors.nrows());
        assert_eq!(set.max_id_cos.len(), set.vectors.nrows());
        assert_unit_rows(&set.vectors);
        for (row, p) in set.vectors.outer_iter().zip(&set.provenance) {
            let max = id
                .outer_iter()
                .map(|t| dot(row, t))
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(max < set.theta + 1e-6);
            match p {
                Provenance::Prototype {
                    size,
                    nearest_words,
                    ..
                } => {
                    assert!(*size > 0);
                    assert_eq!(nearest_words.len(), 5);
                }
                Provenance::Hard {
                    partner, lambda, ..
                } => {
                    assert!(*partner < c.kept);
                    assert!((0.0..0.5).contains(lambda));
                }
            }
        }
        assert!(
            set.provenance[0]
                .to_string()
                .starts_with("prototype of cluster")
        );

        let no_hopg = OplParams {
            hopg: None,
            ..small_params(42)
        };
        let set2 = build_outliers(labels.view(), id.view(), &no_hopg).unwrap();
        assert_eq!(set2.vectors, set.vectors.slice(s![..c.kept, ..]));
        assert_eq!(set2.counts.boundary, 0);
    }

    #[test]
    fn build_outliers_is_deterministic_per_seed() {
        let (labels, id) = opl_fixture();
        let a = build_outliers(labels.view(), id.view(), &small_params(42)).unwrap();
        let b = build_outliers(labels.view(), id.view(), &small_params(42)).unwrap();
        let bits = |m: &Array2<f32>| m.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.vectors), bits(&b.vectors));
        assert_eq!(a.provenance, b.provenance);
        assert_eq!(a.theta.to_bits(), b.theta.to_bits());
        let c = build_outliers(labels.view(), id.view(), &small_params(7)).unwrap();
        assert_ne!(bits(&a.vectors), bits(&c.vectors));
    }

    #[test]
    fn build_outliers_rejects_bad_input() {
        let (labels, id) = opl_fixture();
        let p = OplParams {
            k: 601,
            ..OplParams::default()
        };
        let err = build_outliers(labels.view(), id.view(), &p).unwrap_err();
        assert_eq!(
            err,
            ProtoError::TooFewLabels {
                k: 601,
                labels: 600
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("601") && msg.contains("600"), "{msg}");
        let err = build_outliers((&labels * 0.5).view(), id.view(), &small_params(1));
        assert!(matches!(err, Err(ProtoError::NotUnitNorm { .. })));
        let p = OplParams {
            quantile: 2.0,
            ..small_params(1)
        };
        let err = build_outliers(labels.view(), id.view(), &p);
        assert_eq!(err, Err(ProtoError::InvalidQuantile(2.0)));
    }

    /// Timing of the OPL-sized k-means; run with
    /// `cargo test --release --lib detect::prototypes::tests::kmeans_timing -- --ignored --nocapture`
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
