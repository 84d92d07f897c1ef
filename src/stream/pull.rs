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

use super::decode::Intake;
use super::inflight::{InFlight, Source, Tracker};
use super::metrics as m;
use super::pipeline::Stats;

#[derive(Debug, Clone)]
pub struct PullConfig {
    pub batch: usize,
    pub expires: Duration,
    pub heartbeat: Duration,
}

/// Pulls until `shutdown` is cancelled; each input's intake runs on `intake_tasks`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    consumer: jetstream::consumer::PullConsumer,
    cfg: PullConfig,
    intake: Arc<Intake>,
    tracker: Arc<Tracker>,
    in_flight: Arc<Semaphore>,
    stats: Arc<Stats>,
    intake_tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    'outer: while !shutdown.is_cancelled() {
        let stream = consumer
            .stream()
            .max_messages_per_batch(cfg.batch.max(1))
            .expires(cfg.expires)
            .heartbeat(cfg.heartbeat)
            .messages()
            .await;
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot start pulling; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        loop {
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
                    let input =
                        InFlight::new(intake.js.clone(), reply, source, tracker.clone(), permit);
                    let jm = message.message;
                    intake_tasks.spawn(intake.clone().process(input, jm.payload, jm.headers));
                }
            }
        }
    }
    tracing::debug!("pull loop stopped");
}
