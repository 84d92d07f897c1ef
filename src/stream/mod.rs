//! The daemon: JetStream in, decode → batch → encode → score, ID/OOD/DLQ out. Decides nothing
//! about OOD itself: it asks [`crate::detect`] and routes the answer.
//!
//! Delivery: at-least-once in, effectively-once out. Every input leaves through exactly one of
//! published-then-acked, dead-lettered-then-acked, or NAKed ([`inflight::InFlight`] NAKs on
//! drop); outputs carry a `Nats-Msg-Id` derived from the input's stream sequence, so a
//! redelivered input is deduplicated by the output stream.

pub mod inflight;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod setup;

pub use pipeline::{PipelineConfig, run};
