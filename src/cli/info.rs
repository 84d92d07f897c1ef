//! `oodgate info [--model DIR]`.

use std::path::PathBuf;
use std::process::ExitCode;

use oodgate::model::encoder::EncoderOptions;
use oodgate::model::runtime;
use oodgate::model::{Device, Encoder, ModelManifest, OrtEncoder};

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Model folder to load (shows the provider that actually registers).
    #[arg(long, env = "OODGATE_MODEL")]
    pub model: Option<PathBuf>,
    /// Execution provider to try: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "OODGATE_DEVICE", default_value = "auto")]
    pub device: String,
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: InfoArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime::init(a.ort_library.as_deref())?;
    let mut info = serde_json::json!({
        "oodgate": env!("CARGO_PKG_VERSION"),
        "ort_crate": "2.0.0-rc.15",
        "onnxruntime": { "version": rt.version, "library": rt.library, "cuda_built": runtime::cuda_available() },
    });
    if let Some(dir) = &a.model {
        let manifest = ModelManifest::load(dir)?;
        let device: Device = a.device.parse()?;
        let summary = serde_json::json!({
            "dir": dir, "name": manifest.name, "weights": manifest.weights,
            "embed_dim": manifest.embed_dim, "image_size": manifest.image.size,
            "image": { "file": manifest.image.file, "input": manifest.image.input, "output": manifest.image.output,
                        "mean": manifest.image.mean, "std": manifest.image.std },
            "text": manifest.text,
        });
        let enc = OrtEncoder::load(
            manifest,
            EncoderOptions {
                device,
                ..Default::default()
            },
        )?;
        info["model"] = summary;
        info["provider"] = enc.info().provider.clone().into();
        info["io_binding"] = enc.io_binding().into();
        info["fingerprint"] = enc.info().fingerprint.clone().into();
        if enc.manifest().is_random() {
            eprintln!("{}", oodgate::model::RANDOM_WEIGHTS_WARNING);
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("oodgate {}", env!("CARGO_PKG_VERSION"));
        println!("ort crate 2.0.0-rc.15");
        println!("ONNX Runtime {} ({})", rt.version, rt.library.display());
        println!(
            "CUDA execution provider in library: {}",
            if runtime::cuda_available() {
                "yes"
            } else {
                "no"
            }
        );
        if let Some(m) = info.get("model") {
            println!(
                "execution provider: {}{}",
                info["provider"].as_str().unwrap_or("?"),
                if info["io_binding"].as_bool() == Some(true) {
                    " (I/O binding)"
                } else {
                    ""
                }
            );
            println!("model: {}", m["dir"].as_str().unwrap_or(""));
            println!(
                "  name: {}  weights: {}",
                m["name"].as_str().unwrap_or(""),
                m["weights"].as_str().unwrap_or("")
            );
            println!(
                "  embed_dim: {}  image_size: {}",
                m["embed_dim"], m["image_size"]
            );
            println!(
                "  image: {} ({} -> {})",
                m["image"]["file"].as_str().unwrap_or(""),
                m["image"]["input"].as_str().unwrap_or(""),
                m["image"]["output"].as_str().unwrap_or("")
            );
            if m["text"].is_object() {
                println!(
                    "  text: {} ({} -> {}), context {}, pad {}",
                    m["text"]["file"].as_str().unwrap_or(""),
                    m["text"]["input"].as_str().unwrap_or(""),
                    m["text"]["output"].as_str().unwrap_or(""),
                    m["text"]["context_length"],
                    m["text"]["pad_id"]
                );
            }
            println!(
                "  fingerprint: {}",
                info["fingerprint"].as_str().unwrap_or("")
            );
        } else {
            println!("execution provider: (no --model given; load one to see which registers)");
        }
    }
    Ok(ExitCode::SUCCESS)
}
