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

use super::inflight::InFlight;
use super::metrics as m;
use super::pipeline::Stats;
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
    async fn nak(self, delay: Option<Duration>) {
        InFlight::nak(self, delay).await
    }
}

/// Publishes, retrying up to `retries` times with exponential backoff (100 ms doubling).
/// The output keeps its `Nats-Msg-Id`, so an attempt that timed out after being stored is
/// deduplicated by the stream.
pub async fn publish_with_retry<P: Publish>(
    publisher: &P,
    output: &Output,
    payload: &Bytes,
    retries: u32,
) -> Result<Stored, PublishError> {
    let mut attempt = 0u32;
    loop {
        match publisher
            .publish(&output.subject, &output.headers, payload)
            .await
        {
            Ok(stored) => return Ok(stored),
            Err(e) if attempt >= retries => return Err(e),
            Err(e) => {
                tracing::warn!(subject = %output.subject, attempt, error = %e, "publish failed")
            }
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(100 * (1 << attempt.min(6)))).await;
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
    pub publish_retries: u32,
    /// Publishes awaiting their PubAck at once.
    pub max_inflight_publishes: usize,
    /// Redelivery delay after a failed publish.
    pub nak_delay: Duration,
}

/// Settles one input: publish then ack, or NAK.
pub async fn deliver<P: Publish, S: Settle>(
    publisher: &P,
    item: Routed<S>,
    cfg: &SinkConfig,
    stats: &Stats,
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
            input,
            payload,
            output,
        } => {
            let t0 = Instant::now();
            let published = publish_with_retry(publisher, &output, &payload, cfg.publish_retries)
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
pub async fn run<P: Publish, S: Settle>(
    mut rx: mpsc::Receiver<Routed<S>>,
    publisher: P,
    cfg: SinkConfig,
    stats: Arc<Stats>,
    upstream_done: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(cfg.max_inflight_publishes.max(1)));
    let tasks = TaskTracker::new();
    let cfg = Arc::new(cfg);
    while let Some(item) = recv_until(&mut rx, &upstream_done).await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let (publisher, cfg, stats) = (publisher.clone(), cfg.clone(), stats.clone());
        tasks.spawn(async move {
            deliver(&publisher, item, &cfg, &stats).await;
            drop(slot);
        });
    }
    tasks.close();
    tasks.wait().await;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

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

    fn cfg(retries: u32) -> SinkConfig {
        SinkConfig {
            publish_retries: retries,
            max_inflight_publishes: 4,
            nak_delay: Duration::from_secs(2),
        }
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
        deliver(&p, item, &cfg(3), &stats).await;
        assert_eq!(
            *log.lock().unwrap(),
            ["fail o.id", "fail o.id", "stored o.id", "ack 1"]
        );
        assert_eq!(stats.id.load(Ordering::Relaxed), 1);
        assert_eq!(stats.naks.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn naks_when_publishing_keeps_failing() {
        let (p, log) = setup(10);
        let stats = Stats::default();
        let item = Routed::Publish {
            input: Input(2, log.clone()),
            payload: Bytes::new(),
            output: output("o.dlq", Outcome::Dead(DeadKind::Corrupt)),
        };
        deliver(&p, item, &cfg(1), &stats).await;
        assert_eq!(
            *log.lock().unwrap(),
            ["fail o.dlq", "fail o.dlq", "nak 2 Some(2s)"]
        );
        assert_eq!(stats.dlq.load(Ordering::Relaxed), 0);
        assert_eq!(stats.naks.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_stage_settles_everything_and_ends_when_upstream_is_done() {
        let (p, log) = setup(0);
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(8);
        let done = CancellationToken::new();
        let sink = tokio::spawn(run(rx, p, cfg(0), stats.clone(), done.clone()));
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
