//! `oodgate filter` on one machine: shards in, filtered shards and tables out.
//!
//! Three stages on their own threads, joined by bounded channels, so that reading and
//! decoding the next batch overlaps the encoder's work on this one (the encoder is the
//! bottleneck, as in `serve`):
//! 1. the reader walks the shards in order, groups samples, and decodes each batch's images
//!    into u8 crops on `decode_workers` threads;
//! 2. the encoder thread assembles each batch tensor exactly as `serve` does and runs the
//!    model; a batch that fails is retried image by image, so one bad image fails alone;
//! 3. the calling thread scores, writes each sample to its folder, and commits each shard.

use std::ops::ControlFlow;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use ndarray::Array2;
use sha2::{Digest, Sha256};

use super::commit::{self, Counts, ERRORS, ID, InputStamp, Layout, Marker, OOD, Pending, SCORES};
use super::folder::SampleWriter;
use super::parquet_shard::{self, ParquetOut};
use super::tables::{self, ErrorKind, ErrorRow, ScoreRow, Stage};
use super::webdataset::{self, Problem, Sample};
use super::{Format, Shard};
use crate::detect::detector::{Decision, Detector};
use crate::model::preprocess::guard_decoder_panics;
use crate::model::{Encoder, Preprocessor};
use crate::stream::batcher::assemble;

/// What every shard of one run shares.
#[derive(Debug, Clone)]
pub struct FilterOptions {
    pub batch: usize,
    pub decode_workers: usize,
    pub image_column: Option<String>,
    pub key_column: Option<String>,
    /// Hash of everything that changes a decision (bank, model, method, threshold, scale,
    /// preprocessing, columns): recorded in `run.json` and in each marker.
    pub config_fingerprint: String,
    /// SHA-256 of the model (the scores table's `model_fingerprint`).
    pub model_fingerprint: String,
}

/// One sample or row on its way through the stages.
struct Unit {
    key: String,
    member: Option<String>,
    row: Option<u32>,
    uid: Option<String>,
    url: Option<String>,
    bytes: Option<u64>,
    sha256: String,
    state: State,
    /// The sample's members, kept to be copied into the output tar.
    sample: Option<Sample>,
}

enum State {
    Crop(Vec<u8>),
    Failed(Problem),
    /// A parquet row whose download failed upstream.
    Upstream,
}

enum Item {
    Begin {
        shard: usize,
        schema: Option<SchemaRef>,
    },
    Chunk {
        shard: usize,
        units: Vec<Unit>,
        record: Option<RecordBatch>,
    },
    /// The shard was read to its end (or to the damage `truncated` names).
    End {
        shard: usize,
        truncated: Option<String>,
    },
    /// The shard could not be read at all: it is left without a marker.
    Failed { shard: usize, error: String },
}

/// A chunk after the encoder: an embedding for each unit in `State::Crop`, in order.
enum Encoded {
    Pass(Item),
    Chunk {
        shard: usize,
        units: Vec<Unit>,
        record: Option<RecordBatch>,
        embeddings: Array2<f32>,
    },
}

/// How one shard ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done(Counts),
    Skipped,
    Failed(String),
}

/// Reported to the caller as the run goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// `n` more samples were scored or listed as errors.
    Samples(usize),
    Shard(&'a Shard, &'a Outcome),
}

#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub shards: usize,
    pub done: usize,
    pub skipped: usize,
    pub failed: Vec<(String, String)>,
    pub counts: Counts,
    pub truncated_shards: usize,
    /// Samples scored per second of the run (skipped shards excluded).
    pub seconds: f64,
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn decode_problem(e: &crate::model::preprocess::PreprocessError, member: Option<&str>) -> Problem {
    Problem {
        stage: Stage::Decode,
        kind: ErrorKind::of_preprocess(e),
        message: e.to_string(),
        member: member.map(str::to_string),
    }
}

fn unit_of_sample(mut s: Sample) -> (Unit, Option<Vec<u8>>) {
    let (uid, url) = s
        .sidecar("json")
        .and_then(|j| serde_json::from_slice::<serde_json::Value>(j).ok())
        .map(|v| {
            let field = |k: &str| {
                v.get(k).and_then(|x| match x {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
            };
            (field("uid"), field("url"))
        })
        .unwrap_or((None, None));
    let image = s.image().map(|m| (m.name.clone(), m.data.clone()));
    let problem = s.problem.take();
    let (member, bytes, sha256, state, data) = match (problem, image) {
        (Some(p), img) => {
            let member = p.member.clone().or(img.as_ref().map(|i| i.0.clone()));
            let bytes = img.as_ref().map(|i| i.1.len() as u64);
            (member, bytes, String::new(), State::Failed(p), None)
        }
        (None, Some((name, data))) => (
            Some(name),
            Some(data.len() as u64),
            sha256_hex(&data),
            State::Crop(Vec::new()),
            Some(data),
        ),
        // `close()` gives every sample without exactly one image a problem.
        (None, None) => (
            None,
            None,
            String::new(),
            State::Failed(Problem {
                stage: Stage::Group,
                kind: ErrorKind::NoImage,
                message: format!("sample {} has no image member", s.key),
                member: None,
            }),
            None,
        ),
    };
    (
        Unit {
            key: s.key.clone(),
            member,
            row: None,
            uid,
            url,
            bytes,
            sha256,
            state,
            sample: Some(s),
        },
        data,
    )
}

fn unit_of_row(r: parquet_shard::Row, image_column: &str) -> (Unit, Option<Vec<u8>>) {
    let (state, data) = if r.upstream_failure {
        (State::Upstream, None)
    } else {
        match r.image {
            Some(d) if !d.is_empty() => (State::Crop(Vec::new()), Some(d)),
            _ => (
                State::Failed(Problem {
                    stage: Stage::Read,
                    kind: ErrorKind::NullImage,
                    message: format!("row {} has no bytes in column {image_column}", r.row),
                    member: None,
                }),
                None,
            ),
        }
    };
    (
        Unit {
            key: r.key,
            member: None,
            row: Some(r.row),
            uid: r.uid,
            url: r.url,
            bytes: data.as_ref().map(|d| d.len() as u64),
            sha256: data.as_deref().map(sha256_hex).unwrap_or_default(),
            state,
            sample: None,
        },
        data,
    )
}

/// Decodes the units' images into crops on `workers` threads.
fn decode(pre: &Preprocessor, units: &mut [(Unit, Option<Vec<u8>>)], workers: usize) {
    let one = |(u, data): &mut (Unit, Option<Vec<u8>>)| {
        if let Some(bytes) = data.take() {
            u.state = match guard_decoder_panics(|| pre.crop(&bytes)) {
                Ok(c) => State::Crop(c),
                Err(e) => State::Failed(decode_problem(&e, u.member.as_deref())),
            };
        }
    };
    let workers = workers.clamp(1, units.len().max(1));
    if workers == 1 {
        units.iter_mut().for_each(one);
        return;
    }
    let per = units.len().div_ceil(workers);
    std::thread::scope(|sc| {
        for part in units.chunks_mut(per) {
            sc.spawn(move || part.iter_mut().for_each(one));
        }
    });
}

/// Stage 1: reads the shards in order and sends decoded chunks.
fn read_stage(shards: &[Shard], pre: &Preprocessor, opts: &FilterOptions, tx: SyncSender<Item>) {
    let batch = opts.batch.max(1);
    let send_chunk = |shard: usize,
                      mut raw: Vec<(Unit, Option<Vec<u8>>)>,
                      record: Option<RecordBatch>|
     -> bool {
        decode(pre, &mut raw, opts.decode_workers);
        let units = raw.into_iter().map(|(u, _)| u).collect();
        tx.send(Item::Chunk {
            shard,
            units,
            record,
        })
        .is_ok()
    };
    for (i, shard) in shards.iter().enumerate() {
        let ok = match shard.format {
            Format::Tar | Format::TarGz | Format::Folder => {
                if tx
                    .send(Item::Begin {
                        shard: i,
                        schema: None,
                    })
                    .is_err()
                {
                    return;
                }
                let mut pending = Vec::with_capacity(batch);
                let mut alive = true;
                let each = |s| {
                    pending.push(unit_of_sample(s));
                    if pending.len() >= batch {
                        alive = send_chunk(i, std::mem::take(&mut pending), None);
                        if !alive {
                            return ControlFlow::Break(());
                        }
                    }
                    ControlFlow::Continue(())
                };
                let read = if shard.format == Format::Folder {
                    super::folder::read_samples(&shard.path, each)
                        .map_err(|e| format!("reading folder {}: {e}", shard.path.display()))
                } else {
                    webdataset::read_samples(&shard.path, each).map_err(|e| e.to_string())
                };
                if !alive {
                    return;
                }
                match read {
                    Ok(report) => {
                        if !pending.is_empty() && !send_chunk(i, pending, None) {
                            return;
                        }
                        tx.send(Item::End {
                            shard: i,
                            truncated: report.truncated,
                        })
                    }
                    Err(error) => tx.send(Item::Failed { shard: i, error }),
                }
            }
            Format::Parquet => match parquet_shard::open(
                &shard.path,
                opts.image_column.as_deref(),
                opts.key_column.as_deref(),
                batch,
            ) {
                Err(e) => tx.send(Item::Failed {
                    shard: i,
                    error: e.to_string(),
                }),
                Ok((reader, cols, schema)) => {
                    if tx
                        .send(Item::Begin {
                            shard: i,
                            schema: Some(schema),
                        })
                        .is_err()
                    {
                        return;
                    }
                    let mut first = 0u32;
                    let mut failure = None;
                    for rb in reader {
                        match rb {
                            Ok(rb) => {
                                let rows = cols.rows(&rb, first);
                                first += rb.num_rows() as u32;
                                let raw = rows
                                    .into_iter()
                                    .map(|r| unit_of_row(r, &cols.image_name))
                                    .collect();
                                if !send_chunk(i, raw, Some(rb)) {
                                    return;
                                }
                            }
                            Err(e) => {
                                failure = Some(format!(
                                    "{}: reading row {first} onwards: {e}",
                                    shard.path.display()
                                ));
                                break;
                            }
                        }
                    }
                    match failure {
                        // A parquet file that fails part-way is not truncated data that can
                        // be kept: the shard fails and is redone on the next run.
                        Some(error) => tx.send(Item::Failed { shard: i, error }),
                        None => tx.send(Item::End {
                            shard: i,
                            truncated: None,
                        }),
                    }
                }
            },
        };
        if ok.is_err() {
            return;
        }
    }
}

/// Stage 2: the encoder. Normalisation into the batch tensor as in `serve`'s batcher.
fn encode_stage(
    encoder: &mut dyn Encoder,
    pre: &Preprocessor,
    rx: Receiver<Item>,
    tx: SyncSender<Encoded>,
) {
    let size = pre.size() as usize;
    let dim = encoder.info().embed_dim;
    let normalize = |raw: &[u8], out: &mut [f32]| pre.normalize_hwc_into(raw, out);
    while let Ok(item) = rx.recv() {
        let out = match item {
            Item::Chunk {
                shard,
                mut units,
                record,
            } => {
                let crops: Vec<&[u8]> = units
                    .iter()
                    .filter_map(|u| match &u.state {
                        State::Crop(c) => Some(c.as_slice()),
                        _ => None,
                    })
                    .collect();
                let embeddings = if crops.is_empty() {
                    Ok(Array2::zeros((0, dim)))
                } else {
                    assemble(crops.into_iter(), size, normalize)
                        .map_err(|e| e.to_string())
                        .and_then(|t| encoder.embed_images(t.view()).map_err(|e| e.to_string()))
                };
                let embeddings = match embeddings {
                    Ok(e) => e,
                    Err(_) => one_by_one(encoder, pre, &mut units, dim),
                };
                Encoded::Chunk {
                    shard,
                    units,
                    record,
                    embeddings,
                }
            }
            other => Encoded::Pass(other),
        };
        if tx.send(out).is_err() {
            return;
        }
    }
}

/// A failed batch, image by image: the images that fail alone become error rows.
fn one_by_one(
    encoder: &mut dyn Encoder,
    pre: &Preprocessor,
    units: &mut [Unit],
    dim: usize,
) -> Array2<f32> {
    let size = pre.size() as usize;
    let mut rows: Vec<f32> = Vec::new();
    let mut n = 0;
    for u in units.iter_mut() {
        let State::Crop(c) = &u.state else { continue };
        let r = assemble(std::iter::once(c.as_slice()), size, |raw, out| {
            pre.normalize_hwc_into(raw, out)
        })
        .map_err(|e| e.to_string())
        .and_then(|t| encoder.embed_images(t.view()).map_err(|e| e.to_string()));
        match r {
            Ok(e) if e.len() == dim => {
                rows.extend(e.iter());
                n += 1;
            }
            Ok(e) => {
                u.state = State::Failed(infer_problem(format!(
                    "the encoder returned {} values, expected {dim}",
                    e.len()
                )))
            }
            Err(e) => u.state = State::Failed(infer_problem(e)),
        }
    }
    Array2::from_shape_vec((n, dim), rows).unwrap_or_else(|_| Array2::zeros((0, dim)))
}

fn infer_problem(message: String) -> Problem {
    Problem {
        stage: Stage::Infer,
        kind: ErrorKind::Inference,
        message,
        member: None,
    }
}

/// Outputs of the shard being written.
enum Filtered {
    Samples(SampleWriter),
    Parquet(ParquetOut),
}

struct Open {
    shard: usize,
    id: Filtered,
    ood: Filtered,
    scores: Vec<ScoreRow>,
    errors: Vec<ErrorRow>,
    counts: Counts,
}

/// Stage 3 state: the detector, the layout and the shard being written.
struct Writer<'a> {
    shards: &'a [Shard],
    stamps: &'a [InputStamp],
    layout: &'a Layout,
    detector: &'a Detector,
    opts: &'a FilterOptions,
    open: Option<Open>,
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Parquet(#[from] parquet_shard::ParquetShardError),
    #[error("{0}")]
    Table(#[from] tables::TableError),
    #[error("scoring: {0}")]
    Score(#[from] crate::detect::detector::DetectorError),
    #[error("{0}")]
    Other(String),
}

impl Writer<'_> {
    fn outputs(&self, shard: &Shard) -> Vec<std::path::PathBuf> {
        let l = self.layout;
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
        if shard.metadata().is_some() {
            v.push(l.metadata(ID, shard));
            v.push(l.metadata(OOD, shard));
        }
        v
    }

    fn begin(&mut self, i: usize, schema: Option<SchemaRef>) -> Result<(), WriteError> {
        let shard = &self.shards[i];
        commit::prepare(&self.layout.marker(shard), &self.outputs(shard))?;
        let make = |top: &str| -> Result<Filtered, WriteError> {
            let tmp = commit::temp_path(&self.layout.filtered(top, shard));
            Ok(match (&schema, shard.format) {
                (Some(s), Format::Parquet) => Filtered::Parquet(ParquetOut::create(&tmp, s)?),
                (None, f) if f.is_webdataset() => Filtered::Samples(SampleWriter::create(&tmp, f)?),
                _ => return Err(WriteError::Other("no schema for a parquet shard".into())),
            })
        };
        self.open = Some(Open {
            shard: i,
            id: make(ID)?,
            ood: make(OOD)?,
            scores: Vec::new(),
            errors: Vec::new(),
            counts: Counts::default(),
        });
        Ok(())
    }

    fn chunk(
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
                    open.errors.push(ErrorRow {
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
                            (&mut open.id, 0)
                        }
                        Decision::Ood => {
                            open.counts.ood += 1;
                            (&mut open.ood, 1)
                        }
                    };
                    match folder {
                        Filtered::Samples(w) => {
                            if let Some(s) = &u.sample {
                                w.append(s)?;
                            }
                        }
                        Filtered::Parquet(_) => {
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
                    open.scores.push(ScoreRow {
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
            for (pick, folder) in picks.iter().zip([&mut open.id, &mut open.ood]) {
                if let Filtered::Parquet(w) = folder {
                    w.append(rb, &pick.0, &pick.1, &pick.2)?;
                }
            }
        }
        Ok(n)
    }

    fn end(&mut self, truncated: Option<String>) -> Result<(usize, Outcome), WriteError> {
        let Some(mut open) = self.open.take() else {
            return Err(WriteError::Other("a shard end outside a shard".into()));
        };
        let shard = &self.shards[open.shard];
        let l = self.layout;
        if let Some(why) = truncated {
            open.counts.truncated = true;
            open.errors.push(ErrorRow::truncated_shard(&shard.rel, why));
        }
        let mut files = Vec::new();
        for (top, w) in [(ID, open.id), (OOD, open.ood)] {
            let p = Pending::new(l.filtered(top, shard));
            let samples = match w {
                Filtered::Samples(w) => {
                    let n = w.samples();
                    w.finish()?;
                    n
                }
                Filtered::Parquet(w) => {
                    let n = w.rows;
                    w.finish()?;
                    n
                }
            };
            files.push(p);
            if shard.format.is_webdataset() {
                let p = Pending::new(l.stats(top, shard));
                std::fs::write(&p.temp, commit::stats_json(samples, &shard.rel, top))?;
                files.push(p);
            }
        }
        if let Some(meta) = shard.metadata() {
            let decided: std::collections::HashMap<&str, bool> = open
                .scores
                .iter()
                .map(|r| (r.key.as_str(), r.decision == Decision::Id.as_str()))
                .collect();
            let (id, ood) = (
                Pending::new(l.metadata(ID, shard)),
                Pending::new(l.metadata(OOD, shard)),
            );
            if parquet_shard::split_metadata(
                &meta,
                |k| decided.get(k).copied(),
                &id.temp,
                &ood.temp,
            )? {
                files.push(id);
                files.push(ood);
            }
        }
        let p = Pending::new(l.table(SCORES, shard));
        tables::write_table(
            &p.temp,
            &tables::scores_batch(&open.scores).map_err(tables::TableError::from)?,
        )?;
        files.push(p);
        let p = Pending::new(l.table(ERRORS, shard));
        tables::write_table(
            &p.temp,
            &tables::errors_batch(&open.errors).map_err(tables::TableError::from)?,
        )?;
        files.push(p);
        let marker = Marker {
            shard: shard.rel.clone(),
            input: self.stamps[open.shard].clone(),
            counts: open.counts.clone(),
            outputs: Vec::new(),
            config_fingerprint: self.opts.config_fingerprint.clone(),
            oodgate_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        commit::commit(l, files, &l.marker(shard), marker)?;
        Ok((open.shard, Outcome::Done(open.counts)))
    }

    /// Removes what a failed shard had written (its marker was never written).
    fn abandon(&mut self, i: usize) {
        self.open = None;
        let shard = &self.shards[i];
        for p in self.outputs(shard) {
            let _ = std::fs::remove_file(commit::temp_path(&p));
        }
    }
}

/// Runs `filter` over `shards` (this worker's part, in order) into `layout`. Shards whose
/// marker matches their input and `opts.config_fingerprint` are skipped.
pub fn run(
    shards: &[Shard],
    layout: &Layout,
    encoder: &mut dyn Encoder,
    detector: &Detector,
    pre: &Preprocessor,
    opts: &FilterOptions,
    mut on_event: impl FnMut(Event<'_>),
) -> Summary {
    let started = Instant::now();
    let mut summary = Summary {
        shards: shards.len(),
        ..Summary::default()
    };
    let mut todo: Vec<Shard> = Vec::new();
    let mut stamps: Vec<InputStamp> = Vec::new();
    for s in shards {
        match InputStamp::of(&s.path) {
            Err(e) => {
                let why = format!("{}: {e}", s.path.display());
                on_event(Event::Shard(s, &Outcome::Failed(why.clone())));
                summary.failed.push((s.rel.clone(), why));
            }
            Ok(stamp) => {
                let done = commit::read_marker(&layout.marker(s))
                    .is_some_and(|m| m.matches(&stamp, &opts.config_fingerprint));
                if done {
                    summary.skipped += 1;
                    on_event(Event::Shard(s, &Outcome::Skipped));
                } else {
                    todo.push(s.clone());
                    stamps.push(stamp);
                }
            }
        }
    }
    let (read_tx, read_rx) = sync_channel::<Item>(2);
    let (enc_tx, enc_rx) = sync_channel::<Encoded>(2);
    let mut writer = Writer {
        shards: &todo,
        stamps: &stamps,
        layout,
        detector,
        opts,
        open: None,
    };
    std::thread::scope(|sc| {
        let todo = &todo;
        sc.spawn(move || read_stage(todo, pre, opts, read_tx));
        sc.spawn(move || encode_stage(encoder, pre, read_rx, enc_tx));
        // A shard that failed while being written is skipped until its end.
        let mut failed_shard: Option<usize> = None;
        for item in enc_rx {
            let (shard, result) = match item {
                Encoded::Pass(Item::Begin { shard, schema }) => {
                    failed_shard = None;
                    (shard, writer.begin(shard, schema).map(|_| None))
                }
                Encoded::Chunk {
                    shard,
                    units,
                    record,
                    embeddings,
                } => {
                    if failed_shard == Some(shard) {
                        continue;
                    }
                    let r = writer.chunk(units, record, embeddings);
                    if let Ok(n) = r {
                        on_event(Event::Samples(n));
                    }
                    (shard, r.map(|_| None))
                }
                Encoded::Pass(Item::Chunk { shard, .. }) => (shard, Ok(None)),
                Encoded::Pass(Item::End { shard, truncated }) => {
                    if failed_shard == Some(shard) {
                        continue;
                    }
                    (shard, writer.end(truncated).map(|(_, o)| Some(o)))
                }
                Encoded::Pass(Item::Failed { shard, error }) => {
                    (shard, Err(WriteError::Other(error)))
                }
            };
            let outcome = match result {
                Ok(None) => continue,
                Ok(Some(o)) => o,
                Err(e) => {
                    writer.abandon(shard);
                    failed_shard = Some(shard);
                    Outcome::Failed(e.to_string())
                }
            };
            let s = &todo[shard];
            match &outcome {
                Outcome::Done(c) => {
                    summary.done += 1;
                    add(&mut summary.counts, c);
                    summary.truncated_shards += usize::from(c.truncated);
                }
                Outcome::Failed(why) => summary.failed.push((s.rel.clone(), why.clone())),
                Outcome::Skipped => summary.skipped += 1,
            }
            on_event(Event::Shard(s, &outcome));
        }
    });
    summary.seconds = started.elapsed().as_secs_f64();
    summary
}

fn add(total: &mut Counts, c: &Counts) {
    total.read += c.read;
    total.id += c.id;
    total.ood += c.ood;
    total.errors += c.errors;
    total.upstream_failures += c.upstream_failures;
}

/// The configuration fingerprint: SHA-256 of the canonical JSON of what decides.
pub fn config_fingerprint(parts: &serde_json::Value) -> String {
    sha256_hex(parts.to_string().as_bytes())
}
