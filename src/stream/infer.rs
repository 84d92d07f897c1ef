//! The inference backend: one OS thread owns the encoder (ONNX Runtime's `Session::run`
//! takes `&mut self` and keeps its own thread pool busy) and only runs the model. Callers
//! send batches over a bounded command channel and await the reply, the way
//! text-embeddings-inference isolates its backend; scoring and routing happen elsewhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ndarray::{Array2, Array4};
use tokio::sync::{mpsc, oneshot};

use crate::model::{Encoder, EncoderError};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The encoder failed on this batch; its images come back so they can be retried one by
    /// one (see the poison isolation in the pipeline).
    #[error("{error}")]
    Encoder {
        error: EncoderError,
        images: Array4<f32>,
    },
    #[error("the encoder thread has stopped")]
    Stopped,
}

type Reply = Result<Array2<f32>, (EncoderError, Array4<f32>)>;

enum Command {
    Embed {
        images: Array4<f32>,
        reply: oneshot::Sender<Reply>,
    },
}

/// A handle to the encoder thread; cheap to clone. The thread ends when every handle is gone.
#[derive(Clone)]
pub struct EncoderHandle {
    tx: mpsc::Sender<Command>,
    alive: Arc<AtomicBool>,
}

/// Clears the liveness flag however the thread ends (return or panic).
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl EncoderHandle {
    /// Starts the thread. `queue` batches may wait while one runs (1 keeps the next batch
    /// ready without letting batches pile up).
    pub fn spawn(
        mut encoder: Box<dyn Encoder>,
        queue: usize,
    ) -> std::io::Result<(EncoderHandle, std::thread::JoinHandle<()>)> {
        let (tx, mut rx) = mpsc::channel::<Command>(queue.max(1));
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        let thread = std::thread::Builder::new()
            .name("oodgate-encoder".into())
            .spawn(move || {
                let _guard = guard;
                while let Some(cmd) = rx.blocking_recv() {
                    match cmd {
                        Command::Embed { images, reply } => {
                            let r = encoder.embed_images(images.view()).map_err(|e| (e, images));
                            // The caller may have given up (shutdown); the result is dropped.
                            let _ = reply.send(r);
                        }
                    }
                }
                tracing::debug!("encoder thread stopped");
            })?;
        Ok((EncoderHandle { tx, alive }, thread))
    }

    /// False once the encoder thread has ended (for `/healthz`).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// The liveness flag itself, for a watcher that must not keep the thread alive.
    pub fn alive_flag(&self) -> Arc<AtomicBool> {
        self.alive.clone()
    }

    /// `[n, 3, size, size]` → `[n, dim]` unit-norm embeddings.
    pub async fn embed(&self, images: Array4<f32>) -> Result<Array2<f32>, InferError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Embed { images, reply })
            .await
            .map_err(|_| InferError::Stopped)?;
        match rx.await {
            Ok(Ok(e)) => Ok(e),
            Ok(Err((error, images))) => Err(InferError::Encoder { error, images }),
            Err(_) => Err(InferError::Stopped),
        }
    }
}

/// Which members of a batch that failed as a whole also fail alone.
#[derive(Debug, PartialEq)]
pub enum Blame<T, E> {
    /// Every member failed alone too: nothing points at an input (a broken backend, or a batch
    /// of one), so all are retried.
    Nobody(Vec<E>),
    /// Some members work alone: the ones that do not are the poison.
    Members(Vec<Result<T, E>>),
}

/// Sorts the results of retrying a failed batch member by member.
pub fn blame<T, E>(alone: Vec<Result<T, E>>) -> Blame<T, E> {
    if alone.iter().all(Result::is_err) {
        Blame::Nobody(alone.into_iter().filter_map(Result::err).collect())
    } else {
        Blame::Members(alone)
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{ArrayView2, ArrayView4};

    use super::*;
    use crate::model::Weights;
    use crate::model::encoder::EncoderInfo;

    fn info() -> EncoderInfo {
        EncoderInfo {
            model: "sums".into(),
            weights: Weights::Random,
            embed_dim: 1,
            image_size: 1,
            provider: "cpu".into(),
            device_requested: "cpu".into(),
            intra_threads: 1,
            ort_library: Default::default(),
            ort_version: String::new(),
            fingerprint: String::new(),
            image_digest: String::new(),
        }
    }

    /// A stand-in for the model (not ONNX Runtime): the row sum of each image, failing on any
    /// batch that holds an image whose first value is negative.
    struct Sums(EncoderInfo);

    impl Encoder for Sums {
        fn embed_images(&mut self, b: ArrayView4<'_, f32>) -> Result<Array2<f32>, EncoderError> {
            if b.outer_iter().any(|img| img[[0, 0, 0]] < 0.0) {
                return Err(EncoderError::Inference("poison".into()));
            }
            Ok(Array2::from_shape_fn((b.shape()[0], 1), |(i, _)| {
                b.index_axis(ndarray::Axis(0), i).sum()
            }))
        }
        fn embed_texts(&mut self, _: ArrayView2<'_, i64>) -> Result<Array2<f32>, EncoderError> {
            Err(EncoderError::NoTextEncoder)
        }
        fn info(&self) -> &EncoderInfo {
            &self.0
        }
    }

    #[tokio::test]
    async fn a_failed_batch_comes_back_and_members_are_blamed_alone() {
        let (h, thread) = EncoderHandle::spawn(Box::new(Sums(info())), 1).unwrap();
        let mut batch = Array4::<f32>::ones((3, 1, 1, 2));
        batch[[1, 0, 0, 0]] = -1.0;
        let images = match h.embed(batch.clone()).await {
            Err(InferError::Encoder { images, .. }) => images,
            other => panic!("{other:?}"),
        };
        assert_eq!(images, batch, "the images come back unchanged");
        let mut alone = Vec::new();
        for i in 0..3 {
            let one = images.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned();
            alone.push(
                h.embed(one)
                    .await
                    .map(|e| e[[0, 0]])
                    .map_err(|e| e.to_string()),
            );
        }
        assert_eq!(
            blame(alone),
            Blame::Members(vec![
                Ok(2.0),
                Err("inference failed: poison".into()),
                Ok(2.0)
            ])
        );
        assert!(h.is_alive());
        drop(h);
        thread.join().unwrap();
    }

    #[test]
    fn nobody_is_blamed_when_every_member_fails_alone() {
        let r: Vec<Result<u8, &str>> = vec![Err("a"), Err("b")];
        assert_eq!(blame(r), Blame::Nobody(vec!["a", "b"]));
    }
}
