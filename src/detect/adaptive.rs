//! The adaptive detector (docs/adaptive.md): a bounded memory of confident-OOD image
//! embeddings seen in the stream, folded into the score as a capped, one-sided kNN penalty.
//!
//! - Admission looks at the static score only (S < `admit_below`), never at the adaptive one,
//!   so there is no feedback loop; a rate cap bounds floods.
//! - Scoring: q_k = the k-th largest cosine to the entries; a = clamp((q_k − b)/(1 − b), 0, 1);
//!   S_adapt = S_static − max_penalty · a. Fewer than k entries: no penalty.
//! - Sequential semantics: image i sees the admissions of images 1..i−1 in input order, never
//!   its own, whatever the batch split; dot products use a fixed summation order, so the same
//!   input order gives the same scores bit for bit.
//! - Folding an admission is structural (bucket caps, FIFO and age eviction by sequence
//!   number), with no floating-point decision, so replicas that fold the same records in the
//!   same order hold identical memories.

use std::collections::VecDeque;

use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

/// Knobs of the memory (`detector.adaptive.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveParams {
    /// N: entries at most. Default 2,000.
    pub capacity: usize,
    /// k of the k-th largest cosine. Default 5.
    pub k: usize,
    /// b: cosines at or below it add nothing. Default [`FALLBACK_FLOOR`]; the offline commands
    /// and the daemon use the bank's calibrated floor unless one is configured.
    pub floor: f32,
    /// Entries per bucket (predicted ID class) at most; the bucket's oldest goes first.
    /// Default 100 (5% of N).
    pub bucket_cap: usize,
    /// Admissions per 1,000 consecutive inputs at most (the excess is counted and dropped).
    /// Default 20.
    pub admit_per_mille: usize,
    /// Entries older than this (producer time, ms) than the newest are dropped; 0 = never.
    pub max_age_ms: u64,
}

impl Default for AdaptiveParams {
    fn default() -> Self {
        AdaptiveParams {
            capacity: 2000,
            k: 5,
            floor: FALLBACK_FLOOR,
            bucket_cap: 100,
            admit_per_mille: 20,
            max_age_ms: 24 * 3600 * 1000,
        }
    }
}

/// Thresholds from the ID calibration scores (`calibrate --write` stores them per method).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveCalibration {
    /// λ_out = Q_ID(q_out): images scoring below it are admitted.
    pub admit_below: f64,
    /// Δ_max = Q_ID(q0 + ε) − Q_ID(q0): the largest penalty; only ID images within Δ_max above
    /// the threshold can flip, at most ε of ID traffic.
    pub max_penalty: f64,
    /// q_out the calibration used.
    pub q_out: f64,
    /// ε the calibration used.
    pub epsilon: f64,
    /// The floor b chosen from the same ID inputs (absent in banks calibrated before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<FloorCalibration>,
}

/// b from ID data (docs/adaptive.md §2): the `quantile` of each calibration ID embedding's
/// k-th largest cosine to the other ones, over an evenly spaced sample of at most `sample`
/// (the memory's size): were the memory full of ID images, about 1 − `quantile` of ID inputs
/// would get any penalty at all.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FloorCalibration {
    pub value: f64,
    pub quantile: f64,
    pub k: usize,
    /// Embeddings in the sample.
    pub n: usize,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdaptiveError {
    #[error("detector.adaptive.{name} = {value}: {reason}")]
    InvalidParam {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("an admission of dimension {got} for a memory of dimension {want}")]
    Dimension { got: usize, want: usize },
}

impl AdaptiveParams {
    pub fn validate(&self) -> Result<(), AdaptiveError> {
        let bad = |name, value: String, reason| {
            Err(AdaptiveError::InvalidParam {
                name,
                value,
                reason,
            })
        };
        if self.capacity == 0 {
            return bad("capacity", "0".into(), "must be at least 1");
        }
        if self.k == 0 || self.k > self.capacity {
            return bad("k", self.k.to_string(), "must lie in 1..=capacity");
        }
        if !(self.floor.is_finite() && (-1.0..1.0).contains(&self.floor)) {
            return bad("floor", self.floor.to_string(), "must lie in [-1, 1)");
        }
        if self.bucket_cap == 0 {
            return bad("bucket_cap", "0".into(), "must be at least 1");
        }
        if self.admit_per_mille > 1000 {
            return bad(
                "admit_per_mille",
                self.admit_per_mille.to_string(),
                "must lie in 0..=1000",
            );
        }
        Ok(())
    }
}

/// b when none is configured and the calibration chose none (banks calibrated before it).
pub const FALLBACK_FLOOR: f32 = 0.75;

impl AdaptiveCalibration {
    /// b: the configured floor, else the calibrated one, else [`FALLBACK_FLOOR`].
    pub fn resolve_floor(&self, configured: Option<f32>) -> f32 {
        configured
            .or(self.floor.map(|f| f.value as f32))
            .unwrap_or(FALLBACK_FLOOR)
    }

    pub fn validate(&self) -> Result<(), AdaptiveError> {
        if !self.admit_below.is_finite() {
            return Err(AdaptiveError::InvalidParam {
                name: "admit_below",
                value: self.admit_below.to_string(),
                reason: "must be finite",
            });
        }
        if !(self.max_penalty.is_finite() && self.max_penalty >= 0.0) {
            return Err(AdaptiveError::InvalidParam {
                name: "max_penalty",
                value: self.max_penalty.to_string(),
                reason: "must be finite and >= 0",
            });
        }
        Ok(())
    }
}

/// One admitted image, as folded (and, shared, as published).
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// Unit image embedding.
    pub embedding: Vec<f32>,
    /// Predicted ID class (argmax over the ID cosines, lowest index on ties).
    pub bucket: u32,
    /// The static score that admitted it.
    pub score: f64,
    /// Producer time in ms (0 when unknown: age never expires it).
    pub ts_ms: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    bucket: u32,
    ts_ms: u64,
    /// Its column in [`Packed`].
    slot: usize,
}

/// Entries per packed block: one vector lane each.
const BLOCK: usize = 16;
/// Images scored together against a block.
const GROUP: usize = 8;

/// The entries' embeddings, transposed in blocks of [`BLOCK`]: block b holds, for every
/// dimension k, the k-th component of slots 16b..16b+16 side by side. One pass over a block
/// gives 16 cosines per image with plain vector multiply-adds and no horizontal sums. Slots
/// of evicted entries are reused; a slot's position never changes a cosine.
#[derive(Debug, Clone, Default)]
struct Packed {
    data: Vec<f32>,
    free: Vec<usize>,
    next: usize,
}

impl Packed {
    fn insert(&mut self, e: &[f32]) -> usize {
        let dim = e.len();
        let slot = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        let (b, l) = (slot / BLOCK, slot % BLOCK);
        if self.data.len() < (b + 1) * dim * BLOCK {
            self.data.resize((b + 1) * dim * BLOCK, 0.0);
        }
        let base = b * dim * BLOCK + l;
        for (k, v) in e.iter().enumerate() {
            self.data[base + k * BLOCK] = *v;
        }
        slot
    }
    fn release(&mut self, slot: usize) {
        self.free.push(slot);
    }
    fn clear(&mut self) {
        self.free.clear();
        self.next = 0;
    }
    fn blocks(&self) -> usize {
        self.next.div_ceil(BLOCK)
    }
}

/// What happens to the images a batch admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Folded into this memory at once (one worker, or offline).
    Fold,
    /// Reported in [`Adapted::admitted`] only: the caller publishes them and the shared log
    /// folds them in, in its order.
    Report,
    /// Not gated at all.
    Off,
}

/// What the adaptive term did to one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adapted {
    /// S_adapt: the score used for the decision.
    pub score: f64,
    /// S_static.
    pub static_score: f64,
    /// max_penalty · a (0 when inactive).
    pub penalty: f64,
    /// Whether the memory held at least k entries when the image was scored.
    pub active: bool,
    /// The sequence number of the last admission folded when the image was scored.
    pub seq: u64,
    /// Whether this image was admitted (after it was scored).
    pub admitted: bool,
}

/// Counters for `/metrics` and `/info`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct AdaptiveStats {
    pub entries: usize,
    pub admissions: u64,
    pub evictions: u64,
    /// Admissions dropped by the rate cap.
    pub rate_limited: u64,
    /// The last folded sequence number.
    pub seq: u64,
}

/// One memory shared by the pipeline's scoring, its shared-sync reader and `/info`.
pub type SharedMemory = std::sync::Arc<std::sync::Mutex<AdaptiveMemory>>;

/// The memory and its gate.
#[derive(Debug, Clone)]
pub struct AdaptiveMemory {
    params: AdaptiveParams,
    calib: AdaptiveCalibration,
    dim: usize,
    /// Ascending by `seq`.
    entries: Vec<Entry>,
    packed: Packed,
    /// Entries per bucket.
    per_bucket: std::collections::HashMap<u32, usize>,
    max_ts_ms: u64,
    stats: AdaptiveStats,
    /// Input counter and the input numbers of recent admissions (the rate window).
    inputs: u64,
    recent: VecDeque<u64>,
}

impl AdaptiveMemory {
    pub fn new(
        params: AdaptiveParams,
        calib: AdaptiveCalibration,
        dim: usize,
    ) -> Result<Self, AdaptiveError> {
        params.validate()?;
        calib.validate()?;
        Ok(AdaptiveMemory {
            params,
            calib,
            dim,
            entries: Vec::new(),
            packed: Packed::default(),
            per_bucket: Default::default(),
            max_ts_ms: 0,
            stats: AdaptiveStats::default(),
            inputs: 0,
            recent: VecDeque::new(),
        })
    }

    pub fn params(&self) -> &AdaptiveParams {
        &self.params
    }
    pub fn calibration(&self) -> &AdaptiveCalibration {
        &self.calib
    }
    pub fn stats(&self) -> AdaptiveStats {
        AdaptiveStats {
            entries: self.entries.len(),
            ..self.stats
        }
    }

    /// Forgets every entry (a reset); counters and the sequence carry on.
    pub fn clear(&mut self) {
        self.stats.evictions += self.entries.len() as u64;
        self.entries.clear();
        self.packed.clear();
        self.per_bucket.clear();
        self.max_ts_ms = 0;
    }

    /// The gate on the static score, with the rate cap: counts one input, and says whether it
    /// is admitted. Deterministic in the input order.
    pub fn gate(&mut self, static_score: f64) -> bool {
        self.inputs += 1;
        if static_score >= self.calib.admit_below {
            return false;
        }
        while self
            .recent
            .front()
            .is_some_and(|&i| i + 1000 <= self.inputs)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.params.admit_per_mille {
            self.stats.rate_limited += 1;
            return false;
        }
        self.recent.push_back(self.inputs);
        true
    }

    /// Folds one admission: ages out old entries, evicts the bucket's oldest when the bucket is
    /// full, else the oldest overall when the memory is full, and appends. Returns its `seq`.
    pub fn fold(&mut self, a: Admission) -> Result<u64, AdaptiveError> {
        if a.embedding.len() != self.dim {
            return Err(AdaptiveError::Dimension {
                got: a.embedding.len(),
                want: self.dim,
            });
        }
        self.max_ts_ms = self.max_ts_ms.max(a.ts_ms);
        if self.params.max_age_ms > 0 {
            let cutoff = self.max_ts_ms.saturating_sub(self.params.max_age_ms);
            let before = self.entries.len();
            let (per_bucket, packed) = (&mut self.per_bucket, &mut self.packed);
            self.entries.retain(|e| {
                let keep = e.ts_ms == 0 || e.ts_ms >= cutoff;
                if !keep {
                    if let Some(n) = per_bucket.get_mut(&e.bucket) {
                        *n -= 1;
                    }
                    packed.release(e.slot);
                }
                keep
            });
            self.stats.evictions += (before - self.entries.len()) as u64;
        }
        let in_bucket = self.per_bucket.get(&a.bucket).copied().unwrap_or(0);
        let victim = if in_bucket >= self.params.bucket_cap {
            self.entries.iter().position(|e| e.bucket == a.bucket)
        } else if self.entries.len() >= self.params.capacity {
            Some(0)
        } else {
            None
        };
        if let Some(i) = victim {
            let e = self.entries.remove(i);
            if let Some(n) = self.per_bucket.get_mut(&e.bucket) {
                *n -= 1;
            }
            self.packed.release(e.slot);
            self.stats.evictions += 1;
        }
        self.stats.seq += 1;
        self.stats.admissions += 1;
        *self.per_bucket.entry(a.bucket).or_insert(0) += 1;
        let slot = self.packed.insert(&a.embedding);
        self.entries.push(Entry {
            seq: self.stats.seq,
            bucket: a.bucket,
            ts_ms: a.ts_ms,
            slot,
        });
        Ok(self.stats.seq)
    }

    /// The penalty of one k-th largest cosine.
    fn penalty(&self, qk: Option<f32>) -> f64 {
        let Some(q) = qk else { return 0.0 };
        let b = f64::from(self.params.floor);
        let a = ((f64::from(q) - b) / (1.0 - b)).clamp(0.0, 1.0);
        self.calib.max_penalty * a
    }

    /// Scores a batch in input order: each row of `x` (unit embeddings) with its static score
    /// and bucket sees the memory as it was after the previous rows' admissions, and is then
    /// gated and, when admitted (`ts_ms` is its producer time), folded in as `admit` says.
    pub fn score_batch(
        &mut self,
        x: ArrayView2<'_, f32>,
        statics: &[(f64, u32)],
        ts_ms: &[u64],
        admit_mode: Admit,
    ) -> Result<Vec<Adapted>, AdaptiveError> {
        if x.ncols() != self.dim {
            return Err(AdaptiveError::Dimension {
                got: x.ncols(),
                want: self.dim,
            });
        }
        let n = x.nrows();
        // Admissions depend on the static scores only, so they are known before scoring.
        let admit: Vec<bool> = statics
            .iter()
            .map(|&(s, _)| admit_mode != Admit::Off && self.gate(s))
            .collect();
        // Cosines to the entries present before the batch: block by block over the packed
        // embeddings (each read once per batch), eight images at a time.
        let rows: Vec<&[f32]> = (0..n).map(|i| row(&x, i)).collect();
        let d = self.dim;
        let blocks = self.packed.blocks();
        let mut pre = vec![0f32; blocks * n * BLOCK];
        let mut xt = vec![0f32; d * GROUP];
        for (g, imgs) in rows.chunks(GROUP).enumerate() {
            // The group's images transposed (zero rows pad the last group; their cosines are
            // discarded and touch no other image's arithmetic).
            xt.iter_mut().for_each(|v| *v = 0.0);
            for (j, r) in imgs.iter().enumerate() {
                for (k, v) in r.iter().enumerate().take(d) {
                    xt[k * GROUP + j] = *v;
                }
            }
            for b in 0..blocks {
                let block = &self.packed.data[b * d * BLOCK..(b + 1) * d * BLOCK];
                let acc = block_dots(block, &xt);
                for (j, a) in acc.iter().enumerate().take(imgs.len()) {
                    let i = g * GROUP + j;
                    pre[(b * n + i) * BLOCK..(b * n + i + 1) * BLOCK].copy_from_slice(a);
                }
            }
        }
        let pre_seq = self.stats.seq;
        // Cosines of the batch's own admissions: (seq, cosine per image).
        let mut fresh: Vec<(u64, Vec<f32>)> = Vec::new();
        let mut out = Vec::with_capacity(n);
        let k = self.params.k;
        let mut top = Vec::with_capacity(k + 1);
        for i in 0..n {
            top.clear();
            for e in &self.entries {
                let c = if e.seq <= pre_seq {
                    pre[((e.slot / BLOCK) * n + i) * BLOCK + e.slot % BLOCK]
                } else {
                    fresh
                        .iter()
                        .find(|(s, _)| *s == e.seq)
                        .map_or(f32::NEG_INFINITY, |(_, c)| c[i])
                };
                push_top(&mut top, c, k);
            }
            let active = self.entries.len() >= k;
            let qk = if active { top.last().copied() } else { None };
            let penalty = self.penalty(qk);
            let (static_score, bucket) = statics[i];
            out.push(Adapted {
                score: static_score - penalty,
                static_score,
                penalty,
                active,
                seq: self.stats.seq,
                admitted: admit[i],
            });
            if admit[i] && admit_mode == Admit::Fold {
                let seq = self.fold(Admission {
                    embedding: rows[i].to_vec(),
                    bucket,
                    score: static_score,
                    ts_ms: ts_ms.get(i).copied().unwrap_or(0),
                })?;
                fresh.push((seq, rows.iter().map(|r| dot(rows[i], r)).collect()));
            }
        }
        Ok(out)
    }
}

/// Scores the rows of `x` through `mem` in the stream order `order` (indices into `x`), in
/// batches of `batch`, admitting as it goes (local mode); returns the results by row of `x`.
/// The offline form of the daemon's stream (`score --adaptive`, `eval --adaptive`).
pub fn run_stream(
    mem: &mut AdaptiveMemory,
    x: ArrayView2<'_, f32>,
    statics: &[(f64, u32)],
    order: &[usize],
    batch: usize,
) -> Result<Vec<Adapted>, AdaptiveError> {
    let d = x.ncols();
    let mut out: Vec<Option<Adapted>> = vec![None; x.nrows()];
    for chunk in order.chunks(batch.max(1)) {
        let mut xb = ndarray::Array2::<f32>::zeros((chunk.len(), d));
        for (mut dst, &i) in xb.rows_mut().into_iter().zip(chunk) {
            dst.assign(&x.row(i));
        }
        let sb: Vec<(f64, u32)> = chunk.iter().map(|&i| statics[i]).collect();
        for (a, &i) in mem
            .score_batch(xb.view(), &sb, &[], Admit::Fold)?
            .into_iter()
            .zip(chunk)
        {
            out[i] = Some(a);
        }
    }
    Ok(out
        .into_iter()
        .zip(statics)
        .map(|(a, &(s, _))| {
            a.unwrap_or(Adapted {
                score: s,
                static_score: s,
                penalty: 0.0,
                active: false,
                seq: 0,
                admitted: false,
            })
        })
        .collect())
}

/// `0..n` in a seeded random order (Fisher–Yates with SplitMix64): ID and OOD inputs
/// interleaved as a stream would mix them.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut rng = crate::detect::rng::SplitMix64(seed);
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
    v
}

/// Inserts `v` into the descending list `top` of at most `k` values.
fn push_top(top: &mut Vec<f32>, v: f32, k: usize) {
    if top.len() == k && top.last().is_some_and(|&l| v <= l) {
        return;
    }
    let at = top.partition_point(|&t| t >= v);
    top.insert(at, v);
    top.truncate(k);
}

fn row<'a>(x: &'a ArrayView2<'_, f32>, i: usize) -> &'a [f32] {
    // Embedding matrices are standard layout (the encoder's output, or read from .npy).
    x.row(i).to_slice().unwrap_or(&[])
}

/// The cosines of one packed block with a transposed group of images: `xt[k·8 + j]` is
/// component k of image j; returns, per image, the 16 lanes' cosines.
///
/// Each cosine is summed the same way everywhere: one accumulator, k = 0, 1, … in order, a
/// multiply then an add (never fused, so the same bits on any machine); [`dot`] does exactly
/// that. Scores therefore do not depend on how the stream was batched or which slot an entry
/// sits in, which a GEMM's blocking does not promise: the reason for hand-writing it
/// (measured in `benches/adaptive.rs`).
fn block_dots(block: &[f32], xt: &[f32]) -> [[f32; BLOCK]; GROUP] {
    let (ec, _) = block.as_chunks::<BLOCK>();
    let (xc, _) = xt.as_chunks::<GROUP>();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { block_dots_avx512(ec, xc) };
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX (checked just above).
            return unsafe { block_dots_avx(ec, xc) };
        }
    }
    block_dots_portable(ec, xc)
}

fn block_dots_portable(ec: &[[f32; BLOCK]], xc: &[[f32; GROUP]]) -> [[f32; BLOCK]; GROUP] {
    let mut acc = [[0f32; BLOCK]; GROUP];
    for (e, x) in ec.iter().zip(xc) {
        for (a, &xj) in acc.iter_mut().zip(x) {
            for (al, el) in a.iter_mut().zip(e) {
                *al += el * xj;
            }
        }
    }
    acc
}

// The compiler's vectoriser turns the portable loop above into gathers along k, ten times
// slower than this (measured: benches/adaptive.rs), hence the intrinsics. Both keep the
// portable loop's arithmetic exactly: per lane, a multiply then an add, k in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn block_dots_avx512(ec: &[[f32; BLOCK]], xc: &[[f32; GROUP]]) -> [[f32; BLOCK]; GROUP] {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); GROUP];
    for (e, x) in ec.iter().zip(xc) {
        // SAFETY: `e` is 16 contiguous f32, exactly one unaligned 512-bit load.
        let ev = unsafe { _mm512_loadu_ps(e.as_ptr()) };
        for (a, &xj) in acc.iter_mut().zip(x) {
            *a = _mm512_add_ps(*a, _mm512_mul_ps(ev, _mm512_set1_ps(xj)));
        }
    }
    let mut out = [[0f32; BLOCK]; GROUP];
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: `o` is 16 contiguous f32, exactly one unaligned 512-bit store.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), a) };
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn block_dots_avx(ec: &[[f32; BLOCK]], xc: &[[f32; GROUP]]) -> [[f32; BLOCK]; GROUP] {
    use std::arch::x86_64::*;
    let mut lo = [_mm256_setzero_ps(); GROUP];
    let mut hi = [_mm256_setzero_ps(); GROUP];
    for (e, x) in ec.iter().zip(xc) {
        // SAFETY: `e` is 16 contiguous f32: two unaligned 256-bit loads at 0 and 8.
        let (el, eh) = unsafe {
            (
                _mm256_loadu_ps(e.as_ptr()),
                _mm256_loadu_ps(e.as_ptr().add(8)),
            )
        };
        for ((l, h), &xj) in lo.iter_mut().zip(hi.iter_mut()).zip(x) {
            let xv = _mm256_set1_ps(xj);
            *l = _mm256_add_ps(*l, _mm256_mul_ps(el, xv));
            *h = _mm256_add_ps(*h, _mm256_mul_ps(eh, xv));
        }
    }
    let mut out = [[0f32; BLOCK]; GROUP];
    for ((o, l), h) in out.iter_mut().zip(lo).zip(hi) {
        // SAFETY: `o` is 16 contiguous f32: two unaligned 256-bit stores at 0 and 8.
        unsafe {
            _mm256_storeu_ps(o.as_mut_ptr(), l);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), h);
        }
    }
    out
}

/// ⟨a, b⟩ summed exactly as [`block_dots`] sums each cosine.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (x, y) in a.iter().zip(b) {
        acc += y * x;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor actually used: the configured one, else the calibrated one, else 0.75.
    #[test]
    fn floor_resolution_order() {
        let mut c = AdaptiveCalibration {
            admit_below: 0.1,
            max_penalty: 0.05,
            q_out: 0.01,
            epsilon: 0.03,
            floor: None,
        };
        assert_eq!(c.resolve_floor(None), 0.75);
        assert_eq!(c.resolve_floor(Some(0.5)), 0.5);
        c.floor = Some(FloorCalibration {
            value: 0.625,
            quantile: 0.95,
            k: 5,
            n: 100,
        });
        assert_eq!(c.resolve_floor(None), 0.625);
        assert_eq!(c.resolve_floor(Some(0.5)), 0.5);
        // Banks calibrated before the floor existed still load.
        let old: AdaptiveCalibration = serde_json::from_str(
            r#"{"admit_below":0.1,"max_penalty":0.05,"q_out":0.01,"epsilon":0.03}"#,
        )
        .unwrap();
        assert_eq!(old.floor, None);
    }
    use ndarray::array;

    /// docs/adaptive.md §5.7 (the worked example of the design): ID mass at s = 10 over
    /// t1..t3 = e1..e3 and negatives e4, e5; λ_out = 0.30, Δ_max = 0.20, b = 0.70, k = 1.
    fn id_mass(x: &[f32]) -> (f64, u32) {
        let s = 10.0;
        let a: f64 = x[..3].iter().map(|&c| (s * f64::from(c)).exp()).sum();
        let b: f64 = x[3..5].iter().map(|&c| (s * f64::from(c)).exp()).sum();
        let bucket = x[..3]
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |m, (i, &c)| if c > m.1 { (i, c) } else { m },
            )
            .0;
        (a / (a + b), bucket as u32)
    }

    fn toy(k: usize) -> AdaptiveMemory {
        AdaptiveMemory::new(
            AdaptiveParams {
                k,
                floor: 0.70,
                max_age_ms: 0,
                ..AdaptiveParams::default()
            },
            AdaptiveCalibration {
                admit_below: 0.30,
                max_penalty: 0.20,
                q_out: 0.01,
                epsilon: 0.03,
                floor: None,
            },
            6,
        )
        .unwrap()
    }

    fn stream() -> ndarray::Array2<f32> {
        array![
            [0.0f32, 0.0, 0.0, 0.6, 0.0, 0.8],
            [0.48, 0.0, 0.0, 0.36, 0.0, 0.8],
            [0.0, 0.8, 0.0, 0.0, 0.0, 0.6],
        ]
    }

    fn run(mem: &mut AdaptiveMemory, x: &ndarray::Array2<f32>, batch: usize) -> Vec<Adapted> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < x.nrows() {
            let end = (start + batch).min(x.nrows());
            let v = x.slice(ndarray::s![start..end, ..]);
            let statics: Vec<(f64, u32)> = v
                .rows()
                .into_iter()
                .map(|r| id_mass(r.as_slice().unwrap()))
                .collect();
            out.extend(mem.score_batch(v, &statics, &[], Admit::Fold).unwrap());
            start = end;
        }
        out
    }

    #[test]
    fn the_worked_example_by_hand() {
        let x = stream();
        let statics: Vec<f64> = x
            .rows()
            .into_iter()
            .map(|r| id_mass(r.as_slice().unwrap()).0)
            .collect();
        for (s, want) in statics
            .iter()
            .zip([0.0073632498, 0.7666280862, 0.9993299738])
        {
            // The table is in f64; the f32 embedding (0.6f32 ≠ 0.6) moves it by ~2e-9.
            assert!((s - want).abs() < 1e-7, "{s}");
        }
        for batch in [1, 2, 3] {
            let mut mem = toy(1);
            let out = run(&mut mem, &x, batch);
            // x1: empty memory, no penalty, admitted (seq 1, bucket 0 by the lowest index).
            assert_eq!(out[0].penalty, 0.0);
            assert!(!out[0].active && out[0].admitted && out[0].seq == 0);
            // x2: q1 = ⟨x2, x1⟩ = 0.856, a = 0.52, penalty 0.104: ID by static, OOD now.
            assert!((out[1].penalty - 0.104).abs() < 1e-6, "{:?}", out[1]);
            assert!((out[1].score - 0.6626280862).abs() < 1e-6);
            assert!(out[1].static_score >= 0.70 && out[1].score < 0.70);
            assert!(out[1].active && out[1].seq == 1 && !out[1].admitted);
            // x3: q1 = 0.48 is below the floor: no penalty.
            assert_eq!(out[2].penalty, 0.0);
            assert_eq!(out[2].score, out[2].static_score);
            assert_eq!(mem.stats().entries, 1);
            assert_eq!(mem.entries[0].bucket, 0);
        }
        // k = 5: fewer than k entries, no term anywhere.
        let out = run(&mut toy(5), &x, 3);
        assert!(out.iter().all(|a| a.penalty == 0.0 && !a.active));
        // A reset before x2 makes x2 ID again.
        let mut mem = toy(1);
        run(&mut mem, &x.slice(ndarray::s![..1, ..]).to_owned(), 1);
        mem.clear();
        let out = run(&mut mem, &x.slice(ndarray::s![1.., ..]).to_owned(), 2);
        assert_eq!(out[0].penalty, 0.0);
    }

    /// A few folds by hand: bucket cap (the bucket's oldest goes), capacity (the oldest
    /// overall goes), age (older than the newest by more than max_age), the rate cap.
    #[test]
    fn folds_by_hand() {
        let mut mem = AdaptiveMemory::new(
            AdaptiveParams {
                capacity: 3,
                k: 1,
                bucket_cap: 2,
                admit_per_mille: 2,
                max_age_ms: 100,
                ..AdaptiveParams::default()
            },
            AdaptiveCalibration {
                admit_below: 0.5,
                max_penalty: 0.1,
                q_out: 0.01,
                epsilon: 0.03,
                floor: None,
            },
            2,
        )
        .unwrap();
        let adm = |bucket: u32, ts_ms: u64| Admission {
            embedding: vec![1.0, 0.0],
            bucket,
            score: 0.1,
            ts_ms,
        };
        let buckets = |m: &AdaptiveMemory| -> Vec<(u64, u32)> {
            m.entries.iter().map(|e| (e.seq, e.bucket)).collect()
        };
        mem.fold(adm(7, 10)).unwrap();
        mem.fold(adm(7, 20)).unwrap();
        mem.fold(adm(7, 30)).unwrap(); // bucket 7 full: seq 1 goes
        assert_eq!(buckets(&mem), [(2, 7), (3, 7)]);
        mem.fold(adm(8, 40)).unwrap(); // 3 entries: full
        mem.fold(adm(9, 50)).unwrap(); // capacity: the oldest (seq 2) goes
        assert_eq!(buckets(&mem), [(3, 7), (4, 8), (5, 9)]);
        mem.fold(adm(9, 135)).unwrap(); // cutoff 35: seq 3 (ts 30) ages out
        assert_eq!(buckets(&mem), [(4, 8), (5, 9), (6, 9)]);
        let s = mem.stats();
        assert_eq!((s.entries, s.admissions, s.evictions, s.seq), (3, 6, 3, 6));
        assert!(
            mem.fold(Admission {
                embedding: vec![1.0],
                ..adm(1, 0)
            })
            .is_err()
        );
        // Rate cap: 2 per 1,000 inputs.
        let gates: Vec<bool> = [0.1, 0.9, 0.1, 0.1, 0.1]
            .iter()
            .map(|&s| mem.gate(s))
            .collect();
        assert_eq!(gates, [true, false, true, false, false]);
        assert_eq!(mem.stats().rate_limited, 2);
        for _ in 0..995 {
            mem.gate(0.9);
        }
        // 1,000 inputs after the first admission, its slot frees up.
        assert!(mem.gate(0.1));
    }

    /// The same input order gives the same scores bit for bit, whatever the batch split.
    #[test]
    fn batch_split_does_not_change_scores() {
        let mut seed = crate::detect::rng::SplitMix64(9);
        let d = 64;
        let n = 300;
        let mut x = ndarray::Array2::<f32>::zeros((n, d));
        for mut r in x.rows_mut() {
            for v in r.iter_mut() {
                *v = (seed.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            r.mapv_inplace(|v| v / norm);
        }
        let statics: Vec<(f64, u32)> = (0..n)
            .map(|i| (((i * 37) % 100) as f64 / 100.0, (i % 7) as u32))
            .collect();
        let params = AdaptiveParams {
            capacity: 40,
            k: 3,
            floor: 0.0,
            bucket_cap: 10,
            admit_per_mille: 300,
            max_age_ms: 0,
        };
        let calib = AdaptiveCalibration {
            admit_below: 0.3,
            max_penalty: 0.2,
            q_out: 0.01,
            epsilon: 0.03,
            floor: None,
        };
        let go = |batch: usize| {
            let mut mem = AdaptiveMemory::new(params.clone(), calib, d).unwrap();
            let mut out = Vec::new();
            let mut s = 0;
            while s < n {
                let e = (s + batch).min(n);
                out.extend(
                    mem.score_batch(
                        x.slice(ndarray::s![s..e, ..]),
                        &statics[s..e],
                        &[],
                        Admit::Fold,
                    )
                    .unwrap(),
                );
                s = e;
            }
            (out, mem.stats())
        };
        let (one, stats) = go(1);
        assert!(stats.admissions > 40 && stats.evictions > 0, "{stats:?}");
        assert!(one.iter().any(|a| a.penalty > 0.0));
        for batch in [2, 7, 32, 300] {
            let (other, s) = go(batch);
            assert_eq!(s, stats);
            for (a, b) in one.iter().zip(&other) {
                assert_eq!(a.score.to_bits(), b.score.to_bits());
                assert_eq!((a.seq, a.active, a.admitted), (b.seq, b.active, b.admitted));
            }
        }
    }

    /// A packed block gives every lane the cosine `dot` gives, bit for bit, wherever the
    /// entry sits and whatever the other images are.
    #[test]
    fn packed_cosines_equal_dot_bit_for_bit() {
        let mut rng = crate::detect::rng::SplitMix64(3);
        for d in [1, 31, 64, 100] {
            let mut v = || -> Vec<f32> {
                (0..d)
                    .map(|_| (rng.next_u64() >> 40) as f32 / 1e7 - 0.8)
                    .collect()
            };
            let entries: Vec<Vec<f32>> = (0..20).map(|_| v()).collect();
            let mut p = Packed::default();
            let slots: Vec<usize> = entries.iter().map(|e| p.insert(e)).collect();
            let imgs: Vec<Vec<f32>> = (0..GROUP).map(|_| v()).collect();
            let mut xt = vec![0f32; d * GROUP];
            for (j, r) in imgs.iter().enumerate() {
                for k in 0..d {
                    xt[k * GROUP + j] = r[k];
                }
            }
            for (e, &slot) in entries.iter().zip(&slots) {
                let b = slot / BLOCK;
                let block = &p.data[b * d * BLOCK..(b + 1) * d * BLOCK];
                let acc = block_dots(block, &xt);
                // Every code path gives the same bits.
                let (ec, xc) = (block.as_chunks::<BLOCK>().0, xt.as_chunks::<GROUP>().0);
                assert_eq!(acc, block_dots_portable(ec, xc));
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx") {
                    // SAFETY: AVX is present (checked).
                    assert_eq!(acc, unsafe { block_dots_avx(ec, xc) });
                }
                for (j, r) in imgs.iter().enumerate() {
                    assert_eq!(
                        acc[j][slot % BLOCK].to_bits(),
                        dot(e, r).to_bits(),
                        "d = {d}"
                    );
                }
            }
        }
    }

    #[test]
    fn dot_is_the_sum() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.01).collect();
        let want: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        assert!((f64::from(dot(&a, &b)) - want).abs() < 1e-3);
        assert_eq!(dot(&[], &[]), 0.0);
    }
}
