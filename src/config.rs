//! Typed settings: layered, checked for unknown keys, validated with errors that name the key.
//!
//! Layers, lowest to highest precedence (the layout of qdrant's `settings.rs`):
//! 1. built-in defaults ([`Default`] impls, equal to the embedded file, a test keeps them equal);
//! 2. `config/default.toml`, compiled in with `include_str!` and shipped as the documented template;
//! 3. the file given with `--config` (partial: only the keys that change);
//! 4. environment variables `OODGATE__<SECTION>__<KEY>` (`__` between parts, so keys keep their
//!    single underscores; a single `_` would silently miss, see stack.md §6).
//!
//! Every key is listed once, in [`KEYS`]: its type, whether it has a default, its environment
//! variable and its description. The README's configuration reference is rendered from that table
//! ([`Settings::reference_markdown`]) and tests keep it, `config/default.toml` and the structs in
//! step. Unknown keys are errors in files and in `OODGATE__` variables alike, with a suggestion.
//!
//! Only this module knows where settings come from; the rest of oodgate takes a [`Settings`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::detect::approx::ApproxParams;

/// The documented defaults, compiled in. Also shipped as `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Environment variables that configure oodgate start with `OODGATE__`.
pub const ENV_PREFIX: &str = "OODGATE";
/// Separator between the prefix, the section and the key in environment variable names.
pub const ENV_SEPARATOR: &str = "__";
/// Separator of list items in environment variables (`nats.servers`, `input.subjects`).
pub const ENV_LIST_SEPARATOR: &str = ",";

// ---------------------------------------------------------------------------------------------
// Key metadata: the one table every reference is generated from.
// ---------------------------------------------------------------------------------------------

/// The value type of a key, as documented and as read from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    String,
    /// A string that is never printed (Debug and Serialize show `<redacted>`).
    Secret,
    Path,
    /// A list of strings; comma-separated in environment variables.
    StringList,
    Bool,
    Integer,
    Float,
    /// A humantime duration string ("20ms", "30s", "15m").
    Duration,
    /// `IP:PORT`.
    SocketAddr,
}

impl Kind {
    /// The name shown in the reference table.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::Secret => "string (secret)",
            Kind::Path => "path",
            Kind::StringList => "list of strings",
            Kind::Bool => "bool",
            Kind::Integer => "integer",
            Kind::Float => "float",
            Kind::Duration => "duration",
            Kind::SocketAddr => "IP:PORT",
        }
    }

    /// Whether an environment value is type-parsed (`try_parsing`): booleans, numbers and lists.
    /// String-like keys are taken verbatim, so a password "0012" or "1e5" stays what it is.
    pub const fn env_parsed(self) -> bool {
        matches!(
            self,
            Kind::StringList | Kind::Bool | Kind::Integer | Kind::Float
        )
    }
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct KeyInfo {
    /// `section.key`.
    pub key: &'static str,
    pub kind: Kind,
    /// True for keys without a default (shown commented out in `config/default.toml`).
    pub optional: bool,
    pub doc: &'static str,
}

impl KeyInfo {
    pub fn section(&self) -> &'static str {
        self.key.split_once('.').map_or(self.key, |(s, _)| s)
    }

    pub fn name(&self) -> &'static str {
        self.key.split_once('.').map_or(self.key, |(_, k)| k)
    }

    /// The environment variable that sets this key, e.g. `OODGATE__BATCH__MAX_SIZE`.
    pub fn env_var(&self) -> String {
        env_var_for(self.key)
    }
}

/// `section.key` → `OODGATE__SECTION__KEY`.
pub fn env_var_for(key: &str) -> String {
    let mut out = String::from(ENV_PREFIX);
    for part in key.split('.') {
        out.push_str(ENV_SEPARATOR);
        out.push_str(&part.to_ascii_uppercase());
    }
    out
}

const fn key(key: &'static str, kind: Kind, doc: &'static str) -> KeyInfo {
    KeyInfo {
        key,
        kind,
        optional: false,
        doc,
    }
}

const fn opt(key: &'static str, kind: Kind, doc: &'static str) -> KeyInfo {
    KeyInfo {
        key,
        kind,
        optional: true,
        doc,
    }
}

/// Every configuration key, in file order. Defaults come from [`DEFAULT_TOML`].
pub const KEYS: &[KeyInfo] = &[
    // [nats]
    key(
        "nats.servers",
        Kind::StringList,
        "NATS server URLs (nats://, tls://, ws://, wss://).",
    ),
    opt(
        "nats.user",
        Kind::String,
        "User name (with `nats.password`).",
    ),
    opt(
        "nats.password",
        Kind::Secret,
        "Password (with `nats.user`).",
    ),
    opt("nats.token", Kind::Secret, "Authentication token."),
    opt(
        "nats.nkey",
        Kind::Secret,
        "NKey seed (`SU…`); the public key is derived from it.",
    ),
    opt(
        "nats.creds_file",
        Kind::Path,
        "Credentials file (JWT + NKey seed) as made by nsc.",
    ),
    opt(
        "nats.tls_ca",
        Kind::Path,
        "CA bundle (PEM) to verify the server certificate.",
    ),
    opt(
        "nats.tls_cert",
        Kind::Path,
        "Client certificate (PEM) for mutual TLS (with `nats.tls_key`).",
    ),
    opt(
        "nats.tls_key",
        Kind::Path,
        "Client private key (PEM) for mutual TLS (with `nats.tls_cert`).",
    ),
    key(
        "nats.tls_required",
        Kind::Bool,
        "Refuse to connect without TLS.",
    ),
    key(
        "nats.connect_timeout",
        Kind::Duration,
        "Time limit for establishing the connection.",
    ),
    key(
        "nats.name",
        Kind::String,
        "Connection name shown in the server's monitoring.",
    ),
    // [input]
    key(
        "input.stream",
        Kind::String,
        "JetStream stream holding the incoming images.",
    ),
    key(
        "input.subjects",
        Kind::StringList,
        "Subjects the input stream captures when oodgate creates it.",
    ),
    key(
        "input.filter_subject",
        Kind::String,
        "Filter subject of the durable consumer.",
    ),
    key(
        "input.durable",
        Kind::String,
        "Durable pull consumer shared by all workers.",
    ),
    key(
        "input.create_if_missing",
        Kind::Bool,
        "Create the input stream and the consumer when missing.",
    ),
    key(
        "input.ack_wait",
        Kind::Duration,
        "Consumer ack_wait: redelivery after this long without an ack.",
    ),
    key(
        "input.max_deliver",
        Kind::Integer,
        "Delivery attempts before a message is dead-lettered (1–1000).",
    ),
    key(
        "input.max_ack_pending",
        Kind::Integer,
        "Unacknowledged messages in flight, shared by all workers.",
    ),
    key(
        "input.pull_batch",
        Kind::Integer,
        "Messages requested per pull (≤ `input.max_ack_pending`).",
    ),
    key(
        "input.pull_expires",
        Kind::Duration,
        "How long one pull request stays open.",
    ),
    key(
        "input.heartbeat",
        Kind::Duration,
        "Idle heartbeat of a pull request (≤ half of `input.pull_expires`; 0 = off).",
    ),
    key(
        "input.object_store_bucket",
        Kind::String,
        "Object Store bucket for claim-check images (`oodgate publish`).",
    ),
    // [output]
    key(
        "output.prefix",
        Kind::String,
        "Prefix of the output subjects.",
    ),
    key(
        "output.id_subject",
        Kind::String,
        "In-distribution subject; empty = `<prefix>.id`.",
    ),
    key(
        "output.ood_subject",
        Kind::String,
        "Out-of-distribution subject; empty = `<prefix>.ood`.",
    ),
    key(
        "output.dlq_subject",
        Kind::String,
        "Dead-letter subject; empty = `<prefix>.dlq`.",
    ),
    key(
        "output.stream",
        Kind::String,
        "JetStream stream capturing the three output subjects.",
    ),
    key(
        "output.create_if_missing",
        Kind::Bool,
        "Create the output stream when missing.",
    ),
    key(
        "output.duplicate_window",
        Kind::Duration,
        "Deduplication window of the output stream (≥ `input.ack_wait`).",
    ),
    key(
        "output.publish_timeout",
        Kind::Duration,
        "Time limit for one publish acknowledgement.",
    ),
    key(
        "output.publish_retries",
        Kind::Integer,
        "Retries of a failed publish (same message ID) before the input is NAKed.",
    ),
    key(
        "output.max_inflight_publishes",
        Kind::Integer,
        "Publishes awaiting their acknowledgement at once.",
    ),
    // [model]
    key(
        "model.dir",
        Kind::Path,
        "Model folder (model.toml + ONNX files).",
    ),
    opt(
        "model.ort_library",
        Kind::Path,
        "ONNX Runtime library; unset: ORT_DYLIB_PATH, .ort/lib, /opt/oodgate/lib.",
    ),
    key(
        "model.device",
        Kind::String,
        "`auto`, `cpu`, `cuda` or `cuda:N`.",
    ),
    key(
        "model.intra_threads",
        Kind::Integer,
        "ONNX Runtime intra-op threads; 0 = automatic.",
    ),
    key(
        "model.warm_up",
        Kind::Bool,
        "Run every batch size once before reporting ready.",
    ),
    // [detector]
    opt(
        "detector.bank",
        Kind::Path,
        "Label bank file (.oodb); required by `oodgate serve`.",
    ),
    key(
        "detector.method",
        Kind::String,
        "Score method (ole, ole-max, ole-penalty, clipn-atd, clipn-ctw, mcm, energy, max-logit, neglabel).",
    ),
    opt(
        "detector.threshold",
        Kind::Float,
        "Decision threshold (score below it is OOD); unset: the bank's calibrated threshold.",
    ),
    key(
        "detector.top_k",
        Kind::Integer,
        "Nearest labels reported with each decision (0–100).",
    ),
    key(
        "detector.force_fingerprint",
        Kind::Bool,
        "Accept a bank built for another model fingerprint.",
    ),
    key(
        "detector.exact_limit",
        Kind::Integer,
        "Banks with more outlier rows are scored approximately (HNSW head + sampled tail).",
    ),
    key(
        "detector.approx_candidates",
        Kind::Integer,
        "Approximate scoring: outlier rows per image taken from HNSW and summed exactly (1–10000).",
    ),
    key(
        "detector.approx_ef_search",
        Kind::Integer,
        "Approximate scoring: HNSW search breadth (at least approx_candidates; up to 10000).",
    ),
    key(
        "detector.approx_tail_sample",
        Kind::Integer,
        "Approximate scoring: size of the uniform sample estimating the rest of the denominator (1–1000000).",
    ),
    // [batch]
    key(
        "batch.max_size",
        Kind::Integer,
        "Largest inference batch (1–4096).",
    ),
    key(
        "batch.max_wait",
        Kind::Duration,
        "A batch closes when its oldest image has waited this long.",
    ),
    key(
        "batch.decode_workers",
        Kind::Integer,
        "Image decode threads; 0 = number of CPUs.",
    ),
    key(
        "batch.queue_depth",
        Kind::Integer,
        "Decoded images waiting for inference (back-pressure bound).",
    ),
    // [limits]
    key(
        "limits.max_bytes",
        Kind::Integer,
        "Largest accepted image in bytes.",
    ),
    key(
        "limits.max_pixels",
        Kind::Integer,
        "Largest accepted image in pixels (width × height).",
    ),
    // [http]
    key(
        "http.listen",
        Kind::SocketAddr,
        "Address of /healthz, /readyz and /metrics.",
    ),
    key(
        "http.enabled",
        Kind::Bool,
        "Serve the health and metrics endpoint.",
    ),
    // [log]
    key(
        "log.level",
        Kind::String,
        "Log level or tracing filter; RUST_LOG wins when set.",
    ),
    key("log.format", Kind::String, "`text` or `json`."),
    // [shutdown]
    key(
        "shutdown.drain_timeout",
        Kind::Duration,
        "Time to finish the in-flight batch after SIGTERM.",
    ),
];

/// The metadata of `section.key`, if it is a known key.
pub fn key_info(key: &str) -> Option<&'static KeyInfo> {
    KEYS.iter().find(|k| k.key == key)
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One invalid value: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Problem {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin} is not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("unknown key `{key}` in {origin}{}", suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownKey {
        key: String,
        origin: String,
        suggestion: Option<String>,
    },
    /// A value of the wrong type (the message names the key and where the value came from).
    #[error("invalid configuration: {0}")]
    Load(String),
    #[error("invalid configuration: {}", list_problems(.0))]
    Invalid(Vec<Problem>),
}

fn list_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ConfigError {
    /// The validation problems (empty for other errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
            _ => &[],
        }
    }
}

impl From<::config::ConfigError> for ConfigError {
    fn from(e: ::config::ConfigError) -> Self {
        ConfigError::Load(e.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// The settings
// ---------------------------------------------------------------------------------------------

/// A string that is never printed: `Debug` and `Serialize` show `<redacted>`. Read it with
/// [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Everything oodgate can be configured with. See `config/default.toml` for each key.
///
/// `Serialize` is for showing the effective settings (secrets print as `<redacted>`), not for
/// writing a config file back.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub nats: NatsSettings,
    pub input: InputSettings,
    pub output: OutputSettings,
    pub model: ModelSettings,
    pub detector: DetectorSettings,
    pub batch: BatchSettings,
    pub limits: LimitsSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub shutdown: ShutdownSettings,
}

/// `[nats]`: connection and authentication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    pub servers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// NKey seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    pub tls_required: bool,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub name: String,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            servers: vec!["nats://127.0.0.1:4222".into()],
            user: None,
            password: None,
            token: None,
            nkey: None,
            creds_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            connect_timeout: Duration::from_secs(5),
            name: "oodgate".into(),
        }
    }
}

/// How the worker authenticates to NATS (at most one method; see [`NatsSettings::auth`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsAuth<'a> {
    None,
    UserPassword { user: &'a str, password: &'a Secret },
    Token(&'a Secret),
    NKeySeed(&'a Secret),
    CredsFile(&'a Path),
}

impl NatsSettings {
    /// The configured authentication method. [`Settings::validate`] guarantees at most one.
    pub fn auth(&self) -> NatsAuth<'_> {
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            NatsAuth::UserPassword { user, password }
        } else if let Some(t) = &self.token {
            NatsAuth::Token(t)
        } else if let Some(s) = &self.nkey {
            NatsAuth::NKeySeed(s)
        } else if let Some(p) = &self.creds_file {
            NatsAuth::CredsFile(p)
        } else {
            NatsAuth::None
        }
    }
}

/// `[input]`: the input stream and the durable pull consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InputSettings {
    pub stream: String,
    pub subjects: Vec<String>,
    pub filter_subject: String,
    pub durable: String,
    pub create_if_missing: bool,
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub max_ack_pending: i64,
    pub pull_batch: usize,
    #[serde(with = "humantime_serde")]
    pub pull_expires: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    pub object_store_bucket: String,
}

impl Default for InputSettings {
    fn default() -> Self {
        InputSettings {
            stream: "IMAGES".into(),
            subjects: vec!["images.in".into()],
            filter_subject: "images.in".into(),
            durable: "oodgate".into(),
            create_if_missing: true,
            ack_wait: Duration::from_secs(60),
            max_deliver: 5,
            max_ack_pending: 256,
            pull_batch: 32,
            pull_expires: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            object_store_bucket: "oodgate-images".into(),
        }
    }
}

/// `[output]`: where decisions go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputSettings {
    pub prefix: String,
    /// Empty: `<prefix>.id`. Use [`Settings::output_subjects`].
    pub id_subject: String,
    /// Empty: `<prefix>.ood`.
    pub ood_subject: String,
    /// Empty: `<prefix>.dlq`.
    pub dlq_subject: String,
    pub stream: String,
    pub create_if_missing: bool,
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    pub publish_retries: u32,
    pub max_inflight_publishes: usize,
}

impl Default for OutputSettings {
    fn default() -> Self {
        OutputSettings {
            prefix: "oodgate".into(),
            id_subject: String::new(),
            ood_subject: String::new(),
            dlq_subject: String::new(),
            stream: "OODGATE_OUT".into(),
            create_if_missing: true,
            duplicate_window: Duration::from_secs(15 * 60),
            publish_timeout: Duration::from_secs(10),
            publish_retries: 3,
            max_inflight_publishes: 256,
        }
    }
}

/// The three output subjects, resolved from `[output]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSubjects {
    pub id: String,
    pub ood: String,
    pub dlq: String,
}

impl OutputSubjects {
    /// `[id, ood, dlq]`: the subjects of the output stream.
    pub fn all(&self) -> [&str; 3] {
        [&self.id, &self.ood, &self.dlq]
    }
}

/// `[model]`: the CLIP model and where it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    pub dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ort_library: Option<PathBuf>,
    /// `auto`, `cpu`, `cuda` or `cuda:N`; parsed by [`ModelSettings::device`].
    pub device: String,
    pub intra_threads: usize,
    pub warm_up: bool,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            dir: PathBuf::from("models/vit-b-32-random"),
            ort_library: None,
            device: "auto".into(),
            intra_threads: 0,
            warm_up: true,
        }
    }
}

impl ModelSettings {
    /// The configured execution device.
    pub fn device(&self) -> Result<crate::model::Device, ConfigError> {
        check_device(&self.device)
            .map_err(|m| ConfigError::Invalid(vec![Problem::new("model.device", m)]))?;
        self.device
            .parse()
            .map_err(|e: crate::model::RuntimeError| {
                ConfigError::Invalid(vec![Problem::new("model.device", e.to_string())])
            })
    }
}

/// `[detector]`: the label bank and the decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bank: Option<PathBuf>,
    /// Parsed by [`DetectorSettings::method`].
    pub method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    pub top_k: usize,
    pub force_fingerprint: bool,
    pub exact_limit: usize,
    pub approx_candidates: usize,
    pub approx_ef_search: usize,
    pub approx_tail_sample: usize,
}

impl Default for DetectorSettings {
    fn default() -> Self {
        DetectorSettings {
            bank: None,
            method: "ole".into(),
            threshold: None,
            top_k: 3,
            force_fingerprint: false,
            exact_limit: ApproxParams::default().exact_limit,
            approx_candidates: ApproxParams::default().candidates,
            approx_ef_search: ApproxParams::default().ef_search,
            approx_tail_sample: ApproxParams::default().tail_sample,
        }
    }
}

impl DetectorSettings {
    /// When and how large outlier banks are scored approximately.
    pub fn approx_params(&self) -> ApproxParams {
        ApproxParams {
            exact_limit: self.exact_limit,
            candidates: self.approx_candidates,
            ef_search: self.approx_ef_search,
            tail_sample: self.approx_tail_sample,
            seed: 0,
        }
    }

    /// The configured score method.
    pub fn method(&self) -> Result<crate::detect::method::Method, ConfigError> {
        self.method.parse().map_err(|_| {
            ConfigError::Invalid(vec![Problem::new(
                "detector.method",
                method_message(&self.method),
            )])
        })
    }
}

fn method_message(got: &str) -> String {
    let names: Vec<&str> = crate::detect::method::Method::ALL
        .iter()
        .map(|m| m.as_str())
        .collect();
    format!("must be one of {} (got {got:?})", names.join(", "))
}

/// `[batch]`: dynamic batching and decode parallelism.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchSettings {
    pub max_size: usize,
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    pub decode_workers: usize,
    pub queue_depth: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_size: 32,
            max_wait: Duration::from_millis(20),
            decode_workers: 0,
            queue_depth: 64,
        }
    }
}

/// `[limits]`: what an input image may be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    pub max_bytes: u64,
    pub max_pixels: u64,
}

impl Default for LimitsSettings {
    fn default() -> Self {
        LimitsSettings {
            max_bytes: 32 * 1024 * 1024,
            max_pixels: 40_000_000,
        }
    }
}

/// `[http]`: health and metrics endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// `IP:PORT`; parsed by [`HttpSettings::listen_addr`].
    pub listen: String,
    pub enabled: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: "127.0.0.1:9464".into(),
            enabled: true,
        }
    }
}

impl HttpSettings {
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.trim().parse().map_err(|_| {
            ConfigError::Invalid(vec![Problem::new(
                "http.listen",
                format!("must be IP:PORT, e.g. 0.0.0.0:9464 (got {:?})", self.listen),
            )])
        })
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings {
            drain_timeout: Duration::from_secs(30),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

impl Settings {
    /// Loads defaults < embedded `config/default.toml` < `file` < `OODGATE__*` variables of this
    /// process, then validates (everything except what only `serve` needs, see
    /// [`Settings::validate_for_serve`]).
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        // vars_os + into_string: a non-Unicode variable elsewhere in the environment must not
        // panic (std::env::vars would); a non-Unicode OODGATE__ variable is reported.
        let mut env = Vec::new();
        for (k, v) in std::env::vars_os() {
            let Ok(k) = k.into_string() else { continue };
            if !is_oodgate_var(&k) {
                continue;
            }
            match v.into_string() {
                Ok(v) => env.push((k, v)),
                Err(_) => {
                    return Err(ConfigError::Load(format!(
                        "environment variable {k} is not valid UTF-8"
                    )));
                }
            }
        }
        Settings::load_from(file, env)
    }

    /// Like [`Settings::load`] with the given environment instead of the process's (tests pass
    /// a map). Variables without the `OODGATE__` prefix are ignored.
    pub fn load_from<I>(file: Option<&Path>, env: I) -> Result<Settings, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        check_unknown_keys(DEFAULT_TOML, "the built-in config/default.toml")?;
        let mut builder = ::config::Config::builder().add_source(::config::File::from_str(
            DEFAULT_TOML,
            ::config::FileFormat::Toml,
        ));

        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            check_unknown_keys(&text, &format!("config file {}", path.display()))?;
            // Given by path (not from_str) so type errors name the file.
            builder = builder.add_source(
                ::config::File::from(path.to_path_buf())
                    .format(::config::FileFormat::Toml)
                    .required(true),
            );
        }

        // Environment: known keys only; string-like keys verbatim, the rest type-parsed.
        let mut verbatim = ::config::Map::new();
        let mut parsed = ::config::Map::new();
        for (name, value) in env {
            if !is_oodgate_var(&name) {
                continue;
            }
            let key = env_key(&name);
            let Some(info) = key_info(&key) else {
                return Err(ConfigError::UnknownKey {
                    suggestion: suggest(&key).map(env_var_for),
                    key,
                    origin: format!("environment variable {name}"),
                });
            };
            if value.trim().is_empty() {
                continue; // an empty variable counts as unset (compose's `${X:-}`)
            }
            check_env_type(info, &name, &value)?;
            if info.kind.env_parsed() {
                parsed.insert(name, value);
            } else {
                verbatim.insert(name, value);
            }
        }
        builder = builder
            .add_source(env_source(false).source(Some(verbatim)))
            .add_source(env_source(true).source(Some(parsed)));

        let mut settings: Settings = builder.build()?.try_deserialize()?;
        settings.normalize();
        settings.validate()?;
        Ok(settings)
    }

    /// Empty optional strings mean unset; list items are trimmed and empty items dropped.
    fn normalize(&mut self) {
        fn none_if_empty_s(o: &mut Option<String>) {
            if o.as_ref().is_some_and(|s| s.trim().is_empty()) {
                *o = None;
            }
        }
        fn none_if_empty_secret(o: &mut Option<Secret>) {
            if o.as_ref().is_some_and(Secret::is_empty) {
                *o = None;
            }
        }
        fn none_if_empty_p(o: &mut Option<PathBuf>) {
            if o.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *o = None;
            }
        }
        fn clean_list(v: &mut Vec<String>) {
            *v = v
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        let n = &mut self.nats;
        clean_list(&mut n.servers);
        none_if_empty_s(&mut n.user);
        none_if_empty_secret(&mut n.password);
        none_if_empty_secret(&mut n.token);
        none_if_empty_secret(&mut n.nkey);
        for p in [
            &mut n.creds_file,
            &mut n.tls_ca,
            &mut n.tls_cert,
            &mut n.tls_key,
        ] {
            none_if_empty_p(p);
        }
        clean_list(&mut self.input.subjects);
        none_if_empty_p(&mut self.model.ort_library);
        none_if_empty_p(&mut self.detector.bank);
    }

    /// The output subjects, `<prefix>.id|ood|dlq` unless set explicitly.
    pub fn output_subjects(&self) -> OutputSubjects {
        let o = &self.output;
        let pick = |explicit: &str, suffix: &str| {
            let explicit = explicit.trim();
            if explicit.is_empty() {
                format!("{}.{suffix}", o.prefix.trim())
            } else {
                explicit.to_string()
            }
        };
        OutputSubjects {
            id: pick(&o.id_subject, "id"),
            ood: pick(&o.ood_subject, "ood"),
            dlq: pick(&o.dlq_subject, "dlq"),
        }
    }

    /// The consumer's ack subject prefix, `$JS.ACK.<stream>.<durable>` (for permissions).
    pub fn ack_subject_prefix(&self) -> String {
        format!("$JS.ACK.{}.{}", self.input.stream, self.input.durable)
    }

    /// Checks every value; the error lists every problem, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        self.check(&mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(p))
        }
    }

    /// [`Settings::validate`] plus what `oodgate serve` needs: a bank, and the files the
    /// settings point to must exist.
    pub fn validate_for_serve(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        self.check(&mut p);
        match &self.detector.bank {
            None => p.push(Problem::new(
                "detector.bank",
                format!(
                    "is required by `oodgate serve` (set it in the config file or {})",
                    env_var_for("detector.bank")
                ),
            )),
            Some(b) if !b.is_file() => p.push(Problem::new(
                "detector.bank",
                format!("{} is not a file", b.display()),
            )),
            Some(_) => {}
        }
        if !self.model.dir.is_dir() {
            p.push(Problem::new(
                "model.dir",
                format!("{} is not a directory", self.model.dir.display()),
            ));
        }
        let files = [
            ("model.ort_library", &self.model.ort_library),
            ("nats.creds_file", &self.nats.creds_file),
            ("nats.tls_ca", &self.nats.tls_ca),
            ("nats.tls_cert", &self.nats.tls_cert),
            ("nats.tls_key", &self.nats.tls_key),
        ];
        for (key, path) in files {
            if let Some(path) = path
                && !path.is_file()
            {
                p.push(Problem::new(
                    key,
                    format!("{} is not a file", path.display()),
                ));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(p))
        }
    }

    fn check(&self, p: &mut Vec<Problem>) {
        self.check_nats(p);
        self.check_input(p);
        self.check_output(p);
        self.check_rest(p);
    }

    fn check_nats(&self, p: &mut Vec<Problem>) {
        let n = &self.nats;
        if n.servers.is_empty() {
            p.push(Problem::new(
                "nats.servers",
                "must list at least one server",
            ));
        }
        for s in &n.servers {
            if let Err(m) = check_server_url(s) {
                p.push(Problem::new("nats.servers", m));
            }
        }
        match (&n.user, &n.password) {
            (Some(_), None) => p.push(Problem::new(
                "nats.password",
                "is required when nats.user is set",
            )),
            (None, Some(_)) => p.push(Problem::new(
                "nats.user",
                "is required when nats.password is set",
            )),
            _ => {}
        }
        let methods: Vec<&str> = [
            (
                n.user.is_some() || n.password.is_some(),
                "nats.user/nats.password",
            ),
            (n.token.is_some(), "nats.token"),
            (n.nkey.is_some(), "nats.nkey"),
            (n.creds_file.is_some(), "nats.creds_file"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if methods.len() > 1 {
            p.push(Problem::new(
                "nats",
                format!(
                    "authentication: set at most one of user+password, token, nkey, creds_file (got {})",
                    methods.join(", ")
                ),
            ));
        }
        if let Some(seed) = &n.nkey
            && !seed.expose().trim().starts_with("SU")
        {
            p.push(Problem::new(
                "nats.nkey",
                "must be a user NKey seed (starting with \"SU\")",
            ));
        }
        match (&n.tls_cert, &n.tls_key) {
            (Some(_), None) => p.push(Problem::new(
                "nats.tls_key",
                "is required when nats.tls_cert is set",
            )),
            (None, Some(_)) => p.push(Problem::new(
                "nats.tls_cert",
                "is required when nats.tls_key is set",
            )),
            _ => {}
        }
        positive(p, "nats.connect_timeout", n.connect_timeout);
    }

    fn check_input(&self, p: &mut Vec<Problem>) {
        let i = &self.input;
        name_ok(p, "input.stream", &i.stream);
        name_ok(p, "input.durable", &i.durable);
        if i.subjects.is_empty() {
            p.push(Problem::new(
                "input.subjects",
                "must list at least one subject",
            ));
        }
        for s in &i.subjects {
            if let Err(m) = check_subject(s, true) {
                p.push(Problem::new("input.subjects", m));
            }
        }
        match check_subject(&i.filter_subject, true) {
            Err(m) => p.push(Problem::new("input.filter_subject", m)),
            Ok(()) => {
                if i.create_if_missing
                    && !i.subjects.is_empty()
                    && !i
                        .subjects
                        .iter()
                        .any(|s| subject_covers(s, &i.filter_subject))
                {
                    p.push(Problem::new(
                        "input.filter_subject",
                        format!(
                            "{:?} is not captured by input.subjects {:?}: the consumer would receive nothing",
                            i.filter_subject, i.subjects
                        ),
                    ));
                }
            }
        }
        if i.ack_wait < Duration::from_secs(1) {
            p.push(Problem::new(
                "input.ack_wait",
                format!("must be at least 1s (got {})", show(i.ack_wait)),
            ));
        }
        range_i(p, "input.max_deliver", i.max_deliver, 1, 1000);
        range_i(p, "input.max_ack_pending", i.max_ack_pending, 1, 1_000_000);
        range_u(p, "input.pull_batch", i.pull_batch as u64, 1, 10_000);
        if i.max_ack_pending >= 1 && (i.pull_batch as i64) > i.max_ack_pending {
            p.push(Problem::new(
                "input.pull_batch",
                format!(
                    "({}) must not exceed input.max_ack_pending ({})",
                    i.pull_batch, i.max_ack_pending
                ),
            ));
        }
        if i.pull_expires < Duration::from_secs(1) {
            p.push(Problem::new(
                "input.pull_expires",
                format!("must be at least 1s (got {})", show(i.pull_expires)),
            ));
        }
        // The server rejects a pull whose heartbeat exceeds half its expiry.
        if !i.heartbeat.is_zero() && i.heartbeat * 2 > i.pull_expires {
            p.push(Problem::new(
                "input.heartbeat",
                format!(
                    "({}) must be at most half of input.pull_expires ({})",
                    show(i.heartbeat),
                    show(i.pull_expires)
                ),
            ));
        }
        if i.object_store_bucket.is_empty()
            || !i
                .object_store_bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            p.push(Problem::new(
                "input.object_store_bucket",
                format!(
                    "must be letters, digits, '_' or '-' (got {:?})",
                    i.object_store_bucket
                ),
            ));
        }
    }

    fn check_output(&self, p: &mut Vec<Problem>) {
        let o = &self.output;
        let prefix_ok = match check_subject(o.prefix.trim(), false) {
            Err(m) => {
                p.push(Problem::new("output.prefix", m));
                false
            }
            Ok(()) => true,
        };
        let subjects = self.output_subjects();
        let named = [
            ("output.id_subject", &o.id_subject, &subjects.id),
            ("output.ood_subject", &o.ood_subject, &subjects.ood),
            ("output.dlq_subject", &o.dlq_subject, &subjects.dlq),
        ];
        // A subject derived from a bad prefix is reported once, as output.prefix.
        let mut all_ok = true;
        for (key, explicit, resolved) in named {
            if explicit.trim().is_empty() && !prefix_ok {
                all_ok = false;
            } else if let Err(m) = check_subject(resolved, false) {
                all_ok = false;
                p.push(Problem::new(key, m));
            }
        }
        if all_ok {
            for (i, (ka, _, a)) in named.iter().enumerate() {
                for (kb, _, b) in &named[i + 1..] {
                    if a == b {
                        p.push(Problem::new(kb, format!("({b}) must differ from {ka}")));
                    }
                }
            }
            // An output subject captured by the input stream would feed decisions back in.
            for (key, _, s) in named {
                if let Some(pat) = self
                    .input
                    .subjects
                    .iter()
                    .find(|pat| check_subject(pat, true).is_ok() && subject_covers(pat, s))
                {
                    p.push(Problem::new(
                        key,
                        format!(
                            "({s}) is captured by input.subjects entry {pat:?}: outputs would be re-processed"
                        ),
                    ));
                }
            }
        }
        name_ok(p, "output.stream", &o.stream);
        if o.stream == self.input.stream {
            p.push(Problem::new(
                "output.stream",
                format!("({}) must differ from input.stream", o.stream),
            ));
        }
        if o.duplicate_window < self.input.ack_wait {
            p.push(Problem::new(
                "output.duplicate_window",
                format!(
                    "({}) must be at least input.ack_wait ({}), or a redelivered message is published twice",
                    show(o.duplicate_window),
                    show(self.input.ack_wait)
                ),
            ));
        }
        positive(p, "output.publish_timeout", o.publish_timeout);
        range_u(
            p,
            "output.publish_retries",
            o.publish_retries.into(),
            0,
            100,
        );
        range_u(
            p,
            "output.max_inflight_publishes",
            o.max_inflight_publishes as u64,
            1,
            65_536,
        );
    }

    fn check_rest(&self, p: &mut Vec<Problem>) {
        let m = &self.model;
        if m.dir.as_os_str().is_empty() {
            p.push(Problem::new("model.dir", "must not be empty"));
        }
        if let Err(msg) = check_device(&m.device) {
            p.push(Problem::new("model.device", msg));
        }
        range_u(p, "model.intra_threads", m.intra_threads as u64, 0, 1024);

        let d = &self.detector;
        if d.method.parse::<crate::detect::method::Method>().is_err() {
            p.push(Problem::new("detector.method", method_message(&d.method)));
        }
        if let Some(t) = d.threshold
            && !t.is_finite()
        {
            p.push(Problem::new(
                "detector.threshold",
                format!("must be a finite number (got {t})"),
            ));
        }
        range_u(p, "detector.top_k", d.top_k as u64, 0, 100);
        range_u(
            p,
            "detector.approx_candidates",
            d.approx_candidates as u64,
            1,
            10_000,
        );
        range_u(
            p,
            "detector.approx_ef_search",
            d.approx_ef_search as u64,
            d.approx_candidates.clamp(1, 10_000) as u64,
            10_000,
        );
        range_u(
            p,
            "detector.approx_tail_sample",
            d.approx_tail_sample as u64,
            1,
            1_000_000,
        );

        let b = &self.batch;
        range_u(p, "batch.max_size", b.max_size as u64, 1, 4096);
        if b.max_wait >= self.input.ack_wait {
            p.push(Problem::new(
                "batch.max_wait",
                format!(
                    "({}) must be below input.ack_wait ({})",
                    show(b.max_wait),
                    show(self.input.ack_wait)
                ),
            ));
        }
        range_u(p, "batch.decode_workers", b.decode_workers as u64, 0, 1024);
        range_u(p, "batch.queue_depth", b.queue_depth as u64, 1, 65_536);

        range_u(p, "limits.max_bytes", self.limits.max_bytes, 1, 1 << 30);
        range_u(
            p,
            "limits.max_pixels",
            self.limits.max_pixels,
            1,
            1_000_000_000,
        );

        if self.http.listen.trim().parse::<SocketAddr>().is_err() {
            p.push(Problem::new(
                "http.listen",
                format!(
                    "must be IP:PORT, e.g. 0.0.0.0:9464 (got {:?})",
                    self.http.listen
                ),
            ));
        }

        if self.log.level.trim().is_empty()
            || tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err()
        {
            p.push(Problem::new(
                "log.level",
                format!(
                    "must be a level (error, warn, info, debug, trace) or a tracing filter (got {:?})",
                    self.log.level
                ),
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            p.push(Problem::new(
                "log.format",
                format!("must be \"text\" or \"json\" (got {:?})", self.log.format),
            ));
        }
        positive(p, "shutdown.drain_timeout", self.shutdown.drain_timeout);
    }

    /// The configuration reference as a Markdown table: every key with its type, default,
    /// environment variable and description, generated from [`KEYS`] and [`DEFAULT_TOML`].
    pub fn reference_markdown() -> String {
        let defaults = default_values();
        let mut out = String::from(
            "| Key | Type | Default | Environment variable | Description |\n|---|---|---|---|---|\n",
        );
        for k in KEYS {
            let default = match defaults.get(k.key) {
                Some(v) => format!("`{}`", v.replace('|', "\\|")),
                None => "(unset)".to_string(),
            };
            out.push_str(&format!(
                "| `{}` | {} | {} | `{}` | {} |\n",
                k.key,
                k.kind.name(),
                default,
                k.env_var(),
                k.doc.replace('|', "\\|")
            ));
        }
        out
    }
}

/// `section.key` → the default as written in [`DEFAULT_TOML`] (TOML syntax).
pub fn default_values() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(table) = DEFAULT_TOML.parse::<toml::Table>() {
        for (section, v) in &table {
            if let Some(t) = v.as_table() {
                for (k, v) in t {
                    out.insert(format!("{section}.{k}"), v.to_string());
                }
            }
        }
    }
    out
}

fn env_source(parse: bool) -> ::config::Environment {
    let mut e = ::config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        .try_parsing(parse);
    if parse {
        e = e.list_separator(ENV_LIST_SEPARATOR);
        for k in KEYS.iter().filter(|k| k.kind == Kind::StringList) {
            e = e.with_list_parse_key(k.key);
        }
    }
    e
}

fn is_oodgate_var(name: &str) -> bool {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    name.len() > prefix.len()
        && name.is_char_boundary(prefix.len())
        && name[..prefix.len()].eq_ignore_ascii_case(&prefix)
}

/// `OODGATE__BATCH__MAX_SIZE` → `batch.max_size` (the mapping the config crate applies).
fn env_key(name: &str) -> String {
    let prefix_len = ENV_PREFIX.len() + ENV_SEPARATOR.len();
    name.get(prefix_len..)
        .unwrap_or_default()
        .to_lowercase()
        .replace(ENV_SEPARATOR, ".")
}

/// Rejects keys (or sections) of a TOML document that are not in [`KEYS`], and values of the
/// wrong type.
fn check_unknown_keys(text: &str, origin: &str) -> Result<(), ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            origin: origin.to_string(),
            message: e.to_string().trim().to_string(),
        })?;
    for (section, value) in &table {
        let Some(inner) = value.as_table() else {
            return Err(ConfigError::UnknownKey {
                suggestion: suggest(section).map(str::to_string),
                key: section.clone(),
                origin: origin.to_string(),
            });
        };
        if !KEYS.iter().any(|k| k.section() == section) {
            return Err(ConfigError::UnknownKey {
                suggestion: suggest_section(section),
                key: section.clone(),
                origin: origin.to_string(),
            });
        }
        for (name, value) in inner {
            let full = format!("{section}.{name}");
            let Some(info) = key_info(&full) else {
                return Err(ConfigError::UnknownKey {
                    suggestion: suggest(&full).map(str::to_string),
                    key: full,
                    origin: origin.to_string(),
                });
            };
            check_toml_type(info, value, origin)?;
        }
    }
    Ok(())
}

/// The config crate converts between types freely (3.5 becomes `true`); files must use the
/// key's own type.
fn check_toml_type(info: &KeyInfo, value: &toml::Value, origin: &str) -> Result<(), ConfigError> {
    use toml::Value as V;
    let ok = match info.kind {
        Kind::String | Kind::Secret | Kind::Path | Kind::Duration | Kind::SocketAddr => {
            value.is_str()
        }
        Kind::StringList => value.as_array().is_some_and(|a| a.iter().all(V::is_str)),
        Kind::Bool => value.is_bool(),
        Kind::Integer => value.is_integer(),
        Kind::Float => value.is_float() || value.is_integer(),
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Load(format!(
            "{} must be {} in {origin} (got {} {value})",
            info.key,
            kind_article(info.kind),
            value.type_str()
        )))
    }
}

/// Environment values are text: the parsed kinds must parse as their type.
fn check_env_type(info: &KeyInfo, name: &str, value: &str) -> Result<(), ConfigError> {
    let v = value.trim();
    let ok = match info.kind {
        Kind::Bool => v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("false"),
        Kind::Integer => v.parse::<i64>().is_ok(),
        Kind::Float => v.parse::<f64>().is_ok(),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Load(format!(
            "{} must be {} in environment variable {name} (got {value:?})",
            info.key,
            kind_article(info.kind)
        )))
    }
}

fn kind_article(kind: Kind) -> &'static str {
    match kind {
        Kind::String => "a string",
        Kind::Secret => "a string",
        Kind::Path => "a path string",
        Kind::StringList => "a list of strings",
        Kind::Bool => "a boolean (true or false)",
        Kind::Integer => "an integer",
        Kind::Float => "a number",
        Kind::Duration => "a duration string such as \"30s\"",
        Kind::SocketAddr => "an \"IP:PORT\" string",
    }
}

/// The known key closest to `key` (a typo within a small edit distance), if any.
fn suggest(key: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|k| (edit_distance(k.key, key), k.key))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn suggest_section(section: &str) -> Option<String> {
    KEYS.iter()
        .map(|k| k.section())
        .map(|s| (edit_distance(s, section), s))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, s)| s.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Value checks
// ---------------------------------------------------------------------------------------------

fn show(d: Duration) -> String {
    humantime_serde::re::humantime::format_duration(d).to_string()
}

fn positive(p: &mut Vec<Problem>, key: &str, d: Duration) {
    if d.is_zero() {
        p.push(Problem::new(key, "must be greater than 0"));
    }
}

fn range_u(p: &mut Vec<Problem>, key: &str, v: u64, lo: u64, hi: u64) {
    if v < lo || v > hi {
        p.push(Problem::new(
            key,
            format!("must be between {lo} and {hi} (got {v})"),
        ));
    }
}

fn range_i(p: &mut Vec<Problem>, key: &str, v: i64, lo: i64, hi: i64) {
    if v < lo || v > hi {
        p.push(Problem::new(
            key,
            format!("must be between {lo} and {hi} (got {v})"),
        ));
    }
}

/// Stream and consumer names: no whitespace, `.`, `*`, `>`, path separators or control chars.
fn name_ok(p: &mut Vec<Problem>, key: &str, name: &str) {
    if name.is_empty() {
        p.push(Problem::new(key, "must not be empty"));
    } else if name.len() > 255
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c))
    {
        p.push(Problem::new(
            key,
            format!(
                "must be a JetStream name without whitespace, '.', '*', '>', '/' or '\\' (got {name:?})"
            ),
        ));
    }
}

fn check_device(d: &str) -> Result<(), String> {
    let ok = matches!(d, "auto" | "cpu" | "cuda")
        || d.strip_prefix("cuda:").is_some_and(|n| {
            !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\" (got {d:?})"
        ))
    }
}

fn check_server_url(s: &str) -> Result<(), String> {
    if s.chars().any(char::is_whitespace) {
        return Err(format!("entry {s:?} contains whitespace"));
    }
    let rest = match s.split_once("://") {
        Some((scheme, rest)) => {
            if !matches!(scheme, "nats" | "tls" | "ws" | "wss") {
                return Err(format!("entry {s:?}: scheme must be nats, tls, ws or wss"));
            }
            rest
        }
        None => s,
    };
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host.split('/').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err(format!("entry {s:?} has no host"));
    }
    Ok(())
}

/// A NATS subject: dot-separated non-empty tokens; `*` and `>` only as whole tokens (and `>`
/// only last) when `wildcards` is true; not in the reserved `$` namespace.
fn check_subject(s: &str, wildcards: bool) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{s:?} contains whitespace"));
    }
    if s.starts_with('$') {
        return Err(format!("{s:?} is in the reserved '$' namespace"));
    }
    let tokens: Vec<&str> = s.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(format!("{s:?} has an empty token"));
        }
        let wild = *t == "*" || *t == ">";
        if wild && !wildcards {
            return Err(format!("{s:?} must not contain wildcards"));
        }
        if *t == ">" && i + 1 != tokens.len() {
            return Err(format!("{s:?}: '>' must be the last token"));
        }
        if !wild && (t.contains('*') || t.contains('>')) {
            return Err(format!(
                "{s:?}: '*' and '>' are only allowed as whole tokens"
            ));
        }
    }
    Ok(())
}

/// Whether every subject matched by `subject` (which may contain wildcards) is matched by
/// `pattern`.
pub fn subject_covers(pattern: &str, subject: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let s: Vec<&str> = subject.split('.').collect();
    for (i, pt) in p.iter().enumerate() {
        if *pt == ">" {
            return s.len() > i;
        }
        let Some(st) = s.get(i) else { return false };
        if *st == ">" {
            return false;
        }
        if *pt != "*" && pt != st {
            return false;
        }
    }
    s.len() == p.len()
}
