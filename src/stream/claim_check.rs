//! Claim checks: an input whose payload is an envelope names an object in a NATS Object
//! Store bucket; fetch it, within the size limit. Failures are typed: permanent ones (no such
//! bucket or object, an invalid name, too large) are dead-lettered, the rest are retried.

use async_nats::jetstream::{
    self, context::GetStreamErrorKind, object_store, object_store::GetErrorKind,
};
use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::inflight::ByteBudget;
use super::message::ObjectRef;
use super::route::DeadKind;
use tokio::sync::OwnedSemaphorePermit;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchError {
    /// Retrying cannot help: dead-letter the input with this kind.
    #[error("{why}")]
    Permanent { kind: DeadKind, why: String },
    /// The server or the connection failed: retry later.
    #[error("{0}")]
    Transient(String),
}

/// True when the Object Store's backing stream does not exist (the bucket is missing).
fn bucket_missing(e: &jetstream::context::ObjectStoreError) -> bool {
    use std::error::Error;
    e.source()
        .and_then(|s| s.downcast_ref::<jetstream::context::GetStreamError>())
        .is_some_and(|g| {
            matches!(g.kind(), GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
        })
}

/// Reads the object `obj` refers to, refusing objects above `max_bytes` before reading them,
/// and reserving its size in `budget` before reading it. Opening and reading each have
/// `timeout` (a read whose chunks never arrive would otherwise hold its input forever); the
/// wait for the budget has none, as the input is kept alive by progress acks meanwhile.
pub async fn fetch(
    js: &jetstream::Context,
    obj: &ObjectRef,
    max_bytes: usize,
    timeout: std::time::Duration,
    budget: &ByteBudget,
) -> Result<(Bytes, OwnedSemaphorePermit), FetchError> {
    let fetched = async {
        let timed_out = || {
            FetchError::Transient(format!(
                "reading object {}/{} took longer than {timeout:?} (input.fetch_timeout)",
                obj.bucket, obj.name
            ))
        };
        let mut object = tokio::time::timeout(timeout, open(js, obj, max_bytes))
            .await
            .map_err(|_| timed_out())??;
        let size = object.info.size;
        let permit = budget
            .reserve(size)
            .await
            .ok_or_else(|| FetchError::Transient("shutting down".into()))?;
        let mut buf = Vec::with_capacity(size);
        tokio::time::timeout(timeout, object.read_to_end(&mut buf))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| {
                FetchError::Transient(format!("reading object {}/{}: {e}", obj.bucket, obj.name))
            })?;
        Ok((Bytes::from(buf), permit))
    };
    // A timeout the server's permissions explain is permanent.
    fetched.await.map_err(|e| match e {
        FetchError::Transient(_) => forbidden(obj, timeout).unwrap_or(e),
        permanent => permanent,
    })
}

/// A failed fetch the server's permissions explain: the worker may not read the bucket, so
/// retrying cannot help (the violation arrives as its own event; the request just timed out).
fn forbidden(obj: &ObjectRef, timeout: std::time::Duration) -> Option<FetchError> {
    let stream = format!("OBJ_{}", obj.bucket);
    let chunks = format!("$O.{}.", obj.bucket);
    let violation = super::permissions::recent(
        &[&stream, &chunks],
        timeout * 2 + std::time::Duration::from_secs(10),
    )?;
    Some(FetchError::Permanent {
        kind: DeadKind::BadEnvelope,
        why: format!(
            "the worker may not read object store bucket {:?} ({violation})",
            obj.bucket
        ),
    })
}

async fn open(
    js: &jetstream::Context,
    obj: &ObjectRef,
    max_bytes: usize,
) -> Result<object_store::Object, FetchError> {
    use jetstream::context::ObjectStoreErrorKind;
    let store = js.get_object_store(&obj.bucket).await.map_err(|e| {
        if matches!(e.kind(), ObjectStoreErrorKind::InvalidBucketName) {
            FetchError::Permanent {
                kind: DeadKind::BadEnvelope,
                why: format!("invalid object store bucket name {:?}", obj.bucket),
            }
        } else if bucket_missing(&e) {
            FetchError::Permanent {
                kind: DeadKind::MissingObject,
                why: format!("object store bucket {:?} not found", obj.bucket),
            }
        } else {
            FetchError::Transient(format!("bucket {}: {e}", obj.bucket))
        }
    })?;
    let object = store.get(&obj.name).await.map_err(|e| match e.kind() {
        GetErrorKind::NotFound => FetchError::Permanent {
            kind: DeadKind::MissingObject,
            why: format!("object {:?} not found in bucket {:?}", obj.name, obj.bucket),
        },
        GetErrorKind::InvalidName => FetchError::Permanent {
            kind: DeadKind::BadEnvelope,
            why: format!("invalid object name {:?}", obj.name),
        },
        _ => FetchError::Transient(format!("object {}/{}: {e}", obj.bucket, obj.name)),
    })?;
    let size = object.info.size;
    if size > max_bytes {
        return Err(FetchError::Permanent {
            kind: DeadKind::TooLarge,
            why: format!(
                "object {}/{} is {size} bytes, above the limit of {max_bytes} bytes",
                obj.bucket, obj.name
            ),
        });
    }
    Ok(object)
}
