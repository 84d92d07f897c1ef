//! `oodgate debug tokenize TEXT...` and `oodgate debug preprocess IMAGE -o OUT.npy`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use oodgate::model::preprocess::Limits;
use oodgate::model::{ClipTokenizer, ModelManifest, Preprocessor};

#[derive(Debug, clap::Subcommand)]
pub enum DebugCommand {
    /// Print one JSON array of token ids per text.
    Tokenize {
        texts: Vec<String>,
        #[arg(long, default_value_t = 77)]
        context_length: usize,
        #[arg(long, default_value_t = 0)]
        pad_id: i64,
    },
    /// Write the float32 [3, H, W] tensor exactly as fed to the encoder.
    Preprocess {
        image: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Take size/mean/std from this model folder (default: CLIP 224 and OpenAI mean/std).
        #[arg(long, env = "OODGATE_MODEL")]
        model: Option<PathBuf>,
    },
}

pub fn run(c: DebugCommand) -> anyhow::Result<ExitCode> {
    match c {
        DebugCommand::Tokenize {
            texts,
            context_length,
            pad_id,
        } => {
            let t = ClipTokenizer::new(context_length, pad_id);
            for text in texts {
                println!("{}", serde_json::to_string(&t.encode(&text))?);
            }
        }
        DebugCommand::Preprocess {
            image,
            output,
            model,
        } => {
            let pre = match model {
                Some(dir) => {
                    Preprocessor::from_manifest(&ModelManifest::load(&dir)?, Limits::default())
                }
                #[allow(clippy::excessive_precision)]
                None => Preprocessor::new(
                    224,
                    [0.481_454_66, 0.457_827_5, 0.408_210_73],
                    [0.268_629_54, 0.261_302_58, 0.275_777_1],
                    Limits::default(),
                ),
            };
            let bytes =
                std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
            let t = pre
                .preprocess(&bytes)
                .with_context(|| format!("preprocessing {}", image.display()))?;
            ndarray_npy::write_npy(&output, &t)
                .with_context(|| format!("writing {}", output.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
