//! The daemon: JetStream in, decode → batch → encode → score, ID/OOD/DLQ out. Decides nothing
//! about OOD itself: it asks [`crate::detect`] and routes the answer. One file per stage:
//!
//! ```text
//! pull ─▶ decode (claim_check) ─▶ batcher ─▶ infer (encoder thread) ─▶ detector ─▶ route ─▶ sink
//!                     housekeeping: progress acks, pending gauge, max-deliveries advisories
//! ```
//!
//! Delivery: at-least-once in, effectively-once out. Every input leaves through exactly one of
//! published-then-acked, dead-lettered-then-acked, or NAKed ([`inflight::InFlight`] NAKs on
//! drop); outputs carry a `Nats-Msg-Id` derived from the input's stream sequence, so a
//! redelivered input is deduplicated by the output stream. See docs/delivery.md.

pub mod adaptive_sync;
pub mod batcher;
pub mod breaker;
pub mod claim_check;
pub mod decode;
pub mod housekeeping;
pub mod infer;
pub mod inflight;
pub mod local_server;
pub mod message;
pub mod metrics;
pub mod permissions;
pub mod pipeline;
pub mod pull;
pub mod route;
pub mod setup;
pub mod sink;
pub mod stream_spec;
pub mod turns;

pub use metrics::Stats;
pub use pipeline::{PipelineConfig, PipelineError, run};
