//! The adaptive memory shared by every worker (`detector.adaptive.sync = "shared"`,
//! docs/adaptive.md §6): admissions are published to the stream `OODGATE_ADAPT` and every
//! worker, the admitting one included, folds them in stream order from an ordered consumer,
//! so replicas that read the same prefix hold the same memory, and a restarted worker rebuilds
//! its memory by replaying what the stream retains.
//!
//! Subjects, per bank version B: `<prefix>.adapt.B.rec` carries admissions, `<prefix>.adapt.B.epoch`
//! resets (`oodgate adaptive reset`). Every message carries its epoch (`Oodgate-Adapt-Epoch`,
//! the reset's time in ms, so epochs only grow); a message of a newer epoch clears the memory
//! first, one of an older epoch is ignored. Records: a format byte (1), the bucket (u32), the
//! static score (f64), the producer time in ms (u64) and the embedding (f32), little-endian.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use ::metrics::{counter, gauge};

use super::metrics;
use crate::detect::adaptive::{Admission, SharedMemory};

/// The stream holding every bank's admissions and resets.
pub const STREAM: &str = "OODGATE_ADAPT";
/// Header with the epoch of a record or reset.
pub const H_EPOCH: &str = "Oodgate-Adapt-Epoch";
const FORMAT: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("adaptive stream {STREAM}: {0}")]
    Stream(String),
    #[error("adaptive record: {0}")]
    Record(String),
}

/// Subjects of one bank's shared memory.
#[derive(Debug, Clone)]
pub struct Subjects {
    pub records: String,
    pub epoch: String,
    pub all: String,
}

impl Subjects {
    pub fn new(prefix: &str, bank_version: &str) -> Subjects {
        let base = format!("{prefix}.adapt.{bank_version}");
        Subjects {
            records: format!("{base}.rec"),
            epoch: format!("{base}.epoch"),
            all: format!("{base}.>"),
        }
    }
}

/// Creates the stream when missing: file storage, the last `max_msgs` messages kept.
pub async fn declare(
    js: &jetstream::Context,
    prefix: &str,
    max_msgs: i64,
) -> Result<stream::Stream, SyncError> {
    js.get_or_create_stream(stream::Config {
        name: STREAM.to_string(),
        subjects: vec![format!("{prefix}.adapt.>")],
        max_messages: max_msgs,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| SyncError::Stream(e.to_string()))
}

pub fn encode(a: &Admission) -> Vec<u8> {
    let mut b = Vec::with_capacity(21 + 4 * a.embedding.len());
    b.push(FORMAT);
    b.extend_from_slice(&a.bucket.to_le_bytes());
    b.extend_from_slice(&a.score.to_le_bytes());
    b.extend_from_slice(&a.ts_ms.to_le_bytes());
    for v in &a.embedding {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

pub fn decode(b: &[u8]) -> Result<Admission, SyncError> {
    let bad = |why: &str| SyncError::Record(format!("{why} ({} bytes)", b.len()));
    if b.first() != Some(&FORMAT) {
        return Err(bad("unknown format"));
    }
    if b.len() < 21 || !(b.len() - 21).is_multiple_of(4) {
        return Err(bad("wrong length"));
    }
    let arr = |r: std::ops::Range<usize>| b.get(r).ok_or_else(|| bad("truncated"));
    let u32_at = |i: usize| -> Result<[u8; 4], SyncError> {
        arr(i..i + 4)?.try_into().map_err(|_| bad("truncated"))
    };
    let u64_at = |i: usize| -> Result<[u8; 8], SyncError> {
        arr(i..i + 8)?.try_into().map_err(|_| bad("truncated"))
    };
    let embedding = b[21..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Admission {
        bucket: u32::from_le_bytes(u32_at(1)?),
        score: f64::from_le_bytes(u64_at(5)?),
        ts_ms: u64::from_le_bytes(u64_at(13)?),
        embedding,
    })
}

/// One worker's view of the shared memory: where it publishes, and the epoch it folds.
#[derive(Debug)]
pub struct Shared {
    js: jetstream::Context,
    subjects: Subjects,
    epoch: AtomicU64,
}

impl Shared {
    /// Publishes one admission under the current epoch; `key` (input stream and sequence)
    /// makes a redelivered input's admission a duplicate the stream drops.
    pub async fn publish(&self, a: &Admission, key: &str) -> Result<(), SyncError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut h = async_nats::HeaderMap::new();
        h.insert(H_EPOCH, epoch.to_string().as_str());
        h.insert("Nats-Msg-Id", format!("adapt:{epoch}:{key}").as_str());
        self.js
            .publish_with_headers(self.subjects.records.clone(), h, encode(a).into())
            .await
            .map_err(|e| SyncError::Stream(e.to_string()))?
            .await
            .map_err(|e| SyncError::Stream(e.to_string()))?;
        Ok(())
    }
}

/// Declares the stream and starts folding this bank's admissions into `mem` in stream order,
/// from the first retained message, until `shutdown`.
pub async fn start(
    js: jetstream::Context,
    prefix: &str,
    bank_version: &str,
    mem: SharedMemory,
    shutdown: CancellationToken,
) -> Result<Arc<Shared>, SyncError> {
    let capacity = mem.lock().map_or(2000, |m| m.params().capacity);
    let stream = declare(&js, prefix, 4 * capacity as i64).await?;
    let subjects = Subjects::new(prefix, bank_version);
    let shared = Arc::new(Shared {
        js,
        subjects: subjects.clone(),
        epoch: AtomicU64::new(0),
    });
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subjects.all.clone(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| SyncError::Stream(e.to_string()))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| SyncError::Stream(e.to_string()))?;
    let me = shared.clone();
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = messages.next() => m,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "adaptive stream read failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                None => break,
            };
            let epoch: u64 = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(H_EPOCH))
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0);
            let Ok(mut m) = mem.lock() else { break };
            let before = m.stats();
            let current = me.epoch.load(Ordering::Acquire);
            if epoch > current {
                m.clear();
                me.epoch.store(epoch, Ordering::Release);
                tracing::info!(epoch, "adaptive memory reset");
            } else if epoch < current {
                continue;
            }
            if msg.subject.as_str() == me.subjects.records {
                match decode(&msg.payload) {
                    Ok(a) => {
                        if let Err(e) = m.fold(a) {
                            tracing::warn!(error = %e, "adaptive record not folded");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "adaptive record skipped"),
                }
            }
            let after = m.stats();
            gauge!(metrics::ADAPTIVE_ENTRIES).set(after.entries as f64);
            counter!(metrics::ADAPTIVE_ADMISSIONS).increment(after.admissions - before.admissions);
            counter!(metrics::ADAPTIVE_EVICTIONS).increment(after.evictions - before.evictions);
        }
    });
    Ok(shared)
}

/// `oodgate adaptive reset`: a new epoch for `bank_version` (now, in ms), which every worker
/// applies by clearing its memory.
pub async fn reset(
    js: &jetstream::Context,
    prefix: &str,
    bank_version: &str,
) -> Result<u64, SyncError> {
    declare(js, prefix, 8000).await?;
    let epoch = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis()),
    )
    .unwrap_or(u64::MAX);
    let mut h = async_nats::HeaderMap::new();
    h.insert(H_EPOCH, epoch.to_string().as_str());
    js.publish_with_headers(
        Subjects::new(prefix, bank_version).epoch,
        h,
        Vec::new().into(),
    )
    .await
    .map_err(|e| SyncError::Stream(e.to_string()))?
    .await
    .map_err(|e| SyncError::Stream(e.to_string()))?;
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_errors() {
        let a = Admission {
            embedding: vec![0.5, -0.25, 1.0],
            bucket: 7,
            score: 0.125,
            ts_ms: 1_700_000_000_000,
        };
        let b = encode(&a);
        assert_eq!(b.len(), 21 + 12);
        assert_eq!(decode(&b).unwrap(), a);
        assert!(decode(&b[..20]).is_err());
        assert!(decode(&b[..b.len() - 1]).is_err());
        let mut c = b.clone();
        c[0] = 9;
        assert!(decode(&c).is_err());
    }
}
