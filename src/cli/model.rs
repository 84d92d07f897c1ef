//! `oodgate model check --reference DIR --model VARIANT --bank BANK IMAGES...`: the fidelity
//! gate for encoder variants (src/model/variant.rs). Both image towers embed the user's own
//! images; the report gives the embedding cosines, the score differences and how often the
//! decision at the bank's threshold agrees. Above `--min-agreement` the variant is marked
//! compatible with the reference's banks (a record in its folder); below, it is not, and any
//! earlier mark is removed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use ndarray::Array2;
use oodgate::detect::detector::{Detector, DetectorSpec, ThresholdChoice};
use oodgate::detect::method::Method;
use oodgate::model::pipeline::{collect_images, embed_image_files};
use oodgate::model::preprocess::Limits;
use oodgate::model::variant::{COMPATIBILITY_FILE, Compatibility};
use oodgate::model::{Encoder, Preprocessor};

use super::common::{RuntimeArgs, decode_workers, load_bank, load_encoder, progress, short};

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Check an encoder variant against its reference on your images and bank; mark it
    /// compatible with the reference's banks when the decisions agree often enough.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The reference model folder (the one whose text tower built the bank).
    #[arg(long)]
    pub reference: PathBuf,
    /// The variant's model folder (deploy/model/optimize.py).
    #[arg(long)]
    pub model: PathBuf,
    /// A bank built with the reference, with a calibrated threshold for the method.
    #[arg(long)]
    pub bank: PathBuf,
    /// Score method (its calibrated threshold decides).
    #[arg(long, default_value = "ole")]
    pub method: Method,
    /// Threshold instead of the bank's calibrated one.
    #[arg(long, allow_negative_numbers = true)]
    pub threshold: Option<f64>,
    /// Least fraction of images with the same decision under both models.
    #[arg(long, default_value_t = 0.995)]
    pub min_agreement: f64,
    /// Fewest images a check may rest on.
    #[arg(long, default_value_t = 100)]
    pub min_images: usize,
    /// Images per encoder batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Images: files or folders (your own, like the production stream).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

pub fn run(c: ModelCommand) -> anyhow::Result<ExitCode> {
    let ModelCommand::Check(a) = c;
    check(a)
}

fn check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    if !(a.min_agreement > 0.0 && a.min_agreement <= 1.0) {
        bail!("--min-agreement {} is outside (0, 1]", a.min_agreement);
    }
    let bank = load_bank(&a.bank)?;
    let mut reference = load_encoder(&a.reference, a.runtime.options(false)?)?;
    let mut variant = load_encoder(&a.model, a.runtime.options(false)?)?;
    let ref_fp = reference.info().fingerprint.clone();
    bank.check_model(&ref_fp, false).with_context(|| {
        format!(
            "the bank must be built with the reference {}",
            a.reference.display()
        )
    })?;
    let spec = variant.manifest().variant.clone().with_context(|| {
        format!(
            "{} has no [variant] table: not an encoder variant (deploy/model/optimize.py)",
            a.model.display()
        )
    })?;
    if spec.of != ref_fp {
        bail!(
            "{} is a variant of model {}, not of the reference {} ({})",
            a.model.display(),
            short(&spec.of),
            a.reference.display(),
            short(&ref_fp)
        );
    }
    let files = collect_images(&a.images)?;
    let embed = |enc: &mut oodgate::model::OrtEncoder, what: &str| {
        let pre = Preprocessor::from_manifest(enc.manifest(), Limits::default())
            .with_jpeg_draft(a.runtime.jpeg_draft);
        let pb = progress(files.len(), what);
        let out = embed_image_files(enc, &pre, &files, a.batch, decode_workers(), |n| {
            pb.inc(n as u64)
        });
        pb.finish_and_clear();
        out
    };
    let r = embed(&mut reference, "reference")?;
    let v = embed(&mut variant, "variant")?;
    if r.paths != v.paths {
        bail!("the two models did not embed the same images");
    }
    let n = r.paths.len();
    if n < a.min_images {
        bail!(
            "{n} images embedded; a check needs at least {} (--min-images)",
            a.min_images
        );
    }
    let mut spec_d = DetectorSpec::new(a.method);
    spec_d.top_k = 0;
    spec_d.threshold = match a.threshold {
        Some(t) => ThresholdChoice::Given(t),
        None => ThresholdChoice::FromBank,
    };
    let detector = Detector::new(bank, &spec_d).context("preparing the detector")?;
    let threshold = detector
        .threshold()
        .context("the bank has no threshold for the method")?
        .value;
    let sr = detector.verdicts(r.embeddings.view())?;
    let sv = detector.verdicts(v.embeddings.view())?;
    let mut cos = row_cosines(&r.embeddings, &v.embeddings);
    let mut diffs: Vec<f64> = sr
        .iter()
        .zip(&sv)
        .map(|(x, y)| (x.score - y.score).abs())
        .collect();
    let agree = sr
        .iter()
        .zip(&sv)
        .filter(|(x, y)| x.decision == y.decision)
        .count();
    let agreement = agree as f64 / n as f64;
    cos.sort_by(f64::total_cmp);
    diffs.sort_by(f64::total_cmp);
    let record = Compatibility {
        reference: ref_fp,
        variant_image_sha256: variant.info().image_digest.clone(),
        precision: spec.precision.clone(),
        bank_version: detector.bank().version().to_string(),
        method: a.method.to_string(),
        threshold,
        images: n,
        cosine_min: cos[0],
        cosine_median: median(&cos),
        score_diff_max: diffs[n - 1],
        score_diff_median: median(&diffs),
        agreement,
        min_agreement: a.min_agreement,
        compatible: agreement >= a.min_agreement,
        oodgate: env!("CARGO_PKG_VERSION").to_string(),
        checked_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    record.store(&a.model)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        println!(
            "{} ({}) against {} on {n} images, bank {} ({} at threshold {threshold:.6}):",
            a.model.display(),
            record.precision,
            a.reference.display(),
            record.bank_version,
            record.method
        );
        println!(
            "  embedding cosine  min {:.6}  median {:.6}",
            record.cosine_min, record.cosine_median
        );
        println!(
            "  |score difference| max {:.3e}  median {:.3e}",
            record.score_diff_max, record.score_diff_median
        );
        println!(
            "  decision agreement {:.2}% ({agree}/{n}); required {:.2}%",
            100.0 * agreement,
            100.0 * a.min_agreement
        );
        if record.compatible {
            println!(
                "compatible: recorded in {}",
                a.model.join(COMPATIBILITY_FILE).display()
            );
        } else {
            println!(
                "NOT compatible: serve and score refuse this variant with the reference's banks"
            );
        }
    }
    Ok(if record.compatible {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Cosine of each pair of rows.
fn row_cosines(a: &Array2<f32>, b: &Array2<f32>) -> Vec<f64> {
    a.rows()
        .into_iter()
        .zip(b.rows())
        .map(|(x, y)| {
            let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
            for (&p, &q) in x.iter().zip(y.iter()) {
                let (p, q) = (f64::from(p), f64::from(q));
                xy += p * q;
                xx += p * p;
                yy += q * q;
            }
            xy / (xx.sqrt() * yy.sqrt()).max(f64::MIN_POSITIVE)
        })
        .collect()
}

/// The median of sorted values.
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}
