//! `oodgate eval --bank BANK [--bank BANK2...] [--model DIR] [--method M...] --id INPUT...
//! --ood NAME=INPUT... [--bootstrap N] [--json] [--plot OUT.png]`
//!
//! AUROC, FPR95, AUPR-In and AUPR-Out (docs/method.md §10) per OOD set and averaged over the sets,
//! for every bank × method side by side on the same inputs (embedded once), with paired
//! bootstrap intervals of each row's AUROC and FPR95 difference against the first row. The
//! table is in percent; `--json` gives fractions.
//! `--plot` draws ROC curves (one panel per OOD set, one curve per method) above score
//! histograms (one panel per method: ID vs all OOD sets pooled). The plot has no text: the
//! colours and the panel order are printed on the terminal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use oodgate::detect::adaptive::{run_stream, shuffled};
use oodgate::detect::bank::Bank;
use oodgate::detect::detector::Detector;
use oodgate::detect::method::{Method, ScoreRow};
use oodgate::eval::bootstrap::{Interval, MetricDiff, RowScores, paired_bootstrap};
use oodgate::eval::metrics::{Metrics, evaluate, roc_curve};
use oodgate::model::RANDOM_WEIGHTS_WARNING;
use serde::Serialize;

use super::common::{
    AdaptiveArgs, ApproxArgs, ModelCtx, OptModelArgs, load_bank, scoring_spec, short,
};

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Bank files (.oodb); repeat to compare banks on the same inputs. The first row (first
    /// bank, first method) is the reference of the bootstrap differences.
    #[arg(long, required = true)]
    pub bank: Vec<PathBuf>,
    #[command(flatten)]
    pub model: OptModelArgs,
    #[command(flatten)]
    pub approx: ApproxArgs,
    /// With --adaptive, each OOD set is streamed with the ID inputs in a seeded random order
    /// (the memory starts empty for each set) and every bank × method gets an adaptive row.
    #[command(flatten)]
    pub adaptive: AdaptiveArgs,
    /// Seed of the stream order of --adaptive (set s uses seed + s).
    #[arg(long, default_value_t = 0)]
    pub order_seed: u64,
    /// Methods to compare (repeat or comma-separate; default: every method the bank supports).
    #[arg(long, value_delimiter = ',')]
    pub method: Vec<Method>,
    /// ID inputs: image files, folders or .npy embeddings.
    #[arg(long, num_args = 1.., required = true)]
    pub id: Vec<PathBuf>,
    /// An OOD set as NAME=INPUT (file, folder or .npy); repeat for more sets or more inputs of
    /// one set.
    #[arg(long, required = true)]
    pub ood: Vec<String>,
    /// Logit scale override, applied to every method (default: each bank's, else the
    /// method's).
    #[arg(long)]
    pub scale: Option<f32>,
    /// Paired bootstrap replicates for the 95% intervals of each row's AUROC and FPR95
    /// difference against the first row (0 = none).
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Seed of the bootstrap resampling.
    #[arg(long, default_value_t = 0)]
    pub bootstrap_seed: u64,
    /// Print JSON (fractions) instead of the table (percent).
    #[arg(long)]
    pub json: bool,
    /// Draw ROC curves and score histograms into this PNG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Average {
    auroc: f64,
    fpr95: f64,
    aupr_in: f64,
    aupr_out: f64,
}

/// One AUROC/FPR95 difference against the first row, per OOD set and averaged.
#[derive(Debug, Serialize)]
struct VsFirst {
    sets: BTreeMap<String, MetricDiff>,
    average: MetricDiff,
}

#[derive(Debug, Serialize)]
struct MethodResult {
    /// The bank file, its version and a short name for tables.
    bank: PathBuf,
    bank_version: String,
    bank_label: String,
    method: Method,
    /// Scored by the adaptive detector.
    adaptive: bool,
    scale: f32,
    sets: BTreeMap<String, Metrics>,
    average: Average,
    /// This row minus the first row, with the bootstrap interval (None for the first row).
    vs_first: Option<VsFirst>,
    #[serde(skip)]
    id_scores: Vec<f64>,
    /// The ID scores paired with each OOD set, where they differ by set (adaptive rows).
    #[serde(skip)]
    id_per_set: Option<Vec<Vec<f64>>>,
    #[serde(skip)]
    ood_scores: Vec<(String, Vec<f64>)>,
}

/// Every method that can run on this bank.
fn default_methods(bank: &Bank) -> Vec<Method> {
    let neglabel_bank = bank.meta.build.get("mode").and_then(|m| m.as_str()) == Some("neglabel");
    Method::ALL
        .into_iter()
        .filter(|m| !m.requires_no_embeddings() || bank.no.is_some())
        .filter(|m| *m != Method::NegLabel || (neglabel_bank && bank.outliers.nrows() > 0))
        .collect()
}

fn parse_ood(specs: &[String]) -> anyhow::Result<Vec<(String, Vec<PathBuf>)>> {
    let mut sets: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for s in specs {
        let Some((name, input)) = s.split_once('=') else {
            bail!("--ood {s:?}: expected NAME=INPUT, e.g. --ood textures=data/dtd");
        };
        let name = name.trim();
        if name.is_empty() || input.is_empty() {
            bail!("--ood {s:?}: expected NAME=INPUT with a non-empty name and input");
        }
        match sets.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => v.push(PathBuf::from(input)),
            None => sets.push((name.to_string(), vec![PathBuf::from(input)])),
        }
    }
    Ok(sets)
}

fn average_of(per_set: &BTreeMap<String, Metrics>) -> Average {
    let n = per_set.len() as f64;
    let mean = |f: fn(&Metrics) -> f64| per_set.values().map(f).sum::<f64>() / n;
    Average {
        auroc: mean(|m| m.auroc),
        fpr95: mean(|m| m.fpr95),
        aupr_in: mean(|m| m.aupr_in),
        aupr_out: mean(|m| m.aupr_out),
    }
}

/// Short, distinct names of the banks for tables: file stems, with the parent folder added
/// where two stems collide.
fn bank_labels(paths: &[PathBuf]) -> Vec<String> {
    let stem = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    paths
        .iter()
        .map(|p| {
            let s = stem(p);
            if paths.iter().filter(|q| stem(q) == s).count() > 1 {
                p.display().to_string()
            } else {
                s
            }
        })
        .collect()
}

pub fn run(a: EvalArgs) -> anyhow::Result<ExitCode> {
    let mut banks = Vec::with_capacity(a.bank.len());
    for p in &a.bank {
        banks.push(load_bank(p)?);
    }
    let labels = bank_labels(&a.bank);
    let first_bank = &banks[0];
    for (b, p) in banks.iter().zip(&a.bank).skip(1) {
        if b.meta.dim != first_bank.meta.dim {
            bail!(
                "{} has dimension {} but {} has {}: banks compared on the same inputs must come \
                 from the same model",
                p.display(),
                b.meta.dim,
                a.bank[0].display(),
                first_bank.meta.dim
            );
        }
        if b.meta.model_fingerprint != first_bank.meta.model_fingerprint && !a.model.force {
            bail!(
                "{} was built for model {} but {} for {}: the same embeddings cannot serve both \
                 (--force to compare anyway)",
                p.display(),
                short(&b.meta.model_fingerprint),
                a.bank[0].display(),
                short(&first_bank.meta.model_fingerprint)
            );
        }
    }
    let sets = parse_ood(&a.ood)?;
    let all_inputs: Vec<&PathBuf> =
        a.id.iter()
            .chain(sets.iter().flat_map(|(_, v)| v))
            .collect();
    let mut ctx = ModelCtx::open(&a.model, first_bank, &all_inputs)?;
    let random = banks.iter().any(|b| ctx.random_weights(b));
    let id = ctx.embed(&a.id, first_bank.meta.dim, "ID inputs")?;
    if id.x.nrows() == 0 {
        bail!("none of the ID inputs could be embedded");
    }
    let mut ood = Vec::new();
    for (name, inputs) in &sets {
        let e = ctx.embed(inputs, first_bank.meta.dim, name)?;
        if e.x.nrows() == 0 {
            bail!("none of the inputs of OOD set {name} could be embedded");
        }
        ood.push((name.clone(), e));
    }

    let fingerprint = first_bank.meta.model_fingerprint.clone();
    let mut results = Vec::new();
    for ((bank, path), label) in banks.into_iter().zip(&a.bank).zip(&labels) {
        let methods = if a.method.is_empty() {
            default_methods(&bank)
        } else {
            let mut m = a.method.clone();
            m.dedup();
            m
        };
        let first = methods.first().copied().unwrap_or_default();
        let base = Detector::new(bank, &scoring_spec(first, a.scale, &a.approx))
            .with_context(|| format!("{}: preparing method {first}", path.display()))?;
        for &method in &methods {
            let detector = base
                .with_spec(&scoring_spec(method, a.scale, &a.approx))
                .with_context(|| format!("{}: preparing method {method}", path.display()))?;
            let score = |x: &ndarray::Array2<f32>| -> anyhow::Result<Vec<ScoreRow>> {
                detector
                    .scores(x.view())
                    .with_context(|| format!("scoring with method {method}"))
            };
            let id_rows = score(&id.x)?;
            let id_scores: Vec<f64> = id_rows.iter().map(|r| r.score).collect();
            let mut per_set = BTreeMap::new();
            let mut ood_scores = Vec::new();
            let mut ood_rows = Vec::new();
            for (name, e) in &ood {
                let rows = score(&e.x)?;
                let s: Vec<f64> = rows.iter().map(|r| r.score).collect();
                let m = evaluate(&id_scores, &s)
                    .with_context(|| format!("metrics of {method} on {name}"))?;
                per_set.insert(name.clone(), m);
                ood_scores.push((name.clone(), s));
                ood_rows.push(rows);
            }
            // One row of the table; `id_per_set` only where the ID scores differ by set.
            let row = |adaptive: bool,
                       per_set: BTreeMap<String, Metrics>,
                       id_scores: Vec<f64>,
                       id_per_set: Option<Vec<Vec<f64>>>,
                       ood_scores: Vec<(String, Vec<f64>)>| MethodResult {
                bank: path.clone(),
                bank_version: detector.bank().version().to_string(),
                bank_label: label.clone(),
                method,
                adaptive,
                scale: detector.params().scale,
                average: average_of(&per_set),
                sets: per_set,
                vs_first: None,
                id_scores,
                id_per_set,
                ood_scores,
            };
            results.push(row(false, per_set, id_scores, None, ood_scores));
            if !a.adaptive.adaptive {
                continue;
            }
            // The adaptive row: each OOD set streamed with the ID inputs, memory empty at start.
            let mut per_set = BTreeMap::new();
            let mut id_per_set = Vec::new();
            let mut ood_scores = Vec::new();
            for (s, ((name, e), rows)) in ood.iter().zip(&ood_rows).enumerate() {
                let x = ndarray::concatenate(ndarray::Axis(0), &[id.x.view(), e.x.view()])?;
                let statics: Vec<(f64, u32)> = id_rows
                    .iter()
                    .chain(rows)
                    .map(|r| (r.score, r.top_id as u32))
                    .collect();
                let order = shuffled(x.nrows(), a.order_seed.wrapping_add(s as u64));
                let mut mem = a.adaptive.memory(detector.bank(), method)?;
                let adapted = run_stream(&mut mem, x.view(), &statics, &order, a.model.batch)?;
                let (ids, oods) = adapted.split_at(id.x.nrows());
                let ids: Vec<f64> = ids.iter().map(|r| r.score).collect();
                let oods: Vec<f64> = oods.iter().map(|r| r.score).collect();
                let m = evaluate(&ids, &oods)
                    .with_context(|| format!("metrics of adaptive {method} on {name}"))?;
                per_set.insert(name.clone(), m);
                id_per_set.push(ids);
                ood_scores.push((name.clone(), oods));
            }
            let first_ids = id_per_set.first().cloned().unwrap_or_default();
            results.push(row(true, per_set, first_ids, Some(id_per_set), ood_scores));
        }
    }

    // Paired bootstrap of every row against the first.
    let rows: Vec<RowScores<'_>> = results
        .iter()
        .map(|r| RowScores {
            id: match &r.id_per_set {
                Some(v) => v.iter().map(Vec::as_slice).collect(),
                None => vec![r.id_scores.as_slice(); r.ood_scores.len()],
            },
            ood: r.ood_scores.iter().map(|(_, s)| s.as_slice()).collect(),
        })
        .collect();
    let diffs = paired_bootstrap(&rows, a.bootstrap, a.bootstrap_seed)
        .context("bootstrap of the differences")?;
    drop(rows);
    for (r, d) in results.iter_mut().skip(1).zip(diffs) {
        r.vs_first = Some(VsFirst {
            sets: sets.iter().map(|(n, _)| n.clone()).zip(d.sets).collect(),
            average: d.average,
        });
    }
    let label = |r: &MethodResult| {
        let m = if r.adaptive {
            format!("{}+adaptive", r.method)
        } else {
            r.method.to_string()
        };
        if a.bank.len() > 1 {
            format!("{}/{m}", r.bank_label)
        } else {
            m
        }
    };

    if let Some(path) = &a.plot {
        plot(
            path,
            &results,
            &sets.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        )
        .with_context(|| format!("drawing {}", path.display()))?;
        eprintln!(
            "plot {}: top row ROC per OOD set ({}), x = FPR, y = TPR, grey diagonal = chance; \
             bottom row score histograms per method ({}), green = ID, red = OOD (all sets); \
             curve colours: {}",
            path.display(),
            sets.iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            results.iter().map(label).collect::<Vec<_>>().join(", "),
            results
                .iter()
                .enumerate()
                .map(|(i, r)| format!("{} = {}", label(r), COLOR_NAMES[i % COLOR_NAMES.len()]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let first_bank = &results[0];
    if a.json {
        let out = serde_json::json!({
            "bank": first_bank.bank,
            "bank_version": first_bank.bank_version,
            "banks": a.bank.iter().zip(&labels).map(|(p, l)| serde_json::json!({"path": p, "label": l})).collect::<Vec<_>>(),
            "model_fingerprint": fingerprint,
            "random_weights": random,
            "warning": random.then_some(RANDOM_WEIGHTS_WARNING),
            "score_direction": "higher = more in-distribution; metrics are fractions",
            "n_id": id.x.nrows(),
            "ood_sets": ood.iter().map(|(n, e)| serde_json::json!({"name": n, "n": e.x.nrows()})).collect::<Vec<_>>(),
            "bootstrap": {"replicates": a.bootstrap, "seed": a.bootstrap_seed, "interval": 0.95, "reference": label(first_bank)},
            "results": results,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if random {
        println!("{}", "=".repeat(100));
        println!("{RANDOM_WEIGHTS_WARNING}");
        println!("{}", "=".repeat(100));
    }
    println!(
        "ID: {} inputs; OOD: {}; metrics in percent (ID positive, higher score = ID)",
        id.x.nrows(),
        ood.iter()
            .map(|(n, e)| format!("{n} ({})", e.x.nrows()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let width = results
        .iter()
        .map(|r| label(r).len())
        .max()
        .unwrap_or(0)
        .max(12);
    println!(
        "{:<width$} {:<16} {:>7} {:>7} {:>8} {:>8} {:>6} {:>6}",
        "method", "ood set", "AUROC", "FPR95", "AUPR-In", "AUPR-Out", "n_id", "n_ood"
    );
    for r in &results {
        let name = label(r);
        for (set, m) in &r.sets {
            println!(
                "{:<width$} {:<16} {:>7.2} {:>7.2} {:>8.2} {:>8.2} {:>6} {:>6}",
                name,
                set,
                100.0 * m.auroc,
                100.0 * m.fpr95,
                100.0 * m.aupr_in,
                100.0 * m.aupr_out,
                m.n_id,
                m.n_ood
            );
        }
        if r.sets.len() > 1 {
            let m = &r.average;
            println!(
                "{:<width$} {:<16} {:>7.2} {:>7.2} {:>8.2} {:>8.2}",
                name,
                "average",
                100.0 * m.auroc,
                100.0 * m.fpr95,
                100.0 * m.aupr_in,
                100.0 * m.aupr_out
            );
        }
    }
    if results.len() > 1 {
        println!(
            "\ndifference to {} (percentage points; 95% paired bootstrap interval, {} replicates, \
             seed {}), averaged over the OOD sets:",
            label(first_bank),
            a.bootstrap,
            a.bootstrap_seed
        );
        println!("{:<width$} {:>26} {:>26}", "", "ΔAUROC", "ΔFPR95");
        let iv = |i: &Interval| {
            format!(
                "{:+7.2} [{:+7.2}, {:+7.2}]",
                100.0 * i.diff,
                100.0 * i.lo,
                100.0 * i.hi
            )
        };
        for r in results.iter().skip(1) {
            if let Some(v) = &r.vs_first {
                println!(
                    "{:<width$} {:>26} {:>26}",
                    label(r),
                    iv(&v.average.auroc),
                    iv(&v.average.fpr95)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

const COLOR_NAMES: [&str; 9] = [
    "red", "blue", "green", "orange", "purple", "cyan", "magenta", "brown", "black",
];
const COLORS: [(u8, u8, u8); 9] = [
    (220, 30, 30),
    (30, 60, 220),
    (20, 160, 40),
    (240, 150, 0),
    (130, 40, 180),
    (0, 180, 200),
    (220, 0, 180),
    (130, 80, 30),
    (0, 0, 0),
];

fn plot(path: &Path, results: &[MethodResult], sets: &[String]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    const PANEL: u32 = 300;
    let cols = sets.len().max(results.len()).max(1) as u32;
    let (w, h) = (PANEL * cols, PANEL * 2);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let e = |e: &dyn std::fmt::Display| anyhow::anyhow!("plotting: {e}");
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (top, bottom) = root.split_vertically(PANEL);
        let top_cells = top.split_evenly((1, cols as usize));
        let bottom_cells = bottom.split_evenly((1, cols as usize));
        let grey = RGBColor(200, 200, 200);
        for (si, set) in sets.iter().enumerate() {
            let mut chart = ChartBuilder::on(&top_cells[si])
                .margin(14)
                .build_cartesian_2d(0f64..1f64, 0f64..1f64)
                .map_err(|x| e(&x))?;
            for g in [0.25, 0.5, 0.75] {
                chart
                    .draw_series(LineSeries::new([(g, 0.0), (g, 1.0)], grey.mix(0.5)))
                    .map_err(|x| e(&x))?;
                chart
                    .draw_series(LineSeries::new([(0.0, g), (1.0, g)], grey.mix(0.5)))
                    .map_err(|x| e(&x))?;
            }
            chart
                .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], grey))
                .map_err(|x| e(&x))?;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.0, 0.0), (1.0, 1.0)],
                    BLACK.stroke_width(1),
                )))
                .map_err(|x| e(&x))?;
            for (mi, r) in results.iter().enumerate() {
                let Some((_, ood)) = r.ood_scores.iter().find(|(n, _)| n == set) else {
                    continue;
                };
                let id_scores = r
                    .id_per_set
                    .as_ref()
                    .and_then(|v| v.get(si))
                    .unwrap_or(&r.id_scores);
                let roc = roc_curve(id_scores, ood)?;
                let (cr, cg, cb) = COLORS[mi % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(
                        roc.iter().map(|&(fpr, tpr, _)| (fpr, tpr)),
                        RGBColor(cr, cg, cb).stroke_width(2),
                    ))
                    .map_err(|x| e(&x))?;
            }
        }
        for (mi, r) in results.iter().enumerate() {
            let ood: Vec<f64> = r
                .ood_scores
                .iter()
                .flat_map(|(_, s)| s.iter().copied())
                .collect();
            let all = r
                .id_scores
                .iter()
                .chain(&ood)
                .copied()
                .filter(|v| v.is_finite());
            let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
            if !(lo.is_finite() && hi.is_finite()) {
                continue;
            }
            let span = if hi > lo { hi - lo } else { 1.0 };
            const BINS: usize = 30;
            let hist = |s: &[f64]| {
                let mut c = vec![0f64; BINS];
                for &v in s.iter().filter(|v| v.is_finite()) {
                    let b = (((v - lo) / span) * BINS as f64).floor() as usize;
                    c[b.min(BINS - 1)] += 1.0;
                }
                let n = s.len().max(1) as f64;
                c.iter().map(|x| x / n).collect::<Vec<_>>()
            };
            let (hid, hood) = (hist(&r.id_scores), hist(&ood));
            let ymax = hid
                .iter()
                .chain(&hood)
                .copied()
                .fold(0.0, f64::max)
                .max(1e-9);
            let mut chart = ChartBuilder::on(&bottom_cells[mi])
                .margin(14)
                .build_cartesian_2d(lo..lo + span, 0f64..ymax * 1.05)
                .map_err(|x| e(&x))?;
            let bw = span / BINS as f64;
            for (counts, color) in [
                (&hid, RGBColor(20, 160, 40)),
                (&hood, RGBColor(220, 30, 30)),
            ] {
                chart
                    .draw_series(counts.iter().enumerate().filter(|(_, c)| **c > 0.0).map(
                        |(b, &c)| {
                            let x0 = lo + b as f64 * bw;
                            Rectangle::new([(x0, 0.0), (x0 + bw, c)], color.mix(0.45).filled())
                        },
                    ))
                    .map_err(|x| e(&x))?;
            }
            let (cr, cg, cb) = COLORS[mi % COLORS.len()];
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(lo, 0.0), (lo + span, ymax * 1.05)],
                    RGBColor(cr, cg, cb).stroke_width(3),
                )))
                .map_err(|x| e(&x))?;
        }
        root.present().map_err(|x| e(&x))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).context("plot buffer has the wrong size")?;
    img.save_with_format(path, image::ImageFormat::Png)?;
    Ok(())
}
