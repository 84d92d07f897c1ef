//! Outlier prototypes from k-means centroids, their refinement, hard prototypes (HOPG), the
//! words naming a prototype, and [`build_outliers`], the whole OPL construction.

use std::fmt;

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, Axis, s};
use serde::{Deserialize, Serialize};

use super::kmeans::{KMeansParams, kmeans, row_argmax, sq_norm_f64, validate};
pub use super::kmeans::{ProtoError, ROW_BLOCK, UNIT_NORM_TOL};
use super::norm::normalized_f64 as normalized;
use super::pyrandom::PyRandom;

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
pub fn numpy_quantile(sorted: &[f64], q: f64) -> f64 {
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
///
/// The pipeline:
///
/// 1. **OPL (§5).** [`kmeans`] with k-means++ initialisation clusters the N outlier-label
///    embeddings into K groups; [`outlier_prototypes`] re-normalises the centroids,
///    o_k = normalize(centroid_k). This is the oodgate route: the reference fits a
///    full-covariance GMM whose initialisation is exactly this k-means.
/// 2. **Refinement (§6).** [`refine`] computes d_k = max_c ⟨o_k, t_c⟩, takes θ as numpy's default
///    (linear) quantile of {d_k} at q, and keeps the prototypes with d_k < θ (strict).
/// 3. **HOPG (§7).** [`hard_prototypes`] picks 30 boundary ID embeddings in each of 5 clusters of
///    T, mixes each with its nearest kept prototype, h = normalize(λ·b + (1 − λ)·o*), λ drawn as
///    CPython's `random.uniform(0, 0.5)` after `random.seed(42)`, and accepts h iff
///    max_c ⟨h, t_c⟩ < θ.
/// 4. Ô = kept prototypes ‖ accepted hard prototypes, each row with its [`Provenance`] so that a
///    person can see where it came from ([`nearest_words`] names a prototype by its labels).
///
/// Every similarity matrix is one GEMM (ndarray → matrixmultiply) per block of at most
/// [`ROW_BLOCK`] rows, so memory stays bounded whatever N is. The k-means assignment step splits
/// its blocks over the available cores with `std::thread::scope`.
///
/// **Reproducibility.** All randomness comes from [`PyRandom`] (CPython's MT19937), whose
/// output is fixed by its specification rather than by a crate version. Block boundaries do not
/// depend on the number of threads, and every reduction runs in a fixed order, so the same
/// inputs and parameters give bit-identical output on the same machine and build (matrixmultiply
/// picks its SIMD kernel at run time, so a CPU with different features may round differently).
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
    use crate::detect::kmeans::fixtures::*;

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
}
