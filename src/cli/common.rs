//! Flags and helpers shared by the commands that load a model.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use oodgate::model::encoder::EncoderOptions;
use oodgate::model::{Device, ModelManifest, OrtEncoder, RANDOM_WEIGHTS_WARNING};

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Model folder (with model.toml or model.json).
    #[arg(long, env = "OODGATE_MODEL")]
    pub model: PathBuf,
    /// Execution provider: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "OODGATE_DEVICE", default_value = "auto")]
    pub device: String,
    /// ONNX Runtime intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, then the project's .ort/lib).
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
}

impl ModelArgs {
    pub fn load(&self, load_text: bool) -> anyhow::Result<OrtEncoder> {
        let manifest = ModelManifest::load(&self.model)?;
        if manifest.is_random() {
            eprintln!("{RANDOM_WEIGHTS_WARNING}");
        }
        let device: Device = self.device.parse()?;
        let enc = OrtEncoder::load(
            manifest,
            EncoderOptions {
                device,
                intra_threads: self.threads,
                ort_library: self.ort_library.clone(),
                load_text,
            },
        )
        .with_context(|| format!("loading model {}", self.model.display()))?;
        Ok(enc)
    }
}

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

/// Worker threads for decoding: the cores.
pub fn decode_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
