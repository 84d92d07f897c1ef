//! Bank building: label corpora and their cleaning, label embedding through the tokenizer and
//! text encoder, the OPL / raw / NegLabel construction and the import of precomputed matrices.
//! Sits above [`crate::detect`] (the pure method) and [`crate::model`] (the encoder).

use thiserror::Error;

use crate::detect::bank::BankError;
use crate::detect::prototypes::ProtoError;
use crate::model::EncoderError;
use crate::npy::NpyError;

pub mod build;
pub mod embed;
pub mod embed_cache;
pub mod import;
pub mod labels;
pub mod source;
pub mod wordnet;

#[cfg(test)]
pub(crate) mod test_support;

/// Errors of bank construction and import.
#[derive(Debug, Error)]
pub enum BuildError {
    /// The text encoder failed.
    #[error("text encoder: {0}")]
    Encoder(#[from] EncoderError),
    /// Prototype construction failed.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// The bank could not be assembled.
    #[error(transparent)]
    Bank(#[from] BankError),
    /// A `.npy` file could not be read.
    #[error(transparent)]
    Npy(#[from] NpyError),
    /// Parameters or inputs that cannot work, with advice.
    #[error("{0}")]
    Invalid(String),
    /// A label whose prompts produced no usable direction.
    #[error("label {label:?}: the text encoder produced a zero or non-finite embedding")]
    BadEmbedding {
        /// The label.
        label: String,
    },
    /// A precomputed embedding row with no direction.
    #[error("{origin}: row {row} is zero or not finite")]
    BadRow {
        /// The file.
        origin: String,
        /// The row (0-based).
        row: usize,
    },
}
