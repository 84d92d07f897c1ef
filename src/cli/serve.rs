//! `oodgate serve`: the long-running worker.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock, RwLock};

use anyhow::Context;
use oodgate::config::Settings;
use oodgate::detect::detector::ThresholdChoice;
use oodgate::model::Encoder;
use oodgate::stream::setup;
use oodgate::stream::{Stats, metrics};
use tokio_util::sync::CancellationToken;

use super::common::worker::{adaptive_memory, limit_malloc_arenas, load_worker};

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
    limit_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("oodgate-io")
        .build()?;
    rt.block_on(serve(settings))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(s: Settings) -> anyhow::Result<()> {
    let handle = metrics::install().map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    let ready = Arc::new(AtomicBool::new(false));
    let health = oodgate::stream::housekeeping::Health::default();
    let client_cell: Arc<OnceLock<async_nats::Client>> = Arc::new(OnceLock::new());
    let adaptive_cell: Arc<OnceLock<oodgate::detect::adaptive::SharedMemory>> =
        Arc::new(OnceLock::new());
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
                health: health.clone(),
                adaptive: adaptive_cell.clone(),
            },
        )
        .await
        .with_context(|| format!("binding http.listen = {}", s.http.listen))?;
        tracing::info!(%bound, "HTTP endpoints: /metrics /healthz /readyz /info");
    }

    // Model and bank (blocking work off the reactor).
    let s2 = s.clone();
    let (encoder, detector, pre) =
        tokio::task::spawn_blocking(move || load_worker(&s2, ThresholdChoice::FromBank)).await??;
    let adaptive = adaptive_memory(&s, &detector)?;
    let batch_max = s.batch.max_size;
    let subjects = s.output_subjects();
    {
        let e = encoder.info();
        let bank = detector.bank();
        if let Ok(mut i) = info.write() {
            *i = serde_json::json!({
                "oodgate": env!("CARGO_PKG_VERSION"),
                "onnxruntime": e.ort_version, "ort_library": e.ort_library,
                "provider": e.provider, "device_requested": e.device_requested, "intra_threads": e.intra_threads,
                "model": { "name": e.model, "weights": e.weights, "fingerprint": e.fingerprint, "embed_dim": e.embed_dim, "dir": s.model.dir },
                "bank": { "path": s.detector.bank, "version": bank.version(), "id_classes": bank.id.nrows(),
                          "outliers": bank.outliers.nrows(), "theta": bank.meta.theta },
                "method": detector.method().to_string(), "threshold": detector.threshold().map(|t| t.value), "score_direction": "higher = more in-distribution",
                "subjects": { "input": s.input.filter_subject, "id": subjects.id, "ood": subjects.ood, "dlq": subjects.dlq },
                "batch": { "max_size": batch_max, "max_wait": format!("{:?}", s.batch.max_wait) },
                "adaptive": adaptive.as_ref().map(|m| serde_json::json!({
                    "params": m.params(), "calibration": m.calibration(),
                    "sync": s.detector.adaptive.sync,
                })),
            });
        }
    }

    let nats = s.nats_options();
    let client = setup::connect(&nats).await?;
    let _ = client_cell.set(client.clone());
    let topology = s.topology();
    let js = async_nats::jetstream::new(client.clone());
    let consumer = declare_with_retry(&js, &topology).await?;
    let mut cfg = s.pipeline_config(topology);
    cfg.adaptive = adaptive.map(|m| {
        let m = Arc::new(std::sync::Mutex::new(m));
        let _ = adaptive_cell.set(m.clone());
        m
    });
    let (decode_workers, batch_max) = (cfg.decode_workers, cfg.batch_max);
    tracing::info!(decode_workers, batch_max, "starting pipeline");
    let stats = Arc::new(Stats::default());
    // The one shutdown signal: SIGINT or SIGTERM cancels the token every stage watches.
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });
    oodgate::stream::run(
        client,
        consumer,
        Box::new(encoder),
        pre,
        detector,
        cfg,
        ready,
        health,
        stats.clone(),
        shutdown,
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

/// Declares the topology, retrying JetStream errors (a cluster electing leaders answers with
/// timeouts for a few seconds) for up to two minutes; a configuration mismatch fails at once.
async fn declare_with_retry(
    js: &async_nats::jetstream::Context,
    topology: &setup::Topology,
) -> anyhow::Result<async_nats::jetstream::consumer::PullConsumer> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut wait = std::time::Duration::from_millis(250);
    loop {
        match setup::declare(js, topology).await {
            Ok(c) => return Ok(c),
            Err(e @ setup::SetupError::JetStream { .. })
                if tokio::time::Instant::now() + wait < deadline =>
            {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot declare the streams yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
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
