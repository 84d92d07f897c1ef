//! Validation: every value checked, every problem reported with the key it belongs to.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use super::keys::env_var_for;
use super::{ConfigError, Settings};
use crate::detect::method::Method;
use crate::model::Device;
use crate::stream::setup::{redact_url, url_has_credentials};
use crate::stream::stream_spec;

/// One invalid value: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub(super) fn new(key: &str, message: impl Into<String>) -> Self {
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

pub(super) fn list_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Settings {
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
            // Credentials in a URL travel in the clear unless the URL itself says TLS.
            let tls_url = s.starts_with("tls://") || s.starts_with("wss://");
            if n.tls_required && url_has_credentials(s) && !tls_url {
                p.push(Problem::new(
                    "nats.servers",
                    format!(
                        "entry {:?} carries credentials but is not a tls:// or wss:// URL while nats.tls_required is set; use tls:// or nats.user / nats.password",
                        redact_url(s)
                    ),
                ));
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
        if let Err(m) = check_subject(&n.inbox_prefix, false) {
            p.push(Problem::new("nats.inbox_prefix", m));
        }
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
        positive(p, "input.nak_delay", i.nak_delay);
        positive(p, "input.fetch_timeout", i.fetch_timeout);
        range_u(p, "input.replicas", i.replicas as u64, 1, 5);
        stream_shape(p, "input", &i.storage, i.max_bytes, i.max_msgs, &i.discard);
        if stream_spec::parse_retention(&i.retention).is_none() {
            p.push(Problem::new(
                "input.retention",
                format!(
                    "must be \"limits\", \"interest\" or \"workqueue\" (got {:?})",
                    i.retention
                ),
            ));
        }
        if !matches!(i.object_after_routing.as_str(), "keep" | "delete") {
            p.push(Problem::new(
                "input.object_after_routing",
                format!(
                    "must be \"keep\" or \"delete\" (got {:?})",
                    i.object_after_routing
                ),
            ));
        }
        if i.nak_delay_max < i.nak_delay {
            p.push(Problem::new(
                "input.nak_delay_max",
                format!(
                    "({}) must be at least input.nak_delay ({})",
                    show(i.nak_delay_max),
                    show(i.nak_delay)
                ),
            ));
        }
        if i.max_processing <= i.ack_wait {
            p.push(Problem::new(
                "input.max_processing",
                format!(
                    "({}) must exceed input.ack_wait ({}): progress acks keep inputs alive up to it",
                    show(i.max_processing),
                    show(i.ack_wait)
                ),
            ));
        }
        let valid_bucket = |b: &str| {
            !b.is_empty()
                && b.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !valid_bucket(&i.object_store_bucket) {
            p.push(Problem::new(
                "input.object_store_bucket",
                format!(
                    "must be letters, digits, '_' or '-' (got {:?})",
                    i.object_store_bucket
                ),
            ));
        }
        for b in i.object_store_buckets.iter().filter(|b| !valid_bucket(b)) {
            p.push(Problem::new(
                "input.object_store_buckets",
                format!("entries must be letters, digits, '_' or '-' (got {b:?})"),
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
        positive(p, "output.retry_max_delay", o.retry_max_delay);
        range_u(p, "output.replicas", o.replicas as u64, 1, 5);
        stream_shape(p, "output", &o.storage, o.max_bytes, o.max_msgs, &o.discard);
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
        if m.device.parse::<Device>().is_err() {
            p.push(device_problem(&m.device));
        }
        range_u(p, "model.intra_threads", m.intra_threads as u64, 0, 1024);

        let d = &self.detector;
        if d.method.parse::<Method>().is_err() {
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
        if let Some(s) = d.scale
            && !(s.is_finite() && s > 0.0)
        {
            p.push(Problem::new(
                "detector.scale",
                format!("must be a finite number > 0 (got {s})"),
            ));
        }
        range_u(p, "detector.top_k", d.top_k as u64, 0, 100);
        if !matches!(d.adaptive.sync.as_str(), "local" | "shared") {
            p.push(Problem::new(
                "detector.adaptive.sync",
                format!("{:?}: expected \"local\" or \"shared\"", d.adaptive.sync),
            ));
        }
        if d.adaptive.enabled
            && let Err(crate::detect::adaptive::AdaptiveError::InvalidParam {
                name,
                value,
                reason,
            }) = d.adaptive_params().validate()
        {
            p.push(Problem::new(
                &format!("detector.adaptive.{name}"),
                format!("{value}: {reason}"),
            ));
        }
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
        if self.input.max_bytes_in_flight < self.limits.max_bytes
            || self.input.max_bytes_in_flight > 1 << 40
        {
            p.push(Problem::new(
                "input.max_bytes_in_flight",
                format!(
                    "({}) must be at least limits.max_bytes ({}), so the largest accepted image fits, and at most 1 TiB",
                    self.input.max_bytes_in_flight, self.limits.max_bytes
                ),
            ));
        }
        range_u(
            p,
            "limits.max_jpeg_scans",
            self.limits.max_jpeg_scans.into(),
            1,
            100_000,
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
}

pub(super) fn method_message(got: &str) -> String {
    let names: Vec<&str> = Method::ALL.iter().map(|m| m.as_str()).collect();
    format!("must be one of {} (got {got:?})", names.join(", "))
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

/// `model.device` rejected by [`Device`]'s parser (the only device grammar).
pub(super) fn device_problem(got: &str) -> Problem {
    Problem::new(
        "model.device",
        format!("must be {} (got {got:?})", Device::FORMS),
    )
}

fn check_server_url(url: &str) -> Result<(), String> {
    let shown = redact_url(url);
    let s = shown.as_str();
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

/// Checks the storage, limits and discard policy of the stream of `section`.
fn stream_shape(
    p: &mut Vec<Problem>,
    section: &str,
    storage: &str,
    max_bytes: i64,
    max_msgs: i64,
    discard: &str,
) {
    if stream_spec::parse_storage(storage).is_none() {
        p.push(Problem::new(
            &format!("{section}.storage"),
            format!("must be \"file\" or \"memory\" (got {storage:?})"),
        ));
    }
    for (k, v) in [("max_bytes", max_bytes), ("max_msgs", max_msgs)] {
        if v < 0 {
            p.push(Problem::new(
                &format!("{section}.{k}"),
                format!("must be 0 (unlimited) or positive (got {v})"),
            ));
        }
    }
    if stream_spec::parse_discard(discard).is_none() {
        p.push(Problem::new(
            &format!("{section}.discard"),
            format!("must be \"new\" or \"old\" (got {discard:?})"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Validation problems of `model.device` for the value `d`, with defaults elsewhere.
    fn device_problems(d: &str) -> Vec<Problem> {
        let mut s = Settings::default();
        s.model.device = d.to_string();
        let mut p = Vec::new();
        s.check(&mut p);
        p.retain(|p| p.key == "model.device");
        p
    }

    #[test]
    fn validation_and_runtime_accept_the_same_device_strings() {
        let candidates = [
            "auto",
            "cpu",
            "cuda",
            "gpu",
            "cuda:0",
            "cuda:1",
            "cuda:0012",
            "cuda:12345",
            "cuda:2147483647",
            " cpu ",
            "cuda\n",
            "",
            " ",
            "tpu",
            "CUDA",
            "Cpu",
            "gpu:0",
            "cuda:",
            "cuda:x",
            "cuda:-1",
            "cuda:+1",
            "cuda:1.0",
            "cuda: 1",
            "cuda:2147483648",
            "cuda:\u{0663}",
            "cuda:0:1",
        ];
        let mut accepted = Vec::new();
        for d in candidates {
            let runtime = d.parse::<Device>();
            let problems = device_problems(d);
            assert_eq!(
                runtime.is_ok(),
                problems.is_empty(),
                "{d:?}: runtime {runtime:?}, validation {problems:?}"
            );
            let mut m = Settings::default().model;
            m.device = d.to_string();
            assert_eq!(m.device().ok(), runtime.as_ref().ok().copied(), "{d:?}");
            if runtime.is_ok() {
                accepted.push(d);
            }
        }
        assert_eq!(
            accepted,
            [
                "auto",
                "cpu",
                "cuda",
                "gpu",
                "cuda:0",
                "cuda:1",
                "cuda:0012",
                "cuda:12345",
                "cuda:2147483647",
                " cpu ",
                "cuda\n",
            ]
        );
    }

    #[test]
    fn device_problem_lists_the_accepted_forms() {
        let p = device_problems("tpu");
        assert_eq!(
            p.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [r#"model.device must be "auto", "cpu", "cuda" or "cuda:N" (got "tpu")"#]
        );
        let e = "tpu".parse::<Device>().unwrap_err().to_string();
        assert_eq!(
            e,
            r#"invalid device "tpu": expected "auto", "cpu", "cuda" or "cuda:N""#
        );
    }

    #[test]
    fn stream_shape_values_are_checked_and_named() {
        let mut s = Settings::default();
        s.input.storage = "disk".into();
        s.input.retention = "forever".into();
        s.input.max_bytes = -1;
        s.input.object_after_routing = "move".into();
        s.output.discard = "oldest".into();
        s.output.max_msgs = -5;
        let mut p = Vec::new();
        s.check(&mut p);
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "input.storage",
                "input.max_bytes",
                "input.retention",
                "input.object_after_routing",
                "output.max_msgs",
                "output.discard"
            ]
        );
        assert_eq!(
            p[0].to_string(),
            "input.storage must be \"file\" or \"memory\" (got \"disk\")"
        );
        assert!(Settings::default().validate().is_ok());
    }
}
