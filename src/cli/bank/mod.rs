//! `oodgate bank build | import | inspect | export`: `build` lives here, the others in their
//! own files beside it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use indicatif::ProgressBar;
use oodgate::bank_build::build::{
    self, BuildReport, BuildRequest, CacheSpec, DEFAULT_WORDS_PER_ROW, NegLabelParams, OutlierMode,
    WordParams,
};
use oodgate::bank_build::embed::{DEFAULT_BATCH, Progress};
use oodgate::bank_build::embed_cache;

use oodgate::bank_build::labels::{
    self, CORPUS_WORDNET, CleanOptions, CleanReport, CorpusOptions, IdLabels, clean_outliers,
    outlier_words,
};
use oodgate::bank_build::source::{Precomputed, SourceModel, TextTower};
use oodgate::bank_build::wordnet::{self, WordNet};
use oodgate::detect::bank::Bank;
use oodgate::detect::index::IndexParams;
use oodgate::detect::prototypes::{HopgParams, OplParams};
use oodgate::model::{ClipTokenizer, RANDOM_WEIGHTS_WARNING};
use oodgate::npy::read_npy;

use super::common::short;
use super::common::{RuntimeArgs, load_encoder, model_identity, progress};

mod import;
mod inspect;

pub use import::ImportArgs;
use import::run_import;
pub use inspect::{ExportArgs, InspectArgs};
use inspect::{run_export, run_inspect};

#[derive(Debug, clap::Subcommand)]
pub enum BankCommand {
    /// Build a bank from labels with the model's text encoder (OPL + refinement + HOPG by
    /// default; --raw-outliers or --neglabel for the alternatives).
    Build(Box<BuildArgs>),
    /// Pack precomputed embedding matrices (.npy) into a bank.
    Import(ImportArgs),
    /// Show a bank's sizes, parameters, prototypes and thresholds.
    Inspect(InspectArgs),
    /// Write a bank's matrices (.npy) and labels (.txt) into a folder, in the form `bank
    /// import` reads.
    Export(ExportArgs),
}

pub fn run(c: BankCommand) -> anyhow::Result<ExitCode> {
    match c {
        BankCommand::Build(a) => run_build(*a),
        BankCommand::Import(a) => run_import(a),
        BankCommand::Inspect(a) => run_inspect(a),
        BankCommand::Export(a) => run_export(a),
    }
}

// ---------------------------------------------------------------------------------------------
// build
// ---------------------------------------------------------------------------------------------

/// `--prototypes`: what the outlier rows are before HOPG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrototypeVariant {
    /// OPL: k-means over the outlier-label embeddings, then the θ-quantile refinement.
    Kmeans,
    /// The θ-quantile refinement applied to the label embeddings themselves (no clustering).
    Words,
    /// Every outlier-label embedding (no clustering, no refinement).
    None,
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Model folder (with model.toml): its text tower embeds the labels; with
    /// --id-embeddings/--outlier-embeddings only its fingerprint is recorded.
    #[arg(
        long,
        env = "OODGATE_MODEL",
        required_unless_present = "model_fingerprint"
    )]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// With precomputed embeddings instead of --model: the fingerprint of the model they come
    /// from (`bank inspect` of a bank built with it, or `oodgate info --model DIR`).
    #[arg(long, conflicts_with = "model", requires = "id_embeddings")]
    pub model_fingerprint: Option<String>,
    /// ID classes: a preset (imagenet1k, cifar10, cifar100) or a label file.
    #[arg(long)]
    pub id: String,
    /// ID label embeddings computed elsewhere ([C, D] .npy, rows in the order of --id) instead
    /// of the model's text tower; needs --outlier-embeddings.
    #[arg(long, requires = "outlier_embeddings")]
    pub id_embeddings: Option<PathBuf>,
    /// Outlier-label embeddings computed elsewhere ([N, D] .npy, one row per word line of the
    /// --outliers file, in file order); cleaning drops rows by their words.
    #[arg(long, requires = "id_embeddings")]
    pub outlier_embeddings: Option<PathBuf>,
    /// Outlier-label corpus: wordnet, ole-reference or a word file (one per line).
    #[arg(long, default_value = CORPUS_WORDNET)]
    pub outliers: String,
    /// Prompt templates: openai-imagenet, ole, mcm, neglabel-noun, neglabel-adj or a file
    /// (default openai-imagenet; neglabel-noun with --neglabel).
    #[arg(long)]
    pub templates: Option<String>,
    /// CLIPN "no" embeddings T̄ ([C, D] .npy, rows in ID-label order), computed elsewhere.
    #[arg(long)]
    pub no_embeddings: Option<PathBuf>,
    /// Number of outlier prototypes K.
    #[arg(long, default_value_t = 500)]
    pub k: usize,
    /// Refinement quantile q: keep prototypes below the q-quantile of their max ID cosine.
    #[arg(long, default_value_t = 0.1)]
    pub quantile: f64,
    /// Seed of the k-means++ initialisation.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Lloyd iterations at most.
    #[arg(long, default_value_t = 100)]
    pub max_iter: usize,
    /// What the outlier rows are: kmeans (OPL + refinement, the paper's), words (the
    /// refinement applied to the label embeddings, no clustering) or none (every label).
    #[arg(long, value_enum, default_value = "kmeans")]
    pub prototypes: PrototypeVariant,
    /// Hard Outlier Prototype Generation: N boundary ID embeddings (a multiple of
    /// --hopg-clusters) mixed with their nearest outlier rows; 0 = off. Default 150 with
    /// kmeans, 0 otherwise.
    #[arg(long, conflicts_with_all = ["no_hopg", "hopg_per_cluster"])]
    pub hard_prototypes: Option<usize>,
    /// Skip HOPG (an alias of --hard-prototypes 0).
    #[arg(long)]
    pub no_hopg: bool,
    /// Logit scale s stored in the bank: score, serve, eval and calibrate use it unless
    /// --scale or detector.scale overrides it (default: each method's own, 50 for ole).
    #[arg(long)]
    pub scale: Option<f32>,
    /// HOPG: components of the ID embeddings.
    #[arg(long, default_value_t = 5)]
    pub hopg_clusters: usize,
    /// HOPG: boundary ID embeddings per component.
    #[arg(long, default_value_t = 30)]
    pub hopg_per_cluster: usize,
    /// HOPG: λ (the ID side's weight) is drawn from [0, this).
    #[arg(long, default_value_t = 0.5)]
    pub hopg_lambda_max: f64,
    /// HOPG: seed of its k-means and of the λ draws.
    #[arg(long, default_value_t = 42)]
    pub hopg_seed: u64,
    /// Keep every outlier-label embedding as an outlier row (an alias of --prototypes none).
    #[arg(long, conflicts_with = "neglabel")]
    pub raw_outliers: bool,
    /// NegLabel negative mining instead of prototypes (for --method neglabel).
    #[arg(long)]
    pub neglabel: bool,
    /// NegLabel: adjective candidates: wordnet, none or a word file (default: wordnet when
    /// --outliers is wordnet, else none).
    #[arg(long)]
    pub adjectives: Option<String>,
    /// NegLabel: percentile η of a candidate's cosines to the ID labels.
    #[arg(long, default_value_t = 0.95)]
    pub neglabel_percentile: f64,
    /// NegLabel: fraction of candidates kept (lowest η), nouns and adjectives separately.
    #[arg(long, default_value_t = 0.15)]
    pub neglabel_keep: f64,
    /// NegLabel: templates of the noun candidates.
    #[arg(long, default_value = "neglabel-noun")]
    pub noun_templates: String,
    /// NegLabel: templates of the adjective candidates.
    #[arg(long, default_value = "neglabel-adj")]
    pub adj_templates: String,
    /// Keep multi-word WordNet lemmas ("great white shark").
    #[arg(long)]
    pub multiword: bool,
    /// WordNet dictionary folder (for the wordnet corpus and the synonym/hyponym cleaning).
    #[arg(long)]
    pub wordnet: Option<PathBuf>,
    /// Do not drop outlier words equal to an ID class name.
    #[arg(long)]
    pub keep_id_names: bool,
    /// Do not drop lemmas of ID synsets.
    #[arg(long)]
    pub keep_synonyms: bool,
    /// Do not drop hyponyms of ID synsets.
    #[arg(long)]
    pub keep_hyponyms: bool,
    /// Also drop hyponyms of the first noun sense of ID classes without a WordNet id.
    #[arg(long)]
    pub first_sense_hyponyms: bool,
    /// Outlier words stored per outlier row.
    #[arg(long, default_value_t = DEFAULT_WORDS_PER_ROW)]
    pub words_per_row: usize,
    /// Prompts per text-encoder call.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    pub batch: usize,
    /// Label-embedding cache folder (default: $OODGATE_CACHE, else .cache/labels).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Do not read or write the label-embedding cache.
    #[arg(long, conflicts_with = "cache")]
    pub no_cache: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Output bank file (.oodb).
    #[arg(short, long)]
    pub output: PathBuf,
}

/// indicatif bars for the text-embedding phases (hidden when stderr is not a terminal).
struct Bars(Option<ProgressBar>);

impl Progress for Bars {
    fn start(&mut self, phase: &str, total: usize) {
        self.0 = Some(progress(total, &format!("embedding {phase}")));
    }
    fn advance(&mut self, n: usize) {
        if let Some(pb) = &self.0 {
            pb.inc(n as u64);
        }
    }
    fn finish(&mut self) {
        if let Some(pb) = self.0.take() {
            pb.finish_and_clear();
        }
    }
}

/// Loads and cleans one word list; returns the words and the cleaning report.
fn load_words(
    spec: &str,
    wordnet_dir: Option<&Path>,
    corpus: &CorpusOptions,
    id: &IdLabels,
    wn: Option<&WordNet>,
    clean: &CleanOptions,
) -> anyhow::Result<(Vec<String>, CleanReport)> {
    let words = outlier_words(spec, wordnet_dir, corpus)
        .with_context(|| format!("loading outlier words {spec}"))?;
    Ok(clean_outliers(words, id, wn, clean))
}

fn wordnet_adjectives(dir: Option<&Path>, multiword: bool) -> anyhow::Result<Vec<String>> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => WordNet::default_dir().ok_or(labels::LabelError::NoWordNet)?,
    };
    let mut words: Vec<String> = wordnet::read_index(&dir.join("index.adj"))?
        .into_iter()
        .map(|e| e.lemma)
        .filter(|l| multiword || !l.contains(' '))
        .collect();
    words.sort_unstable();
    words.dedup();
    Ok(words)
}

fn report_json(r: &CleanReport) -> serde_json::Value {
    serde_json::json!({
        "exact": r.exact, "synonyms": r.synonyms, "hyponyms": r.hyponyms,
        "kept": r.kept, "removed": r.removed(),
    })
}

/// The outlier rows of a non-NegLabel bank from --prototypes, --hard-prototypes and their
/// aliases (--raw-outliers, --no-hopg).
fn prototype_mode(a: &BuildArgs) -> anyhow::Result<OutlierMode> {
    let variant = if a.raw_outliers {
        PrototypeVariant::None
    } else {
        a.prototypes
    };
    let hard = match (a.hard_prototypes, a.no_hopg) {
        (Some(n), _) => n,
        (None, true) => 0,
        (None, false) if variant == PrototypeVariant::Kmeans => {
            a.hopg_clusters.saturating_mul(a.hopg_per_cluster)
        }
        (None, false) => 0,
    };
    let hopg = if hard == 0 {
        None
    } else {
        if a.hopg_clusters == 0 || hard % a.hopg_clusters != 0 {
            anyhow::bail!(
                "--hard-prototypes {hard} must be a multiple of --hopg-clusters {} (each \
                 component gives the same number of boundary ID embeddings)",
                a.hopg_clusters
            );
        }
        Some(HopgParams {
            clusters: a.hopg_clusters,
            per_cluster: hard / a.hopg_clusters,
            lambda_max: a.hopg_lambda_max,
            seed: a.hopg_seed,
            max_iter: a.max_iter,
        })
    };
    Ok(match variant {
        PrototypeVariant::Kmeans => OutlierMode::Prototypes(OplParams {
            k: a.k,
            quantile: a.quantile,
            seed: a.seed,
            max_iter: a.max_iter,
            hopg,
            nearest_words: a.words_per_row,
        }),
        PrototypeVariant::Words => OutlierMode::Words(WordParams {
            quantile: a.quantile,
            hopg,
        }),
        PrototypeVariant::None if hopg.is_some() => anyhow::bail!(
            "--prototypes none keeps every label and has no refinement threshold θ, which \
             HOPG needs: use --hard-prototypes 0, or --prototypes words"
        ),
        PrototypeVariant::None => OutlierMode::Raw,
    })
}

fn run_build(a: BuildArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let id = IdLabels::load(&a.id).with_context(|| format!("loading ID labels {}", a.id))?;
    let tpl_spec = a.templates.clone().unwrap_or_else(|| {
        if a.neglabel {
            "neglabel-noun".into()
        } else {
            labels::DEFAULT_TEMPLATES.into()
        }
    });
    let templates =
        labels::templates(&tpl_spec).with_context(|| format!("loading templates {tpl_spec}"))?;
    let clean = CleanOptions {
        exact: !a.keep_id_names,
        synonyms: !a.keep_synonyms,
        hyponyms: !a.keep_hyponyms,
        hyponyms_of_first_sense: a.first_sense_hyponyms,
    };
    let corpus = CorpusOptions {
        adjectives: false,
        multiword: a.multiword,
    };
    // WordNet for the synonym / hyponym rules, if any dictionary is there.
    let wn = if clean.synonyms || clean.hyponyms {
        match a.wordnet.clone().or_else(WordNet::default_dir) {
            Some(dir) => Some(
                WordNet::open(&dir)
                    .with_context(|| format!("opening WordNet in {}", dir.display()))?,
            ),
            None => {
                eprintln!(
                    "warning: no WordNet dictionary found; only exact ID names are removed from \
                     the outlier words (run deploy/setup/fetch-wordnet.sh or pass --wordnet DIR)"
                );
                None
            }
        }
    } else {
        None
    };
    let (words, report) = load_words(
        &a.outliers,
        a.wordnet.as_deref(),
        &corpus,
        &id,
        wn.as_ref(),
        &clean,
    )?;
    let adj_spec = match (&a.adjectives, a.neglabel) {
        (_, false) => None,
        (Some(s), true) if s == "none" => None,
        (Some(s), true) => Some(s.clone()),
        (None, true) if a.outliers == CORPUS_WORDNET => Some(CORPUS_WORDNET.to_string()),
        (None, true) => None,
    };
    let (adjectives, adj_report) = match &adj_spec {
        None => (Vec::new(), None),
        Some(s) => {
            let raw = if s == CORPUS_WORDNET {
                wordnet_adjectives(a.wordnet.as_deref(), a.multiword)?
            } else {
                outlier_words(s, None, &corpus)
                    .with_context(|| format!("loading adjectives {s}"))?
            };
            let (w, r) = clean_outliers(raw, &id, wn.as_ref(), &clean);
            (w, Some(r))
        }
    };
    if a.neglabel && a.prototypes != PrototypeVariant::Kmeans {
        anyhow::bail!("--prototypes does not apply to --neglabel banks (their rows are mined)");
    }
    let mode = if a.neglabel {
        OutlierMode::NegLabel {
            params: NegLabelParams {
                percentile: a.neglabel_percentile,
                keep: a.neglabel_keep,
            },
            noun_templates: labels::templates(&a.noun_templates)
                .with_context(|| format!("loading templates {}", a.noun_templates))?,
            adj_templates: labels::templates(&a.adj_templates)
                .with_context(|| format!("loading templates {}", a.adj_templates))?,
        }
    } else {
        prototype_mode(&a)?
    };
    let no_embeddings = match &a.no_embeddings {
        Some(p) => Some(read_npy(p)?),
        None => None,
    };
    let mut cleaning = serde_json::json!({
        "options": clean,
        "wordnet": wn.as_ref().map(|w| w.dir().display().to_string()),
        "outliers": report_json(&report),
    });
    if let Some(r) = &adj_report {
        cleaning["adjectives"] = report_json(r);
    }
    let params = serde_json::json!({
        "id": a.id,
        "outliers": a.outliers,
        "adjectives": adj_spec,
        "corpus": corpus,
        "no_embeddings_file": a.no_embeddings.as_ref().map(|p| p.display().to_string()),
        "id_embeddings_file": a.id_embeddings.as_ref().map(|p| p.display().to_string()),
        "outlier_embeddings_file": a.outlier_embeddings.as_ref().map(|p| p.display().to_string()),
    });
    let req = BuildRequest {
        id,
        templates,
        outlier_words: words,
        adjectives,
        mode,
        no_embeddings,
        words_per_row: a.words_per_row,
        batch: a.batch,
        scale: a.scale,
        params,
        cleaning,
    };
    // Fail on impossible parameters before loading the model and encoding anything.
    build::check_request(&req)?;

    let mut bars = Bars(None);
    let cache = (!a.no_cache && a.id_embeddings.is_none()).then(|| CacheSpec {
        root: a.cache.clone().unwrap_or_else(embed_cache::default_root),
    });
    let (mut bank, rep) = match (&a.id_embeddings, &a.outlier_embeddings) {
        (Some(id_path), Some(out_path)) => {
            let t = read_npy(id_path)?;
            let (fingerprint, name, weights) =
                model_identity(a.model.as_deref(), a.model_fingerprint.as_deref())?;
            let lines = labels::outlier_lines(&a.outliers)
                .with_context(|| format!("reading the outlier words {}", a.outliers))?;
            let model = SourceModel {
                fingerprint,
                name,
                weights,
                dim: t.ncols(),
            };
            let mut source = Precomputed::new(model, t, &id_path.display().to_string())?
                .with_outliers(read_npy(out_path)?, &lines, &out_path.display().to_string())?;
            build::build_bank(&mut source, &req, &mut bars)?
        }
        _ => {
            let Some(dir) = &a.model else {
                anyhow::bail!(
                    "--model DIR is needed to embed the labels (or give --id-embeddings and \
                     --outlier-embeddings)"
                );
            };
            let mut enc = load_encoder(dir, a.runtime.options(true)?)?;
            let spec = enc.manifest().text.clone().context(
                "this model folder has no text encoder ([text] in model.toml); it cannot \
                 embed labels (give --id-embeddings and --outlier-embeddings instead)",
            )?;
            let tok = ClipTokenizer::new(spec.context_length, spec.pad_id);
            let mut source = TextTower::new(&mut enc, &tok, cache.as_ref(), a.batch);
            build::build_bank(&mut source, &req, &mut bars)?
        }
    };
    attach_index(&mut bank)?;
    bank.save(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let random = bank.meta.model_weights == "random";
    if a.json {
        let out = serde_json::json!({
            "bank": a.output,
            "version": bank.version(),
            "model_fingerprint": bank.meta.model_fingerprint,
            "random_weights": random,
            "report": rep,
            "cleaning": bank.meta.cleaning,
            "cache": cache.as_ref().map(|c| c.root.display().to_string()),
            "seconds": started.elapsed().as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_summary(&a, &bank, &rep, &report, cache.as_ref(), started);
    }
    if random {
        eprintln!("{RANDOM_WEIGHTS_WARNING}");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(
    a: &BuildArgs,
    bank: &Bank,
    rep: &BuildReport,
    clean: &CleanReport,
    cache: Option<&CacheSpec>,
    started: Instant,
) {
    let m = &bank.meta;
    println!(
        "wrote {} (version {}): {} ID classes, {} outlier rows, dim {}",
        a.output.display(),
        m.version,
        m.id_labels.len(),
        bank.outliers.nrows(),
        m.dim
    );
    println!(
        "model: {} ({}), fingerprint {}",
        m.model_name,
        m.model_weights,
        short(&m.model_fingerprint)
    );
    println!(
        "outlier words: {} from {} (cleaning removed {}: {} exact, {} synonyms, {} hyponyms)",
        clean.kept,
        a.outliers,
        clean.removed(),
        clean.exact,
        clean.synonyms,
        clean.hyponyms
    );
    if m.build["label_source"] == "precomputed" {
        println!(
            "label embeddings: precomputed ({} and {})",
            m.build["id_embeddings_file"].as_str().unwrap_or("?"),
            m.build["outlier_embeddings_file"].as_str().unwrap_or("?")
        );
    } else {
        println!(
            "text embedding: {} labels, {} cached, {} encoded ({} prompts) in {:.2} s{}",
            rep.cached + rep.encoded,
            rep.cached,
            rep.encoded,
            rep.prompts,
            rep.timings.text_embedding.as_secs_f64(),
            cache
                .map(|c| format!(" (cache {})", c.root.display()))
                .unwrap_or_default()
        );
    }
    match rep.mode.as_str() {
        "prototypes" | "words" => {
            if let (Some(c), Some(theta)) = (rep.counts, rep.theta) {
                if let Some((it, conv)) = rep.kmeans {
                    println!(
                        "clustering: K = {}, {it} Lloyd iterations{} in {:.2} s",
                        c.k,
                        if conv {
                            " (converged)"
                        } else {
                            " (not converged)"
                        },
                        rep.timings.clustering.as_secs_f64()
                    );
                }
                let what = if rep.mode == "words" {
                    "label embeddings (--prototypes words)"
                } else {
                    "prototypes"
                };
                println!(
                    "refinement: θ = {theta:.6}, kept {} of {} {what} in {:.2} s",
                    c.kept,
                    c.k,
                    rep.timings.refinement.as_secs_f64()
                );
                if c.boundary == 0 {
                    println!("HOPG: off");
                } else {
                    println!(
                        "HOPG: {} of {} hard prototypes accepted in {:.2} s",
                        c.accepted,
                        c.boundary,
                        rep.timings.hopg.as_secs_f64()
                    );
                }
            }
        }
        "raw" => println!("outliers: every label embedding kept (raw)"),
        _ => println!(
            "NegLabel mining: {} negatives from {} candidates in {:.2} s",
            rep.n_outliers,
            rep.n_outlier_words,
            rep.timings.mining.as_secs_f64()
        ),
    }
    println!("total {:.2} s", started.elapsed().as_secs_f64());
}

/// Builds the bank's HNSW graphs so they are saved with it (workers then skip the build).
fn attach_index(bank: &mut Bank) -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    bank.attach_index(IndexParams::default())
        .context("building the HNSW index")?;
    let bytes = bank.stored_index.as_ref().map_or(0, |s| s.bytes());
    tracing::info!(
        rows = bank.id.nrows() + bank.outliers.nrows(),
        bytes,
        seconds = t.elapsed().as_secs_f64(),
        "HNSW index built"
    );
    Ok(())
}
