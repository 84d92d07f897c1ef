//! Housekeeping beside the data path: progress acks for inputs that wait, the consumer's
//! pending gauge, and dead-lettering inputs the server gave up on (max-deliveries advisories).
//! Each loop ends when `shutdown` is cancelled.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use metrics::{counter, gauge};
use tokio_util::sync::CancellationToken;

use super::breaker::Breaker;
use super::inflight::{ByteBudget, Source, Tracker};
use super::metrics as m;
use super::route::{DeadKind, Router};
use super::sink::{Publish, RetryPolicy, publish_until_stored};

/// Sends +WPI for inputs waiting longer than half the ack wait, so they are not redelivered
/// to another worker while still queued here, until they have been in flight for
/// `max_processing`: a stage that hangs then loses its input to redelivery.
pub async fn progress_acks(
    js: jetstream::Context,
    tracker: Arc<Tracker>,
    ack_wait: Duration,
    max_processing: Duration,
    shutdown: CancellationToken,
) {
    let every = (ack_wait / 4).max(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let old: Vec<Subject> = tracker.aged(ack_wait / 2, max_processing);
        for reply in old {
            let _ = jetstream::message::Acker::new(js.clone(), Some(reply))
                .ack_with(AckKind::Progress)
                .await;
        }
        gauge!(m::IN_FLIGHT).set(tracker.len() as f64);
    }
}

/// Keeps the bytes-in-flight gauges current (bytes are released when inputs drop, where
/// nothing updates them).
pub async fn byte_gauges(budget: Arc<ByteBudget>, shutdown: CancellationToken) {
    loop {
        budget.observe();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Keeps the `oodgate_consumer_pending` gauge current.
pub async fn pending_gauge(
    mut consumer: jetstream::consumer::PullConsumer,
    shutdown: CancellationToken,
) {
    loop {
        if let Ok(info) = consumer.info().await {
            gauge!(m::PENDING).set(info.num_pending as f64);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(15)) => {}
        }
    }
}

/// The server drops an input silently once it has been delivered `max_deliver` times. Every
/// worker listens for that advisory and dead-letters the input (kind `max_deliveries`) under
/// the input's output `Nats-Msg-Id`, so several workers, or an output that was in fact
/// published, collapse into one message. Advisories are not persisted: one raised while no
/// worker runs is missed.
#[allow(clippy::too_many_arguments)]
pub async fn max_deliveries<P: Publish>(
    client: async_nats::Client,
    js: jetstream::Context,
    input_stream: String,
    durable: String,
    router: Arc<Router>,
    publisher: P,
    retry: RetryPolicy,
    breaker: Arc<Breaker>,
    shutdown: CancellationToken,
) {
    let subject = format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{input_stream}.{durable}");
    let Ok(mut sub) = client.subscribe(subject.clone()).await else {
        tracing::warn!(%subject, "cannot subscribe to max-deliveries advisories");
        return;
    };
    #[derive(serde::Deserialize)]
    struct Advisory {
        stream_seq: u64,
        #[serde(default)]
        deliveries: u64,
    }
    loop {
        let advisory = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        let Ok(a) = serde_json::from_slice::<Advisory>(&advisory.payload) else {
            continue;
        };
        let Ok(stream) = js.get_stream(&input_stream).await else {
            continue;
        };
        let epoch = super::setup::epoch_of(stream.cached_info());
        let Ok(original) = stream.get_raw_message(a.stream_seq).await else {
            tracing::warn!(
                seq = a.stream_seq,
                "max-deliveries advisory for a message no longer in the stream"
            );
            continue;
        };
        let source = Source {
            stream: input_stream.clone(),
            epoch,
            sequence: a.stream_seq,
            delivered: a.deliveries as i64,
        };
        let why = format!(
            "input {} was delivered {} times without being processed (input.max_deliver)",
            source.label(),
            a.deliveries
        );
        let output = router.dead(
            &source,
            Some(&original.headers),
            DeadKind::MaxDeliveries,
            &why,
        );
        // Retried like any output, while the output is unavailable too.
        let stored = publish_until_stored(
            &publisher,
            &output,
            &original.payload,
            &retry,
            Some(&breaker),
            shutdown.cancelled(),
        )
        .await;
        match stored {
            Ok(stored) if stored.duplicate => {}
            Ok(_) => {
                counter!(m::DLQ, "kind" => DeadKind::MaxDeliveries.as_str()).increment(1);
                tracing::warn!(
                    seq = a.stream_seq,
                    "dead-lettered an input that hit max_deliver"
                );
            }
            Err(e) => {
                tracing::error!(seq = a.stream_seq, error = %e, "cannot dead-letter an input that hit max_deliver")
            }
        }
    }
}

/// The worker's liveness for `/healthz`: `None` while healthy, else the reason.
#[derive(Clone, Default)]
pub struct Health(Arc<std::sync::Mutex<Option<String>>>);

impl Health {
    pub fn problem(&self) -> Option<String> {
        self.0.lock().ok().and_then(|p| p.clone())
    }

    fn set(&self, problem: Option<String>) {
        if let Ok(mut p) = self.0.lock() {
            if *p != problem {
                match &problem {
                    Some(why) => tracing::error!(%why, "worker unhealthy"),
                    None => tracing::info!("worker healthy again"),
                }
            }
            *p = problem;
        }
    }
}

/// Whether the worker is alive: the encoder thread runs, and work in flight moves unless the
/// output is unavailable (then waiting is expected and `/readyz` already says so).
pub fn judge(
    encoder_alive: bool,
    in_flight: usize,
    output_blocked: bool,
    since_progress: Duration,
    stall_after: Duration,
) -> Option<String> {
    if !encoder_alive {
        return Some("the encoder thread has stopped".into());
    }
    if in_flight > 0 && !output_blocked && since_progress >= stall_after {
        return Some(format!(
            "no input finished for {since_progress:?} with {in_flight} in flight (a stage hangs)"
        ));
    }
    None
}

/// Keeps [`Health`] current once a second.
pub async fn watchdog(
    encoder_alive: Arc<std::sync::atomic::AtomicBool>,
    stats: Arc<super::metrics::Stats>,
    tracker: Arc<Tracker>,
    breaker: Arc<Breaker>,
    stall_after: Duration,
    health: Health,
    shutdown: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let done = || {
        stats.id.load(Relaxed)
            + stats.ood.load(Relaxed)
            + stats.dlq.load(Relaxed)
            + stats.naks.load(Relaxed)
    };
    let (mut last, mut since) = (done(), std::time::Instant::now());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = done();
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        }
        health.set(judge(
            encoder_alive.load(std::sync::atomic::Ordering::SeqCst),
            tracker.len(),
            breaker.is_open(),
            since.elapsed(),
            stall_after,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_when_the_encoder_is_gone_or_work_stalls_outside_an_outage() {
        let (s, stall) = (Duration::from_secs(5), Duration::from_secs(120));
        assert_eq!(judge(true, 3, false, s, stall), None);
        assert!(
            judge(false, 0, false, s, stall)
                .unwrap()
                .contains("encoder thread")
        );
        let stalled = judge(true, 3, false, stall, stall).unwrap();
        assert!(stalled.contains("3 in flight"), "{stalled}");
        // Nothing in flight, or the output is down: waiting is expected.
        assert_eq!(judge(true, 0, false, stall * 10, stall), None);
        assert_eq!(judge(true, 3, true, stall * 10, stall), None);
    }
}
