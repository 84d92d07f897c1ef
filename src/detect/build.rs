//! From labels to a bank (method.md §3–§7, §9): label embeddings with prompt ensembling,
//! outlier prototypes, NegLabel negative mining, and the import of precomputed matrices.
//!
//! - [`embed_labels`]: t(y) = normalize(Σ_m normalize(ψ(tok(p_m(y))))) for many labels, batched
//!   through an [`Encoder`], prompts sorted by token length so that an encoder with
//!   `dynamic_length` cuts each batch short, reusing and filling an [`EmbedCache`].
//! - [`build_bank`]: the whole construction: ID embeddings T, outlier-label embeddings, then
//!   one of the [`OutlierMode`]s (OPL + refinement + HOPG, raw label embeddings, or NegLabel
//!   mining), assembled into a [`Bank`] whose metadata records every parameter.
//! - [`import_bank`]: a bank from matrices computed elsewhere (e.g. the Python reference).
//! - [`read_npy`]: float16/32/64 `.npy` matrices (clip-retrieval writes float16).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView2, Axis, s};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::bank::{BANK_FORMAT, Bank, BankError, BankMeta, OutlierRow};
use super::embed_cache::{CacheError, EmbedCache};
use super::kmeans::{KMeansParams, kmeans};
use super::labels::{IdLabels, Templates};
use super::prototypes::{
    self, OplCounts, OplParams, ProtoError, hard_prototypes, nearest_words, outlier_prototypes,
    refine,
};
use crate::model::tokenizer::END_OF_TEXT;
use crate::model::{ClipTokenizer, Encoder, EncoderError};

/// Texts per encoder call by default.
pub const DEFAULT_BATCH: usize = 256;

/// Outlier words recorded per outlier row.
pub const DEFAULT_WORDS_PER_ROW: usize = 10;

/// Batches of prompts tokenised, sorted and encoded together before their labels are
/// finished and stored in the cache: bounds memory and loses little work on interruption.
const BATCHES_PER_CHUNK: usize = 32;

/// Errors of bank construction and import.
#[derive(Debug, Error)]
pub enum BuildError {
    /// The text encoder failed.
    #[error("text encoder: {0}")]
    Encoder(#[from] EncoderError),
    /// Prototype construction failed.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// The bank could not be assembled.
    #[error(transparent)]
    Bank(#[from] BankError),
    /// A `.npy` file could not be read.
    #[error(transparent)]
    Npy(#[from] NpyError),
    /// Parameters or inputs that cannot work, with advice.
    #[error("{0}")]
    Invalid(String),
    /// A label whose prompts produced no usable direction.
    #[error("label {label:?}: the text encoder produced a zero or non-finite embedding")]
    BadEmbedding {
        /// The label.
        label: String,
    },
}

/// Errors of [`read_npy`].
#[derive(Debug, Error)]
#[error("{path}: {reason}")]
pub struct NpyError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

// ---------------------------------------------------------------------------------------------
// Progress
// ---------------------------------------------------------------------------------------------

/// Progress of the long phases (text embedding); every method defaults to doing nothing.
pub trait Progress {
    /// A phase with `total` units (labels) begins.
    fn start(&mut self, _phase: &str, _total: usize) {}
    /// `n` more units are done.
    fn advance(&mut self, _n: usize) {}
    /// The phase is over.
    fn finish(&mut self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}

// ---------------------------------------------------------------------------------------------
// Label embeddings
// ---------------------------------------------------------------------------------------------

/// Label embeddings and where they came from.
#[derive(Debug, Clone)]
pub struct LabelEmbeddings {
    /// One unit row per input label, in input order.
    pub vectors: Array2<f32>,
    /// Labels (rows) taken from the cache.
    pub cached: usize,
    /// Distinct labels encoded now.
    pub encoded: usize,
    /// Prompts run through the encoder.
    pub prompts: usize,
}

/// Length of a token row up to and including its end-of-text token.
fn token_len(row: &[i64]) -> usize {
    row.iter()
        .position(|&t| t == END_OF_TEXT)
        .map_or(row.len(), |p| p + 1)
}

/// Tokenises `texts` into a `[n, context]` row-major buffer, on the available cores.
fn tokenize_parallel(tok: &ClipTokenizer, texts: &[String]) -> Vec<i64> {
    let ctx = tok.context_length();
    let mut out = vec![0i64; texts.len() * ctx];
    if texts.is_empty() {
        return out;
    }
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(texts.len().div_ceil(256))
        .max(1);
    let per = texts.len().div_ceil(workers);
    std::thread::scope(|sc| {
        for (t_chunk, o_chunk) in texts.chunks(per).zip(out.chunks_mut(per * ctx)) {
            sc.spawn(move || {
                for (t, o) in t_chunk.iter().zip(o_chunk.chunks_mut(ctx)) {
                    o.copy_from_slice(&tok.encode(t));
                }
            });
        }
    });
    out
}

/// Embeds every label with the template ensemble of method.md §3:
/// t(y) = normalize(Σ_m normalize(ψ(tok(p_m(y))))), sums in f64.
///
/// Labels found in `cache` are not encoded; the others are encoded `batch` prompts per encoder
/// call, with the prompts of a chunk of labels sorted by token length (an encoder with
/// `dynamic_length` then runs each batch only up to its longest prompt), and stored in the
/// cache chunk by chunk. Repeated labels are encoded once. `progress` counts labels.
///
/// The cache must belong to this encoder's model and these templates (see
/// [`EmbedCache::open`]); that is the caller's contract.
pub fn embed_labels(
    encoder: &mut dyn Encoder,
    tokenizer: &ClipTokenizer,
    templates: &Templates,
    labels: &[String],
    mut cache: Option<&mut EmbedCache>,
    batch: usize,
    progress: &mut dyn Progress,
) -> Result<LabelEmbeddings, BuildError> {
    let dim = encoder.info().embed_dim;
    let batch = batch.max(1);
    if templates.is_empty() {
        return Err(BuildError::Invalid("the template set is empty".into()));
    }
    let mut out = Array2::<f32>::zeros((labels.len(), dim));
    let mut cached = 0usize;
    // Distinct labels still to encode, with every row they fill.
    let mut todo: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut slot: HashMap<&str, usize> = HashMap::new();
    for (i, label) in labels.iter().enumerate() {
        if let Some(v) = cache.as_deref().and_then(|c| c.get(label))
            && v.len() == dim
        {
            out.row_mut(i).assign(&ndarray::ArrayView1::from(v));
            cached += 1;
            continue;
        }
        match slot.get(label.as_str()) {
            Some(&j) => todo[j].1.push(i),
            None => {
                slot.insert(label, todo.len());
                todo.push((label, vec![i]));
            }
        }
    }
    progress.start("", labels.len());
    progress.advance(cached);
    let m = templates.len();
    let labels_per_chunk = (BATCHES_PER_CHUNK * batch / m).max(1);
    let ctx = tokenizer.context_length();
    let mut prompts_run = 0usize;
    for chunk in todo.chunks(labels_per_chunk) {
        let texts: Vec<String> = chunk
            .iter()
            .flat_map(|(label, _)| templates.apply(label))
            .collect();
        let tokens = tokenize_parallel(tokenizer, &texts);
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&p| token_len(&tokens[p * ctx..(p + 1) * ctx]));
        let mut acc = vec![0f64; chunk.len() * dim];
        let mut ids = Array2::<i64>::zeros((batch, ctx));
        for group in order.chunks(batch) {
            for (mut row, &p) in ids.rows_mut().into_iter().zip(group) {
                for (d, s) in row.iter_mut().zip(&tokens[p * ctx..(p + 1) * ctx]) {
                    *d = *s;
                }
            }
            let emb = encoder.embed_texts(ids.slice(s![..group.len(), ..]))?;
            if emb.dim() != (group.len(), dim) {
                return Err(BuildError::Encoder(EncoderError::BadOutput {
                    got: emb.shape().to_vec(),
                    dim,
                }));
            }
            for (row, &p) in emb.rows().into_iter().zip(group) {
                let norm = row
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    .sqrt();
                let li = p / m;
                if !(norm.is_finite() && norm > 0.0) {
                    return Err(BuildError::BadEmbedding {
                        label: chunk[li].0.to_string(),
                    });
                }
                let a = &mut acc[li * dim..(li + 1) * dim];
                for (d, &v) in a.iter_mut().zip(row.iter()) {
                    *d += f64::from(v) / norm;
                }
            }
            prompts_run += group.len();
        }
        let mut finished = Array2::<f32>::zeros((chunk.len(), dim));
        for (li, ((label, rows), mut dst)) in chunk.iter().zip(finished.rows_mut()).enumerate() {
            let a = &acc[li * dim..(li + 1) * dim];
            let norm = a.iter().map(|v| v * v).sum::<f64>().sqrt();
            if !(norm.is_finite() && norm > 0.0) {
                return Err(BuildError::BadEmbedding {
                    label: label.to_string(),
                });
            }
            for (d, &v) in dst.iter_mut().zip(a) {
                *d = (v / norm) as f32;
            }
            for &r in rows {
                out.row_mut(r).assign(&dst);
            }
        }
        if let Some(c) = cache.as_deref_mut() {
            let names: Vec<String> = chunk.iter().map(|(l, _)| l.to_string()).collect();
            if let Err(e) = c.insert(&names, finished.view()) {
                tracing::warn!(error = %e, "cannot store label embeddings in the cache; continuing without it");
                cache = None;
            }
        }
        progress.advance(chunk.iter().map(|(_, rows)| rows.len()).sum());
    }
    progress.finish();
    Ok(LabelEmbeddings {
        vectors: out,
        cached,
        encoded: todo.len(),
        prompts: prompts_run,
    })
}

// ---------------------------------------------------------------------------------------------
// Bank construction
// ---------------------------------------------------------------------------------------------

/// NegLabel negative mining (method.md §9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NegLabelParams {
    /// η: the percentile of a candidate's cosines to the ID embeddings. Default 0.95.
    pub percentile: f64,
    /// Fraction of the candidates kept, lowest η first, nouns and adjectives separately.
    /// Default 0.15.
    pub keep: f64,
}

impl Default for NegLabelParams {
    fn default() -> Self {
        NegLabelParams {
            percentile: 0.95,
            keep: 0.15,
        }
    }
}

/// What the outlier rows of the bank are.
#[derive(Debug, Clone, PartialEq)]
pub enum OutlierMode {
    /// OPL prototypes, refinement and (optionally) HOPG (§5–§7).
    Prototypes(OplParams),
    /// Every outlier-label embedding as a row (the "raw OLE" ablation, §11.10).
    Raw,
    /// NegLabel's mined negatives: nouns embedded with `noun_templates`, adjectives with
    /// `adj_templates` (§9).
    NegLabel {
        /// Mining parameters.
        params: NegLabelParams,
        /// Templates of the noun candidates.
        noun_templates: Templates,
        /// Templates of the adjective candidates.
        adj_templates: Templates,
    },
}

impl OutlierMode {
    fn name(&self) -> &'static str {
        match self {
            OutlierMode::Prototypes(_) => "prototypes",
            OutlierMode::Raw => "raw",
            OutlierMode::NegLabel { .. } => "neglabel",
        }
    }
}

/// Everything [`build_bank`] needs besides the encoder.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The ID classes.
    pub id: IdLabels,
    /// Templates of the ID labels (and of the outlier labels except in NegLabel mode).
    pub templates: Templates,
    /// Outlier words, already cleaned (the noun candidates in NegLabel mode).
    pub outlier_words: Vec<String>,
    /// Adjective candidates (NegLabel mode only).
    pub adjectives: Vec<String>,
    /// How the outlier rows are made.
    pub mode: OutlierMode,
    /// CLIPN "no" embeddings T̄ (C × D) computed elsewhere.
    pub no_embeddings: Option<Array2<f32>>,
    /// Outlier words recorded per row.
    pub words_per_row: usize,
    /// Prompts per encoder call.
    pub batch: usize,
    /// Extra parameters to record in `BankMeta.build` (label specs, cleaning options, …).
    pub params: serde_json::Value,
    /// Recorded as `BankMeta.cleaning` (the cleaning report).
    pub cleaning: serde_json::Value,
}

/// Wall time of each phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Text embedding (ID and outlier labels).
    #[serde(with = "secs")]
    pub text_embedding: Duration,
    /// OPL k-means.
    #[serde(with = "secs")]
    pub clustering: Duration,
    /// Prototypes, refinement and nearest words.
    #[serde(with = "secs")]
    pub refinement: Duration,
    /// HOPG.
    #[serde(with = "secs")]
    pub hopg: Duration,
    /// NegLabel mining.
    #[serde(with = "secs")]
    pub mining: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// What [`build_bank`] did, for the summary.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    /// The mode's name: `prototypes`, `raw` or `neglabel`.
    pub mode: String,
    /// ID classes C.
    pub n_id: usize,
    /// Outlier-label candidates embedded (nouns + adjectives in NegLabel mode).
    pub n_outlier_words: usize,
    /// Rows of Ô.
    pub n_outliers: usize,
    /// Label embeddings taken from the cache (ID + outlier).
    pub cached: usize,
    /// Labels encoded now.
    pub encoded: usize,
    /// Prompts run through the text encoder.
    pub prompts: usize,
    /// Stage sizes of the prototype mode.
    pub counts: Option<OplCounts>,
    /// θ of the prototype mode.
    pub theta: Option<f64>,
    /// Lloyd iterations of the OPL k-means and whether it converged.
    pub kmeans: Option<(usize, bool)>,
    /// Wall time per phase.
    pub timings: Timings,
}

/// Where label embeddings are cached (folders are keyed by the encoder's fingerprint and each
/// template set's fingerprint).
#[derive(Debug, Clone)]
pub struct CacheSpec {
    /// Root folder (one subfolder per model and template set).
    pub root: PathBuf,
}

fn open_cache(
    spec: Option<&CacheSpec>,
    fingerprint: &str,
    templates: &Templates,
    dim: usize,
) -> Option<EmbedCache> {
    let spec = spec?;
    match EmbedCache::open(
        &spec.root,
        fingerprint,
        &templates.fingerprint(),
        &templates.name,
        dim,
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            warn_cache(&e);
            None
        }
    }
}

fn warn_cache(e: &CacheError) {
    tracing::warn!(error = %e, "label-embedding cache unavailable; embedding without it");
}

/// Checks what can be checked before any text is encoded, so that a build that cannot finish
/// fails in a second rather than after an hour of encoding.
pub fn check_request(req: &BuildRequest) -> Result<(), BuildError> {
    let c = req.id.len();
    if c == 0 {
        return Err(BuildError::Invalid("no ID labels".into()));
    }
    if req.batch == 0 {
        return Err(BuildError::Invalid("batch must be at least 1".into()));
    }
    if let Some(no) = &req.no_embeddings
        && no.nrows() != c
    {
        return Err(BuildError::Invalid(format!(
            "the no-embeddings have {} rows but there are {c} ID labels",
            no.nrows()
        )));
    }
    match &req.mode {
        OutlierMode::Prototypes(p) => {
            if !(0.0..=1.0).contains(&p.quantile) {
                return Err(ProtoError::InvalidQuantile(p.quantile).into());
            }
            if p.k == 0 {
                return Err(ProtoError::ZeroClusters.into());
            }
            if p.k > req.outlier_words.len() {
                return Err(BuildError::Invalid(format!(
                    "K = {} outlier prototypes requested but only {} outlier words remain after \
                     cleaning; lower --k or supply more words",
                    p.k,
                    req.outlier_words.len()
                )));
            }
            if let Some(h) = &p.hopg
                && h.clusters.saturating_mul(h.per_cluster) > c
            {
                return Err(BuildError::Invalid(format!(
                    "HOPG needs {} × {} = {} boundary ID embeddings (method.md §7) but there are \
                     only {c} ID classes; pass --no-hopg, or lower --hopg-clusters / \
                     --hopg-per-cluster",
                    h.clusters,
                    h.per_cluster,
                    h.clusters.saturating_mul(h.per_cluster)
                )));
            }
        }
        OutlierMode::Raw => {
            if req.outlier_words.is_empty() {
                return Err(BuildError::Invalid(
                    "no outlier words remain after cleaning".into(),
                ));
            }
        }
        OutlierMode::NegLabel { params, .. } => {
            if !(0.0..=1.0).contains(&params.percentile) {
                return Err(BuildError::Invalid(format!(
                    "NegLabel percentile must lie in [0, 1], got {}",
                    params.percentile
                )));
            }
            if !(params.keep > 0.0 && params.keep <= 1.0) {
                return Err(BuildError::Invalid(format!(
                    "NegLabel keep fraction must lie in (0, 1], got {}",
                    params.keep
                )));
            }
            if req.outlier_words.is_empty() && req.adjectives.is_empty() {
                return Err(BuildError::Invalid("no NegLabel candidates".into()));
            }
        }
    }
    Ok(())
}

/// numpy's default (linear) quantile of an ascending non-empty slice.
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let h = (n - 1) as f64 * q;
    let lo = h.floor().clamp(0.0, (n - 1) as f64) as usize;
    let hi = (lo + 1).min(n - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// Per candidate row: the `percentile` quantile of its cosines to the ID rows.
fn percentile_cos(cands: ArrayView2<f32>, id: ArrayView2<f32>, percentile: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(cands.nrows());
    let block = prototypes::ROW_BLOCK;
    let mut start = 0;
    while start < cands.nrows() {
        let end = (start + block).min(cands.nrows());
        let g = cands.slice(s![start..end, ..]).dot(&id.t());
        for row in g.rows() {
            let mut v: Vec<f64> = row.iter().map(|&x| f64::from(x)).collect();
            v.sort_unstable_by(f64::total_cmp);
            out.push(quantile_sorted(&v, percentile));
        }
        start = end;
    }
    out
}

/// Builds a bank from labels: embeds the ID labels and the outlier words with `encoder`
/// (through the cache when `cache` is given), then makes the outlier rows as `req.mode` says.
///
/// `BankMeta.build` records every parameter; `BankMeta.cleaning` is `req.cleaning`.
pub fn build_bank(
    encoder: &mut dyn Encoder,
    tokenizer: &ClipTokenizer,
    req: &BuildRequest,
    cache: Option<&CacheSpec>,
    progress: &mut dyn Progress,
) -> Result<(Bank, BuildReport), BuildError> {
    check_request(req)?;
    let info = encoder.info().clone();
    let dim = info.embed_dim;
    let fingerprint = info.fingerprint.clone();
    let mut timings = Timings::default();
    let (mut cached, mut encoded, mut prompts) = (0, 0, 0);
    let mut tally = |e: &LabelEmbeddings| {
        cached += e.cached;
        encoded += e.encoded;
        prompts += e.prompts;
    };

    // Text embeddings.
    let t0 = Instant::now();
    let mut main_cache = open_cache(cache, &fingerprint, &req.templates, dim);
    let id_emb = embed_labels(
        encoder,
        tokenizer,
        &req.templates,
        &req.id.names,
        main_cache.as_mut(),
        req.batch,
        &mut Phase::new(progress, "ID labels"),
    )?;
    tally(&id_emb);
    let t = id_emb.vectors;
    if let Some(no) = &req.no_embeddings
        && no.ncols() != dim
    {
        return Err(BuildError::Invalid(format!(
            "the no-embeddings have dimension {} but the model's is {dim}",
            no.ncols()
        )));
    }

    let words = &req.outlier_words;
    let mut rows: Vec<OutlierRow> = Vec::new();
    let outliers: Array2<f32>;
    let mut counts = None;
    let mut theta = None;
    let mut kmeans_info = None;
    let mut build = serde_json::Map::new();
    build.insert("mode".into(), req.mode.name().into());
    build.insert(
        "templates".into(),
        serde_json::json!({
            "name": req.templates.name,
            "fingerprint": req.templates.fingerprint(),
            "count": req.templates.len(),
        }),
    );
    build.insert("n_id".into(), t.nrows().into());
    build.insert("words_per_row".into(), req.words_per_row.into());
    build.insert("batch".into(), req.batch.into());
    build.insert("no_embeddings".into(), req.no_embeddings.is_some().into());

    // Prototype and raw modes embed the outlier labels with the main templates.
    let mut labels = match &req.mode {
        OutlierMode::Prototypes(_) | OutlierMode::Raw => {
            let w = embed_labels(
                encoder,
                tokenizer,
                &req.templates,
                words,
                main_cache.as_mut(),
                req.batch,
                &mut Phase::new(progress, "outlier labels"),
            )?;
            tally(&w);
            timings.text_embedding = t0.elapsed();
            Some(w)
        }
        OutlierMode::NegLabel { .. } => None,
    };
    let n_words;
    match &req.mode {
        OutlierMode::Prototypes(p) => {
            let Some(w) = labels.take() else {
                unreachable!("outlier labels are embedded above for this mode")
            };
            n_words = words.len();
            let e = w.vectors;

            let t1 = Instant::now();
            let km = kmeans(
                e.view(),
                &KMeansParams {
                    k: p.k,
                    max_iter: p.max_iter,
                    seed: p.seed,
                },
            )?;
            timings.clustering = t1.elapsed();

            let t2 = Instant::now();
            let protos = outlier_prototypes(km.centroids.view())?;
            let refinement = refine(protos.view(), t.view(), p.quantile)?;
            let kept = protos.select(Axis(0), &refinement.kept);
            let near = nearest_words(kept.view(), e.view(), req.words_per_row.max(1))?;
            timings.refinement = t2.elapsed();
            for (&k, list) in refinement.kept.iter().zip(&near) {
                let ws: Vec<String> = list.iter().map(|&(i, _)| words[i].clone()).collect();
                rows.push(OutlierRow {
                    kind: "prototype".into(),
                    label: ws
                        .first()
                        .cloned()
                        .unwrap_or_else(|| format!("cluster {k}")),
                    words: ws,
                    detail: serde_json::json!({
                        "cluster": k,
                        "size": km.sizes[k],
                        "max_id_cos": refinement.max_id_cos[k],
                        "nearest_id": req.id.names.get(refinement.nearest_id[k]),
                        "word_cos": list.iter().map(|&(_, c)| c).collect::<Vec<_>>(),
                    }),
                });
            }

            let t3 = Instant::now();
            let (vectors, boundary, accepted) = match &p.hopg {
                Some(hp) => {
                    let h = hard_prototypes(t.view(), kept.view(), refinement.theta, hp)?;
                    for hard in &h.accepted {
                        let partner = rows.get(hard.partner).cloned();
                        let id_label = req.id.names.get(hard.id_class).cloned().unwrap_or_default();
                        let partner_label = partner
                            .as_ref()
                            .map(|r| r.label.clone())
                            .unwrap_or_default();
                        rows.push(OutlierRow {
                            kind: "hard".into(),
                            label: format!("{id_label} ~ {partner_label}"),
                            words: partner.map(|r| r.words).unwrap_or_default(),
                            detail: serde_json::json!({
                                "id_class": hard.id_class,
                                "id_label": id_label,
                                "component": hard.component,
                                "partner": hard.partner,
                                "lambda": hard.lambda,
                                "max_id_cos": hard.max_id_cos,
                            }),
                        });
                    }
                    let mut v = Array2::<f32>::zeros((kept.nrows() + h.vectors.nrows(), dim));
                    v.slice_mut(s![..kept.nrows(), ..]).assign(&kept);
                    v.slice_mut(s![kept.nrows().., ..]).assign(&h.vectors);
                    (v, h.boundary.len(), h.accepted.len())
                }
                None => (kept, 0, 0),
            };
            timings.hopg = t3.elapsed();
            outliers = vectors;
            let c = OplCounts {
                k: p.k,
                kept: refinement.kept.len(),
                boundary,
                accepted,
            };
            counts = Some(c);
            theta = Some(refinement.theta);
            kmeans_info = Some((km.iterations, km.converged));
            build.insert("k".into(), p.k.into());
            build.insert("quantile".into(), p.quantile.into());
            build.insert("seed".into(), p.seed.into());
            build.insert("max_iter".into(), p.max_iter.into());
            build.insert(
                "hopg".into(),
                serde_json::to_value(&p.hopg).unwrap_or_default(),
            );
            build.insert("counts".into(), serde_json::to_value(c).unwrap_or_default());
            build.insert("kmeans_iterations".into(), km.iterations.into());
            build.insert("kmeans_converged".into(), km.converged.into());
            build.insert("kmeans_empty_reseeds".into(), km.empty_reseeds.into());
        }
        OutlierMode::Raw => {
            let Some(w) = labels.take() else {
                unreachable!("outlier labels are embedded above for this mode")
            };
            n_words = words.len();
            outliers = w.vectors;
            rows = words
                .iter()
                .map(|w| OutlierRow {
                    kind: "label".into(),
                    label: w.clone(),
                    words: vec![w.clone()],
                    detail: serde_json::Value::Null,
                })
                .collect();
        }
        OutlierMode::NegLabel {
            params,
            noun_templates,
            adj_templates,
        } => {
            drop(main_cache.take());
            let mut lists: Vec<(&str, &Vec<String>, &Templates)> = Vec::new();
            if !words.is_empty() {
                lists.push(("noun", words, noun_templates));
            }
            if !req.adjectives.is_empty() {
                lists.push(("adj", &req.adjectives, adj_templates));
            }
            let mut embedded = Vec::new();
            for (pos, list, tpl) in &lists {
                let mut c = open_cache(cache, &fingerprint, tpl, dim);
                let name = if *pos == "noun" {
                    "noun candidates"
                } else {
                    "adjective candidates"
                };
                let w = embed_labels(
                    encoder,
                    tokenizer,
                    tpl,
                    list,
                    c.as_mut(),
                    req.batch,
                    &mut Phase::new(progress, name),
                )?;
                tally(&w);
                embedded.push(w.vectors);
            }
            timings.text_embedding = t0.elapsed();
            n_words = words.len() + req.adjectives.len();
            let t1 = Instant::now();
            let mut picked: Vec<Array2<f32>> = Vec::new();
            let mut kept_counts = BTreeMap::new();
            for ((pos, list, tpl), e) in lists.iter().zip(&embedded) {
                let eta = percentile_cos(e.view(), t.view(), params.percentile);
                let mut order: Vec<usize> = (0..eta.len()).collect();
                order.sort_by(|&a, &b| eta[a].total_cmp(&eta[b]).then(a.cmp(&b)));
                let n_keep =
                    ((eta.len() as f64 * params.keep).floor() as usize).clamp(1, eta.len());
                order.truncate(n_keep);
                kept_counts.insert(pos.to_string(), (n_keep, eta.len()));
                for &i in &order {
                    rows.push(OutlierRow {
                        kind: "negative".into(),
                        label: list[i].clone(),
                        words: vec![list[i].clone()],
                        detail: serde_json::json!({
                            "pos": pos,
                            "eta": eta[i],
                            "templates": tpl.name,
                        }),
                    });
                }
                picked.push(e.select(Axis(0), &order));
            }
            timings.mining = t1.elapsed();
            let views: Vec<_> = picked.iter().map(|p| p.view()).collect();
            outliers = if views.is_empty() {
                Array2::zeros((0, dim))
            } else {
                ndarray::concatenate(Axis(0), &views)
                    .map_err(|e| BuildError::Invalid(e.to_string()))?
            };
            build.insert(
                "neglabel".into(),
                serde_json::json!({
                    "percentile": params.percentile,
                    "keep": params.keep,
                    "noun_templates": {"name": noun_templates.name, "fingerprint": noun_templates.fingerprint()},
                    "adj_templates": {"name": adj_templates.name, "fingerprint": adj_templates.fingerprint()},
                    "kept": kept_counts.iter().map(|(k, (kept, of))| (k.clone(), serde_json::json!({"kept": kept, "candidates": of}))).collect::<serde_json::Map<_, _>>(),
                }),
            );
        }
    }
    build.insert("n_outlier_words".into(), n_words.into());
    build.insert("n_outliers".into(), outliers.nrows().into());
    if let serde_json::Value::Object(extra) = &req.params {
        for (k, v) in extra {
            build.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }

    let meta = BankMeta {
        format: BANK_FORMAT,
        version: String::new(),
        created_by: format!("oodgate {}", env!("CARGO_PKG_VERSION")),
        model_fingerprint: fingerprint,
        model_name: info.model.clone(),
        model_weights: weights_name(&info.weights),
        dim,
        id_labels: req.id.names.clone(),
        id_wnids: req.id.wnids.clone(),
        outliers: rows,
        theta,
        build: serde_json::Value::Object(build),
        cleaning: req.cleaning.clone(),
        thresholds: BTreeMap::new(),
        index: None,
    };
    let n_outliers = outliers.nrows();
    let bank = Bank::new(meta, t, req.no_embeddings.clone(), outliers)?;
    Ok((
        bank,
        BuildReport {
            mode: req.mode.name().into(),
            n_id: req.id.len(),
            n_outlier_words: n_words,
            n_outliers,
            cached,
            encoded,
            prompts,
            counts,
            theta,
            kmeans: kmeans_info,
            timings,
        },
    ))
}

/// "pretrained" / "random" for a [`crate::model::Weights`].
pub fn weights_name(w: &crate::model::Weights) -> String {
    match serde_json::to_value(w) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

/// A [`Progress`] that names its phase.
struct Phase<'a> {
    inner: &'a mut dyn Progress,
    name: &'a str,
}

impl<'a> Phase<'a> {
    fn new(inner: &'a mut dyn Progress, name: &'a str) -> Self {
        Phase { inner, name }
    }
}

impl Progress for Phase<'_> {
    fn start(&mut self, _phase: &str, total: usize) {
        self.inner.start(self.name, total);
    }
    fn advance(&mut self, n: usize) {
        self.inner.advance(n);
    }
    fn finish(&mut self) {
        self.inner.finish();
    }
}

// ---------------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------------

/// Matrices computed elsewhere, to be packed into a bank.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    /// ID embeddings T (C × D).
    pub id: Array2<f32>,
    /// The ID classes (C names).
    pub id_labels: IdLabels,
    /// CLIPN "no" embeddings T̄ (C × D).
    pub no: Option<Array2<f32>>,
    /// Outlier rows Ô (M × D) with one label each (or none: numbered labels).
    pub outliers: Option<(Array2<f32>, Option<Vec<String>>)>,
    /// The model the matrices belong to.
    pub model_fingerprint: String,
    /// Its name, if known.
    pub model_name: String,
    /// "pretrained", "random" or "unknown".
    pub model_weights: String,
    /// θ, if known.
    pub theta: Option<f64>,
    /// Recorded in `BankMeta.build`.
    pub params: serde_json::Value,
}

/// Packs precomputed matrices into a bank (rows are re-normalised by [`Bank::new`]).
pub fn import_bank(req: ImportRequest) -> Result<Bank, BuildError> {
    let d = req.id.ncols();
    if req.id_labels.len() != req.id.nrows() {
        return Err(BuildError::Invalid(format!(
            "{} ID labels for {} ID embedding rows",
            req.id_labels.len(),
            req.id.nrows()
        )));
    }
    let (outliers, rows) = match req.outliers {
        Some((m, labels)) => {
            let labels = match labels {
                Some(l) if l.len() != m.nrows() => {
                    return Err(BuildError::Invalid(format!(
                        "{} outlier labels for {} outlier rows",
                        l.len(),
                        m.nrows()
                    )));
                }
                Some(l) => l,
                None => (0..m.nrows()).map(|i| format!("outlier {i}")).collect(),
            };
            let rows = labels
                .into_iter()
                .map(|l| OutlierRow {
                    kind: "imported".into(),
                    words: vec![l.clone()],
                    label: l,
                    detail: serde_json::Value::Null,
                })
                .collect();
            (m, rows)
        }
        None => (Array2::zeros((0, d)), Vec::new()),
    };
    let meta = BankMeta {
        format: BANK_FORMAT,
        version: String::new(),
        created_by: format!("oodgate {} (import)", env!("CARGO_PKG_VERSION")),
        model_fingerprint: req.model_fingerprint,
        model_name: req.model_name,
        model_weights: req.model_weights,
        dim: d,
        id_labels: req.id_labels.names,
        id_wnids: req.id_labels.wnids,
        outliers: rows,
        theta: req.theta,
        build: req.params,
        cleaning: serde_json::Value::Null,
        thresholds: BTreeMap::new(),
        index: None,
    };
    Ok(Bank::new(meta, req.id, req.no, outliers)?)
}

// ---------------------------------------------------------------------------------------------
// .npy
// ---------------------------------------------------------------------------------------------

/// IEEE half → f32.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = man · 2^-24.
            let v = man as f32 * f32::from_bits(0x3380_0000); // 2^-24
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// Reads a 2-D (or 1-D: one row) little-endian float16/float32/float64 `.npy` as f32, C or
/// Fortran order. clip-retrieval writes float16 `[N, D]`.
pub fn read_npy(path: &Path) -> Result<Array2<f32>, NpyError> {
    let err = |reason: String| NpyError {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    parse_npy(&bytes).map_err(err)
}

fn parse_npy(bytes: &[u8]) -> Result<Array2<f32>, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes.get(start..start + hlen).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let k = format!("'{key}':");
        let p = header.find(&k)? + k.len();
        Some(header[p..].trim_start())
    };
    let descr = field("descr").ok_or("header has no descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or("bad descr")?;
    let fortran = field("fortran_order")
        .ok_or("header has no fortran_order")?
        .starts_with("True");
    let shape_txt = field("shape").ok_or("header has no shape")?;
    let shape_txt = shape_txt
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("bad shape")?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape entry {s:?}"))
        })
        .collect::<Result<_, _>>()?;
    let (rows, cols) = match shape.as_slice() {
        [n, d] => (*n, *d),
        [d] => (1, *d),
        other => return Err(format!("expected a 2-D array, got shape {other:?}")),
    };
    let width = match descr {
        "<f2" => 2,
        "<f4" => 4,
        "<f8" => 8,
        other => {
            return Err(format!(
                "unsupported dtype {other:?} (expected little-endian float16, float32 or float64)"
            ));
        }
    };
    let n = rows.checked_mul(cols).ok_or("shape overflows")?;
    let data = &bytes[start + hlen..];
    if data.len() < n * width {
        return Err(format!(
            "truncated data: {} bytes for shape {shape:?} of {descr}",
            data.len()
        ));
    }
    let vals: Vec<f32> = match width {
        2 => data[..n * 2]
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        4 => data[..n * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        _ => data[..n * 8]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
    };
    let arr = if fortran {
        Array2::from_shape_vec((cols, rows), vals)
            .map_err(|e| e.to_string())?
            .reversed_axes()
            .as_standard_layout()
            .into_owned()
    } else {
        Array2::from_shape_vec((rows, cols), vals).map_err(|e| e.to_string())?
    };
    Ok(arr)
}

/// L2-normalises (in f64) every row whose norm is off 1 by more than `tol`, leaving the others
/// bit-for-bit unchanged (so f32 embeddings written by `oodgate embed` score exactly as their
/// images do, while float16 rows are brought back to unit norm). Errors name the first zero or
/// non-finite row.
pub fn normalize_embeddings(m: &mut Array2<f32>, tol: f64) -> Result<(), usize> {
    for (i, mut row) in m.rows_mut().into_iter().enumerate() {
        let norm = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            return Err(i);
        }
        if (norm - 1.0).abs() > tol {
            row.mapv_inplace(|v| (f64::from(v) / norm) as f32);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::prototypes::HopgParams;
    use crate::model::Weights;
    use crate::model::encoder::EncoderInfo;
    use ndarray::ArrayView4;

    /// A deterministic fake text encoder: each token id votes into a few dimensions, so texts
    /// with shared tokens are similar. Records the batch shapes it saw.
    struct FakeEncoder {
        info: EncoderInfo,
        calls: Vec<(usize, usize)>,
    }

    impl FakeEncoder {
        fn new(dim: usize) -> Self {
            FakeEncoder {
                info: EncoderInfo {
                    model: "fake".into(),
                    weights: Weights::Random,
                    embed_dim: dim,
                    image_size: 224,
                    provider: "cpu".into(),
                    device_requested: "cpu".into(),
                    intra_threads: 1,
                    ort_library: PathBuf::new(),
                    ort_version: String::new(),
                    fingerprint: "fakefingerprint0123456789".into(),
                },
                calls: Vec::new(),
            }
        }
    }

    impl Encoder for FakeEncoder {
        fn embed_images(&mut self, _: ArrayView4<'_, f32>) -> Result<Array2<f32>, EncoderError> {
            Err(EncoderError::NoTextEncoder)
        }
        fn embed_texts(
            &mut self,
            tokens: ArrayView2<'_, i64>,
        ) -> Result<Array2<f32>, EncoderError> {
            self.calls.push(tokens.dim());
            let d = self.info.embed_dim;
            let mut out = Array2::<f32>::zeros((tokens.nrows(), d));
            for (r, mut o) in tokens.rows().into_iter().zip(out.rows_mut()) {
                for (pos, &t) in r.iter().enumerate() {
                    if t == 0 {
                        break;
                    }
                    let h = (t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    o[(h % d as u64) as usize] += 1.0;
                    o[((h >> 20) % d as u64) as usize] += 0.5 + (pos % 3) as f32 * 0.1;
                }
                let n = o.dot(&o).sqrt();
                o.mapv_inplace(|v| v / n);
            }
            Ok(out)
        }
        fn info(&self) -> &EncoderInfo {
            &self.info
        }
    }

    fn words(n: usize) -> Vec<String> {
        const SYL: [&str; 12] = [
            "ka", "ro", "mi", "tu", "sen", "dor", "pli", "vax", "qu", "ne", "bo", "lis",
        ];
        (0..n)
            .map(|i| {
                let mut w = String::new();
                let mut x = i + 7;
                for _ in 0..3 {
                    w.push_str(SYL[x % SYL.len()]);
                    x = x / SYL.len() + i * 31 + 3;
                }
                format!("{w}{i}")
            })
            .collect()
    }

    fn tpl(lines: &[&str]) -> Templates {
        Templates {
            name: "t".into(),
            lines: lines.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn embed_labels_matches_direct_ensemble_and_uses_cache() {
        let mut enc = FakeEncoder::new(16);
        let tok = ClipTokenizer::default();
        let t = tpl(&[
            "a photo of a {}.",
            "{}",
            "a very very long prompt about the {} here",
        ]);
        let labels: Vec<String> = ["cat", "dog", "cat", "sea lion"].map(String::from).to_vec();
        let got = embed_labels(&mut enc, &tok, &t, &labels, None, 2, &mut NoProgress).unwrap();
        assert_eq!((got.cached, got.encoded, got.prompts), (0, 3, 9));
        assert!(enc.calls.iter().all(|&(b, c)| b <= 2 && c == 77));
        // Direct: one prompt at a time.
        for (i, l) in labels.iter().enumerate() {
            let mut acc = [0f64; 16];
            for p in t.apply(l) {
                let e = enc.embed_texts(tok.encode_batch(&[p]).view()).unwrap();
                for (a, v) in acc.iter_mut().zip(e.row(0)) {
                    *a += f64::from(*v);
                }
            }
            let n = acc.iter().map(|v| v * v).sum::<f64>().sqrt();
            for (a, g) in acc.iter().zip(got.vectors.row(i)) {
                assert!((a / n - f64::from(*g)).abs() < 1e-6);
            }
        }
        assert_eq!(got.vectors.row(0), got.vectors.row(2));

        let tmp = tempfile::tempdir().unwrap();
        let open = || EmbedCache::open(tmp.path(), "fp", &t.fingerprint(), &t.name, 16).unwrap();
        let mut cache = open();
        let a = embed_labels(
            &mut enc,
            &tok,
            &t,
            &labels,
            Some(&mut cache),
            256,
            &mut NoProgress,
        )
        .unwrap();
        assert_eq!((a.cached, a.encoded), (0, 3));
        drop(cache);
        let mut cache = open();
        assert_eq!(cache.len(), 3);
        enc.calls.clear();
        let more: Vec<String> = ["dog", "cat", "emu"].map(String::from).to_vec();
        let b = embed_labels(
            &mut enc,
            &tok,
            &t,
            &more,
            Some(&mut cache),
            256,
            &mut NoProgress,
        )
        .unwrap();
        assert_eq!((b.cached, b.encoded, b.prompts), (2, 1, 3));
        assert_eq!(b.vectors.row(0), a.vectors.row(1));
        assert_eq!(b.vectors.row(1), a.vectors.row(0));
        assert_eq!(enc.calls.len(), 1);
    }

    #[test]
    fn prompts_are_sorted_by_length() {
        struct Lengths(FakeEncoder, Vec<Vec<usize>>);
        impl Encoder for Lengths {
            fn embed_images(
                &mut self,
                b: ArrayView4<'_, f32>,
            ) -> Result<Array2<f32>, EncoderError> {
                self.0.embed_images(b)
            }
            fn embed_texts(&mut self, t: ArrayView2<'_, i64>) -> Result<Array2<f32>, EncoderError> {
                self.1.push(
                    t.rows()
                        .into_iter()
                        .map(|r| token_len(r.as_slice().unwrap_or(&r.to_vec())))
                        .collect(),
                );
                self.0.embed_texts(t)
            }
            fn info(&self) -> &EncoderInfo {
                self.0.info()
            }
        }
        let mut enc = Lengths(FakeEncoder::new(8), Vec::new());
        let tok = ClipTokenizer::default();
        let t = tpl(&["{}", "one two three four five six seven {}"]);
        let labels = words(40);
        embed_labels(&mut enc, &tok, &t, &labels, None, 8, &mut NoProgress).unwrap();
        let all: Vec<usize> = enc.1.concat();
        assert_eq!(all.len(), 80);
        assert!(all.windows(2).all(|w| w[0] <= w[1]), "{all:?}");
    }

    fn request(mode: OutlierMode, n_words: usize) -> BuildRequest {
        let id = IdLabels {
            names: words(200).into_iter().map(|w| format!("id{w}")).collect(),
            wnids: vec![None; 200],
        };
        BuildRequest {
            id,
            templates: tpl(&["a photo of a {}.", "{}"]),
            outlier_words: words(n_words),
            adjectives: Vec::new(),
            mode,
            no_embeddings: None,
            words_per_row: 4,
            batch: 64,
            params: serde_json::json!({"id": "test"}),
            cleaning: serde_json::json!({"exact": 0}),
        }
    }

    #[test]
    fn prototype_mode_equals_build_outliers() {
        let mut enc = FakeEncoder::new(32);
        let tok = ClipTokenizer::default();
        let p = OplParams {
            k: 40,
            quantile: 0.5,
            seed: 3,
            hopg: Some(HopgParams {
                clusters: 2,
                per_cluster: 10,
                ..HopgParams::default()
            }),
            nearest_words: 4,
            ..OplParams::default()
        };
        let req = request(OutlierMode::Prototypes(p.clone()), 300);
        let (bank, report) = build_bank(&mut enc, &tok, &req, None, &mut NoProgress).unwrap();
        let e = embed_labels(
            &mut enc,
            &tok,
            &req.templates,
            &req.outlier_words,
            None,
            64,
            &mut NoProgress,
        )
        .unwrap();
        let set = prototypes::build_outliers(e.vectors.view(), bank.id.view(), &p).unwrap();
        assert_eq!(bank.outliers.dim(), set.vectors.dim());
        for (a, b) in bank.outliers.iter().zip(set.vectors.iter()) {
            assert!((a - b).abs() < 1e-6);
        }
        assert_eq!(report.counts, Some(set.counts));
        assert_eq!(bank.meta.theta, Some(set.theta));
        assert_eq!(bank.meta.outliers.len(), bank.outliers.nrows());
        let first = &bank.meta.outliers[0];
        assert_eq!(first.kind, "prototype");
        assert_eq!(first.words.len(), 4);
        assert_eq!(first.label, first.words[0]);
        assert_eq!(bank.meta.build["k"], 40);
        assert_eq!(bank.meta.build["id"], "test");
        assert_eq!(bank.meta.build["hopg"]["per_cluster"], 10);
        assert_eq!(bank.meta.cleaning["exact"], 0);
        assert_eq!(bank.meta.model_weights, "random");
        assert_eq!(bank.meta.model_fingerprint, "fakefingerprint0123456789");
        if set.counts.accepted > 0 {
            assert_eq!(
                bank.meta.outliers.last().map(|r| r.kind.as_str()),
                Some("hard")
            );
        }
    }

    #[test]
    fn built_banks_load_back() {
        let mut enc = FakeEncoder::new(32);
        let tok = ClipTokenizer::default();
        let p = OplParams {
            k: 40,
            quantile: 0.5,
            hopg: None,
            ..OplParams::default()
        };
        for mode in [OutlierMode::Prototypes(p), OutlierMode::Raw] {
            let (bank, _) =
                build_bank(&mut enc, &tok, &request(mode, 300), None, &mut NoProgress).unwrap();
            // Metadata floats (θ, cosines, λ) must parse back bit-exact: serde_json's
            // `float_roundtrip` feature.
            let back = Bank::from_bytes(&bank.to_bytes().unwrap()).unwrap();
            assert_eq!(back.meta, bank.meta);
        }
    }

    #[test]
    fn raw_and_neglabel_modes() {
        let mut enc = FakeEncoder::new(32);
        let tok = ClipTokenizer::default();
        let (bank, r) = build_bank(
            &mut enc,
            &tok,
            &request(OutlierMode::Raw, 50),
            None,
            &mut NoProgress,
        )
        .unwrap();
        assert_eq!((bank.outliers.nrows(), r.n_outliers), (50, 50));
        assert_eq!(bank.meta.outliers[3].kind, "label");
        assert_eq!(bank.meta.theta, None);

        let mut req = request(
            OutlierMode::NegLabel {
                params: NegLabelParams::default(),
                noun_templates: tpl(&["the nice {}"]),
                adj_templates: tpl(&["This is a {} photo"]),
            },
            100,
        );
        req.adjectives = words(40).into_iter().map(|w| format!("{w}ish")).collect();
        let (bank, _) = build_bank(&mut enc, &tok, &req, None, &mut NoProgress).unwrap();
        assert_eq!(bank.outliers.nrows(), 15 + 6);
        let etas: Vec<f64> = bank.meta.outliers[..15]
            .iter()
            .map(|r| r.detail["eta"].as_f64().unwrap())
            .collect();
        assert!(etas.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(bank.meta.outliers[15].detail["pos"], "adj");
        assert_eq!(bank.meta.build["neglabel"]["kept"]["noun"]["kept"], 15);
    }

    #[test]
    fn early_checks() {
        let mut enc = FakeEncoder::new(8);
        let tok = ClipTokenizer::default();
        let mut req = request(OutlierMode::Prototypes(OplParams::default()), 100);
        req.id.names.truncate(10);
        req.id.wnids.truncate(10);
        let err = build_bank(&mut enc, &tok, &req, None, &mut NoProgress).unwrap_err();
        assert!(err.to_string().contains("lower --k"), "{err}");
        req.mode = OutlierMode::Prototypes(OplParams {
            k: 10,
            ..OplParams::default()
        });
        let err = build_bank(&mut enc, &tok, &req, None, &mut NoProgress).unwrap_err();
        assert!(err.to_string().contains("--no-hopg"), "{err}");
        assert!(enc.calls.is_empty(), "nothing is encoded before the checks");
    }

    fn npy(descr: &str, shape: &str, fortran: bool, data: &[u8]) -> Vec<u8> {
        let mut h = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn npy_dtypes_and_orders() {
        let f32s: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse_npy(&npy("<f4", "(2, 3)", false, &f32s)).unwrap();
        assert_eq!(a, ndarray::array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        let f = parse_npy(&npy("<f4", "(2, 3)", true, &f32s)).unwrap();
        assert_eq!(f, ndarray::array![[1.0f32, 3.0, 5.0], [2.0, 4.0, 6.0]]);
        // float16: 1.0 = 0x3c00, -2.0 = 0xc000, 0.5 = 0x3800, 65504 = 0x7bff, 2^-24 = 0x0001.
        let h: Vec<u8> = [0x3c00u16, 0xc000, 0x3800, 0x7bff, 0x0001, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse_npy(&npy("<f2", "(3, 2)", false, &h)).unwrap();
        assert_eq!(
            a.iter().copied().collect::<Vec<_>>(),
            vec![1.0, -2.0, 0.5, 65504.0, 2f32.powi(-24), 0.0]
        );
        let d: Vec<u8> = [0.25f64, -1.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            parse_npy(&npy("<f8", "(2,)", false, &d)).unwrap(),
            ndarray::array![[0.25f32, -1.0]]
        );
        assert!(parse_npy(&npy("<i4", "(1, 1)", false, &[0; 4])).is_err());
        assert!(parse_npy(&npy("<f4", "(2, 3)", false, &f32s[..20])).is_err());
        assert!(parse_npy(b"hello world").is_err());
        // What ndarray-npy writes reads back.
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x.npy");
        let m = ndarray::array![[0.5f32, 1.5], [2.5, -3.5]];
        ndarray_npy::write_npy(&p, &m).unwrap();
        assert_eq!(read_npy(&p).unwrap(), m);
        let mut m2 = m.clone();
        normalize_embeddings(&mut m2, 1e-6).unwrap();
        assert!((m2.row(0).dot(&m2.row(0)) - 1.0).abs() < 1e-6);
        let unit = ndarray::array![[0.6f32, 0.8]];
        let mut u2 = unit.clone();
        normalize_embeddings(&mut u2, 1e-6).unwrap();
        assert_eq!(u2, unit, "unit rows are left alone");
        let mut z = Array2::<f32>::zeros((2, 2));
        assert_eq!(normalize_embeddings(&mut z, 1e-6), Err(0));
    }

    #[test]
    fn import_checks_lengths() {
        let req = ImportRequest {
            id: ndarray::array![[1.0f32, 0.0], [0.0, 1.0]],
            id_labels: IdLabels {
                names: vec!["a".into(), "b".into()],
                wnids: vec![None, None],
            },
            no: None,
            outliers: Some((ndarray::array![[1.0f32, 1.0]], None)),
            model_fingerprint: "fp".into(),
            model_name: String::new(),
            model_weights: "unknown".into(),
            theta: None,
            params: serde_json::Value::Null,
        };
        let b = import_bank(req.clone()).unwrap();
        assert_eq!(b.meta.outliers[0].label, "outlier 0");
        let mut bad = req.clone();
        bad.outliers = Some((ndarray::array![[1.0f32, 1.0]], Some(vec![])));
        assert!(import_bank(bad).is_err());
        let mut bad = req;
        bad.id_labels.names.pop();
        bad.id_labels.wnids.pop();
        assert!(import_bank(bad).is_err());
    }
}
