//! The outputs of one shard, opened and committed together: `filter` and `collect` both start
//! a shard with [`ShardOutput::open`] and end it with [`ShardOutput::commit`], so the two
//! paths write the same files in the same way (docs/shards.md §2–3).

use std::collections::HashMap;
use std::path::PathBuf;

use arrow_schema::Schema;

use super::commit::{self, ERRORS, ID, Layout, Marker, OOD, Pending, SCORES};
use super::folder::SampleWriter;
use super::parquet_shard::{self, ParquetOut, ParquetShardError};
use super::tables::{self, ErrorRow, ScoreRow, TableError};
use super::{Format, Shard};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Parquet(#[from] ParquetShardError),
    #[error("{0}")]
    Table(#[from] TableError),
    #[error("a parquet shard needs its input schema to open its outputs")]
    NoSchema,
}

/// Where one decision's samples go: a tar or folder, or a parquet table.
pub enum Kept {
    Samples(SampleWriter),
    Parquet(ParquetOut),
}

impl Kept {
    /// The tar or folder writer (`None` for a parquet shard).
    pub fn samples(&mut self) -> Option<&mut SampleWriter> {
        match self {
            Kept::Samples(w) => Some(w),
            Kept::Parquet(_) => None,
        }
    }

    fn count(&self) -> usize {
        match self {
            Kept::Samples(w) => w.samples(),
            Kept::Parquet(w) => w.rows,
        }
    }

    fn finish(self) -> Result<(), OutputError> {
        match self {
            Kept::Samples(w) => w.finish()?,
            Kept::Parquet(w) => {
                w.finish()?;
            }
        }
        Ok(())
    }
}

/// A shard's outputs while it is written: the kept samples of each decision, under
/// temporary names until the commit, and the rows of its two tables.
pub struct ShardOutput {
    pub id: Kept,
    pub ood: Kept,
    pub scores: Vec<ScoreRow>,
    pub errors: Vec<ErrorRow>,
    /// The input's metadata table to split by decision at the commit (`filter` only).
    metadata: Option<PathBuf>,
}

/// Every final name a shard may write, for [`commit::prepare`].
fn final_names(l: &Layout, shard: &Shard, metadata: bool) -> Vec<PathBuf> {
    let mut v = vec![
        l.filtered(ID, shard),
        l.filtered(OOD, shard),
        l.table(SCORES, shard),
        l.table(ERRORS, shard),
    ];
    if shard.format.is_webdataset() {
        v.push(l.stats(ID, shard));
        v.push(l.stats(OOD, shard));
    }
    if metadata {
        v.push(l.metadata(ID, shard));
        v.push(l.metadata(OOD, shard));
    }
    v
}

impl ShardOutput {
    /// Clears what an earlier attempt left ([`commit::prepare`]) and opens both folders'
    /// writers under temporary names. `schema` is the parquet input's; `metadata` the table
    /// beside a tar or folder to split at the end.
    pub fn open(
        l: &Layout,
        shard: &Shard,
        schema: Option<&Schema>,
        metadata: Option<PathBuf>,
    ) -> Result<ShardOutput, OutputError> {
        commit::prepare(&l.marker(shard), &final_names(l, shard, metadata.is_some()))?;
        let make = |top: &str| -> Result<Kept, OutputError> {
            let tmp = commit::temp_path(&l.filtered(top, shard));
            Ok(match (schema, shard.format) {
                (Some(s), Format::Parquet) => Kept::Parquet(ParquetOut::create(&tmp, s)?),
                (_, Format::Parquet) => return Err(OutputError::NoSchema),
                (_, f) => Kept::Samples(SampleWriter::create(&tmp, f)?),
            })
        };
        Ok(ShardOutput {
            id: make(ID)?,
            ood: make(OOD)?,
            scores: Vec::new(),
            errors: Vec::new(),
            metadata,
        })
    }

    /// Removes the temporary files of a shard that failed (it has no marker).
    pub fn abandon(l: &Layout, shard: &Shard) {
        for p in final_names(l, shard, true) {
            let _ = commit::remove_if_present(&commit::temp_path(&p));
        }
    }

    /// Closes the writers, writes the stats files, the split metadata table and both
    /// tables, and commits them with `marker` (its `outputs` are filled in here).
    pub fn commit(self, l: &Layout, shard: &Shard, marker: Marker) -> Result<Marker, OutputError> {
        let mut files = Vec::new();
        for (top, w) in [(ID, self.id), (OOD, self.ood)] {
            let samples = w.count();
            w.finish()?;
            files.push(Pending::new(l.filtered(top, shard)));
            if shard.format.is_webdataset() {
                // img2dataset's stats file, so DataComp's resharder reads the folder as is.
                let p = Pending::new(l.stats(top, shard));
                std::fs::write(&p.temp, commit::stats_json(samples, &shard.rel, top))?;
                files.push(p);
            }
        }
        if let Some(meta) = &self.metadata {
            let decided: HashMap<&str, bool> = self
                .scores
                .iter()
                .map(|r| (r.key.as_str(), r.decision == "id"))
                .collect();
            let (id, ood) = (
                Pending::new(l.metadata(ID, shard)),
                Pending::new(l.metadata(OOD, shard)),
            );
            if parquet_shard::split_metadata(
                meta,
                |k| decided.get(k).copied(),
                &id.temp,
                &ood.temp,
            )? {
                files.push(id);
                files.push(ood);
            }
        }
        files.push(write_table(
            l.table(SCORES, shard),
            tables::scores_batch(&self.scores),
        )?);
        files.push(write_table(
            l.table(ERRORS, shard),
            tables::errors_batch(&self.errors),
        )?);
        Ok(commit::commit(l, files, &l.marker(shard), marker)?)
    }
}

fn write_table(
    path: PathBuf,
    batch: Result<arrow_array::RecordBatch, arrow_schema::ArrowError>,
) -> Result<Pending, OutputError> {
    let p = Pending::new(path);
    tables::write_table(&p.temp, &batch.map_err(TableError::from)?)?;
    Ok(p)
}
