//! Connecting to NATS and declaring the input stream, the durable pull consumer and the
//! output stream (ID, OOD and dead-letter subjects in one stream, so deduplication covers all).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};

use super::route::OutputSubjects;
use super::stream_spec::{self, Mismatch, StreamSpec};

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
    /// Prefix of reply subjects (`_INBOX` when empty).
    pub inbox_prefix: String,
}

/// `url` with any credentials in it (`nats://user:pass@host`, `nats://token@host`) replaced by
/// `<redacted>`, for every log line, error and `config show`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}<redacted>{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// True when `url` carries credentials (user information before the host).
pub fn url_has_credentials(url: &str) -> bool {
    redact_url(url) != url
}

/// Connects with unlimited reconnects; reconnection events are logged. A first attempt
/// that fails on TLS or authentication is reported at once (retrying cannot fix it); a server
/// that is not reachable yet is waited for, up to 30 s.
pub async fn connect(o: &NatsOptions) -> Result<async_nats::Client, SetupError> {
    let servers = shown_servers(o);
    let err = |reason: String| SetupError::Connect {
        servers: servers.clone(),
        reason,
    };
    let urls: Vec<async_nats::ServerAddr> = o
        .servers
        .iter()
        .map(|s| {
            s.parse::<async_nats::ServerAddr>()
                .map_err(|e| err(format!("bad server address {}: {e}", redact_url(s))))
        })
        .collect::<Result<_, _>>()?;
    let client = match options(o).await?.connect(urls.clone()).await {
        Ok(client) => client,
        Err(e) => {
            use async_nats::ConnectErrorKind as K;
            // TLS failures during the handshake surface as IO errors carrying rustls' words:
            // a plain server answering (InvalidContentType), a refused or missing client
            // certificate (a fatal alert), an unverifiable server certificate.
            let text = e.to_string();
            let tls_failure = e.kind() == K::Tls
                || [
                    "InvalidContentType",
                    "fatal alert",
                    "certificate",
                    "Certificate",
                ]
                .iter()
                .any(|w| text.contains(w));
            match e.kind() {
                _ if tls_failure => {
                    let hint = if o.tls_required {
                        " (nats.tls_required is set: is the server serving TLS, and does nats.tls_ca verify it?)"
                    } else {
                        " (check nats.tls_ca, nats.tls_cert and nats.tls_key)"
                    };
                    return Err(err(format!("TLS failed: {e}{hint}")));
                }
                K::Authentication | K::AuthorizationViolation => {
                    return Err(err(format!(
                        "authentication failed: {e} (check nats.user / nats.password, nats.token, nats.nkey or nats.creds_file)"
                    )));
                }
                // Not reachable yet (a server starting next to us): keep trying in the background.
                _ => {
                    tracing::warn!(error = %e, "NATS not reachable yet; retrying");
                    options(o)
                        .await?
                        .retry_on_initial_connect()
                        .connect(urls)
                        .await
                        .map_err(|e| err(e.to_string()))?
                }
            }
        }
    };
    // With retry_on_initial_connect, connect returns at once and connects in the background;
    // wait (bounded) for the first connection so start-up errors are reported.
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

/// Applies credentials written in a server URL (`nats://user:password@host` or
/// `nats://token@host`), which the client library does not read from the URL by itself. The
/// first URL that carries any wins.
pub fn with_url_credentials(
    opts: async_nats::ConnectOptions,
    urls: &[String],
) -> async_nats::ConnectOptions {
    let creds = urls.iter().find_map(|u| {
        let addr = u.parse::<async_nats::ServerAddr>().ok()?;
        let user = addr.username()?.to_string();
        Some((user, addr.password().map(str::to_string)))
    });
    match creds {
        Some((user, Some(password))) => opts.user_and_password(user, password),
        Some((token, None)) => opts.token(token),
        None => opts,
    }
}

/// The server list as shown in errors: comma-separated, credentials redacted.
fn shown_servers(o: &NatsOptions) -> String {
    o.servers
        .iter()
        .map(|s| redact_url(s))
        .collect::<Vec<_>>()
        .join(",")
}

/// The client options: name, unlimited reconnects, credentials, TLS and event logging.
async fn options(o: &NatsOptions) -> Result<async_nats::ConnectOptions, SetupError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(if o.name.is_empty() {
            "oodgate"
        } else {
            &o.name
        })
        .max_reconnects(None)
        .custom_inbox_prefix(if o.inbox_prefix.is_empty() {
            "_INBOX"
        } else {
            &o.inbox_prefix
        })
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
                async_nats::Event::ServerError(async_nats::ServerError::Other(e))
                    if super::permissions::record(&e) =>
                {
                    tracing::warn!(error = %e, "refused by the server's permissions")
                }
                other => tracing::info!(event = %other, "NATS event"),
            }
        });
    let configured =
        o.user.is_some() || o.token.is_some() || o.nkey.is_some() || o.creds_file.is_some();
    if !configured {
        opts = with_url_credentials(opts, &o.servers);
    }
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
            .map_err(|e| SetupError::Connect {
                servers: shown_servers(o),
                reason: format!("credentials file {}: {e}", c.display()),
            })?;
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
    Ok(opts)
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
    /// Shape of the input stream when oodgate creates it; an existing one with weaker
    /// settings is refused (or updated, with `update_input`).
    pub input_spec: StreamSpec,
    /// Bring an existing consumer (and input stream) up to this configuration instead of
    /// refusing to start.
    pub update_input: bool,
    pub output_stream: String,
    pub output_subjects: OutputSubjects,
    pub create_output: bool,
    pub duplicate_window: Duration,
    pub output_spec: StreamSpec,
    pub update_output: bool,
    /// The claim-check bucket and the object age it must keep (0: the bucket is not managed).
    pub object_bucket: String,
    pub object_ttl: Duration,
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

fn mismatches_of_consumer(c: &jetstream::consumer::Config, t: &Topology) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let name = &t.durable;
    if c.ack_wait != t.ack_wait {
        out.push(Mismatch::new(
            format!("consumer {name} ack_wait"),
            format!("{:?}", c.ack_wait),
            format!("{:?} (input.ack_wait)", t.ack_wait),
        ));
    }
    if c.max_deliver != t.max_deliver {
        out.push(Mismatch::new(
            format!("consumer {name} max_deliver"),
            c.max_deliver.to_string(),
            format!("{} (input.max_deliver)", t.max_deliver),
        ));
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
/// with the configuration: a weaker setting (fewer replicas, memory storage, another retention,
/// a tighter limit, discarding old messages, a shorter duplicate window, another `ack_wait` or
/// `max_deliver`) stops the worker with both values named, unless `update_input` /
/// `update_output` allows bringing it up to the configuration. Storage and retention cannot be
/// changed by an update and always stop the worker.
pub async fn declare(
    js: &jetstream::Context,
    t: &Topology,
) -> Result<jetstream::consumer::PullConsumer, SetupError> {
    let je = |what: &str, e: &dyn std::fmt::Display| SetupError::JetStream {
        what: what.to_string(),
        reason: e.to_string(),
    };
    let mut input = if t.create_input {
        let mut cfg = stream::Config {
            name: t.input_stream.clone(),
            subjects: t.input_subjects.clone(),
            ..Default::default()
        };
        t.input_spec.apply(&mut cfg);
        js.get_or_create_stream(cfg)
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
        let mut cfg = stream::Config {
            name: t.output_stream.clone(),
            subjects: t.output_subjects.all().map(String::from).to_vec(),
            duplicate_window: t.duplicate_window,
            ..Default::default()
        };
        t.output_spec.apply(&mut cfg);
        js.get_or_create_stream(cfg)
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
    let bucket_weak = declare_bucket(js, t).await?;
    let existing = input.get_consumer::<pull::Config>(&t.durable).await.ok();
    let consumer_info = existing.as_ref().map(|c| c.cached_info().config.clone());

    // Compare everything first, so one start-up error names every weaker setting.
    let input_weak = stream_spec::weaker_settings(&input_info.config, &t.input_spec, None);
    let window = Some(t.duplicate_window);
    let output_weak = output_info
        .as_ref()
        .map(|i| stream_spec::weaker_settings(&i.config, &t.output_spec, window))
        .unwrap_or_default();
    let consumer_weak = consumer_info
        .as_ref()
        .map(|c| mismatches_of_consumer(c, t))
        .unwrap_or_default();
    let mut refused: Vec<Mismatch> = Vec::new();
    let mut keys = Vec::new();
    let input_side: Vec<&Mismatch> = input_weak
        .iter()
        .chain(&consumer_weak)
        .chain(&bucket_weak)
        .collect();
    if !input_side.is_empty() && (!t.update_input || input_side.iter().any(|m| !m.updatable)) {
        refused.extend(input_side.into_iter().cloned());
        keys.push("input.update_existing");
    }
    if !output_weak.is_empty() && (!t.update_output || output_weak.iter().any(|m| !m.updatable)) {
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
        let cfg = stream_spec::strengthened(&input_info.config, &t.input_spec, None);
        js.update_stream(cfg)
            .await
            .map_err(|e| je(&format!("updating input stream {}", t.input_stream), &e))?;
        tracing::warn!(stream = %t.input_stream, "input stream updated to the configuration");
    }
    if !bucket_weak.is_empty() {
        let name = format!("OBJ_{}", t.object_bucket);
        let mut s = js
            .get_stream(&name)
            .await
            .map_err(|e| je(&format!("object store bucket {}", t.object_bucket), &e))?;
        let mut cfg = s
            .info()
            .await
            .map_err(|e| je(&format!("object store bucket {}", t.object_bucket), &e))?
            .config
            .clone();
        cfg.max_age = t.object_ttl;
        js.update_stream(cfg).await.map_err(|e| {
            je(
                &format!("updating object store bucket {}", t.object_bucket),
                &e,
            )
        })?;
        tracing::warn!(bucket = %t.object_bucket, ttl = ?t.object_ttl, "object store bucket updated to the configuration");
    }
    if let (false, Some(info)) = (output_weak.is_empty(), &output_info) {
        let cfg = stream_spec::strengthened(&info.config, &t.output_spec, window);
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

/// With `input.object_store_ttl` set, makes sure the claim-check bucket exists and keeps
/// objects at least that long; returns the bucket's weaker setting, if any.
async fn declare_bucket(
    js: &jetstream::Context,
    t: &Topology,
) -> Result<Vec<Mismatch>, SetupError> {
    if t.object_ttl.is_zero() {
        return Ok(Vec::new());
    }
    let je = |e: &dyn std::fmt::Display| SetupError::JetStream {
        what: format!("object store bucket {}", t.object_bucket),
        reason: e.to_string(),
    };
    // The bucket's backing stream is OBJ_<bucket>; its max_age is the objects' TTL.
    match js.get_stream(format!("OBJ_{}", t.object_bucket)).await {
        Ok(mut s) => {
            let info = s.info().await.map_err(|e| je(&e))?;
            Ok(stream_spec::bucket_expires_sooner(
                &t.object_bucket,
                info.config.max_age,
                t.object_ttl,
            )
            .into_iter()
            .collect())
        }
        Err(_) => {
            js.create_object_store(jetstream::object_store::Config {
                bucket: t.object_bucket.clone(),
                max_age: t.object_ttl,
                num_replicas: t.input_spec.replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(|e| je(&e))?;
            tracing::info!(bucket = %t.object_bucket, ttl = ?t.object_ttl, "object store bucket created");
            Ok(Vec::new())
        }
    }
}
