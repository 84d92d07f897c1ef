//! `oodgate serve`: the long-running worker.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock, RwLock};

use anyhow::{Context, bail};
use oodgate::config::Settings;
use oodgate::detect::bank::Bank;
use oodgate::detect::index::IndexParams;
use oodgate::detect::method::{Method, ScoreParams};
use oodgate::model::encoder::EncoderOptions;
use oodgate::model::preprocess::Limits;
use oodgate::model::{
    Device, Encoder, ModelManifest, OrtEncoder, Preprocessor, RANDOM_WEIGHTS_WARNING,
};
use oodgate::stream::pipeline::{Detector, Stats};
use oodgate::stream::setup::{self, NatsOptions, Topology};
use oodgate::stream::{PipelineConfig, metrics};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (layered over config/default.toml; OODGATE__SECTION__KEY env wins).
    #[arg(long, env = "OODGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Shortcut for model.dir.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Shortcut for detector.bank.
    #[arg(long)]
    pub bank: Option<PathBuf>,
    /// Shortcut for nats.servers (one URL).
    #[arg(long)]
    pub nats: Option<String>,
}

pub fn run(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut settings = Settings::load(a.config.as_deref())?;
    if let Some(m) = a.model {
        settings.model.dir = m;
    }
    if let Some(b) = a.bank {
        settings.detector.bank = Some(b);
    }
    if let Some(n) = a.nats {
        settings.nats.servers = vec![n];
    }
    settings.validate_for_serve()?;
    super::logging::init_with(&settings.log.level, &settings.log.format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("oodgate-io")
        .build()?;
    rt.block_on(serve(settings))?;
    Ok(ExitCode::SUCCESS)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

async fn serve(s: Settings) -> anyhow::Result<()> {
    let handle = metrics::install().map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    let ready = Arc::new(AtomicBool::new(false));
    let client_cell: Arc<OnceLock<async_nats::Client>> = Arc::new(OnceLock::new());
    let info = Arc::new(RwLock::new(
        serde_json::json!({ "oodgate": env!("CARGO_PKG_VERSION"), "state": "starting" }),
    ));
    if s.http.enabled {
        let addr = s
            .http
            .listen
            .parse()
            .with_context(|| format!("http.listen = {:?}", s.http.listen))?;
        let bound = oodgate::http::serve(
            addr,
            oodgate::http::HttpState {
                ready: ready.clone(),
                client: client_cell.clone(),
                metrics: handle,
                info: info.clone(),
            },
        )
        .await
        .with_context(|| format!("binding http.listen = {}", s.http.listen))?;
        tracing::info!(%bound, "HTTP endpoints: /metrics /healthz /readyz /info");
    }

    // Model and bank (blocking work off the reactor).
    let s2 = s.clone();
    let (encoder, detector, pre) =
        tokio::task::spawn_blocking(move || load_detector(&s2)).await??;
    let batch_max = s.batch.max_size;
    let subjects = s.output_subjects();
    {
        let e = encoder.info();
        if let Ok(mut i) = info.write() {
            *i = serde_json::json!({
                "oodgate": env!("CARGO_PKG_VERSION"),
                "onnxruntime": e.ort_version, "ort_library": e.ort_library,
                "provider": e.provider, "device_requested": e.device_requested, "intra_threads": e.intra_threads,
                "model": { "name": e.model, "weights": e.weights, "fingerprint": e.fingerprint, "embed_dim": e.embed_dim, "dir": s.model.dir },
                "bank": { "path": s.detector.bank, "version": detector.bank.version(), "id_classes": detector.bank.id.nrows(),
                          "outliers": detector.bank.outliers.nrows(), "theta": detector.bank.meta.theta },
                "method": detector.method.to_string(), "threshold": detector.threshold, "score_direction": "higher = more in-distribution",
                "subjects": { "input": s.input.filter_subject, "id": subjects.id, "ood": subjects.ood, "dlq": subjects.dlq },
                "batch": { "max_size": batch_max, "max_wait": format!("{:?}", s.batch.max_wait) },
            });
        }
    }

    let nats = nats_options(&s);
    let client = setup::connect(&nats).await?;
    let _ = client_cell.set(client.clone());
    let topology = topology(&s);
    let js = async_nats::jetstream::new(client.clone());
    let consumer = setup::declare(&js, &topology).await?;
    let cfg = pipeline_config(&s, topology);
    let (decode_workers, batch_max) = (cfg.decode_workers, cfg.batch_max);
    tracing::info!(decode_workers, batch_max, "starting pipeline");
    let stats = Arc::new(Stats::default());
    oodgate::stream::run(
        client,
        consumer,
        encoder,
        pre,
        detector,
        cfg,
        ready,
        stats.clone(),
        shutdown_signal(),
    )
    .await?;
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        received = stats.received.load(Relaxed),
        id = stats.id.load(Relaxed),
        ood = stats.ood.load(Relaxed),
        dlq = stats.dlq.load(Relaxed),
        naks = stats.naks.load(Relaxed),
        "stopped"
    );
    Ok(())
}

pub fn load_detector(s: &Settings) -> anyhow::Result<(Box<dyn Encoder>, Detector, Preprocessor)> {
    let (enc, det, pre) = load_detector_with_threshold(s, None)?;
    Ok((Box::new(enc), det, pre))
}

/// Loads encoder and bank; `fallback_threshold` is used when neither the settings nor the bank
/// have one (benchmarks), otherwise that is an error.
pub fn load_detector_with_threshold(
    s: &Settings,
    fallback_threshold: Option<f64>,
) -> anyhow::Result<(OrtEncoder, Detector, Preprocessor)> {
    let manifest = ModelManifest::load(&s.model.dir)
        .with_context(|| format!("model.dir = {}", s.model.dir.display()))?;
    if manifest.is_random() {
        eprintln!("{RANDOM_WEIGHTS_WARNING}");
        tracing::warn!("{RANDOM_WEIGHTS_WARNING}");
    }
    let device: Device = s.model.device.parse()?;
    let mut enc = OrtEncoder::load(
        manifest,
        EncoderOptions {
            device,
            intra_threads: s.model.intra_threads,
            ort_library: s.model.ort_library.clone(),
            load_text: false,
        },
    )?;
    tracing::info!(provider = %enc.info().provider, threads = enc.info().intra_threads, "encoder loaded");
    if s.model.warm_up {
        let mut sizes = vec![1, s.batch.max_size];
        sizes.dedup();
        enc.warm_up(&sizes)?;
    }
    let Some(bank_path) = &s.detector.bank else {
        bail!("detector.bank is required for serve")
    };
    let bank = Bank::load(bank_path)?;
    bank.check_model(&enc.info().fingerprint, s.detector.force_fingerprint)?;
    let method: Method = s
        .detector
        .method
        .parse()
        .map_err(|e| anyhow::anyhow!("detector.method: {e}"))?;
    let params = ScoreParams::for_method(method);
    let threshold = match (
        s.detector.threshold,
        bank.meta.thresholds.get(&method.to_string()),
    ) {
        (Some(t), _) => t,
        (None, Some(t)) => t.value,
        (None, None) if fallback_threshold.is_some() => fallback_threshold.unwrap_or_default(),
        (None, None) => bail!(
            "no threshold for method {method}: set detector.threshold, or calibrate the bank with `oodgate calibrate --bank {} --method {method} --id ID_IMAGES --tpr 0.95 --write`",
            bank_path.display()
        ),
    };
    let index = bank.indexes(IndexParams::default());
    let approx = s.detector.approx_params();
    let scorer = bank
        .scorer(&params)?
        .with_approximation(index.outliers.clone(), approx)?;
    let pre = Preprocessor::from_manifest(
        enc.manifest(),
        Limits {
            max_bytes: s.limits.max_bytes as usize,
            max_pixels: s.limits.max_pixels,
        },
    );
    tracing::info!(bank = %bank.version(), %method, threshold, "bank loaded");
    let fingerprint = enc.info().fingerprint.clone();
    Ok((
        enc,
        Detector {
            bank,
            scorer,
            index,
            method,
            params,
            threshold,
            top_k: s.detector.top_k,
            model_fingerprint: fingerprint,
        },
        pre,
    ))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("signal received");
}

pub fn nats_options(s: &Settings) -> NatsOptions {
    NatsOptions {
        servers: s.nats.servers.clone(),
        name: s.nats.name.clone(),
        user: s.nats.user.clone(),
        password: s.nats.password.as_ref().map(|p| p.expose().to_string()),
        token: s.nats.token.as_ref().map(|p| p.expose().to_string()),
        nkey: s.nats.nkey.as_ref().map(|p| p.expose().to_string()),
        creds_file: s.nats.creds_file.clone(),
        tls_ca: s.nats.tls_ca.clone(),
        tls_cert: s.nats.tls_cert.clone(),
        tls_key: s.nats.tls_key.clone(),
        tls_required: s.nats.tls_required,
        connect_timeout: s.nats.connect_timeout,
    }
}

pub fn topology(s: &Settings) -> Topology {
    let subjects = s.output_subjects();
    Topology {
        input_stream: s.input.stream.clone(),
        input_subjects: s.input.subjects.clone(),
        create_input: s.input.create_if_missing,
        filter_subject: s.input.filter_subject.clone(),
        durable: s.input.durable.clone(),
        ack_wait: s.input.ack_wait,
        max_deliver: s.input.max_deliver,
        max_ack_pending: s.input.max_ack_pending,
        output_stream: s.output.stream.clone(),
        output_subjects: [subjects.id, subjects.ood, subjects.dlq],
        create_output: s.output.create_if_missing,
        duplicate_window: s.output.duplicate_window,
    }
}

/// Decode workers when `batch.decode_workers = 0`: half the cores (the encoder takes the rest).
pub fn auto_decode_workers() -> usize {
    cores().div_ceil(2).max(1)
}

pub fn pipeline_config(s: &Settings, topology: Topology) -> PipelineConfig {
    let batch_max = s.batch.max_size;
    PipelineConfig {
        topology,
        pull_batch: s.input.pull_batch,
        pull_expires: s.input.pull_expires,
        heartbeat: s.input.heartbeat,
        publish_timeout: s.output.publish_timeout,
        publish_retries: s.output.publish_retries,
        max_inflight_publishes: s.output.max_inflight_publishes,
        batch_max,
        batch_wait: s.batch.max_wait,
        decode_workers: if s.batch.decode_workers == 0 {
            auto_decode_workers()
        } else {
            s.batch.decode_workers
        },
        queue_depth: s.batch.queue_depth,
        max_in_flight: (s.input.pull_batch + s.batch.queue_depth + 2 * batch_max).max(1),
        drain_timeout: s.shutdown.drain_timeout,
        nak_delay: std::time::Duration::from_secs(2),
        object_max_bytes: s.limits.max_bytes as usize,
    }
}
