//! `oodgate calibrate --bank BANK [--model DIR] [--method M...] --id INPUT... --tpr 0.95 [--write]`
//!
//! The decision threshold λ (OOD iff S < λ) that keeps a fraction `tpr` of held-out ID inputs,
//! per method; `--write` stores it in the bank (`BankMeta.thresholds[method]`).

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use anyhow::{Context, bail};
use oodgate::detect::adaptive::{AdaptiveCalibration, AdaptiveParams};
use oodgate::detect::bank::Threshold;
use oodgate::detect::detector::Detector;
use oodgate::detect::method::Method;
use oodgate::eval::calibrate::{
    FloorError, adaptive_calibration, adaptive_floor, threshold_for_tpr,
};

use super::common::{ApproxArgs, ModelCtx, OptModelArgs, load_bank, scoring_spec, short};

#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    /// The bank file (.oodb).
    #[arg(long)]
    pub bank: PathBuf,
    #[command(flatten)]
    pub model: OptModelArgs,
    #[command(flatten)]
    pub approx: ApproxArgs,
    /// Score method(s) to calibrate (repeat or comma-separate).
    #[arg(long, value_delimiter = ',', default_value = "ole")]
    pub method: Vec<Method>,
    /// Held-out ID inputs: image files, folders or .npy embeddings.
    #[arg(long, num_args = 1.., required = true)]
    pub id: Vec<PathBuf>,
    /// Fraction of ID inputs that must pass (score ≥ threshold).
    #[arg(long, default_value_t = 0.95)]
    pub tpr: f64,
    /// Logit scale override (cannot be combined with --write: stored thresholds are for the
    /// bank's scale, `bank build --scale`, else the method's default).
    #[arg(long)]
    pub scale: Option<f32>,
    /// Adaptive detector: the ID quantile below which images are admitted to its memory.
    #[arg(long, default_value_t = 0.01)]
    pub adaptive_q_out: f64,
    /// Adaptive detector: the fraction of ID inputs its penalty may push below the threshold
    /// at most (its largest penalty is the score gap between TPR and TPR − ε).
    #[arg(long, default_value_t = 0.03)]
    pub adaptive_epsilon: f64,
    /// Adaptive detector: its floor is this quantile of the ID inputs' k-th nearest-neighbour
    /// cosines among themselves (were the memory full of ID images, about 1 − this fraction of
    /// ID inputs would be penalised at all).
    #[arg(long, default_value_t = 0.95)]
    pub adaptive_floor_quantile: f64,
    /// Adaptive detector: the k of that neighbour (the memory's k; keep them equal).
    #[arg(long, default_value_t = AdaptiveParams::default().k)]
    pub adaptive_k: usize,
    /// Adaptive detector: ID inputs the floor is computed over at most (the memory's size).
    #[arg(long, default_value_t = AdaptiveParams::default().capacity)]
    pub adaptive_capacity: usize,
    /// Store the thresholds in the bank file.
    #[arg(long)]
    pub write: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: CalibrateArgs) -> anyhow::Result<ExitCode> {
    if a.write && a.scale.is_some() {
        bail!(
            "--write stores thresholds for the bank's scale (else each method's default), which \
             `score` uses; drop --scale (or calibrate without --write and pass --threshold to \
             score)"
        );
    }
    let bank = load_bank(&a.bank)?;
    let inputs: Vec<&PathBuf> = a.id.iter().collect();
    let mut ctx = ModelCtx::open(&a.model, &bank, &inputs)?;
    let emb = ctx.embed(&a.id, bank.meta.dim, "calibrating")?;
    if emb.x.nrows() == 0 {
        bail!("none of the ID inputs could be embedded");
    }
    // One floor for every method: it depends on the embeddings only.
    let floor = match adaptive_floor(
        emb.x.view(),
        a.adaptive_k,
        a.adaptive_floor_quantile,
        a.adaptive_capacity,
    ) {
        Ok(f) => Some(f),
        Err(e @ FloorError::TooFew { .. }) => {
            eprintln!("note: no adaptive floor calibrated ({e}); the detector will use 0.75");
            None
        }
        Err(e) => return Err(e).context("calibrating the adaptive floor"),
    };
    let first = a.method.first().copied().unwrap_or_default();
    let base = Detector::new(bank, &scoring_spec(first, a.scale, &a.approx))
        .with_context(|| format!("preparing method {first}"))?;
    let mut results = Vec::new();
    for &method in &a.method {
        let detector = base
            .with_spec(&scoring_spec(method, a.scale, &a.approx))
            .with_context(|| format!("preparing method {method}"))?;
        let scores: Vec<f64> = detector
            .scores(emb.x.view())
            .with_context(|| format!("scoring with method {method}"))?
            .iter()
            .map(|r| r.score)
            .collect();
        let t =
            threshold_for_tpr(&scores, a.tpr).with_context(|| format!("calibrating {method}"))?;
        let adaptive = AdaptiveCalibration {
            floor,
            ..adaptive_calibration(&scores, a.tpr, a.adaptive_q_out, a.adaptive_epsilon)
                .with_context(|| format!("calibrating the adaptive detector of {method}"))?
        };
        results.push((method, detector.params().scale, t, adaptive));
    }
    let mut bank = Arc::unwrap_or_clone(base.into_bank());
    if a.write {
        for (method, scale, t, adaptive) in &results {
            bank.meta.thresholds.insert(
                method.as_str().to_string(),
                Threshold {
                    value: t.threshold,
                    tpr: t.target_tpr,
                    achieved_tpr: t.achieved_tpr,
                    n_id: t.n,
                    source: format!(
                        "oodgate calibrate: {} ID inputs, scale {scale}, model {}",
                        t.n,
                        ctx.fingerprint
                            .as_deref()
                            .map(short)
                            .unwrap_or("unverified (.npy without --model)")
                    ),
                    adaptive: Some(*adaptive),
                },
            );
        }
        bank.refresh_version();
        bank.save(&a.bank)
            .with_context(|| format!("writing {}", a.bank.display()))?;
    }
    if a.json {
        let out = serde_json::json!({
            "bank": a.bank,
            "bank_version": bank.version(),
            "written": a.write,
            "random_weights": ctx.random_weights(&bank),
            "thresholds": results.iter().map(|(m, scale, t, ad)| serde_json::json!({
                "method": m, "scale": scale, "threshold": t.threshold, "tpr": t.target_tpr,
                "achieved_tpr": t.achieved_tpr, "n_pass": t.n_pass, "n_id": t.n,
                "adaptive": ad,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:<12} {:>14} {:>8} {:>12} {:>6}",
            "method", "threshold", "tpr", "achieved", "n_id"
        );
        for (m, _, t, _) in &results {
            println!(
                "{:<12} {:>14.8} {:>8.4} {:>12.4} {:>6}",
                m.as_str(),
                t.threshold,
                t.target_tpr,
                t.achieved_tpr,
                t.n
            );
        }
        if a.write {
            println!(
                "stored in {} (version {})",
                a.bank.display(),
                bank.version()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
