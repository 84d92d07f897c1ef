//! The deployment files: every YAML parses, the Kubernetes objects and the compose services
//! are what they claim, their oodgate settings load with `Settings`, the Dockerfiles copy files
//! that exist and run the right binary, the systemd unit has its keys, and the NATS server
//! accepts its configuration, with permissions that let a worker and a producer do their jobs
//! (checked against a real nats-server) and nothing more.
//!
//! No Docker engine or Kubernetes cluster is needed (or used).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use oodgate::config::{KEYS, Settings};
use serde_json::Value;

mod common;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// YAML through the project venv's PyYAML
// ---------------------------------------------------------------------------------------------

/// The project venv's interpreter, with deploy/requirements.txt (PyYAML) installed once.
fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let st = Command::new("bash")
            .arg(root().join("deploy/setup/venv.sh"))
            .status()
            .expect("run deploy/setup/venv.sh");
        assert!(st.success(), "deploy/setup/venv.sh failed");
        root().join(".venv/bin/python")
    })
}

/// All documents of a YAML file, as JSON values.
fn yaml(rel: &str) -> Vec<Value> {
    let out = Command::new(python())
        .args([
            "-c",
            "import yaml,sys,json; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1]))), default=str))",
        ])
        .arg(root().join(rel))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{rel} is not valid YAML:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).expect("python printed JSON");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn one(rel: &str) -> Value {
    let mut docs = yaml(rel);
    assert_eq!(docs.len(), 1, "{rel}: expected one document");
    docs.remove(0)
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {v}"))
}

/// `a.b.0.c` lookup (numbers index arrays); panics with the path when missing.
fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for part in path.split('.') {
        cur = match part.parse::<usize>() {
            Ok(i) if cur.is_array() => &cur[i],
            _ => &cur[part],
        };
        assert!(!cur.is_null(), "missing {path} (at {part})");
    }
    cur
}

// ---------------------------------------------------------------------------------------------
// Settings from a deployment file
// ---------------------------------------------------------------------------------------------

/// Loads `toml` as the `--config` file with `env` on top, the way oodgate would.
fn settings_from(toml: &str, env: Vec<(String, String)>, what: &str) -> Settings {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("oodgate.toml");
    std::fs::write(&p, toml).expect("write");
    Settings::load_from(Some(&p), env).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A container's `env` list: plain values, and a stand-in for values from Secrets.
fn k8s_env(container: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = s(e, "name").to_string();
        let value = match e.get("value") {
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string()),
            None => {
                assert!(
                    e["valueFrom"]["secretKeyRef"].is_object(),
                    "{name}: no value"
                );
                "from-a-secret".to_string()
            }
        };
        out.push((name, value));
    }
    out
}

fn configmap_toml() -> String {
    let cm = one("deploy/k8s/configmap.yaml");
    cm["data"]["oodgate.toml"]
        .as_str()
        .expect("ConfigMap data oodgate.toml")
        .to_string()
}

fn duration_secs(s: &str) -> f64 {
    let s = s.trim();
    if let Some(n) = s.strip_suffix("ms") {
        return n.trim().parse::<f64>().expect("ms") / 1000.0;
    }
    if let Some(n) = s.strip_suffix("min") {
        return n.trim().parse::<f64>().expect("min") * 60.0;
    }
    if let Some(n) = s.strip_suffix('m') {
        return n.trim().parse::<f64>().expect("m") * 60.0;
    }
    if let Some(n) = s.strip_suffix('s') {
        return n.trim().parse::<f64>().expect("s");
    }
    s.parse::<f64>()
        .unwrap_or_else(|_| panic!("duration {s:?}"))
}

// ---------------------------------------------------------------------------------------------
// YAML files
// ---------------------------------------------------------------------------------------------

#[test]
fn every_yaml_file_parses() {
    let mut n = 0;
    for entry in walkdir::WalkDir::new(root().join("deploy")) {
        let entry = entry.expect("walk deploy/");
        let p = entry.path();
        if matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml")) {
            let rel = p.strip_prefix(root()).expect("under root");
            let docs = yaml(&rel.to_string_lossy());
            assert!(!docs.is_empty(), "{} is empty", rel.display());
            n += 1;
        }
    }
    assert!(
        n >= 7,
        "expected the compose file and 6 Kubernetes manifests, found {n}"
    );
}

#[test]
fn kubernetes_objects_have_the_expected_kinds() {
    let want = [
        ("configmap.yaml", "v1", "ConfigMap"),
        ("deployment.yaml", "apps/v1", "Deployment"),
        ("deployment-cuda.yaml", "apps/v1", "Deployment"),
        ("service.yaml", "v1", "Service"),
        ("pdb.yaml", "policy/v1", "PodDisruptionBudget"),
        ("keda-scaledobject.yaml", "keda.sh/v1alpha1", "ScaledObject"),
    ];
    for (file, api, kind) in want {
        let doc = one(&format!("deploy/k8s/{file}"));
        assert_eq!(s(&doc, "apiVersion"), api, "{file}");
        assert_eq!(s(&doc, "kind"), kind, "{file}");
        assert!(!s(&doc, "metadata.name").is_empty(), "{file}");
    }
}

#[test]
fn configmap_settings_load_and_match_the_deployments() {
    let toml = configmap_toml();
    let cm_name = s(&one("deploy/k8s/configmap.yaml"), "metadata.name").to_string();
    for (file, cuda) in [("deployment.yaml", false), ("deployment-cuda.yaml", true)] {
        let d = one(&format!("deploy/k8s/{file}"));
        let pod = get(&d, "spec.template.spec");
        let c = get(pod, "containers.0");
        let env = k8s_env(c);
        for (k, _) in &env {
            assert!(k.starts_with("OODGATE__"), "{file}: unexpected env {k}");
        }
        let st = settings_from(&toml, env, file);
        if cuda {
            assert_eq!(st.model.device, "cuda", "{file}");
            let gpu = &get(c, "resources.limits")["nvidia.com/gpu"];
            let gpus = gpu
                .as_i64()
                .or_else(|| gpu.as_str().and_then(|v| v.parse().ok()));
            assert_eq!(gpus, Some(1), "{file}: requests nvidia.com/gpu: 1");
            assert!(s(c, "image").contains("cuda"), "{file}: the CUDA image");
        } else {
            assert_ne!(st.model.device, "cuda");
        }
        // Labels: the pod template carries the selector's labels.
        let sel = get(&d, "spec.selector.matchLabels")
            .as_object()
            .expect("labels");
        let labels = get(&d, "spec.template.metadata.labels")
            .as_object()
            .expect("labels");
        for (k, v) in sel {
            assert_eq!(labels.get(k), Some(v), "{file}: selector label {k}");
        }
        // The grace period covers the drain.
        let grace = get(pod, "terminationGracePeriodSeconds")
            .as_f64()
            .expect("number");
        assert!(
            grace > st.shutdown.drain_timeout.as_secs_f64(),
            "{file}: terminationGracePeriodSeconds {grace} must exceed shutdown.drain_timeout {:?}",
            st.shutdown.drain_timeout
        );
        // The config file is the ConfigMap, mounted where --config points.
        let args: Vec<&str> = get(c, "args")
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            args,
            ["serve", "--config", "/etc/oodgate/oodgate.toml"],
            "{file}"
        );
        let volumes = get(pod, "volumes").as_array().expect("volumes");
        let mounts = get(c, "volumeMounts").as_array().expect("mounts");
        let vol = |name: &str| {
            volumes
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("{file}: volume {name}"))
        };
        let mount_of = |pred: &dyn Fn(&Value) -> bool| {
            let v = volumes.iter().find(|v| pred(v)).expect("volume");
            mounts
                .iter()
                .find(|m| m["name"] == v["name"])
                .unwrap_or_else(|| panic!("{file}: mount of {}", v["name"]))
        };
        let cfg_mount = mount_of(&|v| v["configMap"]["name"] == cm_name.as_str());
        assert_eq!(s(cfg_mount, "mountPath"), "/etc/oodgate", "{file}");
        // Model and bank from a read-only PVC.
        let models = mount_of(&|v| v["persistentVolumeClaim"].is_object());
        assert_eq!(models["readOnly"], true, "{file}: model volume read-only");
        let model_path = s(models, "mountPath");
        assert!(
            st.model.dir.starts_with(model_path),
            "{file}: model.dir under {model_path}"
        );
        let bank = st.detector.bank.clone().expect("detector.bank set");
        assert!(
            bank.starts_with(model_path),
            "{file}: detector.bank under {model_path}"
        );
        assert_eq!(
            vol(s(models, "name"))["persistentVolumeClaim"]["readOnly"],
            true
        );
        // TLS only, with the CA from a Secret mounted read-only where nats.tls_ca points.
        assert!(st.nats.tls_required, "{file}: nats.tls_required");
        assert!(st.nats.servers.iter().all(|u| u.starts_with("tls://")));
        let tls = mount_of(&|v| v["secret"]["secretName"] == "oodgate-nats-tls");
        assert_eq!(tls["readOnly"], true, "{file}: TLS volume read-only");
        let ca = st.nats.tls_ca.clone().expect("nats.tls_ca set");
        assert!(
            ca.starts_with(s(tls, "mountPath")),
            "{file}: nats.tls_ca {} under the TLS Secret's mount",
            ca.display()
        );
        // Probes on the metrics port, which is http.listen's port.
        let port = st.http.listen_addr().expect("listen").port();
        let ports = get(c, "ports").as_array().expect("ports");
        let metrics = ports
            .iter()
            .find(|p| p["name"] == "metrics")
            .expect("metrics port");
        assert_eq!(
            metrics["containerPort"].as_u64(),
            Some(u64::from(port)),
            "{file}"
        );
        assert!(
            st.http.listen.starts_with("0.0.0.0:"),
            "{file}: listen on all interfaces"
        );
        assert_eq!(s(c, "livenessProbe.httpGet.path"), "/healthz", "{file}");
        assert_eq!(s(c, "readinessProbe.httpGet.path"), "/readyz", "{file}");
        assert_eq!(s(c, "livenessProbe.httpGet.port"), "metrics", "{file}");
        assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object());
        assert_eq!(get(pod, "securityContext.runAsNonRoot"), true, "{file}");
    }
}

#[test]
fn service_and_pdb_select_the_workers() {
    let d = one("deploy/k8s/deployment.yaml");
    let labels = get(&d, "spec.template.metadata.labels")
        .as_object()
        .expect("labels")
        .clone();
    let svc = one("deploy/k8s/service.yaml");
    let port = get(&svc, "spec.ports.0");
    assert_eq!(port["port"], 9464);
    for (k, v) in get(&svc, "spec.selector").as_object().expect("selector") {
        assert_eq!(labels.get(k), Some(v), "service selector {k}");
    }
    let pdb = one("deploy/k8s/pdb.yaml");
    for (k, v) in get(&pdb, "spec.selector.matchLabels")
        .as_object()
        .expect("selector")
    {
        assert_eq!(labels.get(k), Some(v), "pdb selector {k}");
    }
    assert!(pdb["spec"]["maxUnavailable"].is_number() || pdb["spec"]["minAvailable"].is_number());
}

#[test]
fn keda_scales_the_deployment_on_the_durable_consumer() {
    let so = one("deploy/k8s/keda-scaledobject.yaml");
    let d = one("deploy/k8s/deployment.yaml");
    assert_eq!(s(&so, "spec.scaleTargetRef.name"), s(&d, "metadata.name"));
    let t = get(&so, "spec.triggers.0");
    assert_eq!(s(t, "type"), "nats-jetstream");
    let env = k8s_env(get(&d, "spec.template.spec.containers.0"));
    let st = settings_from(&configmap_toml(), env, "configmap + deployment env");
    let m = get(t, "metadata");
    for k in [
        "natsServerMonitoringEndpoint",
        "account",
        "stream",
        "consumer",
        "lagThreshold",
    ] {
        assert!(!s(m, k).is_empty(), "trigger metadata {k}");
    }
    assert_eq!(s(m, "stream"), st.input.stream);
    assert_eq!(s(m, "consumer"), st.input.durable);
    assert!(s(m, "lagThreshold").parse::<u64>().is_ok_and(|n| n > 0));
    assert!(s(m, "natsServerMonitoringEndpoint").ends_with(":8222"));
    // The account exists in the NATS configuration, with JetStream.
    let conf = read("deploy/nats/nats-server.conf");
    assert!(
        conf.contains(&format!("  {} {{", s(m, "account"))),
        "account {} not in nats-server.conf",
        s(m, "account")
    );
    // max_ack_pending is shared by all replicas: the largest replica count must fit.
    let max = get(&so, "spec.maxReplicaCount")
        .as_i64()
        .expect("maxReplicaCount");
    assert!(
        max * st.input.pull_batch as i64 <= st.input.max_ack_pending,
        "maxReplicaCount {max} x input.pull_batch {} exceeds input.max_ack_pending {}",
        st.input.pull_batch,
        st.input.max_ack_pending
    );
}

// ---------------------------------------------------------------------------------------------
// Compose
// ---------------------------------------------------------------------------------------------

/// Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}` with nothing set.
fn interpolate(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').expect("closing brace");
        let inner = &after[..end];
        let default = inner
            .split_once(":-")
            .or_else(|| inner.split_once('-'))
            .map_or("", |(_, d)| d);
        out.push_str(default);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out.replace("$$", "$")
}

#[test]
fn compose_runs_a_nats_cluster_or_one_node_and_scalable_workers() {
    let doc = one("deploy/compose/docker-compose.yml");
    let services = get(&doc, "services").as_object().expect("services");
    let compose_dir = root().join("deploy/compose");
    let profiles = |name: &str| -> Vec<String> {
        services[name]["profiles"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect()
    };
    let top_volumes = doc["volumes"].as_object().cloned().unwrap_or_default();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (conf_path, _) = common::nats::shipped_conf(tmp.path());
    for node in ["nats-1", "nats-2", "nats-3", "nats"] {
        let svc = &services[node];
        assert!(s(svc, "image").starts_with("nats:2.10"), "{node}");
        let cmd: Vec<&str> = get(svc, "command")
            .as_array()
            .expect("command")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let flag = |f: &str| cmd.iter().position(|a| *a == f).map(|i| cmd[i + 1]);
        assert_eq!(flag("-c"), Some("/etc/nats/nats-server.conf"), "{node}");
        assert_eq!(flag("--name"), Some(node), "{node}");
        // The server accepts exactly these flags with the shared file (TLS files from
        // make-certs.sh).
        let out = nats_cmd_raw()
            .args(cmd.iter().map(|a| {
                if *a == "/etc/nats/nats-server.conf" {
                    conf_path.to_string_lossy().to_string()
                } else {
                    a.to_string()
                }
            }))
            .arg("-t")
            .output()
            .expect("nats-server -t");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("is valid"),
            "{node}: nats-server {} -t:\n{text}",
            cmd.join(" ")
        );
        if node == "nats" {
            assert_eq!(profiles(node), ["single"]);
        } else {
            assert_eq!(profiles(node), ["cluster"], "{node}");
            assert_eq!(flag("--cluster_name"), Some("oodgate"), "{node}");
            let routes = flag("--routes").expect("routes");
            for n in ["nats-1", "nats-2", "nats-3"] {
                assert!(
                    routes.contains(&format!("nats://{n}:6222")),
                    "{node}: route to {n}"
                );
            }
            assert!(
                svc["networks"]["default"]["aliases"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == "nats")),
                "{node} answers to `nats`"
            );
        }
        // The configuration file and a store volume are mounted.
        let vols: Vec<&str> = get(svc, "volumes")
            .as_array()
            .expect("volumes")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let conf = vols
            .iter()
            .find(|v| v.contains("/etc/nats/nats-server.conf"))
            .expect("conf mount");
        let host = conf.split(':').next().expect("host path");
        assert!(compose_dir.join(host).is_file(), "{node}: {host} missing");
        let store = vols
            .iter()
            .find(|v| v.ends_with(":/var/lib/nats"))
            .expect("store volume at the configuration's store_dir");
        let vol_name = store.split(':').next().expect("name");
        assert!(
            top_volumes.contains_key(vol_name),
            "{node}: volume {vol_name} not declared"
        );
        // The server gets the passwords its configuration references.
        for var in ["OODGATE_WORKER_PASSWORD", "OODGATE_PUBLISHER_PASSWORD"] {
            assert!(svc["environment"][var].is_string(), "{node}: {var}");
        }
        // ... and the TLS files where the configuration looks for them.
        assert!(
            vols.contains(&"../nats/tls:/etc/nats/tls:ro"),
            "{node}: TLS files not mounted"
        );
    }

    let w = &services["worker"];
    let mut p = profiles("worker");
    p.sort();
    assert_eq!(p, ["cluster", "single"]);
    assert!(
        w.get("ports").is_none(),
        "a published port would stop --scale worker=N"
    );
    assert!(
        w.get("container_name").is_none(),
        "container_name would stop --scale"
    );
    let ctx = compose_dir.join(s(w, "build.context"));
    assert!(
        ctx.join(s(w, "build.dockerfile")).is_file(),
        "worker Dockerfile"
    );
    assert_eq!(
        ctx.canonicalize().expect("context"),
        root().canonicalize().expect("root"),
        "the build context is the repository root"
    );
    let deps = get(w, "depends_on").as_object().expect("depends_on");
    for n in ["nats-1", "nats-2", "nats-3", "nats"] {
        assert!(deps.contains_key(n), "worker depends on {n}");
    }
    for v in get(w, "volumes").as_array().expect("volumes") {
        let v = v.as_str().expect("short syntax");
        assert!(v.ends_with(":ro"), "worker mount {v} must be read-only");
    }
    let grace = duration_secs(s(w, "stop_grace_period"));
    // Settings as the container sees them: the image's file plus this environment.
    let env: Vec<(String, String)> = get(w, "environment")
        .as_object()
        .expect("environment map")
        .iter()
        .map(|(k, v)| {
            assert!(k.starts_with("OODGATE__"), "worker env {k}");
            (k.clone(), interpolate(v.as_str().unwrap_or_default()))
        })
        .collect();
    let st = settings_from(&read("deploy/docker/oodgate.toml"), env, "compose worker");
    assert_eq!(st.nats.user.as_deref(), Some("worker"));
    assert!(st.nats.password.is_some());
    // TLS only, verified against the CA make-certs.sh writes (mounted read-only).
    assert!(st.nats.tls_required);
    assert!(st.nats.servers.iter().all(|u| u.starts_with("tls://")));
    assert_eq!(
        st.nats.tls_ca.as_deref(),
        Some(Path::new("/etc/nats/tls/ca.pem"))
    );
    assert!(grace > st.shutdown.drain_timeout.as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// Dockerfiles
// ---------------------------------------------------------------------------------------------

/// Instructions with continuation lines joined and comments dropped.
fn dockerfile(rel: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read(rel).lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (ins, args) = cur.split_once(' ').unwrap_or((cur.as_str(), ""));
        out.push((ins.to_ascii_uppercase(), args.trim().to_string()));
        cur.clear();
    }
    out
}

fn bin_name() -> String {
    let cargo: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    cargo["bin"]
        .as_array()
        .and_then(|b| b.first())
        .and_then(|b| b["name"].as_str())
        .map_or_else(|| "oodgate".to_string(), str::to_string)
}

fn args_of(ins: &[(String, String)]) -> BTreeMap<String, String> {
    ins.iter()
        .filter(|(i, _)| i == "ARG")
        .filter_map(|(_, a)| {
            a.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn check_dockerfile(rel: &str, package: &str, base_arg: &str, base_want: &[&str]) -> String {
    let ins = dockerfile(rel);
    let args = args_of(&ins);
    let bin = bin_name();
    let has = |i: &str, needle: &str| ins.iter().any(|(x, a)| x == i && a.contains(needle));

    // Stages: a rust:1.95-bookworm build with the C tools, the wheel stage, the runtime base.
    assert_eq!(
        args.get("RUST_IMAGE").map(String::as_str),
        Some("rust:1.95-bookworm"),
        "{rel}"
    );
    let base = args
        .get(base_arg)
        .unwrap_or_else(|| panic!("{rel}: ARG {base_arg}"));
    for w in base_want {
        assert!(base.contains(w), "{rel}: runtime base {base} lacks {w}");
    }
    let froms: Vec<&str> = ins
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(froms.len(), 3, "{rel}: wheel, build and runtime stages");
    assert!(
        froms
            .iter()
            .any(|f| f.starts_with("${RUST_IMAGE} AS build")),
        "{rel}"
    );
    assert!(
        froms
            .last()
            .is_some_and(|f| f.starts_with(&format!("${{{base_arg}}}"))),
        "{rel}"
    );
    assert!(
        has("RUN", "cmake") && has("RUN", "nasm") && has("RUN", "pkg-config"),
        "{rel}"
    );
    assert!(has("RUN", "cargo build --release --locked"), "{rel}");

    // ONNX Runtime: the pinned wheel, unpacked into /opt/oodgate/lib.
    let ort = args.get("ORT_VERSION").expect("ARG ORT_VERSION");
    assert_eq!(
        ort,
        oodgate::model::runtime::ORT_VERSION,
        "{rel}: ORT version"
    );
    assert!(
        has("RUN", &format!("'{package}==%s")),
        "{rel}: {package}==$ORT_VERSION"
    );
    assert!(
        has("RUN", "pip download") && has("RUN", "--require-hashes"),
        "{rel}"
    );
    assert!(has("RUN", "/opt/oodgate/lib"), "{rel}");

    // The binary, the entry point and the command.
    assert!(
        has("COPY", &format!("/usr/local/bin/{bin}")),
        "{rel}: binary path"
    );
    let entry = ins
        .iter()
        .find(|(i, _)| i == "ENTRYPOINT")
        .expect("ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(&entry.1).expect("exec-form ENTRYPOINT");
    assert_eq!(entry, std::slice::from_ref(&bin), "{rel}");
    let cmd = ins.iter().find(|(i, _)| i == "CMD").expect("CMD");
    let cmd: Vec<String> = serde_json::from_str(&cmd.1).expect("exec-form CMD");
    assert_eq!(
        cmd,
        ["serve", "--config", "/etc/oodgate/oodgate.toml"],
        "{rel}"
    );
    assert!(
        has("EXPOSE", "9464") && has("HEALTHCHECK", "/healthz"),
        "{rel}"
    );
    let user = ins.iter().rev().find(|(i, _)| i == "USER").expect("USER");
    assert!(
        user.1
            .split(':')
            .next()
            .and_then(|u| u.parse::<u32>().ok())
            .is_some_and(|u| u > 0),
        "{rel}: numeric non-root USER"
    );

    // COPY sources from the context exist and pass the dockerignore allow-list.
    let ignore = read("deploy/docker/dockerignore.txt");
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    let mut copied = BTreeSet::new();
    let mut config_file = None;
    for (i, a) in &ins {
        if i != "COPY" || a.contains("--from=") {
            continue;
        }
        let parts: Vec<&str> = a
            .split_whitespace()
            .filter(|p| !p.starts_with("--"))
            .collect();
        let (dest, srcs) = parts.split_last().expect("COPY src.. dest");
        for src in srcs {
            let src = src.trim_end_matches('/');
            assert!(root().join(src).exists(), "{rel}: COPY {src}: no such file");
            assert!(
                allowed
                    .iter()
                    .any(|a| src == *a || src.starts_with(&format!("{a}/"))),
                "{rel}: COPY {src} is excluded by deploy/docker/dockerignore.txt"
            );
            copied.insert(src.split('/').next().unwrap_or(src).to_string());
            if *dest == "/etc/oodgate/oodgate.toml" {
                config_file = Some(src.to_string());
            }
        }
    }
    // Cargo needs every declared target's file, and src/ may include files from elsewhere.
    let cargo: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    for (kind, dir) in [
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        for t in cargo
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let path = t.get("path").and_then(|p| p.as_str()).unwrap_or(dir);
            let top = path.split('/').next().unwrap_or(path);
            assert!(
                copied.contains(top),
                "{rel}: Cargo.toml declares a {kind} in {top}/; COPY it"
            );
        }
    }
    for entry in walkdir::WalkDir::new(root().join("src")) {
        let entry = entry.expect("walk src");
        if entry.path().extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).expect("read src");
        for mac in ["include_str!(\"", "include_bytes!(\""] {
            for (i, _) in text.match_indices(mac) {
                let arg = &text[i + mac.len()..];
                let Some(end) = arg.find('"') else { continue };
                let target = entry.path().parent().expect("dir").join(&arg[..end]);
                let target = target.canonicalize().expect("included file exists");
                let rel_t = target
                    .strip_prefix(root().canonicalize().expect("root"))
                    .expect("inside");
                let top = rel_t.components().next().expect("component");
                let top = top.as_os_str().to_string_lossy().to_string();
                assert!(
                    copied.contains(&top),
                    "{rel}: {} includes {}; COPY {top}/",
                    entry.path().display(),
                    rel_t.display()
                );
            }
        }
    }
    config_file.unwrap_or_else(|| panic!("{rel}: no COPY to /etc/oodgate/oodgate.toml"))
}

#[test]
fn dockerfiles_build_the_binary_and_copy_files_that_exist() {
    let cpu = check_dockerfile(
        "deploy/docker/Dockerfile",
        "onnxruntime",
        "RUNTIME_IMAGE",
        &["debian:bookworm-slim"],
    );
    let st = settings_from(&read(&cpu), Vec::new(), &cpu);
    assert!(
        st.http.listen.starts_with("0.0.0.0:9464"),
        "{cpu}: listen for the health check"
    );
    let ort = st.model.ort_library.clone().expect("ort_library");
    assert!(ort.starts_with("/opt/oodgate/lib"));
    assert!(
        ort.to_string_lossy()
            .ends_with(oodgate::model::runtime::ORT_VERSION)
    );

    let gpu = check_dockerfile(
        "deploy/docker/Dockerfile.cuda",
        "onnxruntime-gpu",
        "CUDA_IMAGE",
        &["nvidia/cuda:13", "cudnn", "runtime"],
    );
    let st = settings_from(&read(&gpu), Vec::new(), &gpu);
    assert_eq!(st.model.device, "cuda");
    assert!(st.http.listen.starts_with("0.0.0.0:9464"));
    assert!(read("deploy/docker/Dockerfile.cuda").contains("libonnxruntime_providers_cuda.so"));
}

#[test]
fn dockerignore_copies_are_identical() {
    let main = read("deploy/docker/dockerignore.txt");
    assert!(main.contains("repository root") || main.contains("REPOSITORY ROOT"));
    for copy in ["Dockerfile.dockerignore", "Dockerfile.cuda.dockerignore"] {
        assert_eq!(
            read(&format!("deploy/docker/{copy}")),
            main,
            "deploy/docker/{copy} must be a copy of dockerignore.txt"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------------

fn unit(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut section = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("oodgate.service line {}: not key=value: {line}", n + 1));
        assert!(!section.is_empty(), "line {}: key outside a section", n + 1);
        out.entry(section.clone())
            .or_default()
            .push((k.trim().to_string(), v.trim().to_string()));
    }
    out
}

#[test]
fn systemd_unit_runs_the_worker_and_drains_on_stop() {
    let text = read("deploy/systemd/oodgate.service");
    let u = unit(&text);
    let val = |sec: &str, k: &str| -> String {
        u.get(sec)
            .and_then(|kv| kv.iter().rev().find(|(kk, _)| kk == k))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("[{sec}] {k} missing"))
    };
    assert!(u.contains_key("Unit") && u.contains_key("Service") && u.contains_key("Install"));
    let exec = val("Service", "ExecStart");
    assert!(
        exec.starts_with(&format!("/usr/local/bin/{} serve", bin_name())),
        "{exec}"
    );
    assert!(
        exec.contains("--config /etc/oodgate/oodgate.toml"),
        "{exec}"
    );
    assert_eq!(val("Service", "Restart"), "on-failure");
    assert_eq!(val("Service", "KillSignal"), "SIGTERM");
    assert!(val("Service", "EnvironmentFile").contains("/etc/oodgate/"));
    assert!(val("Service", "User") != "root");
    let stop = duration_secs(&val("Service", "TimeoutStopSec"));
    let drain = Settings::default().shutdown.drain_timeout.as_secs_f64();
    assert!(
        stop > drain,
        "TimeoutStopSec {stop}s must exceed shutdown.drain_timeout {drain}s"
    );
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictSUIDSGID", "yes"),
    ] {
        assert_eq!(val("Service", k), v, "[Service] {k}");
    }
    assert_eq!(val("Install", "WantedBy"), "multi-user.target");

    // systemd's own parser, where available (it needs no running systemd): no warnings.
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("note: systemd-analyze not installed; skipped `systemd-analyze verify`");
        return;
    };
    if !out.status.success() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let copy = dir.path().join("oodgate.service");
    // verify checks that ExecStart's binary exists: point it at one that does.
    std::fs::write(
        &copy,
        text.replace(
            &format!("ExecStart=/usr/local/bin/{}", bin_name()),
            "ExecStart=/bin/true",
        ),
    )
    .expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("oodgate.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// NATS server configuration
// ---------------------------------------------------------------------------------------------

const WORKER_PASSWORD: &str = "worker-test-password";
const PUBLISHER_PASSWORD: &str = "publisher-test-password";

fn nats_server() -> PathBuf {
    let mut candidates = vec![PathBuf::from("/usr/sbin/nats-server")];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    candidates.push(root().join(".venv/bin/nats-server"));
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("nats-server not found (looked in /usr/sbin and PATH): run deploy/setup/system-deps.sh")
    })
}

/// nats-server with the passwords the configuration references in its environment.
fn nats_cmd_raw() -> Command {
    let mut c = Command::new(nats_server());
    c.env("OODGATE_WORKER_PASSWORD", WORKER_PASSWORD)
        .env("OODGATE_PUBLISHER_PASSWORD", PUBLISHER_PASSWORD);
    c
}

/// nats-server with the shipped configuration, its TLS files issued into `dir`.
fn nats_cmd(dir: &Path) -> Command {
    let mut c = nats_cmd_raw();
    c.arg("-c").arg(common::nats::shipped_conf(dir).0);
    c
}

#[test]
fn nats_server_accepts_the_configuration() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = nats_cmd(tmp.path())
        .arg("-t")
        .output()
        .expect("run nats-server -t");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is valid"),
        "nats-server -c deploy/nats/nats-server.conf -t failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The passwords are not in the file: without them the server refuses to start.
    let out = Command::new(nats_server())
        .arg("-c")
        .arg(common::nats::shipped_conf(tmp.path()).0)
        .arg("-t")
        .env_remove("OODGATE_WORKER_PASSWORD")
        .env_remove("OODGATE_PUBLISHER_PASSWORD")
        .output()
        .expect("run nats-server -t");
    assert!(
        !out.status.success(),
        "the config must reference the passwords, not contain them"
    );
}

#[test]
fn nats_permissions_name_oodgate_default_subjects() {
    let conf = read("deploy/nats/nats-server.conf");
    let st = Settings::default();
    let (stream, durable) = (&st.input.stream, &st.input.durable);
    let mut want: Vec<String> = st
        .output_subjects()
        .all()
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect();
    want.extend([
        format!("\"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}\""),
        format!("\"{}.>\"", st.ack_subject_prefix()),
        format!("\"$JS.API.STREAM.INFO.{stream}\""),
        format!("\"$JS.API.STREAM.INFO.{}\"", st.output.stream),
        format!("\"$JS.API.CONSUMER.INFO.{stream}.{durable}\""),
        format!("\"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>\""),
        format!(
            "\"$JS.API.STREAM.INFO.OBJ_{}\"",
            st.input.object_store_bucket
        ),
        "\"_INBOX_worker.>\"".to_string(),
        "\"_INBOX_publisher.>\"".to_string(),
    ]);
    want.extend(st.input.subjects.iter().map(|s| format!("\"{s}\"")));
    for w in want {
        assert!(conf.contains(&w), "nats-server.conf lacks {w}");
    }
    assert!(conf.contains("jetstream: enabled") && conf.contains("store_dir"));
    assert!(conf.contains("user: worker") && conf.contains("user: publisher"));
    // Every key of the config documentation table is reachable; the worker's file uses the
    // same stream names as the defaults the permissions were written for.
    assert!(KEYS.iter().any(|k| k.key == "input.durable"));
}

/// A nats-server started with deploy/nats/nats-server.conf on free loopback ports, with the
/// passwords it references.
fn start_server() -> common::nats::NatsServer {
    common::nats::NatsServer::start_shipped(&[
        ("OODGATE_WORKER_PASSWORD", WORKER_PASSWORD),
        ("OODGATE_PUBLISHER_PASSWORD", PUBLISHER_PASSWORD),
    ])
}

async fn connect(
    server: &common::nats::NatsServer,
    user: &str,
    password: &str,
) -> async_nats::jetstream::Context {
    // Each user's own reply prefix, as the configuration requires; TLS with the server's CA.
    let url = server.url();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(format!("_INBOX_{user}"))
        .add_root_certificates(server.ca.clone().expect("the shipped server serves TLS"))
        .connect(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
    // Denied requests get no reply: keep their timeouts short.
    async_nats::jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client)
}

/// The worker and the producer do what `oodgate serve` and `oodgate publish` do (the same
/// async-nats calls as src/stream/setup.rs, src/cli/publish.rs and the claim-check fetch) with
/// the configuration's users, and are refused what they should not do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_users_can_do_their_jobs_and_no_more() {
    use async_nats::jetstream::{self, consumer::pull, object_store, stream};
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;

    let server = start_server();
    let url = server.url();
    let st = Settings::default();
    let out = st.output_subjects();
    let worker = connect(&server, "worker", WORKER_PASSWORD).await;
    let publisher = connect(&server, "publisher", PUBLISHER_PASSWORD).await;
    let ca = server.ca.clone().expect("CA");

    // A wrong password is refused.
    let bad = async_nats::ConnectOptions::with_user_and_password("worker".into(), "nope".into())
        .add_root_certificates(ca.clone())
        .connect(&url)
        .await;
    assert!(bad.is_err(), "wrong password accepted");
    // TLS only: a client that insists on plain text is refused, and one that does not trust
    // the CA cannot complete the handshake. Neither gets as far as sending its password.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("tcp");
    raw.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut info = [0u8; 4096];
    let n = std::io::Read::read(&mut raw, &mut info).expect("INFO");
    let info = String::from_utf8_lossy(&info[..n]);
    assert!(info.contains("\"tls_required\":true"), "{info}");
    std::io::Write::write_all(
        &mut raw,
        format!("CONNECT {{\"user\":\"worker\",\"pass\":\"{WORKER_PASSWORD}\"}}\r\nPING\r\n")
            .as_bytes(),
    )
    .expect("write");
    let mut reply = Vec::new();
    let _ = std::io::Read::read_to_end(&mut raw, &mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        !reply.contains("PONG"),
        "a plain-text client was served: {reply}"
    );
    let untrusted =
        async_nats::ConnectOptions::with_user_and_password("worker".into(), WORKER_PASSWORD.into())
            .connect(&url)
            .await;
    assert!(untrusted.is_err(), "connected without trusting the CA");

    // Worker start-up: both streams and the durable consumer (as setup::declare does).
    let input = worker
        .get_or_create_stream(stream::Config {
            name: st.input.stream.clone(),
            subjects: st.input.subjects.clone(),
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("worker creates the input stream");
    worker
        .get_or_create_stream(stream::Config {
            name: st.output.stream.clone(),
            subjects: out.all().iter().map(|s| s.to_string()).collect(),
            storage: stream::StorageType::File,
            duplicate_window: st.output.duplicate_window,
            ..Default::default()
        })
        .await
        .expect("worker creates the output stream");
    let consumer: jetstream::consumer::PullConsumer = input
        .get_or_create_consumer(
            &st.input.durable,
            pull::Config {
                durable_name: Some(st.input.durable.clone()),
                filter_subject: st.input.filter_subject.clone(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: st.input.ack_wait,
                max_deliver: st.input.max_deliver,
                max_ack_pending: st.input.max_ack_pending,
                ..Default::default()
            },
        )
        .await
        .expect("worker creates the durable consumer");
    let mut c2 = consumer.clone();
    c2.info().await.expect("worker reads consumer info");

    // Producer: find the stream by subject, publish an image, store a large one by claim check.
    publisher
        .stream_by_subject(st.input.filter_subject.clone())
        .await
        .expect("publisher finds the input stream");
    publisher
        .publish(st.input.filter_subject.clone(), "image-bytes".into())
        .await
        .expect("publish")
        .await
        .expect("publisher gets the PubAck");
    let bucket = publisher
        .create_object_store(object_store::Config {
            bucket: st.input.object_store_bucket.clone(),
            ..Default::default()
        })
        .await
        .expect("publisher creates the bucket");
    let big = vec![7u8; 300 * 1024]; // three chunks
    bucket
        .put("big.jpg", &mut big.as_slice())
        .await
        .expect("publisher stores an object");
    // No purge right: the publisher cannot erase chunks (replacing an object needs it).
    assert!(
        publisher
            .get_stream(format!("OBJ_{}", st.input.object_store_bucket))
            .await
            .expect("bucket stream info")
            .purge()
            .await
            .is_err(),
        "publisher could purge the bucket"
    );

    // Worker: pull, publish the decision with a message ID, double-ack.
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .expect("worker pulls");
    let msg = batch.next().await.expect("a message").expect("message ok");
    assert_eq!(msg.payload.as_ref(), b"image-bytes");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "IMAGES:1:test");
    worker
        .publish_with_headers(out.ood.clone(), headers, msg.payload.clone())
        .await
        .expect("publish decision")
        .await
        .expect("worker gets the PubAck for its decision");
    msg.double_ack().await.expect("worker double-acks");
    // Dead-lettering after max_deliver reads the original by its stream sequence.
    let raw = input
        .get_raw_message(1)
        .await
        .expect("worker reads an input message by sequence");
    assert_eq!(raw.payload.as_ref(), b"image-bytes");
    worker
        .publish(out.dlq.clone(), "dead".into())
        .await
        .expect("publish dlq")
        .await
        .expect("worker publishes to the DLQ");

    // Worker: fetch the claim-checked object.
    let store = worker
        .get_object_store(&st.input.object_store_bucket)
        .await
        .expect("worker opens the bucket");
    let mut obj = store
        .get("big.jpg")
        .await
        .expect("worker reads object info");
    let mut got = Vec::new();
    obj.read_to_end(&mut got)
        .await
        .expect("worker reads the chunks");
    assert_eq!(got, big);

    // Refused: the worker may not publish images, delete streams or write objects.
    let denied = worker
        .publish(st.input.filter_subject.clone(), "x".into())
        .await;
    let denied = match denied {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(denied, "worker could publish into the input stream");
    assert!(
        worker.delete_stream(&st.input.stream).await.is_err(),
        "worker deleted a stream"
    );
    assert!(
        store.put("evil.jpg", &mut b"x".as_slice()).await.is_err(),
        "worker could write to the bucket"
    );
    // Refused: the producer may not read the consumer nor publish decisions.
    let pstream = publisher.get_stream(&st.input.stream).await.expect("info");
    assert!(
        pstream
            .get_consumer::<pull::Config>(&st.input.durable)
            .await
            .is_err(),
        "publisher could read the worker's consumer"
    );
    let forged = match publisher.publish(out.id.clone(), "x".into()).await {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(forged, "publisher could publish a decision");
    // Refused: the producer may not listen to the worker's replies (pulled images, API
    // answers); the server reports the violation on the connection.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let spy = async_nats::ConnectOptions::with_user_and_password(
        "publisher".into(),
        PUBLISHER_PASSWORD.into(),
    )
    .custom_inbox_prefix("_INBOX_publisher")
    .add_root_certificates(ca.clone())
    .event_callback(move |ev| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(ev.to_string());
        }
    })
    .connect(&url)
    .await
    .expect("publisher connects");
    // The worker's prefix, and the shared default one workers used before per-user prefixes.
    for inbox in ["_INBOX_worker.>", "_INBOX.>"] {
        let _sub = spy.subscribe(inbox).await.expect("subscribe call");
        spy.flush().await.expect("flush");
        let violation = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(ev) = rx.recv().await {
                if ev.to_lowercase().contains("permissions violation") {
                    return ev;
                }
            }
            String::new()
        })
        .await
        .unwrap_or_default();
        assert!(
            violation.contains(inbox.trim_end_matches(".>")),
            "publisher could subscribe to {inbox}: {violation:?}"
        );
    }
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// deploy/setup/system-deps.sh: fails early, naming what is missing
// ---------------------------------------------------------------------------------------------

/// Runs system-deps.sh with a PATH of only `fakes` (shell scripts: name → body) plus links to
/// the real tools it needs, so each missing prerequisite can be simulated, root or not.
fn system_deps_with(fakes: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    for tool in ["sed", "grep", "cat", "dirname", "env"] {
        let real = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not found"));
        std::os::unix::fs::symlink(real, dir.path().join(tool)).unwrap();
    }
    for (name, body) in fakes {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
        let mut perm = std::fs::metadata(&p).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&p, perm).unwrap();
    }
    let out = Command::new("/bin/bash")
        .arg(root().join("deploy/setup/system-deps.sh"))
        .env_clear()
        .env("PATH", dir.path())
        .env("FAKE_LOG", dir.path().join("calls.log"))
        .output()
        .expect("run system-deps.sh");
    let calls = std::fs::read_to_string(dir.path().join("calls.log")).unwrap_or_default();
    (
        out.status.code().unwrap_or(-1),
        format!("{}{calls}", String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn setup_fails_early_naming_the_missing_prerequisite() {
    let rust = [
        ("cargo", "exit 0"),
        ("rustc", "echo 'rustc 1.95.0 (x 2026-04-14)'"),
    ];
    let python = ("python3", "exit 0");
    let installed = ("dpkg-query", "echo 'install ok installed'");
    let missing = ("dpkg-query", "exit 1");
    let user = ("id", "echo 1000");
    let log = |name: &str| format!("echo \"{name} $*\" >> \"$FAKE_LOG\"");
    let apt = ("apt-get", log("apt-get"));
    let sudo = ("sudo", format!("{}; \"$@\"", log("sudo")));

    let (rc, err) = system_deps_with(&[python]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("Rust is required (cargo not found)"), "{err}");

    let (rc, err) = system_deps_with(&rust);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("Python 3 is required"), "{err}");

    let old = [
        ("cargo", "exit 0"),
        ("rustc", "echo 'rustc 1.80.1'"),
        python,
    ];
    let (rc, err) = system_deps_with(&old);
    assert_eq!(rc, 1, "{err}");
    assert!(
        err.contains("Rust >= 1.92 is required (found rustc 1.80.1)"),
        "{err}"
    );

    // Everything installed: nothing to do, no apt-get, no sudo.
    let (rc, err) = system_deps_with(&[rust[0], rust[1], python, installed, user]);
    assert_eq!((rc, err.as_str()), (0, ""));

    // Packages missing, no apt-get: the packages are named.
    let (rc, err) = system_deps_with(&[rust[0], rust[1], python, missing]);
    assert_eq!(rc, 1, "{err}");
    assert!(
        err.contains("apt-get not found") && err.contains("nats-server"),
        "{err}"
    );

    // A normal user without sudo: says that root is needed, and for what.
    let (rc, err) = system_deps_with(&[rust[0], rust[1], python, missing, user, (apt.0, &apt.1)]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("needs root") && err.contains("cmake"), "{err}");

    // A normal user with sudo: apt-get runs through sudo; root: directly.
    let (rc, err) = system_deps_with(&[
        rust[0],
        rust[1],
        python,
        missing,
        user,
        (apt.0, &apt.1),
        (sudo.0, &sudo.1),
    ]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        err.contains("sudo apt-get install -y -q build-essential cmake nasm"),
        "{err}"
    );
    let (rc, err) = system_deps_with(&[
        rust[0],
        rust[1],
        python,
        missing,
        ("id", "echo 0"),
        (apt.0, &apt.1),
        (sudo.0, &sudo.1),
    ]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        err.contains("apt-get install") && !err.contains("sudo"),
        "{err}"
    );
}
