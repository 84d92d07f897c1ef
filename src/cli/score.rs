//! `oodgate score --bank BANK [--model DIR] [--method M] [--threshold X] INPUT... [-o OUT.jsonl]`
//!
//! One JSON line per input, decided by the same [`Detector`] code as `serve`.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use oodgate::detect::detector::{Decision, Detector};
use oodgate::detect::method::Method;

use oodgate::detect::adaptive::run_stream;

use super::common::{AdaptiveArgs, DecisionArgs, ModelCtx, OptModelArgs, load_bank};

#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// The bank file (.oodb).
    #[arg(long)]
    pub bank: PathBuf,
    #[command(flatten)]
    pub model: OptModelArgs,
    #[command(flatten)]
    pub decision: DecisionArgs,
    /// With --adaptive the inputs are one stream in the order given: each is scored against
    /// the confident-OOD inputs admitted before it, and `score` is the adaptive score.
    #[command(flatten)]
    pub adaptive: AdaptiveArgs,
    /// Image files, folders (recursive) or .npy files of image embeddings ([N, D] float16/32).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output JSON Lines file (default: standard output).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Near<'a> {
    label: &'a str,
    cos: f32,
}

/// One output line; fields in this order.
#[derive(serde::Serialize)]
struct Line<'a> {
    input: &'a str,
    score: f64,
    decision: &'static str,
    method: Method,
    threshold: f64,
    scale: f32,
    /// With --adaptive: the static score and what the adaptive term did.
    #[serde(skip_serializing_if = "Option::is_none")]
    static_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    adaptive: Option<AdaptiveLine>,
    top_labels: Vec<Near<'a>>,
    nearest_outliers: Vec<Near<'a>>,
    bank_version: &'a str,
}

#[derive(serde::Serialize)]
struct AdaptiveLine {
    /// The memory held at least k entries when the input was scored.
    active: bool,
    penalty: f64,
    /// The last admission folded in before this input.
    seq: u64,
    /// This input was admitted to the memory (after it was scored).
    admitted: bool,
}

fn pairs(v: &[(String, f32)]) -> Vec<Near<'_>> {
    v.iter().map(|(l, c)| Near { label: l, cos: *c }).collect()
}

pub fn run(a: ScoreArgs) -> anyhow::Result<ExitCode> {
    let spec = a.decision.spec();
    let detector = Detector::new(load_bank(&a.bank)?, &spec)
        .with_context(|| format!("bank {}", a.bank.display()))?;
    let threshold = detector.threshold().context("no threshold was resolved")?;
    let bank_scale = detector
        .bank()
        .meta
        .scale
        .unwrap_or(a.decision.method.default_scale());
    if threshold.source == "bank" && a.decision.scale.is_some_and(|s| s != bank_scale) {
        eprintln!(
            "WARNING: the bank's threshold for {} was calibrated at the bank's scale {}, but \
             --scale changes the scores; recalibrate or pass --threshold",
            a.decision.method, bank_scale
        );
    }
    let bank = detector.bank();
    let inputs: Vec<&PathBuf> = a.inputs.iter().collect();
    let mut ctx = ModelCtx::open(&a.model, bank, &inputs)?;
    let emb = ctx.embed(&a.inputs, bank.meta.dim, "scoring")?;
    let mut verdicts = detector
        .verdicts(emb.x.view())
        .with_context(|| format!("scoring with method {}", a.decision.method))?;
    // The adaptive detector: the inputs in the order given are the stream. The verdicts
    // already hold each static score and bucket.
    if a.adaptive.adaptive {
        let statics: Vec<(f64, u32)> = verdicts
            .iter()
            .map(|v| (v.score, u32::try_from(v.top_id).unwrap_or(u32::MAX)))
            .collect();
        let mut mem = a.adaptive.memory(bank, a.decision.method)?;
        let order: Vec<usize> = (0..statics.len()).collect();
        let out = run_stream(&mut mem, emb.x.view(), &statics, &order, a.model.batch)?;
        let penalised = out.iter().filter(|r| r.penalty > 0.0).count();
        for (v, ad) in verdicts.iter_mut().zip(out) {
            v.adapt(ad, threshold.value);
        }
        let st = mem.stats();
        eprintln!(
            "adaptive: {} admitted, {} evicted, {} in memory, {penalised} penalised (floor {})",
            st.admissions,
            st.evictions,
            st.entries,
            mem.params().floor
        );
    }

    let sink: Box<dyn Write> = match &a.output {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let mut w = BufWriter::new(sink);
    let (mut n_id, mut n_ood) = (0usize, 0usize);
    for (name, v) in emb.names.iter().zip(&verdicts) {
        let ad = v.adaptive.as_ref();
        match v.decision {
            Decision::Id => n_id += 1,
            Decision::Ood => n_ood += 1,
        }
        let line = Line {
            input: name,
            score: v.score,
            decision: v.decision.as_str(),
            method: a.decision.method,
            threshold: threshold.value,
            scale: detector.params().scale,
            static_score: ad.map(|r| r.static_score),
            adaptive: ad.map(|r| AdaptiveLine {
                active: r.active,
                penalty: r.penalty,
                seq: r.seq,
                admitted: r.admitted,
            }),
            top_labels: v
                .explanation
                .as_ref()
                .map(|e| pairs(&e.top_labels))
                .unwrap_or_default(),
            nearest_outliers: v
                .explanation
                .as_ref()
                .map(|e| pairs(&e.nearest_outliers))
                .unwrap_or_default(),
            bank_version: bank.version(),
        };
        serde_json::to_writer(&mut w, &line)?;
        w.write_all(b"\n")?;
    }
    for (name, why) in &emb.failures {
        serde_json::to_writer(
            &mut w,
            &serde_json::json!({"input": name, "error": why, "method": a.decision.method}),
        )?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    drop(w);
    eprintln!(
        "scored {} inputs with {} (threshold {:.6} from {}): {n_id} id, {n_ood} ood{}",
        verdicts.len(),
        a.decision.method,
        threshold.value,
        threshold.source,
        if emb.failures.is_empty() {
            String::new()
        } else {
            format!(", {} failed", emb.failures.len())
        }
    );
    Ok(ExitCode::SUCCESS)
}
