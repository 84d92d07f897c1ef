//! Label embeddings with prompt ensembling through the CLIP tokenizer and the text encoder,
//! reusing the embedding cache; its own file because it is the only step that runs a model.

use std::collections::HashMap;

use ndarray::{Array2, s};

use super::BuildError;
use super::embed_cache::EmbedCache;
use super::labels::Templates;
use crate::detect::norm::{norm_f64, normalized_f64};
use crate::model::tokenizer::END_OF_TEXT;
use crate::model::{ClipTokenizer, Encoder, EncoderError};

/// Texts per encoder call by default.
pub const DEFAULT_BATCH: usize = 256;

/// Batches of prompts tokenised, sorted and encoded together before their labels are
/// finished and stored in the cache: bounds memory and loses little work on interruption.
const BATCHES_PER_CHUNK: usize = 32;

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

/// A [`Progress`] that names its phase.
pub(crate) struct Phase<'a> {
    inner: &'a mut dyn Progress,
    name: &'a str,
}

impl<'a> Phase<'a> {
    pub(crate) fn new(inner: &'a mut dyn Progress, name: &'a str) -> Self {
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
    let workers = crate::available_cores()
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

/// Embeds every label with the template ensemble of docs/method.md §3:
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
                let norm = norm_f64(row.iter());
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
            let unit = normalized_f64(a).ok_or_else(|| BuildError::BadEmbedding {
                label: label.to_string(),
            })?;
            for (d, v) in dst.iter_mut().zip(unit) {
                *d = v;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bank_build::test_support::*;
    use crate::model::encoder::EncoderInfo;
    use ndarray::{ArrayView2, ArrayView4};

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
}
