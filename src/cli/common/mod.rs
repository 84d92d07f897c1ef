//! What the commands share, so that no command imports another: model flags and loading,
//! inputs (images or `.npy` embeddings) and detector flags, plus terminal helpers.

pub mod detector;
pub mod inputs;
pub mod model;
pub mod nats;
pub mod worker;

use std::io::IsTerminal;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

pub use detector::{AdaptiveArgs, ApproxArgs, DecisionArgs, load_bank, scoring_spec};
pub use inputs::ModelCtx;
pub use model::{ModelArgs, OptModelArgs, RuntimeArgs, load_encoder, model_identity};

/// A progress bar on a terminal, hidden otherwise.
pub fn progress(len: usize, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    let style = ProgressStyle::with_template(&format!(
        "{{spinner}} {what} {{bar:40}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta}}] {{per_sec}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb
}

/// The file beside `out.npy` that lists its rows: `out.txt`.
pub fn rows_file(npy: &std::path::Path) -> PathBuf {
    npy.with_extension("txt")
}

/// Worker threads for decoding in the offline commands: the cores.
pub fn decode_workers() -> usize {
    oodgate::available_cores()
}

/// The first 16 hex digits of a fingerprint.
pub fn short(fp: &str) -> &str {
    fp.get(..16).unwrap_or(fp)
}
