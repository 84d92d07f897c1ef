//! Model flags and the one way every command (and `serve`) loads an encoder.

use std::path::{Path, PathBuf};

use anyhow::Context;
use oodgate::model::encoder::EncoderOptions;
use oodgate::model::{Device, ModelManifest, OrtEncoder, RANDOM_WEIGHTS_WARNING};

/// Loads the model folder `dir`, warning on the terminal (and in the log) when its weights
/// are random.
pub fn load_encoder(dir: &Path, opts: EncoderOptions) -> anyhow::Result<OrtEncoder> {
    let manifest =
        ModelManifest::load(dir).with_context(|| format!("reading model {}", dir.display()))?;
    if manifest.is_random() {
        eprintln!("{RANDOM_WEIGHTS_WARNING}");
        tracing::warn!("{RANDOM_WEIGHTS_WARNING}");
    }
    OrtEncoder::load(manifest, opts).with_context(|| format!("loading model {}", dir.display()))
}

/// The fingerprint to check `bank` against for `manifest`'s model (identity `own`): its
/// own, or its reference's for an encoder variant that `oodgate model check` marked
/// compatible (said on stderr and in the log). With `force` the model's own: the bank's
/// check is forced anyway.
pub fn fingerprint_for_bank(
    manifest: &ModelManifest,
    own: &oodgate::model::manifest::Identity,
    bank: &oodgate::detect::bank::Bank,
    force: bool,
) -> anyhow::Result<String> {
    if force {
        return Ok(own.fingerprint.clone());
    }
    let (fp, record) =
        oodgate::model::variant::bank_fingerprint(manifest, own, &bank.meta.model_fingerprint)?;
    if let Some(r) = record {
        let note = format!(
            "encoder variant {} ({}) of the bank's model: checked on {} images, decision agreement {:.2}% (required {:.2}%), embedding cosine min {:.6}",
            manifest.dir.display(),
            r.precision,
            r.images,
            100.0 * r.agreement,
            100.0 * r.min_agreement,
            r.cosine_min
        );
        eprintln!("note: {note}");
        tracing::info!("{note}");
    }
    Ok(fp)
}

/// Where and how ONNX Runtime runs: shared by every command that loads a model.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Execution provider: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "OODGATE_DEVICE", default_value = "auto")]
    pub device: String,
    /// ONNX Runtime intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, then the project's .ort/lib).
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
    /// The fast JPEG path (preprocess.jpeg_draft): Pillow's draft, DCT-domain downscaling
    /// before the resize; not the exact CLIP preprocessing.
    #[arg(long)]
    pub jpeg_draft: bool,
}

impl RuntimeArgs {
    pub fn options(&self, load_text: bool) -> anyhow::Result<EncoderOptions> {
        let device: Device = self.device.parse()?;
        Ok(EncoderOptions {
            device,
            intra_threads: self.threads,
            ort_library: self.ort_library.clone(),
            load_text,
            tuning: Default::default(),
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Model folder (with model.toml or model.json).
    #[arg(long, env = "OODGATE_MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl ModelArgs {
    pub fn load(&self, load_text: bool) -> anyhow::Result<OrtEncoder> {
        load_encoder(&self.model, self.runtime.options(load_text)?)
    }
}

/// The identity recorded in a bank built or imported from matrices: the model folder's
/// fingerprint, name and weights (no session is loaded), or a fingerprint given as is.
pub fn model_identity(
    dir: Option<&Path>,
    fingerprint: Option<&str>,
) -> anyhow::Result<(String, String, String)> {
    match (dir, fingerprint) {
        (Some(dir), _) => {
            let m = ModelManifest::load(dir)
                .with_context(|| format!("reading model {}", dir.display()))?;
            let fp = m.fingerprint()?;
            let name = if m.name.is_empty() {
                dir.display().to_string()
            } else {
                m.name.clone()
            };
            Ok((
                fp,
                name,
                oodgate::bank_build::build::weights_name(&m.weights),
            ))
        }
        (None, Some(fp)) => Ok((fp.trim().to_string(), String::new(), "unknown".to_string())),
        (None, None) => anyhow::bail!("give --model DIR or --model-fingerprint HASH"),
    }
}

/// Model flags where the model is optional (inputs may be precomputed embeddings).
#[derive(Debug, Clone, clap::Args)]
pub struct OptModelArgs {
    /// Model folder: needed for image inputs; with .npy inputs it only checks the bank's
    /// model fingerprint.
    #[arg(long, env = "OODGATE_MODEL")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Use the bank even if it was built with another model (fingerprint mismatch).
    #[arg(long)]
    pub force: bool,
    /// Images per encoder batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
}

impl OptModelArgs {
    pub fn full(&self, model: &Path) -> ModelArgs {
        ModelArgs {
            model: model.to_path_buf(),
            runtime: self.runtime.clone(),
        }
    }
}
