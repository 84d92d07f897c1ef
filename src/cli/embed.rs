//! `oodgate embed --model DIR [--batch N] INPUT... -o OUT.npy` and `--text TEXT...`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use oodgate::model::pipeline::{collect_images, embed_image_files};
use oodgate::model::preprocess::Limits;
use oodgate::model::{ClipTokenizer, Encoder, Preprocessor};

use super::common::{ModelArgs, decode_workers, progress, rows_file};

#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images per encoder batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Embed these texts instead of images.
    #[arg(long, num_args = 1.., conflicts_with = "inputs")]
    pub text: Vec<String>,
    /// Image files or folders (recursive).
    pub inputs: Vec<PathBuf>,
    /// Output .npy ([N, D] float32); the rows' paths (or texts) go beside it as OUT.txt.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run(a: EmbedArgs) -> anyhow::Result<ExitCode> {
    if a.text.is_empty() && a.inputs.is_empty() {
        bail!("nothing to embed: give image files/folders or --text TEXT...");
    }
    let mut enc = a.model.load(!a.text.is_empty())?;
    let (emb, rows): (ndarray::Array2<f32>, Vec<String>) = if !a.text.is_empty() {
        let spec = enc
            .manifest()
            .text
            .clone()
            .context("model has no text encoder")?;
        let tok = ClipTokenizer::new(spec.context_length, spec.pad_id);
        let mut parts = Vec::new();
        for chunk in a.text.chunks(a.batch.max(1)) {
            parts.push(enc.embed_texts(tok.encode_batch(chunk).view())?);
        }
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        (
            ndarray::concatenate(ndarray::Axis(0), &views)?,
            a.text.clone(),
        )
    } else {
        let files = collect_images(&a.inputs)?;
        if files.is_empty() {
            bail!("no image files found in the inputs");
        }
        let pre = Preprocessor::from_manifest(enc.manifest(), Limits::default())
            .with_jpeg_draft(a.model.runtime.jpeg_draft);
        let pb = progress(files.len(), "embedding");
        let out = embed_image_files(&mut enc, &pre, &files, a.batch, decode_workers(), |n| {
            pb.inc(n as u64)
        })?;
        pb.finish_and_clear();
        for f in &out.failures {
            eprintln!("skipped: {f}");
        }
        if out.paths.is_empty() {
            bail!("none of the {} inputs could be embedded", files.len());
        }
        let rows = out.paths.iter().map(|p| p.display().to_string()).collect();
        (out.embeddings, rows)
    };
    ndarray_npy::write_npy(&a.output, &emb)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let list = rows_file(&a.output);
    let mut f =
        std::fs::File::create(&list).with_context(|| format!("writing {}", list.display()))?;
    for r in &rows {
        writeln!(f, "{}", r.replace('\n', " "))?;
    }
    eprintln!(
        "wrote {} embeddings of dimension {} to {} (rows listed in {})",
        emb.nrows(),
        emb.ncols(),
        a.output.display(),
        list.display()
    );
    Ok(ExitCode::SUCCESS)
}
