//! Inputs of the scoring commands: image files and folders go through the model, `.npy`
//! files of precomputed image embeddings (float16/32, `[N, D]`) are read as is; and the
//! check that the model matches the bank.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ndarray::{Array2, Axis};
use oodgate::detect::bank::Bank;
use oodgate::detect::norm::normalize_rows_off_unit;
use oodgate::model::pipeline::{FileError, collect_images, embed_image_files};
use oodgate::model::preprocess::Limits;
use oodgate::model::{Encoder, ModelManifest, OrtEncoder, Preprocessor, RANDOM_WEIGHTS_WARNING};
use oodgate::npy::read_npy;

use super::model::{OptModelArgs, fingerprint_for_bank};
use super::{decode_workers, progress, rows_file, short};

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
                ctx.fingerprint = Some(fingerprint_for_bank(
                    enc.manifest(),
                    &enc.info().identity(),
                    bank,
                    args.force,
                )?);
                ctx.random = enc.manifest().is_random();
                ctx.encoder = Some(enc);
            }
            Some(dir) => {
                let m = ModelManifest::load(dir)
                    .with_context(|| format!("reading model {}", dir.display()))?;
                let own = m
                    .identity()
                    .with_context(|| format!("fingerprinting model {}", dir.display()))?;
                ctx.fingerprint = Some(fingerprint_for_bank(&m, &own, bank, args.force)?);
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
            let pre = Preprocessor::from_manifest(enc.manifest(), Limits::default())
                .with_jpeg_draft(self.args.runtime.jpeg_draft);
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
                    FileError::Read { path, .. } | FileError::Preprocess { path, .. } => {
                        path.clone()
                    }
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
