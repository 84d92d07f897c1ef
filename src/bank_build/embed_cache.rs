//! On-disk cache of label embeddings t(y) per (model, template set); its own file because it
//! owns a crash-safe, locked file format.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Environment variable naming the cache folder (overrides the default `.cache/labels`).
pub const CACHE_ENV: &str = "OODGATE_CACHE";

/// Format of `meta.json`.
const CACHE_FORMAT: u32 = 1;

/// Errors of the embedding cache.
#[derive(Debug, Error)]
pub enum CacheError {
    /// A file of the cache could not be read or written.
    #[error("embedding cache {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// `meta.json` does not describe the requested cache.
    #[error("embedding cache {path} is unusable: {reason} (delete the folder to rebuild it)")]
    Invalid {
        /// The cache folder.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// Rows of the wrong width were inserted.
    #[error("embedding cache holds {expected}-dimensional rows, got {got}")]
    Dimension {
        /// The cache's dimension.
        expected: usize,
        /// The inserted rows' dimension.
        got: usize,
    },
    /// `labels` and `vectors` of an insert disagree in length.
    #[error("{labels} labels for {rows} embedding rows")]
    Length {
        /// Number of labels.
        labels: usize,
        /// Number of rows.
        rows: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CacheMeta {
    format: u32,
    dim: usize,
    model_fingerprint: String,
    templates_fingerprint: String,
    #[serde(default)]
    templates_name: String,
}

/// A label-embedding cache folder for one (model, template set), loaded in memory.
///
/// On-disk cache of label embeddings t(y), so that rebuilding a bank does not re-encode the
/// ~60,000 WordNet nouns × templates again.
///
/// An embedding depends on the model (its fingerprint), the exact template bytes (the template
/// set's fingerprint) and the label, so the cache keeps one folder per (model, template set):
///
/// ```text
/// <root>/<model fingerprint[..16]>-<templates fingerprint[..16]>/
///     meta.json     {"dim": 512, "model_fingerprint": "…", "templates_fingerprint": "…", …}
///     vectors.f32   append-only, one row of `dim` little-endian f32 per label
///     labels.txt    append-only, one label per line, same order as the rows
///     lock          advisory lock of the single writer
/// ```
///
/// Inside a folder a label is the exact string that was put into the templates.
///
/// **Crash safety.** Rows are appended to `vectors.f32` before their labels are appended to
/// `labels.txt`. On open, the usable records are the first `min(complete label lines, complete
/// rows)`; a torn last record (a partial row, a label line without its newline) is ignored and
/// cut off, so later appends stay aligned.
///
/// **Concurrency.** One writer per folder: [`EmbedCache::open`] takes an exclusive advisory lock
/// on `lock`; when another process holds it, the cache is opened read-only (lookups work, new
/// embeddings are not stored).
#[derive(Debug)]
pub struct EmbedCache {
    dir: PathBuf,
    dim: usize,
    index: HashMap<String, usize>,
    rows: Vec<f32>,
    /// `None` when another process holds the writer lock.
    writer: Option<Writer>,
}

#[derive(Debug)]
struct Writer {
    vectors: File,
    labels: File,
    /// Held for the lifetime of the cache; dropping the file releases the lock.
    _lock: File,
}

/// The default cache root: `$OODGATE_CACHE`, else `.cache/labels` under the current directory.
pub fn default_root() -> PathBuf {
    match std::env::var_os(CACHE_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(".cache").join("labels"),
    }
}

/// The folder of one (model, template set) under `root`.
pub fn folder(root: &Path, model_fingerprint: &str, templates_fingerprint: &str) -> PathBuf {
    let short = |s: &str| s.chars().take(16).collect::<String>();
    root.join(format!(
        "{}-{}",
        short(model_fingerprint),
        short(templates_fingerprint)
    ))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_or_empty(path: &Path) -> Result<Vec<u8>, CacheError> {
    match File::open(path) {
        Ok(mut f) => {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(io_err(path))?;
            Ok(buf)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// True if `label` can be stored as one line of `labels.txt`.
fn storable(label: &str) -> bool {
    !label.contains(['\n', '\r'])
}

impl EmbedCache {
    /// Opens (creating if needed) the cache folder of (`model_fingerprint`,
    /// `templates_fingerprint`) under `root` for `dim`-dimensional embeddings, and loads it.
    pub fn open(
        root: &Path,
        model_fingerprint: &str,
        templates_fingerprint: &str,
        templates_name: &str,
        dim: usize,
    ) -> Result<EmbedCache, CacheError> {
        let dir = folder(root, model_fingerprint, templates_fingerprint);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let want = CacheMeta {
            format: CACHE_FORMAT,
            dim,
            model_fingerprint: model_fingerprint.to_string(),
            templates_fingerprint: templates_fingerprint.to_string(),
            templates_name: templates_name.to_string(),
        };
        let meta_path = dir.join("meta.json");
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let locked = match lock.try_lock() {
            Ok(()) => true,
            Err(std::fs::TryLockError::WouldBlock) => {
                tracing::warn!(cache = %dir.display(), "another process is writing this embedding cache; using it read-only");
                false
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        };

        let meta_bytes = read_or_empty(&meta_path)?;
        if meta_bytes.is_empty() {
            if locked {
                let text = serde_json::to_vec_pretty(&want).map_err(|e| CacheError::Invalid {
                    path: dir.clone(),
                    reason: e.to_string(),
                })?;
                std::fs::write(&meta_path, text).map_err(io_err(&meta_path))?;
            }
        } else {
            let have: CacheMeta =
                serde_json::from_slice(&meta_bytes).map_err(|e| CacheError::Invalid {
                    path: dir.clone(),
                    reason: format!("meta.json: {e}"),
                })?;
            if have.format != CACHE_FORMAT
                || have.dim != dim
                || have.model_fingerprint != model_fingerprint
                || have.templates_fingerprint != templates_fingerprint
            {
                return Err(CacheError::Invalid {
                    path: dir,
                    reason: format!(
                        "meta.json says format {}, dim {}, model {}, templates {}; wanted format {CACHE_FORMAT}, dim {dim}, model {model_fingerprint}, templates {templates_fingerprint}",
                        have.format, have.dim, have.model_fingerprint, have.templates_fingerprint
                    ),
                });
            }
        }

        let vec_path = dir.join("vectors.f32");
        let lab_path = dir.join("labels.txt");
        let vec_bytes = read_or_empty(&vec_path)?;
        let lab_bytes = read_or_empty(&lab_path)?;
        let row_bytes = dim * 4;
        let full_rows = vec_bytes.len().checked_div(row_bytes).unwrap_or(0);
        // Complete lines only: everything up to the last newline.
        let complete_text = match lab_bytes.iter().rposition(|&b| b == b'\n') {
            Some(p) => &lab_bytes[..=p],
            None => &lab_bytes[..0],
        };
        let lines: Vec<&[u8]> = complete_text
            .split(|&b| b == b'\n')
            .take(complete_text.iter().filter(|&&b| b == b'\n').count())
            .collect();
        let n = full_rows.min(lines.len());
        let mut index = HashMap::with_capacity(n);
        let mut label_len = 0usize;
        for (i, line) in lines.iter().take(n).enumerate() {
            label_len += line.len() + 1;
            // A line that is not UTF-8 cannot be a label anyone asks for; keep its row so the
            // row numbering stays aligned.
            if let Ok(s) = std::str::from_utf8(line) {
                index.insert(s.to_string(), i);
            }
        }
        let rows: Vec<f32> = vec_bytes[..n * row_bytes]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();

        let writer = if locked {
            let vectors = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&vec_path)
                .map_err(io_err(&vec_path))?;
            let labels = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lab_path)
                .map_err(io_err(&lab_path))?;
            // Cut a torn tail (or records beyond the common length) so appends stay aligned.
            if vec_bytes.len() != n * row_bytes {
                vectors
                    .set_len((n * row_bytes) as u64)
                    .map_err(io_err(&vec_path))?;
            }
            if lab_bytes.len() != label_len {
                labels
                    .set_len(label_len as u64)
                    .map_err(io_err(&lab_path))?;
            }
            let mut vectors = vectors;
            let mut labels = labels;
            use std::io::Seek;
            vectors
                .seek(io::SeekFrom::End(0))
                .map_err(io_err(&vec_path))?;
            labels
                .seek(io::SeekFrom::End(0))
                .map_err(io_err(&lab_path))?;
            Some(Writer {
                vectors,
                labels,
                _lock: lock,
            })
        } else {
            None
        };
        Ok(EmbedCache {
            dir,
            dim,
            index,
            rows,
            writer,
        })
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of cached labels.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True if nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// False when another process holds the writer lock (inserts are then dropped).
    pub fn is_writable(&self) -> bool {
        self.writer.is_some()
    }

    /// The cached embedding of `label`.
    pub fn get(&self, label: &str) -> Option<&[f32]> {
        self.index
            .get(label)
            .map(|&i| &self.rows[i * self.dim..(i + 1) * self.dim])
    }

    /// True if `label` is cached.
    pub fn contains(&self, label: &str) -> bool {
        self.index.contains_key(label)
    }

    /// Appends `labels` with their embeddings (row i of `vectors` for `labels[i]`). Labels
    /// already cached, repeated, or containing a line break are skipped. Rows are written
    /// before labels, both flushed, so a crash leaves at most a torn tail. Returns how many
    /// were stored (0 for a read-only cache).
    pub fn insert(
        &mut self,
        labels: &[String],
        vectors: ArrayView2<'_, f32>,
    ) -> Result<usize, CacheError> {
        if labels.len() != vectors.nrows() {
            return Err(CacheError::Length {
                labels: labels.len(),
                rows: vectors.nrows(),
            });
        }
        if vectors.ncols() != self.dim {
            return Err(CacheError::Dimension {
                expected: self.dim,
                got: vectors.ncols(),
            });
        }
        let Some(w) = self.writer.as_mut() else {
            return Ok(0);
        };
        let mut vec_buf = Vec::new();
        let mut lab_buf = Vec::new();
        let mut added: Vec<&String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (label, row) in labels.iter().zip(vectors.rows()) {
            if !storable(label) || self.index.contains_key(label) || !seen.insert(label) {
                continue;
            }
            for &v in row.iter() {
                vec_buf.extend_from_slice(&v.to_le_bytes());
            }
            lab_buf.extend_from_slice(label.as_bytes());
            lab_buf.push(b'\n');
            added.push(label);
        }
        if added.is_empty() {
            return Ok(0);
        }
        let vec_path = self.dir.join("vectors.f32");
        let lab_path = self.dir.join("labels.txt");
        w.vectors.write_all(&vec_buf).map_err(io_err(&vec_path))?;
        w.vectors.flush().map_err(io_err(&vec_path))?;
        w.labels.write_all(&lab_buf).map_err(io_err(&lab_path))?;
        w.labels.flush().map_err(io_err(&lab_path))?;
        let start = self.rows.len() / self.dim;
        self.rows.extend(
            vec_buf
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        for (i, label) in added.iter().enumerate() {
            self.index.insert((*label).clone(), start + i);
        }
        Ok(added.len())
    }

    /// The cached embeddings of `labels` as a matrix, `None` if any is missing.
    pub fn get_all(&self, labels: &[String]) -> Option<Array2<f32>> {
        let mut out = Array2::<f32>::zeros((labels.len(), self.dim));
        for (label, mut row) in labels.iter().zip(out.rows_mut()) {
            let v = self.get(label)?;
            for (d, s) in row.iter_mut().zip(v) {
                *d = *s;
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn open(root: &Path, dim: usize) -> EmbedCache {
        EmbedCache::open(
            root,
            "m0123456789abcdefXX",
            "t0123456789abcdefYY",
            "test",
            dim,
        )
        .unwrap()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn round_trip_and_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = open(tmp.path(), 2);
        assert!(c.is_empty() && c.is_writable());
        assert_eq!(
            c.dir().file_name().unwrap().to_str().unwrap(),
            "m0123456789abcde-t0123456789abcde"
        );
        let n = c
            .insert(
                &s(&["cat", "dog"]),
                array![[1.0f32, 0.0], [0.0, 1.0]].view(),
            )
            .unwrap();
        assert_eq!(n, 2);
        // Already present and repeated labels are skipped, line breaks are never stored.
        let n = c
            .insert(
                &s(&["cat", "a\nb", "rock", "rock"]),
                array![[9.0f32, 9.0], [1.0, 1.0], [0.5, 0.5], [7.0, 7.0]].view(),
            )
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(c.get("cat"), Some(&[1.0f32, 0.0][..]));
        assert_eq!(c.get("rock"), Some(&[0.5f32, 0.5][..]));
        assert_eq!(c.get("a\nb"), None);
        drop(c);
        let c = open(tmp.path(), 2);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("dog"), Some(&[0.0f32, 1.0][..]));
        let all = c.get_all(&s(&["rock", "cat"])).unwrap();
        assert_eq!(all, array![[0.5f32, 0.5], [1.0, 0.0]]);
        assert!(c.get_all(&s(&["cat", "bird"])).is_none());
        let size = std::fs::metadata(c.dir().join("vectors.f32"))
            .unwrap()
            .len();
        assert_eq!(size, 3 * 2 * 4);
    }

    #[test]
    fn torn_tail_is_ignored_and_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = open(tmp.path(), 3);
        c.insert(
            &s(&["a", "b"]),
            array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]].view(),
        )
        .unwrap();
        let dir = c.dir().to_path_buf();
        drop(c);
        // A crash after half a row and a label without its newline.
        let mut v = OpenOptions::new()
            .append(true)
            .open(dir.join("vectors.f32"))
            .unwrap();
        v.write_all(&[0u8; 7]).unwrap();
        let mut l = OpenOptions::new()
            .append(true)
            .open(dir.join("labels.txt"))
            .unwrap();
        l.write_all(b"c").unwrap();
        drop((v, l));
        let mut c = open(tmp.path(), 3);
        assert_eq!(c.len(), 2);
        assert!(!c.contains("c"));
        // Appends after the repair stay aligned.
        c.insert(&s(&["c"]), array![[7.0f32, 8.0, 9.0]].view())
            .unwrap();
        drop(c);
        let c = open(tmp.path(), 3);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("c"), Some(&[7.0f32, 8.0, 9.0][..]));
        assert_eq!(c.get("b"), Some(&[4.0f32, 5.0, 6.0][..]));

        // A row written but its label never: the row is dropped.
        let mut v = OpenOptions::new()
            .append(true)
            .open(dir.join("vectors.f32"))
            .unwrap();
        v.write_all(&[0u8; 12]).unwrap();
        drop((v, c));
        let c = open(tmp.path(), 3);
        assert_eq!(c.len(), 3);
        assert_eq!(
            std::fs::metadata(dir.join("vectors.f32")).unwrap().len(),
            3 * 12
        );
    }

    #[test]
    fn mismatched_meta_and_dims_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = open(tmp.path(), 2);
        assert!(matches!(
            c.insert(&s(&["x"]), array![[1.0f32, 2.0, 3.0]].view()),
            Err(CacheError::Dimension {
                expected: 2,
                got: 3
            })
        ));
        assert!(matches!(
            c.insert(&s(&["x", "y"]), array![[1.0f32, 2.0]].view()),
            Err(CacheError::Length { labels: 2, rows: 1 })
        ));
        drop(c);
        let err = EmbedCache::open(
            tmp.path(),
            "m0123456789abcdefXX",
            "t0123456789abcdefYY",
            "test",
            4,
        )
        .unwrap_err();
        assert!(err.to_string().contains("dim 2"), "{err}");
    }

    #[test]
    fn second_opener_is_read_only() {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = open(tmp.path(), 2);
        a.insert(&s(&["x"]), array![[1.0f32, 0.0]].view()).unwrap();
        let mut b = open(tmp.path(), 2);
        assert!(!b.is_writable());
        assert_eq!(b.get("x"), Some(&[1.0f32, 0.0][..]));
        assert_eq!(
            b.insert(&s(&["y"]), array![[0.0f32, 1.0]].view()).unwrap(),
            0
        );
        drop(b);
        assert!(a.is_writable());
    }

    #[test]
    fn default_root_and_folder() {
        let f = folder(Path::new("/r"), "abc", "0123456789abcdef0123");
        assert_eq!(f, Path::new("/r/abc-0123456789abcdef"));
    }
}
