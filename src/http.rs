//! The daemon's HTTP endpoints: `/metrics` (Prometheus), `/healthz` (the encoder thread runs
//! and work in flight moves), `/readyz`
//! (model and bank loaded, NATS connected) and `/info` (versions, model, bank, method,
//! threshold, provider, the adaptive memory's live counters) as JSON.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::detect::adaptive::SharedMemory;

#[derive(Clone)]
pub struct HttpState {
    pub ready: Arc<AtomicBool>,
    pub client: Arc<OnceLock<async_nats::Client>>,
    pub metrics: PrometheusHandle,
    pub info: Arc<RwLock<serde_json::Value>>,
    pub health: crate::stream::housekeeping::Health,
    /// The adaptive detector's memory once the pipeline holds one: `/info` reads its live
    /// counters (`adaptive.live`) on every request.
    pub adaptive: Arc<OnceLock<SharedMemory>>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/info", get(info))
        .with_state(state)
}

/// Binds and serves in the background; returns the bound address (port 0 picks a free one).
pub async fn serve(addr: SocketAddr, state: HttpState) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state)).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(bound)
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<HttpState>) -> impl IntoResponse {
    match s.health.problem() {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    let nats = s
        .client
        .get()
        .map(|c| c.connection_state() == async_nats::connection::State::Connected)
        .unwrap_or(false);
    let pipeline = s.ready.load(Ordering::SeqCst);
    let body = serde_json::json!({ "ready": nats && pipeline, "nats_connected": nats, "pipeline_running": pipeline });
    let code = if nats && pipeline {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn info(State(s): State<HttpState>) -> impl IntoResponse {
    let mut v = s.info.read().map(|v| v.clone()).unwrap_or_default();
    if let Some(live) = s
        .adaptive
        .get()
        .and_then(|m| m.lock().ok().map(|m| m.stats()))
        && let Some(a) = v.get_mut("adaptive").filter(|a| a.is_object())
    {
        a["live"] = serde_json::json!(live);
    }
    Json(v)
}
