//! Typed settings: layered, checked for unknown keys, validated with errors that name the key.
//!
//! Layers, lowest to highest precedence (the layout of qdrant's `settings.rs`):
//! 1. built-in defaults ([`Default`] impls, equal to the embedded file, a test keeps them equal);
//! 2. `config/default.toml`, compiled in with `include_str!` and shipped as the documented template;
//! 3. the file given with `--config` (partial: only the keys that change);
//! 4. environment variables `OODGATE__<SECTION>__<KEY>` (`__` between parts, so keys keep their
//!    single underscores; a single `_` would silently miss, see docs/stack.md §6).
//!
//! Every key is listed once, in [`KEYS`]: its type, whether it has a default, its environment
//! variable and its description. The README's configuration reference is rendered from that table
//! ([`Settings::reference_markdown`]) and tests keep it, `config/default.toml` and the structs in
//! step. Unknown keys are errors in files and in `OODGATE__` variables alike, with a suggestion.
//!
//! Only this module knows where settings come from; the rest of oodgate takes a [`Settings`].
//!
//! One job per file:
//! - `mod.rs`: the typed [`Settings`], its sections with their defaults, and [`Secret`];
//! - `keys.rs`: the key table [`KEYS`] and the configuration reference rendered from it;
//! - `load.rs`: layered loading, unknown keys (with suggestions) and raw value types;
//! - `validate.rs`: value checks, each [`Problem`] naming its key;
//! - `resolve.rs`: settings resolved into what runs: NATS options, JetStream topology, pipeline,
//!   encoder options, score method and approximation parameters.

mod keys;
mod load;
mod resolve;
mod validate;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::detect::approx::ApproxParams;

pub use crate::stream::route::OutputSubjects;
pub use keys::{KEYS, KeyInfo, Kind, default_values, env_var_for, key_info, leaf_values};
pub use resolve::{NatsAuth, auto_decode_workers};
use validate::list_problems;
pub use validate::{Problem, subject_covers};

/// The documented defaults, compiled in. Also shipped as `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Environment variables that configure oodgate start with `OODGATE__`.
pub const ENV_PREFIX: &str = "OODGATE";
/// Separator between the prefix, the section and the key in environment variable names.
pub const ENV_SEPARATOR: &str = "__";
/// Separator of list items in environment variables (`nats.servers`, `input.subjects`).
pub const ENV_LIST_SEPARATOR: &str = ",";

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

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

fn serialize_redacted_urls<S: serde::Serializer>(urls: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(urls.iter().map(|u| crate::stream::setup::redact_url(u)))
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
    pub preprocess: PreprocessSettings,
    pub limits: LimitsSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub shutdown: ShutdownSettings,
}

/// `[nats]`: connection and authentication.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// Credentials inside a URL are redacted when shown.
    #[serde(serialize_with = "serialize_redacted_urls")]
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
    pub inbox_prefix: String,
}

/// Like the derived `Debug`, with credentials inside server URLs redacted.
impl fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers: Vec<String> = self
            .servers
            .iter()
            .map(|u| crate::stream::setup::redact_url(u))
            .collect();
        f.debug_struct("NatsSettings")
            .field("servers", &servers)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("nkey", &self.nkey)
            .field("creds_file", &self.creds_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .field("connect_timeout", &self.connect_timeout)
            .field("name", &self.name)
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
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
            inbox_prefix: "_INBOX".into(),
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
    #[serde(with = "humantime_serde")]
    pub nak_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub nak_delay_max: Duration,
    #[serde(with = "humantime_serde")]
    pub max_processing: Duration,
    pub replicas: usize,
    /// `file` or `memory` (parsed by `stream_spec::parse_storage`).
    pub storage: String,
    /// `limits`, `interest` or `workqueue`.
    pub retention: String,
    /// 0 = unlimited.
    pub max_bytes: i64,
    /// 0 = unlimited.
    pub max_msgs: i64,
    /// 0 = unlimited.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// `new` or `old`.
    pub discard: String,
    pub update_existing: bool,
    pub object_store_bucket: String,
    /// The buckets claim checks may name; empty: only `object_store_bucket`.
    pub object_store_buckets: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// `keep` or `delete` (after the ID/OOD output is stored and the input acked).
    pub object_after_routing: String,
    /// 0 = the bucket is not managed by the worker.
    #[serde(with = "humantime_serde")]
    pub object_store_ttl: Duration,
    pub max_bytes_in_flight: u64,
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
            nak_delay: Duration::from_secs(2),
            nak_delay_max: Duration::from_secs(60),
            max_processing: Duration::from_secs(600),
            replicas: 1,
            storage: "file".into(),
            retention: "limits".into(),
            max_bytes: 0,
            max_msgs: 0,
            max_age: Duration::ZERO,
            discard: "new".into(),
            update_existing: false,
            object_store_bucket: "oodgate-images".into(),
            object_store_buckets: Vec::new(),
            fetch_timeout: Duration::from_secs(30),
            object_after_routing: "keep".into(),
            object_store_ttl: Duration::ZERO,
            max_bytes_in_flight: 256 << 20,
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
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    pub max_inflight_publishes: usize,
    pub replicas: usize,
    /// `file` or `memory`.
    pub storage: String,
    /// 0 = unlimited.
    pub max_bytes: i64,
    /// 0 = unlimited.
    pub max_msgs: i64,
    /// 0 = unlimited.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// `new` or `old`.
    pub discard: String,
    pub update_existing: bool,
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
            retry_max_delay: Duration::from_secs(5),
            max_inflight_publishes: 256,
            replicas: 1,
            storage: "file".into(),
            max_bytes: 0,
            max_msgs: 0,
            max_age: Duration::ZERO,
            discard: "new".into(),
            update_existing: false,
        }
    }
}

/// `[model]`: the CLIP model and where it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    pub dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ort_library: Option<PathBuf>,
    /// `auto`, `cpu`, `cuda` (alias `gpu`) or `cuda:N`; parsed by [`ModelSettings::device`]
    /// with `model::Device`'s grammar.
    pub device: String,
    pub intra_threads: usize,
    /// ONNX Runtime intra-op threads spin while waiting for work.
    pub intra_spinning: bool,
    /// ONNX Runtime's CPU arena allocator.
    pub cpu_arena: bool,
    /// ONNX Runtime's memory-pattern planning.
    pub memory_pattern: bool,
    /// ONNX Runtime's weight prepacking.
    pub prepacking: bool,
    /// On CPU, the most images per ONNX Runtime run (0: the whole batch).
    pub cpu_run_batch: usize,
    /// On CPU, return the heap's free pages after each batch.
    pub trim_heap: bool,
    /// On CUDA, run batches through ONNX Runtime's I/O binding.
    pub io_binding: bool,
    pub warm_up: bool,
}

impl Default for ModelSettings {
    fn default() -> Self {
        let tuning = crate::model::encoder::SessionTuning::default();
        ModelSettings {
            dir: PathBuf::from("models/vit-b-32-random"),
            ort_library: None,
            device: "auto".into(),
            intra_threads: 0,
            intra_spinning: tuning.spinning,
            cpu_arena: tuning.cpu_arena,
            memory_pattern: tuning.memory_pattern,
            prepacking: tuning.prepacking,
            cpu_run_batch: tuning.cpu_run_batch,
            trim_heap: tuning.trim_heap,
            io_binding: tuning.io_binding != crate::model::encoder::IoBindingMode::Never,
            warm_up: true,
        }
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
    /// Logit scale override; unset: the bank's (`bank build --scale`), else the method's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
    pub top_k: usize,
    pub force_fingerprint: bool,
    pub exact_limit: usize,
    pub approx_candidates: usize,
    pub approx_ef_search: usize,
    pub approx_tail_sample: usize,
    pub adaptive: AdaptiveSettings,
}

/// `[detector.adaptive]`: the adaptive detector (docs/adaptive.md); off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveSettings {
    pub enabled: bool,
    pub capacity: usize,
    pub k: usize,
    /// Unset: the bank's calibrated floor, else [`crate::detect::adaptive::FALLBACK_FLOOR`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<f32>,
    pub bucket_cap: usize,
    pub admit_per_mille: usize,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// `local` (this worker's memory) or `shared` (every worker's admissions, through
    /// JetStream).
    pub sync: String,
    /// Override of the bank's calibrated admission threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admit_below: Option<f64>,
    /// Override of the bank's calibrated largest penalty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_penalty: Option<f64>,
}

impl Default for AdaptiveSettings {
    fn default() -> Self {
        let p = crate::detect::adaptive::AdaptiveParams::default();
        AdaptiveSettings {
            enabled: false,
            capacity: p.capacity,
            k: p.k,
            floor: None,
            bucket_cap: p.bucket_cap,
            admit_per_mille: p.admit_per_mille,
            max_age: Duration::from_millis(p.max_age_ms),
            sync: "local".into(),
            admit_below: None,
            max_penalty: None,
        }
    }
}

impl Default for DetectorSettings {
    fn default() -> Self {
        DetectorSettings {
            bank: None,
            method: "ole".into(),
            threshold: None,
            scale: None,
            top_k: 3,
            force_fingerprint: false,
            exact_limit: ApproxParams::default().exact_limit,
            approx_candidates: ApproxParams::default().candidates,
            approx_ef_search: ApproxParams::default().ef_search,
            approx_tail_sample: ApproxParams::default().tail_sample,
            adaptive: AdaptiveSettings::default(),
        }
    }
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

/// `[preprocess]`: how images become tensors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreprocessSettings {
    /// The fast JPEG path: Pillow's `draft` (DCT-domain downscaling) before the resize.
    pub jpeg_draft: bool,
}

/// `[limits]`: what an input image may be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    pub max_bytes: u64,
    pub max_pixels: u64,
    pub max_jpeg_scans: u32,
}

impl Default for LimitsSettings {
    fn default() -> Self {
        LimitsSettings {
            max_bytes: 32 * 1024 * 1024,
            max_pixels: 40_000_000,
            max_jpeg_scans: 256,
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
