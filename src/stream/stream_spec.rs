//! What a stream should look like (replicas, storage, retention, limits, discard policy) and
//! how an existing stream compares with it. A setting is *weaker* when it can lose more: fewer
//! replicas, memory instead of file storage, a tighter limit, discarding old messages where new
//! ones should be refused. See docs/delivery.md §2.2.

use std::time::Duration;

use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};

/// The configured shape of one stream. Limits of 0 mean unlimited.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSpec {
    pub replicas: usize,
    pub storage: StorageType,
    pub retention: RetentionPolicy,
    pub max_bytes: i64,
    pub max_msgs: i64,
    pub max_age: Duration,
    pub discard: DiscardPolicy,
    /// Configuration keys are `<section>.<key>`; mismatches name them.
    pub section: &'static str,
}

impl StreamSpec {
    /// The defaults oodgate has always created: R1, file, limits retention, no limits.
    pub fn unlimited(section: &'static str) -> StreamSpec {
        StreamSpec {
            replicas: 1,
            storage: StorageType::File,
            retention: RetentionPolicy::Limits,
            max_bytes: 0,
            max_msgs: 0,
            max_age: Duration::ZERO,
            discard: DiscardPolicy::New,
            section,
        }
    }

    /// Writes this shape into a stream configuration (NATS spells "unlimited" as -1).
    pub fn apply(&self, c: &mut stream::Config) {
        c.num_replicas = self.replicas.max(1);
        c.storage = self.storage;
        c.retention = self.retention;
        c.max_bytes = unlimited_as_minus_one(self.max_bytes);
        c.max_messages = unlimited_as_minus_one(self.max_msgs);
        c.max_age = self.max_age;
        c.discard = self.discard;
    }
}

fn unlimited_as_minus_one(v: i64) -> i64 {
    if v <= 0 { -1 } else { v }
}

/// A limit as an option: `None` is unlimited (NATS uses -1 or 0).
fn limit(v: i64) -> Option<i64> {
    (v > 0).then_some(v)
}

fn age(v: Duration) -> Option<Duration> {
    (!v.is_zero()).then_some(v)
}

/// True when `existing` drops data sooner than `configured` (`None` = unlimited).
fn tighter<T: PartialOrd>(existing: Option<T>, configured: Option<T>) -> bool {
    match (existing, configured) {
        (Some(_), None) => true,
        (Some(e), Some(c)) => e < c,
        (None, _) => false,
    }
}

pub fn parse_storage(s: &str) -> Option<StorageType> {
    match s {
        "file" => Some(StorageType::File),
        "memory" => Some(StorageType::Memory),
        _ => None,
    }
}

pub fn parse_retention(s: &str) -> Option<RetentionPolicy> {
    match s {
        "limits" => Some(RetentionPolicy::Limits),
        "interest" => Some(RetentionPolicy::Interest),
        "workqueue" => Some(RetentionPolicy::WorkQueue),
        _ => None,
    }
}

pub fn parse_discard(s: &str) -> Option<DiscardPolicy> {
    match s {
        "new" => Some(DiscardPolicy::New),
        "old" => Some(DiscardPolicy::Old),
        _ => None,
    }
}

fn storage_name(s: StorageType) -> &'static str {
    match s {
        StorageType::File => "file",
        StorageType::Memory => "memory",
    }
}

fn retention_name(r: RetentionPolicy) -> &'static str {
    match r {
        RetentionPolicy::Limits => "limits",
        RetentionPolicy::Interest => "interest",
        RetentionPolicy::WorkQueue => "workqueue",
    }
}

fn discard_name(d: DiscardPolicy) -> &'static str {
    match d {
        DiscardPolicy::Old => "old",
        DiscardPolicy::New => "new",
    }
}

fn show_limit(v: Option<i64>) -> String {
    v.map_or_else(|| "unlimited".into(), |v| v.to_string())
}

fn show_age(v: Option<Duration>) -> String {
    v.map_or_else(|| "unlimited".into(), |v| format!("{v:?}"))
}

/// One setting of an existing stream, bucket or consumer weaker than the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub what: String,
    pub existing: String,
    pub configured: String,
    /// False for what the server cannot change on an existing stream (storage, retention):
    /// no `update_existing` helps; the stream must be recreated or the configuration changed.
    pub updatable: bool,
}

impl Mismatch {
    pub(crate) fn new(what: String, existing: String, configured: String) -> Mismatch {
        Mismatch {
            what,
            existing,
            configured,
            updatable: true,
        }
    }
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is {} on the server but {} in the configuration",
            self.what, self.existing, self.configured
        )?;
        if !self.updatable {
            write!(f, " (the server cannot change it on an existing stream)")?;
        }
        Ok(())
    }
}

/// The settings of `existing` weaker than `spec`, and the output stream's duplicate window
/// when one is required.
pub fn weaker_settings(
    existing: &stream::Config,
    spec: &StreamSpec,
    duplicate_window: Option<Duration>,
) -> Vec<Mismatch> {
    let name = &existing.name;
    let key = |k: &str| format!("{}.{k}", spec.section);
    let mut out = Vec::new();
    if existing.num_replicas.max(1) < spec.replicas.max(1) {
        out.push(Mismatch::new(
            format!("stream {name} replicas"),
            existing.num_replicas.max(1).to_string(),
            format!("{} ({})", spec.replicas, key("replicas")),
        ));
    }
    if existing.storage == StorageType::Memory && spec.storage == StorageType::File {
        out.push(Mismatch {
            updatable: false,
            ..Mismatch::new(
                format!("stream {name} storage"),
                storage_name(existing.storage).into(),
                format!("{} ({})", storage_name(spec.storage), key("storage")),
            )
        });
    }
    if existing.retention != spec.retention {
        out.push(Mismatch {
            updatable: false,
            ..Mismatch::new(
                format!("stream {name} retention"),
                retention_name(existing.retention).into(),
                format!("{} ({})", retention_name(spec.retention), key("retention")),
            )
        });
    }
    let limits = [
        (
            "max_bytes",
            limit(existing.max_bytes),
            limit(spec.max_bytes),
        ),
        (
            "max_msgs",
            limit(existing.max_messages),
            limit(spec.max_msgs),
        ),
    ];
    for (k, e, c) in limits {
        if tighter(e, c) {
            out.push(Mismatch::new(
                format!("stream {name} {k}"),
                show_limit(e),
                format!("{} ({})", show_limit(c), key(k)),
            ));
        }
    }
    if tighter(age(existing.max_age), age(spec.max_age)) {
        out.push(Mismatch::new(
            format!("stream {name} max_age"),
            show_age(age(existing.max_age)),
            format!("{} ({})", show_age(age(spec.max_age)), key("max_age")),
        ));
    }
    // The discard policy only acts on max_bytes / max_msgs: without them it cannot lose data.
    let has_size_limit =
        limit(existing.max_bytes).is_some() || limit(existing.max_messages).is_some();
    if has_size_limit
        && existing.discard == DiscardPolicy::Old
        && spec.discard == DiscardPolicy::New
    {
        out.push(Mismatch::new(
            format!("stream {name} discard"),
            discard_name(existing.discard).into(),
            format!("{} ({})", discard_name(spec.discard), key("discard")),
        ));
    }
    if let Some(w) = duplicate_window
        && existing.duplicate_window < w
    {
        out.push(Mismatch::new(
            format!("stream {name} duplicate_window"),
            format!("{:?}", existing.duplicate_window),
            format!("{w:?} (output.duplicate_window)"),
        ));
    }
    out
}

/// `existing` brought up to `spec` for an update: what is weaker is raised, what is stronger
/// is kept (more replicas, a longer duplicate window stay).
pub fn strengthened(
    existing: &stream::Config,
    spec: &StreamSpec,
    duplicate_window: Option<Duration>,
) -> stream::Config {
    let mut c = existing.clone();
    c.num_replicas = c.num_replicas.max(spec.replicas.max(1));
    if tighter(limit(c.max_bytes), limit(spec.max_bytes)) {
        c.max_bytes = unlimited_as_minus_one(spec.max_bytes);
    }
    if tighter(limit(c.max_messages), limit(spec.max_msgs)) {
        c.max_messages = unlimited_as_minus_one(spec.max_msgs);
    }
    if tighter(age(c.max_age), age(spec.max_age)) {
        c.max_age = spec.max_age;
    }
    if spec.discard == DiscardPolicy::New {
        c.discard = DiscardPolicy::New;
    }
    if let Some(w) = duplicate_window {
        c.duplicate_window = c.duplicate_window.max(w);
    }
    c
}

/// An Object Store bucket (its backing stream `OBJ_<bucket>`) that expires objects sooner than
/// `ttl` (`input.object_store_ttl`): claim-checked images could vanish before they are routed.
/// A `ttl` of 0 leaves the bucket unmanaged.
pub fn bucket_expires_sooner(
    bucket: &str,
    existing_max_age: Duration,
    ttl: Duration,
) -> Option<Mismatch> {
    (!ttl.is_zero() && tighter(age(existing_max_age), age(ttl))).then(|| {
        Mismatch::new(
            format!("object store bucket {bucket} max_age"),
            show_age(age(existing_max_age)),
            format!("{} (input.object_store_ttl)", show_age(age(ttl))),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing() -> stream::Config {
        let mut c = stream::Config {
            name: "S".into(),
            ..Default::default()
        };
        StreamSpec::unlimited("input").apply(&mut c);
        c
    }

    #[test]
    fn the_same_shape_is_not_weaker() {
        let spec = StreamSpec {
            replicas: 3,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(3600),
            retention: RetentionPolicy::Interest,
            ..StreamSpec::unlimited("input")
        };
        let mut c = existing();
        spec.apply(&mut c);
        assert_eq!(c.max_messages, -1);
        assert_eq!(c.max_bytes, 1 << 30);
        assert!(weaker_settings(&c, &spec, None).is_empty());
    }

    #[test]
    fn each_weaker_setting_is_named_with_both_values() {
        let spec = StreamSpec {
            replicas: 3,
            max_bytes: 1000,
            max_msgs: 0,
            max_age: Duration::from_secs(3600),
            ..StreamSpec::unlimited("output")
        };
        let mut c = existing();
        c.num_replicas = 1;
        c.storage = StorageType::Memory;
        c.retention = RetentionPolicy::WorkQueue;
        c.max_bytes = 500;
        c.max_messages = 10;
        c.max_age = Duration::from_secs(60);
        c.discard = DiscardPolicy::Old;
        c.duplicate_window = Duration::from_secs(120);
        let found = weaker_settings(&c, &spec, Some(Duration::from_secs(900)));
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "stream S replicas is 1 on the server but 3 (output.replicas) in the configuration",
                "stream S storage is memory on the server but file (output.storage) in the configuration (the server cannot change it on an existing stream)",
                "stream S retention is workqueue on the server but limits (output.retention) in the configuration (the server cannot change it on an existing stream)",
                "stream S max_bytes is 500 on the server but 1000 (output.max_bytes) in the configuration",
                "stream S max_msgs is 10 on the server but unlimited (output.max_msgs) in the configuration",
                "stream S max_age is 60s on the server but 3600s (output.max_age) in the configuration",
                "stream S discard is old on the server but new (output.discard) in the configuration",
                "stream S duplicate_window is 120s on the server but 900s (output.duplicate_window) in the configuration",
            ]
        );
        let s = strengthened(&c, &spec, Some(Duration::from_secs(900)));
        assert_eq!(
            (
                s.num_replicas,
                s.max_bytes,
                s.max_messages,
                s.max_age,
                s.discard
            ),
            (3, 1000, -1, Duration::from_secs(3600), DiscardPolicy::New)
        );
        assert_eq!(s.duplicate_window, Duration::from_secs(900));
        // What the server cannot change is left as it is (the update would be refused).
        assert_eq!(s.storage, StorageType::Memory);
    }

    #[test]
    fn stronger_settings_are_accepted() {
        let spec = StreamSpec {
            max_bytes: 1000,
            max_age: Duration::from_secs(60),
            discard: DiscardPolicy::Old,
            ..StreamSpec::unlimited("input")
        };
        let mut c = existing();
        c.num_replicas = 3;
        c.max_bytes = 5000;
        c.discard = DiscardPolicy::New;
        assert!(weaker_settings(&c, &spec, None).is_empty());
        // discard=old without any size limit cannot drop anything.
        let mut c = existing();
        c.discard = DiscardPolicy::Old;
        assert!(weaker_settings(&c, &StreamSpec::unlimited("input"), None).is_empty());
    }

    #[test]
    fn buckets_expiring_sooner_are_named() {
        let h = Duration::from_secs(3600);
        assert!(bucket_expires_sooner("b", Duration::ZERO, h).is_none());
        assert!(bucket_expires_sooner("b", 2 * h, h).is_none());
        assert!(bucket_expires_sooner("b", h, Duration::ZERO).is_none());
        assert!(bucket_expires_sooner("b", h, 2 * h).is_some());
        let m = bucket_expires_sooner("b", Duration::from_secs(60), h);
        assert_eq!(
            m.map(|m| m.to_string()).as_deref(),
            Some(
                "object store bucket b max_age is 60s on the server but 3600s (input.object_store_ttl) in the configuration"
            )
        );
    }

    #[test]
    fn names_parse() {
        assert_eq!(parse_storage("memory"), Some(StorageType::Memory));
        assert_eq!(parse_retention("interest"), Some(RetentionPolicy::Interest));
        assert_eq!(parse_discard("old"), Some(DiscardPolicy::Old));
        assert_eq!(parse_discard("Old"), None);
    }
}
