//! The pipeline: pull → (claim check) → decode pool → dynamic batcher + encoder thread →
//! scorer → publish (awaited PubAck) → double ack. Bounded everywhere: a semaphore caps inputs
//! in flight, so back-pressure stops the pull loop instead of growing memory.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::StreamExt;
use metrics::{counter, gauge, histogram};
use ndarray::{Array4, s};
use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, mpsc, watch};

use super::inflight::{InFlight, Source, Tracker};
use super::message::{self as msg, Payload};
use super::metrics as m;
use super::setup::Topology;
use crate::detect::bank::{Bank, BankIndex};
use crate::detect::method::{Method, ScoreParams};
use crate::detect::scorer::Scorer;
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
    /// Delay before a transiently failed input is redelivered.
    pub nak_delay: Duration,
    pub object_max_bytes: usize,
}

/// The scoring side: bank, scorer, index and the routing threshold.
pub struct Detector {
    pub bank: Bank,
    pub scorer: Scorer,
    pub index: BankIndex,
    pub method: Method,
    pub params: ScoreParams,
    pub threshold: f64,
    pub top_k: usize,
    pub model_fingerprint: String,
}

/// Counters a caller (tests, `bench`) can read after the run.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicUsize,
    pub id: AtomicUsize,
    pub ood: AtomicUsize,
    pub dlq: AtomicUsize,
    pub naks: AtomicUsize,
}

/// A decoded image waiting for the encoder.
struct Decoded {
    inflight: InFlight,
    payload: Bytes,
    headers: Option<HeaderMap>,
    tensor: Vec<f32>,
    queued_at: Instant,
}

enum Action {
    Publish {
        subject: String,
        headers: HeaderMap,
        outcome: &'static str,
    },
    Nak {
        delay: Option<Duration>,
        reason: &'static str,
    },
}

/// A decision on its way out.
struct Routed {
    inflight: InFlight,
    payload: Bytes,
    action: Action,
}

/// Reusable image tensors: decoding writes into a pooled buffer, the batcher copies it into
/// the batch tensor and returns it, so steady state allocates nothing per image.
struct BufPool {
    len: usize,
    free: Mutex<Vec<Vec<f32>>>,
}

impl BufPool {
    fn take(&self) -> Vec<f32> {
        self.free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_else(|| vec![0f32; self.len])
    }
    fn give(&self, v: Vec<f32>) {
        if let Ok(mut f) = self.free.lock()
            && f.len() < 1024
        {
            f.push(v);
        }
    }
}

struct Ctx {
    js: jetstream::Context,
    cfg: PipelineConfig,
    pre: Preprocessor,
    pool: BufPool,
    decode_sem: Arc<Semaphore>,
    tracker: Arc<Tracker>,
    stats: Arc<Stats>,
    sink_tx: mpsc::Sender<Routed>,
    bank_version: String,
    model_fingerprint: String,
    draining: Arc<AtomicBool>,
    queued: Arc<AtomicUsize>,
}

#[allow(clippy::too_many_arguments)]
/// Runs until `shutdown` resolves, then drains: stops pulling, finishes the batch in flight,
/// NAKs what is still buffered, and returns within `drain_timeout`.
pub async fn run(
    client: async_nats::Client,
    consumer: jetstream::consumer::PullConsumer,
    encoder: Box<dyn Encoder>,
    pre: Preprocessor,
    detector: Detector,
    cfg: PipelineConfig,
    ready: Arc<AtomicBool>,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let tracker = Arc::new(Tracker::default());
    let (sink_tx, sink_rx) = mpsc::channel::<Routed>(cfg.batch_max.max(1) * 4);
    let (batch_tx, batch_rx) = sync_channel::<Decoded>(cfg.queue_depth.max(1));
    let draining = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(AtomicUsize::new(0));
    let detector_ids = (
        detector.bank.version().to_string(),
        detector.model_fingerprint.clone(),
    );
    let ctx = Arc::new(Ctx {
        js: js.clone(),
        pool: BufPool {
            len: pre.tensor_len(),
            free: Mutex::new(Vec::new()),
        },
        pre,
        decode_sem: Arc::new(Semaphore::new(cfg.decode_workers.max(1))),
        tracker: tracker.clone(),
        stats: stats.clone(),
        sink_tx: sink_tx.clone(),
        bank_version: detector.bank.version().to_string(),
        model_fingerprint: detector.model_fingerprint.clone(),
        draining: draining.clone(),
        queued: queued.clone(),
        cfg: cfg.clone(),
    });
    gauge!(m::PROVIDER, "provider" => encoder.info().provider.clone()).set(1.0);

    // The encoder thread owns the ONNX session (Session::run takes &mut self).
    let infer_ctx = ctx.clone();
    let infer = std::thread::Builder::new()
        .name("oodgate-encoder".into())
        .spawn(move || inference_loop(batch_rx, encoder, detector, infer_ctx))?;
    drop(sink_tx);
    let sink = tokio::spawn(sink_loop(
        js.clone(),
        sink_rx,
        ctx.cfg.clone(),
        stats.clone(),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
    let pull = tokio::spawn(pull_loop(
        consumer.clone(),
        ctx.clone(),
        batch_tx,
        in_flight,
        stop_rx.clone(),
    ));
    let ticker = tokio::spawn(progress_loop(
        js.clone(),
        tracker.clone(),
        cfg.topology.ack_wait,
        stop_rx.clone(),
    ));
    let pending = tokio::spawn(pending_loop(consumer, stop_rx.clone()));
    let advisories = tokio::spawn(max_deliveries_loop(
        client.clone(),
        js.clone(),
        cfg.clone(),
        detector_ids.0.clone(),
        detector_ids.1.clone(),
        stop_rx,
    ));
    ready.store(true, Ordering::SeqCst);
    gauge!(m::READY).set(1.0);
    tracing::info!("pipeline running");

    shutdown.await;
    tracing::info!(
        in_flight = tracker.len(),
        "shutdown: stop pulling, finish the batch in flight, NAK the rest"
    );
    ready.store(false, Ordering::SeqCst);
    gauge!(m::READY).set(0.0);
    draining.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    drop(ctx);
    let drained = tokio::time::timeout(cfg.drain_timeout, async {
        let _ = pull.await;
        // The encoder thread exits once every sender of the batch channel is gone.
        let _ = tokio::task::spawn_blocking(move || infer.join()).await;
        let _ = sink.await;
    })
    .await;
    if drained.is_err() {
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
    }
    ticker.abort();
    pending.abort();
    advisories.abort();
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

async fn pull_loop(
    consumer: jetstream::consumer::PullConsumer,
    ctx: Arc<Ctx>,
    batch_tx: SyncSender<Decoded>,
    in_flight: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    'outer: loop {
        if *stop.borrow() {
            break;
        }
        let stream = consumer
            .stream()
            .max_messages_per_batch(ctx.cfg.pull_batch.max(1))
            .expires(ctx.cfg.pull_expires)
            .heartbeat(ctx.cfg.heartbeat)
            .messages()
            .await;
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot start pulling; retrying");
                tokio::select! {
                    _ = stop.wait_for(|v| *v) => break 'outer,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        loop {
            // Back-pressure: take a slot before pulling the next message.
            let permit = tokio::select! {
                _ = stop.wait_for(|v| *v) => break 'outer,
                p = in_flight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
            };
            let next = tokio::select! {
                _ = stop.wait_for(|v| *v) => break 'outer,
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
                    ctx.stats.received.fetch_add(1, Ordering::Relaxed);
                    gauge!(m::IN_FLIGHT).set(ctx.tracker.len() as f64 + 1.0);
                    let inflight =
                        InFlight::new(ctx.js.clone(), reply, source, ctx.tracker.clone(), permit);
                    let jm = message.message;
                    tokio::spawn(prepare(
                        ctx.clone(),
                        inflight,
                        jm.payload,
                        jm.headers,
                        batch_tx.clone(),
                    ));
                }
            }
        }
    }
    tracing::debug!("pull loop stopped");
}

/// Resolves the payload (inline or claim check) and decodes it on the blocking pool.
async fn prepare(
    ctx: Arc<Ctx>,
    inflight: InFlight,
    payload: Bytes,
    headers: Option<HeaderMap>,
    batch_tx: SyncSender<Decoded>,
) {
    let started = Instant::now();
    let image = match msg::classify(&payload) {
        Err(e) => {
            return dead_letter(
                &ctx,
                inflight,
                payload,
                headers.as_ref(),
                "bad_envelope",
                &e.to_string(),
            )
            .await;
        }
        Ok(Payload::Image) => payload.clone(),
        Ok(Payload::Envelope(env)) => match fetch_object(&ctx, &env.object).await {
            Ok(bytes) => {
                histogram!(m::STAGE_SECONDS, "stage" => "fetch")
                    .record(started.elapsed().as_secs_f64());
                bytes
            }
            Err(FetchError::Permanent(kind, why)) => {
                return dead_letter(&ctx, inflight, payload, headers.as_ref(), kind, &why).await;
            }
            Err(FetchError::Transient(why)) => {
                tracing::warn!(source = %inflight.source.label(), %why, "object fetch failed; NAK");
                return route(
                    &ctx,
                    inflight,
                    payload,
                    Action::Nak {
                        delay: Some(ctx.cfg.nak_delay),
                        reason: "fetch",
                    },
                )
                .await;
            }
        },
    };
    let Ok(_decode_slot) = ctx.decode_sem.clone().acquire_owned().await else {
        return;
    };
    let c2 = ctx.clone();
    let joined = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let mut buf = c2.pool.take();
        let r = c2.pre.preprocess_into(&image, &mut buf);
        histogram!(m::STAGE_SECONDS, "stage" => "decode").record(t0.elapsed().as_secs_f64());
        match r {
            Ok(()) => {
                c2.queued.fetch_add(1, Ordering::Relaxed);
                let item = Decoded {
                    inflight,
                    payload,
                    headers,
                    tensor: buf,
                    queued_at: Instant::now(),
                };
                // Blocks this decode thread while the encoder queue is full.
                match batch_tx.send(item) {
                    Ok(()) => None,
                    Err(back) => {
                        c2.queued.fetch_sub(1, Ordering::Relaxed);
                        Some(Err(back.0))
                    }
                }
            }
            Err(e) => {
                c2.pool.give(buf);
                Some(Ok((inflight, payload, headers, e)))
            }
        }
    })
    .await;
    match joined {
        Ok(None) => {}
        Ok(Some(Ok((inflight, payload, headers, e)))) => {
            dead_letter(
                &ctx,
                inflight,
                payload,
                headers.as_ref(),
                e.kind(),
                &e.to_string(),
            )
            .await
        }
        // The encoder thread is gone (shutdown): leave the input for redelivery.
        Ok(Some(Err(item))) => {
            route(
                &ctx,
                item.inflight,
                item.payload,
                Action::Nak {
                    delay: None,
                    reason: "shutdown",
                },
            )
            .await
        }
        Err(e) => tracing::error!(error = %e, "decode task failed"),
    }
}

enum FetchError {
    Permanent(&'static str, String),
    Transient(String),
}

async fn fetch_object(ctx: &Ctx, obj: &msg::ObjectRef) -> Result<Bytes, FetchError> {
    use async_nats::jetstream::object_store::GetErrorKind;
    let store = ctx.js.get_object_store(&obj.bucket).await.map_err(|e| {
        let s = e.to_string();
        if s.contains("not found") {
            FetchError::Permanent(
                "missing_object",
                format!("object store bucket {:?} not found", obj.bucket),
            )
        } else {
            FetchError::Transient(format!("bucket {}: {s}", obj.bucket))
        }
    })?;
    let mut object = store.get(&obj.name).await.map_err(|e| match e.kind() {
        GetErrorKind::NotFound => FetchError::Permanent(
            "missing_object",
            format!("object {:?} not found in bucket {:?}", obj.name, obj.bucket),
        ),
        GetErrorKind::InvalidName => FetchError::Permanent(
            "bad_envelope",
            format!("invalid object name {:?}", obj.name),
        ),
        _ => FetchError::Transient(format!("object {}/{}: {e}", obj.bucket, obj.name)),
    })?;
    let size = object.info.size;
    if size > ctx.cfg.object_max_bytes {
        return Err(FetchError::Permanent(
            "too_large",
            format!(
                "object {}/{} is {size} bytes, above the limit of {} bytes",
                obj.bucket, obj.name, ctx.cfg.object_max_bytes
            ),
        ));
    }
    let mut buf = Vec::with_capacity(size);
    object.read_to_end(&mut buf).await.map_err(|e| {
        FetchError::Transient(format!("reading object {}/{}: {e}", obj.bucket, obj.name))
    })?;
    Ok(Bytes::from(buf))
}

async fn dead_letter(
    ctx: &Ctx,
    inflight: InFlight,
    payload: Bytes,
    headers: Option<&HeaderMap>,
    kind: &'static str,
    why: &str,
) {
    tracing::info!(source = %inflight.source.label(), kind, error = why, "dead-lettering input");
    counter!(m::DLQ, "kind" => kind).increment(1);
    let mut h = msg::carry_headers(headers);
    h.insert(msg::H_ERROR, msg::header_value(why).as_str());
    h.insert(msg::H_ERROR_KIND, kind);
    h.insert(msg::H_SOURCE, inflight.source.label().as_str());
    h.insert(msg::H_BANK, ctx.bank_version.as_str());
    h.insert(msg::H_MODEL, ctx.model_fingerprint.as_str());
    h.insert(
        msg::H_MSG_ID,
        msg::output_msg_id(
            &inflight.source.stream,
            inflight.source.sequence,
            &ctx.bank_version,
        )
        .as_str(),
    );
    let subject = ctx.cfg.topology.output_subjects[2].clone();
    route(
        ctx,
        inflight,
        payload,
        Action::Publish {
            subject,
            headers: h,
            outcome: "dlq",
        },
    )
    .await;
}

async fn route(ctx: &Ctx, inflight: InFlight, payload: Bytes, action: Action) {
    // If the sink is gone the item is dropped here, and its guard NAKs it.
    let _ = ctx
        .sink_tx
        .send(Routed {
            inflight,
            payload,
            action,
        })
        .await;
}

/// The encoder thread: dynamic batching, inference, scoring, routing.
fn inference_loop(
    rx: Receiver<Decoded>,
    mut encoder: Box<dyn Encoder>,
    det: Detector,
    ctx: Arc<Ctx>,
) {
    let size = ctx.pre.size() as usize;
    let max = ctx.cfg.batch_max.max(1);
    let mut tensor = Array4::<f32>::zeros((max, 3, size, size));
    let mut batch: Vec<Decoded> = Vec::with_capacity(max);
    let sink = ctx.sink_tx.clone();
    let send = |r: Routed| {
        let _ = sink.blocking_send(r);
    };
    loop {
        // Wait for the first image, then take whatever is queued; wait up to max_wait only
        // while the batch is short and its oldest image is younger than max_wait.
        let first = match rx.recv() {
            Ok(x) => x,
            Err(_) => break,
        };
        let deadline = first.queued_at + ctx.cfg.batch_wait;
        batch.push(first);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(x) => batch.push(x),
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline || ctx.draining.load(Ordering::Relaxed) {
                        break;
                    }
                    match rx.recv_timeout(deadline - now) {
                        Ok(x) => batch.push(x),
                        Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                            break;
                        }
                    }
                }
            }
        }
        ctx.queued.fetch_sub(batch.len(), Ordering::Relaxed);
        gauge!(m::QUEUE_DEPTH).set(ctx.queued.load(Ordering::Relaxed) as f64);
        if ctx.draining.load(Ordering::Relaxed) {
            // Shutting down: the batch in flight has finished; what is still buffered goes
            // back to the server for another worker.
            for mut item in batch.drain(..) {
                ctx.pool.give(std::mem::take(&mut item.tensor));
                send(Routed {
                    inflight: item.inflight,
                    payload: item.payload,
                    action: Action::Nak {
                        delay: None,
                        reason: "shutdown",
                    },
                });
            }
            continue;
        }
        let n = batch.len();
        histogram!(m::BATCH_SIZE).record(n as f64);
        let now = Instant::now();
        for (i, item) in batch.iter_mut().enumerate() {
            histogram!(m::STAGE_SECONDS, "stage" => "queue")
                .record(now.duration_since(item.queued_at).as_secs_f64());
            if let Some(dst) = tensor.slice_mut(s![i, .., .., ..]).as_slice_mut() {
                dst.copy_from_slice(&item.tensor);
            }
            ctx.pool.give(std::mem::take(&mut item.tensor));
        }
        let t0 = Instant::now();
        let emb = encoder.embed_images(tensor.slice(s![..n, .., .., ..]));
        histogram!(m::STAGE_SECONDS, "stage" => "infer").record(t0.elapsed().as_secs_f64());
        let emb = match emb {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, batch = n, "encoder failed; NAKing the batch");
                for item in batch.drain(..) {
                    send(Routed {
                        inflight: item.inflight,
                        payload: item.payload,
                        action: Action::Nak {
                            delay: Some(ctx.cfg.nak_delay),
                            reason: "encoder",
                        },
                    });
                }
                continue;
            }
        };
        let t1 = Instant::now();
        let rows = match det
            .scorer
            .score_batch_detailed(emb.view(), det.method, &det.params)
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "scoring failed; NAKing the batch");
                for item in batch.drain(..) {
                    send(Routed {
                        inflight: item.inflight,
                        payload: item.payload,
                        action: Action::Nak {
                            delay: Some(ctx.cfg.nak_delay),
                            reason: "score",
                        },
                    });
                }
                continue;
            }
        };
        let threshold = msg::header_value(&format!("{}", det.threshold));
        let method = det.method.to_string();
        for (i, (item, row)) in batch.drain(..).zip(rows).enumerate() {
            let is_id = row.score >= det.threshold;
            let decision = if is_id { "id" } else { "ood" };
            histogram!(m::SCORE).record(row.score);
            let x = emb.row(i).to_vec();
            let ex = det.index.explain(&det.bank, &x, det.top_k.max(1));
            let mut h = msg::carry_headers(item.headers.as_ref());
            h.insert(msg::H_DECISION, decision);
            h.insert(msg::H_SCORE, format!("{:.6e}", row.score).as_str());
            h.insert(msg::H_METHOD, method.as_str());
            h.insert(msg::H_THRESHOLD, threshold.as_str());
            let top = ex
                .top_labels
                .first()
                .map(|t| t.0.clone())
                .unwrap_or_else(|| {
                    det.bank
                        .meta
                        .id_labels
                        .get(row.top_id)
                        .cloned()
                        .unwrap_or_default()
                });
            h.insert(msg::H_TOP_LABEL, msg::header_value(&top).as_str());
            let outl: Vec<String> = ex.nearest_outliers.iter().map(|o| o.0.clone()).collect();
            h.insert(
                msg::H_NEAREST_OUTLIERS,
                msg::header_value(&outl.join(", ")).as_str(),
            );
            h.insert(msg::H_BANK, ctx.bank_version.as_str());
            h.insert(msg::H_MODEL, ctx.model_fingerprint.as_str());
            h.insert(msg::H_SOURCE, item.inflight.source.label().as_str());
            h.insert(
                msg::H_MSG_ID,
                msg::output_msg_id(
                    &item.inflight.source.stream,
                    item.inflight.source.sequence,
                    &ctx.bank_version,
                )
                .as_str(),
            );
            let subject = ctx.cfg.topology.output_subjects[if is_id { 0 } else { 1 }].clone();
            send(Routed {
                inflight: item.inflight,
                payload: item.payload,
                action: Action::Publish {
                    subject,
                    headers: h,
                    outcome: decision,
                },
            });
        }
        histogram!(m::STAGE_SECONDS, "stage" => "score").record(t1.elapsed().as_secs_f64());
        tracing::debug!(
            batch = n,
            infer_ms = t1.duration_since(t0).as_millis() as u64,
            "batch routed"
        );
    }
    tracing::debug!("encoder thread stopped");
}

/// Publishes with an awaited PubAck (retrying with the same message id), then acks the input.
async fn sink_loop(
    js: jetstream::Context,
    mut rx: mpsc::Receiver<Routed>,
    cfg: PipelineConfig,
    stats: Arc<Stats>,
) {
    let slots = Arc::new(Semaphore::new(cfg.max_inflight_publishes.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(r) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let (js, cfg, stats) = (js.clone(), cfg.clone(), stats.clone());
        tasks.spawn(async move {
            deliver(&js, r, &cfg, &stats).await;
            drop(slot);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

async fn deliver(js: &jetstream::Context, r: Routed, cfg: &PipelineConfig, stats: &Stats) {
    let Routed {
        inflight,
        payload,
        action,
    } = r;
    match action {
        Action::Nak { delay, reason } => {
            counter!(m::NAKS, "reason" => reason).increment(1);
            stats.naks.fetch_add(1, Ordering::Relaxed);
            inflight.nak(delay).await;
        }
        Action::Publish {
            subject,
            headers,
            outcome,
        } => {
            let t0 = Instant::now();
            let mut attempt = 0;
            let published = loop {
                let fut = async {
                    let ack = js
                        .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                        .await?;
                    ack.await.map_err(async_nats::Error::from)
                };
                match tokio::time::timeout(cfg.publish_timeout, fut).await {
                    Ok(Ok(_ack)) => break true,
                    Ok(Err(e)) => tracing::warn!(%subject, attempt, error = %e, "publish failed"),
                    Err(_) => tracing::warn!(%subject, attempt, "publish timed out"),
                }
                attempt += 1;
                if attempt > cfg.publish_retries {
                    break false;
                }
                // The same Nats-Msg-Id is reused: a timed-out publish that was stored is deduplicated.
                tokio::time::sleep(Duration::from_millis(100 * (1 << attempt.min(6)))).await;
            };
            histogram!(m::STAGE_SECONDS, "stage" => "publish").record(t0.elapsed().as_secs_f64());
            if !published {
                counter!(m::NAKS, "reason" => "publish").increment(1);
                stats.naks.fetch_add(1, Ordering::Relaxed);
                inflight.nak(Some(cfg.nak_delay)).await;
                return;
            }
            counter!(m::OUT, "decision" => outcome).increment(1);
            match outcome {
                "id" => stats.id.fetch_add(1, Ordering::Relaxed),
                "ood" => stats.ood.fetch_add(1, Ordering::Relaxed),
                _ => stats.dlq.fetch_add(1, Ordering::Relaxed),
            };
            histogram!(m::STAGE_SECONDS, "stage" => "total")
                .record(inflight.received.elapsed().as_secs_f64());
            let source = inflight.source.label();
            if let Err(e) = inflight.ack().await {
                // The output is stored; a redelivery will be deduplicated by its Nats-Msg-Id.
                tracing::warn!(%source, error = %e, "ack failed after publishing");
            }
        }
    }
}

/// Sends +WPI for inputs waiting longer than half the ack wait, so they are not redelivered
/// to another worker while still queued here.
async fn progress_loop(
    js: jetstream::Context,
    tracker: Arc<Tracker>,
    ack_wait: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let every = (ack_wait / 4).max(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.wait_for(|v| *v) => return,
            _ = tokio::time::sleep(every) => {}
        }
        let old: Vec<Subject> = tracker.older_than(ack_wait / 2);
        for reply in old {
            let _ = jetstream::message::Acker::new(js.clone(), Some(reply))
                .ack_with(AckKind::Progress)
                .await;
        }
        gauge!(m::IN_FLIGHT).set(tracker.len() as f64);
    }
}

async fn pending_loop(
    mut consumer: jetstream::consumer::PullConsumer,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Ok(info) = consumer.info().await {
            gauge!(m::PENDING).set(info.num_pending as f64);
        }
        tokio::select! {
            _ = stop.wait_for(|v| *v) => return,
            _ = tokio::time::sleep(Duration::from_secs(15)) => {}
        }
    }
}

/// The server drops an input silently once it has been delivered `max_deliver` times. Every
/// worker listens for that advisory and dead-letters the input (kind `max_deliveries`) under
/// the input's output `Nats-Msg-Id`, so several workers, or an output that was in fact
/// published, collapse into one message. Advisories are not persisted: one raised while no
/// worker runs is missed.
async fn max_deliveries_loop(
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: PipelineConfig,
    bank_version: String,
    model_fingerprint: String,
    mut stop: watch::Receiver<bool>,
) {
    let t = &cfg.topology;
    let subject = format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
        t.input_stream, t.durable
    );
    let Ok(mut sub) = client.subscribe(subject.clone()).await else {
        tracing::warn!(%subject, "cannot subscribe to max-deliveries advisories");
        return;
    };
    loop {
        let advisory = tokio::select! {
            _ = stop.wait_for(|v| *v) => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        #[derive(serde::Deserialize)]
        struct Advisory {
            stream_seq: u64,
            #[serde(default)]
            deliveries: u64,
        }
        let Ok(a) = serde_json::from_slice::<Advisory>(&advisory.payload) else {
            continue;
        };
        let Ok(stream) = js.get_stream(&t.input_stream).await else {
            continue;
        };
        let Ok(original) = stream.get_raw_message(a.stream_seq).await else {
            tracing::warn!(
                seq = a.stream_seq,
                "max-deliveries advisory for a message no longer in the stream"
            );
            continue;
        };
        let why = format!(
            "input {}:{} was delivered {} times without being processed (input.max_deliver)",
            t.input_stream, a.stream_seq, a.deliveries
        );
        let mut h = msg::carry_headers(Some(&original.headers));
        h.insert(msg::H_ERROR, why.as_str());
        h.insert(msg::H_ERROR_KIND, "max_deliveries");
        h.insert(
            msg::H_SOURCE,
            format!("{}:{}", t.input_stream, a.stream_seq).as_str(),
        );
        h.insert(msg::H_BANK, bank_version.as_str());
        h.insert(msg::H_MODEL, model_fingerprint.as_str());
        h.insert(
            msg::H_MSG_ID,
            msg::output_msg_id(&t.input_stream, a.stream_seq, &bank_version).as_str(),
        );
        for attempt in 0..=cfg.publish_retries {
            let fut = async {
                let ack = js
                    .publish_with_headers(
                        t.output_subjects[2].clone(),
                        h.clone(),
                        original.payload.clone(),
                    )
                    .await?;
                ack.await.map_err(async_nats::Error::from)
            };
            match tokio::time::timeout(cfg.publish_timeout, fut).await {
                Ok(Ok(ack)) => {
                    if !ack.duplicate {
                        counter!(m::DLQ, "kind" => "max_deliveries").increment(1);
                        tracing::warn!(
                            seq = a.stream_seq,
                            "dead-lettered an input that hit max_deliver"
                        );
                    }
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100 * (1 << attempt.min(6)))).await,
            }
        }
    }
}
