//! `oodgate bench`: one run, one table — encoder-only, preprocessing, scoring, end-to-end
//! through a real nats-server, their ratio, and peak RSS. Speed targets live here and in
//! benches/, never in timed tests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use oodgate::detect::detector::ThresholdChoice;
use oodgate::stream::local_server::{self, LocalServer};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use anyhow::{Context, bail};
use ndarray::{Array2, Array4};
use oodgate::config::Settings;
use oodgate::model::encoder::SessionTuning;
use oodgate::model::pipeline::collect_images;
use oodgate::model::{Encoder, RANDOM_WEIGHTS_WARNING};
use oodgate::stream::Stats;
use oodgate::stream::setup;

use super::common::worker::load_worker;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub bank: PathBuf,
    /// Folder of test images (default: tests/fixtures/images).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Encoder batch size (also the daemon's batch.max_size).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// NATS server for the end-to-end run (default: start a local nats-server).
    #[arg(long)]
    pub nats: Option<String>,
    /// Images sent through NATS in the end-to-end run.
    #[arg(long, default_value_t = 256)]
    pub messages: usize,
    /// Execution provider: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// ONNX Runtime intra-op threads (0 = all cores), same for encoder-only and end-to-end.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Decode workers in the end-to-end run (0 = automatic).
    #[arg(long, default_value_t = 0)]
    pub decode_workers: usize,
    /// ONNX Runtime threads spin while waiting (model.intra_spinning), in both runs.
    #[arg(long, default_value_t = SessionTuning::default().spinning, action = clap::ArgAction::Set)]
    pub intra_spinning: bool,
    /// ONNX Runtime's CPU arena allocator (model.cpu_arena).
    #[arg(long, default_value_t = SessionTuning::default().cpu_arena, action = clap::ArgAction::Set)]
    pub cpu_arena: bool,
    /// ONNX Runtime's memory-pattern planning (model.memory_pattern).
    #[arg(long, default_value_t = SessionTuning::default().memory_pattern, action = clap::ArgAction::Set)]
    pub memory_pattern: bool,
    /// ONNX Runtime's weight prepacking (model.prepacking).
    #[arg(long, default_value_t = SessionTuning::default().prepacking, action = clap::ArgAction::Set)]
    pub prepacking: bool,
    /// On CPU, the most images per ONNX Runtime run (model.cpu_run_batch; 0: the whole batch).
    #[arg(long, default_value_t = SessionTuning::default().cpu_run_batch)]
    pub cpu_run_batch: usize,
    /// On CPU, return the heap's free pages after each batch (model.trim_heap).
    #[arg(long, default_value_t = SessionTuning::default().trim_heap, action = clap::ArgAction::Set)]
    pub trim_heap: bool,
    /// On CUDA, run batches through ONNX Runtime's I/O binding (model.io_binding).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub io_binding: bool,
    /// The fast JPEG path (preprocess.jpeg_draft) in the preprocessing and end-to-end runs.
    #[arg(long)]
    pub jpeg_draft: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Starts a new peak (Linux: the peak resident size falls to the current one).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

pub fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    // The same allocator settings as `serve`.
    super::common::worker::limit_malloc_arenas();
    let mut s = Settings::default();
    s.model.dir = a.model.clone();
    s.model.device = a.device.clone();
    s.model.intra_threads = a.threads;
    s.model.intra_spinning = a.intra_spinning;
    s.model.cpu_arena = a.cpu_arena;
    s.model.memory_pattern = a.memory_pattern;
    s.model.prepacking = a.prepacking;
    s.model.cpu_run_batch = a.cpu_run_batch;
    s.model.trim_heap = a.trim_heap;
    s.model.io_binding = a.io_binding;
    s.preprocess.jpeg_draft = a.jpeg_draft;
    s.model.warm_up = true;
    s.detector.bank = Some(a.bank.clone());
    s.detector.force_fingerprint = false;
    s.batch.max_size = a.batch;
    s.batch.decode_workers = a.decode_workers;
    s.batch.queue_depth = a.batch * 2;
    s.input.pull_batch = a.batch * 2;
    s.input.stream = "OODGATE_BENCH_IN".into();
    s.input.subjects = vec!["oodgate.bench.in".into()];
    s.input.filter_subject = "oodgate.bench.in".into();
    s.input.durable = "oodgate-bench".into();
    s.output.prefix = "oodgate.bench".into();
    s.output.stream = "OODGATE_BENCH_OUT".into();
    // Route by the bank's threshold if it has one; the split does not change the work.
    let (mut encoder, detector, pre) = load_worker(&s, ThresholdChoice::FromBankOr(0.5))?;
    // What `serve` holds once ready: the model loaded and warmed up, the bank.
    let load_peak = peak_rss_mib();
    let random = detector.bank().meta.model_weights == "random"
        || encoder.info().weights == oodgate::model::Weights::Random;
    let provider = encoder.info().provider.clone();
    let threads = encoder.info().intra_threads;
    let io_binding_active = encoder.io_binding();
    let files = collect_images(&[a
        .images
        .clone()
        .unwrap_or_else(|| PathBuf::from("tests/fixtures/images"))])?;
    if files.is_empty() {
        bail!("no images found");
    }
    let blobs: Vec<Vec<u8>> = files.iter().filter_map(|p| std::fs::read(p).ok()).collect();
    let size = pre.size() as usize;

    // 1. Encoder only, on pre-made tensors.
    let x = Array4::<f32>::from_shape_fn((a.batch, 3, size, size), |(b, c, y, xx)| {
        ((b * 7 + c * 3 + y + xx) % 255) as f32 / 255.0 - 0.5
    });
    encoder.embed_images(x.view())?;
    let t = Instant::now();
    let mut n = 0usize;
    while t.elapsed() < Duration::from_secs(8) || n < 2 * a.batch {
        encoder.embed_images(x.view())?;
        n += a.batch;
    }
    let encoder_ips = n as f64 / t.elapsed().as_secs_f64();

    // 2. Preprocessing, one core and all cores.
    let mut buf = vec![0f32; pre.tensor_len()];
    let t = Instant::now();
    let mut ok = 0usize;
    for b in blobs.iter().cycle().take(blobs.len().max(64)) {
        if pre.preprocess_into(b, &mut buf).is_ok() {
            ok += 1;
        }
    }
    let pre_one = ok as f64 / t.elapsed().as_secs_f64();
    let cores = oodgate::available_cores();
    let t = Instant::now();
    let per = blobs.len().max(64);
    std::thread::scope(|sc| {
        for _ in 0..cores {
            sc.spawn(|| {
                let mut buf = vec![0f32; pre.tensor_len()];
                for b in blobs.iter().cycle().take(per) {
                    let _ = pre.preprocess_into(b, &mut buf);
                }
            });
        }
    });
    let pre_all = (per * cores) as f64 / t.elapsed().as_secs_f64();

    // 3. Scoring (one GEMM per batch) and HNSW explanations.
    let d = detector.bank().meta.dim;
    let mut emb = Array2::<f32>::from_shape_fn((64, d), |(i, j)| {
        (((i * 31 + j * 17) % 97) as f32 - 48.0) / 97.0
    });
    oodgate::detect::norm::normalize_rows(&mut emb);
    let reps = 200;
    let t = Instant::now();
    for _ in 0..reps {
        detector.scores(emb.view())?;
    }
    let score_us = t.elapsed().as_secs_f64() * 1e6 / (reps * 64) as f64;
    let t = Instant::now();
    for r in emb.rows() {
        detector.explain(&r.to_vec());
    }
    let explain_us = t.elapsed().as_secs_f64() * 1e6 / 64.0;

    // HNSW recall@10 against exact search on the bank's own ID rows, with queries mixed from
    // pairs of bank rows (close to real image embeddings near class boundaries).
    let index = detector.index().context("the detector has no HNSW index")?;
    let rows = detector.bank().id.view();
    let nq = rows.nrows().min(200);
    let mut queries = Array2::<f32>::zeros((nq, d));
    for (i, mut q) in queries.rows_mut().into_iter().enumerate() {
        let (a, b) = (i * 7 % rows.nrows(), (i * 13 + 5) % rows.nrows());
        q.assign(&(&rows.row(a) + &(&rows.row(b) * 0.5)));
    }
    oodgate::detect::norm::normalize_rows(&mut queries);
    let recall10 = oodgate::detect::index::recall_at_k(&index.id, rows, queries.view(), 10);

    // 4. `oodgate filter` on one webdataset shard of the same images (no NATS): its reader,
    // decoders, encoder thread and writer, timed from start to the shard's commit.
    let filter_ips = bench_filter(
        &blobs,
        a.messages.max(a.batch),
        &mut encoder,
        &detector,
        &pre,
        &s,
    )?;

    // 5. End to end through NATS: publish a backlog, then time the worker draining it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut server = None;
    let url = match &a.nats {
        Some(u) => u.clone(),
        None => {
            let binary = local_server::find_binary(std::path::Path::new(".venv"))?;
            let local = LocalServer::start(&binary)?;
            let url = local.url();
            server = Some(local);
            url
        }
    };
    s.nats.servers = vec![url.clone()];
    let cfg = s.pipeline_config(s.topology());
    let decode_workers = cfg.decode_workers;
    let total = a.messages.max(a.batch);
    // The serve-shaped peak: loading (above), then the worker's run alone, with this
    // process's benchmark inputs, tensors and published backlog dropped before it.
    drop(x);
    drop(buf);
    let n_images = blobs.len();
    let mut image_files = vec![encoder.manifest().image_path()];
    image_files.extend(encoder.manifest().image_data_paths());
    let mut reset = false;
    let e2e = rt.block_on(async {
        let client = setup::connect(&s.nats_options()).await?;
        let js = async_nats::jetstream::new(client.clone());
        let _ = js.delete_stream(&s.input.stream).await;
        let _ = js.delete_stream(&s.output.stream).await;
        let consumer = setup::declare(&js, &cfg.topology).await?;
        let mut acks = Vec::new();
        for i in 0..total {
            let b = &blobs[i % blobs.len()];
            acks.push(
                js.publish(s.input.filter_subject.clone(), b.clone().into())
                    .await?,
            );
        }
        for ack in acks {
            ack.await?;
        }
        drop(blobs);
        // The filter stage's freed buffers stay in glibc's heaps; hand them back so that the
        // serve-shaped peak starts from what a worker would hold.
        oodgate::model::heap::release_free();
        reset = reset_peak_rss();
        let stats = Arc::new(Stats::default());
        let ready = Arc::new(AtomicBool::new(false));
        let st = stats.clone();
        let done = CancellationToken::new();
        let stop = done.clone();
        tokio::spawn(async move {
            loop {
                let n = st.id.load(Ordering::Relaxed)
                    + st.ood.load(Ordering::Relaxed)
                    + st.dlq.load(Ordering::Relaxed);
                if n >= total {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop.cancel();
        });
        let t = Instant::now();
        oodgate::stream::run(
            client,
            consumer,
            Box::new(encoder),
            pre.clone(),
            detector,
            cfg,
            ready,
            Default::default(),
            stats.clone(),
            done,
        )
        .await?;
        let secs = t.elapsed().as_secs_f64();
        anyhow::Ok(total as f64 / secs)
    })?;
    drop(server);
    let ratio = e2e / encoder_ips;
    let filter_ratio = filter_ips / encoder_ips;
    let rss = peak_rss_mib();
    let serve_rss = reset.then(|| load_peak.max(rss));
    let model_mib = image_files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len() as f64 / (1024.0 * 1024.0))
        .sum::<f64>();
    let report = serde_json::json!({
        "model": a.model, "weights_random": random, "provider": provider, "io_binding_active": io_binding_active, "batch": a.batch,
        "intra_threads": threads, "decode_workers": decode_workers, "cores": cores,
        "jpeg_draft": a.jpeg_draft, "intra_spinning": a.intra_spinning, "prepacking": a.prepacking, "cpu_run_batch": a.cpu_run_batch, "trim_heap": a.trim_heap, "io_binding": a.io_binding, "cpu_arena": a.cpu_arena, "memory_pattern": a.memory_pattern,
        "images": n_images, "messages": total,
        "encoder_images_per_s": encoder_ips,
        "preprocess_images_per_s_per_core": pre_one,
        "preprocess_images_per_s_total": pre_all,
        "score_us_per_image": score_us,
        "explain_us_per_image": explain_us,
        "hnsw_recall_at_10": recall10,
        "end_to_end_images_per_s": e2e,
        "ratio_end_to_end_over_encoder": ratio,
        "filter_images_per_s": filter_ips,
        "ratio_filter_over_encoder": filter_ratio,
        "peak_rss_mib": if reset { None } else { Some(rss) },
        "load_peak_rss_mib": load_peak,
        "serve_peak_rss_mib": serve_rss,
        "image_model_file_mib": model_mib,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if random {
            eprintln!("{RANDOM_WEIGHTS_WARNING}");
        }
        println!(
            "oodgate bench — {} (provider {provider}, batch {}, {threads} ORT threads, {decode_workers} decode workers, {cores} cores)",
            a.model.display(),
            a.batch
        );
        println!("| measure | value |");
        println!("|---|---|");
        println!("| encoder only (pre-made tensors) | {encoder_ips:.1} images/s |");
        println!("| preprocessing, one core | {pre_one:.1} images/s |");
        println!("| preprocessing, {cores} cores | {pre_all:.1} images/s |");
        println!("| scoring (exact, one GEMM per batch) | {score_us:.1} µs/image |");
        println!("| explanation (HNSW top-k) | {explain_us:.1} µs/image |");
        println!("| HNSW recall@10 vs exact (ID rows) | {recall10:.3} |");
        println!("| end to end through NATS ({total} messages) | {e2e:.1} images/s |");
        println!("| end to end / encoder only | {ratio:.2} |");
        println!(
            "| `filter`, one webdataset shard ({total} images, no NATS) | {filter_ips:.1} images/s |"
        );
        println!("| `filter` / encoder only | {filter_ratio:.2} |");
        match serve_rss {
            Some(r) => println!(
                "| serve-shaped peak RSS (load, then end to end) | {r:.0} MiB (model file {model_mib:.0} MiB, +{:.0}) |",
                r - model_mib
            ),
            None => println!("| peak RSS (whole benchmark) | {rss:.0} MiB |"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `n` of the images into one webdataset tar (with a `.json` sidecar each) in a
/// temporary folder and times `filter` over it, as `oodgate filter` runs it.
fn bench_filter(
    blobs: &[Vec<u8>],
    n: usize,
    encoder: &mut dyn oodgate::model::Encoder,
    detector: &oodgate::detect::detector::Detector,
    pre: &oodgate::model::Preprocessor,
    s: &Settings,
) -> anyhow::Result<f64> {
    use oodgate::shards::{self, commit::Layout, filter, webdataset::TarWriter};
    let dir = tempfile::tempdir()?;
    let tar = dir.path().join("00000.tar");
    let mut w = TarWriter::create(&tar, shards::Format::Tar)?;
    for i in 0..n {
        let b = &blobs[i % blobs.len()];
        w.append_member(&format!("{i:09}.jpg"), b)?;
        w.append_member(
            &format!("{i:09}.json"),
            format!("{{\"key\": \"{i:09}\"}}").as_bytes(),
        )?;
    }
    w.finish()?;
    let list = shards::discover(&[tar])?;
    let opts = filter::FilterOptions {
        batch: s.batch.max_size,
        decode_workers: s.pipeline_config(s.topology()).decode_workers,
        image_column: None,
        key_column: None,
        config_fingerprint: "bench".into(),
        model_fingerprint: encoder.info().fingerprint.clone(),
    };
    let layout = Layout::new(dir.path().join("out"));
    let summary = filter::run(&list, &layout, encoder, detector, pre, &opts, |_| {});
    if let Some((rel, why)) = summary.failed.first() {
        bail!("filter benchmark: {rel}: {why}");
    }
    Ok((summary.counts.id + summary.counts.ood + summary.counts.errors) as f64 / summary.seconds)
}
