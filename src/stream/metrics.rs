//! Prometheus metrics of the daemon (metrics facade + metrics-exporter-prometheus).
//! Names are part of the user contract (dashboards and alerts).

use std::sync::atomic::AtomicUsize;

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const IN: &str = "oodgate_messages_in_total";
pub const OUT: &str = "oodgate_messages_out_total";
pub const DLQ: &str = "oodgate_dlq_total";
pub const NAKS: &str = "oodgate_naks_total";
pub const BATCH_SIZE: &str = "oodgate_batch_size";
pub const STAGE_SECONDS: &str = "oodgate_stage_seconds";
pub const SCORE: &str = "oodgate_score";
pub const IN_FLIGHT: &str = "oodgate_in_flight";
pub const QUEUE_DEPTH: &str = "oodgate_queue_depth";
pub const PROVIDER: &str = "oodgate_execution_provider";
pub const PENDING: &str = "oodgate_consumer_pending";
pub const READY: &str = "oodgate_ready";
pub const OUTPUT_BLOCKED: &str = "oodgate_output_blocked";
pub const OBJECTS_DELETED: &str = "oodgate_objects_deleted_total";
pub const BYTES_IN_FLIGHT: &str = "oodgate_bytes_in_flight";
pub const BYTES_IN_FLIGHT_PEAK: &str = "oodgate_bytes_in_flight_peak";
pub const ADAPTIVE_ENTRIES: &str = "oodgate_adaptive_entries";
pub const ADAPTIVE_ADMISSIONS: &str = "oodgate_adaptive_admissions_total";
pub const ADAPTIVE_EVICTIONS: &str = "oodgate_adaptive_evictions_total";
pub const ADAPTIVE_RATE_LIMITED: &str = "oodgate_adaptive_rate_limited_total";
pub const ADAPTIVE_PENALISED: &str = "oodgate_adaptive_penalised_total";

/// Counters a caller (tests, `bench`) can read after the run.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicUsize,
    pub id: AtomicUsize,
    pub ood: AtomicUsize,
    pub dlq: AtomicUsize,
    pub naks: AtomicUsize,
}

/// Installs the global recorder once and returns its render handle.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let seconds: Vec<f64> = (0..16).map(|i| 0.0005 * 2f64.powi(i)).collect();
    let sizes: Vec<f64> = (0..10).map(|i| 2f64.powi(i)).collect();
    let scores: Vec<f64> = (0..=20).map(|i| i as f64 / 20.0).collect();
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(STAGE_SECONDS.into()), &seconds)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &sizes))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(SCORE.into()), &scores))
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe_counter!(IN, "Input messages received from JetStream");
    describe_counter!(OUT, "Messages published, by decision (id, ood, dlq)");
    describe_counter!(DLQ, "Dead-lettered inputs by error kind");
    describe_counter!(NAKS, "Inputs NAKed for redelivery, by reason");
    describe_gauge!(
        BYTES_IN_FLIGHT,
        "Bytes held by in-flight inputs (payloads and fetched objects), bounded by input.max_bytes_in_flight"
    );
    describe_gauge!(
        BYTES_IN_FLIGHT_PEAK,
        "The most bytes in-flight inputs held at once since start-up"
    );
    describe_counter!(
        OBJECTS_DELETED,
        "Claim-checked objects deleted after their input was routed (input.object_after_routing)"
    );
    describe_gauge!(
        ADAPTIVE_ENTRIES,
        "Entries in the adaptive detector's memory"
    );
    describe_counter!(
        ADAPTIVE_ADMISSIONS,
        "Images admitted to the adaptive detector's memory"
    );
    describe_counter!(
        ADAPTIVE_EVICTIONS,
        "Entries evicted from the adaptive detector's memory (bucket cap, capacity, age)"
    );
    describe_counter!(
        ADAPTIVE_RATE_LIMITED,
        "Admissions dropped by detector.adaptive.admit_per_mille"
    );
    describe_counter!(
        ADAPTIVE_PENALISED,
        "Images whose score the adaptive detector lowered"
    );
    describe_histogram!(BATCH_SIZE, "Images per encoder batch");
    describe_histogram!(
        STAGE_SECONDS,
        "Latency per stage (fetch, decode, queue, infer, score, publish, total)"
    );
    describe_histogram!(SCORE, "Scores of routed images");
    describe_gauge!(IN_FLIGHT, "Inputs received and not yet acked or NAKed");
    describe_gauge!(QUEUE_DEPTH, "Decoded images waiting for the encoder");
    describe_gauge!(
        PROVIDER,
        "Active execution provider (label provider), 1 when active"
    );
    describe_gauge!(
        PENDING,
        "Messages pending on the durable consumer (read every 15 s)"
    );
    describe_gauge!(
        READY,
        "1 when model and bank are loaded, NATS is connected and outputs can be published"
    );
    describe_gauge!(
        OUTPUT_BLOCKED,
        "1 while publishing fails and intake is paused (the output circuit breaker is open)"
    );
    let _ = HANDLE.set(handle.clone());
    Ok(handle)
}
