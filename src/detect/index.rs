//! HNSW index (hnsw_rs) over the rows of a bank matrix, for explanations and approximate
//! scoring; its own file because it wraps hnsw_rs's traps and its dump files.

use std::io;

use hnsw_rs::prelude::{AnnT, DistDot, Hnsw, HnswIo};
use ndarray::ArrayView2;

/// Errors of dumping or reloading an index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index I/O: {0}")]
    Io(#[from] io::Error),
    #[error("hnsw_rs could not {op} the index: {reason}")]
    Hnsw { op: &'static str, reason: String },
    #[error("the stored index holds {got} rows, the matrix it indexes {expected}")]
    RowCount { expected: usize, got: usize },
    #[error("the stored index does not match the rows it indexes: {0}")]
    Mismatch(String),
}

/// hnsw_rs's dump of one graph, byte for byte: `<name>.hnsw.graph` and `<name>.hnsw.data`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IndexDump {
    pub graph: Vec<u8>,
    pub data: Vec<u8>,
}

const DUMP_NAME: &str = "index";

/// Lowest recall@10 a stored index may show at load ([`VectorIndex::verify_against`]); an
/// honest graph built with the default parameters is far above it.
const VERIFY_MIN_RECALL: f64 = 0.8;

/// HNSW parameters (M, ef_construction, ef_search).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexParams {
    pub max_connections: usize,
    pub ef_construction: usize,
    pub ef_search: usize,
}

impl Default for IndexParams {
    fn default() -> Self {
        IndexParams {
            max_connections: 16,
            ef_construction: 200,
            ef_search: 64,
        }
    }
}

/// An HNSW graph over unit-norm rows; search returns (row, cosine), best first.
///
/// HNSW index (hnsw_rs) over the rows of a bank matrix: nearest labels for explanations, and
/// the candidate set for approximate scoring of banks beyond the exact limit.
///
/// hnsw_rs traps handled here (docs/stack.md §5): `DistDot` needs the `simdeez_f` feature (enabled in
/// Cargo.toml) or it panics on self-queries; `max_layer` is fixed at 16 so the graph could be
/// dumped; insert and search never overlap (the index is built once, then only searched);
/// `HnswIo::load_hnsw` borrows its loader, which is leaked (a few hundred bytes per load).
///
/// A built graph is kept with its bank as hnsw_rs's own two dump files ([`IndexDump`]), so a
/// worker that loads a large bank does not rebuild the graph.
pub struct VectorIndex {
    hnsw: Hnsw<'static, f32, DistDot>,
    len: usize,
    params: IndexParams,
}

impl VectorIndex {
    /// Builds the index over the rows of `rows` (which must be unit-norm).
    pub fn build(rows: ArrayView2<'_, f32>, params: IndexParams) -> VectorIndex {
        let n = rows.nrows();
        let hnsw = Hnsw::<f32, DistDot>::new(
            params.max_connections.clamp(2, 256),
            n.max(1),
            16,
            params.ef_construction.max(params.max_connections),
            DistDot {},
        );
        let data: Vec<Vec<f32>> = rows.rows().into_iter().map(|r| r.to_vec()).collect();
        let items: Vec<(&Vec<f32>, usize)> = data.iter().zip(0..).collect();
        if !items.is_empty() {
            hnsw.parallel_insert(&items);
        }
        let mut hnsw = hnsw;
        hnsw.set_searching_mode(true);
        VectorIndex {
            hnsw,
            len: n,
            params,
        }
    }

    /// Serialises the graph through hnsw_rs's file dump (in a temporary folder).
    pub fn dump(&self) -> Result<IndexDump, IndexError> {
        if self.len == 0 {
            return Ok(IndexDump::default());
        }
        let dir = tempfile::tempdir()?;
        let name = self
            .hnsw
            .file_dump(dir.path(), DUMP_NAME)
            .map_err(|e| IndexError::Hnsw {
                op: "dump",
                reason: e.to_string(),
            })?;
        Ok(IndexDump {
            graph: std::fs::read(dir.path().join(format!("{name}.hnsw.graph")))?,
            data: std::fs::read(dir.path().join(format!("{name}.hnsw.data")))?,
        })
    }

    /// Reloads a graph dumped by [`VectorIndex::dump`]; `rows` is how many rows it must hold.
    ///
    /// hnsw_rs asserts on malformed files, so callers check the dump's checksum first; a
    /// panic inside the loader is still caught and returned as an error.
    pub fn from_dump(
        dump: &IndexDump,
        params: IndexParams,
        rows: usize,
    ) -> Result<VectorIndex, IndexError> {
        if dump.graph.is_empty() && dump.data.is_empty() {
            if rows != 0 {
                return Err(IndexError::RowCount {
                    expected: rows,
                    got: 0,
                });
            }
            return Ok(VectorIndex::build(
                ndarray::Array2::zeros((0, 1)).view(),
                params,
            ));
        }
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join(format!("{DUMP_NAME}.hnsw.graph")),
            &dump.graph,
        )?;
        std::fs::write(
            dir.path().join(format!("{DUMP_NAME}.hnsw.data")),
            &dump.data,
        )?;
        // The loaded graph borrows its loader for its whole life: leak the (small) loader.
        let loader: &'static mut HnswIo = Box::leak(Box::new(HnswIo::new(dir.path(), DUMP_NAME)));
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(once(move || {
            loader.load_hnsw::<f32, DistDot>()
        })));
        let mut hnsw = match loaded {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                return Err(IndexError::Hnsw {
                    op: "load",
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(IndexError::Hnsw {
                    op: "load",
                    reason: "the loader panicked (malformed dump)".into(),
                });
            }
        };
        let got = hnsw.get_nb_point();
        if got != rows {
            return Err(IndexError::RowCount {
                expected: rows,
                got,
            });
        }
        hnsw.set_searching_mode(true);
        Ok(VectorIndex {
            hnsw,
            len: rows,
            params,
        })
    }

    /// Checks a loaded index against the rows it claims to index, which the bank's version
    /// covers (the index itself is outside it): every stored vector must be its row, bit for
    /// bit, and searches for a sample of rows must find most of their exact neighbours. A
    /// modified graph or vector store is refused, so explanations and approximate scores only
    /// ever come from the hashed rows.
    pub fn verify_against(&self, rows: ArrayView2<'_, f32>) -> Result<(), IndexError> {
        let mismatch = |m: String| Err(IndexError::Mismatch(m));
        if self.len == 0 || rows.nrows() == 0 {
            // hnsw_rs's point iterator panics on a graph without an entry point.
            return if self.len == rows.nrows() {
                Ok(())
            } else {
                mismatch(format!("{} points for {} rows", self.len, rows.nrows()))
            };
        }
        // The first vector that is not its row, and how many points were seen. hnsw_rs's
        // iterator unwraps internally: a malformed graph is a mismatch, not a crash.
        let walk = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut seen = 0usize;
            for p in self.hnsw.get_point_indexation() {
                let id = p.get_origin_id();
                let same = id < rows.nrows() && {
                    let row = rows.row(id);
                    p.get_v().len() == row.len()
                        && p.get_v()
                            .iter()
                            .zip(row.iter())
                            .all(|(a, b)| a.to_bits() == b.to_bits())
                };
                if !same {
                    return (Some(id), seen);
                }
                seen += 1;
            }
            (None, seen)
        }));
        let seen = match walk {
            Ok((None, seen)) => seen,
            Ok((Some(id), _)) => {
                return mismatch(format!(
                    "the vector stored for row {id} differs from the row (or there is no such row)"
                ));
            }
            Err(_) => return mismatch("hnsw_rs could not walk the stored graph".into()),
        };
        if seen != rows.nrows() {
            return mismatch(format!("{seen} points for {} rows", rows.nrows()));
        }
        // Graph quality: every 1/64th row (at most 64) as a query, its 10 exact neighbours.
        let n = rows.nrows();
        if n > 20 {
            let step = (n / 64).max(1);
            let picks: Vec<usize> = (0..n).step_by(step).take(64).collect();
            let queries = rows.select(ndarray::Axis(0), &picks);
            let recall = recall_at_k(self, rows, queries.view(), 10);
            if recall < VERIFY_MIN_RECALL {
                return mismatch(format!(
                    "recall@10 of {recall:.2} on {} sample rows (at least {VERIFY_MIN_RECALL} expected)",
                    picks.len()
                ));
            }
        }
        Ok(())
    }

    pub fn params(&self) -> IndexParams {
        self.params
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `k` nearest rows to the unit vector `q` as (row index, cosine), best first.
    pub fn search(&self, q: &[f32], k: usize) -> Vec<(usize, f32)> {
        self.search_ef(q, k, self.params.ef_search)
    }

    /// [`VectorIndex::search_ef`] for every row of `qs`, in parallel (rayon, through
    /// hnsw_rs's `parallel_search`); results in row order.
    pub fn search_batch(
        &self,
        qs: ArrayView2<'_, f32>,
        k: usize,
        ef: usize,
    ) -> Vec<Vec<(usize, f32)>> {
        if self.len == 0 || k == 0 {
            return vec![Vec::new(); qs.nrows()];
        }
        let k = k.min(self.len);
        let data: Vec<Vec<f32>> = qs.rows().into_iter().map(|r| r.to_vec()).collect();
        self.hnsw
            .parallel_search(&data, k, ef.max(k))
            .into_iter()
            .map(|hits| {
                let mut hits: Vec<(usize, f32)> = hits
                    .into_iter()
                    .map(|n| (n.d_id, 1.0 - n.distance))
                    .collect();
                hits.sort_by(|a, b| b.1.total_cmp(&a.1));
                hits
            })
            .collect()
    }

    pub fn search_ef(&self, q: &[f32], k: usize, ef: usize) -> Vec<(usize, f32)> {
        if self.len == 0 || k == 0 {
            return Vec::new();
        }
        let k = k.min(self.len);
        let mut hits: Vec<(usize, f32)> = self
            .hnsw
            .search(q, k, ef.max(k))
            .into_iter()
            .map(|n| (n.d_id, 1.0 - n.distance))
            .collect();
        hits.sort_by(|a, b| b.1.total_cmp(&a.1));
        hits
    }
}

/// Makes a closure `FnOnce`, so it can hand out the `'static` borrow it captured.
fn once<R, F: FnOnce() -> R>(f: F) -> F {
    f
}

/// Exact top-k by brute force (one dot per row): the reference for recall measurements.
pub fn exact_top_k(rows: ArrayView2<'_, f32>, q: &[f32], k: usize) -> Vec<(usize, f32)> {
    let q = ndarray::ArrayView1::from(q);
    let sims = rows.dot(&q);
    let mut idx: Vec<(usize, f32)> = sims.iter().copied().enumerate().collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    idx.truncate(k);
    idx.sort_by(|a, b| b.1.total_cmp(&a.1));
    idx
}

/// recall@k of the index against exact search over `queries` (fraction of exact neighbours found).
pub fn recall_at_k(
    index: &VectorIndex,
    rows: ArrayView2<'_, f32>,
    queries: ArrayView2<'_, f32>,
    k: usize,
) -> f64 {
    let (mut found, mut total) = (0usize, 0usize);
    for q in queries.rows() {
        let q = q.to_vec();
        let exact: Vec<usize> = exact_top_k(rows, &q, k).into_iter().map(|x| x.0).collect();
        let approx: Vec<usize> = index.search(&q, k).into_iter().map(|x| x.0).collect();
        found += exact.iter().filter(|e| approx.contains(e)).count();
        total += exact.len();
    }
    if total == 0 {
        1.0
    } else {
        found as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::norm::normalize_rows;
    use crate::detect::rng::SplitMix64;
    use ndarray::Array2;

    fn clustered(n: usize, d: usize, seed: u64) -> Array2<f32> {
        // Deterministic pseudo-random clustered unit vectors.
        let mut rng = SplitMix64(seed);
        let mut next = || (rng.next_u64() as f64 / u64::MAX as f64) as f32 - 0.5;
        let centers: Vec<Vec<f32>> = (0..20).map(|_| (0..d).map(|_| next()).collect()).collect();
        let mut a = Array2::<f32>::zeros((n, d));
        for (i, mut row) in a.rows_mut().into_iter().enumerate() {
            let c = &centers[i % 20];
            for (j, v) in row.iter_mut().enumerate() {
                *v = c[j] + 0.3 * next();
            }
        }
        normalize_rows(&mut a);
        a
    }

    #[test]
    fn self_queries_find_themselves_and_recall_is_high() {
        let rows = clustered(1200, 64, 1);
        let idx = VectorIndex::build(rows.view(), IndexParams::default());
        for i in [0usize, 17, 599, 1199] {
            let hit = idx.search(&rows.row(i).to_vec(), 1);
            assert_eq!(hit[0].0, i);
            assert!((hit[0].1 - 1.0).abs() < 1e-4);
        }
        let queries = clustered(100, 64, 2);
        let r = recall_at_k(&idx, rows.view(), queries.view(), 10);
        assert!(r >= 0.95, "recall@10 {r}");
    }

    #[test]
    fn dump_and_reload_give_the_same_answers() {
        let rows = clustered(600, 32, 3);
        let idx = VectorIndex::build(rows.view(), IndexParams::default());
        let dump = idx.dump().unwrap();
        assert!(!dump.graph.is_empty() && dump.data.len() > 600 * 32 * 4);
        let back = VectorIndex::from_dump(&dump, idx.params(), 600).unwrap();
        assert_eq!(back.len(), 600);
        let queries = clustered(50, 32, 4);
        for q in queries.rows() {
            let q = q.to_vec();
            assert_eq!(idx.search(&q, 10), back.search(&q, 10));
        }
        let e = VectorIndex::from_dump(&dump, idx.params(), 601)
            .err()
            .unwrap();
        assert!(e.to_string().contains("601"), "{e}");
        let mut bad = dump.clone();
        bad.graph.truncate(bad.graph.len() / 2);
        assert!(VectorIndex::from_dump(&bad, idx.params(), 600).is_err());
        let empty = VectorIndex::build(
            ndarray::Array2::zeros((0, 32)).view(),
            IndexParams::default(),
        );
        let d = empty.dump().unwrap();
        assert!(
            VectorIndex::from_dump(&d, IndexParams::default(), 0)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn exact_top_k_orders_by_cosine() {
        let rows = ndarray::array![[1.0f32, 0.0], [0.0, 1.0], [0.6, 0.8]];
        let top = exact_top_k(rows.view(), &[0.8, 0.6], 2);
        assert_eq!(top[0].0, 2);
        assert_eq!(top[1].0, 0);
    }

    #[test]
    fn verification_accepts_its_rows_and_refuses_other_vectors() {
        let rows = clustered(500, 16, 7);
        let ix = VectorIndex::build(rows.view(), IndexParams::default());
        assert!(ix.verify_against(rows.view()).is_ok());
        let mut changed = rows.clone();
        changed[[123, 4]] += 0.001;
        let e = ix.verify_against(changed.view()).unwrap_err().to_string();
        assert!(e.contains("row 123"), "{e}");
        // An index of the same rows in another order stores other vectors under each id.
        let mut permuted = rows.clone();
        permuted.invert_axis(ndarray::Axis(0));
        let other = VectorIndex::build(permuted.view(), IndexParams::default());
        assert!(other.verify_against(rows.view()).is_err());
    }
}
