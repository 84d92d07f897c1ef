//! Wiring of the stages: pull → intake (claim check, decode) → batcher → encoder thread →
//! detector → router → sink, with housekeeping beside them. Bounded everywhere: a semaphore
//! caps inputs in flight, so back-pressure stops the pull instead of growing memory.
//!
//! One shutdown: a single [`CancellationToken`] that every stage watches, and a task tracker
//! per stage. On cancellation the pull stops; each later stage ends once the tracker of the
//! stage before it is empty and its own queue is drained, so no stray channel sender can
//! hold a shutdown open. The batch in the encoder finishes; what is still queued is NAKed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use metrics::{counter, gauge, histogram};
use ndarray::{Array2, Array4, s};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::adaptive_sync::{self, Shared};
use super::batcher::{self, BatchPolicy};
use super::breaker::Breaker;
use super::decode::{Decoded, Intake};
use super::housekeeping::{self, Health};
use super::infer::{Blame, EncoderHandle, InferError, blame};
use super::inflight::{ByteBudget, InFlight, Tracker};
use super::metrics::{self as m, Stats};
use super::pull::{self, PullConfig};
use super::route::{DeadKind, Output, Redelivery, Retry, Router};
use super::setup::Topology;
use super::sink::{self, JetStreamPublisher, RetryPolicy, Routed, SinkConfig};
use super::turns::{Turn, Turns};
use crate::detect::adaptive::{AdaptiveMemory, Admission, Admit, SharedMemory};
use crate::detect::detector::Detector;
use crate::model::{Encoder, Preprocessor};

/// Everything the pipeline needs to know, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub topology: Topology,
    pub pull_batch: usize,
    pub pull_expires: Duration,
    pub heartbeat: Duration,
    pub publish_timeout: Duration,
    pub publish_retries: u32,
    pub max_inflight_publishes: usize,
    pub batch_max: usize,
    pub batch_wait: Duration,
    pub decode_workers: usize,
    pub queue_depth: usize,
    /// Inputs received and not yet acked/NAKed, across all stages.
    pub max_in_flight: usize,
    pub drain_timeout: Duration,
    /// Delay before a transiently failed input is redelivered; it doubles with each
    /// delivery up to `nak_delay_max`.
    pub nak_delay: Duration,
    pub nak_delay_max: Duration,
    /// Longest wait between two attempts to store an output while the output is unavailable.
    pub retry_max_delay: Duration,
    /// How long an input may stay in flight (progress acks stop then; an output that still
    /// cannot be stored is given up and the input NAKed).
    pub max_processing: Duration,
    pub object_max_bytes: usize,
    /// Time limit for reading one claim-checked object.
    pub fetch_timeout: Duration,
    /// `input.object_after_routing = "delete"`.
    pub delete_objects: bool,
    /// `input.object_store_buckets`: the only buckets a claim check may name.
    pub allowed_buckets: Vec<String>,
    /// `input.max_bytes_in_flight`.
    pub max_bytes_in_flight: usize,
    /// The adaptive detector's memory (`detector.adaptive.enabled`).
    /// Shared with `/info`, which reads its live counters.
    pub adaptive: Option<SharedMemory>,
    /// `detector.adaptive.sync = "shared"`: the output prefix its stream's subjects start with.
    pub adaptive_shared_prefix: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    AdaptiveSync(#[from] adaptive_sync::SyncError),
    #[error("cannot start the encoder thread: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("the detector has no threshold: the daemon cannot route without one")]
    NoThreshold,
}

/// Batches waiting for or inside the encoder at once: one encoding, one ready.
const BATCHES_IN_FLIGHT: usize = 2;

/// Runs until `shutdown` is cancelled, then drains within `cfg.drain_timeout`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: async_nats::Client,
    consumer: jetstream::consumer::PullConsumer,
    encoder: Box<dyn Encoder>,
    pre: Preprocessor,
    detector: Detector,
    cfg: PipelineConfig,
    ready: Arc<AtomicBool>,
    health: Health,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let js = jetstream::new(client.clone());
    let threshold = detector.threshold().ok_or(PipelineError::NoThreshold)?;
    let info = encoder.info().clone();
    gauge!(m::PROVIDER, "provider" => info.provider.clone()).set(1.0);
    let router = Arc::new(
        Router::new(
            cfg.topology.output_subjects.clone(),
            detector.bank().version(),
            &info.fingerprint,
            detector.method().as_str(),
            threshold.value,
        )
        .with_max_payload(client.server_info().max_payload)
        .with_redelivery(Redelivery {
            nak_delay: cfg.nak_delay,
            nak_delay_max: cfg.nak_delay_max,
            max_deliver: cfg.topology.max_deliver,
        }),
    );
    let breaker = Arc::new(Breaker::new(ready.clone(), shutdown.clone()));
    let tracker = Arc::new(Tracker::default());
    let (to_sink, sink_rx) = mpsc::channel::<Routed<InFlight>>(cfg.batch_max.max(1) * 4);
    let (to_batcher, batcher_rx) = mpsc::channel::<Decoded>(cfg.queue_depth.max(1));
    let queued = Arc::new(AtomicUsize::new(0));
    let size = pre.size() as usize;
    let normalizer = pre.clone();
    let budget = Arc::new(ByteBudget::new(cfg.max_bytes_in_flight));
    let intake = Arc::new(Intake {
        js: js.clone(),
        pre,
        decode_slots: Arc::new(Semaphore::new(cfg.decode_workers.max(1))),
        router: router.clone(),
        to_batcher,
        to_sink: to_sink.clone(),
        queued: queued.clone(),
        object_max_bytes: cfg.object_max_bytes,
        fetch_timeout: cfg.fetch_timeout,
        delete_objects: cfg.delete_objects,
        allowed_buckets: cfg.allowed_buckets.clone(),
        budget: budget.clone(),
    });
    let (encoder, encoder_thread) = EncoderHandle::spawn(encoder, 1)?;
    let encoder_alive = encoder.alive_flag();
    let publisher = JetStreamPublisher {
        js: js.clone(),
        timeout: cfg.publish_timeout,
    };

    let (intake_tasks, core_tasks, sink_tasks, chores) = (
        TaskTracker::new(),
        TaskTracker::new(),
        TaskTracker::new(),
        TaskTracker::new(),
    );
    let (intake_done, core_done) = (CancellationToken::new(), CancellationToken::new());
    let retry = RetryPolicy {
        quick_retries: cfg.publish_retries,
        base_delay: Duration::from_millis(100),
        max_delay: cfg.retry_max_delay,
    };
    let adaptive_mem = cfg.adaptive.clone();
    let shared = match (&adaptive_mem, &cfg.adaptive_shared_prefix) {
        (Some(mem), Some(prefix)) => Some(
            adaptive_sync::start(
                js.clone(),
                prefix,
                detector.bank().version(),
                mem.clone(),
                shutdown.clone(),
            )
            .await?,
        ),
        _ => None,
    };
    sink_tasks.spawn(sink::run(
        sink_rx,
        publisher.clone(),
        SinkConfig {
            retry: retry.clone(),
            max_inflight_publishes: cfg.max_inflight_publishes,
            nak_delay: cfg.nak_delay,
            max_processing: cfg.max_processing,
        },
        stats.clone(),
        breaker.clone(),
        core_done.clone(),
        shutdown.clone(),
    ));
    core_tasks.spawn(
        Core {
            encoder,
            detector: Arc::new(detector),
            adaptive: adaptive_mem,
            shared,
            router: router.clone(),
            to_sink,
            pre: normalizer,
            queued,
            size,
            tasks: core_tasks.clone(),
            shutdown: shutdown.clone(),
        }
        .run(
            batcher_rx,
            BatchPolicy {
                max_size: cfg.batch_max,
                max_wait: cfg.batch_wait,
            },
            intake_done.clone(),
        ),
    );
    intake_tasks.spawn(pull::run(
        consumer.clone(),
        cfg.topology.clone(),
        PullConfig {
            batch: cfg.pull_batch,
            expires: cfg.pull_expires,
            heartbeat: cfg.heartbeat,
            // A message larger than a pull's max_bytes is never delivered to it.
            max_bytes: budget
                .total()
                .max(client.server_info().max_payload + (64 << 10)),
        },
        intake,
        tracker.clone(),
        breaker.clone(),
        Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
        budget.clone(),
        stats.clone(),
        intake_tasks.clone(),
        shutdown.clone(),
    ));
    let t = &cfg.topology;
    chores.spawn(housekeeping::progress_acks(
        js.clone(),
        tracker.clone(),
        t.ack_wait,
        cfg.max_processing,
        shutdown.clone(),
    ));
    chores.spawn(housekeeping::pending_gauge(consumer, shutdown.clone()));
    chores.spawn(housekeeping::byte_gauges(budget, shutdown.clone()));
    chores.spawn(housekeeping::watchdog(
        encoder_alive,
        stats.clone(),
        tracker.clone(),
        breaker.clone(),
        // Twice the ack wait without any input finishing, while work is in flight.
        t.ack_wait * 2,
        health,
        shutdown.clone(),
    ));
    chores.spawn(housekeeping::max_deliveries(
        client.clone(),
        js.clone(),
        t.input_stream.clone(),
        t.durable.clone(),
        router,
        publisher,
        retry,
        breaker,
        shutdown.clone(),
    ));
    chores.close();
    ready.store(true, Ordering::SeqCst);
    gauge!(m::READY).set(1.0);
    tracing::info!("pipeline running");

    shutdown.cancelled().await;
    tracing::info!(
        in_flight = tracker.len(),
        "shutdown: stop pulling, finish the batch in flight, NAK the rest"
    );
    ready.store(false, Ordering::SeqCst);
    gauge!(m::READY).set(0.0);
    let drain = async {
        intake_tasks.close();
        intake_tasks.wait().await;
        intake_done.cancel();
        core_tasks.close();
        core_tasks.wait().await;
        core_done.cancel();
        sink_tasks.close();
        sink_tasks.wait().await;
    };
    if tokio::time::timeout(cfg.drain_timeout, drain)
        .await
        .is_err()
    {
        let left = tracker.take_all();
        tracing::warn!(
            count = left.len(),
            "drain timeout: NAKing what is still in flight"
        );
        for reply in left {
            let acker = jetstream::message::Acker::new(js.clone(), Some(reply));
            let _ =
                tokio::time::timeout(Duration::from_secs(1), acker.ack_with(AckKind::Nak(None)))
                    .await;
        }
    } else {
        // Every encoder handle is gone with the core stage: the thread ends after its batch.
        let _ = tokio::task::spawn_blocking(move || encoder_thread.join()).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), chores.wait()).await;
    // Bounded: with the server gone a flush would wait for a reconnect that may never come.
    if tokio::time::timeout(Duration::from_secs(5), client.flush())
        .await
        .is_err()
    {
        tracing::warn!(
            "flush timed out (NATS unreachable); unacked inputs will be redelivered after ack_wait"
        );
    }
    tracing::info!("drained");
    Ok(())
}

/// Applies the adaptive detector to a scored batch (in input order) and updates its metrics.
/// A failure leaves the static verdicts in place, with a warning: the memory is an
/// improvement, never a reason to stop routing.
/// With `Admit::Report` (a shared memory) the admitted images are returned, by batch index,
/// for publishing.
fn adapt(
    mem: &std::sync::Mutex<AdaptiveMemory>,
    mode: Admit,
    detector: &Detector,
    emb: &Array2<f32>,
    verdicts: &mut [crate::detect::detector::Verdict],
) -> Vec<(usize, Admission)> {
    let mut admitted = Vec::new();
    let Some(threshold) = detector.threshold() else {
        return admitted;
    };
    let statics: Vec<(f64, u32)> = verdicts
        .iter()
        .map(|v| (v.score, u32::try_from(v.top_id).unwrap_or(u32::MAX)))
        .collect();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let ts = vec![now_ms; statics.len()];
    let Ok(mut memory) = mem.lock() else {
        tracing::warn!("adaptive memory unavailable (a scorer panicked); static scores used");
        return admitted;
    };
    let before = memory.stats();
    match memory.score_batch(emb.view(), &statics, &ts, mode) {
        Ok(out) => {
            for (i, (v, a)) in verdicts.iter_mut().zip(out).enumerate() {
                if a.penalty > 0.0 {
                    counter!(m::ADAPTIVE_PENALISED).increment(1);
                }
                if a.admitted && mode == Admit::Report {
                    admitted.push((
                        i,
                        Admission {
                            embedding: emb.row(i).to_vec(),
                            bucket: statics[i].1,
                            score: statics[i].0,
                            ts_ms: now_ms,
                        },
                    ));
                }
                v.adapt(a, threshold.value);
            }
        }
        Err(e) => tracing::warn!(error = %e, "adaptive detector failed; static scores used"),
    }
    let after = memory.stats();
    gauge!(m::ADAPTIVE_ENTRIES).set(after.entries as f64);
    counter!(m::ADAPTIVE_ADMISSIONS).increment(after.admissions - before.admissions);
    counter!(m::ADAPTIVE_EVICTIONS).increment(after.evictions - before.evictions);
    counter!(m::ADAPTIVE_RATE_LIMITED).increment(after.rate_limited - before.rate_limited);
    admitted
}

/// The core stage: batches decoded images, runs them through the encoder thread, asks the
/// detector, routes the verdicts to the sink. Up to [`BATCHES_IN_FLIGHT`] batches overlap, so
/// scoring one batch runs while the encoder works on the next.
struct Core {
    encoder: EncoderHandle,
    detector: Arc<Detector>,
    /// Batches pass through it one at a time, in the order they were formed ([`Turn`]): that
    /// order is the stream the memory sees.
    adaptive: Option<SharedMemory>,
    /// Set when the memory is shared: admissions are published, not folded here.
    shared: Option<Arc<Shared>>,
    router: Arc<Router>,
    to_sink: mpsc::Sender<Routed<InFlight>>,
    /// Normalises the queued u8 crops into the batch tensor.
    pre: Preprocessor,
    queued: Arc<AtomicUsize>,
    size: usize,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Core {
    async fn run(
        self,
        mut rx: mpsc::Receiver<Decoded>,
        policy: BatchPolicy,
        intake_done: CancellationToken,
    ) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        let mut turns = Turns::new();
        while let Some(mut batch) = batcher::next_batch(&mut rx, policy, &intake_done).await {
            this.queued.fetch_sub(batch.len(), Ordering::Relaxed);
            gauge!(m::QUEUE_DEPTH).set(this.queued.load(Ordering::Relaxed) as f64);
            if this.shutdown.is_cancelled() {
                // Shutting down: what is still queued goes back to the server for another worker.
                this.nak_all(batch, None, "shutdown").await;
                continue;
            }
            histogram!(m::BATCH_SIZE).record(batch.len() as f64);
            let now = Instant::now();
            for item in &batch {
                histogram!(m::STAGE_SECONDS, "stage" => "queue")
                    .record(now.duration_since(item.queued_at).as_secs_f64());
            }
            let tensor = batcher::assemble(
                batch.iter().map(|d| d.crop.as_slice()),
                this.size,
                |hwc, out| this.pre.normalize_hwc_into(hwc, out),
            );
            for item in &mut batch {
                // The crop's memory goes back now; the batch tensor holds the image.
                item.crop = Vec::new();
            }
            let tensor = match tensor {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "cannot assemble the batch; NAK");
                    this.retry_all(batch, "batch", &e.to_string()).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let core = this.clone();
            // The adaptive memory sees batches in the order they were formed.
            let turn = this.adaptive.is_some().then(|| turns.take());
            this.tasks.spawn(async move {
                core.infer_and_route(batch, tensor, turn).await;
                drop(slot);
            });
        }
        tracing::debug!("batcher stopped");
    }

    async fn nak_all(&self, batch: Vec<Decoded>, delay: Option<Duration>, reason: &'static str) {
        for item in batch {
            let _ = self
                .to_sink
                .send(Routed::Nak {
                    input: item.input,
                    delay,
                    reason,
                })
                .await;
        }
    }

    /// A failure of the encoder or scorer on a batch: each input is NAKed with a delay that
    /// grows with its deliveries, or dead-lettered on its last delivery.
    async fn retry_all(&self, batch: Vec<Decoded>, reason: &'static str, why: &str) {
        for item in batch {
            let routed = match self.router.after_transient_failure(
                &item.input.source,
                item.headers.as_ref(),
                why,
            ) {
                Retry::Nak(delay) => Routed::Nak {
                    input: item.input,
                    delay: Some(delay),
                    reason,
                },
                Retry::Dead(output) => Routed::Publish {
                    input: item.input,
                    payload: item.payload,
                    output,
                },
            };
            let _ = self.to_sink.send(routed).await;
        }
    }

    async fn infer_and_route(
        &self,
        batch: Vec<Decoded>,
        tensor: ndarray::Array4<f32>,
        turn: Option<Turn>,
    ) {
        let n = batch.len();
        let t0 = Instant::now();
        let emb = self.encoder.embed(tensor).await;
        histogram!(m::STAGE_SECONDS, "stage" => "infer").record(t0.elapsed().as_secs_f64());
        match emb {
            Ok(e) => self.score_and_route(batch, e, turn).await,
            Err(InferError::Encoder { error, images }) if n > 1 => {
                tracing::warn!(error = %error, batch = n, "encoder failed on a batch; retrying its images one by one");
                self.isolate_encoder_failure(batch, images, turn).await
            }
            Err(e) => {
                tracing::error!(error = %e, batch = n, "encoder failed; NAKing the batch");
                self.retry_all(batch, "encoder", &e.to_string()).await
            }
        }
        tracing::debug!(
            batch = n,
            ms = t0.elapsed().as_millis() as u64,
            "batch routed"
        );
    }

    /// Poison isolation: each image of a batch the encoder failed on is encoded alone. Images
    /// that work are routed on this delivery; one that fails alone, while others work, is
    /// dead-lettered (`encoder`). If every image fails alone nothing points at an input, and
    /// all are retried.
    async fn isolate_encoder_failure(
        &self,
        batch: Vec<Decoded>,
        images: Array4<f32>,
        mut turn: Option<Turn>,
    ) {
        let mut alone = Vec::with_capacity(batch.len());
        for i in 0..batch.len() {
            let one = images.slice(s![i..i + 1, .., .., ..]).to_owned();
            alone.push(self.encoder.embed(one).await.map_err(|e| e.to_string()));
        }
        match blame(alone) {
            Blame::Nobody(errors) => {
                let why = errors.first().cloned().unwrap_or_default();
                self.retry_all(batch, "encoder", &why).await
            }
            Blame::Members(results) => {
                // The batch's turn covers its images, scored one after another.
                if let Some(t) = &mut turn {
                    t.wait().await;
                }
                for (item, r) in batch.into_iter().zip(results) {
                    match r {
                        Ok(e) => self.score_and_route(vec![item], e, None).await,
                        Err(why) => {
                            self.dead_letter(
                                item,
                                DeadKind::Encoder,
                                &format!("the encoder fails on this image alone: {why}"),
                            )
                            .await
                        }
                    }
                }
            }
        }
    }

    async fn dead_letter(&self, item: Decoded, kind: DeadKind, why: &str) {
        tracing::info!(source = %item.input.source.label(), %kind, error = why, "dead-lettering input");
        counter!(m::DLQ, "kind" => kind.as_str()).increment(1);
        let output = self
            .router
            .dead(&item.input.source, item.headers.as_ref(), kind, why);
        self.publish(item, output).await;
    }

    /// Sends `output` for `item` to the sink, after the `max_payload` check.
    async fn publish(&self, item: Decoded, output: Output) {
        let (output, payload) = self.router.fit(
            &item.input.source,
            item.headers.as_ref(),
            output,
            item.payload,
        );
        let _ = self
            .to_sink
            .send(Routed::Publish {
                input: item.input,
                payload,
                output,
            })
            .await;
    }

    /// Scores and routes a batch; a scorer failure is isolated the same way as an encoder
    /// failure (kind `score`). The adaptive step waits for `turn` (the batches formed before
    /// this one) and ends it.
    async fn score_and_route(&self, batch: Vec<Decoded>, emb: Array2<f32>, mut turn: Option<Turn>) {
        let t1 = Instant::now();
        // Scoring and explanations are CPU work: off the async workers.
        let detector = self.detector.clone();
        let adaptive = self.adaptive.clone();
        let mode = if self.shared.is_some() {
            Admit::Report
        } else {
            Admit::Fold
        };
        let n = batch.len();
        let scored = tokio::task::spawn_blocking(move || {
            let mut admitted = Vec::new();
            let r = match detector.verdicts(emb.view()) {
                Ok(mut v) => {
                    if let Some(mem) = &adaptive {
                        if let Some(t) = &mut turn {
                            t.wait_blocking();
                        }
                        admitted = adapt(mem, mode, &detector, &emb, &mut v);
                    }
                    // The next batch may adapt now.
                    drop(turn);
                    v.into_iter().map(Ok).collect::<Vec<_>>()
                }
                // Poison isolation: score each image alone.
                Err(_) if n > 1 => (0..n)
                    .map(|i| {
                        detector
                            .verdicts(emb.slice(s![i..i + 1, ..]))
                            .map_err(|e| e.to_string())
                            .and_then(|mut v| v.pop().ok_or_else(|| "no verdict".to_string()))
                    })
                    .collect(),
                Err(e) => vec![Err(e.to_string())],
            };
            (r, admitted)
        })
        .await;
        let (results, admitted) = match scored {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "scoring task failed; NAKing the batch");
                return self.retry_all(batch, "score", &e.to_string()).await;
            }
        };
        let results = match blame(results) {
            Blame::Nobody(errors) => {
                let why = errors.first().cloned().unwrap_or_default();
                tracing::error!(error = %why, "scoring failed; NAKing the batch");
                return self.retry_all(batch, "score", &why).await;
            }
            Blame::Members(r) => r,
        };
        // A shared memory learns of admissions through its log; publishing is off the
        // routing path (a lost admission costs a little learning, never an output).
        if let Some(shared) = &self.shared {
            for (i, a) in admitted {
                let Some(item) = batch.get(i) else { continue };
                let key = format!(
                    "{}:{}",
                    item.input.source.stream, item.input.source.sequence
                );
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = shared.publish(&a, &key).await {
                        tracing::warn!(error = %e, "adaptive admission not published");
                    }
                });
            }
        }
        for (item, v) in batch.into_iter().zip(results) {
            let v = match v {
                Ok(v) => v,
                Err(why) => {
                    self.dead_letter(
                        item,
                        DeadKind::Score,
                        &format!("the scorer fails on this image alone: {why}"),
                    )
                    .await;
                    continue;
                }
            };
            histogram!(m::SCORE).record(v.score);
            let output = self
                .router
                .verdict(&item.input.source, item.headers.as_ref(), &v);
            self.publish(item, output).await;
        }
        histogram!(m::STAGE_SECONDS, "stage" => "score").record(t1.elapsed().as_secs_f64());
    }
}
