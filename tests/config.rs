//! Layered settings: the embedded defaults, file and environment precedence, unknown keys,
//! validation messages that name the key, and the key table that documents it all.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use oodgate::config::{ConfigError, DEFAULT_TOML, KEYS, Kind, NatsAuth, Settings};

type Env = Vec<(String, String)>;

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A config file in a temp dir (kept alive by the returned guard).
fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("oodgate.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

fn load(text: Option<&str>, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    match text {
        Some(t) => {
            let (_d, p) = file(t);
            Settings::load_from(Some(&p), env(vars))
        }
        None => Settings::load_from(None, env(vars)),
    }
}

fn err(text: Option<&str>, vars: &[(&str, &str)]) -> String {
    match load(text, vars) {
        Ok(s) => panic!("expected an error, loaded {s:?}"),
        Err(e) => e.to_string(),
    }
}

/// (section.key, commented_out) for every `key = value` line of the embedded default file,
/// including the commented-out `# key = value` lines of keys without a default.
fn default_toml_keys() -> Vec<(String, bool)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in DEFAULT_TOML.lines() {
        let line = line.trim();
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (body, commented) = match line.strip_prefix("# ") {
            Some(b) => (b, true),
            None => (line, false),
        };
        let Some((name, _)) = body.split_once(" = ") else {
            continue;
        };
        if !section.is_empty()
            && !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
        {
            out.push((format!("{section}.{name}"), commented));
        }
    }
    out
}

#[test]
fn embedded_default_deserializes_validates_and_equals_builtin_defaults() {
    let s = Settings::load_from(None, Vec::new()).expect("embedded defaults load");
    s.validate().expect("defaults validate");
    assert_eq!(
        s,
        Settings::default(),
        "config/default.toml and the Default impls disagree"
    );
    assert_eq!(s.nats.servers, vec!["nats://127.0.0.1:4222".to_string()]);
    assert_eq!(s.input.ack_wait, Duration::from_secs(60));
    assert_eq!(s.output.duplicate_window, Duration::from_secs(15 * 60));
    assert_eq!(s.batch.max_wait, Duration::from_millis(20));
    assert_eq!(s.limits.max_bytes, 33_554_432);
    assert_eq!(s.nats.auth(), NatsAuth::None);
    assert!(s.detector.bank.is_none() && s.detector.threshold.is_none());
}

#[test]
fn default_toml_and_key_table_list_the_same_keys() {
    let in_file = default_toml_keys();
    let active: BTreeSet<String> = in_file
        .iter()
        .filter(|(_, c)| !c)
        .map(|(k, _)| k.clone())
        .collect();
    let commented: BTreeSet<String> = in_file
        .iter()
        .filter(|(_, c)| *c)
        .map(|(k, _)| k.clone())
        .collect();
    let with_default: BTreeSet<String> = KEYS
        .iter()
        .filter(|k| !k.optional)
        .map(|k| k.key.to_string())
        .collect();
    let optional: BTreeSet<String> = KEYS
        .iter()
        .filter(|k| k.optional)
        .map(|k| k.key.to_string())
        .collect();
    assert_eq!(
        active, with_default,
        "keys set in config/default.toml vs KEYS"
    );
    assert_eq!(
        commented, optional,
        "commented-out keys in config/default.toml vs optional KEYS"
    );
    assert_eq!(
        in_file.len(),
        KEYS.len(),
        "a key appears twice in default.toml"
    );
    let unique: BTreeSet<&str> = KEYS.iter().map(|k| k.key).collect();
    assert_eq!(unique.len(), KEYS.len(), "a key appears twice in KEYS");

    // The parsed file agrees with the line scan (no key hides in an inline table).
    let table: toml::Table = DEFAULT_TOML.parse().expect("default.toml parses");
    let parsed = leaves(&table);
    assert_eq!(parsed, with_default);

    // The struct fields are the table's keys: the fully uncommented file deserializes with
    // deny_unknown_fields, and the serialized defaults hold exactly the keys with defaults.
    let uncommented: String = DEFAULT_TOML
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(b)
                if b.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                b.to_string()
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let full: Settings = toml::from_str(&uncommented).expect("every documented key is a field");
    assert!(full.detector.bank.is_some() && full.nats.password.is_some());
    let ser = toml::Table::try_from(Settings::default()).expect("serialize defaults");
    let ser_keys = leaves(&ser);
    assert_eq!(ser_keys, with_default, "Settings fields vs KEYS");
}

/// The dotted paths of a table's values, subsections (`[detector.adaptive]`) included.
fn leaves(t: &toml::Table) -> BTreeSet<String> {
    oodgate::config::leaf_values(t).into_keys().collect()
}

#[test]
fn every_key_in_default_toml_is_documented_by_a_comment() {
    let mut prev = "";
    let mut section = "";
    for line in DEFAULT_TOML.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if !line.is_empty() && !line.starts_with('#') {
            assert!(
                prev.starts_with('#'),
                "{section} `{line}` has no comment above it in config/default.toml"
            );
        }
        if !line.is_empty() {
            prev = line;
        }
    }
}

#[test]
fn reference_markdown_lists_every_key_with_default_and_env_var() {
    let md = Settings::reference_markdown();
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| `")).collect();
    assert_eq!(rows.len(), KEYS.len());
    for k in KEYS {
        let row = rows
            .iter()
            .find(|r| r.starts_with(&format!("| `{}` |", k.key)))
            .unwrap_or_else(|| panic!("{} missing from the reference", k.key));
        assert!(row.contains(&format!("`{}`", k.env_var())), "{row}");
        assert!(row.contains(k.kind.name()), "{row}");
        if k.optional {
            assert!(row.contains("(unset)"), "{row}");
        }
    }
    assert!(md.contains("| `batch.max_size` | integer | `32` | `OODGATE__BATCH__MAX_SIZE` |"));
    assert!(md.contains("`[\"nats://127.0.0.1:4222\"]`"), "{md}");
    assert!(md.contains("| `input.ack_wait` | duration | `\"60s\"` |"));
}

#[test]
fn file_overrides_default_and_only_what_it_sets() {
    let s = load(
        Some("[batch]\nmax_size = 16\n[nats]\nservers = [\"nats://x:4222\", \"nats://y:4222\"]\n"),
        &[],
    )
    .expect("load");
    assert_eq!(s.batch.max_size, 16);
    assert_eq!(s.nats.servers, vec!["nats://x:4222", "nats://y:4222"]);
    // Untouched keys keep their defaults.
    assert_eq!(s.batch.queue_depth, 64);
    assert_eq!(s.input.stream, "IMAGES");
}

#[test]
fn env_overrides_file() {
    let s = load(
        Some("[batch]\nmax_size = 16\n"),
        &[("OODGATE__BATCH__MAX_SIZE", "8")],
    )
    .expect("load");
    assert_eq!(s.batch.max_size, 8);
    // Types from the environment: bool, duration, float, path.
    let s = load(
        None,
        &[
            ("OODGATE__MODEL__WARM_UP", "false"),
            ("OODGATE__INPUT__ACK_WAIT", "2m"),
            ("OODGATE__DETECTOR__THRESHOLD", "0.25"),
            ("OODGATE__DETECTOR__BANK", "/banks/b.oodb"),
            ("OODGATE__HTTP__LISTEN", "0.0.0.0:9000"),
        ],
    )
    .expect("load");
    assert!(!s.model.warm_up);
    assert_eq!(s.input.ack_wait, Duration::from_secs(120));
    assert_eq!(s.detector.threshold, Some(0.25));
    assert_eq!(s.detector.bank, Some(PathBuf::from("/banks/b.oodb")));
    assert_eq!(s.http.listen_addr().expect("addr").port(), 9000);
    // An integer-looking value for a float key works too.
    let s = load(None, &[("OODGATE__DETECTOR__THRESHOLD", "1")]).expect("load");
    assert_eq!(s.detector.threshold, Some(1.0));
}

#[test]
fn list_env_vars_are_split_on_commas() {
    let s = load(
        Some("[nats]\nservers = [\"nats://file:4222\"]\n"),
        &[("OODGATE__NATS__SERVERS", "nats://a:4222,nats://b:4222")],
    )
    .expect("load");
    assert_eq!(s.nats.servers, vec!["nats://a:4222", "nats://b:4222"]);
    // A single item and spaces after commas.
    let s = load(
        None,
        &[
            ("OODGATE__NATS__SERVERS", "nats://only:4222"),
            ("OODGATE__INPUT__SUBJECTS", "images.in, images.more"),
        ],
    )
    .expect("load");
    assert_eq!(s.nats.servers, vec!["nats://only:4222"]);
    assert_eq!(s.input.subjects, vec!["images.in", "images.more"]);
}

#[test]
fn string_env_values_are_taken_verbatim_and_secrets_are_redacted() {
    let s = load(
        None,
        &[
            ("OODGATE__NATS__USER", "007"),
            ("OODGATE__NATS__PASSWORD", "0012"),
            ("OODGATE__NATS__NAME", "1e5"),
        ],
    )
    .expect("load");
    assert_eq!(s.nats.user.as_deref(), Some("007"));
    assert_eq!(s.nats.name, "1e5");
    let Some(password) = &s.nats.password else {
        panic!("password not set")
    };
    assert_eq!(password.expose(), "0012");
    assert!(matches!(
        s.nats.auth(),
        NatsAuth::UserPassword { user: "007", .. }
    ));
    let debug = format!("{s:?}");
    assert!(!debug.contains("0012"), "{debug}");
    let shown = toml::to_string(&s).expect("serialize");
    assert!(
        !shown.contains("0012") && shown.contains("<redacted>"),
        "{shown}"
    );
}

#[test]
fn credentials_inside_server_urls_are_redacted_and_refused_in_the_clear_with_tls_required() {
    let s = load(
        None,
        &[(
            "OODGATE__NATS__SERVERS",
            "nats://alice:hunter2@10.0.0.1:4222,tls://tok3n@nats.example:4443,nats://plain:4222",
        )],
    )
    .expect("load");
    let debug = format!("{s:?}");
    let shown = toml::to_string(&s).expect("serialize");
    for text in [&debug, &shown] {
        assert!(
            !text.contains("hunter2") && !text.contains("alice") && !text.contains("tok3n"),
            "{text}"
        );
        assert!(text.contains("nats://<redacted>@10.0.0.1:4222"), "{text}");
        assert!(
            text.contains("tls://<redacted>@nats.example:4443"),
            "{text}"
        );
        assert!(text.contains("nats://plain:4222"), "{text}");
    }
    // The real URLs are still what the client connects with.
    assert!(s.nats.servers[0].contains("hunter2"));
    assert!(s.validate().is_ok());

    let bad = load(
        None,
        &[
            (
                "OODGATE__NATS__SERVERS",
                "nats://alice:hunter2@10.0.0.1:4222",
            ),
            ("OODGATE__NATS__TLS_REQUIRED", "true"),
        ],
    );
    let e = bad
        .and_then(|s| s.validate().map(|_| s))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nats.servers") && e.contains("tls_required"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
    // Malformed entries are named without their credentials too.
    let e = load(None, &[("OODGATE__NATS__SERVERS", "ftp://bob:s3cret@host")])
        .and_then(|s| s.validate().map(|_| s))
        .unwrap_err()
        .to_string();
    assert!(e.contains("scheme") && !e.contains("s3cret"), "{e}");
}

#[test]
fn empty_env_var_counts_as_unset_and_others_are_ignored() {
    let s = load(
        Some("[nats]\nuser = \"w\"\npassword = \"p\"\n"),
        &[
            ("OODGATE__NATS__USER", ""),
            ("OODGATE_LOG_LEVEL", "debug"), // single underscore: the CLI's, not ours
            ("PATH", "/usr/bin"),
        ],
    )
    .expect("load");
    assert_eq!(s.nats.user.as_deref(), Some("w"));
    assert_eq!(s.log.level, "info");
}

#[test]
fn lowercase_env_var_names_work() {
    let s = load(None, &[("oodgate__batch__max_size", "4")]).expect("load");
    assert_eq!(s.batch.max_size, 4);
}

#[test]
fn unknown_key_in_file_is_an_error_naming_it() {
    let e = err(Some("[batch]\nmax_sise = 8\n"), &[]);
    assert!(e.contains("unknown key `batch.max_sise`"), "{e}");
    assert!(e.contains("did you mean `batch.max_size`"), "{e}");
    assert!(e.contains("oodgate.toml"), "{e}");

    let e = err(Some("[bacth]\nmax_size = 8\n"), &[]);
    assert!(
        e.contains("unknown key `bacth`") && e.contains("`batch`"),
        "{e}"
    );

    let e = err(Some("max_size = 8\n"), &[]);
    assert!(e.contains("unknown key `max_size`"), "{e}");
}

#[test]
fn unknown_env_var_is_an_error_naming_it() {
    let e = err(None, &[("OODGATE__BATCH__MAXSIZE", "8")]);
    assert!(e.contains("batch.maxsize"), "{e}");
    assert!(e.contains("OODGATE__BATCH__MAXSIZE"), "{e}");
    assert!(e.contains("OODGATE__BATCH__MAX_SIZE"), "suggestion: {e}");
}

#[test]
fn syntax_errors_and_missing_files_name_the_file() {
    let e = err(Some("[batch\nmax_size = 8\n"), &[]);
    assert!(
        e.contains("oodgate.toml") && e.contains("not valid TOML"),
        "{e}"
    );
    let missing = PathBuf::from("/nonexistent/oodgate.toml");
    let e = Settings::load_from(Some(&missing), Vec::new())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("/nonexistent/oodgate.toml"), "{e}");
}

#[test]
fn wrong_types_are_errors_naming_the_key() {
    let e = err(Some("[batch]\nmax_size = \"lots\"\n"), &[]);
    assert!(e.contains("batch.max_size"), "{e}");
    let e = err(Some("[input]\nack_wait = \"5 parsecs\"\n"), &[]);
    assert!(e.contains("input.ack_wait"), "{e}");
    let e = err(None, &[("OODGATE__BATCH__MAX_SIZE", "many")]);
    assert!(e.contains("batch.max_size"), "{e}");
    let e = err(Some("[batch]\nmax_size = -1\n"), &[]);
    assert!(e.contains("batch.max_size"), "{e}");
    let e = err(Some("[model]\nwarm_up = 3.5\n"), &[]);
    assert!(e.contains("model.warm_up"), "{e}");
}

#[test]
fn invalid_values_are_errors_naming_the_key() {
    let cases: &[(&str, &str)] = &[
        (
            "[batch]\nmax_size = 0\n",
            "batch.max_size must be between 1 and 4096 (got 0)",
        ),
        (
            "[batch]\nmax_size = 5000\n",
            "batch.max_size must be between 1 and 4096 (got 5000)",
        ),
        ("[model]\ndevice = \"tpu\"\n", "model.device must be"),
        ("[model]\ndevice = \"cuda:x\"\n", "model.device must be"),
        ("[log]\nformat = \"xml\"\n", "log.format must be"),
        ("[log]\nlevel = \"loud[\"\n", "log.level must be"),
        (
            "[detector]\nmethod = \"magic\"\n",
            "detector.method must be one of ole",
        ),
        (
            "[http]\nlisten = \"localhost\"\n",
            "http.listen must be IP:PORT",
        ),
        (
            "[input]\nmax_deliver = 0\n",
            "input.max_deliver must be between 1",
        ),
        (
            "[input]\nheartbeat = \"20s\"\n",
            "input.heartbeat (20s) must be at most half",
        ),
        (
            "[input]\npull_batch = 512\n",
            "input.pull_batch (512) must not exceed",
        ),
        (
            "[input]\nstream = \"MY.STREAM\"\n",
            "input.stream must be a JetStream name",
        ),
        (
            "[input]\nfilter_subject = \"other.in\"\n",
            "input.filter_subject",
        ),
        (
            "[input]\nsubjects = [\"images.>\"]\nfilter_subject = \"images.in\"\n[output]\nprefix = \"images\"\n",
            "output.id_subject (images.id) is captured by input.subjects",
        ),
        ("[output]\nprefix = \"out.*\"\n", "output.prefix"),
        (
            "[output]\nood_subject = \"oodgate.id\"\n",
            "output.ood_subject (oodgate.id) must differ from output.id_subject",
        ),
        (
            "[output]\nstream = \"IMAGES\"\n",
            "output.stream (IMAGES) must differ from input.stream",
        ),
        (
            "[output]\nduplicate_window = \"30s\"\n",
            "output.duplicate_window (30s) must be at least input.ack_wait",
        ),
        (
            "[nats]\nservers = []\n",
            "nats.servers must list at least one server",
        ),
        (
            "[nats]\nservers = [\"http://x:4222\"]\n",
            "nats.servers entry",
        ),
        ("[nats]\nuser = \"w\"\n", "nats.password is required"),
        (
            "[nats]\ntoken = \"t\"\nnkey = \"SUAB\"\n",
            "set at most one of",
        ),
        (
            "[nats]\nnkey = \"UAXYZ\"\n",
            "nats.nkey must be a user NKey seed",
        ),
        (
            "[nats]\ntls_cert = \"/c.pem\"\n",
            "nats.tls_key is required",
        ),
        (
            "[limits]\nmax_bytes = 0\n",
            "limits.max_bytes must be between 1",
        ),
        (
            "[shutdown]\ndrain_timeout = \"0s\"\n",
            "shutdown.drain_timeout must be greater than 0",
        ),
        (
            "[input]\nobject_store_bucket = \"a b\"\n",
            "input.object_store_bucket",
        ),
    ];
    for (text, want) in cases {
        let e = err(Some(text), &[]);
        assert!(e.contains(want), "for {text:?}: expected {want:?} in: {e}");
    }
    // Several problems are all reported.
    match load(Some("[batch]\nmax_size = 0\nqueue_depth = 0\n"), &[]) {
        Err(e) => {
            let keys: Vec<&str> = e.problems().iter().map(|p| p.key.as_str()).collect();
            assert_eq!(keys, ["batch.max_size", "batch.queue_depth"], "{e}");
        }
        Ok(_) => panic!("expected problems"),
    }
    // Errors from the environment name the key as well.
    let e = err(None, &[("OODGATE__BATCH__MAX_SIZE", "0")]);
    assert!(
        e.contains("batch.max_size must be between 1 and 4096 (got 0)"),
        "{e}"
    );
}

#[test]
fn valid_device_and_method_values_parse() {
    for d in ["auto", "cpu", "cuda", "cuda:1"] {
        let s = load(None, &[("OODGATE__MODEL__DEVICE", d)]).expect(d);
        s.model.device().expect(d);
    }
    let s = load(None, &[("OODGATE__DETECTOR__METHOD", "neglabel")]).expect("neglabel");
    assert_eq!(s.detector.method().expect("method").as_str(), "neglabel");
}

#[test]
fn output_subjects_default_from_prefix() {
    let s = Settings::default();
    let o = s.output_subjects();
    assert_eq!(o.all(), ["oodgate.id", "oodgate.ood", "oodgate.dlq"]);

    let s = load(Some("[output]\nprefix = \"filter.v2\"\n"), &[]).expect("load");
    let o = s.output_subjects();
    assert_eq!(
        (o.id.as_str(), o.ood.as_str(), o.dlq.as_str()),
        ("filter.v2.id", "filter.v2.ood", "filter.v2.dlq")
    );

    let s = load(
        Some("[output]\nprefix = \"p\"\nood_subject = \"alerts.ood\"\n"),
        &[],
    )
    .expect("load");
    let o = s.output_subjects();
    assert_eq!(o.all(), ["p.id", "alerts.ood", "p.dlq"]);
}

#[test]
fn validate_for_serve_requires_the_bank_and_existing_files() {
    let s = Settings::default();
    let e = s
        .validate_for_serve()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("detector.bank is required"), "{e}");
    assert!(e.contains("OODGATE__DETECTOR__BANK"), "{e}");

    let dir = tempfile::tempdir().expect("tmp");
    let bank = dir.path().join("bank.oodb");
    std::fs::write(&bank, b"x").expect("write");
    let mut s = Settings::default();
    s.detector.bank = Some(bank);
    s.model.dir = dir.path().to_path_buf();
    s.validate_for_serve().expect("bank and model dir exist");
    s.nats.tls_ca = Some(dir.path().join("missing-ca.pem"));
    let e = s
        .validate_for_serve()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("nats.tls_ca") && e.contains("missing-ca.pem"),
        "{e}"
    );
}

#[test]
fn env_var_names_follow_the_double_underscore_scheme() {
    let names: BTreeMap<&str, String> = KEYS.iter().map(|k| (k.key, k.env_var())).collect();
    assert_eq!(names["batch.max_size"], "OODGATE__BATCH__MAX_SIZE");
    assert_eq!(names["nats.servers"], "OODGATE__NATS__SERVERS");
    assert_eq!(
        names["shutdown.drain_timeout"],
        "OODGATE__SHUTDOWN__DRAIN_TIMEOUT"
    );
    // Every key can be set from the environment with a value of its type.
    for k in KEYS {
        let value = match k.kind {
            Kind::String | Kind::Secret => continue, // covered by the validators
            Kind::Path => "/tmp/x",
            Kind::StringList => continue,
            Kind::Bool => "true",
            Kind::Integer => continue,
            Kind::Float => "0.5",
            Kind::Duration => "59s",
            Kind::SocketAddr => "127.0.0.1:1",
        };
        let name = k.env_var();
        let s = Settings::load_from(None, vec![(name.clone(), value.to_string())]);
        // Cross-key checks may reject a value (e.g. heartbeat vs expires); the key must be
        // known and the value must parse.
        if let Err(e) = s {
            let msg = e.to_string();
            assert!(
                !msg.contains("unknown key") && !msg.contains("invalid type"),
                "{name}={value}: {msg}"
            );
        }
    }
}
