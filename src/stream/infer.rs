//! The inference backend: one OS thread owns the encoder (ONNX Runtime's `Session::run`
//! takes `&mut self` and keeps its own thread pool busy) and only runs the model. Callers
//! send batches over a bounded command channel and await the reply, the way
//! text-embeddings-inference isolates its backend; scoring and routing happen elsewhere.

use ndarray::{Array2, Array4};
use tokio::sync::{mpsc, oneshot};

use crate::model::{Encoder, EncoderError};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    #[error("the encoder thread has stopped")]
    Stopped,
}

enum Command {
    Embed {
        images: Array4<f32>,
        reply: oneshot::Sender<Result<Array2<f32>, EncoderError>>,
    },
}

/// A handle to the encoder thread; cheap to clone. The thread ends when every handle is gone.
#[derive(Clone)]
pub struct EncoderHandle {
    tx: mpsc::Sender<Command>,
}

impl EncoderHandle {
    /// Starts the thread. `queue` batches may wait while one runs (1 keeps the next batch
    /// ready without letting batches pile up).
    pub fn spawn(
        mut encoder: Box<dyn Encoder>,
        queue: usize,
    ) -> std::io::Result<(EncoderHandle, std::thread::JoinHandle<()>)> {
        let (tx, mut rx) = mpsc::channel::<Command>(queue.max(1));
        let thread = std::thread::Builder::new()
            .name("oodgate-encoder".into())
            .spawn(move || {
                while let Some(cmd) = rx.blocking_recv() {
                    match cmd {
                        Command::Embed { images, reply } => {
                            // The caller may have given up (shutdown); the result is dropped.
                            let _ = reply.send(encoder.embed_images(images.view()));
                        }
                    }
                }
                tracing::debug!("encoder thread stopped");
            })?;
        Ok((EncoderHandle { tx }, thread))
    }

    /// `[n, 3, size, size]` → `[n, dim]` unit-norm embeddings.
    pub async fn embed(&self, images: Array4<f32>) -> Result<Array2<f32>, InferError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Embed { images, reply })
            .await
            .map_err(|_| InferError::Stopped)?;
        Ok(rx.await.map_err(|_| InferError::Stopped)??)
    }
}
