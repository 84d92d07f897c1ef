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
//!
//! Modules: [`read`] (stage 1), [`encode`] (stage 2), [`write`] (stage 3); this file holds
//! what travels between them and the run itself.

mod encode;
mod read;
mod write;

use std::sync::mpsc::sync_channel;
use std::time::Instant;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use ndarray::Array2;
use sha2::{Digest, Sha256};

use super::Shard;
use super::commit::{self, Counts, InputStamp, Layout};
use super::webdataset::{Problem, Sample};
use crate::detect::detector::Detector;
use crate::model::{Encoder, Preprocessor};
use encode::encode_stage;
use read::read_stage;
use write::{WriteError, Writer};

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

/// marker matches their input and `opts.config_fingerprint` are skipped.
/// Runs `filter` over `shards` (this worker's part, in order) into `layout`. Shards whose
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
    let mut writer = Writer::new(&todo, &stamps, layout, detector, opts);
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

pub(super) fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
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
