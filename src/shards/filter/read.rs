//! Stage 1: reads the shards in order, groups samples into chunks of a batch, and decodes
//! each chunk's images into u8 crops on the decode threads.

use std::ops::ControlFlow;
use std::sync::mpsc::SyncSender;

use arrow_array::RecordBatch;

use super::{FilterOptions, Item, State, Unit, sha256_hex};
use crate::model::Preprocessor;
use crate::model::preprocess::guard_decoder_panics;
use crate::shards::parquet_shard;
use crate::shards::tables::{ErrorKind, Stage};
use crate::shards::webdataset::{self, Problem, Sample, sidecar_ids};
use crate::shards::{Format, Shard};

fn decode_problem(e: &crate::model::preprocess::PreprocessError, member: Option<&str>) -> Problem {
    Problem {
        stage: Stage::Decode,
        kind: ErrorKind::of_preprocess(e),
        message: e.to_string(),
        member: member.map(str::to_string),
    }
}

fn unit_of_sample(mut s: Sample) -> (Unit, Option<Vec<u8>>) {
    let (uid, url) = s.sidecar("json").map_or((None, None), sidecar_ids);
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
pub(super) fn read_stage(
    shards: &[Shard],
    pre: &Preprocessor,
    opts: &FilterOptions,
    tx: SyncSender<Item>,
) {
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
                    crate::shards::folder::read_samples(&shard.path, each)
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
