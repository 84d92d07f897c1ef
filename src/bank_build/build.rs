//! The bank construction: the build request and its early checks, OPL / raw / NegLabel outlier
//! rows, and [`build_bank`], which assembles the bank and records every parameter.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView2, Axis, s};
use serde::{Deserialize, Serialize};

use super::BuildError;
use super::embed::{LabelEmbeddings, Progress};
use super::embed_cache::{CacheError, EmbedCache};
use super::labels::{IdLabels, Templates};
use super::source::{LabelSet, LabelSource};
use crate::detect::bank::{BANK_FORMAT, Bank, BankMeta, OutlierRow};
use crate::detect::kmeans::{KMeansParams, kmeans};
use crate::detect::prototypes::{
    self, HopgParams, OplCounts, OplParams, ProtoError, hard_prototypes, nearest_words,
    outlier_prototypes, refine,
};

/// Outlier words recorded per outlier row.
pub const DEFAULT_WORDS_PER_ROW: usize = 10;

/// NegLabel negative mining (docs/method.md §9).
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
    /// OPL prototypes, refinement and (optionally) HOPG (§5–§7): `--prototypes kmeans`.
    Prototypes(OplParams),
    /// The refinement applied to the outlier-label embeddings themselves, no clustering, and
    /// (optionally) HOPG: `--prototypes words` (§6.1).
    Words(WordParams),
    /// Every outlier-label embedding as a row (the "raw OLE" ablation, §11.10):
    /// `--prototypes none`.
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

/// The `words` variant: refinement at `quantile` over the label embeddings, then HOPG.
#[derive(Debug, Clone, PartialEq)]
pub struct WordParams {
    /// Refinement quantile q. Default 0.1.
    pub quantile: f64,
    /// HOPG parameters; `None` skips it.
    pub hopg: Option<HopgParams>,
}

impl OutlierMode {
    /// The mode as `BankMeta.build.mode` records it (`prototypes` is the OPL pipeline).
    pub fn name(&self) -> &'static str {
        match self {
            OutlierMode::Prototypes(_) => "prototypes",
            OutlierMode::Words(_) => "words",
            OutlierMode::Raw => "raw",
            OutlierMode::NegLabel { .. } => "neglabel",
        }
    }

    /// The `--prototypes` variant: kmeans, words or none (`neglabel` for NegLabel banks).
    pub fn prototypes(&self) -> &'static str {
        match self {
            OutlierMode::Prototypes(_) => "kmeans",
            OutlierMode::Words(_) => "words",
            OutlierMode::Raw => "none",
            OutlierMode::NegLabel { .. } => "neglabel",
        }
    }

    /// HOPG's parameters, when it runs.
    pub fn hopg(&self) -> Option<&HopgParams> {
        match self {
            OutlierMode::Prototypes(p) => p.hopg.as_ref(),
            OutlierMode::Words(p) => p.hopg.as_ref(),
            _ => None,
        }
    }

    /// `--hard-prototypes N`: the boundary ID embeddings HOPG mixes (J × per component),
    /// 0 when it is off.
    pub fn hard_prototypes(&self) -> usize {
        self.hopg()
            .map_or(0, |h| h.clusters.saturating_mul(h.per_cluster))
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
    /// Logit scale stored in the bank (the methods' own default when `None`).
    pub scale: Option<f32>,
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

pub(crate) fn open_cache(
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
        }
        OutlierMode::Words(p) => {
            if !(0.0..=1.0).contains(&p.quantile) {
                return Err(ProtoError::InvalidQuantile(p.quantile).into());
            }
            if req.outlier_words.is_empty() {
                return Err(BuildError::Invalid(
                    "no outlier words remain after cleaning".into(),
                ));
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
    if let Some(h) = req.mode.hopg()
        && h.clusters.saturating_mul(h.per_cluster) > c
    {
        return Err(BuildError::Invalid(format!(
            "HOPG needs {} × {} = {} boundary ID embeddings (docs/method.md §7) but there are \
             only {c} ID classes; pass --hard-prototypes 0, or fewer (a multiple of \
             --hopg-clusters)",
            h.clusters,
            h.per_cluster,
            h.clusters.saturating_mul(h.per_cluster)
        )));
    }
    if let Some(s) = req.scale
        && !(s.is_finite() && s > 0.0)
    {
        return Err(BuildError::Invalid(format!(
            "--scale must be a finite number > 0, got {s}"
        )));
    }
    Ok(())
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
            out.push(prototypes::numpy_quantile(&v, percentile));
        }
        start = end;
    }
    out
}

/// Builds a bank from labels: embeds the ID labels and the outlier words with `source` (the
/// text tower or precomputed matrices), then makes the outlier rows as `req.mode` says.
///
/// `BankMeta.build` records every parameter; `BankMeta.cleaning` is `req.cleaning`.
pub fn build_bank(
    source: &mut dyn LabelSource,
    req: &BuildRequest,
    progress: &mut dyn Progress,
) -> Result<(Bank, BuildReport), BuildError> {
    check_request(req)?;
    let model = source.model().clone();
    let dim = model.dim;
    let mut timings = Timings::default();
    let (mut cached, mut encoded, mut prompts) = (0, 0, 0);
    let mut tally = |e: &LabelEmbeddings| {
        cached += e.cached;
        encoded += e.encoded;
        prompts += e.prompts;
    };

    // Text embeddings.
    let t0 = Instant::now();
    let id_emb = source.embed(LabelSet::Id, &req.templates, &req.id.names, progress)?;
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
    build.insert("prototypes".into(), req.mode.prototypes().into());
    build.insert("hard_prototypes".into(), req.mode.hard_prototypes().into());
    build.insert("label_source".into(), source.kind().into());
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
    if let Some(scale) = req.scale {
        build.insert("scale".into(), f64::from(scale).into());
    }

    // Every mode but NegLabel embeds the outlier labels with the main templates.
    let labels = match &req.mode {
        OutlierMode::NegLabel { .. } => None,
        _ => {
            let w = source.embed(LabelSet::Outliers, &req.templates, words, progress)?;
            tally(&w);
            timings.text_embedding = t0.elapsed();
            Some(w.vectors)
        }
    };
    let n_words;
    match (&req.mode, labels) {
        (OutlierMode::Prototypes(p), Some(e)) => {
            n_words = words.len();
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
            let protos = outlier_prototypes(km.centroids.view())?;
            let refined = refine_and_harden(
                protos,
                &e,
                &t,
                p.quantile,
                p.hopg.as_ref(),
                req,
                &mut timings,
                |k, ws| {
                    (
                        "prototype",
                        ws.first()
                            .cloned()
                            .unwrap_or_else(|| format!("cluster {k}")),
                        serde_json::json!({"cluster": k, "size": km.sizes[k]}),
                    )
                },
            )?;
            refined.record(&mut build, p.quantile, p.hopg.as_ref());
            (counts, theta) = (Some(refined.counts), Some(refined.theta));
            (rows, outliers) = (refined.rows, refined.vectors);
            kmeans_info = Some((km.iterations, km.converged));
            build.insert("k".into(), p.k.into());
            build.insert("seed".into(), p.seed.into());
            build.insert("max_iter".into(), p.max_iter.into());
            build.insert("kmeans_iterations".into(), km.iterations.into());
            build.insert("kmeans_converged".into(), km.converged.into());
            build.insert("kmeans_empty_reseeds".into(), km.empty_reseeds.into());
        }
        (OutlierMode::Words(p), Some(e)) => {
            n_words = words.len();
            // The refinement of §6 applied to the label embeddings themselves: every word
            // below θ is a row (docs/method.md §6.1).
            let refined = refine_and_harden(
                e.clone(),
                &e,
                &t,
                p.quantile,
                p.hopg.as_ref(),
                req,
                &mut timings,
                |k, _| ("word", words[k].clone(), serde_json::json!({"word": k})),
            )?;
            refined.record(&mut build, p.quantile, p.hopg.as_ref());
            (counts, theta) = (Some(refined.counts), Some(refined.theta));
            (rows, outliers) = (refined.rows, refined.vectors);
        }
        (OutlierMode::Raw, Some(e)) => {
            n_words = words.len();
            outliers = e;
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
        (
            OutlierMode::NegLabel {
                params,
                noun_templates,
                adj_templates,
            },
            _,
        ) => {
            let mut lists: Vec<(&str, &Vec<String>, &Templates, LabelSet)> = Vec::new();
            if !words.is_empty() {
                lists.push(("noun", words, noun_templates, LabelSet::Outliers));
            }
            if !req.adjectives.is_empty() {
                lists.push(("adj", &req.adjectives, adj_templates, LabelSet::Adjectives));
            }
            let mut embedded = Vec::new();
            for (_, list, tpl, set) in &lists {
                let w = source.embed(*set, tpl, list, progress)?;
                tally(&w);
                embedded.push(w.vectors);
            }
            timings.text_embedding = t0.elapsed();
            n_words = words.len() + req.adjectives.len();
            let t1 = Instant::now();
            let mut picked: Vec<Array2<f32>> = Vec::new();
            let mut kept_counts = BTreeMap::new();
            for ((pos, list, tpl, _), e) in lists.iter().zip(&embedded) {
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
        (_, None) => unreachable!("outlier labels are embedded above for every mode but NegLabel"),
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
        model_fingerprint: model.fingerprint,
        model_name: model.name,
        model_weights: model.weights,
        dim,
        id_labels: req.id.names.clone(),
        id_wnids: req.id.wnids.clone(),
        outliers: rows,
        theta,
        scale: req.scale,
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

/// Refined (and hardened) outlier rows.
struct Refined {
    vectors: Array2<f32>,
    rows: Vec<OutlierRow>,
    counts: OplCounts,
    theta: f64,
}

impl Refined {
    /// Records the refinement's parameters and counts in the bank's build parameters.
    fn record(
        &self,
        build: &mut serde_json::Map<String, serde_json::Value>,
        quantile: f64,
        hopg: Option<&HopgParams>,
    ) {
        build.insert("quantile".into(), quantile.into());
        build.insert(
            "hopg".into(),
            serde_json::to_value(hopg).unwrap_or_default(),
        );
        build.insert(
            "counts".into(),
            serde_json::to_value(self.counts).unwrap_or_default(),
        );
    }
}

/// Refinement (§6) of `protos` against the ID rows `t`, their nearest outlier words for
/// provenance, and HOPG (§7) when `hopg` is given. `describe(k, nearest words)` names prototype
/// k: its row kind, label and detail.
#[allow(clippy::too_many_arguments)]
fn refine_and_harden(
    protos: Array2<f32>,
    word_embeddings: &Array2<f32>,
    t: &Array2<f32>,
    quantile: f64,
    hopg: Option<&HopgParams>,
    req: &BuildRequest,
    timings: &mut Timings,
    describe: impl Fn(usize, &[String]) -> (&'static str, String, serde_json::Value),
) -> Result<Refined, BuildError> {
    let words = &req.outlier_words;
    let t2 = Instant::now();
    let refinement = refine(protos.view(), t.view(), quantile)?;
    let kept = protos.select(Axis(0), &refinement.kept);
    let near = nearest_words(
        kept.view(),
        word_embeddings.view(),
        req.words_per_row.max(1),
    )?;
    timings.refinement = t2.elapsed();
    let mut rows = Vec::with_capacity(kept.nrows());
    for (&k, list) in refinement.kept.iter().zip(&near) {
        let ws: Vec<String> = list.iter().map(|&(i, _)| words[i].clone()).collect();
        let (kind, label, mut detail) = describe(k, &ws);
        if let serde_json::Value::Object(d) = &mut detail {
            d.insert("max_id_cos".into(), refinement.max_id_cos[k].into());
            d.insert(
                "nearest_id".into(),
                serde_json::to_value(req.id.names.get(refinement.nearest_id[k]))
                    .unwrap_or_default(),
            );
            d.insert(
                "word_cos".into(),
                list.iter().map(|&(_, c)| c).collect::<Vec<_>>().into(),
            );
        }
        rows.push(OutlierRow {
            kind: kind.into(),
            label,
            words: ws,
            detail,
        });
    }

    let t3 = Instant::now();
    let dim = protos.ncols();
    let (vectors, boundary, accepted) = match hopg {
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
    Ok(Refined {
        vectors,
        rows,
        counts: OplCounts {
            k: protos.nrows(),
            kept: refinement.kept.len(),
            boundary,
            accepted,
        },
        theta: refinement.theta,
    })
}

/// "pretrained" / "random" for a [`crate::model::Weights`].
pub fn weights_name(w: &crate::model::Weights) -> String {
    match serde_json::to_value(w) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bank_build::embed::NoProgress;
    use crate::bank_build::embed::embed_labels;
    use crate::bank_build::source::{Precomputed, SourceModel, TextTower};
    use crate::bank_build::test_support::*;
    use crate::model::ClipTokenizer;

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
            scale: None,
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
        let (bank, report) = build_bank(
            &mut TextTower::new(&mut enc, &tok, None, 64),
            &req,
            &mut NoProgress,
        )
        .unwrap();
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
            let (bank, _) = build_bank(
                &mut TextTower::new(&mut enc, &tok, None, 64),
                &request(mode, 300),
                &mut NoProgress,
            )
            .unwrap();
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
            &mut TextTower::new(&mut enc, &tok, None, 64),
            &request(OutlierMode::Raw, 50),
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
        let (bank, _) = build_bank(
            &mut TextTower::new(&mut enc, &tok, None, 64),
            &req,
            &mut NoProgress,
        )
        .unwrap();
        assert_eq!(bank.outliers.nrows(), 15 + 6);
        let etas: Vec<f64> = bank.meta.outliers[..15]
            .iter()
            .map(|r| r.detail["eta"].as_f64().unwrap())
            .collect();
        assert!(etas.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(bank.meta.outliers[15].detail["pos"], "adj");
        assert_eq!(bank.meta.build["neglabel"]["kept"]["noun"]["kept"], 15);
    }

    fn precomputed(t: Array2<f32>, o: Array2<f32>, lines: &[String]) -> Precomputed {
        let model = SourceModel {
            fingerprint: "fp-precomputed".into(),
            name: "elsewhere".into(),
            weights: "pretrained".into(),
            dim: t.ncols(),
        };
        Precomputed::new(model, t, "T.npy")
            .unwrap()
            .with_outliers(o, lines, "O.npy")
            .unwrap()
    }

    /// `--prototypes words` by hand: ID rows e0, e1; five unit words whose largest cosine to an
    /// ID row is d = 0, 0.6, 0.8, 0.28, 0.96. Sorted d = [0, 0.28, 0.6, 0.8, 0.96]; numpy's
    /// linear quantile at q = 0.5 is h = 4 · 0.5 = 2 → θ = 0.6, and the strict test d < θ keeps
    /// w0 and w3. At q = 0.25, h = 1 → θ = 0.28 keeps w0 only. Dropping w3 by cleaning takes
    /// its row out before the quantile: d = [0, 0.6, 0.8, 0.96], q = 0.5 → h = 1.5 → θ = 0.7,
    /// keeping w0 and w1.
    #[test]
    fn words_refinement_by_hand() {
        let t = ndarray::array![[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0]];
        let o = ndarray::array![
            [0.0f32, 0.0, 1.0],
            [0.6, 0.0, 0.8],
            [0.0, 0.8, 0.6],
            [0.28, 0.0, 0.96],
            [0.96, 0.0, 0.28],
        ];
        let lines: Vec<String> = (0..5).map(|i| format!("w{i}")).collect();
        let mut req = request(
            OutlierMode::Words(WordParams {
                quantile: 0.5,
                hopg: None,
            }),
            0,
        );
        req.id = IdLabels {
            names: vec!["a".into(), "b".into()],
            wnids: vec![None, None],
        };
        req.outlier_words = lines.clone();
        req.words_per_row = 2;
        let build = |req: &BuildRequest| {
            let mut src = precomputed(t.clone(), o.clone(), &lines);
            build_bank(&mut src, req, &mut NoProgress).unwrap().0
        };
        let bank = build(&req);
        assert_eq!(bank.meta.theta, Some(f64::from(0.6f32)));
        let labels: Vec<&str> = bank
            .meta
            .outliers
            .iter()
            .map(|r| r.label.as_str())
            .collect();
        assert_eq!(labels, ["w0", "w3"]);
        assert_eq!(bank.outliers.row(1).to_vec(), o.row(3).to_vec());
        assert_eq!(bank.meta.outliers[1].kind, "word");
        assert_eq!(bank.meta.outliers[1].detail["nearest_id"], "a");
        assert_eq!(bank.meta.build["prototypes"], "words");
        assert_eq!(bank.meta.build["hard_prototypes"], 0);
        assert_eq!(bank.meta.build["label_source"], "precomputed");
        assert_eq!(bank.meta.model_fingerprint, "fp-precomputed");
        assert_eq!(bank.meta.model_weights, "pretrained");

        req.mode = OutlierMode::Words(WordParams {
            quantile: 0.25,
            hopg: None,
        });
        let bank = build(&req);
        assert_eq!(bank.meta.theta, Some(f64::from(0.28f32)));
        assert_eq!(bank.meta.outliers.len(), 1);

        req.mode = OutlierMode::Words(WordParams {
            quantile: 0.5,
            hopg: None,
        });
        req.outlier_words = ["w0", "w1", "w2", "w4"].map(String::from).to_vec();
        let bank = build(&req);
        let theta = 0.5 * (f64::from(0.6f32) + f64::from(0.8f32));
        assert!((bank.meta.theta.unwrap() - theta).abs() < 1e-12);
        let labels: Vec<&str> = bank
            .meta
            .outliers
            .iter()
            .map(|r| r.label.as_str())
            .collect();
        assert_eq!(labels, ["w0", "w1"]);
    }

    /// Fed the encoder's own label embeddings (the outlier matrix in file order, with words
    /// that cleaning removes and a repeated line), the precomputed path builds the same bank as
    /// encoding: the same rows bit for bit, θ, provenance and counts, for every variant.
    #[test]
    fn precomputed_embeddings_give_the_bank_that_encoding_gives() {
        let mut enc = FakeEncoder::new(32);
        let tok = ClipTokenizer::default();
        let hopg = Some(HopgParams {
            clusters: 2,
            per_cluster: 10,
            ..HopgParams::default()
        });
        let modes = [
            OutlierMode::Prototypes(OplParams {
                k: 40,
                quantile: 0.5,
                seed: 3,
                hopg: hopg.clone(),
                nearest_words: 4,
                ..OplParams::default()
            }),
            OutlierMode::Words(WordParams {
                quantile: 0.3,
                hopg,
            }),
            OutlierMode::Raw,
        ];
        for mode in modes {
            let req = request(mode, 300);
            let (encoded, _) = build_bank(
                &mut TextTower::new(&mut enc, &tok, None, 64),
                &req,
                &mut NoProgress,
            )
            .unwrap();
            // The file: 40 extra words (cleaned away), a repeat, in reverse order.
            let mut lines = words(340);
            lines.push(lines[5].clone());
            lines.reverse();
            let embed = |enc: &mut FakeEncoder, list: &[String]| {
                embed_labels(enc, &tok, &req.templates, list, None, 64, &mut NoProgress)
                    .unwrap()
                    .vectors
            };
            let t = embed(&mut enc, &req.id.names);
            let o = embed(&mut enc, &lines);
            let (bank, _) =
                build_bank(&mut precomputed(t, o, &lines), &req, &mut NoProgress).unwrap();
            assert_eq!(bank.id, encoded.id);
            assert_eq!(bank.outliers, encoded.outliers, "{}", req.mode.name());
            assert_eq!(bank.meta.outliers, encoded.meta.outliers);
            assert_eq!(bank.meta.theta, encoded.meta.theta);
            assert_eq!(bank.meta.build["counts"], encoded.meta.build["counts"]);
            assert_eq!(bank.meta.build["label_source"], "precomputed");
            assert_eq!(encoded.meta.build["label_source"], "text-encoder");
        }
    }

    #[test]
    fn precomputed_inputs_are_checked() {
        let t = ndarray::array![[1.0f32, 0.0], [0.0, 2.0]];
        let lines = vec!["x".to_string(), "y".to_string()];
        let mut src = precomputed(
            t.clone(),
            ndarray::array![[1.0f32, 1.0], [0.0, 1.0]],
            &lines,
        );
        // Rows are normalised; an ID row count that does not match --id is an error.
        let tpl = tpl(&["{}"]);
        let e = src
            .embed(
                LabelSet::Id,
                &tpl,
                &["a".into(), "b".into()],
                &mut NoProgress,
            )
            .unwrap();
        assert_eq!(e.vectors.row(1).to_vec(), vec![0.0, 1.0]);
        let err = src
            .embed(LabelSet::Id, &tpl, &["a".into()], &mut NoProgress)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("T.npy has 2 rows but there are 1 ID labels"),
            "{err}"
        );
        let err = src
            .embed(LabelSet::Outliers, &tpl, &["z".into()], &mut NoProgress)
            .unwrap_err();
        assert!(
            err.to_string().contains("\"z\" has no row in O.npy"),
            "{err}"
        );
        let err = src
            .embed(LabelSet::Adjectives, &tpl, &["red".into()], &mut NoProgress)
            .unwrap_err();
        assert!(err.to_string().contains("--adjectives none"), "{err}");
        // Row counts, widths and zero rows.
        let model = src.model().clone();
        let err = Precomputed::new(model.clone(), t.clone(), "T.npy")
            .unwrap()
            .with_outliers(ndarray::array![[1.0f32, 0.0]], &lines, "O.npy")
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("O.npy has 1 rows but the outlier list has 2"),
            "{err}"
        );
        let err = Precomputed::new(model.clone(), ndarray::array![[1.0f32, 0.0, 0.0]], "T.npy")
            .err()
            .unwrap();
        assert!(err.to_string().contains("dimension 3 but 2"), "{err}");
        let err = Precomputed::new(model, ndarray::array![[1.0f32, 0.0], [0.0, 0.0]], "T.npy")
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "T.npy: row 1 is zero or not finite");
    }

    #[test]
    fn early_checks() {
        let mut enc = FakeEncoder::new(8);
        let tok = ClipTokenizer::default();
        let mut req = request(OutlierMode::Prototypes(OplParams::default()), 100);
        req.id.names.truncate(10);
        req.id.wnids.truncate(10);
        let err = build_bank(
            &mut TextTower::new(&mut enc, &tok, None, 64),
            &req,
            &mut NoProgress,
        )
        .unwrap_err();
        assert!(err.to_string().contains("lower --k"), "{err}");
        req.mode = OutlierMode::Prototypes(OplParams {
            k: 10,
            ..OplParams::default()
        });
        let err = build_bank(
            &mut TextTower::new(&mut enc, &tok, None, 64),
            &req,
            &mut NoProgress,
        )
        .unwrap_err();
        assert!(err.to_string().contains("--hard-prototypes 0"), "{err}");
        assert!(enc.calls.is_empty(), "nothing is encoded before the checks");
    }
}
