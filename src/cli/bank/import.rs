//! `oodgate bank import`: a bank from matrices computed elsewhere.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use oodgate::bank_build::import::{self, ImportRequest};
use oodgate::bank_build::labels::IdLabels;
use oodgate::npy::read_npy;

use crate::cli::common::{model_identity, short};

use super::attach_index;

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// ID embeddings T ([C, D] .npy, float16/32/64).
    #[arg(long)]
    pub id_embeddings: PathBuf,
    /// ID class names: a preset (imagenet1k, cifar10, cifar100) or a label file, in row order.
    #[arg(long)]
    pub id_labels: String,
    /// CLIPN "no" embeddings T̄ ([C, D] .npy).
    #[arg(long)]
    pub no_embeddings: Option<PathBuf>,
    /// Outlier rows Ô ([M, D] .npy).
    #[arg(long)]
    pub outliers: Option<PathBuf>,
    /// One label per outlier row (plain lines).
    #[arg(long, requires = "outliers")]
    pub outlier_labels: Option<PathBuf>,
    /// θ of the refinement, if known.
    #[arg(long)]
    pub theta: Option<f64>,
    /// Logit scale stored in the bank (default: each method's own).
    #[arg(long)]
    pub scale: Option<f32>,
    /// Fingerprint of the model the matrices come from.
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    pub model_fingerprint: Option<String>,
    /// The model folder the matrices come from (its fingerprint is recorded).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output bank file (.oodb).
    #[arg(short, long)]
    pub output: PathBuf,
}

fn read_lines(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect();
    if let Some(i) = lines.iter().position(|l| l.trim().is_empty()) {
        bail!("{}:{}: empty label", path.display(), i + 1);
    }
    Ok(lines)
}

pub(super) fn run_import(a: ImportArgs) -> anyhow::Result<ExitCode> {
    let id = read_npy(&a.id_embeddings)?;
    let id_labels = IdLabels::load(&a.id_labels)
        .with_context(|| format!("loading ID labels {}", a.id_labels))?;
    let no = match &a.no_embeddings {
        Some(p) => Some(read_npy(p)?),
        None => None,
    };
    let outliers = match &a.outliers {
        Some(p) => {
            let m = read_npy(p)?;
            let labels = match &a.outlier_labels {
                Some(l) => Some(read_lines(l)?),
                None => None,
            };
            Some((m, labels))
        }
        None => None,
    };
    let (fingerprint, name, weights) =
        model_identity(a.model.as_deref(), a.model_fingerprint.as_deref())?;
    let params = serde_json::json!({
        "mode": "import",
        "id_embeddings": a.id_embeddings.display().to_string(),
        "id_labels": a.id_labels,
        "no_embeddings": a.no_embeddings.as_ref().map(|p| p.display().to_string()),
        "outliers": a.outliers.as_ref().map(|p| p.display().to_string()),
        "outlier_labels": a.outlier_labels.as_ref().map(|p| p.display().to_string()),
    });
    let mut bank = import::import_bank(ImportRequest {
        id,
        id_labels,
        no,
        outliers,
        model_fingerprint: fingerprint,
        model_name: name,
        model_weights: weights,
        theta: a.theta,
        scale: a.scale,
        params,
    })?;
    attach_index(&mut bank)?;
    bank.save(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    println!(
        "wrote {} (version {}): {} ID classes, {} outlier rows, dim {}, no-embeddings: {}, model {}",
        a.output.display(),
        bank.version(),
        bank.id.nrows(),
        bank.outliers.nrows(),
        bank.meta.dim,
        if bank.no.is_some() { "yes" } else { "no" },
        short(&bank.meta.model_fingerprint)
    );
    Ok(ExitCode::SUCCESS)
}
