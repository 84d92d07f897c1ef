//! The exact [`Scorer`]: label banks stacked for one GEMM per batch, input checks, and the switch
//! to the approximate path ([`super::approx`]) for large outlier banks.

use std::sync::Arc;

use ndarray::{Array2, ArrayView2, s};

use super::approx::{Approx, ApproxParams, IdRows};
use super::cosine::cosines;
use super::index::VectorIndex;
use super::kernels::{Kernel, argmax, contiguous};
use super::method::{INPUT_NORM_TOLERANCE, Method, ScoreError, ScoreParams, ScoreRow};
use super::neglabel::NegGrouping;
use super::norm::l2_normalize;

/// The label banks, normalised and stacked for one-GEMM scoring.
///
/// A [`Scorer`] holds the label banks, row-normalised, stacked into one matrix
/// `W = [T̄; T; Ô]` (T̄ only when "no" embeddings are present). Scoring a batch `X̂` is one
/// GEMM of the batch against a contiguous row range of `W` (only the rows the method needs),
/// followed by a tight per-image loop that accumulates in `f64` with max-subtracted
/// log-sum-exp and a stable sigmoid. The softmax denominator is never truncated (docs/method.md §8).
/// Outlier banks beyond a configured size can be scored with an HNSW head plus a sampled tail
/// instead of the full GEMM ([`Scorer::with_approximation`], see [`super::approx`]).
#[derive(Debug, Clone)]
pub struct Scorer {
    dim: usize,
    n_id: usize,
    n_out: usize,
    has_no: bool,
    /// Rows `[T̄ (if present); T; Ô]`, every row unit-norm.
    bank: Array2<f32>,
    grouping: NegGrouping,
    /// Head + sampled tail for large outlier banks; `None` = exact.
    approx: Option<Approx>,
}

impl Scorer {
    /// Build a scorer from the ID yes-embeddings T (C×D), optional "no" embeddings T̄ (C×D) and
    /// outlier rows Ô (M×D, M may be 0; a 0-row matrix of any width is accepted).
    ///
    /// Rows are re-normalised (docs/method.md §8). The NegLabel grouping is precomputed from
    /// `params.neglabel_groups` / `params.neglabel_seed`.
    pub fn new(
        id: ArrayView2<'_, f32>,
        no: Option<ArrayView2<'_, f32>>,
        outliers: ArrayView2<'_, f32>,
        params: &ScoreParams,
    ) -> Result<Self, ScoreError> {
        params.validate()?;
        let (n_id, dim) = id.dim();
        if n_id == 0 || dim == 0 {
            return Err(ScoreError::EmptyIdBank {
                rows: n_id,
                cols: dim,
            });
        }
        if let Some(no) = &no {
            if no.nrows() != n_id {
                return Err(ScoreError::ShapeMismatch {
                    what: "\"no\" bank rows (must equal ID rows)",
                    expected: n_id,
                    got: no.nrows(),
                });
            }
            if no.ncols() != dim {
                return Err(ScoreError::ShapeMismatch {
                    what: "\"no\" bank dimension",
                    expected: dim,
                    got: no.ncols(),
                });
            }
        }
        let n_out = outliers.nrows();
        if n_out > 0 && outliers.ncols() != dim {
            return Err(ScoreError::ShapeMismatch {
                what: "outlier bank dimension",
                expected: dim,
                got: outliers.ncols(),
            });
        }
        let has_no = no.is_some();
        let off_id = if has_no { n_id } else { 0 };
        let mut bank = Array2::<f32>::zeros((off_id + n_id + n_out, dim));
        if let Some(no) = &no {
            bank.slice_mut(s![..n_id, ..]).assign(no);
        }
        bank.slice_mut(s![off_id..off_id + n_id, ..]).assign(&id);
        if n_out > 0 {
            bank.slice_mut(s![off_id + n_id.., ..]).assign(&outliers);
        }
        for (r, mut row) in bank.rows_mut().into_iter().enumerate() {
            let finite = row.iter().all(|v| v.is_finite());
            let norm = row.as_slice_mut().map_or(0.0, l2_normalize);
            let usable = finite && norm > 0.0 && norm.is_finite();
            if !usable {
                let (name, idx) = if r < off_id {
                    ("no", r)
                } else if r < off_id + n_id {
                    ("id", r - off_id)
                } else {
                    ("outlier", r - off_id - n_id)
                };
                return Err(ScoreError::BadBankRow {
                    bank: name,
                    row: idx,
                });
            }
        }
        let grouping = NegGrouping::new(n_out, params.neglabel_groups, params.neglabel_seed)?;
        Ok(Self {
            dim,
            n_id,
            n_out,
            has_no,
            bank,
            grouping,
            approx: None,
        })
    }

    /// Scores the outlier part of the denominator approximately (HNSW head + sampled tail,
    /// see [`super::approx`]) when the bank has more than `params.exact_limit` outlier rows;
    /// otherwise returns the scorer unchanged (exact). `index` must index [`Scorer::outliers`]
    /// row for row.
    pub fn with_approximation(
        mut self,
        index: Arc<VectorIndex>,
        params: ApproxParams,
    ) -> Result<Self, ScoreError> {
        params.validate()?;
        self.approx = if params.applies_to(self.n_out) {
            tracing::info!(
                outliers = self.n_out,
                exact_limit = params.exact_limit,
                candidates = params.candidates,
                tail_sample = params.tail_sample,
                "outlier bank above the exact limit: scoring approximately (HNSW head + sampled tail)"
            );
            Some(Approx::new(self.outliers(), index, params)?)
        } else {
            None
        };
        Ok(self)
    }

    /// Whether outlier scores are approximated (see [`Scorer::with_approximation`]).
    pub fn is_approximate(&self) -> bool {
        self.approx.is_some()
    }

    /// Embedding dimension D.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of ID classes C.
    pub fn n_id(&self) -> usize {
        self.n_id
    }

    /// Number of outlier rows M.
    pub fn n_outliers(&self) -> usize {
        self.n_out
    }

    /// Whether the CLIPN "no" embeddings T̄ are present.
    pub fn has_no_embeddings(&self) -> bool {
        self.has_no
    }

    fn off_id(&self) -> usize {
        if self.has_no { self.n_id } else { 0 }
    }

    /// The normalised ID embeddings T (C×D).
    pub fn id(&self) -> ArrayView2<'_, f32> {
        let o = self.off_id();
        self.bank.slice(s![o..o + self.n_id, ..])
    }

    /// The normalised "no" embeddings T̄ (C×D), if present.
    pub fn no(&self) -> Option<ArrayView2<'_, f32>> {
        self.has_no.then(|| self.bank.slice(s![..self.n_id, ..]))
    }

    /// The normalised outlier rows Ô (M×D).
    pub fn outliers(&self) -> ArrayView2<'_, f32> {
        let o = self.off_id() + self.n_id;
        self.bank.slice(s![o.., ..])
    }

    /// The precomputed NegLabel grouping.
    pub fn neg_grouping(&self) -> &NegGrouping {
        &self.grouping
    }

    /// Score a batch: `x` is B×D, each row an L2-normalised image embedding.
    /// Returns one score per row, higher = more ID. `ole` returns a probability in (0, 1).
    pub fn score_batch(
        &self,
        x: ArrayView2<'_, f32>,
        method: Method,
        params: &ScoreParams,
    ) -> Result<Vec<f64>, ScoreError> {
        let mut out = Vec::with_capacity(x.nrows());
        self.score_impl(x, method, params, false, |r| out.push(r.score))?;
        Ok(out)
    }

    /// Like [`Scorer::score_batch`], plus the top ID class and the top outlier row per image,
    /// read off the same GEMM (the outlier columns are always computed here, so explanations
    /// are available for every method when M > 0).
    pub fn score_batch_detailed(
        &self,
        x: ArrayView2<'_, f32>,
        method: Method,
        params: &ScoreParams,
    ) -> Result<Vec<ScoreRow>, ScoreError> {
        let mut out = Vec::with_capacity(x.nrows());
        self.score_impl(x, method, params, true, |r| out.push(r))?;
        Ok(out)
    }

    fn check_input(&self, x: &ArrayView2<'_, f32>) -> Result<(), ScoreError> {
        if x.ncols() != self.dim {
            return Err(ScoreError::ShapeMismatch {
                what: "input embedding dimension",
                expected: self.dim,
                got: x.ncols(),
            });
        }
        for (r, row) in x.rows().into_iter().enumerate() {
            let mut ss = 0.0f64;
            for &v in row {
                if !v.is_finite() {
                    return Err(ScoreError::NonFiniteInput { row: r });
                }
                ss += f64::from(v) * f64::from(v);
            }
            let norm = ss.sqrt() as f32;
            if (norm - 1.0).abs() > INPUT_NORM_TOLERANCE {
                return Err(ScoreError::NotNormalized { row: r, norm });
            }
        }
        Ok(())
    }

    fn score_impl(
        &self,
        x: ArrayView2<'_, f32>,
        method: Method,
        params: &ScoreParams,
        want_outliers: bool,
        mut sink: impl FnMut(ScoreRow),
    ) -> Result<(), ScoreError> {
        params.validate()?;
        if method.requires_no_embeddings() && !self.has_no {
            return Err(ScoreError::MissingNoEmbeddings { method });
        }
        if method == Method::NegLabel && self.n_out == 0 {
            return Err(ScoreError::NoOutliers { method });
        }
        self.check_input(&x)?;
        if x.nrows() == 0 {
            return Ok(());
        }
        if let Some(ap) = &self.approx
            && method != Method::NegLabel
        {
            let uses_no =
                self.has_no && matches!(method, Method::Ole | Method::ClipnAtd | Method::ClipnCtw);
            let off_id = self.off_id();
            let start = if uses_no { 0 } else { off_id };
            let rows = IdRows {
                w: self.bank.slice(s![start..off_id + self.n_id, ..]),
                n_id: self.n_id,
                uses_no,
                n_out: self.n_out,
                grouping: &self.grouping,
            };
            ap.score(rows, x, method, params, want_outliers, sink);
            return Ok(());
        }

        let uses_no =
            self.has_no && matches!(method, Method::Ole | Method::ClipnAtd | Method::ClipnCtw);
        let with_out = self.n_out > 0 && (want_outliers || method.uses_outliers());
        let off_id = self.off_id();
        let off_out = off_id + self.n_id;
        let start = if uses_no { 0 } else { off_id };
        let end = if with_out {
            off_out + self.n_out
        } else {
            off_out
        };
        let w = self.bank.slice(s![start..end, ..]);

        // The one GEMM: cosines B × (end − start), C-contiguous so rows are slices.
        let cos = cosines(x, w);

        let grouping_tmp;
        let grouping = if method == Method::NegLabel
            && !self
                .grouping
                .matches(params.neglabel_groups, params.neglabel_seed)
        {
            grouping_tmp =
                NegGrouping::new(self.n_out, params.neglabel_groups, params.neglabel_seed)?;
            &grouping_tmp
        } else {
            &self.grouping
        };

        let scale = f64::from(params.scale);
        let beta = f64::from(params.penalty_beta);
        let mut buf = vec![0.0f64; self.n_id.max(self.n_out)];
        let (id_lo, out_lo) = (off_id - start, off_out - start);
        let mut owned: Vec<f32> = Vec::new();
        for row in cos.rows() {
            let row = contiguous(row, &mut owned);
            let idc = &row[id_lo..id_lo + self.n_id];
            let noc = if uses_no { &row[..self.n_id] } else { &[][..] };
            let outc = if with_out { &row[out_lo..] } else { &[][..] };
            let (top_id, top_id_cos) = argmax(idc);
            let top_out = (!outc.is_empty()).then(|| argmax(outc));
            let k = Kernel {
                id: idc,
                no: noc,
                out: outc,
                tail: &[],
                tail_weight: 0.0,
                top_id,
                id_max: top_id_cos,
                out_max: top_out.map(|t| t.1),
                scale,
            };
            sink(k.score_row(method, beta, grouping, &mut buf, top_out.map(|t| t.0)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::norm::normalize_rows;
    use crate::detect::rng::SplitMix64;
    use ndarray::{Axis, array};

    /// Deterministic test data: unit rows with components uniform in [−1, 1) before normalising.
    fn rand_unit(rows: usize, dim: usize, seed: u64) -> Array2<f32> {
        let mut rng = SplitMix64(seed);
        let mut a = Array2::from_shape_fn((rows, dim), |_| {
            ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        });
        normalize_rows(&mut a);
        a
    }

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / a.abs().max(b.abs()).max(f64::MIN_POSITIVE)
    }

    fn params(method: Method) -> ScoreParams {
        ScoreParams::for_method(method)
    }

    fn with_scale(method: Method, scale: f32) -> ScoreParams {
        ScoreParams {
            scale,
            ..ScoreParams::for_method(method)
        }
    }

    fn sig(t: f64) -> f64 {
        1.0 / (1.0 + (-t).exp())
    }

    /// 2-D example: x = e1; T = {e1, e2}; T̄ = {e2, e1}; Ô = {(0.6, 0.8)}; s = 2.
    /// Cosines: ID (1, 0), no (0, 1), outlier 0.6 → l = (2, 0), l̄ = (0, 2), r = 1.2.
    fn toy() -> (Scorer, Array2<f32>) {
        let id = array![[1.0f32, 0.0], [0.0, 1.0]];
        let no = array![[0.0f32, 1.0], [1.0, 0.0]];
        let out = array![[0.6f32, 0.8]];
        let sc = Scorer::new(id.view(), Some(no.view()), out.view(), &params(Method::Ole))
            .expect("toy bank is valid");
        (sc, array![[1.0f32, 0.0]])
    }

    fn one(sc: &Scorer, x: &Array2<f32>, p: &ScoreParams, m: Method) -> f64 {
        sc.score_batch(x.view(), m, p).expect("valid input")[0]
    }

    #[test]
    fn hand_values_every_method() {
        let (sc, x) = toy();
        let e = f64::exp;
        let s2 = |m| with_scale(m, 2.0);
        let z = e(2.0) + e(0.0) + e(1.2);
        let tol = 1e-6; // cosine 0.6 goes through f32

        let ole = (e(2.0) * sig(2.0) + e(0.0) * sig(-2.0)) / z;
        assert!(rel(one(&sc, &x, &s2(Method::Ole), Method::Ole), ole) < tol);
        // Literal from an independent evaluation: (e²σ(2) + σ(−2)) / (e² + 1 + e^1.2).
        assert!((ole - 0.566_005_979_304_526_6).abs() < 1e-15, "{ole}");

        let ole_max = e(2.0) / z;
        assert!(rel(one(&sc, &x, &s2(Method::OleMax), Method::OleMax), ole_max) < tol);

        let pen = (e(2.0) - 0.25 * e(1.2)) / z;
        assert!(
            rel(
                one(&sc, &x, &s2(Method::OlePenalty), Method::OlePenalty),
                pen
            ) < tol
        );

        let atd = (e(2.0) * sig(2.0) + sig(-2.0)) / (e(2.0) + 1.0);
        assert!(rel(one(&sc, &x, &s2(Method::ClipnAtd), Method::ClipnAtd), atd) < 1e-12);

        let ctw = sig(2.0);
        assert!(rel(one(&sc, &x, &s2(Method::ClipnCtw), Method::ClipnCtw), ctw) < 1e-12);

        let mcm = e(2.0) / (e(2.0) + 1.0);
        assert!(rel(one(&sc, &x, &s2(Method::Mcm), Method::Mcm), mcm) < 1e-12);
        // T = 1 (scale 1): softmax of raw cosines (1, 0).
        let mcm1 = e(1.0) / (e(1.0) + 1.0);
        assert!(rel(one(&sc, &x, &params(Method::Mcm), Method::Mcm), mcm1) < 1e-12);

        let energy = (e(2.0) + 1.0).ln() / 2.0;
        assert!(rel(one(&sc, &x, &s2(Method::Energy), Method::Energy), energy) < 1e-12);
        let energy1 = (e(1.0) + 1.0).ln();
        assert!(
            rel(
                one(&sc, &x, &params(Method::Energy), Method::Energy),
                energy1
            ) < 1e-12
        );

        assert_eq!(one(&sc, &x, &s2(Method::MaxLogit), Method::MaxLogit), 1.0);

        // One negative → one group: (e² + 1) / (e² + 1 + e^1.2).
        let nl = (e(2.0) + 1.0) / z;
        assert!(rel(one(&sc, &x, &s2(Method::NegLabel), Method::NegLabel), nl) < tol);
    }

    #[test]
    fn hand_values_without_no_and_3d_neglabel() {
        // 3-D: x = e1, ID {e1, e2}, negatives {e3, (0.6, 0, 0.8), −e1}, s = 1.
        let id = array![[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0]];
        let out = array![[0.0f32, 0.0, 1.0], [0.6, 0.0, 0.8], [-1.0, 0.0, 0.0]];
        let x = array![[1.0f32, 0.0, 0.0]];
        let e = f64::exp;
        // Three groups of one negative each (default G = 100 > 3).
        let sc = Scorer::new(id.view(), None, out.view(), &params(Method::NegLabel)).unwrap();
        assert_eq!(sc.neg_grouping().n_groups(), 3);
        let a = e(1.0) + 1.0;
        let nl = (a / (a + 1.0) + a / (a + e(0.6)) + a / (a + e(-1.0))) / 3.0;
        let p1 = with_scale(Method::NegLabel, 1.0);
        assert!(rel(one(&sc, &x, &p1, Method::NegLabel), nl) < 1e-6);
        // One group with all three.
        let g1 = ScoreParams {
            neglabel_groups: 1,
            ..p1
        };
        let nl1 = a / (a + 1.0 + e(0.6) + e(-1.0));
        assert!(rel(one(&sc, &x, &g1, Method::NegLabel), nl1) < 1e-6);
        // Two groups: 3 mod 2 = 1 → the last negative (−e1) is dropped; groups of one.
        let g2 = ScoreParams {
            neglabel_groups: 2,
            ..p1
        };
        let nl2 = (a / (a + 1.0) + a / (a + e(0.6))) / 2.0;
        assert!(rel(one(&sc, &x, &g2, Method::NegLabel), nl2) < 1e-6);

        // `ole` without T̄ is variant (a): ID mass.
        let z = e(1.0) + 1.0 + 1.0 + e(0.6) + e(-1.0);
        let p = with_scale(Method::Ole, 1.0);
        assert!(rel(one(&sc, &x, &p, Method::Ole), a / z) < 1e-6);
        // CLIPN methods refuse to run without T̄.
        for m in [Method::ClipnAtd, Method::ClipnCtw] {
            assert_eq!(
                sc.score_batch(x.view(), m, &p),
                Err(ScoreError::MissingNoEmbeddings { method: m })
            );
        }
    }

    fn random_scorer(c: usize, m: usize, d: usize, with_no: bool, seed: u64) -> Scorer {
        let id = rand_unit(c, d, seed);
        let no = rand_unit(c, d, seed + 1);
        let out = rand_unit(m, d, seed + 2);
        Scorer::new(
            id.view(),
            with_no.then(|| no.view()),
            out.view(),
            &ScoreParams::default(),
        )
        .unwrap()
    }

    #[test]
    fn ole_without_outliers_equals_clipn_atd() {
        let sc = random_scorer(50, 0, 16, true, 1);
        let x = rand_unit(40, 16, 99);
        for scale in [50.0, 100.0, 7.5] {
            let ole = sc
                .score_batch(x.view(), Method::Ole, &with_scale(Method::Ole, scale))
                .unwrap();
            let atd = sc
                .score_batch(x.view(), Method::ClipnAtd, &with_scale(Method::Ole, scale))
                .unwrap();
            for (a, b) in ole.iter().zip(&atd) {
                assert!(rel(*a, *b) < 1e-12, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn adding_a_prototype_strictly_lowers_s() {
        let d = 16;
        let id = rand_unit(30, d, 3);
        let no = rand_unit(30, d, 4);
        let out = rand_unit(10, d, 5);
        let extra = rand_unit(1, d, 6);
        let more = ndarray::concatenate(Axis(0), &[out.view(), extra.view()]).unwrap();
        let x = rand_unit(50, d, 7);
        // Scale 5 keeps every term well above f64 rounding of the denominator.
        for with_no in [true, false] {
            let nov = with_no.then(|| no.view());
            let p = with_scale(Method::Ole, 5.0);
            let a = Scorer::new(id.view(), nov, out.view(), &p).unwrap();
            let b = Scorer::new(id.view(), nov, more.view(), &p).unwrap();
            for m in [Method::Ole, Method::OleMax] {
                let sa = a.score_batch(x.view(), m, &p).unwrap();
                let sb = b.score_batch(x.view(), m, &p).unwrap();
                for (u, v) in sa.iter().zip(&sb) {
                    assert!(v < u, "{m}: {v} !< {u}");
                }
            }
        }
    }

    #[test]
    fn ole_bounded_and_below_id_mass() {
        let d = 12;
        let id = rand_unit(40, d, 10);
        let no = rand_unit(40, d, 11);
        let out = rand_unit(20, d, 12);
        let x = rand_unit(60, d, 13);
        let with =
            Scorer::new(id.view(), Some(no.view()), out.view(), &params(Method::Ole)).unwrap();
        let without = Scorer::new(id.view(), None, out.view(), &params(Method::Ole)).unwrap();
        let p = params(Method::Ole);
        let s = with.score_batch(x.view(), Method::Ole, &p).unwrap();
        let mass = without.score_batch(x.view(), Method::Ole, &p).unwrap();
        for (a, b) in s.iter().zip(&mass) {
            assert!(*a > 0.0 && *a < 1.0, "{a}");
            assert!(a <= b && *b <= 1.0, "{a} > {b}");
        }
    }

    #[test]
    fn no_logits_to_minus_infinity_give_variant_a() {
        let id = [0.3f32, -0.2, 0.9, 0.1];
        let out = [0.5f32, 0.4];
        let no = [-1e30f32; 4];
        let k = Kernel {
            id: &id,
            no: &no,
            out: &out,
            tail: &[],
            tail_weight: 0.0,
            top_id: 2,
            id_max: 0.9,
            out_max: Some(0.5),
            scale: 50.0,
        };
        let mut buf = [0.0; 4];
        let a = k.ole(true, true, &mut buf);
        let b = k.ole(true, false, &mut buf);
        assert!(rel(a, b) < 1e-15, "{a} vs {b}");
    }

    /// Direct evaluation of docs/method.md §8 in f64 without max subtraction.
    fn naive_ole(l: &[f64], lb: &[f64], r: &[f64]) -> f64 {
        let z: f64 = l.iter().chain(r).map(|v| v.exp()).sum();
        l.iter()
            .zip(lb)
            .map(|(a, b)| a.exp() * (a.exp() / (a.exp() + b.exp())))
            .sum::<f64>()
            / z
    }

    #[test]
    fn log_space_matches_naive_f64() {
        // Kernel level: the same f32 cosines in both, |logits| ≤ 50 → relative 1e-9.
        let mut rng = SplitMix64(20);
        let mut u = || ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32;
        for _ in 0..200 {
            let id: Vec<f32> = (0..64).map(|_| u()).collect();
            let no: Vec<f32> = (0..64).map(|_| u()).collect();
            let out: Vec<f32> = (0..24).map(|_| u()).collect();
            let (top_id, id_max) = argmax(&id);
            for scale in [1.0f64, 10.0, 50.0] {
                let k = Kernel {
                    id: &id,
                    no: &no,
                    out: &out,
                    tail: &[],
                    tail_weight: 0.0,
                    top_id,
                    id_max,
                    out_max: Some(argmax(&out).1),
                    scale,
                };
                let lg =
                    |v: &[f32]| -> Vec<f64> { v.iter().map(|&c| scale * f64::from(c)).collect() };
                let (l, lb, r) = (lg(&id), lg(&no), lg(&out));
                let want = naive_ole(&l, &lb, &r);
                let mut buf = [0.0; 64];
                let got = k.ole(true, true, &mut buf);
                assert!(rel(got, want) < 1e-9, "s={scale} {got} vs {want}");
                let want_a = l.iter().map(|v| v.exp()).sum::<f64>()
                    / l.iter().chain(&r).map(|v| v.exp()).sum::<f64>();
                assert!(rel(k.ole(true, false, &mut buf), want_a) < 1e-9);
            }
        }
        // End to end: the GEMM rounds cosines differently from a per-row f32 dot (~1e-8),
        // so compare at a looser tolerance.
        let (c, m, d) = (64, 24, 32);
        let sc = random_scorer(c, m, d, true, 20);
        let x = rand_unit(30, d, 21);
        let p = with_scale(Method::Ole, 50.0);
        let got = sc.score_batch(x.view(), Method::Ole, &p).unwrap();
        for (i, xr) in x.rows().into_iter().enumerate() {
            let cosv = |w: ArrayView2<f32>| -> Vec<f64> {
                w.rows()
                    .into_iter()
                    .map(|r| {
                        50.0 * r
                            .iter()
                            .zip(&xr)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum::<f64>()
                    })
                    .collect()
            };
            let want = naive_ole(
                &cosv(sc.id()),
                &cosv(sc.no().unwrap()),
                &cosv(sc.outliers()),
            );
            assert!(rel(got[i], want) < 1e-5, "{} vs {want}", got[i]);
        }
    }

    #[test]
    fn extreme_logits_stay_finite() {
        let sc = random_scorer(20, 8, 8, true, 30);
        // x equal to an ID row and to the negation of an outlier: cosines ±1.
        let mut x = Array2::<f32>::zeros((3, 8));
        x.row_mut(0).assign(&sc.id().row(0));
        x.row_mut(1).assign(&sc.outliers().row(0));
        x.row_mut(2).assign(&sc.outliers().row(0).mapv(|v| -v));
        for scale in [100.0f32, 1000.0, 1e6] {
            for m in Method::ALL {
                let p = with_scale(m, scale);
                let got = sc.score_batch(x.view(), m, &p).unwrap();
                assert!(got.iter().all(|v| v.is_finite()), "{m} s={scale}: {got:?}");
            }
        }
        let p = with_scale(Method::Ole, 100.0);
        let s = sc.score_batch(x.view(), Method::Ole, &p).unwrap();
        assert!(s.iter().all(|v| *v > 0.0 && *v < 1.0), "{s:?}");
    }

    fn assert_close(a: &[f64], b: &[f64], what: &str) {
        assert_eq!(a.len(), b.len());
        for (u, v) in a.iter().zip(b) {
            assert!(rel(*u, *v) < 1e-12, "{what}: {u} vs {v}");
        }
    }

    #[test]
    fn row_order_invariance() {
        let d = 16;
        let (c, m) = (25, 9);
        let id = rand_unit(c, d, 40);
        let no = rand_unit(c, d, 41);
        let out = rand_unit(m, d, 42);
        let x = rand_unit(17, d, 43);
        let rev_id: Vec<usize> = (0..c).rev().collect();
        let rot_out: Vec<usize> = (0..m).map(|i| (i + 4) % m).collect();
        let id2 = id.select(Axis(0), &rev_id);
        let no2 = no.select(Axis(0), &rev_id);
        let out2 = out.select(Axis(0), &rot_out);
        let a = Scorer::new(
            id.view(),
            Some(no.view()),
            out.view(),
            &ScoreParams::default(),
        )
        .unwrap();
        let b = Scorer::new(
            id2.view(),
            Some(no2.view()),
            out2.view(),
            &ScoreParams::default(),
        )
        .unwrap();
        for meth in Method::ALL {
            let mut p = params(meth);
            if meth == Method::NegLabel {
                // The grouping is a permutation of row indices; with one group it is irrelevant.
                p.neglabel_groups = 1;
            }
            let sa = a.score_batch_detailed(x.view(), meth, &p).unwrap();
            let sb = b.score_batch_detailed(x.view(), meth, &p).unwrap();
            let fa: Vec<f64> = sa.iter().map(|r| r.score).collect();
            let fb: Vec<f64> = sb.iter().map(|r| r.score).collect();
            assert_close(&fa, &fb, meth.as_str());
            for (ra, rb) in sa.iter().zip(&sb) {
                assert_eq!(rev_id[rb.top_id], ra.top_id);
                assert_eq!(rb.top_outlier.map(|k| rot_out[k]), ra.top_outlier);
            }
            // Permuting the batch permutes the outputs.
            let perm: Vec<usize> = (0..x.nrows()).map(|i| (i * 5 + 3) % x.nrows()).collect();
            let xp = x.select(Axis(0), &perm);
            let sp = a.score_batch(xp.view(), meth, &p).unwrap();
            let want: Vec<f64> = perm.iter().map(|&i| fa[i]).collect();
            assert_close(&sp, &want, meth.as_str());
        }
    }

    /// An image scores the same alone as in any batch, up to f32 rounding: the GEMM takes a
    /// matrix–vector path for one row (and may block small batches differently), so dot
    /// products can differ in their last bits, as the encoder's outputs do (tests/encoder.rs).
    #[test]
    fn batch_equals_single() {
        let sc = random_scorer(300, 70, 512, true, 50);
        let x = rand_unit(33, 512, 51);
        let mut worst = 0.0f64;
        for meth in Method::ALL {
            let p = params(meth);
            let batch = sc.score_batch_detailed(x.view(), meth, &p).unwrap();
            for (i, row) in x.rows().into_iter().enumerate() {
                let xi = row.insert_axis(Axis(0));
                let single = sc.score_batch_detailed(xi, meth, &p).unwrap();
                let diff = (single[0].score - batch[i].score).abs() / batch[i].score.abs().max(1.0);
                worst = worst.max(diff);
                assert!(
                    diff < 1e-5,
                    "{meth} row {i}: {} vs {}",
                    single[0].score,
                    batch[i].score
                );
                assert_eq!(single[0].top_id, batch[i].top_id);
                assert_eq!(single[0].top_outlier, batch[i].top_outlier);
            }
        }
        println!("largest relative difference, alone vs in a batch: {worst:.1e}");
    }

    #[test]
    fn detailed_reports_top_rows() {
        let (sc, x) = toy();
        let r = sc
            .score_batch_detailed(x.view(), Method::Mcm, &params(Method::Mcm))
            .unwrap();
        assert_eq!(r[0].top_id, 0);
        assert_eq!(r[0].top_id_cos, 1.0);
        assert_eq!(r[0].top_outlier, Some(0));
        assert!((r[0].top_outlier_cos.unwrap() - 0.6).abs() < 1e-6);
        let id = array![[1.0f32, 0.0]];
        let empty = Array2::<f32>::zeros((0, 0));
        let sc = Scorer::new(id.view(), None, empty.view(), &ScoreParams::default()).unwrap();
        let r = sc
            .score_batch_detailed(x.view(), Method::Ole, &ScoreParams::default())
            .unwrap();
        assert_eq!(r[0].top_outlier, None);
        assert_eq!(r[0].top_outlier_cos, None);
        // One ID class and no outliers: the whole mass is on it.
        assert_eq!(r[0].score, 1.0);
    }

    #[test]
    fn errors_not_panics() {
        let (sc, _) = toy();
        let p = ScoreParams::default();
        let bad_dim = Array2::<f32>::zeros((1, 3));
        assert!(matches!(
            sc.score_batch(bad_dim.view(), Method::Ole, &p),
            Err(ScoreError::ShapeMismatch {
                expected: 2,
                got: 3,
                ..
            })
        ));
        let nan = array![[f32::NAN, 0.0]];
        assert_eq!(
            sc.score_batch(nan.view(), Method::Ole, &p),
            Err(ScoreError::NonFiniteInput { row: 0 })
        );
        let inf = array![[1.0f32, 0.0], [f32::INFINITY, 0.0]];
        assert_eq!(
            sc.score_batch(inf.view(), Method::Ole, &p),
            Err(ScoreError::NonFiniteInput { row: 1 })
        );
        let unnorm = array![[2.0f32, 0.0]];
        assert!(matches!(
            sc.score_batch(unnorm.view(), Method::Ole, &p),
            Err(ScoreError::NotNormalized { row: 0, .. })
        ));
        let empty = Array2::<f32>::zeros((0, 2));
        assert_eq!(sc.score_batch(empty.view(), Method::Ole, &p), Ok(vec![]));
        for bad in [
            ScoreParams { scale: 0.0, ..p },
            ScoreParams {
                scale: f32::NAN,
                ..p
            },
            ScoreParams {
                penalty_beta: -1.0,
                ..p
            },
            ScoreParams {
                neglabel_groups: 0,
                ..p
            },
        ] {
            let x = array![[1.0f32, 0.0]];
            assert!(matches!(
                sc.score_batch(x.view(), Method::Ole, &bad),
                Err(ScoreError::InvalidParam { .. })
            ));
        }

        let id = array![[1.0f32, 0.0], [0.0, 0.0]];
        let none = Array2::<f32>::zeros((0, 0));
        assert_eq!(
            Scorer::new(id.view(), None, none.view(), &p).unwrap_err(),
            ScoreError::BadBankRow { bank: "id", row: 1 }
        );
        let id = array![[1.0f32, 0.0]];
        let out = array![[1.0f32, f32::NAN]];
        assert_eq!(
            Scorer::new(id.view(), None, out.view(), &p).unwrap_err(),
            ScoreError::BadBankRow {
                bank: "outlier",
                row: 0
            }
        );
        let no = array![[1.0f32, 0.0], [0.0, 1.0]];
        assert!(matches!(
            Scorer::new(id.view(), Some(no.view()), none.view(), &p),
            Err(ScoreError::ShapeMismatch { .. })
        ));
        let out3 = Array2::<f32>::ones((2, 3));
        assert!(matches!(
            Scorer::new(id.view(), None, out3.view(), &p),
            Err(ScoreError::ShapeMismatch { .. })
        ));
        let empty_id = Array2::<f32>::zeros((0, 2));
        assert!(matches!(
            Scorer::new(empty_id.view(), None, none.view(), &p),
            Err(ScoreError::EmptyIdBank { .. })
        ));
        let sc = Scorer::new(id.view(), None, none.view(), &p).unwrap();
        let x = array![[1.0f32, 0.0]];
        assert_eq!(
            sc.score_batch(x.view(), Method::NegLabel, &params(Method::NegLabel)),
            Err(ScoreError::NoOutliers {
                method: Method::NegLabel
            })
        );
    }

    #[test]
    fn bank_rows_are_renormalised() {
        let id = array![[3.0f32, 4.0], [0.0, 2.0]];
        let no = array![[0.0f32, 5.0], [-1.0, -1.0]];
        let out = array![[10.0f32, 0.0]];
        let sc = Scorer::new(
            id.view(),
            Some(no.view()),
            out.view(),
            &ScoreParams::default(),
        )
        .unwrap();
        for w in [sc.id(), sc.no().unwrap(), sc.outliers()] {
            for r in w.rows() {
                let n = r.dot(&r).sqrt();
                assert!((n - 1.0).abs() < 1e-6, "{n}");
            }
        }
        assert!((sc.id()[[0, 0]] - 0.6).abs() < 1e-7);
        assert_eq!((sc.n_id(), sc.n_outliers(), sc.dim()), (2, 1, 2));
        assert!(sc.has_no_embeddings());
    }

    #[test]
    fn neglabel_params_override_precomputed_grouping() {
        let sc = random_scorer(20, 40, 8, false, 60);
        let x = rand_unit(5, 8, 61);
        let p = ScoreParams {
            neglabel_groups: 4,
            neglabel_seed: 9,
            ..params(Method::NegLabel)
        };
        let pre = Scorer::new(sc.id(), None, sc.outliers(), &p).unwrap();
        let a = sc.score_batch(x.view(), Method::NegLabel, &p).unwrap();
        let b = pre.score_batch(x.view(), Method::NegLabel, &p).unwrap();
        assert_eq!(a, b);
    }

    /// `cargo test --release --lib detect::scorer::tests::timing -- --ignored --nocapture`
    /// Prints the best of 30 batches of 64 (robust to a busy machine).
    #[test]
    #[ignore = "timing print, not a test"]
    fn timing() {
        fn best_us_per_image(mut f: impl FnMut()) -> f64 {
            f();
            (0..30)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
                / 64.0
                * 1e6
        }
        let d = 512;
        for with_no in [false, true] {
            let sc = random_scorer(1000, 200, d, with_no, 70);
            let x = rand_unit(64, d, 71);
            let w = sc.bank.view();
            let gemm = best_us_per_image(|| {
                std::hint::black_box(cosines(x.view(), w));
            });
            println!(
                "1000 ID + 200 outliers, T̄: {with_no}; GEMM alone over all {} rows: {gemm:.2} µs / image",
                w.nrows()
            );
            for m in Method::ALL {
                if m.requires_no_embeddings() && !with_no {
                    continue;
                }
                let p = params(m);
                let t = best_us_per_image(|| {
                    std::hint::black_box(sc.score_batch(x.view(), m, &p).unwrap());
                });
                println!("  {m:12} {t:6.2} µs / image");
            }
        }
    }

    /// Unit vectors around `centers` random directions (a crude stand-in for word embeddings,
    /// which cluster), `spread` = noise relative to the centre.
    fn clustered_unit(
        rows: usize,
        dim: usize,
        centers: usize,
        spread: f32,
        seed: u64,
    ) -> Array2<f32> {
        let c = rand_unit(centers, dim, seed);
        let noise = rand_unit(rows, dim, seed + 1);
        let mut a = Array2::from_shape_fn((rows, dim), |(i, j)| {
            c[[i % centers, j]] + spread * noise[[i, j]]
        });
        normalize_rows(&mut a);
        a
    }

    fn approximate(sc: &Scorer, p: crate::detect::approx::ApproxParams) -> Scorer {
        use crate::detect::index::{IndexParams, VectorIndex};
        let ix = VectorIndex::build(sc.outliers(), IndexParams::default());
        sc.clone().with_approximation(Arc::new(ix), p).unwrap()
    }

    #[test]
    fn approximation_with_the_whole_bank_as_tail_sample_is_exact() {
        use crate::detect::approx::ApproxParams;
        let (d, m) = (32, 3000);
        let id = clustered_unit(50, d, 10, 0.5, 80);
        let out = clustered_unit(m, d, 40, 0.5, 81);
        let x = clustered_unit(40, d, 10, 0.6, 82);
        for with_no in [false, true] {
            let no = rand_unit(50, d, 83);
            let sc = Scorer::new(
                id.view(),
                with_no.then(|| no.view()),
                out.view(),
                &params(Method::Ole),
            )
            .unwrap();
            let p = ApproxParams {
                exact_limit: 0,
                candidates: 32,
                tail_sample: m,
                ..ApproxParams::default()
            };
            let ap = approximate(&sc, p);
            assert!(ap.is_approximate());
            for method in [
                Method::Ole,
                Method::OleMax,
                Method::OlePenalty,
                Method::NegLabel,
                Method::Mcm,
            ] {
                let pp = params(method);
                let e = sc.score_batch_detailed(x.view(), method, &pp).unwrap();
                let a = ap.score_batch_detailed(x.view(), method, &pp).unwrap();
                for (e, a) in e.iter().zip(&a) {
                    // HNSW hands back 1 − (1 − cos) in f32: the head's cosines can be off by
                    // ~1e-7, i.e. logits by ~5e-6 at s = 50.
                    assert!(
                        rel(e.score, a.score) < 2e-5,
                        "{method}: exact {} approx {}",
                        e.score,
                        a.score
                    );
                    assert_eq!(e.top_id, a.top_id);
                }
            }
        }
        // Within the limit the scorer stays exact.
        let sc = Scorer::new(id.view(), None, out.view(), &params(Method::Ole)).unwrap();
        assert!(
            !approximate(
                &sc,
                ApproxParams {
                    exact_limit: m,
                    ..ApproxParams::default()
                }
            )
            .is_approximate()
        );
    }

    #[test]
    fn approximate_ole_tracks_exact_ole_on_a_large_bank() {
        use crate::detect::approx::ApproxParams;
        let (d, m) = (64, 20_000);
        let id = clustered_unit(200, d, 20, 0.4, 90);
        let out = clustered_unit(m, d, 200, 0.6, 91);
        // Queries near ID classes and near outlier clusters.
        let mut x = clustered_unit(100, d, 20, 0.7, 92);
        let xo = clustered_unit(100, d, 200, 0.7, 91);
        x.append(ndarray::Axis(0), xo.view()).unwrap();
        let sc = Scorer::new(id.view(), None, out.view(), &params(Method::Ole)).unwrap();
        let p = ApproxParams {
            exact_limit: 10_000,
            ..ApproxParams::default()
        };
        let ap = approximate(&sc, p);
        let pp = params(Method::Ole);
        let e = sc.score_batch_detailed(x.view(), Method::Ole, &pp).unwrap();
        let a = ap.score_batch_detailed(x.view(), Method::Ole, &pp).unwrap();
        let mut errs: Vec<f64> = e
            .iter()
            .zip(&a)
            .map(|(e, a)| rel(e.score, a.score))
            .collect();
        errs.sort_by(f64::total_cmp);
        let top_agree = e
            .iter()
            .zip(&a)
            .filter(|(e, a)| e.top_outlier == a.top_outlier)
            .count();
        println!(
            "approx vs exact OLE over {} queries: median rel err {:.4}, p95 {:.4}, max {:.4}; top outlier agrees {top_agree}",
            errs.len(),
            errs[errs.len() / 2],
            errs[errs.len() * 95 / 100],
            errs[errs.len() - 1]
        );
        assert!(
            errs[errs.len() / 2] < 0.01,
            "median {}",
            errs[errs.len() / 2]
        );
        assert!(
            errs[errs.len() * 95 / 100] < 0.1,
            "p95 {}",
            errs[errs.len() * 95 / 100]
        );
        assert!(top_agree >= 190, "{top_agree}");
        // Decisions at a threshold keeping 95% of the ID-like queries (exact scores).
        let mut id_scores: Vec<f64> = e[..100].iter().map(|r| r.score).collect();
        id_scores.sort_by(f64::total_cmp);
        let thr = id_scores[5];
        let flips = e
            .iter()
            .zip(&a)
            .filter(|(e, a)| (e.score < thr) != (a.score < thr))
            .count();
        println!(
            "decisions that differ at the 95%-TPR threshold: {flips} of {}",
            e.len()
        );
        assert!(flips <= 2, "{flips}");
        // Ranking is what a threshold sees: the order of scores is nearly the same.
        let (mut concord, mut pairs) = (0usize, 0usize);
        for i in 0..e.len() {
            for j in i + 1..e.len() {
                let de = e[i].score - e[j].score;
                let da = a[i].score - a[j].score;
                if de.abs() > 1e-12 {
                    pairs += 1;
                    concord += usize::from(de * da > 0.0);
                }
            }
        }
        let tau = concord as f64 / pairs as f64;
        println!("pairwise order agreement {tau:.4}");
        assert!(tau > 0.99, "{tau}");
    }
}
