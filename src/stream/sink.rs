//! The sink: publish an output and wait for the stream's PubAck (retrying under the same
//! `Nats-Msg-Id`), and only then ack the input; or NAK it. The one publish-with-retry loop
//! lives here and also serves the max-deliveries advisories. Generic over [`Publish`] and
//! [`Settle`] so the ordering rules are unit-tested without a server; JetStream implements
//! both for the daemon.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use metrics::{counter, histogram};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::breaker::Breaker;
use super::inflight::InFlight;
use super::metrics as m;
use super::metrics::Stats;
use super::route::{Outcome, Output};

/// One publish attempt failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PublishError {
    #[error("publish to {subject} timed out after {timeout:?}")]
    Timeout { subject: String, timeout: Duration },
    #[error("publish to {subject} failed: {reason}")]
    Failed { subject: String, reason: String },
}

/// A stored output: `duplicate` when the stream already had its `Nats-Msg-Id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub duplicate: bool,
}

/// Stores one message durably: resolves once the stream has acknowledged it.
pub trait Publish: Clone + Send + Sync + 'static {
    fn publish(
        &self,
        subject: &str,
        headers: &HeaderMap,
        payload: &Bytes,
    ) -> impl Future<Output = Result<Stored, PublishError>> + Send;
}

/// The end of an input's life: acked after its output is stored, or NAKed for redelivery.
pub trait Settle: Send + 'static {
    /// `STREAM:SEQ` of the input, for logs.
    fn label(&self) -> String;
    /// When the input was received.
    fn received(&self) -> Instant;
    fn ack(self) -> impl Future<Output = Result<(), String>> + Send;
    /// The input is dead-lettered: keep anything it refers to (its claim-checked object).
    fn keep_referenced(&mut self) {}
    fn nak(self, delay: Option<Duration>) -> impl Future<Output = ()> + Send;
}

/// JetStream publishing with an awaited PubAck, bounded by `timeout`.
#[derive(Clone)]
pub struct JetStreamPublisher {
    pub js: jetstream::Context,
    pub timeout: Duration,
}

impl Publish for JetStreamPublisher {
    async fn publish(
        &self,
        subject: &str,
        headers: &HeaderMap,
        payload: &Bytes,
    ) -> Result<Stored, PublishError> {
        let attempt = async {
            let ack = self
                .js
                .publish_with_headers(subject.to_string(), headers.clone(), payload.clone())
                .await?;
            ack.await.map_err(async_nats::Error::from)
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(ack)) => Ok(Stored {
                duplicate: ack.duplicate,
            }),
            Ok(Err(e)) => Err(PublishError::Failed {
                subject: subject.to_string(),
                reason: e.to_string(),
            }),
            Err(_) => Err(PublishError::Timeout {
                subject: subject.to_string(),
                timeout: self.timeout,
            }),
        }
    }
}

impl Settle for InFlight {
    fn label(&self) -> String {
        self.source.label()
    }
    fn received(&self) -> Instant {
        self.received
    }
    async fn ack(self) -> Result<(), String> {
        InFlight::ack(self).await.map_err(|e| e.to_string())
    }
    fn keep_referenced(&mut self) {
        self.keep_object();
    }
    async fn nak(self, delay: Option<Duration>) {
        InFlight::nak(self, delay).await
    }
}

/// How long to keep trying to store an output.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Quick retries before the output counts as unavailable (the breaker opens).
    pub quick_retries: u32,
    /// First backoff delay; it doubles up to `max_delay`, with jitter.
    pub base_delay: Duration,
    pub max_delay: Duration,
}

/// `d` scaled by a random factor in [0.5, 1): spreads the retries of many workers.
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    d.mul_f64(0.5 + (r >> 11) as f64 / (1u64 << 53) as f64 / 2.0)
}

/// The delay before retry number `attempt` (1-based): `base · 2^(attempt−1)`, capped, jittered.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    jitter(exp.min(max))
}

/// Publishes until the output is stored, `give_up` resolves, or (with no breaker) the quick
/// retries are spent. Failures beyond the quick retries open `breaker`, a success closes it.
/// The output keeps its `Nats-Msg-Id`, so an attempt that timed out after being stored is
/// deduplicated by the stream.
pub async fn publish_until_stored<P: Publish>(
    publisher: &P,
    output: &Output,
    payload: &Bytes,
    policy: &RetryPolicy,
    breaker: Option<&Breaker>,
    give_up: impl Future<Output = ()>,
) -> Result<Stored, PublishError> {
    tokio::pin!(give_up);
    let mut attempt = 0u32;
    loop {
        let e = match publisher
            .publish(&output.subject, &output.headers, payload)
            .await
        {
            Ok(stored) => {
                if let Some(b) = breaker {
                    b.reset();
                }
                return Ok(stored);
            }
            Err(e) => e,
        };
        attempt += 1;
        if attempt > policy.quick_retries {
            match breaker {
                Some(b) => b.trip(),
                None => return Err(e),
            }
        }
        if attempt == 1 || attempt.is_power_of_two() {
            tracing::warn!(subject = %output.subject, attempt, error = %e, "publish failed; retrying");
        }
        tokio::select! {
            _ = &mut give_up => return Err(e),
            _ = tokio::time::sleep(backoff(policy.base_delay, policy.max_delay, attempt)) => {}
        }
    }
}

/// What the sink does with one input.
pub enum Routed<S> {
    Publish {
        input: S,
        payload: Bytes,
        output: Output,
    },
    Nak {
        input: S,
        delay: Option<Duration>,
        reason: &'static str,
    },
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub retry: RetryPolicy,
    /// Publishes awaiting their PubAck at once.
    pub max_inflight_publishes: usize,
    /// Redelivery delay after giving up on an output.
    pub nak_delay: Duration,
    /// How long after its receipt an input may be held while its output cannot be stored;
    /// then it is NAKed (and its progress acks stop).
    pub max_processing: Duration,
}

/// Settles one input: publish then ack, or NAK. An output that cannot be stored is retried
/// (with the breaker open) until it is, the input's processing cap passes, or `shutdown`.
pub async fn deliver<P: Publish, S: Settle>(
    publisher: &P,
    item: Routed<S>,
    cfg: &SinkConfig,
    stats: &Stats,
    breaker: &Breaker,
    shutdown: &CancellationToken,
) {
    match item {
        Routed::Nak {
            input,
            delay,
            reason,
        } => {
            counter!(m::NAKS, "reason" => reason).increment(1);
            stats.naks.fetch_add(1, Ordering::Relaxed);
            input.nak(delay).await;
        }
        Routed::Publish {
            mut input,
            payload,
            output,
        } => {
            if matches!(output.outcome, Outcome::Dead(_)) {
                input.keep_referenced();
            }
            let t0 = Instant::now();
            let cap = tokio::time::Instant::from_std(input.received() + cfg.max_processing);
            let give_up = async {
                tokio::select! {
                    _ = tokio::time::sleep_until(cap) => {}
                    _ = shutdown.cancelled() => {}
                }
            };
            let published = publish_until_stored(
                publisher,
                &output,
                &payload,
                &cfg.retry,
                Some(breaker),
                give_up,
            )
            .await
                .inspect_err(|e| tracing::warn!(source = %input.label(), error = %e, "giving up publishing; NAK"));
            histogram!(m::STAGE_SECONDS, "stage" => "publish").record(t0.elapsed().as_secs_f64());
            if published.is_err() {
                counter!(m::NAKS, "reason" => "publish").increment(1);
                stats.naks.fetch_add(1, Ordering::Relaxed);
                input.nak(Some(cfg.nak_delay)).await;
                return;
            }
            counter!(m::OUT, "decision" => output.outcome.label()).increment(1);
            match output.outcome {
                Outcome::Id => stats.id.fetch_add(1, Ordering::Relaxed),
                Outcome::Ood => stats.ood.fetch_add(1, Ordering::Relaxed),
                Outcome::Dead(_) => stats.dlq.fetch_add(1, Ordering::Relaxed),
            };
            histogram!(m::STAGE_SECONDS, "stage" => "total")
                .record(input.received().elapsed().as_secs_f64());
            let source = input.label();
            if let Err(e) = input.ack().await {
                // The output is stored; a redelivery is deduplicated by its Nats-Msg-Id.
                tracing::warn!(%source, error = %e, "ack failed after publishing");
            }
        }
    }
}

/// Receives from `rx` until `upstream_done` is cancelled (every producer has finished) and
/// the channel is empty. Ending on the producers' tracker rather than on the last sender
/// being dropped means a stray sender clone can never hold a shutdown open.
pub async fn recv_until<T>(
    rx: &mut mpsc::Receiver<T>,
    upstream_done: &CancellationToken,
) -> Option<T> {
    tokio::select! {
        biased;
        x = rx.recv() => x,
        _ = upstream_done.cancelled() => {
            rx.close();
            rx.recv().await
        }
    }
}

/// The sink stage: settles every routed input with at most `max_inflight_publishes`
/// publishes awaiting their PubAck; returns once upstream is done and everything is settled.
#[allow(clippy::too_many_arguments)]
pub async fn run<P: Publish, S: Settle>(
    mut rx: mpsc::Receiver<Routed<S>>,
    publisher: P,
    cfg: SinkConfig,
    stats: Arc<Stats>,
    breaker: Arc<Breaker>,
    upstream_done: CancellationToken,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(cfg.max_inflight_publishes.max(1)));
    let tasks = TaskTracker::new();
    let cfg = Arc::new(cfg);
    while let Some(item) = recv_until(&mut rx, &upstream_done).await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let (publisher, cfg, stats) = (publisher.clone(), cfg.clone(), stats.clone());
        let (breaker, shutdown) = (breaker.clone(), shutdown.clone());
        tasks.spawn(async move {
            deliver(&publisher, item, &cfg, &stats, &breaker, &shutdown).await;
            drop(slot);
        });
    }
    tasks.close();
    tasks.wait().await;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::stream::route::DeadKind;

    /// Everything that happened, in order.
    type Log = Arc<Mutex<Vec<String>>>;

    /// A publisher that fails its first `fail` attempts.
    #[derive(Clone)]
    struct Flaky {
        fail: Arc<Mutex<u32>>,
        log: Log,
    }

    impl Publish for Flaky {
        async fn publish(
            &self,
            subject: &str,
            _: &HeaderMap,
            _: &Bytes,
        ) -> Result<Stored, PublishError> {
            let mut left = self.fail.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                self.log.lock().unwrap().push(format!("fail {subject}"));
                return Err(PublishError::Failed {
                    subject: subject.into(),
                    reason: "no stream".into(),
                });
            }
            self.log.lock().unwrap().push(format!("stored {subject}"));
            Ok(Stored { duplicate: false })
        }
    }

    struct Input(u64, Log);

    impl Settle for Input {
        fn label(&self) -> String {
            format!("IN:{}", self.0)
        }
        fn received(&self) -> Instant {
            Instant::now()
        }
        async fn ack(self) -> Result<(), String> {
            self.1.lock().unwrap().push(format!("ack {}", self.0));
            Ok(())
        }
        async fn nak(self, delay: Option<Duration>) {
            self.1
                .lock()
                .unwrap()
                .push(format!("nak {} {delay:?}", self.0));
        }
    }

    fn output(subject: &str, outcome: Outcome) -> Output {
        Output {
            subject: subject.into(),
            headers: HeaderMap::new(),
            outcome,
        }
    }

    fn cfg(max_processing: Duration) -> SinkConfig {
        SinkConfig {
            retry: RetryPolicy {
                quick_retries: 1,
                base_delay: Duration::from_millis(100),
                max_delay: Duration::from_secs(5),
            },
            max_inflight_publishes: 4,
            nak_delay: Duration::from_secs(2),
            max_processing,
        }
    }

    fn breaker() -> (Breaker, Arc<AtomicBool>, CancellationToken) {
        let ready = Arc::new(AtomicBool::new(true));
        let shutdown = CancellationToken::new();
        (
            Breaker::new(ready.clone(), shutdown.clone()),
            ready,
            shutdown,
        )
    }

    fn setup(fail: u32) -> (Flaky, Log) {
        let log: Log = Arc::default();
        (
            Flaky {
                fail: Arc::new(Mutex::new(fail)),
                log: log.clone(),
            },
            log,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn acks_only_after_the_output_is_stored() {
        let (p, log) = setup(2);
        let stats = Stats::default();
        let item = Routed::Publish {
            input: Input(1, log.clone()),
            payload: Bytes::from_static(b"x"),
            output: output("o.id", Outcome::Id),
        };
        let (b, ready, shutdown) = breaker();
        deliver(
            &p,
            item,
            &cfg(Duration::from_secs(60)),
            &stats,
            &b,
            &shutdown,
        )
        .await;
        assert_eq!(
            *log.lock().unwrap(),
            ["fail o.id", "fail o.id", "stored o.id", "ack 1"]
        );
        // The second failure opened the breaker, the stored output closed it.
        assert!(!b.is_open() && ready.load(Ordering::SeqCst));
        assert_eq!(stats.id.load(Ordering::Relaxed), 1);
        assert_eq!(stats.naks.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unavailable_output_holds_the_input_until_stored_without_a_nak() {
        // 40 failures: far more than any fixed retry count, well within the processing cap.
        let (p, log) = setup(40);
        let stats = Stats::default();
        let item = Routed::Publish {
            input: Input(3, log.clone()),
            payload: Bytes::new(),
            output: output("o.ood", Outcome::Ood),
        };
        let (b, ready, shutdown) = breaker();
        let b = Arc::new(b);
        let task = tokio::spawn({
            let b = b.clone();
            async move {
                deliver(
                    &p,
                    item,
                    &cfg(Duration::from_secs(3600)),
                    &stats,
                    &b,
                    &shutdown,
                )
                .await;
                stats
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            b.is_open() && !ready.load(Ordering::SeqCst),
            "intake paused"
        );
        let stats = task.await.unwrap();
        let log = log.lock().unwrap().clone();
        assert_eq!(log.len(), 42, "{log:?}");
        assert_eq!(&log[40..], ["stored o.ood", "ack 3"]);
        assert!(
            !log.iter().any(|l| l.starts_with("nak")),
            "no delivery spent"
        );
        assert_eq!(stats.ood.load(Ordering::Relaxed), 1);
        assert!(!b.is_open() && ready.load(Ordering::SeqCst), "resumed");
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for (attempt, full) in [(1, 100), (2, 200), (3, 400), (7, 5000), (40, 5000)] {
            let d = backoff(base, max, attempt).as_millis() as u64;
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d} ms");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn naks_when_publishing_keeps_failing() {
        let (p, log) = setup(1000);
        let stats = Stats::default();
        let item = Routed::Publish {
            input: Input(2, log.clone()),
            payload: Bytes::new(),
            output: output("o.dlq", Outcome::Dead(DeadKind::Corrupt)),
        };
        // The processing cap passes while the output is still unavailable.
        let (b, _, shutdown) = breaker();
        deliver(
            &p,
            item,
            &cfg(Duration::from_secs(10)),
            &stats,
            &b,
            &shutdown,
        )
        .await;
        let log = log.lock().unwrap().clone();
        assert!(log.len() > 3, "{log:?}");
        assert_eq!(log.last().map(String::as_str), Some("nak 2 Some(2s)"));
        assert!(!log.iter().any(|l| l.starts_with("stored")));
        assert_eq!(stats.dlq.load(Ordering::Relaxed), 0);
        assert_eq!(stats.naks.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_stage_settles_everything_and_ends_when_upstream_is_done() {
        let (p, log) = setup(0);
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(8);
        let done = CancellationToken::new();
        let (b, _, shutdown) = breaker();
        let sink = tokio::spawn(run(
            rx,
            p,
            cfg(Duration::from_secs(60)),
            stats.clone(),
            Arc::new(b),
            done.clone(),
            shutdown,
        ));
        tx.send(Routed::Publish {
            input: Input(1, log.clone()),
            payload: Bytes::new(),
            output: output("o.ood", Outcome::Ood),
        })
        .await
        .unwrap();
        tx.send(Routed::Nak {
            input: Input(2, log.clone()),
            delay: None,
            reason: "shutdown",
        })
        .await
        .unwrap();
        // A sender is still alive, yet the stage ends once upstream reports done.
        done.cancel();
        tokio::time::timeout(Duration::from_secs(5), sink)
            .await
            .expect("sink ended")
            .unwrap();
        let log = log.lock().unwrap().clone();
        assert!(log.contains(&"stored o.ood".to_string()), "{log:?}");
        assert!(log.contains(&"ack 1".to_string()), "{log:?}");
        assert!(log.contains(&"nak 2 None".to_string()), "{log:?}");
        assert_eq!(stats.ood.load(Ordering::Relaxed), 1);
        drop(tx);
    }
}
