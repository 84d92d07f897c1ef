//! Connecting to NATS and declaring the input stream, the durable pull consumer and the
//! output stream (ID, OOD and dead-letter subjects in one stream, so deduplication covers all).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};

use super::route::OutputSubjects;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot connect to NATS at {servers}: {reason}")]
    Connect { servers: String, reason: String },
    #[error("JetStream {what}: {reason}")]
    JetStream { what: String, reason: String },
    #[error(
        "{}; refusing to run with weaker delivery guarantees than configured (fix the server \
         or the configuration, or set {keys} = true to update the server)",
        found.iter().map(|m| m.to_string()).collect::<Vec<_>>().join("; ")
    )]
    Mismatch { found: Vec<Mismatch>, keys: String },
}

/// How to reach NATS.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    pub servers: Vec<String>,
    pub name: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub nkey: Option<String>,
    pub creds_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_required: bool,
    pub connect_timeout: Duration,
}

/// Connects with unlimited reconnects; reconnection events are logged.
pub async fn connect(o: &NatsOptions) -> Result<async_nats::Client, SetupError> {
    let servers = o.servers.join(",");
    let err = |reason: String| SetupError::Connect {
        servers: servers.clone(),
        reason,
    };
    let mut opts = async_nats::ConnectOptions::new()
        .name(if o.name.is_empty() {
            "oodgate"
        } else {
            &o.name
        })
        .max_reconnects(None)
        .retry_on_initial_connect()
        .connection_timeout(if o.connect_timeout.is_zero() {
            Duration::from_secs(5)
        } else {
            o.connect_timeout
        })
        .event_callback(|ev| async move {
            match ev {
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS disconnected; reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                async_nats::Event::SlowConsumer(n) => {
                    tracing::warn!(subscription = n, "NATS slow consumer")
                }
                other => tracing::info!(event = %other, "NATS event"),
            }
        });
    if let (Some(u), Some(p)) = (&o.user, &o.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &o.token {
        opts = opts.token(t.clone());
    }
    if let Some(seed) = &o.nkey {
        opts = opts.nkey(seed.clone());
    }
    if let Some(c) = &o.creds_file {
        opts = opts
            .credentials_file(c)
            .await
            .map_err(|e| err(format!("credentials file {}: {e}", c.display())))?;
    }
    if let Some(ca) = &o.tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(c), Some(k)) = (&o.tls_cert, &o.tls_key) {
        opts = opts.add_client_certificate(c.clone(), k.clone());
    }
    if o.tls_required {
        opts = opts.require_tls(true);
    }
    let urls: Vec<async_nats::ServerAddr> = o
        .servers
        .iter()
        .map(|s| {
            s.parse::<async_nats::ServerAddr>()
                .map_err(|e| err(format!("bad server address {s}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    // With retry_on_initial_connect, connect returns at once and connects in the background;
    // wait (bounded) for the first connection so start-up errors are reported.
    let client = opts.connect(urls).await.map_err(|e| err(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() > deadline {
            return Err(err("no connection within 30 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let info = client.server_info();
    tracing::info!(server = %info.server_name, version = %info.version, jetstream = info.jetstream, "connected to NATS");
    if !info.jetstream {
        return Err(err(
            "the server does not have JetStream enabled (start it with -js)".into(),
        ));
    }
    Ok(client)
}

/// Stream and consumer settings.
#[derive(Debug, Clone)]
pub struct Topology {
    pub input_stream: String,
    pub input_subjects: Vec<String>,
    pub create_input: bool,
    pub filter_subject: String,
    pub durable: String,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub max_ack_pending: i64,
    /// Replicas of the input stream when oodgate creates it; an existing one with fewer is
    /// refused (or updated, with `update_input`).
    pub input_replicas: usize,
    /// Bring an existing consumer (and input stream) up to this configuration instead of
    /// refusing to start.
    pub update_input: bool,
    pub output_stream: String,
    pub output_subjects: OutputSubjects,
    pub create_output: bool,
    pub duplicate_window: Duration,
    pub output_replicas: usize,
    pub update_output: bool,
}

/// The input stream's identity: its creation time in Unix nanoseconds. A stream that is
/// deleted and created again restarts its sequences at 1 but gets a new identity.
pub async fn input_epoch(js: &jetstream::Context, stream: &str) -> Result<String, SetupError> {
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| SetupError::JetStream {
            what: format!("input stream {stream}"),
            reason: e.to_string(),
        })?;
    Ok(epoch_of(s.cached_info()))
}

/// The identity string of a stream: its creation time in Unix nanoseconds.
pub fn epoch_of(info: &stream::Info) -> String {
    info.created.unix_timestamp_nanos().to_string()
}

/// One setting of an existing stream or consumer weaker than the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub what: String,
    pub existing: String,
    pub configured: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is {} on the server but {} in the configuration",
            self.what, self.existing, self.configured
        )
    }
}

fn mismatches_of_stream(
    info: &stream::Info,
    replicas: usize,
    duplicate_window: Option<Duration>,
) -> Vec<Mismatch> {
    let c = &info.config;
    let mut out = Vec::new();
    if c.num_replicas.max(1) < replicas.max(1) {
        out.push(Mismatch {
            what: format!("stream {} replicas", c.name),
            existing: c.num_replicas.max(1).to_string(),
            configured: replicas.to_string(),
        });
    }
    if let Some(w) = duplicate_window
        && c.duplicate_window < w
    {
        out.push(Mismatch {
            what: format!("stream {} duplicate_window", c.name),
            existing: format!("{:?}", c.duplicate_window),
            configured: format!("{w:?} (output.duplicate_window)"),
        });
    }
    out
}

fn mismatches_of_consumer(c: &jetstream::consumer::Config, t: &Topology) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let name = &t.durable;
    if c.ack_wait != t.ack_wait {
        out.push(Mismatch {
            what: format!("consumer {name} ack_wait"),
            existing: format!("{:?}", c.ack_wait),
            configured: format!("{:?} (input.ack_wait)", t.ack_wait),
        });
    }
    if c.max_deliver != t.max_deliver {
        out.push(Mismatch {
            what: format!("consumer {name} max_deliver"),
            existing: c.max_deliver.to_string(),
            configured: format!("{} (input.max_deliver)", t.max_deliver),
        });
    }
    out
}

/// The consumer configuration oodgate declares.
fn consumer_config(t: &Topology) -> pull::Config {
    pull::Config {
        durable_name: Some(t.durable.clone()),
        filter_subject: t.filter_subject.clone(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: t.ack_wait,
        max_deliver: t.max_deliver,
        max_ack_pending: t.max_ack_pending,
        ..Default::default()
    }
}

/// Declares (or looks up) the streams and the durable consumer. Existing ones are compared
/// with the configuration: a weaker setting (fewer replicas, a shorter duplicate window,
/// another `ack_wait` or `max_deliver`) stops the worker with both values named, unless
/// `update_input` / `update_output` allows bringing it up to the configuration.
pub async fn declare(
    js: &jetstream::Context,
    t: &Topology,
) -> Result<jetstream::consumer::PullConsumer, SetupError> {
    let je = |what: &str, e: &dyn std::fmt::Display| SetupError::JetStream {
        what: what.to_string(),
        reason: e.to_string(),
    };
    let mut input = if t.create_input {
        js.get_or_create_stream(stream::Config {
            name: t.input_stream.clone(),
            subjects: t.input_subjects.clone(),
            storage: stream::StorageType::File,
            num_replicas: t.input_replicas.max(1),
            ..Default::default()
        })
        .await
        .map_err(|e| je(&format!("input stream {}", t.input_stream), &e))?
    } else {
        js.get_stream(&t.input_stream).await.map_err(|e| {
            je(
                &format!(
                    "input stream {} (create_if_missing = false)",
                    t.input_stream
                ),
                &e,
            )
        })?
    };
    let input_info = input
        .info()
        .await
        .map_err(|e| je(&format!("input stream {}", t.input_stream), &e))?
        .clone();
    if t.create_output {
        js.get_or_create_stream(stream::Config {
            name: t.output_stream.clone(),
            subjects: t.output_subjects.all().map(String::from).to_vec(),
            storage: stream::StorageType::File,
            duplicate_window: t.duplicate_window,
            num_replicas: t.output_replicas.max(1),
            ..Default::default()
        })
        .await
        .map_err(|e| je(&format!("output stream {}", t.output_stream), &e))?;
    }
    let output_info = match js.get_stream(&t.output_stream).await {
        Ok(mut out) => Some(
            out.info()
                .await
                .map_err(|e| je(&format!("output stream {}", t.output_stream), &e))?
                .clone(),
        ),
        Err(_) => None,
    };
    let existing = input.get_consumer::<pull::Config>(&t.durable).await.ok();
    let consumer_info = existing.as_ref().map(|c| c.cached_info().config.clone());

    // Compare everything first, so one start-up error names every weaker setting.
    let input_weak = mismatches_of_stream(&input_info, t.input_replicas, None);
    let output_weak = output_info
        .as_ref()
        .map(|i| mismatches_of_stream(i, t.output_replicas, Some(t.duplicate_window)))
        .unwrap_or_default();
    let consumer_weak = consumer_info
        .as_ref()
        .map(|c| mismatches_of_consumer(c, t))
        .unwrap_or_default();
    let mut refused = Vec::new();
    let mut keys = Vec::new();
    let input_side_weak = !input_weak.is_empty() || !consumer_weak.is_empty();
    if input_side_weak && !t.update_input {
        refused.extend(input_weak.iter().cloned());
        refused.extend(consumer_weak.iter().cloned());
        keys.push("input.update_existing");
    }
    if !t.update_output && !output_weak.is_empty() {
        refused.extend(output_weak.iter().cloned());
        keys.push("output.update_existing");
    }
    if !refused.is_empty() {
        return Err(SetupError::Mismatch {
            found: refused,
            keys: keys.join(" / "),
        });
    }
    if !input_weak.is_empty() {
        let mut cfg = input_info.config.clone();
        cfg.num_replicas = t.input_replicas.max(1);
        js.update_stream(cfg)
            .await
            .map_err(|e| je(&format!("updating input stream {}", t.input_stream), &e))?;
        tracing::warn!(stream = %t.input_stream, replicas = t.input_replicas, "input stream updated to the configuration");
    }
    if let (false, Some(info)) = (output_weak.is_empty(), &output_info) {
        let mut cfg = info.config.clone();
        cfg.num_replicas = cfg.num_replicas.max(t.output_replicas.max(1));
        cfg.duplicate_window = cfg.duplicate_window.max(t.duplicate_window);
        js.update_stream(cfg)
            .await
            .map_err(|e| je(&format!("updating output stream {}", t.output_stream), &e))?;
        tracing::warn!(stream = %t.output_stream, "output stream updated to the configuration");
    }
    let consumer: jetstream::consumer::PullConsumer = match existing {
        Some(c) if consumer_weak.is_empty() => c,
        Some(_) => {
            let c = input
                .create_consumer(consumer_config(t))
                .await
                .map_err(|e| je(&format!("updating consumer {}", t.durable), &e))?;
            tracing::warn!(durable = %t.durable, "consumer updated to the configuration");
            c
        }
        None => input
            .get_or_create_consumer(&t.durable, consumer_config(t))
            .await
            .map_err(|e| je(&format!("consumer {}", t.durable), &e))?,
    };
    // The API takes nanoseconds and unit bugs are common: log what the server holds.
    let mut c = consumer.clone();
    if let Ok(info) = c.info().await {
        let cfg = &info.config;
        tracing::info!(
            stream = %t.input_stream, durable = %t.durable, filter = %cfg.filter_subject,
            ack_wait = ?cfg.ack_wait, max_deliver = cfg.max_deliver, max_ack_pending = cfg.max_ack_pending,
            "effective consumer configuration"
        );
    }
    Ok(consumer)
}
