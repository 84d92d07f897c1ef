//! The key table: every configuration key once, with its type, whether it has a default, its
//! environment variable and its description. The README's configuration reference
//! (`oodgate config reference`) is rendered from it ([`Settings::reference_markdown`]).

use std::collections::BTreeMap;

use super::{DEFAULT_TOML, ENV_PREFIX, ENV_SEPARATOR, Settings};

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
    key(
        "nats.inbox_prefix",
        Kind::String,
        "Prefix of the client's reply subjects; one per user (e.g. `_INBOX_worker`) keeps other users from reading the worker's replies.",
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
        "input.nak_delay",
        Kind::Duration,
        "Redelivery delay after a transient failure the input may have caused; doubles with each delivery.",
    ),
    key(
        "input.nak_delay_max",
        Kind::Duration,
        "Cap of the doubling redelivery delay (≥ `input.nak_delay`).",
    ),
    key(
        "input.max_processing",
        Kind::Duration,
        "Longest time an input stays in flight: progress acks stop then, and an output that still cannot be stored is given up (NAK).",
    ),
    key(
        "input.replicas",
        Kind::Integer,
        "Replicas of the input stream when oodgate creates it (1–5); an existing stream with fewer stops the worker.",
    ),
    key(
        "input.storage",
        Kind::String,
        "Storage of the input stream when oodgate creates it: `file` or `memory` (an existing stream in memory where `file` is configured stops the worker).",
    ),
    key(
        "input.retention",
        Kind::String,
        "Retention of the input stream: `limits` keeps acked inputs until a limit, `interest` removes an input once every consumer acked it, `workqueue` once one did.",
    ),
    key(
        "input.max_bytes",
        Kind::Integer,
        "Size limit of the input stream in bytes; 0 = unlimited.",
    ),
    key(
        "input.max_msgs",
        Kind::Integer,
        "Message limit of the input stream; 0 = unlimited.",
    ),
    key(
        "input.max_age",
        Kind::Duration,
        "Age limit of the input stream's messages; 0s = unlimited.",
    ),
    key(
        "input.discard",
        Kind::String,
        "At a size or message limit: `new` refuses new messages (nothing is dropped silently), `old` drops the oldest.",
    ),
    key(
        "input.update_existing",
        Kind::Bool,
        "Update an existing consumer, input stream or claim-check bucket that is weaker than the configuration (ack_wait, max_deliver, replicas, limits, discard, bucket TTL) instead of refusing to start.",
    ),
    key(
        "input.object_store_bucket",
        Kind::String,
        "Object Store bucket for claim-check images (`oodgate publish`).",
    ),
    key(
        "input.object_store_buckets",
        Kind::StringList,
        "The only buckets a claim check may name (an allow-list); any other is dead-lettered as `bad_envelope` without being read. Empty: `input.object_store_bucket` alone.",
    ),
    key(
        "input.fetch_timeout",
        Kind::Duration,
        "Time limit for reading one claim-checked object; a timeout is a transient failure (NAK with backoff).",
    ),
    key(
        "input.object_after_routing",
        Kind::String,
        "What happens to a claim-checked object once its input is routed ID/OOD and acked: `keep` or `delete` (dead-lettered inputs keep theirs).",
    ),
    key(
        "input.object_store_ttl",
        Kind::Duration,
        "Age after which the claim-check bucket expires objects; the worker creates the bucket with it, and a bucket expiring sooner stops the worker. 0s = not managed.",
    ),
    key(
        "input.max_bytes_in_flight",
        Kind::Integer,
        "Most bytes in-flight inputs hold at once (pulled payloads and fetched objects; ≥ `limits.max_bytes`); pulling and fetching wait beyond it.",
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
        "Quick retries of a failed publish (same message ID) before the output counts as unavailable: intake pauses and the input is held and retried.",
    ),
    key(
        "output.retry_max_delay",
        Kind::Duration,
        "Longest wait between attempts to store an output while outputs cannot be stored (intake is paused meanwhile).",
    ),
    key(
        "output.replicas",
        Kind::Integer,
        "Replicas of the output stream when oodgate creates it (1–5); an existing stream with fewer stops the worker.",
    ),
    key(
        "output.storage",
        Kind::String,
        "Storage of the output stream when oodgate creates it: `file` or `memory` (an existing stream in memory where `file` is configured stops the worker).",
    ),
    key(
        "output.max_bytes",
        Kind::Integer,
        "Size limit of the output stream in bytes; 0 = unlimited.",
    ),
    key(
        "output.max_msgs",
        Kind::Integer,
        "Message limit of the output stream; 0 = unlimited.",
    ),
    key(
        "output.max_age",
        Kind::Duration,
        "Age limit of the output stream's messages; 0s = unlimited.",
    ),
    key(
        "output.discard",
        Kind::String,
        "At a size or message limit: `new` refuses new messages (nothing is dropped silently), `old` drops the oldest.",
    ),
    key(
        "output.update_existing",
        Kind::Bool,
        "Update an existing output stream that is weaker than the configuration (replicas, limits, discard, duplicate window) instead of refusing to start.",
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
        "model.intra_spinning",
        Kind::Bool,
        "ONNX Runtime's intra-op threads spin while waiting for work: faster when the encoder has the cores to itself, slower beside the decode threads of a busy worker (README \"Performance\").",
    ),
    key(
        "model.cpu_arena",
        Kind::Bool,
        "ONNX Runtime's CPU arena allocator (freed blocks stay reserved for reuse).",
    ),
    key(
        "model.memory_pattern",
        Kind::Bool,
        "ONNX Runtime's memory-pattern planning (a preallocated block per input shape).",
    ),
    key(
        "model.prepacking",
        Kind::Bool,
        "ONNX Runtime repacks matrix weights for its CPU kernels at load: faster, and a second copy of them while loading.",
    ),
    key(
        "model.cpu_run_batch",
        Kind::Integer,
        "On CPU, the most images per ONNX Runtime run: a larger batch runs in slices of this size, which bounds activation memory (0: the whole batch in one run; CUDA always runs the whole batch).",
    ),
    key(
        "model.trim_heap",
        Kind::Bool,
        "On CPU, hand the heap's free pages back to the system after each batch (glibc's malloc_trim): the activations a batch freed do not stay resident.",
    ),
    key(
        "model.io_binding",
        Kind::Bool,
        "On CUDA, batches go to the device from page-locked host memory and embeddings come back into it (ONNX Runtime's I/O binding); no effect on CPU.",
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
    opt(
        "detector.scale",
        Kind::Float,
        "Logit scale s = 1/T of the score; unset: the bank's (`bank build --scale`), else the method's (50 for ole).",
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
    // [detector.adaptive]
    key(
        "detector.adaptive.enabled",
        Kind::Bool,
        "Score with the adaptive detector: a memory of confident-OOD images lowers the score of look-alikes (docs/adaptive.md).",
    ),
    key(
        "detector.adaptive.capacity",
        Kind::Integer,
        "Adaptive: memory entries at most.",
    ),
    key(
        "detector.adaptive.k",
        Kind::Integer,
        "Adaptive: k of the k-th largest cosine to the memory (1–capacity).",
    ),
    opt(
        "detector.adaptive.floor",
        Kind::Float,
        "Adaptive: cosines at or below this add no penalty ([-1, 1)); unset: the floor the bank's calibration chose from ID images, else 0.75.",
    ),
    key(
        "detector.adaptive.bucket_cap",
        Kind::Integer,
        "Adaptive: entries per predicted ID class at most (its oldest is evicted first).",
    ),
    key(
        "detector.adaptive.admit_per_mille",
        Kind::Integer,
        "Adaptive: admissions per 1,000 consecutive inputs at most (0–1000).",
    ),
    key(
        "detector.adaptive.max_age",
        Kind::Duration,
        "Adaptive: entries older than this (producer time) than the newest are dropped; 0s = never.",
    ),
    key(
        "detector.adaptive.sync",
        Kind::String,
        "Adaptive: `local` (each worker its own memory) or `shared` (admissions published to the stream OODGATE_ADAPT and folded by every worker in stream order).",
    ),
    opt(
        "detector.adaptive.admit_below",
        Kind::Float,
        "Adaptive: admission threshold; unset: the bank's calibration (`calibrate --write`).",
    ),
    opt(
        "detector.adaptive.max_penalty",
        Kind::Float,
        "Adaptive: the largest penalty; unset: the bank's calibration.",
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
    // [preprocess]
    key(
        "preprocess.jpeg_draft",
        Kind::Bool,
        "The fast JPEG path: decode JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain before the bicubic resize, as Pillow's `Image.draft(\"RGB\", (size, size))` does; off = the exact CLIP preprocessing (README \"Performance\" has its speed and deviation).",
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
    key(
        "limits.max_jpeg_scans",
        Kind::Integer,
        "Most scans accepted in one JPEG, counted before decoding (1–100000); more is dead-lettered as `too_complex`.",
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

impl Settings {
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
    DEFAULT_TOML
        .parse::<toml::Table>()
        .map(|t| leaf_values(&t))
        .unwrap_or_default()
}

/// Every value of a TOML table by its dotted path, subsections (`[detector.adaptive]`)
/// included, in TOML syntax.
pub fn leaf_values(table: &toml::Table) -> BTreeMap<String, String> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut BTreeMap<String, String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v.as_table() {
                Some(sub) => walk(&key, sub, out),
                None => {
                    out.insert(key, v.to_string());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", table, &mut out);
    out
}
