//! Stage 2: the encoder thread. Each chunk's crops are normalised into the batch tensor with
//! `serve`'s `assemble`; a batch that fails is retried image by image.

use std::sync::mpsc::{Receiver, SyncSender};

use ndarray::Array2;

use super::{Encoded, Item, State, Unit};
use crate::model::{Encoder, Preprocessor};
use crate::shards::tables::{ErrorKind, Stage};
use crate::shards::webdataset::Problem;
use crate::stream::batcher::assemble;

/// Stage 2: the encoder. Normalisation into the batch tensor as in `serve`'s batcher.
pub(super) fn encode_stage(
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
