//! Intake of one input: resolve its payload (inline image or claim check), decode it on the
//! blocking pool into its u8 crop, and queue it for the batcher. Inputs that cannot be
//! decoded are dead-lettered from here; transient fetch failures are NAKed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use metrics::{counter, histogram};
use tokio::sync::{Semaphore, mpsc};

use super::batcher::Queued;
use super::claim_check::{self, FetchError};
use super::inflight::{ByteBudget, InFlight};
use super::message::{self as msg, Payload};
use super::metrics as m;
use super::route::{DeadKind, Retry, Router};
use super::sink::Routed;
use crate::model::Preprocessor;
use crate::model::preprocess::{PreprocessError, guard_decoder_panics};

/// A decoded image waiting for the batcher.
pub struct Decoded {
    pub input: InFlight,
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    /// The `size × size` HWC u8 crop, normalised when its batch is assembled: a quarter of
    /// the memory of a float tensor while it waits.
    pub crop: Vec<u8>,
    pub queued_at: Instant,
}

impl Queued for Decoded {
    fn queued_at(&self) -> Instant {
        self.queued_at
    }
}

/// How decoding one input ended.
enum Decode {
    Queued,
    /// The batcher has stopped (shutdown).
    BatcherGone,
    Failed(Box<(InFlight, Bytes, Option<HeaderMap>, PreprocessError)>),
}

/// What the intake stage shares across inputs.
pub struct Intake {
    pub js: jetstream::Context,
    pub pre: Preprocessor,
    /// Bounds concurrent decodes (the encoder needs the other cores).
    pub decode_slots: Arc<Semaphore>,
    pub router: Arc<Router>,
    pub to_batcher: mpsc::Sender<Decoded>,
    pub to_sink: mpsc::Sender<Routed<InFlight>>,
    /// Images decoded and waiting for the batcher (the queue-depth gauge).
    pub queued: Arc<AtomicUsize>,
    pub object_max_bytes: usize,
    pub fetch_timeout: std::time::Duration,
    /// Delete a claim-checked object once its input is routed and acked.
    pub delete_objects: bool,
    /// The only buckets a claim check may name.
    pub allowed_buckets: Vec<String>,
    /// Bytes in flight: a fetched object takes its size from it before it is read.
    pub budget: Arc<ByteBudget>,
}

impl Intake {
    async fn to_sink(&self, r: Routed<InFlight>) {
        // If the sink is gone the item is dropped here and its guard NAKs it.
        let _ = self.to_sink.send(r).await;
    }

    async fn dead_letter(
        &self,
        input: InFlight,
        payload: Bytes,
        headers: Option<&HeaderMap>,
        kind: DeadKind,
        why: &str,
    ) {
        tracing::info!(source = %input.source.label(), %kind, error = why, "dead-lettering input");
        counter!(m::DLQ, "kind" => kind.as_str()).increment(1);
        let output = self.router.dead(&input.source, headers, kind, why);
        let (output, payload) = self.router.fit(&input.source, headers, output, payload);
        self.to_sink(Routed::Publish {
            input,
            payload,
            output,
        })
        .await;
    }

    /// Resolves, decodes and queues one input.
    pub async fn process(
        self: Arc<Self>,
        mut input: InFlight,
        payload: Bytes,
        headers: Option<HeaderMap>,
    ) {
        let started = Instant::now();
        let image = match msg::classify(&payload) {
            Err(e) => {
                let why = e.to_string();
                return self
                    .dead_letter(
                        input,
                        payload,
                        headers.as_ref(),
                        DeadKind::BadEnvelope,
                        &why,
                    )
                    .await;
            }
            Ok(Payload::Image) => payload.clone(),
            Ok(Payload::Envelope(env)) if !self.allowed_buckets.contains(&env.object.bucket) => {
                // Never read: the producer may be pointing at another tenant's objects.
                let why = format!(
                    "claim check names bucket {:?}, which is not in input.object_store_buckets",
                    env.object.bucket
                );
                return self
                    .dead_letter(
                        input,
                        payload,
                        headers.as_ref(),
                        DeadKind::BadEnvelope,
                        &why,
                    )
                    .await;
            }
            Ok(Payload::Envelope(env)) => {
                match claim_check::fetch(
                    &self.js,
                    &env.object,
                    self.object_max_bytes,
                    self.fetch_timeout,
                    &self.budget,
                )
                .await
                {
                    Ok((bytes, held)) => {
                        input.hold_bytes(held);
                        histogram!(m::STAGE_SECONDS, "stage" => "fetch")
                            .record(started.elapsed().as_secs_f64());
                        if self.delete_objects {
                            input.delete_object_after_ack(self.js.clone(), env.object.clone());
                        }
                        bytes
                    }
                    Err(FetchError::Permanent { kind, why }) => {
                        return self
                            .dead_letter(input, payload, headers.as_ref(), kind, &why)
                            .await;
                    }
                    Err(FetchError::Transient(why)) => {
                        tracing::warn!(source = %input.source.label(), %why, "object fetch failed; NAK");
                        let routed = match self.router.after_transient_failure(
                            &input.source,
                            headers.as_ref(),
                            &why,
                        ) {
                            Retry::Nak(delay) => Routed::Nak {
                                input,
                                delay: Some(delay),
                                reason: "fetch",
                            },
                            Retry::Dead(output) => Routed::Publish {
                                input,
                                payload,
                                output,
                            },
                        };
                        return self.to_sink(routed).await;
                    }
                }
            }
        };
        let Ok(_slot) = self.decode_slots.clone().acquire_owned().await else {
            return;
        };
        let this = self.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let r = guard_decoder_panics(|| this.pre.crop(&image));
            histogram!(m::STAGE_SECONDS, "stage" => "decode").record(t0.elapsed().as_secs_f64());
            match r {
                Ok(crop) => {
                    this.queued.fetch_add(1, Ordering::Relaxed);
                    let item = Decoded {
                        input,
                        payload,
                        headers,
                        crop,
                        queued_at: Instant::now(),
                    };
                    // Blocks this decode thread while the batcher's queue is full.
                    match this.to_batcher.blocking_send(item) {
                        Ok(()) => Decode::Queued,
                        Err(_back) => {
                            this.queued.fetch_sub(1, Ordering::Relaxed);
                            // The item drops here; its guard NAKs the input.
                            Decode::BatcherGone
                        }
                    }
                }
                Err(e) => Decode::Failed(Box::new((input, payload, headers, e))),
            }
        })
        .await;
        match decoded {
            Ok(Decode::Queued) => {}
            Ok(Decode::Failed(failed)) => {
                let (input, payload, headers, e) = *failed;
                let why = e.to_string();
                self.dead_letter(
                    input,
                    payload,
                    headers.as_ref(),
                    DeadKind::of_preprocess(&e),
                    &why,
                )
                .await
            }
            // The batcher is gone (shutdown): the input's guard NAKs it when dropped.
            Ok(Decode::BatcherGone) => {}
            Err(e) => tracing::error!(error = %e, "decode task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoder_panic_dead_letters_the_input_as_corrupt() {
        let e = guard_decoder_panics::<()>(|| panic!("index out of bounds in some decoder"))
            .unwrap_err();
        assert_eq!(
            e,
            PreprocessError::Panicked("index out of bounds in some decoder".into())
        );
        assert_eq!(DeadKind::of_preprocess(&e), DeadKind::Corrupt);
        assert!(e.to_string().contains("index out of bounds"), "{e}");
        let owned =
            guard_decoder_panics::<()>(|| panic!("{}", String::from("owned message"))).unwrap_err();
        assert_eq!(owned, PreprocessError::Panicked("owned message".into()));
        assert_eq!(guard_decoder_panics(|| Ok(())), Ok(()));
    }
}
