//! Where a bank's label embeddings come from: the model's text tower (through the embedding
//! cache) or matrices computed elsewhere (`bank build --id-embeddings/--outlier-embeddings`).
//! Everything after this step (cleaning, clustering, refinement, HOPG, NegLabel mining) is the
//! same for both, so a bank built from an encoder's own label embeddings equals the one built
//! by encoding.

use std::collections::HashMap;

use ndarray::Array2;

use super::BuildError;
use super::build::{CacheSpec, open_cache, weights_name};
use super::embed::{LabelEmbeddings, Phase, Progress, embed_labels};
use super::labels::Templates;
use crate::detect::norm::normalize_rows_off_unit;
use crate::model::{ClipTokenizer, Encoder};

/// Which list of labels is being embedded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelSet {
    /// The ID class names, in class order.
    Id,
    /// The (cleaned) outlier words, or NegLabel's noun candidates.
    Outliers,
    /// NegLabel's adjective candidates.
    Adjectives,
}

impl LabelSet {
    fn phase(self) -> &'static str {
        match self {
            LabelSet::Id => "ID labels",
            LabelSet::Outliers => "outlier labels",
            LabelSet::Adjectives => "adjective candidates",
        }
    }
}

/// The model the embeddings belong to, as the bank records it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceModel {
    /// The model fingerprint (banks refuse other models).
    pub fingerprint: String,
    /// A readable model name ("" when unknown).
    pub name: String,
    /// "pretrained", "random" or "unknown".
    pub weights: String,
    /// Embedding dimension.
    pub dim: usize,
}

/// A supplier of unit label embeddings.
pub trait LabelSource {
    /// The model the embeddings come from.
    fn model(&self) -> &SourceModel;
    /// "text-encoder" or "precomputed", recorded in the bank.
    fn kind(&self) -> &'static str;
    /// One unit row per label of `labels`, in order. `templates` is the prompt set the labels
    /// are embedded with (a precomputed source was embedded however its author chose).
    fn embed(
        &mut self,
        set: LabelSet,
        templates: &Templates,
        labels: &[String],
        progress: &mut dyn Progress,
    ) -> Result<LabelEmbeddings, BuildError>;
}

/// The model's text tower: prompt ensembles through the tokenizer and the encoder, reusing the
/// label-embedding cache (one cache folder per template set).
pub struct TextTower<'a> {
    encoder: &'a mut dyn Encoder,
    tokenizer: &'a ClipTokenizer,
    cache: Option<&'a CacheSpec>,
    batch: usize,
    model: SourceModel,
}

impl<'a> TextTower<'a> {
    pub fn new(
        encoder: &'a mut dyn Encoder,
        tokenizer: &'a ClipTokenizer,
        cache: Option<&'a CacheSpec>,
        batch: usize,
    ) -> Self {
        let info = encoder.info();
        let model = SourceModel {
            fingerprint: info.fingerprint.clone(),
            name: info.model.clone(),
            weights: weights_name(&info.weights),
            dim: info.embed_dim,
        };
        TextTower {
            encoder,
            tokenizer,
            cache,
            batch,
            model,
        }
    }
}

impl LabelSource for TextTower<'_> {
    fn model(&self) -> &SourceModel {
        &self.model
    }
    fn kind(&self) -> &'static str {
        "text-encoder"
    }
    fn embed(
        &mut self,
        set: LabelSet,
        templates: &Templates,
        labels: &[String],
        progress: &mut dyn Progress,
    ) -> Result<LabelEmbeddings, BuildError> {
        let mut cache = open_cache(
            self.cache,
            &self.model.fingerprint,
            templates,
            self.model.dim,
        );
        embed_labels(
            self.encoder,
            self.tokenizer,
            templates,
            labels,
            cache.as_mut(),
            self.batch,
            &mut Phase::new(progress, set.phase()),
        )
    }
}

/// Label embeddings computed elsewhere: the ID matrix has one row per ID class in class order;
/// the outlier matrix one row per word line of the outlier list (`rows`), so cleaning can drop
/// rows by their words. Rows are normalised here (in f64), as the text tower's are.
pub struct Precomputed {
    model: SourceModel,
    id: Array2<f32>,
    id_origin: String,
    outliers: Option<(Array2<f32>, HashMap<String, usize>, String)>,
}

impl Precomputed {
    /// `id`: the ID matrix and where it came from (named in errors).
    pub fn new(model: SourceModel, id: Array2<f32>, id_origin: &str) -> Result<Self, BuildError> {
        let id = unit_rows(id, id_origin, model.dim)?;
        Ok(Precomputed {
            model,
            id,
            id_origin: id_origin.to_string(),
            outliers: None,
        })
    }

    /// Adds the outlier matrix: row i embeds `lines[i]` (the word lines of the outlier list,
    /// duplicates included; a repeated word uses its first row).
    pub fn with_outliers(
        mut self,
        matrix: Array2<f32>,
        lines: &[String],
        origin: &str,
    ) -> Result<Self, BuildError> {
        if matrix.nrows() != lines.len() {
            return Err(BuildError::Invalid(format!(
                "{origin} has {} rows but the outlier list has {} words (one row per word line, \
                 in file order)",
                matrix.nrows(),
                lines.len()
            )));
        }
        let matrix = unit_rows(matrix, origin, self.model.dim)?;
        let mut index = HashMap::with_capacity(lines.len());
        for (i, w) in lines.iter().enumerate() {
            index.entry(w.clone()).or_insert(i);
        }
        self.outliers = Some((matrix, index, origin.to_string()));
        Ok(self)
    }
}

/// Checks the width and brings every row to unit norm. Rows already unit to within 1e-6 are
/// kept bit for bit (the text tower's own f32 rows then give the same bank as encoding); a
/// zero or non-finite row is an error naming the file and the row.
fn unit_rows(mut m: Array2<f32>, origin: &str, dim: usize) -> Result<Array2<f32>, BuildError> {
    if m.ncols() != dim {
        return Err(BuildError::Invalid(format!(
            "{origin} has dimension {} but {dim} was expected",
            m.ncols()
        )));
    }
    let bad = |row: usize| BuildError::BadRow {
        origin: origin.to_string(),
        row,
    };
    normalize_rows_off_unit(&mut m, 1e-6).map_err(bad)?;
    if let Some(i) = m
        .rows()
        .into_iter()
        .position(|r| r.iter().any(|x| !x.is_finite()))
    {
        return Err(bad(i));
    }
    Ok(m)
}

impl LabelSource for Precomputed {
    fn model(&self) -> &SourceModel {
        &self.model
    }
    fn kind(&self) -> &'static str {
        "precomputed"
    }
    fn embed(
        &mut self,
        set: LabelSet,
        _templates: &Templates,
        labels: &[String],
        _progress: &mut dyn Progress,
    ) -> Result<LabelEmbeddings, BuildError> {
        let vectors = match set {
            LabelSet::Id => {
                if self.id.nrows() != labels.len() {
                    return Err(BuildError::Invalid(format!(
                        "{} has {} rows but there are {} ID labels (one row per class, in the \
                         order of --id)",
                        self.id_origin,
                        self.id.nrows(),
                        labels.len()
                    )));
                }
                self.id.clone()
            }
            LabelSet::Outliers => {
                let Some((m, index, origin)) = &self.outliers else {
                    return Err(BuildError::Invalid(
                        "ID embeddings were given without outlier embeddings: pass \
                         --outlier-embeddings O.npy (one row per line of --outliers)"
                            .into(),
                    ));
                };
                let mut rows = Vec::with_capacity(labels.len());
                for w in labels {
                    let i = index.get(w).ok_or_else(|| {
                        BuildError::Invalid(format!("outlier word {w:?} has no row in {origin}"))
                    })?;
                    rows.push(*i);
                }
                m.select(ndarray::Axis(0), &rows)
            }
            LabelSet::Adjectives => {
                return Err(BuildError::Invalid(
                    "NegLabel adjective candidates need the text encoder: with precomputed \
                     embeddings pass --adjectives none (the outlier rows are the noun candidates)"
                        .into(),
                ));
            }
        };
        Ok(LabelEmbeddings {
            vectors,
            cached: 0,
            encoded: 0,
            prompts: 0,
        })
    }
}
