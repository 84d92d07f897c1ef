//! The pull stage: fetch messages from the durable consumer, one in-flight slot each (the
//! back-pressure that bounds everything downstream), and hand each to the intake stage.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use metrics::{counter, gauge};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::breaker::Breaker;
use super::decode::Intake;
use super::inflight::{ByteBudget, InFlight, Source, Tracker};
use super::metrics as m;
use super::metrics::Stats;
use super::setup::{self, SetupError, Topology};

#[derive(Debug, Clone)]
pub struct PullConfig {
    pub batch: usize,
    pub expires: Duration,
    pub heartbeat: Duration,
    /// Most bytes one pull request may bring (at least the server's `max_payload`, or a larger
    /// message could never be delivered).
    pub max_bytes: usize,
}

/// Pulls until `shutdown` is cancelled; each input's intake runs on `intake_tasks`. When
/// pulling cannot start (the consumer or the input stream was deleted) the topology is
/// declared again, and the input stream's identity re-read, so inputs of a recreated stream
/// never share output ids with the old one's.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut consumer: jetstream::consumer::PullConsumer,
    topology: Topology,
    cfg: PullConfig,
    intake: Arc<Intake>,
    tracker: Arc<Tracker>,
    breaker: Arc<Breaker>,
    in_flight: Arc<Semaphore>,
    budget: Arc<ByteBudget>,
    stats: Arc<Stats>,
    intake_tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let js = intake.js.clone();
    let mut backoff = Duration::from_millis(100);
    let mut epoch: Option<String> = None;
    let mut redeclare = false;
    'outer: while !shutdown.is_cancelled() {
        let started = async {
            if redeclare {
                consumer = setup::declare(&js, &topology).await?;
                tracing::info!(stream = %topology.input_stream, "input stream and consumer declared again");
            }
            let e = setup::input_epoch(&js, &topology.input_stream).await?;
            let stream = consumer
                .stream()
                .max_messages_per_batch(cfg.batch.max(1))
                .max_bytes_per_batch(cfg.max_bytes)
                .expires(cfg.expires)
                .heartbeat(cfg.heartbeat)
                .messages()
                .await
                .map_err(|e| SetupError::JetStream {
                    what: format!("pulling from consumer {}", topology.durable),
                    reason: e.to_string(),
                })?;
            Ok::<_, SetupError>((e, stream))
        };
        let mut stream = match started.await {
            Ok((e, s)) => {
                if epoch.as_ref().is_some_and(|old| *old != e) {
                    tracing::warn!(stream = %topology.input_stream, "the input stream was recreated (new identity); its sequences restart");
                }
                epoch = Some(e);
                redeclare = false;
                s
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot start pulling; declaring the topology again");
                redeclare = true;
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let epoch = epoch.clone().unwrap_or_default();
        loop {
            if breaker.is_open() {
                // The output is unavailable: take nothing new until a publish succeeds. The
                // pull is dropped so the server stops sending; messages it had sent and this
                // worker had not taken are redelivered after ack_wait.
                tracing::info!("output unavailable: pull paused");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = breaker.closed() => {}
                }
                break;
            }
            // Back-pressure: take a slot before pulling the next message.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                p = in_flight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                n = stream.next() => n,
            };
            match next {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pull stream error; re-creating the pull");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    break;
                }
                Some(Ok(message)) => {
                    backoff = Duration::from_millis(100);
                    let Some(reply) = message.message.reply.clone() else {
                        tracing::error!("JetStream message without a reply subject; cannot ack it");
                        continue;
                    };
                    let source = match message.info() {
                        Ok(i) => Source {
                            stream: i.stream.to_string(),
                            epoch: epoch.clone(),
                            sequence: i.stream_sequence,
                            delivered: i.delivered,
                        },
                        Err(e) => {
                            tracing::error!(error = %e, "unparsable ack subject");
                            continue;
                        }
                    };
                    counter!(m::IN).increment(1);
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    gauge!(m::IN_FLIGHT).set(tracker.len() as f64 + 1.0);
                    let jm = message.message;
                    // Registered first, so progress acks keep it alive while it waits.
                    let mut input =
                        InFlight::new(intake.js.clone(), reply, source, tracker.clone(), permit);
                    // Back-pressure on bytes: pull nothing more until this payload fits.
                    let bytes = tokio::select! {
                        _ = shutdown.cancelled() => break 'outer,
                        b = budget.reserve(jm.payload.len()) => match b { Some(b) => b, None => break 'outer },
                    };
                    input.hold_bytes(bytes);
                    intake_tasks.spawn(intake.clone().process(input, jm.payload, jm.headers));
                }
            }
        }
    }
    tracing::debug!("pull loop stopped");
}
