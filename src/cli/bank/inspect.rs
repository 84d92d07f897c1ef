//! `oodgate bank inspect` and `oodgate bank export`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::cli::common::load_bank;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The bank file (.oodb).
    pub bank: PathBuf,
    /// Outlier rows shown.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn run_inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let bank = load_bank(&a.bank)?;
    let m = &bank.meta;
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for r in &m.outliers {
        *kinds.entry(r.kind.clone()).or_default() += 1;
    }
    let samples: Vec<serde_json::Value> = m
        .outliers
        .iter()
        .enumerate()
        .take(a.samples)
        .map(|(i, r)| {
            serde_json::json!({
                "row": i, "kind": r.kind, "label": r.label, "words": r.words, "detail": r.detail,
            })
        })
        .collect();
    // The bank-building variant (older banks lack the keys: derived from the mode).
    let mode = m.build["mode"].as_str().unwrap_or("");
    let variant = serde_json::json!({
        "prototypes": m.build.get("prototypes").cloned().unwrap_or_else(|| match mode {
            "prototypes" => "kmeans".into(),
            "raw" => "none".into(),
            "" => serde_json::Value::Null,
            other => other.into(),
        }),
        "hard_prototypes": m.build.get("hard_prototypes").cloned().unwrap_or_else(|| {
            let h = &m.build["hopg"];
            match (h["clusters"].as_u64(), h["per_cluster"].as_u64()) {
                (Some(c), Some(p)) => (c * p).into(),
                _ => 0.into(),
            }
        }),
        "label_source": m.build.get("label_source").cloned().unwrap_or("text-encoder".into()),
    });
    let file_bytes = std::fs::metadata(&a.bank).map(|x| x.len()).unwrap_or(0);
    if a.json {
        let out = serde_json::json!({
            "path": a.bank,
            "file_bytes": file_bytes,
            "format": m.format,
            "version": m.version,
            "created_by": m.created_by,
            "model_fingerprint": m.model_fingerprint,
            "model_name": m.model_name,
            "model_weights": m.model_weights,
            "dim": m.dim,
            "n_id": bank.id.nrows(),
            "n_outliers": bank.outliers.nrows(),
            "has_no_embeddings": bank.no.is_some(),
            "theta": m.theta,
            "variant": variant,
            "scale": m.scale,
            "outlier_kinds": kinds,
            "id_labels_sample": m.id_labels.iter().take(a.samples).collect::<Vec<_>>(),
            "outliers_sample": samples,
            "build": m.build,
            "cleaning": m.cleaning,
            "thresholds": m.thresholds,
            "index": bank.stored_index.as_ref().map(|ix| serde_json::json!({
                "max_connections": ix.params.max_connections,
                "ef_construction": ix.params.ef_construction,
                "bytes": ix.bytes(),
            })),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("bank {} ({file_bytes} bytes)", a.bank.display());
    println!(
        "  version {} (format {}), {}",
        m.version, m.format, m.created_by
    );
    println!(
        "  model {} ({} weights), fingerprint {}",
        if m.model_name.is_empty() {
            "?"
        } else {
            &m.model_name
        },
        m.model_weights,
        m.model_fingerprint
    );
    println!(
        "  {} ID classes (e.g. {}), dim {}, no-embeddings: {}",
        bank.id.nrows(),
        m.id_labels
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        m.dim,
        if bank.no.is_some() { "yes" } else { "no" }
    );
    println!(
        "  {} outlier rows ({}), θ = {}",
        bank.outliers.nrows(),
        kinds
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        m.theta.map_or("-".into(), |t| format!("{t:.6}"))
    );
    println!(
        "  variant: --prototypes {} --hard-prototypes {}, labels from {}, scale {}",
        variant["prototypes"].as_str().unwrap_or("-"),
        variant["hard_prototypes"],
        variant["label_source"].as_str().unwrap_or("-"),
        m.scale
            .map_or("each method's default".into(), |s| s.to_string())
    );
    if let Some(c) = m.cleaning.get("outliers") {
        println!(
            "  cleaning removed {} outlier words ({} exact, {} synonyms, {} hyponyms), kept {}",
            c["removed"], c["exact"], c["synonyms"], c["hyponyms"], c["kept"]
        );
    }
    println!("  build parameters: {}", m.build);
    match &bank.stored_index {
        Some(ix) => println!(
            "  HNSW index: stored ({} bytes, M {}, ef_construction {})",
            ix.bytes(),
            ix.params.max_connections,
            ix.params.ef_construction
        ),
        None => println!("  HNSW index: not stored (built when the bank is loaded)"),
    }
    if m.thresholds.is_empty() {
        println!("  thresholds: none (run `oodgate calibrate ... --write`)");
    } else {
        for (method, t) in &m.thresholds {
            println!(
                "  threshold {method}: {:.8} (TPR {} asked, {:.4} achieved on {} ID inputs; {})",
                t.value, t.tpr, t.achieved_tpr, t.n_id, t.source
            );
        }
    }
    for s in &samples {
        println!(
            "  #{:<4} {:<10} {:<24} {}",
            s["row"],
            s["kind"].as_str().unwrap_or(""),
            s["label"].as_str().unwrap_or(""),
            s["words"]
                .as_array()
                .map(|w| w
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// export
// ---------------------------------------------------------------------------------------------

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The bank file (.oodb).
    pub bank: PathBuf,
    /// Output folder (created): id.npy, id_labels.txt, no.npy, outliers.npy,
    /// outlier_labels.txt.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub(super) fn run_export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    use std::fmt::Write as _;
    let bank = load_bank(&a.bank)?;
    let dir = &a.output;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write_npy = |name: &str, m: &ndarray::Array2<f32>| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        ndarray_npy::write_npy(&p, m).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    };
    let write_txt = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    };
    let mut cmd = format!(
        "oodgate bank import --model-fingerprint {}",
        bank.meta.model_fingerprint
    );
    let id = write_npy("id.npy", &bank.id)?;
    let mut labels = String::new();
    for (i, name) in bank.meta.id_labels.iter().enumerate() {
        match bank.meta.id_wnids.get(i).cloned().flatten() {
            Some(w) => writeln!(labels, "{w}\t{name}")?,
            None => writeln!(labels, "{name}")?,
        }
    }
    let id_labels = write_txt("id_labels.txt", &labels)?;
    write!(
        cmd,
        " --id-embeddings {} --id-labels {}",
        id.display(),
        id_labels.display()
    )?;
    if let Some(no) = &bank.no {
        let p = write_npy("no.npy", no)?;
        write!(cmd, " --no-embeddings {}", p.display())?;
    }
    if bank.outliers.nrows() > 0 {
        let p = write_npy("outliers.npy", &bank.outliers)?;
        let text: String = bank
            .meta
            .outliers
            .iter()
            .map(|r| format!("{}\n", r.label.replace(['\n', '\r'], " ")))
            .collect();
        let l = write_txt("outlier_labels.txt", &text)?;
        write!(
            cmd,
            " --outliers {} --outlier-labels {}",
            p.display(),
            l.display()
        )?;
    }
    if let Some(t) = bank.meta.theta {
        write!(cmd, " --theta {t}")?;
    }
    println!("exported {} to {}", a.bank.display(), dir.display());
    println!("re-import with:\n  {cmd} -o BANK");
    Ok(ExitCode::SUCCESS)
}
