//! Stage 3: scores each chunk, writes every sample to its folder and the tables, and commits
//! each shard (docs/shards.md §3).

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use ndarray::Array2;

use super::{FilterOptions, Outcome, State, Unit};
use crate::detect::detector::{Decision, Detector};
use crate::shards::Shard;
use crate::shards::commit::{Counts, InputStamp, Layout, Marker};
use crate::shards::output::{Kept, OutputError, ShardOutput};
use crate::shards::parquet_shard;
use crate::shards::tables::{ErrorRow, ScoreRow};

/// The shard being written.
struct Open {
    shard: usize,
    out: ShardOutput,
    counts: Counts,
}

/// Stage 3 state: the detector, the layout and the shard being written.
pub(super) struct Writer<'a> {
    shards: &'a [Shard],
    stamps: &'a [InputStamp],
    layout: &'a Layout,
    detector: &'a Detector,
    opts: &'a FilterOptions,
    open: Option<Open>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum WriteError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Parquet(#[from] parquet_shard::ParquetShardError),
    #[error("{0}")]
    Output(#[from] OutputError),
    #[error("scoring: {0}")]
    Score(#[from] crate::detect::detector::DetectorError),
    #[error("{0}")]
    Other(String),
}

impl<'a> Writer<'a> {
    pub(super) fn new(
        shards: &'a [Shard],
        stamps: &'a [InputStamp],
        layout: &'a Layout,
        detector: &'a Detector,
        opts: &'a FilterOptions,
    ) -> Writer<'a> {
        Writer {
            shards,
            stamps,
            layout,
            detector,
            opts,
            open: None,
        }
    }

    pub(super) fn begin(&mut self, i: usize, schema: Option<SchemaRef>) -> Result<(), WriteError> {
        let shard = &self.shards[i];
        let out = ShardOutput::open(self.layout, shard, schema.as_deref(), shard.metadata())?;
        self.open = Some(Open {
            shard: i,
            out,
            counts: Counts::default(),
        });
        Ok(())
    }

    pub(super) fn chunk(
        &mut self,
        units: Vec<Unit>,
        record: Option<RecordBatch>,
        embeddings: Array2<f32>,
    ) -> Result<usize, WriteError> {
        let Some(open) = self.open.as_mut() else {
            return Err(WriteError::Other("a chunk outside a shard".into()));
        };
        let shard = &self.shards[open.shard];
        let verdicts = self.detector.verdicts(embeddings.view())?;
        let threshold = self.detector.threshold().map_or(f64::NAN, |t| t.value);
        let method = self.detector.method().as_str().to_string();
        let bank_version = self.detector.bank().version().to_string();
        let mut verdicts = verdicts.into_iter();
        // Parquet rows per folder, with their scores, appended once per chunk.
        let mut picks: [(Vec<u32>, Vec<f64>, Vec<&str>); 2] = Default::default();
        let mut n = 0;
        for (idx, u) in units.into_iter().enumerate() {
            open.counts.read += 1;
            match u.state {
                State::Upstream => open.counts.upstream_failures += 1,
                State::Failed(p) => {
                    n += 1;
                    open.counts.errors += 1;
                    open.out.errors.push(ErrorRow {
                        key: Some(u.key),
                        shard: shard.rel.clone(),
                        member: p.member.or(u.member),
                        row: u.row,
                        stage: p.stage,
                        kind: p.kind,
                        message: p.message,
                        bytes: u.bytes,
                    });
                }
                State::Crop(_) => {
                    n += 1;
                    let Some(v) = verdicts.next() else {
                        return Err(WriteError::Other("fewer embeddings than images".into()));
                    };
                    let (folder, pick) = match v.decision {
                        Decision::Id => {
                            open.counts.id += 1;
                            (&mut open.out.id, 0)
                        }
                        Decision::Ood => {
                            open.counts.ood += 1;
                            (&mut open.out.ood, 1)
                        }
                    };
                    match folder {
                        Kept::Samples(w) => {
                            if let Some(s) = &u.sample {
                                w.append(s)?;
                            }
                        }
                        Kept::Parquet(_) => {
                            picks[pick].0.push(idx as u32);
                            picks[pick].1.push(v.score);
                            picks[pick].2.push(v.decision.as_str());
                        }
                    }
                    let (top_labels, top_scores, nearest) = match &v.explanation {
                        Some(e) => (
                            e.top_labels.iter().map(|t| t.0.clone()).collect(),
                            e.top_labels.iter().map(|t| t.1).collect(),
                            e.nearest_outliers.iter().map(|t| t.0.clone()).collect(),
                        ),
                        None => (vec![v.top_label.clone()], vec![], vec![]),
                    };
                    open.out.scores.push(ScoreRow {
                        key: u.key,
                        shard: shard.rel.clone(),
                        member: u.member,
                        row: u.row,
                        uid: u.uid,
                        url: u.url,
                        image_sha256: u.sha256,
                        decision: v.decision.as_str().to_string(),
                        score: v.score,
                        threshold,
                        method: method.clone(),
                        top_labels,
                        top_scores,
                        nearest_outliers: nearest,
                        bank_version: bank_version.clone(),
                        model_fingerprint: self.opts.model_fingerprint.clone(),
                    });
                }
            }
        }
        if let Some(rb) = &record {
            for (pick, folder) in picks.iter().zip([&mut open.out.id, &mut open.out.ood]) {
                if let Kept::Parquet(w) = folder {
                    w.append(rb, &pick.0, &pick.1, &pick.2)?;
                }
            }
        }
        Ok(n)
    }

    pub(super) fn end(
        &mut self,
        truncated: Option<String>,
    ) -> Result<(usize, Outcome), WriteError> {
        let Some(mut open) = self.open.take() else {
            return Err(WriteError::Other("a shard end outside a shard".into()));
        };
        let shard = &self.shards[open.shard];
        let l = self.layout;
        if let Some(why) = truncated {
            open.counts.truncated = true;
            open.out
                .errors
                .push(ErrorRow::truncated_shard(&shard.rel, why));
        }
        let marker = Marker {
            shard: shard.rel.clone(),
            input: self.stamps[open.shard].clone(),
            counts: open.counts.clone(),
            outputs: Vec::new(),
            config_fingerprint: self.opts.config_fingerprint.clone(),
            oodgate_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        open.out.commit(l, shard, marker)?;
        Ok((open.shard, Outcome::Done(open.counts)))
    }

    /// Removes what a failed shard had written (its marker was never written).
    pub(super) fn abandon(&mut self, i: usize) {
        self.open = None;
        ShardOutput::abandon(self.layout, &self.shards[i]);
    }
}
