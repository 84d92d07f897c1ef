//! `oodgate filter --bank B [--model M] INPUT... --out DIR`: webdataset tars and parquet
//! shards in, `id/` and `ood/` shards in the same format out, with a scores table and an
//! error table per shard; resumable per shard (docs/shards.md).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use oodgate::detect::detector::Detector;
use oodgate::model::preprocess::Limits;
use oodgate::model::{Encoder, Preprocessor};
use oodgate::shards::commit::{Layout, RunState, claim_run};
use oodgate::shards::filter::{self, Event, FilterOptions, Outcome};
use oodgate::shards::{discover, list_digest, partition};

use super::common::{DecisionArgs, ModelCtx, OptModelArgs, load_bank};

#[derive(Debug, clap::Args)]
pub struct FilterArgs {
    /// The bank file (.oodb).
    #[arg(long)]
    pub bank: PathBuf,
    #[command(flatten)]
    pub model: OptModelArgs,
    #[command(flatten)]
    pub decision: DecisionArgs,
    /// Image decode threads (0 = half the cores, as `batch.decode_workers = 0` in serve).
    #[arg(long, default_value_t = 0)]
    pub decode_workers: usize,
    /// Parquet: the column holding image bytes (default: jpg, jpeg, png, webp, image, img,
    /// image_bytes, bytes or content, else the only binary column).
    #[arg(long)]
    pub image_column: Option<String>,
    /// Parquet: the column holding the sample key (default: `key`, else the row index).
    #[arg(long)]
    pub key_column: Option<String>,
    /// This machine's part of the shards: position p in the sorted list with p mod N = I.
    #[arg(long, default_value_t = 0, requires = "shard_count")]
    pub shard_index: usize,
    /// The number of machines splitting the shards.
    #[arg(long, default_value_t = 1)]
    pub shard_count: usize,
    /// Redo every shard when the output folder was written with another configuration.
    #[arg(long)]
    pub overwrite: bool,
    /// Largest image file accepted, in bytes (limits.max_bytes).
    #[arg(long, default_value_t = oodgate::config::Settings::default().limits.max_bytes)]
    pub max_bytes: u64,
    /// Webdataset tars (.tar, .tar.gz, .tgz), parquet files, or folders holding them
    /// (recursive; a parquet file beside a tar of the same name is the tar's metadata, not a
    /// shard).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output folder: id/, ood/, scores/, errors/ and _state/ (never inside an input folder).
    #[arg(long)]
    pub out: PathBuf,
}

fn bar(shards: u64) -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(shards);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} shards {pos}/{len} {bar:30} [{elapsed_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

pub fn run(a: FilterArgs) -> anyhow::Result<ExitCode> {
    if a.shard_count == 0 || a.shard_index >= a.shard_count {
        bail!(
            "--shard-index {} must be below --shard-count {} (which must be at least 1)",
            a.shard_index,
            a.shard_count
        );
    }
    let all = discover(&a.inputs).context("finding shards")?;
    if all.is_empty() {
        bail!("no shards (.tar, .tar.gz, .tgz, .parquet) found in the inputs");
    }
    for input in &a.inputs {
        if input.is_dir()
            && let (Ok(i), Ok(o)) = (input.canonicalize(), std::path::absolute(&a.out))
            && o.starts_with(&i)
        {
            bail!(
                "--out {} is inside the input folder {}: its outputs would be read as input on \
                 the next run",
                a.out.display(),
                input.display()
            );
        }
    }
    let digest = list_digest(&all);
    let total = all.len();
    let mine = partition(all, a.shard_index, a.shard_count);

    let spec = a.decision.spec();
    let detector = Detector::new(load_bank(&a.bank)?, &spec)
        .with_context(|| format!("bank {}", a.bank.display()))?;
    let threshold = detector.threshold().context("no threshold was resolved")?;
    let bank = detector.bank();
    if a.model.model.is_none() {
        bail!(
            "filter needs the model that built the bank: pass --model DIR (or set OODGATE_MODEL)"
        );
    }
    let inputs: Vec<&PathBuf> = a.inputs.iter().collect();
    let mut ctx = ModelCtx::open(&a.model, bank, &inputs)?;
    let Some(encoder) = ctx.encoder.as_mut() else {
        bail!("no encoder was loaded")
    };
    let limits = Limits {
        max_bytes: usize::try_from(a.max_bytes).unwrap_or(usize::MAX),
        ..Limits::default()
    };
    let pre = Preprocessor::from_manifest(encoder.manifest(), limits)
        .with_jpeg_draft(a.model.runtime.jpeg_draft);
    let model_fp = encoder.info().fingerprint.clone();
    let decode_workers = if a.decode_workers == 0 {
        oodgate::config::auto_decode_workers()
    } else {
        a.decode_workers
    };
    let config_fp = filter::config_fingerprint(&serde_json::json!({
        "bank": bank.version(),
        "model": model_fp,
        "image_digest": encoder.info().image_digest,
        "method": a.decision.method.as_str(),
        "threshold": threshold.value,
        "scale": detector.params().scale,
        "top_k": a.decision.top_k,
        "jpeg_draft": a.model.runtime.jpeg_draft,
        "image_column": a.image_column,
        "key_column": a.key_column,
        "max_bytes": a.max_bytes,
    }));
    let layout = Layout::new(&a.out);
    claim_run(
        &layout,
        &RunState {
            config_fingerprint: config_fp.clone(),
            shard_count: a.shard_count,
            list_digest: digest,
            shards: total,
            oodgate_version: env!("CARGO_PKG_VERSION").to_string(),
        },
        a.overwrite,
    )?;
    let opts = FilterOptions {
        batch: a.model.batch.max(1),
        decode_workers,
        image_column: a.image_column.clone(),
        key_column: a.key_column.clone(),
        config_fingerprint: config_fp,
        model_fingerprint: model_fp,
    };
    eprintln!(
        "filter: {} of {total} shards for worker {}/{} with {} (threshold {:.6} from {}), batch {}, {} decode threads",
        mine.len(),
        a.shard_index,
        a.shard_count,
        a.decision.method,
        threshold.value,
        threshold.source,
        opts.batch,
        decode_workers
    );
    let pb = bar(mine.len() as u64);
    let started = std::time::Instant::now();
    let mut samples = 0usize;
    let summary = filter::run(
        &mine,
        &layout,
        encoder as &mut dyn Encoder,
        &detector,
        &pre,
        &opts,
        |e| match e {
            Event::Samples(n) => {
                samples += n;
                let rate = samples as f64 / started.elapsed().as_secs_f64().max(1e-9);
                pb.set_message(format!("{samples} images, {rate:.1} images/s"));
            }
            Event::Shard(s, o) => {
                pb.inc(1);
                match o {
                    Outcome::Done(c) => {
                        let line = format!(
                            "{}: {} read, {} id, {} ood, {} errors{}{}",
                            s.rel,
                            c.read,
                            c.id,
                            c.ood,
                            c.errors,
                            if c.upstream_failures > 0 {
                                format!(", {} failed upstream", c.upstream_failures)
                            } else {
                                String::new()
                            },
                            if c.truncated { ", TRUNCATED" } else { "" }
                        );
                        pb.suspend(|| eprintln!("{line}"));
                        tracing::info!(shard = %s.rel, read = c.read, id = c.id, ood = c.ood, errors = c.errors, "shard done");
                    }
                    Outcome::Skipped => {
                        pb.suspend(|| eprintln!("{}: complete already, skipped", s.rel));
                    }
                    Outcome::Failed(why) => {
                        pb.suspend(|| eprintln!("{}: FAILED: {why}", s.rel));
                        tracing::error!(shard = %s.rel, error = %why, "shard failed");
                    }
                }
            }
        },
    );
    pb.finish_and_clear();
    let scored = summary.counts.id + summary.counts.ood;
    eprintln!(
        "filtered {} shards ({} skipped as complete, {} failed): {} samples read, {scored} scored \
         ({} id, {} ood), {} errors, {} failed upstream, {} truncated shards; {:.1} s, {:.1} images/s",
        summary.done,
        summary.skipped,
        summary.failed.len(),
        summary.counts.read,
        summary.counts.id,
        summary.counts.ood,
        summary.counts.errors,
        summary.counts.upstream_failures,
        summary.truncated_shards,
        summary.seconds,
        scored as f64 / summary.seconds.max(1e-9)
    );
    // DataComp's subset file, from every shard's scores (other workers' included).
    if let Some((npy, rep)) = oodgate::shards::datacomp::id_uids(&a.out.join("scores"))
        .context("reading the scores tables for id_uids.npy")?
    {
        let path = a.out.join("id_uids.npy");
        oodgate::shards::commit::write_atomic(&path, &npy)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "{}: {} uids of ID samples for DataComp's resharder{}",
            path.display(),
            rep.written,
            if rep.without_uid > 0 {
                format!(" ({} ID samples have no 32-hex-digit uid)", rep.without_uid)
            } else {
                String::new()
            }
        );
    }
    if ctx.random_weights(bank) {
        eprintln!("note: random-weight model: the decisions carry no meaning");
    }
    if summary.failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for (rel, why) in &summary.failed {
            eprintln!("failed: {rel}: {why}");
        }
        Ok(ExitCode::FAILURE)
    }
}
