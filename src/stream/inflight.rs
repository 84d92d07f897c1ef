//! One in-flight input: its acker, identity and back-pressure permit. Dropping it without
//! `ack`/`nak` NAKs the message, so forgetting one can never look like success. A tracker keeps
//! every unfinished input's reply subject for progress acks (+WPI) and for the final NAK on a
//! shutdown that runs out of time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Subject;
use async_nats::jetstream::{self, AckKind, message::Acker};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::message::ObjectRef;

#[derive(Default)]
pub struct Tracker {
    next: AtomicU64,
    open: Mutex<HashMap<u64, (Instant, Subject)>>,
}

impl Tracker {
    fn register(&self, reply: Subject) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.open.lock() {
            m.insert(id, (Instant::now(), reply));
        }
        id
    }

    fn finish(&self, id: u64) {
        if let Ok(mut m) = self.open.lock() {
            m.remove(&id);
        }
    }

    pub fn len(&self) -> usize {
        self.open.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reply subjects of inputs in flight for at least `min` and less than `max`.
    pub fn aged(&self, min: Duration, max: Duration) -> Vec<Subject> {
        let now = Instant::now();
        self.open
            .lock()
            .map(|m| {
                m.values()
                    .filter(|(t, _)| {
                        let age = now.duration_since(*t);
                        age >= min && age < max
                    })
                    .map(|(_, s)| s.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Takes every unfinished input (used to NAK them all when the drain times out).
    pub fn take_all(&self) -> Vec<Subject> {
        self.open
            .lock()
            .map(|mut m| m.drain().map(|(_, (_, s))| s).collect())
            .unwrap_or_default()
    }
}

/// The bytes that in-flight inputs hold (pulled payloads and fetched objects), bounded by
/// `input.max_bytes_in_flight` as the in-flight slots bound their number: 160 claim-checked
/// objects of 32 MiB would otherwise be read into memory at once.
pub struct ByteBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    peak: AtomicUsize,
}

impl ByteBudget {
    pub fn new(total: usize) -> ByteBudget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        ByteBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            peak: AtomicUsize::new(0),
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Waits until `bytes` fit (a single input larger than the whole budget waits for all of
    /// it); `None` once the budget is closed.
    pub async fn reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let n = bytes.clamp(1, self.total.min(u32::MAX as usize)) as u32;
        let permit = self.bytes.clone().acquire_many_owned(n).await.ok()?;
        self.observe();
        Some(permit)
    }

    /// Bytes held right now.
    pub fn in_use(&self) -> usize {
        self.total - self.bytes.available_permits()
    }

    /// The most bytes held at once since start-up.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Updates the gauges (also called periodically, as releases happen on drop).
    pub fn observe(&self) {
        let used = self.in_use();
        let peak = self.peak.fetch_max(used, Ordering::Relaxed).max(used);
        metrics::gauge!(super::metrics::BYTES_IN_FLIGHT).set(used as f64);
        metrics::gauge!(super::metrics::BYTES_IN_FLIGHT_PEAK).set(peak as f64);
    }
}

/// The identity of an input message.
#[derive(Debug, Clone)]
pub struct Source {
    pub stream: String,
    /// The stream's identity: its creation time in Unix nanoseconds (see
    /// [`super::message::output_msg_id`]).
    pub epoch: String,
    pub sequence: u64,
    pub delivered: i64,
}

impl Source {
    pub fn label(&self) -> String {
        format!("{}:{}", self.stream, self.sequence)
    }
}

pub struct InFlight {
    acker: Option<Acker>,
    pub source: Source,
    pub received: Instant,
    tracker: Arc<Tracker>,
    id: u64,
    // Drop may run on the inference thread, outside the runtime: keep a handle to spawn the NAK.
    runtime: tokio::runtime::Handle,
    /// A claim-checked object to delete once this input is acked (`input.object_after_routing
    /// = "delete"`); cleared for dead letters, whose object stays for replay.
    claim: Option<(jetstream::Context, ObjectRef)>,
    _permit: OwnedSemaphorePermit,
    /// Its share of the byte budget: the payload, plus a fetched object.
    bytes: Option<OwnedSemaphorePermit>,
}

impl InFlight {
    pub fn new(
        context: jetstream::Context,
        reply: Subject,
        source: Source,
        tracker: Arc<Tracker>,
        permit: OwnedSemaphorePermit,
    ) -> InFlight {
        let id = tracker.register(reply.clone());
        InFlight {
            acker: Some(Acker::new(context, Some(reply))),
            source,
            received: Instant::now(),
            tracker,
            id,
            runtime: tokio::runtime::Handle::current(),
            claim: None,
            _permit: permit,
            bytes: None,
        }
    }

    /// Adds bytes this input holds to its share of the byte budget (released with it).
    pub fn hold_bytes(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.bytes {
            Some(held) => held.merge(permit),
            None => self.bytes = Some(permit),
        }
    }

    /// Deletes `object` from its bucket after this input is acked.
    pub fn delete_object_after_ack(&mut self, js: jetstream::Context, object: ObjectRef) {
        self.claim = Some((js, object));
    }

    /// Keeps the claim-checked object after all (the input is dead-lettered).
    pub fn keep_object(&mut self) {
        self.claim = None;
    }

    /// Acks after the output is durably stored: a double ack waits for the server's
    /// confirmation. Then the claim-checked object, if it is to go, is deleted in the
    /// background: a crash before that leaves it to the bucket's TTL.
    pub async fn ack(mut self) -> Result<(), async_nats::Error> {
        if let Some(a) = self.acker.take() {
            self.tracker.finish(self.id);
            a.double_ack().await?;
            if let Some((js, object)) = self.claim.take() {
                tokio::spawn(delete_object(js, object));
            }
        }
        Ok(())
    }

    /// Asks for redelivery after `delay` (transient failure).
    pub async fn nak(mut self, delay: Option<Duration>) {
        if let Some(a) = self.acker.take() {
            self.tracker.finish(self.id);
            if let Err(e) = a.ack_with(AckKind::Nak(delay)).await {
                tracing::warn!(source = %self.source.label(), error = %e, "NAK failed; the input will be redelivered after ack_wait");
            }
        }
    }
}

async fn delete_object(js: jetstream::Context, object: ObjectRef) {
    let deleted = match js.get_object_store(&object.bucket).await {
        Ok(store) => store.delete(&object.name).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match deleted {
        Ok(()) => metrics::counter!(super::metrics::OBJECTS_DELETED).increment(1),
        Err(e) => {
            tracing::warn!(bucket = %object.bucket, object = %object.name, error = %e, "could not delete a routed claim-checked object")
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(a) = self.acker.take() {
            self.tracker.finish(self.id);
            let source = self.source.label();
            self.runtime.spawn(async move {
                tracing::debug!(%source, "in-flight input dropped unfinished; NAK");
                let _ = a.ack_with(AckKind::Nak(None)).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_byte_budget_waits_when_used_up_and_tracks_its_peak() {
        let b = ByteBudget::new(10);
        let first = b.reserve(6).await.unwrap();
        assert_eq!(b.in_use(), 6);
        // 6 + 6 > 10: the second waits until the first is released.
        let waiting = tokio::time::timeout(Duration::from_millis(50), b.reserve(6)).await;
        assert!(waiting.is_err());
        drop(first);
        let mut second = b.reserve(6).await.unwrap();
        second.merge(b.reserve(4).await.unwrap());
        assert_eq!((b.in_use(), b.peak()), (10, 10));
        drop(second);
        assert_eq!(b.in_use(), 0);
        // An input larger than the whole budget waits for all of it rather than forever.
        assert!(b.reserve(1000).await.is_some());
    }
}
