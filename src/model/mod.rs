//! Everything that turns pixels and words into vectors: the model folder contract, CLIP
//! preprocessing, the CLIP tokenizer and the ONNX Runtime encoder. Knows nothing of NATS or
//! of scores.

pub mod encoder;
pub mod heap;
pub mod manifest;
pub mod pipeline;
pub mod preprocess;
pub mod resample;
pub mod runtime;
pub mod tokenizer;
pub mod variant;

pub use encoder::{Encoder, EncoderError, OrtEncoder};
pub use manifest::{ManifestError, ModelManifest, Weights};
pub use preprocess::{PreprocessError, Preprocessor};
pub use runtime::{Device, RuntimeError};
pub use tokenizer::ClipTokenizer;

/// The one-line warning every command prints when it scores with a random-weight model.
pub const RANDOM_WEIGHTS_WARNING: &str = "WARNING: this model has random weights (manifest weights = \"random\"): its embeddings, scores, AUROC and FPR carry no meaning; export real CLIP weights with deploy/model/export_openclip.py";
