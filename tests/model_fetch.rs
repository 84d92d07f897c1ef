//! `deploy/model/fetch_model.py download` (and `prepare_model.sh`'s cache steps) against a
//! local HTTP server that plays the model hub: the real download code path with a fake origin.
//!
//! The served "repository" is the tiny random-weight CLIP with its tensors renamed to the
//! Hugging Face names (`pixel_values` -> `image_embeds`, `input_ids` -> `text_embeds`), laid
//! out like the hub: `<hub>/Xenova/clip-vit-base-patch32/resolve/main/onnx/*.onnx`. The
//! manifest is the shipped Xenova one with `embed_dim = 64`. The server supports Range
//! requests and, when told through its environment, cuts the first response for each file
//! short, ignores Range, or announces a wrong SHA-256.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const REPO: &str = "Xenova/clip-vit-base-patch32";

/// A hub stand-in: serves a folder over HTTP/1.1 with Range support. Environment:
/// FIXTURE_CUT_AFTER=N sends only N bytes of the first response for each path, then hangs
/// up (the full length was announced); FIXTURE_IGNORE_RANGE=1 always answers 200 with the
/// whole file; FIXTURE_BAD_ETAG=1 announces a wrong SHA-256 (X-Linked-Etag, as the hub
/// does); FIXTURE_LOG=FILE appends "GET <path> <Range or ->" per request. Prints its port.
const SERVER_PY: &str = r#"
import hashlib, http.server, os, re, sys, threading, urllib.parse
root = os.path.realpath(sys.argv[1])
cut = int(os.environ.get("FIXTURE_CUT_AFTER", "0"))
ignore_range = os.environ.get("FIXTURE_IGNORE_RANGE") == "1"
bad_etag = os.environ.get("FIXTURE_BAD_ETAG") == "1"
log_path = os.environ.get("FIXTURE_LOG")
cut_done, lock = set(), threading.Lock()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        rng = self.headers.get("Range")
        if log_path:
            with lock, open(log_path, "a") as f:
                f.write(f"GET {path} {rng or '-'}\n")
        full = os.path.realpath(os.path.join(root, path.lstrip("/")))
        if not full.startswith(root + os.sep) or not os.path.isfile(full):
            self.send_error(404)
            return
        with open(full, "rb") as f:
            data = f.read()
        n, start, end, status = len(data), 0, len(data) - 1, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and not ignore_range:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else n - 1, n - 1)
            if start >= n:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{n}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:end + 1]
        sha = hashlib.sha256(b"not the file" if bad_etag else data).hexdigest()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{n}")
        self.end_headers()
        with lock:
            cut_now = cut > 0 and path not in cut_done and len(body) > cut
            if cut_now:
                cut_done.add(path)
        if cut_now:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// Builds the served tree from the tiny model: the good repository (Hugging Face tensor
/// names), test/wrong-names (the tiny model as is) and test/random-bytes (noise for the
/// image tower), plus the Xenova manifest with embed_dim = 64.
const BUILD_PY: &str = r#"
import os, random, shutil, sys
import onnx
tiny, hub, xenova_manifest, manifest_out = sys.argv[1:5]

def renamed(src, dst, names):
    m = onnx.load(src)
    g = m.graph
    for v in list(g.input) + list(g.output):
        v.name = names.get(v.name, v.name)
    for node in g.node:
        for i, x in enumerate(node.input):
            node.input[i] = names.get(x, x)
        for i, x in enumerate(node.output):
            node.output[i] = names.get(x, x)
    onnx.checker.check_model(m)
    onnx.save(m, dst)

def repo(name):
    d = os.path.join(hub, name, "resolve", "main", "onnx")
    os.makedirs(d, exist_ok=True)
    return d

good = repo("Xenova/clip-vit-base-patch32")
renamed(os.path.join(tiny, "image.onnx"), os.path.join(good, "vision_model.onnx"),
        {"image": "pixel_values", "embedding": "image_embeds"})
renamed(os.path.join(tiny, "text.onnx"), os.path.join(good, "text_model.onnx"),
        {"tokens": "input_ids", "embedding": "text_embeds"})
wrong = repo("test/wrong-names")
shutil.copy(os.path.join(tiny, "image.onnx"), os.path.join(wrong, "vision_model.onnx"))
shutil.copy(os.path.join(tiny, "text.onnx"), os.path.join(wrong, "text_model.onnx"))
noise = repo("test/random-bytes")
with open(os.path.join(noise, "vision_model.onnx"), "wb") as f:
    f.write(random.Random(0).randbytes(200_000))
shutil.copy(os.path.join(good, "text_model.onnx"), os.path.join(noise, "text_model.onnx"))
text = open(xenova_manifest, encoding="utf-8").read()
assert "\nembed_dim = 512\n" in text, "the shipped manifest changed; update this fixture"
with open(manifest_out, "w", encoding="utf-8") as f:
    f.write(text.replace("\nembed_dim = 512\n", "\nembed_dim = 64\n"))
"#;

struct Fixture {
    dir: PathBuf,
    hub: PathBuf,
    manifest: PathBuf,
}

impl Fixture {
    fn served(&self, repo: &str, file: &str) -> PathBuf {
        self.hub.join(repo).join("resolve/main/onnx").join(file)
    }
}

/// Built once per test run under the target's tmp folder.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let tiny = common::tiny_model();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("model_fetch");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("server.py"), SERVER_PY).unwrap();
        fs::write(dir.join("build.py"), BUILD_PY).unwrap();
        let f = Fixture {
            hub: dir.join("hub"),
            manifest: dir.join("manifest-64.toml"),
            dir,
        };
        let st = Command::new(common::python())
            .arg(f.dir.join("build.py"))
            .arg(&tiny)
            .arg(&f.hub)
            .arg(common::root().join("deploy/model/xenova-clip-vit-base-patch32.toml"))
            .arg(&f.manifest)
            .status()
            .expect("run the fixture builder");
        assert!(st.success(), "building the fixture hub failed");
        f
    })
}

/// The fake hub, killed on drop.
struct Server {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Server {
    fn start(tmp: &Path, env: &[(&str, &str)]) -> Server {
        let fx = fixture();
        let log = tmp.join("requests.log");
        let mut cmd = Command::new(common::python());
        cmd.arg(fx.dir.join("server.py"))
            .arg(&fx.hub)
            .env("FIXTURE_LOG", &log)
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the fixture server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("fixture server printed {line:?}, not a port"));
        Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    fn requests(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fetch_model() -> Command {
    let mut c = Command::new(common::python());
    c.arg(common::root().join("deploy/model/fetch_model.py"))
        .env_remove("OODGATE_HF_BASE")
        // the fake hub is on 127.0.0.1: never through a proxy from the environment
        .env("no_proxy", "*")
        .env("NO_PROXY", "*");
    c
}

fn download(base: &str, out: &Path, extra: &[&str]) -> Output {
    fetch_model()
        .arg("download")
        .arg("--manifest")
        .arg(&fixture().manifest)
        .arg("-o")
        .arg(out)
        .args([
            "--base-url",
            base,
            "--timeout",
            "10",
            "--retry-wait",
            "0.05",
        ])
        .args(extra)
        .output()
        .expect("run fetch_model.py")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "fetch_model.py exit status {:?}, expected {code}\nstderr:\n{}",
        o.status,
        stderr(o)
    );
}

fn listing(dir: &Path) -> BTreeSet<String> {
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

fn sha256_hex(path: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(path).unwrap()))
}

/// The installed folder holds exactly the two encoders, byte-identical to the served
/// files, and a model.toml whose [source] records them.
fn assert_installed(out: &Path) {
    let fx = fixture();
    let names: BTreeSet<String> = ["image.onnx", "model.toml", "text.onnx"]
        .map(String::from)
        .into();
    assert_eq!(listing(out), names, "files in {}", out.display());
    for (local, remote) in [
        ("image.onnx", "vision_model.onnx"),
        ("text.onnx", "text_model.onnx"),
    ] {
        assert!(
            fs::read(out.join(local)).unwrap() == fs::read(fx.served(REPO, remote)).unwrap(),
            "{local} differs from the served {remote}"
        );
    }
    let manifest: toml::Table = fs::read_to_string(out.join("model.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(manifest["weights"].as_str(), Some("pretrained"));
    assert_eq!(manifest["embed_dim"].as_integer(), Some(64));
    let source = manifest["source"].as_table().unwrap();
    assert_eq!(source["repo"].as_str(), Some(REPO));
    assert_eq!(source["revision"].as_str(), Some("main"));
    assert_eq!(
        source["commit"].as_str(),
        Some("0123456789abcdef0123456789abcdef01234567")
    );
    assert_eq!(
        source["image_file"].as_str(),
        Some("onnx/vision_model.onnx")
    );
    assert_eq!(
        source["image_sha256"].as_str().unwrap(),
        sha256_hex(&out.join("image.onnx"))
    );
    assert_eq!(
        source["text_sha256"].as_str().unwrap(),
        sha256_hex(&out.join("text.onnx"))
    );
}

/// Nothing usable is left: no model.toml, no encoder files, no partial downloads.
fn assert_nothing_installed(out: &Path) {
    let left = listing(out);
    assert!(
        left.is_empty(),
        "{} still holds {left:?} after a rejected download",
        out.display()
    );
}

#[test]
fn clean_download_gives_a_folder_oodgate_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(tmp.path(), &[]);
    let out = tmp.path().join("models/clip-vit-b-32");
    let o = download(&srv.base, &out, &[]);
    assert_exit(&o, 0);
    assert_installed(&out);

    let info = common::oodgate()
        .arg("info")
        .arg("--model")
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.status.success(),
        "oodgate info failed: {}\n{}",
        text,
        String::from_utf8_lossy(&info.stderr)
    );
    assert!(text.contains("weights: pretrained"), "{text}");
    assert!(text.contains("pixel_values -> image_embeds"), "{text}");
    assert!(text.contains("input_ids -> text_embeds"), "{text}");

    // idempotent: a second run finds the folder complete and downloads nothing
    let before = srv.requests().len();
    let o = download(&srv.base, &out, &[]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("already present"), "{}", stderr(&o));
    assert_eq!(srv.requests().len(), before, "the second run made requests");

    let check = fetch_model().arg("check").arg(&out).output().unwrap();
    assert_exit(&check, 0);
}

#[test]
fn truncated_response_is_resumed_with_range() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(tmp.path(), &[("FIXTURE_CUT_AFTER", "100000")]);
    let out = tmp.path().join("clip");
    let o = download(&srv.base, &out, &[]);
    assert_exit(&o, 0);
    assert_installed(&out);
    let reqs = srv.requests();
    for file in ["vision_model.onnx", "text_model.onnx"] {
        let path = format!("/{REPO}/resolve/main/onnx/{file}");
        assert!(
            reqs.contains(&format!("GET {path} -"))
                && reqs.contains(&format!("GET {path} bytes=100000-")),
            "expected a full request and a resume at byte 100000 for {file}: {reqs:?}"
        );
    }
}

#[test]
fn server_ignoring_range_restarts_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(
        tmp.path(),
        &[
            ("FIXTURE_CUT_AFTER", "100000"),
            ("FIXTURE_IGNORE_RANGE", "1"),
        ],
    );
    let out = tmp.path().join("clip");
    let o = download(&srv.base, &out, &[]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("ignored the Range"), "{}", stderr(&o));
    assert_installed(&out);
}

#[test]
fn partial_file_from_an_interrupted_run_is_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(tmp.path(), &[]);
    let out = tmp.path().join("clip");
    fs::create_dir_all(&out).unwrap();
    let source = fs::read(fixture().served(REPO, "vision_model.onnx")).unwrap();
    fs::write(out.join("image.onnx.part"), &source[..4096]).unwrap();
    let o = download(&srv.base, &out, &[]);
    assert_exit(&o, 0);
    assert!(
        srv.requests().contains(&format!(
            "GET /{REPO}/resolve/main/onnx/vision_model.onnx bytes=4096-"
        )),
        "{:?}",
        srv.requests()
    );
    assert_installed(&out);
}

#[test]
fn random_bytes_are_rejected_with_exit_3() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(tmp.path(), &[]);
    let out = tmp.path().join("clip");
    let o = download(&srv.base, &out, &["--repo", "test/random-bytes"]);
    assert_exit(&o, 3);
    let err = stderr(&o);
    assert!(
        err.contains("onnx/vision_model.onnx") && err.contains("cannot load"),
        "{err}"
    );
    assert_nothing_installed(&out);
}

#[test]
fn model_with_other_tensor_names_is_rejected_with_exit_3() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(tmp.path(), &[]);
    let out = tmp.path().join("clip");
    let o = download(&srv.base, &out, &["--repo", "test/wrong-names"]);
    assert_exit(&o, 3);
    let err = stderr(&o);
    assert!(
        err.contains("no input named 'pixel_values'") && err.contains("no input named 'input_ids'"),
        "{err}"
    );
    assert_nothing_installed(&out);
}

#[test]
fn content_not_matching_the_servers_sha256_is_rejected_with_exit_3() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(tmp.path(), &[("FIXTURE_BAD_ETAG", "1")]);
    let out = tmp.path().join("clip");
    let o = download(&srv.base, &out, &["--retries", "1"]);
    assert_exit(&o, 3);
    assert!(stderr(&o).contains("SHA-256"), "{}", stderr(&o));
    assert_nothing_installed(&out);
}

#[test]
fn unreachable_hub_exits_2_quickly() {
    let tmp = tempfile::tempdir().unwrap();
    // a port nobody listens on
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = tmp.path().join("clip");
    let t0 = Instant::now();
    let o = download(
        &format!("http://127.0.0.1:{port}"),
        &out,
        &["--connect-timeout", "2"],
    );
    assert_exit(&o, 2);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(stderr(&o).contains("not reachable"), "{}", stderr(&o));
    assert!(!out.exists(), "an unreachable hub left {}", out.display());

    // a hub that answers 404 (wrong repository) is "could not download" too
    let srv = Server::start(tmp.path(), &[]);
    let o = download(&srv.base, &out, &["--repo", "nobody/nothing"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("HTTP 404"), "{}", stderr(&o));
    assert_nothing_installed(&out);
}

/// prepare_model.sh's first two steps: OODGATE_MODEL, then a pretrained folder in the
/// cache (random-weight folders are skipped); the path is the last line of stdout.
#[test]
fn prepare_model_prefers_the_explicit_then_the_cached_model() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(tmp.path(), &[]);
    let models = tmp.path().join("models");
    let real = models.join("clip-vit-b-32");
    assert_exit(&download(&srv.base, &real, &[]), 0);
    // a random-weight folder sorted first must not be picked
    let random = models.join("a-random");
    fs::create_dir_all(&random).unwrap();
    for f in ["image.onnx", "text.onnx", "model.toml"] {
        fs::copy(common::tiny_model().join(f), random.join(f)).unwrap();
    }

    let prepare = |env: &[(&str, &Path)]| {
        let mut c = Command::new("bash");
        c.arg(common::root().join("deploy/model/prepare_model.sh"))
            .env_remove("OODGATE_MODEL")
            .env("OODGATE_OFFLINE", "1")
            .env("OODGATE_MODELS_DIR", &models);
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "prepare_model.sh failed:\n{}",
            stderr(&o)
        );
        let stdout = String::from_utf8(o.stdout).unwrap();
        let last = stdout.lines().last().unwrap_or_default().to_string();
        fs::canonicalize(&last).unwrap_or_else(|e| panic!("last stdout line {last:?}: {e}"))
    };
    assert_eq!(prepare(&[]), fs::canonicalize(&real).unwrap());
    assert_eq!(
        prepare(&[("OODGATE_MODEL", random.as_path())]),
        fs::canonicalize(&random).unwrap()
    );
}
