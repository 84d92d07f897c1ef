//! The bank file (`.oodb`): banks T, T̄, Ô with their labels, θ, build parameters, thresholds
//! and the HNSW graphs in one versioned safetensors file; its own file: the one I/O of `detect/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array2, ArrayView2};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::index::{IndexDump, IndexParams, VectorIndex};
use super::method::{ScoreError, ScoreParams};
use super::scorer::Scorer;

pub const BANK_FORMAT: u32 = 1;
const META_KEY: &str = "oodgate";
/// Tensor names of the stored index blobs: (ID graph, ID data, outlier graph, outlier data).
const INDEX_TENSORS: [&str; 4] = [
    "index.id.graph",
    "index.id.data",
    "index.outliers.graph",
    "index.outliers.data",
];

#[derive(Debug, thiserror::Error)]
pub enum BankError {
    #[error("cannot read bank {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write bank {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid oodgate bank: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "bank was built with model {bank} but the loaded model is {model}; rebuild the bank for this model or force it (--force / detector.force_fingerprint)"
    )]
    FingerprintMismatch { bank: String, model: String },
    #[error("bank contents are inconsistent: {0}")]
    Inconsistent(String),
    #[error(transparent)]
    Score(#[from] ScoreError),
}

/// Where one outlier row came from, so it can be shown to a person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutlierRow {
    /// `prototype` (OPL cluster), `hard` (HOPG), `label` (a raw label embedding) or `imported`.
    pub kind: String,
    /// A short display label (the nearest word for prototypes).
    pub label: String,
    /// The outlier words nearest to this row, best first.
    #[serde(default)]
    pub words: Vec<String>,
    /// Kind-specific provenance (cluster size, partner prototype, λ, …).
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// A threshold calibrated on held-out ID data: OOD iff score < value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    pub value: f64,
    /// The requested fraction of ID inputs kept.
    pub tpr: f64,
    /// The fraction actually kept on the calibration set.
    pub achieved_tpr: f64,
    pub n_id: usize,
    #[serde(default)]
    pub source: String,
    /// The adaptive detector's thresholds from the same calibration scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<crate::detect::adaptive::AdaptiveCalibration>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BankMeta {
    pub format: u32,
    /// Content hash (first 16 hex digits of SHA-256 over metadata and matrices).
    pub version: String,
    pub created_by: String,
    pub model_fingerprint: String,
    #[serde(default)]
    pub model_name: String,
    /// "pretrained", "random" or "unknown" (imported without a model).
    pub model_weights: String,
    pub dim: usize,
    pub id_labels: Vec<String>,
    #[serde(default)]
    pub id_wnids: Vec<Option<String>>,
    pub outliers: Vec<OutlierRow>,
    pub theta: Option<f64>,
    /// The logit scale the bank's scores use (`bank build --scale`); each method's default
    /// when absent. A flag or `detector.scale` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
    /// Every build parameter, as given.
    #[serde(default)]
    pub build: serde_json::Value,
    /// How many outlier words each cleaning rule removed.
    #[serde(default)]
    pub cleaning: serde_json::Value,
    #[serde(default)]
    pub thresholds: BTreeMap<String, Threshold>,
    /// Written from [`Bank::stored_index`] at save and moved back into it at load (so `None`
    /// in memory); outside the content hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexMeta>,
}

/// A loaded bank.
///
/// The bank file (`.oodb`): one self-describing, versioned safetensors file holding the ID
/// embeddings T with their labels, optional CLIPN "no" embeddings T̄, the outlier vectors Ô
/// with their words, θ, every build parameter, the model fingerprint, a content hash as
/// version, and calibrated thresholds per method. Metadata is canonical JSON under the single
/// safetensors metadata key `oodgate`, so saving the same bank twice gives the same bytes.
///
/// The file also carries the HNSW graphs over the ID and outlier rows ([`StoredIndex`]): byte
/// tensors holding hnsw_rs's dumps, described in the metadata's `index` field with a SHA-256
/// per blob. The index is derived data (its construction is not deterministic), so it
/// is outside the content hash; instead it is verified against the hashed rows when loaded
/// (every stored vector must be its row, sampled searches must find their exact neighbours).
/// A missing, damaged or mismatching index is rebuilt with a warning.
#[derive(Debug, Clone)]
pub struct Bank {
    pub meta: BankMeta,
    pub id: Array2<f32>,
    pub no: Option<Array2<f32>>,
    pub outliers: Array2<f32>,
    /// The HNSW graphs saved with the bank, if any (see [`Bank::attach_index`]).
    pub stored_index: Option<StoredIndex>,
}

/// HNSW graphs over the ID rows and the outlier rows, as hnsw_rs dumped them.
#[derive(Clone, PartialEq)]
pub struct StoredIndex {
    pub params: IndexParams,
    pub id: IndexDump,
    pub outliers: IndexDump,
}

impl std::fmt::Debug for StoredIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoredIndex({:?}, {} bytes)", self.params, self.bytes())
    }
}

/// The description of the stored index (metadata field `index`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexMeta {
    pub params: IndexParams,
    pub id_rows: usize,
    pub outlier_rows: usize,
    /// SHA-256 (hex) of each blob: ID graph, ID data, outlier graph, outlier data.
    pub sha256: [String; 4],
}

impl StoredIndex {
    fn blobs(&self) -> [&[u8]; 4] {
        [
            &self.id.graph,
            &self.id.data,
            &self.outliers.graph,
            &self.outliers.data,
        ]
    }

    /// Total size of the dumps in bytes.
    pub fn bytes(&self) -> usize {
        self.blobs().iter().map(|b| b.len()).sum()
    }

    fn meta(&self, id_rows: usize, outlier_rows: usize) -> IndexMeta {
        IndexMeta {
            params: self.params,
            id_rows,
            outlier_rows,
            sha256: self.blobs().map(|b| hex::encode(Sha256::digest(b))),
        }
    }

    /// Reloads both graphs after checking each blob's checksum and row count.
    fn load(&self, bank: &Bank, ef_search: usize) -> Result<BankIndex, String> {
        let params = IndexParams {
            ef_search,
            ..self.params
        };
        let id = VectorIndex::from_dump(&self.id, params, bank.id.nrows())
            .and_then(|ix| ix.verify_against(bank.id.view()).map(|()| ix))
            .map_err(|e| format!("ID index: {e}"))?;
        let outliers = VectorIndex::from_dump(&self.outliers, params, bank.outliers.nrows())
            .and_then(|ix| ix.verify_against(bank.outliers.view()).map(|()| ix))
            .map_err(|e| format!("outlier index: {e}"))?;
        Ok(BankIndex {
            id: Arc::new(id),
            outliers: Arc::new(outliers),
        })
    }
}

fn f32_bytes(a: &Array2<f32>) -> Vec<u8> {
    a.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl Bank {
    /// Assembles a bank, checks shapes, re-normalises rows and computes the version.
    pub fn new(
        meta: BankMeta,
        id: Array2<f32>,
        no: Option<Array2<f32>>,
        outliers: Array2<f32>,
    ) -> Result<Bank, BankError> {
        Bank::assemble(meta, id, no, outliers, true)
    }

    /// `normalize = false` when loading: stored rows are already unit-norm, and normalising
    /// them again would change their last bits and with them the content hash.
    fn assemble(
        mut meta: BankMeta,
        mut id: Array2<f32>,
        mut no: Option<Array2<f32>>,
        mut outliers: Array2<f32>,
        normalize: bool,
    ) -> Result<Bank, BankError> {
        let d = id.ncols();
        if id.nrows() == 0 || d == 0 {
            return Err(BankError::Inconsistent(
                "the bank needs at least one ID embedding".into(),
            ));
        }
        if meta.id_labels.len() != id.nrows() {
            return Err(BankError::Inconsistent(format!(
                "{} ID labels for {} ID embeddings",
                meta.id_labels.len(),
                id.nrows()
            )));
        }
        if let Some(n) = &no
            && n.dim() != id.dim()
        {
            return Err(BankError::Inconsistent(format!(
                "no-embeddings have shape {:?}, ID embeddings {:?}",
                n.dim(),
                id.dim()
            )));
        }
        if outliers.nrows() > 0 && outliers.ncols() != d {
            return Err(BankError::Inconsistent(format!(
                "outlier vectors have dimension {}, ID embeddings {d}",
                outliers.ncols()
            )));
        }
        if outliers.nrows() == 0 {
            outliers = Array2::zeros((0, d));
        }
        if meta.outliers.len() != outliers.nrows() {
            return Err(BankError::Inconsistent(format!(
                "{} outlier descriptions for {} outlier vectors",
                meta.outliers.len(),
                outliers.nrows()
            )));
        }
        if meta.id_wnids.is_empty() {
            meta.id_wnids = vec![None; id.nrows()];
        }
        for (name, m) in [
            ("ID", Some(&mut id)),
            ("no", no.as_mut()),
            ("outlier", Some(&mut outliers)),
        ] {
            if let Some(m) = m {
                if m.iter().any(|v| !v.is_finite()) {
                    return Err(BankError::Inconsistent(format!(
                        "{name} embeddings contain non-finite values"
                    )));
                }
                if normalize {
                    super::norm::normalize_rows(m);
                }
            }
        }
        meta.format = BANK_FORMAT;
        meta.dim = d;
        let mut bank = Bank {
            meta,
            id,
            no,
            outliers,
            stored_index: None,
        };
        bank.refresh_version();
        Ok(bank)
    }

    /// Recomputes the content hash (after changing thresholds, for example).
    pub fn refresh_version(&mut self) {
        let mut meta = self.meta.clone();
        meta.version = String::new();
        meta.index = None;
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&meta).unwrap_or_default());
        h.update(f32_bytes(&self.id));
        if let Some(n) = &self.no {
            h.update(f32_bytes(n));
        }
        h.update(f32_bytes(&self.outliers));
        self.meta.version = hex::encode(&h.finalize()[..8]);
    }

    pub fn version(&self) -> &str {
        &self.meta.version
    }

    /// Serialises to bytes (deterministic).
    pub fn to_bytes(&self) -> Result<Vec<u8>, BankError> {
        let id = f32_bytes(&self.id);
        let no = self.no.as_ref().map(f32_bytes);
        let out = f32_bytes(&self.outliers);
        let inv = |e: safetensors::SafeTensorError| BankError::Inconsistent(e.to_string());
        let mut tensors: Vec<(&str, TensorView<'_>)> = vec![(
            "id",
            TensorView::new(Dtype::F32, vec![self.id.nrows(), self.id.ncols()], &id)
                .map_err(inv)?,
        )];
        if let (Some(n), Some(nb)) = (&self.no, &no) {
            tensors.push((
                "no",
                TensorView::new(Dtype::F32, vec![n.nrows(), n.ncols()], nb).map_err(inv)?,
            ));
        }
        if self.outliers.nrows() > 0 {
            tensors.push((
                "outliers",
                TensorView::new(
                    Dtype::F32,
                    vec![self.outliers.nrows(), self.outliers.ncols()],
                    &out,
                )
                .map_err(inv)?,
            ));
        }
        let mut meta = self.meta.clone();
        meta.index = self
            .stored_index
            .as_ref()
            .map(|ix| ix.meta(self.id.nrows(), self.outliers.nrows()));
        if let Some(ix) = &self.stored_index {
            for (name, blob) in INDEX_TENSORS.into_iter().zip(ix.blobs()) {
                if !blob.is_empty() {
                    tensors.push((
                        name,
                        TensorView::new(Dtype::U8, vec![blob.len()], blob).map_err(inv)?,
                    ));
                }
            }
        }
        // One metadata key only: safetensors keeps metadata in a HashMap, so a second key
        // would make the header order (and the file's bytes) vary between saves.
        let meta =
            serde_json::to_string(&meta).map_err(|e| BankError::Inconsistent(e.to_string()))?;
        let info = std::collections::HashMap::from([(META_KEY.to_string(), meta)]);
        safetensors::serialize(tensors, Some(info)).map_err(inv)
    }

    /// Writes atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), BankError> {
        let bytes = self.to_bytes()?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let werr = |source| BankError::Write {
            path: path.to_path_buf(),
            source,
        };
        std::fs::write(&tmp, &bytes).map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(werr)
    }

    pub fn load(path: &Path) -> Result<Bank, BankError> {
        let bytes = std::fs::read(path).map_err(|source| BankError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Bank::from_bytes(&bytes).map_err(|reason| BankError::Invalid {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Bank, String> {
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or("no oodgate metadata")?;
        let mut meta: BankMeta =
            serde_json::from_str(meta_json).map_err(|e| format!("metadata: {e}"))?;
        let index_meta = meta.index.take();
        if meta.format != BANK_FORMAT {
            return Err(format!(
                "bank format {} is not supported (expected {BANK_FORMAT})",
                meta.format
            ));
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let read = |name: &str| -> Result<Option<Array2<f32>>, String> {
            let Ok(t) = st.tensor(name) else {
                return Ok(None);
            };
            if t.dtype() != Dtype::F32 || t.shape().len() != 2 {
                return Err(format!("tensor {name} must be 2-D float32"));
            }
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Array2::from_shape_vec((t.shape()[0], t.shape()[1]), v)
                .map(Some)
                .map_err(|e| e.to_string())
        };
        let id = read("id")?.ok_or("missing tensor id")?;
        let no = read("no")?;
        let outliers = read("outliers")?.unwrap_or_else(|| Array2::zeros((0, id.ncols())));
        let stored_version = meta.version.clone();
        let mut bank = Bank::assemble(meta, id, no, outliers, false).map_err(|e| e.to_string())?;
        if bank.meta.version != stored_version {
            return Err(format!(
                "content hash {} does not match the stored version {stored_version} (file modified or corrupt)",
                bank.meta.version
            ));
        }
        if let Some(im) = index_meta {
            bank.stored_index = read_stored_index(&im, &st, &bank);
        }
        Ok(bank)
    }

    /// Refuses a bank built with another model unless forced.
    pub fn check_model(&self, fingerprint: &str, force: bool) -> Result<(), BankError> {
        if self.meta.model_fingerprint == fingerprint || force {
            return Ok(());
        }
        Err(BankError::FingerprintMismatch {
            bank: self.meta.model_fingerprint.clone(),
            model: fingerprint.to_string(),
        })
    }

    pub fn scorer(&self, params: &ScoreParams) -> Result<Scorer, BankError> {
        Ok(Scorer::new(
            self.id.view(),
            self.no.as_ref().map(|n| n.view()),
            self.outliers.view(),
            params,
        )?)
    }

    /// HNSW indexes over the ID rows and the outlier rows (explanations, large banks): the
    /// stored graphs when the bank carries them, else built now (and a warning if a stored
    /// index could not be used). `params.ef_search` applies either way.
    pub fn indexes(&self, params: IndexParams) -> BankIndex {
        if let Some(st) = &self.stored_index {
            match st.load(self, params.ef_search) {
                Ok(ix) => return ix,
                Err(e) => tracing::warn!(
                    bank = %self.version(),
                    "stored HNSW index is unusable ({e}); rebuilding it"
                ),
            }
        }
        self.build_indexes(params)
    }

    fn build_indexes(&self, params: IndexParams) -> BankIndex {
        BankIndex {
            id: Arc::new(VectorIndex::build(self.id.view(), params)),
            outliers: Arc::new(VectorIndex::build(self.outliers.view(), params)),
        }
    }

    /// Builds the HNSW graphs and keeps their dumps, so the next [`Bank::save`] stores them
    /// and loaders skip the build. Returns the built indexes.
    pub fn attach_index(&mut self, params: IndexParams) -> Result<BankIndex, BankError> {
        let ix = self.build_indexes(params);
        let dump = |v: &VectorIndex| {
            v.dump()
                .map_err(|e| BankError::Inconsistent(format!("dumping the HNSW index: {e}")))
        };
        self.stored_index = Some(StoredIndex {
            params,
            id: dump(&ix.id)?,
            outliers: dump(&ix.outliers)?,
        });
        Ok(ix)
    }

    pub fn outlier_view(&self) -> ArrayView2<'_, f32> {
        self.outliers.view()
    }

    /// Display name of outlier row `i`: its words, or its label.
    pub fn outlier_words(&self, i: usize, n: usize) -> Vec<String> {
        match self.meta.outliers.get(i) {
            Some(r) if !r.words.is_empty() => r.words.iter().take(n).cloned().collect(),
            Some(r) => vec![r.label.clone()],
            None => Vec::new(),
        }
    }
}

/// Reads the stored index, if the file has one whose description parses, whose row counts
/// match the bank and whose blobs match their checksums; otherwise logs why and returns `None`
/// (the index is then rebuilt on demand).
fn read_stored_index(im: &IndexMeta, st: &SafeTensors<'_>, bank: &Bank) -> Option<StoredIndex> {
    let check = || -> Result<StoredIndex, String> {
        if im.id_rows != bank.id.nrows() || im.outlier_rows != bank.outliers.nrows() {
            return Err(format!(
                "it indexes {} ID and {} outlier rows, the bank has {} and {}",
                im.id_rows,
                im.outlier_rows,
                bank.id.nrows(),
                bank.outliers.nrows()
            ));
        }
        let mut blobs: Vec<Vec<u8>> = Vec::with_capacity(4);
        for (name, want) in INDEX_TENSORS.iter().zip(&im.sha256) {
            let blob = match st.tensor(name) {
                Ok(t) if t.dtype() == Dtype::U8 => t.data().to_vec(),
                Ok(_) => return Err(format!("tensor {name} is not uint8")),
                Err(_) => Vec::new(),
            };
            if hex::encode(Sha256::digest(&blob)) != *want {
                return Err(format!("{name} does not match its checksum"));
            }
            blobs.push(blob);
        }
        let mut it = blobs.into_iter();
        let mut next = || it.next().unwrap_or_default();
        Ok(StoredIndex {
            params: im.params,
            id: IndexDump {
                graph: next(),
                data: next(),
            },
            outliers: IndexDump {
                graph: next(),
                data: next(),
            },
        })
    };
    match check() {
        Ok(ix) => Some(ix),
        Err(e) => {
            tracing::warn!(bank = %bank.version(), "ignoring the stored HNSW index: {e}");
            None
        }
    }
}

/// The bank's HNSW indexes (shared with an approximate scorer).
#[derive(Clone)]
pub struct BankIndex {
    pub id: Arc<VectorIndex>,
    pub outliers: Arc<VectorIndex>,
}

/// One image's explanation: the nearest ID labels and outlier words.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub top_labels: Vec<(String, f32)>,
    pub nearest_outliers: Vec<(String, f32)>,
}

impl BankIndex {
    pub fn explain(&self, bank: &Bank, x: &[f32], k: usize) -> Explanation {
        let top_labels = self
            .id
            .search(x, k)
            .into_iter()
            .map(|(i, c)| (bank.meta.id_labels.get(i).cloned().unwrap_or_default(), c))
            .collect();
        // Hard prototypes share their partner's words: show each distinct entry once.
        let mut nearest_outliers: Vec<(String, f32)> = Vec::with_capacity(k);
        for (i, c) in self.outliers.search(x, 2 * k) {
            let words = bank.outlier_words(i, 3).join("/");
            if nearest_outliers.len() < k && !nearest_outliers.iter().any(|(w, _)| *w == words) {
                nearest_outliers.push((words, c));
            }
        }
        Explanation {
            top_labels,
            nearest_outliers,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn toy() -> Bank {
        let meta = BankMeta {
            format: BANK_FORMAT,
            version: String::new(),
            created_by: "test".into(),
            model_fingerprint: "abc".into(),
            model_name: "toy".into(),
            model_weights: "random".into(),
            dim: 3,
            id_labels: vec!["cat".into(), "dog".into()],
            id_wnids: vec![],
            outliers: vec![OutlierRow {
                kind: "label".into(),
                label: "rock".into(),
                words: vec!["rock".into(), "stone".into()],
                detail: serde_json::Value::Null,
            }],
            theta: Some(0.25),
            scale: None,
            build: serde_json::json!({"k": 500}),
            cleaning: serde_json::Value::Null,
            thresholds: BTreeMap::new(),
            index: None,
        };
        Bank::new(
            meta,
            ndarray::array![[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
            None,
            ndarray::array![[0.0, 0.0, 1.0]],
        )
        .unwrap()
    }

    #[test]
    fn round_trip_of_irrational_rows() {
        let meta = toy().meta;
        let id = ndarray::Array2::from_shape_fn((2, 3), |(i, j)| ((i * 3 + j) as f32 + 0.3).sqrt());
        let out = ndarray::Array2::from_shape_fn((1, 3), |(_, j)| (j as f32 + 1.7).ln());
        let b = Bank::new(meta, id, None, out).unwrap();
        let back = Bank::from_bytes(&b.to_bytes().unwrap()).unwrap();
        assert_eq!(back.version(), b.version());
        assert_eq!(back.id, b.id);
    }

    #[test]
    fn round_trip_is_byte_stable() {
        let b = toy();
        assert_eq!(b.id[[1, 1]], 1.0, "rows are normalised");
        let bytes = b.to_bytes().unwrap();
        let back = Bank::from_bytes(&bytes).unwrap();
        assert_eq!(back.meta, b.meta);
        assert_eq!(back.id, b.id);
        assert_eq!(back.outliers, b.outliers);
        assert_eq!(back.to_bytes().unwrap(), bytes);
        assert_eq!(b.version().len(), 16);
    }

    #[test]
    fn stored_index_round_trips_and_damage_falls_back_to_a_rebuild() {
        let mut b = toy();
        let version = b.version().to_owned();
        let built = b.attach_index(IndexParams::default()).unwrap();
        assert_eq!(
            b.version(),
            version,
            "the index is outside the content hash"
        );
        let bytes = b.to_bytes().unwrap();
        let back = Bank::from_bytes(&bytes).unwrap();
        assert_eq!(back.stored_index, b.stored_index);
        assert_eq!(
            back.to_bytes().unwrap(),
            bytes,
            "byte-stable with the index"
        );
        let ix = back.indexes(IndexParams::default());
        let q = [0.1f32, 0.995, 0.0];
        assert_eq!(ix.id.search(&q, 2), built.id.search(&q, 2));
        assert_eq!(ix.outliers.search(&q, 1)[0].0, 0);
        // Flip one byte of the outlier graph: the checksum rejects it, the bank still loads
        // and its index is rebuilt.
        let mut bad = bytes.clone();
        let (n, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let start = header.info("index.outliers.graph").unwrap().data_offsets.0;
        bad[8 + n + start + 20] ^= 0xFF;
        let damaged = Bank::from_bytes(&bad).unwrap();
        assert!(damaged.stored_index.is_none());
        assert_eq!(
            damaged.indexes(IndexParams::default()).id.search(&q, 1)[0].0,
            1
        );
    }

    #[test]
    fn a_stored_index_of_other_rows_is_refused_even_with_valid_checksums() {
        // The index is outside the content hash: someone can swap in an index of other rows
        // and recompute its checksums. Loading checks it against the hashed rows.
        let mut b = toy();
        let mut other = toy();
        other.outliers = ndarray::array![[0.0, 1.0, 0.0]];
        other.attach_index(IndexParams::default()).unwrap();
        b.stored_index = other.stored_index.clone();
        let back = Bank::from_bytes(&b.to_bytes().unwrap()).unwrap();
        let stored = back.stored_index.clone().expect("checksums pass");
        let err = stored.load(&back, 64).map(|_| ()).unwrap_err();
        assert!(
            err.contains("outlier index") && err.contains("differs from the row"),
            "{err}"
        );
        // The bank still serves: its index is rebuilt from the hashed rows.
        let q = [0.0f32, 0.0, 1.0];
        let ix = back.indexes(IndexParams::default());
        assert_eq!(ix.outliers.search(&q, 1)[0].0, 0);
        assert!((ix.outliers.search(&q, 1)[0].1 - 1.0).abs() < 1e-6);
        // An honest index passes.
        let mut honest = toy();
        honest.attach_index(IndexParams::default()).unwrap();
        let back = Bank::from_bytes(&honest.to_bytes().unwrap()).unwrap();
        assert!(back.stored_index.clone().unwrap().load(&back, 64).is_ok());
    }

    #[test]
    fn tampering_and_fingerprints_are_detected() {
        let b = toy();
        let mut bytes = b.to_bytes().unwrap();
        // Rename a label inside the stored metadata ("rock" -> "rack").
        let at = bytes.windows(4).position(|w| w == b"rock").unwrap();
        bytes[at + 1] = b'a';
        let err = Bank::from_bytes(&bytes).unwrap_err();
        assert!(err.contains("content hash"), "{err}");
        let e = b.check_model("zzz", false).unwrap_err().to_string();
        assert!(e.contains("abc") && e.contains("zzz"), "{e}");
        assert!(b.check_model("zzz", true).is_ok());
    }

    #[test]
    fn version_changes_with_content() {
        let a = toy();
        let mut b = toy();
        b.meta.thresholds.insert(
            "ole".into(),
            Threshold {
                value: 0.5,
                tpr: 0.95,
                achieved_tpr: 0.95,
                n_id: 10,
                source: String::new(),
                adaptive: None,
            },
        );
        b.refresh_version();
        assert_ne!(a.version(), b.version());
    }
}
