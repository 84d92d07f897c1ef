//! `oodgate score --bank BANK [--model DIR] [--method M] [--threshold X] INPUT... [-o OUT.jsonl]`
//!
//! Also the input handling shared by `eval` and `calibrate`: image files and folders go through
//! the model, `.npy` files of precomputed image embeddings (float16/32, `[N, D]`) are read as is.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use ndarray::{Array2, Axis, s};
use oodgate::detect::approx::ApproxParams;
use oodgate::detect::bank::{Bank, BankIndex};
use oodgate::detect::index::IndexParams;
use oodgate::detect::method::{Method, ScoreParams, ScoreRow};
use oodgate::detect::norm::normalize_rows_off_unit;
use oodgate::model::pipeline::{collect_images, embed_image_files};
use oodgate::model::preprocess::Limits;
use oodgate::model::{Encoder, ModelManifest, OrtEncoder, Preprocessor, RANDOM_WEIGHTS_WARNING};
use oodgate::npy::read_npy;

use super::common::{ModelArgs, decode_workers, progress, rows_file};

/// Model flags where the model is optional (inputs may be precomputed embeddings).
#[derive(Debug, Clone, clap::Args)]
pub struct OptModelArgs {
    /// Model folder: needed for image inputs; with .npy inputs it only checks the bank's
    /// model fingerprint.
    #[arg(long, env = "OODGATE_MODEL")]
    pub model: Option<PathBuf>,
    /// Execution provider: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "OODGATE_DEVICE", default_value = "auto")]
    pub device: String,
    /// ONNX Runtime intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, then the project's .ort/lib).
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
    /// Use the bank even if it was built with another model (fingerprint mismatch).
    #[arg(long)]
    pub force: bool,
    /// Images per encoder batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
}

impl OptModelArgs {
    fn full(&self, model: &Path) -> ModelArgs {
        ModelArgs {
            model: model.to_path_buf(),
            device: self.device.clone(),
            threads: self.threads,
            ort_library: self.ort_library.clone(),
        }
    }
}

/// The model side of a scoring command: the loaded encoder (only when images must be
/// embedded) and what is known about the model.
pub struct ModelCtx {
    pub encoder: Option<OrtEncoder>,
    pub fingerprint: Option<String>,
    pub random: bool,
    args: OptModelArgs,
}

fn is_npy(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
}

impl ModelCtx {
    /// Resolves the model for `inputs` and checks it against the bank's fingerprint: loads
    /// the encoder when some input is not a `.npy`, else only reads the manifest if given.
    pub fn open(args: &OptModelArgs, bank: &Bank, inputs: &[&PathBuf]) -> anyhow::Result<Self> {
        let needs_images = inputs.iter().any(|p| !is_npy(p));
        let mut ctx = ModelCtx {
            encoder: None,
            fingerprint: None,
            random: false,
            args: args.clone(),
        };
        match &args.model {
            Some(dir) if needs_images => {
                let enc = args.full(dir).load(false)?;
                ctx.fingerprint = Some(enc.info().fingerprint.clone());
                ctx.random = enc.manifest().is_random();
                ctx.encoder = Some(enc);
            }
            Some(dir) => {
                let m = ModelManifest::load(dir)
                    .with_context(|| format!("reading model {}", dir.display()))?;
                ctx.fingerprint = Some(
                    m.fingerprint()
                        .with_context(|| format!("fingerprinting model {}", dir.display()))?,
                );
                ctx.random = m.is_random();
                if ctx.random {
                    eprintln!("{RANDOM_WEIGHTS_WARNING}");
                }
            }
            None if needs_images => bail!(
                "image inputs need the model that built the bank: pass --model DIR (or set \
                 OODGATE_MODEL), or give .npy embeddings from `oodgate embed`"
            ),
            None => {
                eprintln!(
                    "note: no --model given; cannot verify that the .npy embeddings come from the \
                     bank's model ({})",
                    short(&bank.meta.model_fingerprint)
                );
            }
        }
        if let Some(fp) = &ctx.fingerprint {
            bank.check_model(fp, args.force).with_context(|| {
                format!(
                    "checking the bank against model {}",
                    args.model
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )
            })?;
            if &bank.meta.model_fingerprint != fp {
                eprintln!(
                    "WARNING: --force: bank built with model {} but scoring with {fp}",
                    bank.meta.model_fingerprint
                );
            }
        }
        if !ctx.random && bank.meta.model_weights == "random" {
            eprintln!(
                "WARNING: this bank was built with a random-weight model: scores carry no meaning"
            );
        }
        Ok(ctx)
    }

    /// True when the model or the bank's model has random weights.
    pub fn random_weights(&self, bank: &Bank) -> bool {
        self.random || bank.meta.model_weights == "random"
    }

    /// Embeds `inputs` (files, folders, `.npy`) in input order; `what` labels the progress bar.
    pub fn embed(&mut self, inputs: &[PathBuf], dim: usize, what: &str) -> anyhow::Result<Inputs> {
        enum Seg {
            Npy(Vec<String>, Array2<f32>),
            Images(Vec<PathBuf>),
        }
        let mut segs = Vec::new();
        let mut files: Vec<PathBuf> = Vec::new();
        for p in inputs {
            if is_npy(p) {
                let mut m = read_npy(p)?;
                if m.ncols() != dim {
                    bail!(
                        "{}: embeddings have dimension {}, the bank's is {dim}",
                        p.display(),
                        m.ncols()
                    );
                }
                normalize_rows_off_unit(&mut m, 1e-6).map_err(|row| {
                    anyhow::anyhow!(
                        "{}: row {row} is zero or not finite; cannot score it",
                        p.display()
                    )
                })?;
                segs.push(Seg::Npy(npy_names(p, m.nrows()), m));
            } else {
                let found = collect_images(std::slice::from_ref(p))
                    .with_context(|| format!("reading input {}", p.display()))?;
                if found.is_empty() {
                    eprintln!("warning: no image files in {}", p.display());
                }
                files.extend(found.iter().cloned());
                segs.push(Seg::Images(found));
            }
        }
        let mut by_path: HashMap<PathBuf, usize> = HashMap::new();
        let mut failed: HashMap<PathBuf, String> = HashMap::new();
        let mut image_emb = Array2::<f32>::zeros((0, dim));
        if !files.is_empty() {
            let enc = self.encoder.as_mut().context("image inputs need --model")?;
            let pre = Preprocessor::from_manifest(enc.manifest(), Limits::default());
            let pb = progress(files.len(), what);
            let out =
                embed_image_files(enc, &pre, &files, self.args.batch, decode_workers(), |n| {
                    pb.inc(n as u64)
                })?;
            pb.finish_and_clear();
            if out.embeddings.ncols() != dim {
                bail!(
                    "the model's embeddings have dimension {}, the bank's is {dim}",
                    out.embeddings.ncols()
                );
            }
            for (i, p) in out.paths.iter().enumerate() {
                by_path.insert(p.clone(), i);
            }
            for f in &out.failures {
                let path = match f {
                    oodgate::model::pipeline::FileError::Read { path, .. }
                    | oodgate::model::pipeline::FileError::Preprocess { path, .. } => path.clone(),
                };
                failed.insert(path, f.to_string());
            }
            image_emb = out.embeddings;
        }
        let mut names = Vec::new();
        let mut rows: Vec<Array2<f32>> = Vec::new();
        let mut failures = Vec::new();
        for seg in segs {
            match seg {
                Seg::Npy(n, m) => {
                    names.extend(n);
                    rows.push(m);
                }
                Seg::Images(paths) => {
                    let mut idx = Vec::new();
                    for p in paths {
                        match by_path.get(&p) {
                            Some(&i) => {
                                idx.push(i);
                                names.push(p.display().to_string());
                            }
                            None => failures.push((
                                p.display().to_string(),
                                failed
                                    .get(&p)
                                    .cloned()
                                    .unwrap_or_else(|| "not embedded".into()),
                            )),
                        }
                    }
                    rows.push(image_emb.select(Axis(0), &idx));
                }
            }
        }
        let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
        let x = if views.is_empty() {
            Array2::zeros((0, dim))
        } else {
            ndarray::concatenate(Axis(0), &views)?
        };
        for (name, why) in &failures {
            eprintln!("skipped {name}: {why}");
        }
        Ok(Inputs { names, x, failures })
    }
}

/// Row names of a `.npy`: the lines of `OUT.txt` written beside it by `oodgate embed` when it
/// has one per row, else `FILE.npy[i]`.
fn npy_names(p: &Path, n: usize) -> Vec<String> {
    if let Ok(text) = std::fs::read_to_string(rows_file(p)) {
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() == n {
            return lines;
        }
    }
    (0..n).map(|i| format!("{}[{i}]", p.display())).collect()
}

/// Embedded inputs in input order.
pub struct Inputs {
    pub names: Vec<String>,
    pub x: Array2<f32>,
    /// (input, reason) of the inputs that could not be embedded.
    pub failures: Vec<(String, String)>,
}

/// The first 16 hex digits of a fingerprint.
pub fn short(fp: &str) -> &str {
    fp.get(..16).unwrap_or(fp)
}

pub fn load_bank(path: &Path) -> anyhow::Result<Bank> {
    Bank::load(path).with_context(|| format!("loading bank {}", path.display()))
}

/// Score parameters of `method`, with the scale overridden when given.
pub fn params_for(method: Method, scale: Option<f32>) -> ScoreParams {
    let mut p = ScoreParams::for_method(method);
    if let Some(s) = scale {
        p.scale = s;
    }
    p
}

/// Approximate scoring of large outlier banks (the `detector.exact_limit` family of keys).
#[derive(Debug, Clone, clap::Args)]
pub struct ApproxArgs {
    /// Banks with more outlier rows than this are scored approximately: an HNSW head summed
    /// exactly plus a sampled estimate of the rest of the softmax denominator.
    #[arg(long, default_value_t = ApproxParams::default().exact_limit)]
    pub exact_limit: usize,
    /// Approximate scoring: outlier rows per image taken from HNSW.
    #[arg(long, default_value_t = ApproxParams::default().candidates)]
    pub approx_candidates: usize,
    /// Approximate scoring: HNSW search breadth.
    #[arg(long, default_value_t = ApproxParams::default().ef_search)]
    pub approx_ef_search: usize,
    /// Approximate scoring: size of the uniform sample that estimates the tail.
    #[arg(long, default_value_t = ApproxParams::default().tail_sample)]
    pub approx_tail_sample: usize,
}

impl ApproxArgs {
    pub fn params(&self) -> ApproxParams {
        ApproxParams {
            exact_limit: self.exact_limit,
            candidates: self.approx_candidates,
            ef_search: self.approx_ef_search,
            tail_sample: self.approx_tail_sample,
            seed: 0,
        }
    }
}

/// A bank ready to score: its HNSW index is loaded (or built) once, and only when
/// explanations or approximate scoring need it.
pub struct BankScoring<'a> {
    pub bank: &'a Bank,
    approx: ApproxParams,
    index: Option<BankIndex>,
}

impl<'a> BankScoring<'a> {
    pub fn new(bank: &'a Bank, approx: ApproxParams, explain: bool) -> anyhow::Result<Self> {
        approx.validate()?;
        let approximate = approx.applies_to(bank.outliers.nrows());
        let index = (explain || approximate).then(|| bank.indexes(IndexParams::default()));
        Ok(BankScoring {
            bank,
            approx,
            index,
        })
    }

    /// The HNSW indexes, when loaded.
    pub fn index(&self) -> Option<&BankIndex> {
        self.index.as_ref()
    }

    /// Scores every row of `x` (in blocks, to bound memory).
    pub fn score_rows(
        &self,
        x: &Array2<f32>,
        method: Method,
        params: &ScoreParams,
    ) -> anyhow::Result<Vec<ScoreRow>> {
        score_rows_with(
            self.bank,
            self.index.as_ref().map(|ix| (ix, self.approx)),
            x,
            method,
            params,
        )
    }
}

/// Scores every row of `x` (in blocks, to bound memory), exactly or with `approx`.
fn score_rows_with(
    bank: &Bank,
    approx: Option<(&BankIndex, ApproxParams)>,
    x: &Array2<f32>,
    method: Method,
    params: &ScoreParams,
) -> anyhow::Result<Vec<ScoreRow>> {
    let mut scorer = bank
        .scorer(params)
        .with_context(|| format!("preparing method {method}"))?;
    if let Some((ix, p)) = approx {
        scorer = scorer
            .with_approximation(ix.outliers.clone(), p)
            .context("preparing approximate scoring")?;
    }
    let mut out = Vec::with_capacity(x.nrows());
    let mut start = 0;
    while start < x.nrows() {
        let end = (start + 4096).min(x.nrows());
        out.extend(
            scorer
                .score_batch_detailed(x.slice(s![start..end, ..]), method, params)
                .with_context(|| format!("scoring with method {method}"))?,
        );
        start = end;
    }
    Ok(out)
}

/// `--threshold`, else the bank's calibrated threshold for the method, else an error that
/// says how to calibrate.
pub fn resolve_threshold(
    bank: &Bank,
    bank_path: &Path,
    method: Method,
    given: Option<f64>,
    scale: Option<f32>,
) -> anyhow::Result<(f64, &'static str)> {
    if let Some(t) = given {
        if !t.is_finite() {
            bail!("--threshold must be a finite number, got {t}");
        }
        return Ok((t, "--threshold"));
    }
    match bank.meta.thresholds.get(method.as_str()) {
        Some(t) => {
            if scale.is_some_and(|s| s != method.default_scale()) {
                eprintln!(
                    "WARNING: the bank's threshold for {method} was calibrated at the default scale \
                     {}, but --scale changes the scores; recalibrate or pass --threshold",
                    method.default_scale()
                );
            }
            Ok((t.value, "bank"))
        }
        None => bail!(
            "the bank {} has no calibrated threshold for method `{method}` (it has: {}); \
             calibrate one on held-out ID images with\n  oodgate calibrate --bank {} --model DIR \
             --method {method} --id ID_IMAGES... --tpr 0.95 --write\nor pass --threshold X",
            bank_path.display(),
            if bank.meta.thresholds.is_empty() {
                "none".to_string()
            } else {
                bank.meta
                    .thresholds
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            bank_path.display()
        ),
    }
}

#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// The bank file (.oodb).
    #[arg(long)]
    pub bank: PathBuf,
    #[command(flatten)]
    pub model: OptModelArgs,
    /// Score method: ole, ole-max, ole-penalty, clipn-atd, clipn-ctw, mcm, energy, max-logit,
    /// neglabel.
    #[arg(long, default_value = "ole")]
    pub method: Method,
    /// Decision threshold: OOD iff score < X (default: the bank's calibrated threshold).
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Logit scale s = 1/T (default: the method's, e.g. 50 for ole).
    #[arg(long)]
    pub scale: Option<f32>,
    /// Nearest ID labels and outlier words reported per input (0 = none).
    #[arg(long, default_value_t = 3)]
    pub top_k: usize,
    #[command(flatten)]
    pub approx: ApproxArgs,
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
    top_labels: Vec<Near<'a>>,
    nearest_outliers: Vec<Near<'a>>,
    bank_version: &'a str,
}

fn pairs(v: &[(String, f32)]) -> Vec<Near<'_>> {
    v.iter().map(|(l, c)| Near { label: l, cos: *c }).collect()
}

pub fn run(a: ScoreArgs) -> anyhow::Result<ExitCode> {
    let bank = load_bank(&a.bank)?;
    let (threshold, source) = resolve_threshold(&bank, &a.bank, a.method, a.threshold, a.scale)?;
    let params = params_for(a.method, a.scale);
    params.validate()?;
    let inputs: Vec<&PathBuf> = a.inputs.iter().collect();
    let mut ctx = ModelCtx::open(&a.model, &bank, &inputs)?;
    let emb = ctx.embed(&a.inputs, bank.meta.dim, "scoring")?;
    let scoring = BankScoring::new(&bank, a.approx.params(), a.top_k > 0)?;
    let rows = scoring.score_rows(&emb.x, a.method, &params)?;
    let index = scoring.index().filter(|_| a.top_k > 0);

    let sink: Box<dyn Write> = match &a.output {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let mut w = BufWriter::new(sink);
    let (mut n_id, mut n_ood) = (0usize, 0usize);
    for (i, (name, r)) in emb.names.iter().zip(&rows).enumerate() {
        let ood = r.score < threshold;
        if ood {
            n_ood += 1;
        } else {
            n_id += 1;
        }
        let expl = index.as_ref().map(|ix| {
            let x = emb.x.row(i).to_vec();
            ix.explain(&bank, &x, a.top_k)
        });
        let line = Line {
            input: name,
            score: r.score,
            decision: if ood { "ood" } else { "id" },
            method: a.method,
            threshold,
            scale: params.scale,
            top_labels: expl
                .as_ref()
                .map(|e| pairs(&e.top_labels))
                .unwrap_or_default(),
            nearest_outliers: expl
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
            &serde_json::json!({"input": name, "error": why, "method": a.method}),
        )?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    drop(w);
    eprintln!(
        "scored {} inputs with {} (threshold {threshold:.6} from {source}): {n_id} id, {n_ood} ood{}",
        rows.len(),
        a.method,
        if emb.failures.is_empty() {
            String::new()
        } else {
            format!(", {} failed", emb.failures.len())
        }
    );
    Ok(ExitCode::SUCCESS)
}
