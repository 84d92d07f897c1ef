//! The daemon end to end against a real nats-server with JetStream: routing, dead letters,
//! claim checks, shared consumers, SIGKILL + restart, server restart, SIGTERM drain.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::nats::{Cluster, NatsServer, free_port};
use ndarray::Array2;
use oodgate::detect::bank::{Bank, BankMeta, OutlierRow};
use oodgate::detect::method::{Method, ScoreParams};
use oodgate::model::encoder::EncoderOptions;
use oodgate::model::pipeline::embed_image_files;
use oodgate::model::preprocess::Limits;
use oodgate::model::{Device, ModelManifest, OrtEncoder, Preprocessor};

const GOOD: [&str; 15] = [
    "astronaut.png",
    "bitmap.bmp",
    "camera-gray.png",
    "chelsea.jpg",
    "chelsea.webp",
    "clipart-rgba.png",
    "cmyk.jpg",
    "coffee.jpg",
    "frame.gif",
    "gray-alpha.png",
    "palette.png",
    "rocket.jpg",
    "tall.png",
    "tiny.png",
    "wide.jpg",
];
const BAD: [(&str, &str); 6] = [
    ("empty.jpg", "empty"),
    ("truncated.jpg", "corrupt"),
    ("not-an-image.txt", "not_image"),
    ("corrupt.png", "corrupt"),
    ("bomb.png", "too_many_pixels"),
    ("huge-dims.jpg", "too_many_pixels"),
];

/// A bank for the tiny model: three fixture images as "ID classes", two as outliers, and a
/// threshold at the median score of all fixtures, so both decisions occur.
fn make_bank(dir: &Path) -> (PathBuf, f64) {
    let model = common::tiny_model();
    let manifest = ModelManifest::load(&model).unwrap();
    let fingerprint = manifest.fingerprint().unwrap();
    let mut enc = OrtEncoder::load(
        manifest,
        EncoderOptions {
            device: Device::Cpu,
            intra_threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let pre = Preprocessor::from_manifest(enc.manifest(), Limits::default());
    let paths: Vec<PathBuf> = GOOD
        .iter()
        .map(|n| common::fixture("images").join(n))
        .collect();
    let e = embed_image_files(&mut enc, &pre, &paths, 8, 1, |_| {})
        .unwrap()
        .embeddings;
    let pick = |rows: &[usize]| {
        let mut a = Array2::<f32>::zeros((rows.len(), e.ncols()));
        for (i, &r) in rows.iter().enumerate() {
            a.row_mut(i).assign(&e.row(r));
        }
        a
    };
    let meta = BankMeta {
        format: 1,
        version: String::new(),
        created_by: "tests/stream.rs".into(),
        model_fingerprint: fingerprint,
        model_name: "tiny-random".into(),
        model_weights: "random".into(),
        dim: e.ncols(),
        id_labels: vec!["astronaut".into(), "cat".into(), "coffee".into()],
        id_wnids: vec![],
        outliers: ["rocket", "palette"]
            .iter()
            .map(|w| OutlierRow {
                kind: "label".into(),
                label: w.to_string(),
                words: vec![w.to_string()],
                detail: serde_json::Value::Null,
            })
            .collect(),
        theta: None,
        scale: None,
        build: serde_json::json!({}),
        cleaning: serde_json::Value::Null,
        thresholds: BTreeMap::new(),
        index: None,
    };
    let bank = Bank::new(meta, pick(&[0, 3, 7]), None, pick(&[11, 10])).unwrap();
    let params = ScoreParams::for_method(Method::Ole);
    let mut scores = bank
        .scorer(&params)
        .unwrap()
        .score_batch(e.view(), Method::Ole, &params)
        .unwrap();
    scores.sort_by(f64::total_cmp);
    let threshold = (scores[7] + scores[8]) / 2.0;
    let path = dir.join("test.oodb");
    bank.save(&path).unwrap();
    (path, threshold)
}

struct Worker {
    child: Child,
    http: u16,
}

/// `oodgate serve` on the test server with the tiny model, `bank` and `threshold`.
fn serve_cmd(
    servers: &str,
    bank: &Path,
    threshold: f64,
    http: u16,
    extra: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(common::oodgate_bin());
    cmd.arg("serve")
        .env("OODGATE__NATS__SERVERS", servers)
        .env("OODGATE__MODEL__DIR", common::tiny_model())
        .env("OODGATE__MODEL__DEVICE", "cpu")
        .env("OODGATE__MODEL__INTRA_THREADS", "1")
        .env("OODGATE__DETECTOR__BANK", bank)
        .env("OODGATE__DETECTOR__THRESHOLD", threshold.to_string())
        .env("OODGATE__HTTP__LISTEN", format!("127.0.0.1:{http}"))
        .env("OODGATE__BATCH__MAX_SIZE", "8")
        .env("OODGATE__BATCH__MAX_WAIT", "5ms")
        .env("OODGATE__INPUT__ACK_WAIT", "4s")
        .env("OODGATE__LOG__LEVEL", "info")
        .env("NO_COLOR", "1");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

impl Worker {
    fn start(nats: &NatsServer, bank: &Path, threshold: f64, extra: &[(&str, &str)]) -> Worker {
        Worker::start_on(&nats.url(), bank, threshold, extra)
    }

    /// A worker on `servers` (comma-separated URLs, e.g. every node of a cluster).
    fn start_on(servers: &str, bank: &Path, threshold: f64, extra: &[(&str, &str)]) -> Worker {
        let http = free_port();
        let mut cmd = serve_cmd(servers, bank, threshold, http, extra);
        // Not piped: a pipe nobody reads would block a chatty worker once it fills.
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().expect("spawn oodgate serve");
        let w = Worker { child, http };
        w.wait_ready();
        w
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let code = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default();
        Some((code, body))
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((200, _)) = self.get("/readyz") {
                return;
            }
            assert!(Instant::now() < deadline, "worker not ready within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn metric(&self, name: &str) -> f64 {
        self.get("/metrics")
            .map(|(_, body)| {
                body.lines()
                    .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                    .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
                    .sum()
            })
            .unwrap_or(0.0)
    }

    /// Waits up to 30 s until the adaptive memory holds `n` entries (`/metrics`).
    fn wait_adaptive_entries(&self, n: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.metric("oodgate_adaptive_entries") != n {
            assert!(
                Instant::now() < deadline,
                "adaptive memory holds {} entries, expected {n}",
                self.metric("oodgate_adaptive_entries")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A test client; credentials in the URL are used (the client library ignores them).
async fn test_connect(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    oodgate::stream::setup::with_url_credentials(
        async_nats::ConnectOptions::new(),
        &[url.to_string()],
    )
    .connect(url)
    .await
}

/// Publishes each payload to images.in (creating the input stream like the worker does).
fn publish(url: &str, payloads: &[(String, Vec<u8>)]) {
    rt().block_on(async {
        let client = test_connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "IMAGES".into(),
            subjects: vec!["images.in".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        for (name, bytes) in payloads {
            let mut h = async_nats::HeaderMap::new();
            h.insert("X-Name", name.as_str());
            js.publish_with_headers("images.in", h, bytes.clone().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
}

#[derive(Debug)]
struct Output {
    subject: String,
    headers: HashMap<String, String>,
    payload: Vec<u8>,
}

/// Waits until the output stream holds `n` messages (or the timeout), then reads them all.
fn outputs(url: &str, n: usize, timeout: Duration) -> Vec<Output> {
    rt().block_on(async {
        let client = test_connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            if let Ok(s) = js.get_stream("OODGATE_OUT").await {
                break s;
            }
            assert!(Instant::now() < deadline, "no output stream");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        loop {
            let have = stream.info().await.unwrap().state.messages as usize;
            if have >= n || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A little longer, so duplicates (which must not exist) would show up.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let state = stream.info().await.unwrap().state.clone();
        let mut out = Vec::new();
        for seq in state.first_sequence..=state.last_sequence {
            if state.messages == 0 {
                break;
            }
            let m = stream.get_raw_message(seq).await.unwrap();
            let headers = m
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        v.first().map(|x| x.to_string()).unwrap_or_default(),
                    )
                })
                .collect();
            out.push(Output {
                subject: m.subject.to_string(),
                headers,
                payload: m.payload.to_vec(),
            });
        }
        out
    })
}

fn good_payloads() -> Vec<(String, Vec<u8>)> {
    GOOD.iter()
        .map(|n| {
            (
                n.to_string(),
                std::fs::read(common::fixture("images").join(n)).unwrap(),
            )
        })
        .collect()
}

/// The good fixtures `k` times, named `<round>-<file>`.
fn good_payloads_times(k: usize) -> Vec<(String, Vec<u8>)> {
    (0..k)
        .flat_map(|r| {
            good_payloads()
                .into_iter()
                .map(move |(n, p)| (format!("{r}-{n}"), p))
        })
        .collect()
}

fn sources(outs: &[Output]) -> Vec<String> {
    let mut s: Vec<String> = outs
        .iter()
        .map(|o| o.headers.get("Oodgate-Source").cloned().unwrap_or_default())
        .collect();
    s.sort();
    s
}

#[test]
fn every_input_leaves_exactly_once_with_the_contract_headers() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let _w = Worker::start(&nats, &bank, threshold, &[]);
    let mut payloads = good_payloads();
    for (f, _) in BAD {
        payloads.push((
            f.to_string(),
            std::fs::read(common::fixture("bad").join(f)).unwrap(),
        ));
    }
    publish(&nats.url(), &payloads);
    let outs = outputs(&nats.url(), payloads.len(), Duration::from_secs(60));
    assert_eq!(
        outs.len(),
        payloads.len(),
        "every input produces exactly one output"
    );
    let mut uniq = sources(&outs);
    uniq.dedup();
    assert_eq!(uniq.len(), payloads.len(), "no duplicates");
    let by_name: HashMap<&str, &Output> = outs
        .iter()
        .map(|o| (o.headers["X-Name"].as_str(), o))
        .collect();
    let (mut id, mut ood) = (0, 0);
    for (name, bytes) in &payloads[..GOOD.len()] {
        let o = by_name[name.as_str()];
        assert_eq!(&o.payload, bytes, "{name}: payload forwarded unchanged");
        let decision = &o.headers["Oodgate-Decision"];
        let score: f64 = o.headers["Oodgate-Score"].parse().unwrap();
        assert_eq!(
            decision == "id",
            score >= threshold,
            "{name}: decision follows the threshold"
        );
        assert_eq!(o.subject, format!("oodgate.{decision}"));
        if decision == "id" {
            id += 1
        } else {
            ood += 1
        }
        assert_eq!(o.headers["Oodgate-Method"], "ole");
        assert!(["astronaut", "cat", "coffee"].contains(&o.headers["Oodgate-Top-Label"].as_str()));
        assert!(!o.headers["Oodgate-Nearest-Outliers"].is_empty());
        assert_eq!(o.headers["Oodgate-Bank"].len(), 16);
        assert_eq!(o.headers["Oodgate-Model"].len(), 64);
        assert!(o.headers["Oodgate-Source"].starts_with("IMAGES:"));
        assert!(o.headers["Oodgate-Threshold"].parse::<f64>().is_ok());
    }
    assert!(
        id > 0 && ood > 0,
        "both decisions occur (id {id}, ood {ood})"
    );
    for (name, kind) in BAD {
        let o = by_name[name];
        assert_eq!(o.subject, "oodgate.dlq", "{name}");
        assert_eq!(
            o.headers["Oodgate-Error-Kind"], kind,
            "{name}: {}",
            o.headers["Oodgate-Error"]
        );
        assert!(!o.headers["Oodgate-Error"].is_empty());
    }
}

/// `serve` and `score` decide through the same `Detector` code: on the same images, bank and
/// threshold they give the same scores (to the encoder's batch-size tolerance) and decisions.
#[test]
fn serve_and_score_agree_through_the_same_detector() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let _w = Worker::start(&nats, &bank, threshold, &[]);
    let payloads = good_payloads();
    publish(&nats.url(), &payloads);
    let outs = outputs(&nats.url(), payloads.len(), Duration::from_secs(60));
    assert_eq!(outs.len(), payloads.len());
    let paths: Vec<PathBuf> = GOOD
        .iter()
        .map(|n| common::fixture("images").join(n))
        .collect();
    let out = common::oodgate()
        .arg("score")
        .arg("--bank")
        .arg(&bank)
        .arg("--model")
        .arg(common::tiny_model())
        .args(["--device", "cpu", "--threads", "1", "--threshold"])
        .arg(threshold.to_string())
        .args(&paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), GOOD.len());
    for line in &lines {
        let input = line["input"].as_str().unwrap();
        let name = Path::new(input).file_name().unwrap().to_str().unwrap();
        let served = outs
            .iter()
            .find(|o| o.headers["X-Name"] == name)
            .unwrap_or_else(|| panic!("no output for {name}"));
        let served_score: f64 = served.headers["Oodgate-Score"].parse().unwrap();
        let score = line["score"].as_f64().unwrap();
        assert!(
            (served_score - score).abs() <= 1e-5 * score.abs().max(1e-12),
            "{name}: serve {served_score} vs score {score}"
        );
        assert_eq!(
            served.headers["Oodgate-Decision"],
            line["decision"].as_str().unwrap(),
            "{name}: same decision"
        );
        assert_eq!(
            served.headers["Oodgate-Bank"],
            line["bank_version"].as_str().unwrap()
        );
    }
}

/// `bytes` (a JPEG) grown to exactly `len` bytes with comment segments after SOI: still a
/// valid image.
fn pad_jpeg(bytes: &[u8], len: usize) -> Vec<u8> {
    assert!(bytes.starts_with(&[0xFF, 0xD8]) && len >= bytes.len());
    let mut out = bytes[..2].to_vec();
    let mut pad = len - bytes.len();
    while pad > 0 {
        // A segment is at least 4 bytes (marker + length) and at most 65,537.
        let seg = pad.min(65_537);
        let seg = if pad - seg > 0 && pad - seg < 4 {
            seg - 4
        } else {
            seg
        };
        assert!(seg >= 4, "cannot pad by {pad} bytes");
        let body = seg - 2;
        out.extend_from_slice(&[0xFF, 0xFE, (body >> 8) as u8, (body & 0xFF) as u8]);
        out.extend(std::iter::repeat_n(b'p', body - 2));
        pad -= seg;
    }
    out.extend_from_slice(&bytes[2..]);
    assert_eq!(out.len(), len);
    out
}

/// An image that fits the server's max_payload but whose output (payload + oodgate's
/// headers) does not: one `too_large` dead letter without the payload, the input acked,
/// never a redelivery loop.
#[test]
fn an_output_above_max_payload_is_dead_lettered_without_its_payload() {
    let max = 64 * 1024;
    let nats = NatsServer::start_with_conf(&format!("max_payload: {max}\n"));
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let _w = Worker::start(&nats, &bank, threshold, &[]);
    let jpeg = std::fs::read(common::fixture("images").join("chelsea.jpg")).unwrap();
    let big = pad_jpeg(&jpeg, max - 200);
    publish(
        &nats.url(),
        &[
            ("big.jpg".to_string(), big),
            ("chelsea.jpg".to_string(), jpeg.clone()),
        ],
    );
    let outs = outputs(&nats.url(), 2, Duration::from_secs(30));
    assert_eq!(outs.len(), 2, "one output per input");
    let big_out = outs
        .iter()
        .find(|o| o.headers["X-Name"] == "big.jpg")
        .unwrap();
    assert_eq!(big_out.subject, "oodgate.dlq");
    assert_eq!(big_out.headers["Oodgate-Error-Kind"], "too_large");
    assert!(
        big_out.headers["Oodgate-Error"].contains("max_payload of 65536"),
        "{}",
        big_out.headers["Oodgate-Error"]
    );
    assert!(big_out.payload.is_empty(), "the payload is dropped");
    let small = outs
        .iter()
        .find(|o| o.headers["X-Name"] == "chelsea.jpg")
        .unwrap();
    assert_eq!(small.payload, jpeg);
    // Both inputs are acked: nothing pending, nothing waiting for redelivery.
    rt().block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
            .get_stream("IMAGES")
            .await
            .unwrap()
            .get_consumer("oodgate")
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info = consumer.info().await.unwrap();
            if info.num_ack_pending == 0 && info.num_pending == 0 {
                assert_eq!(info.num_redelivered, 0, "no redelivery");
                break;
            }
            assert!(Instant::now() < deadline, "inputs not acked: {info:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Deletes the input stream (its sequences restart at 1 when it is created again).
fn delete_input_stream(url: &str) {
    rt().block_on(async {
        let client = test_connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.delete_stream("IMAGES").await.unwrap();
    });
}

/// A recreated input stream restarts its sequences at 1: its inputs must still get outputs
/// (their ids include the stream's identity), whether the running worker notices the new
/// stream or a worker starts on it; a producer's own `Nats-Msg-Id` travels on.
#[test]
fn a_recreated_input_stream_gets_new_outputs() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let fast = [
        ("OODGATE__INPUT__HEARTBEAT", "500ms"),
        ("OODGATE__INPUT__PULL_EXPIRES", "1s"),
    ];
    let mut w = Worker::start(&nats, &bank, threshold, &fast);
    let three = |tag: &str| -> Vec<(String, Vec<u8>)> {
        good_payloads()
            .into_iter()
            .take(3)
            .map(|(n, b)| (format!("{tag}-{n}"), b))
            .collect()
    };
    // A producer's own message id is kept beside the output's.
    rt().block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut h = async_nats::HeaderMap::new();
        h.insert("X-Name", "with-id");
        h.insert("Nats-Msg-Id", "producer-7");
        let bytes = std::fs::read(common::fixture("images").join("tiny.png")).unwrap();
        js.publish_with_headers("images.in", h, bytes.into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    publish(&nats.url(), &three("first"));
    let outs = outputs(&nats.url(), 4, Duration::from_secs(30));
    assert_eq!(outs.len(), 4);

    // The running worker: the stream is deleted and created again under it.
    delete_input_stream(&nats.url());
    std::thread::sleep(Duration::from_secs(2));
    publish(&nats.url(), &three("second"));
    let outs = outputs(&nats.url(), 7, Duration::from_secs(30));
    assert_eq!(outs.len(), 7, "the recreated stream's inputs got outputs");

    // A new worker on a stream recreated while no worker ran.
    w.child.kill().unwrap();
    w.child.wait().unwrap();
    delete_input_stream(&nats.url());
    publish(&nats.url(), &three("third"));
    let _w2 = Worker::start(&nats, &bank, threshold, &fast);
    let outs = outputs(&nats.url(), 10, Duration::from_secs(30));
    assert_eq!(
        outs.len(),
        10,
        "every input of every stream incarnation has one output"
    );
    let mut names: Vec<&str> = outs.iter().map(|o| o.headers["X-Name"].as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 10, "no duplicates");
    let mut ids: Vec<&str> = outs
        .iter()
        .map(|o| o.headers["Nats-Msg-Id"].as_str())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10, "distinct output ids");
    let with_id = outs
        .iter()
        .find(|o| o.headers["X-Name"] == "with-id")
        .unwrap();
    assert_eq!(
        with_id
            .headers
            .get("Oodgate-Input-Msg-Id")
            .map(String::as_str),
        Some("producer-7")
    );
    assert_ne!(with_id.headers["Nats-Msg-Id"], "producer-7");
}

/// The output stream as the worker declares it (`output.create_if_missing`), with `window` as
/// its duplicate window (the worker's default is 15 min).
fn create_output_stream(url: &str, window: Duration) {
    rt().block_on(async {
        let client = test_connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "OODGATE_OUT".into(),
            subjects: vec![
                "oodgate.id".into(),
                "oodgate.ood".into(),
                "oodgate.dlq".into(),
            ],
            duplicate_window: window,
            ..Default::default()
        })
        .await
        .unwrap();
    });
}

/// The output stream is unavailable for longer than every input's deliveries would last if
/// failed publishes spent them: the worker pauses intake, reports not ready, holds what it
/// has, and routes everything once the stream is back, with nothing in the dead-letter
/// subject.
#[test]
fn an_output_outage_spends_no_deliveries_and_loses_nothing() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let env = [
        ("OODGATE__INPUT__ACK_WAIT", "2s"),
        ("OODGATE__INPUT__MAX_DELIVER", "3"),
    ];
    let w = Worker::start(&nats, &bank, threshold, &env);
    rt().block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.delete_stream("OODGATE_OUT").await.unwrap();
    });
    let payloads = good_payloads_times(3);
    publish(&nats.url(), &payloads);
    // Longer than 3 deliveries × (ack_wait + NAK delay): long enough to exhaust them.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut saw_not_ready = false;
    while Instant::now() < deadline {
        if let Some((503, _)) = w.get("/readyz") {
            saw_not_ready = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    create_output_stream(&nats.url(), Duration::from_secs(900));
    let outs = outputs(&nats.url(), payloads.len(), Duration::from_secs(60));
    let dead: Vec<&str> = outs
        .iter()
        .filter(|o| o.subject == "oodgate.dlq")
        .map(|o| o.headers["X-Name"].as_str())
        .collect();
    assert!(dead.is_empty(), "dead-lettered: {dead:?}");
    assert_eq!(outs.len(), payloads.len(), "every input routed once");
    let mut s = sources(&outs);
    s.dedup();
    assert_eq!(s.len(), payloads.len(), "no duplicates");
    assert!(
        saw_not_ready,
        "/readyz reports not ready while outputs cannot be stored"
    );
    w.wait_ready();
}

/// The stream tests run against the Debian package's nats-server and the current release
/// (`OODGATE_TEST_NATS_SERVER`): the server that answers is the binary asked for.
#[test]
fn the_server_under_test_is_the_one_asked_for() {
    let nats = NatsServer::start();
    let version = rt().block_on(async {
        async_nats::connect(nats.url())
            .await
            .unwrap()
            .server_info()
            .version
    });
    let out = Command::new(common::nats::binary())
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&version), "{text} vs {version}");
    eprintln!("nats-server {version}");
}

/// An existing consumer with another ack_wait and an output stream with a 2-minute duplicate
/// window would silently weaken the guarantees: the worker refuses to start and names both
/// values; with `update_existing` it brings them up to the configuration.
/// Starts a worker that must refuse to start; returns its standard error.
fn refused_start(servers: &str, bank: &Path, threshold: f64, extra: &[(&str, &str)]) -> String {
    let mut child = serve_cmd(servers, bank, threshold, free_port(), extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker started despite weaker existing settings");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    err
}

#[test]
fn weaker_existing_settings_stop_the_worker_unless_updating_is_allowed() {
    use async_nats::jetstream::consumer::pull;
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    publish(&nats.url(), &[]);
    create_output_stream(&nats.url(), Duration::from_secs(120));
    rt().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        js.get_stream("IMAGES")
            .await
            .unwrap()
            .create_consumer(pull::Config {
                durable_name: Some("oodgate".into()),
                filter_subject: "images.in".into(),
                ack_wait: Duration::from_secs(30),
                max_deliver: 5,
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let err = refused_start(&nats.url(), &bank, threshold, &[]);
    assert!(
        err.contains("consumer oodgate ack_wait is 30s on the server but 4s (input.ack_wait)"),
        "{err}"
    );
    assert!(
        err.contains("input.update_existing / output.update_existing"),
        "{err}"
    );
    assert!(
        err.contains("stream OODGATE_OUT duplicate_window is 120s on the server but 900s (output.duplicate_window)"),
        "{err}"
    );

    let _w = Worker::start(
        &nats,
        &bank,
        threshold,
        &[
            ("OODGATE__INPUT__UPDATE_EXISTING", "true"),
            ("OODGATE__OUTPUT__UPDATE_EXISTING", "true"),
        ],
    );
    rt().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let mut out = js.get_stream("OODGATE_OUT").await.unwrap();
        assert_eq!(
            out.info().await.unwrap().config.duplicate_window,
            Duration::from_secs(900)
        );
        let mut c: async_nats::jetstream::consumer::PullConsumer = js
            .get_stream("IMAGES")
            .await
            .unwrap()
            .get_consumer("oodgate")
            .await
            .unwrap();
        assert_eq!(
            c.info().await.unwrap().config.ack_wait,
            Duration::from_secs(4)
        );
    });
}

/// Stream shape from the configuration: an existing output stream that drops old outputs at 5
/// messages is refused (naming both values), then updated when allowed; the input stream is
/// created with interest retention and limits, and routed inputs leave it.
#[test]
fn stream_limits_come_from_the_configuration_and_tighter_ones_are_refused() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    rt().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "OODGATE_OUT".into(),
            subjects: vec![
                "oodgate.id".into(),
                "oodgate.ood".into(),
                "oodgate.dlq".into(),
            ],
            duplicate_window: Duration::from_secs(900),
            max_messages: 5,
            discard: async_nats::jetstream::stream::DiscardPolicy::Old,
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let input = [
        ("OODGATE__INPUT__RETENTION", "interest"),
        ("OODGATE__INPUT__MAX_AGE", "1h"),
        ("OODGATE__INPUT__MAX_MSGS", "1000"),
        ("OODGATE__INPUT__MAX_BYTES", "100000000"),
    ];
    let err = refused_start(&nats.url(), &bank, threshold, &input);
    assert!(
        err.contains("stream OODGATE_OUT max_msgs is 5 on the server but unlimited (output.max_msgs) in the configuration"),
        "{err}"
    );
    assert!(
        err.contains("stream OODGATE_OUT discard is old on the server but new (output.discard) in the configuration"),
        "{err}"
    );
    assert!(err.contains("output.update_existing"), "{err}");

    let mut extra = input.to_vec();
    extra.push(("OODGATE__OUTPUT__UPDATE_EXISTING", "true"));
    let _w = Worker::start(&nats, &bank, threshold, &extra);
    publish(&nats.url(), &good_payloads());
    let outs = outputs(&nats.url(), GOOD.len(), Duration::from_secs(60));
    assert_eq!(outs.len(), GOOD.len());
    rt().block_on(async {
        use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy};
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let out = js
            .get_stream("OODGATE_OUT")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .clone();
        assert_eq!((out.max_messages, out.discard), (-1, DiscardPolicy::New));
        let mut images = js.get_stream("IMAGES").await.unwrap();
        let c = images.info().await.unwrap().config.clone();
        assert_eq!(c.retention, RetentionPolicy::Interest);
        assert_eq!(c.max_age, Duration::from_secs(3600));
        assert_eq!((c.max_messages, c.max_bytes), (1000, 100_000_000));
        assert_eq!(c.discard, DiscardPolicy::New);
        // Interest retention: every input was acked after its output was stored, so the
        // stream holds none of them any more.
        let deadline = Instant::now() + Duration::from_secs(10);
        while images.info().await.unwrap().state.messages > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(images.info().await.unwrap().state.messages, 0);
    });
}

/// `input.object_after_routing = "delete"`: the objects of routed inputs are deleted once the
/// inputs are acked, a dead-lettered input keeps its object for replay. `input.object_store_ttl`
/// creates the bucket with that age limit, and a worker asking for a longer one is refused.
#[test]
fn routed_claim_checked_objects_are_deleted_and_dead_letters_keep_theirs() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let settings = [
        ("OODGATE__INPUT__OBJECT_AFTER_ROUTING", "delete"),
        ("OODGATE__INPUT__OBJECT_STORE_TTL", "1h"),
    ];
    let w = Worker::start(&nats, &bank, threshold, &settings);
    let broken = tmp.path().join("broken.jpg");
    let chelsea = std::fs::read(common::fixture("images/chelsea.jpg")).unwrap();
    std::fs::write(&broken, &chelsea[..chelsea.len() / 2]).unwrap();
    let st = common::oodgate()
        .args([
            "publish",
            "--nats",
            &nats.url(),
            "--object-store-above",
            "0",
        ])
        .arg(common::fixture("images/chelsea.jpg"))
        .arg(common::fixture("images/coffee.jpg"))
        .arg(&broken)
        .status()
        .unwrap();
    assert!(st.success());
    let outs = outputs(&nats.url(), 3, Duration::from_secs(60));
    assert_eq!(outs.len(), 3);
    let object_of = |o: &Output| -> String {
        let env: serde_json::Value = serde_json::from_slice(&o.payload).unwrap();
        env["object"]["name"].as_str().unwrap().to_string()
    };
    let dead: Vec<String> = outs
        .iter()
        .filter(|o| o.subject == "oodgate.dlq")
        .map(object_of)
        .collect();
    let routed: Vec<String> = outs
        .iter()
        .filter(|o| o.subject != "oodgate.dlq")
        .map(object_of)
        .collect();
    assert_eq!((dead.len(), routed.len()), (1, 2), "{outs:?}");
    rt().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let store = js.get_object_store("oodgate-images").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // A deleted object keeps a metadata entry marked deleted; its chunks are purged.
        let deleted = |name: String| {
            let store = store.clone();
            async move { store.info(&name).await.map(|i| i.deleted).unwrap_or(true) }
        };
        for name in &routed {
            while !deleted(name.clone()).await && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(deleted(name.clone()).await, "{name} was not deleted");
            assert!(store.get(name).await.is_err());
        }
        assert!(
            !deleted(dead[0].clone()).await,
            "the dead letter's object is gone"
        );
        let mut backing = js.get_stream("OBJ_oodgate-images").await.unwrap();
        assert_eq!(
            backing.info().await.unwrap().config.max_age,
            Duration::from_secs(3600)
        );
    });
    assert_eq!(w.metric("oodgate_objects_deleted_total"), 2.0);
    let err = refused_start(
        &nats.url(),
        &bank,
        threshold,
        &[("OODGATE__INPUT__OBJECT_STORE_TTL", "2h")],
    );
    assert!(
        err.contains("object store bucket oodgate-images max_age is 3600s on the server but 7200s (input.object_store_ttl)"),
        "{err}"
    );
}

/// A progressive JPEG of 16 megapixels repeating one scan 20,000 times (300 KB) would hold a
/// decode thread for several seconds (a 32 MiB one for many minutes). It is refused before
/// decoding as `too_complex`, and the good images behind it are routed.
#[test]
fn a_jpeg_with_thousands_of_scans_is_dead_lettered_as_too_complex() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let _w = Worker::start(
        &nats,
        &bank,
        threshold,
        &[("OODGATE__BATCH__DECODE_WORKERS", "1")],
    );
    let mut payloads = vec![(
        "scans".to_string(),
        common::jpeg_with_repeated_scans(4000, 20_000),
    )];
    payloads.extend(good_payloads());
    publish(&nats.url(), &payloads);
    let outs = outputs(&nats.url(), payloads.len(), Duration::from_secs(60));
    assert_eq!(outs.len(), payloads.len());
    let dead: Vec<&Output> = outs.iter().filter(|o| o.subject == "oodgate.dlq").collect();
    assert_eq!(dead.len(), 1, "{outs:?}");
    assert_eq!(dead[0].headers["X-Name"], "scans");
    assert_eq!(dead[0].headers["Oodgate-Error-Kind"], "too_complex");
    assert!(
        dead[0].headers["Oodgate-Error"].contains("limits.max_jpeg_scans"),
        "{:?}",
        dead[0].headers
    );
}

/// Publishes `n` claim-checked copies of a fixture padded to `size` bytes (+ i, so each is its
/// own object) with `oodgate publish`; returns the files.
fn publish_big_claim_checks(url: &str, dir: &Path, n: usize, size: usize) -> Vec<PathBuf> {
    let chelsea = std::fs::read(common::fixture("images/chelsea.jpg")).unwrap();
    let files: Vec<PathBuf> = (0..n)
        .map(|i| {
            let path = dir.join(format!("big-{i}.jpg"));
            std::fs::write(&path, pad_jpeg(&chelsea, size + i)).unwrap();
            path
        })
        .collect();
    let st = common::oodgate()
        .args(["publish", "--nats", url, "--object-store-above", "0"])
        .args(&files)
        .status()
        .unwrap();
    assert!(st.success());
    files
}

/// Bytes in flight are bounded, not only messages: twelve claim-checked 3 MiB images with
/// `input.max_bytes_in_flight` = 8 MiB are fetched at most two at a time, and all are routed.
#[test]
fn bytes_in_flight_stay_within_the_budget_and_everything_is_routed() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let w = Worker::start(
        &nats,
        &bank,
        threshold,
        &[
            ("OODGATE__INPUT__MAX_BYTES_IN_FLIGHT", "8388608"),
            ("OODGATE__LIMITS__MAX_BYTES", "4194304"),
        ],
    );
    let files = publish_big_claim_checks(&nats.url(), tmp.path(), 12, 3 << 20);
    let outs = outputs(&nats.url(), files.len(), Duration::from_secs(90));
    assert_eq!(outs.len(), files.len());
    assert!(outs.iter().all(|o| o.subject != "oodgate.dlq"), "{outs:?}");
    let peak = w.metric("oodgate_bytes_in_flight_peak");
    assert!(
        (3.0 * 1048576.0..=8.0 * 1048576.0).contains(&peak),
        "peak bytes in flight {peak}"
    );
}

/// For the record, not a pass/fail bound: the peak RSS of one worker routing 80 claim-checked
/// 8 MiB images with the default settings (`OODGATE_TEST_BIN` selects another binary).
/// Run with `cargo test --release --test stream -- --ignored peak_rss --nocapture`.
#[test]
#[ignore]
fn peak_rss_with_many_large_claim_checks() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let files = publish_big_claim_checks(&nats.url(), tmp.path(), 80, 8 << 20);
    let w = Worker::start(&nats, &bank, threshold, &[]);
    let outs = outputs(&nats.url(), files.len(), Duration::from_secs(300));
    assert_eq!(outs.len(), files.len());
    println!(
        "peak RSS {:.0} MiB; peak bytes in flight {:.0} MiB",
        peak_rss_mib(w.child.id()),
        w.metric("oodgate_bytes_in_flight_peak") / 1048576.0
    );
}

/// Producers cannot forge the worker's headers: `Oodgate-*` headers in any case are dropped
/// from every output (ID, OOD and DLQ); unrelated headers travel on.
#[test]
fn forged_oodgate_headers_never_reach_an_output() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let _w = Worker::start(&nats, &bank, threshold, &[]);
    let good = std::fs::read(common::fixture("images/chelsea.jpg")).unwrap();
    rt().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        for payload in [good.clone(), b"not an image at all".to_vec()] {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Oodgate-Error-Kind", "none");
            h.insert("oodgate-decision", "id");
            h.insert("OODGATE-SCORE", "1e9");
            h.insert("oodgate-bank", "forged");
            h.insert("X-Trace", "t-1");
            js.publish_with_headers("images.in", h, payload.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let outs = outputs(&nats.url(), 2, Duration::from_secs(60));
    assert_eq!(outs.len(), 2);
    for o in &outs {
        assert_eq!(o.headers.get("X-Trace").map(String::as_str), Some("t-1"));
        let ours: Vec<&String> = o
            .headers
            .keys()
            .filter(|k| k.to_ascii_lowercase().starts_with("oodgate-"))
            .collect();
        assert!(
            ours.iter().all(|k| k.starts_with("Oodgate-")),
            "{}: {ours:?}",
            o.subject
        );
        assert_ne!(o.headers["Oodgate-Bank"], "forged");
    }
    let dead: Vec<&Output> = outs.iter().filter(|o| o.subject == "oodgate.dlq").collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].headers["Oodgate-Error-Kind"], "not_image");
    assert!(!dead[0].headers.contains_key("Oodgate-Decision"));
    let routed: Vec<&Output> = outs.iter().filter(|o| o.subject != "oodgate.dlq").collect();
    assert!(!routed[0].headers.contains_key("Oodgate-Error-Kind"));
    assert_ne!(routed[0].headers["Oodgate-Score"], "1e9");
}

/// Creates bucket `tenant-b` holding `cat.jpg` (a fixture), connecting with `url`.
fn make_tenant_bucket(url: &str) {
    rt().block_on(async {
        let js = async_nats::jetstream::new(test_connect(url).await.unwrap());
        let store = js
            .create_object_store(async_nats::jetstream::object_store::Config {
                bucket: "tenant-b".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let image = std::fs::read(common::fixture("images/chelsea.jpg")).unwrap();
        store
            .put("cat.jpg", &mut std::io::Cursor::new(image))
            .await
            .unwrap();
    });
}

/// Claim checks may only name allowed buckets: an envelope pointing at another tenant's bucket,
/// or at an invalid bucket name, is dead-lettered as `bad_envelope` on its first delivery and
/// the object is never read; allowing the bucket routes it. A non-image's bytes are never
/// echoed in `Oodgate-Error`.
#[test]
fn claim_checks_naming_foreign_buckets_are_refused_unread() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    make_tenant_bucket(&nats.url());
    let envelope = |bucket: &str| {
        format!(r#"{{"id": 1, "object": {{"bucket": "{bucket}", "name": "cat.jpg"}}}}"#)
            .into_bytes()
    };
    let payloads = vec![
        ("foreign".to_string(), envelope("tenant-b")),
        ("invalid".to_string(), envelope("bad.name")),
        ("secret".to_string(), b"SECRET-TOKEN-0123456789".to_vec()),
    ];
    {
        let _w = Worker::start(&nats, &bank, threshold, &[]);
        publish(&nats.url(), &payloads);
        let outs = outputs(&nats.url(), 3, Duration::from_secs(60));
        assert_eq!(outs.len(), 3);
        for o in &outs {
            assert_eq!(o.subject, "oodgate.dlq", "{o:?}");
            let error = &o.headers["Oodgate-Error"];
            match o.headers["X-Name"].as_str() {
                "secret" => {
                    assert_eq!(o.headers["Oodgate-Error-Kind"], "not_image");
                    assert!(
                        !error.contains("SECRET") && !error.contains("53 45 43"),
                        "{error}"
                    );
                }
                name => {
                    assert_eq!(o.headers["Oodgate-Error-Kind"], "bad_envelope", "{name}");
                    assert!(error.contains("input.object_store_buckets"), "{error}");
                }
            }
        }
    }
    // Allowing the bucket routes the same kind of envelope.
    let _w = Worker::start(
        &nats,
        &bank,
        threshold,
        &[(
            "OODGATE__INPUT__OBJECT_STORE_BUCKETS",
            "oodgate-images,tenant-b",
        )],
    );
    publish(&nats.url(), &payloads[..1]);
    let outs = outputs(&nats.url(), 4, Duration::from_secs(60));
    assert_eq!(outs.len(), 4);
    assert_ne!(outs[3].subject, "oodgate.dlq", "{:?}", outs[3]);
}

/// PEM files of a throw-away CA, a server certificate for 127.0.0.1 and a client certificate.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "oodgate test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["worker.oodgate.test".into()]);
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", &ca_cert.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server-key.pem", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client-key.pem", &client_key),
    }
}

/// Publishes one image with a client made from `opts` and waits for the worker to report one
/// output.
fn route_one_with(opts: async_nats::ConnectOptions, url: &str, w: &Worker) {
    rt().block_on(async {
        let js = async_nats::jetstream::new(opts.connect(url).await.unwrap());
        let image = std::fs::read(common::fixture("images/chelsea.jpg")).unwrap();
        js.publish("images.in", image.into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.metric("oodgate_messages_out_total") < 1.0 {
        assert!(Instant::now() < deadline, "no output from {url}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`route_one_with`] over TLS (with the client certificate when asked).
fn publish_over_tls(port: u16, pki: &Pki, client_cert: bool, w: &Worker) {
    let mut opts = async_nats::ConnectOptions::new().add_root_certificates(pki.ca.clone());
    if client_cert {
        opts = opts.add_client_certificate(pki.client_cert.clone(), pki.client_key.clone());
    }
    route_one_with(opts, &format!("tls://127.0.0.1:{port}"), w);
}

/// TLS for real: a worker verifies the server with `nats.tls_ca` and routes; against a server
/// that requires client certificates it is refused without one and routes with
/// `nats.tls_cert` / `nats.tls_key`; with `nats.tls_required` a plain server is refused at
/// once with an error that says TLS. Certificates are generated here.
#[test]
fn tls_and_mutual_tls_for_real_and_tls_required_refuses_a_plain_server() {
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let pki = make_pki(tmp.path());
    let ca = pki.ca.display().to_string();
    let tls_conf = |verify: bool| {
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: {verify}\n}}\n",
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca.display()
        )
    };

    // Server-side TLS.
    let nats = NatsServer::start_with_conf(&tls_conf(false));
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let w = Worker::start_on(&url, &bank, threshold, &[("OODGATE__NATS__TLS_CA", &ca)]);
    publish_over_tls(nats.port, &pki, false, &w);
    drop(w);
    drop(nats);

    // Mutual TLS: no client certificate, refused; with one, routed.
    let nats = NatsServer::start_with_conf(&tls_conf(true));
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let err = refused_start(&url, &bank, threshold, &[("OODGATE__NATS__TLS_CA", &ca)]);
    assert!(err.contains("TLS failed"), "{err}");
    let (cert, key) = (
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let w = Worker::start_on(
        &url,
        &bank,
        threshold,
        &[
            ("OODGATE__NATS__TLS_CA", &ca),
            ("OODGATE__NATS__TLS_CERT", &cert),
            ("OODGATE__NATS__TLS_KEY", &key),
            ("OODGATE__NATS__TLS_REQUIRED", "true"),
        ],
    );
    publish_over_tls(nats.port, &pki, true, &w);
    drop(w);
    drop(nats);

    // tls_required against a plain server: refused at once, naming TLS.
    let plain = NatsServer::start();
    let started = Instant::now();
    let err = refused_start(
        &plain.url(),
        &bank,
        threshold,
        &[("OODGATE__NATS__TLS_REQUIRED", "true")],
    );
    assert!(
        err.contains("TLS") && err.contains("nats.tls_required"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(25), "{err}");
}

/// Each authentication method against a server that requires it: user and password, token and
/// NKey connect and route; a wrong password is refused at once, naming authentication.
#[test]
fn user_password_token_and_nkey_authentication() {
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let route_one = |nats: &NatsServer, w: &Worker, auth: &[(&str, &str)]| {
        let opts = match nats_auth_for_test(auth) {
            TestAuth::UserPassword(u, p) => {
                async_nats::ConnectOptions::with_user_and_password(u, p)
            }
            TestAuth::Token(t) => async_nats::ConnectOptions::with_token(t),
            TestAuth::NKey(seed) => async_nats::ConnectOptions::with_nkey(seed),
        };
        route_one_with(opts, &nats.url(), w);
    };

    let nats = NatsServer::start_with_conf(
        "authorization { users: [ { user: alice, password: \"s3cret-pw\" } ] }\n",
    );
    let auth = [
        ("OODGATE__NATS__USER", "alice"),
        ("OODGATE__NATS__PASSWORD", "s3cret-pw"),
    ];
    let w = Worker::start(&nats, &bank, threshold, &auth);
    route_one(&nats, &w, &auth);
    drop(w);
    let err = refused_start(
        &nats.url(),
        &bank,
        threshold,
        &[
            ("OODGATE__NATS__USER", "alice"),
            ("OODGATE__NATS__PASSWORD", "wrong"),
        ],
    );
    assert!(err.contains("authentication failed"), "{err}");
    assert!(!err.contains("wrong") && !err.contains("s3cret"), "{err}");
    // Credentials written in the URL authenticate too (the client library ignores them).
    let in_url = format!("nats://alice:s3cret-pw@127.0.0.1:{}", nats.port);
    drop(Worker::start_on(&in_url, &bank, threshold, &[]));
    drop(nats);

    let nats = NatsServer::start_with_conf("authorization { token: \"t0ken-xyz\" }\n");
    let auth = [("OODGATE__NATS__TOKEN", "t0ken-xyz")];
    let w = Worker::start(&nats, &bank, threshold, &auth);
    route_one(&nats, &w, &auth);
    drop(w);
    drop(nats);

    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let nats = NatsServer::start_with_conf(&format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}\n",
        user.public_key()
    ));
    let auth = [("OODGATE__NATS__NKEY", seed.as_str())];
    let w = Worker::start(&nats, &bank, threshold, &auth);
    route_one(&nats, &w, &auth);
}

/// A NATS JWT: `claims` (with `iss` and `sub` added) signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("{subject}-jti"),
        "iat": 1_700_000_000u64,
        "iss": issuer.public_key(),
        "name": subject,
        "sub": subject,
        "nats": nats,
    });
    let body = b64(claims.to_string().as_bytes());
    let signed = format!("{header}.{body}");
    let sig = b64(&issuer.sign(signed.as_bytes()).unwrap());
    format!("{signed}.{sig}")
}

/// `.creds` authentication (operator mode: an operator, an account with JetStream and a user,
/// all generated here): the worker connects with `nats.creds_file` and routes.
#[test]
fn creds_file_authentication_in_operator_mode() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let op_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let limits = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let acct_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        serde_json::json!({"limits": limits, "type": "account", "version": 2}),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        serde_json::json!({
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        }),
    );
    // JetStream needs a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let sys_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        serde_json::json!({"type": "account", "version": 2}),
    );
    let nats = NatsServer::start_with_conf(&format!(
        "operator: {op_jwt}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {acct}: {acct_jwt}\n  {sys}: {sys_jwt}\n}}\n",
        acct = account.public_key(),
        sys = system.public_key(),
    ));
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let creds = tmp.path().join("worker.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    let creds_path = creds.display().to_string();
    let w = Worker::start(
        &nats,
        &bank,
        threshold,
        &[("OODGATE__NATS__CREDS_FILE", &creds_path)],
    );
    let opts = rt()
        .block_on(async_nats::ConnectOptions::with_credentials_file(
            creds.clone(),
        ))
        .unwrap();
    route_one_with(opts, &nats.url(), &w);
}

enum TestAuth {
    UserPassword(String, String),
    Token(String),
    NKey(String),
}

/// The test client's credentials, from the same pairs the worker gets.
fn nats_auth_for_test(auth: &[(&str, &str)]) -> TestAuth {
    let get = |k: &str| {
        auth.iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_string())
    };
    if let Some(t) = get("OODGATE__NATS__TOKEN") {
        TestAuth::Token(t)
    } else if let Some(s) = get("OODGATE__NATS__NKEY") {
        TestAuth::NKey(s)
    } else {
        TestAuth::UserPassword(
            get("OODGATE__NATS__USER").unwrap(),
            get("OODGATE__NATS__PASSWORD").unwrap(),
        )
    }
}

/// The real `oodgate serve` and `oodgate publish` under the shipped server configuration's
/// least-privilege users, over the TLS it requires: the worker declares its streams and
/// consumer, the producer stores claim checks and publishes, everything is routed, the shared
/// adaptive memory fills and resets; publishing the same files again needs no
/// purge right; a producer without its own reply prefix is refused and its password is never
/// printed.
#[test]
fn the_real_binaries_work_under_the_shipped_least_privilege_users() {
    let nats = NatsServer::start_shipped(&[
        ("OODGATE_WORKER_PASSWORD", "w-pass-41"),
        ("OODGATE_PUBLISHER_PASSWORD", "p-pass-42"),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let ca = nats.ca.clone().unwrap().display().to_string();
    let w = Worker::start_on(
        &format!("tls://127.0.0.1:{}", nats.port),
        &bank,
        threshold,
        &[
            ("OODGATE__NATS__USER", "worker"),
            ("OODGATE__NATS__PASSWORD", "w-pass-41"),
            ("OODGATE__NATS__INBOX_PREFIX", "_INBOX_worker"),
            ("OODGATE__NATS__TLS_CA", &ca),
            ("OODGATE__NATS__TLS_REQUIRED", "true"),
            // The shared adaptive memory, every image admitted: its stream and consumer too.
            ("OODGATE__DETECTOR__ADAPTIVE__ENABLED", "true"),
            ("OODGATE__DETECTOR__ADAPTIVE__SYNC", "shared"),
            ("OODGATE__DETECTOR__ADAPTIVE__ADMIT_BELOW", "1e9"),
            ("OODGATE__DETECTOR__ADAPTIVE__MAX_PENALTY", "0.25"),
            ("OODGATE__DETECTOR__ADAPTIVE__ADMIT_PER_MILLE", "1000"),
        ],
    );
    let url = format!("tls://publisher:p-pass-42@127.0.0.1:{}", nats.port);
    let publish = |above: &str, files: &[&str], prefix: Option<&str>| {
        let mut cmd = common::oodgate();
        cmd.args(["publish", "--nats", &url, "--tls-ca", &ca]);
        cmd.args(["--object-store-above", above]);
        if let Some(p) = prefix {
            cmd.args(["--inbox-prefix", p]);
        }
        for f in files {
            cmd.arg(common::fixture("images").join(f));
        }
        cmd.output().unwrap()
    };
    let claims = ["chelsea.jpg", "coffee.jpg"];
    let wait_outputs = |n: f64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while w.metric("oodgate_messages_out_total") < n {
            assert!(Instant::now() < deadline, "fewer than {n} outputs");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let out = publish("0", &claims, Some("_INBOX_publisher"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = publish("900000", &["rocket.jpg"], Some("_INBOX_publisher"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_outputs(3.0);
    // The same objects again: already stored under their content hash, nothing to purge.
    let out = publish("0", &claims, Some("_INBOX_publisher"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_outputs(5.0);
    assert_eq!(w.metric("oodgate_dlq_total"), 0.0);
    // Every admission went through OODGATE_ADAPT and came back; a reset as the worker user
    // empties the memory.
    w.wait_adaptive_entries(5.0);
    adaptive_reset(
        &bank,
        &format!("tls://worker:w-pass-41@127.0.0.1:{}", nats.port),
        &["--inbox-prefix", "_INBOX_worker", "--tls-ca", &ca],
    );
    w.wait_adaptive_entries(0.0);
    // Without its own reply prefix the producer gets no answers: refused, password unprinted.
    let out = publish("900000", &["rocket.jpg"], None);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(!text.contains("p-pass-42"), "{text}");
    // Without the CA the server cannot be verified: refused, naming TLS, password unprinted.
    let out = common::oodgate()
        .args([
            "publish",
            "--nats",
            &url,
            "--inbox-prefix",
            "_INBOX_publisher",
        ])
        .arg(common::fixture("images/rocket.jpg"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.to_lowercase().contains("tls") || text.contains("certificate"),
        "{text}"
    );
    assert!(!text.contains("p-pass-42"), "{text}");
}

/// An allowed bucket the worker's user may not read: the server refuses the requests (they
/// time out), reports a permissions violation, and the input is dead-lettered as
/// `bad_envelope` on its first delivery instead of being retried as a transient failure.
#[test]
fn a_bucket_the_worker_may_not_read_is_dead_lettered_at_once() {
    let nats = NatsServer::start_with_conf(
        "authorization { users: [\n  { user: admin, password: admin-pw }\n  { user: worker, password: worker-pw, permissions: { publish: { deny: [\"$JS.API.STREAM.INFO.OBJ_tenant-b\", \"$JS.API.DIRECT.GET.OBJ_tenant-b.>\", \"$JS.API.STREAM.MSG.GET.OBJ_tenant-b\"] } } }\n] }\n",
    );
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let admin_url = format!("nats://admin:admin-pw@127.0.0.1:{}", nats.port);
    make_tenant_bucket(&admin_url);
    let w = Worker::start(
        &nats,
        &bank,
        threshold,
        &[
            ("OODGATE__NATS__USER", "worker"),
            ("OODGATE__NATS__PASSWORD", "worker-pw"),
            (
                "OODGATE__INPUT__OBJECT_STORE_BUCKETS",
                "oodgate-images,tenant-b",
            ),
            ("OODGATE__INPUT__FETCH_TIMEOUT", "3s"),
        ],
    );
    publish(
        &admin_url,
        &[(
            "forbidden".into(),
            br#"{"id": 1, "object": {"bucket": "tenant-b", "name": "cat.jpg"}}"#.to_vec(),
        )],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.metric("oodgate_dlq_total") < 1.0 {
        assert!(Instant::now() < deadline, "not dead-lettered");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(w.metric("oodgate_naks_total"), 0.0, "retried as transient");
    let outs = outputs(&admin_url, 1, Duration::from_secs(10));
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].headers["Oodgate-Error-Kind"], "bad_envelope");
    assert!(
        outs[0].headers["Oodgate-Error"].contains("may not read"),
        "{:?}",
        outs[0].headers
    );
}

/// A claim-checked object whose chunks are gone: reading it never completes. The read times
/// out (`input.fetch_timeout`), is retried with backoff, and on the last delivery the input is
/// dead-lettered instead of being held forever.
#[test]
fn an_object_read_that_never_completes_times_out_and_is_dead_lettered() {
    use async_nats::jetstream::object_store;
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let _w = Worker::start(
        &nats,
        &bank,
        threshold,
        &[
            ("OODGATE__INPUT__FETCH_TIMEOUT", "1s"),
            ("OODGATE__INPUT__MAX_DELIVER", "2"),
            ("OODGATE__INPUT__NAK_DELAY", "100ms"),
        ],
    );
    rt().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let store = js
            .create_object_store(object_store::Config {
                bucket: "oodgate-images".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let bytes = std::fs::read(common::fixture("images").join("coffee.jpg")).unwrap();
        store.put("gone.jpg", &mut bytes.as_slice()).await.unwrap();
        js.get_stream("OBJ_oodgate-images")
            .await
            .unwrap()
            .purge()
            .filter("$O.oodgate-images.C.>")
            .await
            .unwrap();
    });
    let envelope = br#"{"id": 1, "object": {"bucket": "oodgate-images", "name": "gone.jpg"}}"#;
    publish(&nats.url(), &[("gone".to_string(), envelope.to_vec())]);
    let outs = outputs(&nats.url(), 1, Duration::from_secs(40));
    assert_eq!(outs.len(), 1, "the input was held instead of dead-lettered");
    let o = &outs[0];
    assert_eq!(o.subject, "oodgate.dlq");
    assert_eq!(o.headers["Oodgate-Error-Kind"], "max_deliveries");
    assert!(
        o.headers["Oodgate-Error"].contains("input.fetch_timeout"),
        "{}",
        o.headers["Oodgate-Error"]
    );
}

/// A 3-node JetStream cluster on loopback; oodgate creates R3 input and output streams from
/// `input.replicas` / `output.replicas`; two workers share the consumer. The input stream's
/// leader and one worker are SIGKILLed mid-stream and restarted: every input still has
/// exactly one output and no good image is dead-lettered.
#[test]
fn a_three_node_cluster_survives_losing_the_input_leader_and_a_worker() {
    let mut cluster = Cluster::start(3);
    rt().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        let js = async_nats::jetstream::new(async_nats::connect(cluster.url(0)).await.unwrap());
        // Ready once an R3 stream can be placed (a meta leader and all peers are there).
        let probe = async_nats::jetstream::stream::Config {
            name: "PROBE".into(),
            subjects: vec!["probe".into()],
            num_replicas: 3,
            ..Default::default()
        };
        loop {
            match js.create_stream(probe.clone()).await {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "cluster not ready: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        js.delete_stream("PROBE").await.unwrap();
    });
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let env = [
        ("OODGATE__INPUT__REPLICAS", "3"),
        ("OODGATE__OUTPUT__REPLICAS", "3"),
    ];
    let servers = cluster.urls();
    let mut a = Worker::start_on(&servers, &bank, threshold, &env);
    let _b = Worker::start_on(&servers, &bank, threshold, &env);
    let leader = rt().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(cluster.url(0)).await.unwrap());
        let mut s = js.get_stream("IMAGES").await.unwrap();
        let info = s.info().await.unwrap();
        assert_eq!(
            info.config.num_replicas, 3,
            "oodgate created an R3 input stream"
        );
        let out = js
            .get_stream("OODGATE_OUT")
            .await
            .unwrap()
            .cached_info()
            .config
            .num_replicas;
        assert_eq!(out, 3, "and an R3 output stream");
        info.cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .unwrap()
    });
    let leader: usize = leader.trim_start_matches('n').parse().unwrap();
    // Publish through a node that stays up.
    let via = cluster.url((leader + 1) % 3);
    let payloads = good_payloads_times(4);
    publish(&via, &payloads);
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.metric("oodgate_messages_out_total") < 3.0 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    cluster.nodes[leader].stop();
    a.signal("KILL");
    let _ = a.wait_exit(Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(3));
    cluster.nodes[leader].restart().unwrap();
    let _a2 = Worker::start_on(&servers, &bank, threshold, &env);
    let outs = outputs(&via, payloads.len(), Duration::from_secs(180));
    let mut s = sources(&outs);
    let n = s.len();
    s.dedup();
    assert_eq!(
        (s.len(), n),
        (payloads.len(), payloads.len()),
        "every input exactly once"
    );
    let dead: Vec<&str> = outs
        .iter()
        .filter(|o| o.subject == "oodgate.dlq")
        .map(|o| o.headers["X-Name"].as_str())
        .collect();
    assert!(dead.is_empty(), "good images dead-lettered: {dead:?}");
}

/// Messages stored in the output stream so far.
fn output_count(url: &str) -> usize {
    rt().block_on(async {
        let js = async_nats::jetstream::new(test_connect(url).await.unwrap());
        match js.get_stream("OODGATE_OUT").await {
            Ok(mut s) => s
                .info()
                .await
                .map(|i| i.state.messages as usize)
                .unwrap_or(0),
            Err(_) => 0,
        }
    })
}

/// Peak resident memory of a process, in MiB (VmHWM).
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Soak: 10,000 messages, two workers, one of them SIGKILLed and restarted about every
/// 1,000 outputs. Every input has exactly one output and nothing is dead-lettered. With the
/// tiny model it takes about half a minute; it prints peak RSS per worker (`--nocapture`).
#[test]
fn soak_ten_thousand_messages_with_workers_killed_every_thousand() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let small: Vec<Vec<u8>> = ["tiny.png", "palette.png", "chelsea.jpg", "wide.jpg"]
        .iter()
        .map(|n| std::fs::read(common::fixture("images").join(n)).unwrap())
        .collect();
    let total = 10_000;
    let payloads: Vec<(String, Vec<u8>)> = (0..total)
        .map(|i| (format!("m{i}"), small[i % small.len()].clone()))
        .collect();
    let env = [("OODGATE__BATCH__MAX_SIZE", "32")];
    let mut workers = [
        Worker::start(&nats, &bank, threshold, &env),
        Worker::start(&nats, &bank, threshold, &env),
    ];
    let url = nats.url();
    let pubs = payloads.clone();
    let publisher = std::thread::spawn(move || publish(&url, &pubs));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(1800);
    let (mut next_kill, mut kills, mut peaks) = (1_000, 0, Vec::new());
    loop {
        let n = output_count(&nats.url());
        if n >= total || Instant::now() > deadline {
            break;
        }
        if n >= next_kill && kills < 9 {
            let w = &mut workers[kills % 2];
            peaks.push(peak_rss_mib(w.child.id()));
            w.signal("KILL");
            let _ = w.wait_exit(Duration::from_secs(5));
            *w = Worker::start(&nats, &bank, threshold, &env);
            kills += 1;
            next_kill += 1_000;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    publisher.join().unwrap();
    for w in &workers {
        peaks.push(peak_rss_mib(w.child.id()));
    }
    let secs = started.elapsed().as_secs_f64();
    let outs = outputs(&nats.url(), total, Duration::from_secs(600));
    let mut s = sources(&outs);
    let n = s.len();
    s.dedup();
    eprintln!(
        "soak: {n} outputs for {total} inputs in {secs:.0} s, {kills} workers killed; peak RSS per worker (MiB): {peaks:.0?}"
    );
    assert_eq!((s.len(), n), (total, total), "every input exactly once");
    let dead = outs.iter().filter(|o| o.subject == "oodgate.dlq").count();
    assert_eq!(dead, 0, "nothing dead-lettered");
}

#[test]
fn object_store_claim_checks_and_bad_envelopes() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let _w = Worker::start(&nats, &bank, threshold, &[]);
    // `oodgate publish` with every file through the Object Store.
    let st = common::oodgate()
        .args([
            "publish",
            "--nats",
            &nats.url(),
            "--subject",
            "images.in",
            "--object-store-above",
            "0",
        ])
        .arg(common::fixture("images/chelsea.jpg"))
        .arg(common::fixture("images/coffee.jpg"))
        .status()
        .unwrap();
    assert!(st.success());
    publish(
        &nats.url(),
        &[
            (
                "missing".into(),
                br#"{"id": 1, "object": {"bucket": "oodgate-images", "name": "nope.jpg"}}"#
                    .to_vec(),
            ),
            ("badjson".into(), b"{\"id\": 1, \"object\": ".to_vec()),
        ],
    );
    let outs = outputs(&nats.url(), 4, Duration::from_secs(60));
    assert_eq!(outs.len(), 4);
    let claims: Vec<&Output> = outs.iter().filter(|o| o.subject != "oodgate.dlq").collect();
    assert_eq!(claims.len(), 2);
    for o in claims {
        // The pointer travels on, never the bytes.
        let env: serde_json::Value = serde_json::from_slice(&o.payload).unwrap();
        assert_eq!(env["object"]["bucket"], "oodgate-images");
    }
    let kinds: Vec<&str> = outs
        .iter()
        .filter_map(|o| o.headers.get("Oodgate-Error-Kind").map(|s| s.as_str()))
        .collect();
    assert!(
        kinds.contains(&"missing_object") && kinds.contains(&"bad_envelope"),
        "{kinds:?}"
    );
}

#[test]
fn two_workers_share_one_durable_consumer() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let a = Worker::start(
        &nats,
        &bank,
        threshold,
        &[("OODGATE__INPUT__PULL_BATCH", "4")],
    );
    let b = Worker::start(
        &nats,
        &bank,
        threshold,
        &[("OODGATE__INPUT__PULL_BATCH", "4")],
    );
    let payloads = good_payloads_times(6);
    publish(&nats.url(), &payloads);
    let outs = outputs(&nats.url(), payloads.len(), Duration::from_secs(90));
    assert_eq!(outs.len(), payloads.len());
    let (ia, ib) = (
        a.metric("oodgate_messages_in_total"),
        b.metric("oodgate_messages_in_total"),
    );
    assert!(
        ia > 0.0 && ib > 0.0,
        "both workers received work: {ia} and {ib}"
    );
}

#[test]
fn sigkill_mid_stream_then_restart_gives_exactly_one_output_per_input() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let payloads = good_payloads_times(8);
    publish(&nats.url(), &payloads);
    let mut w = Worker::start(&nats, &bank, threshold, &[]);
    // Kill as soon as some (not all) outputs exist.
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.metric("oodgate_messages_out_total") < 10.0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    w.signal("KILL");
    let _ = w.wait_exit(Duration::from_secs(5));
    let _w2 = Worker::start(&nats, &bank, threshold, &[]);
    let outs = outputs(&nats.url(), payloads.len(), Duration::from_secs(90));
    let mut s = sources(&outs);
    let n = s.len();
    s.dedup();
    assert_eq!(s.len(), payloads.len(), "every input has an output");
    assert_eq!(
        n,
        payloads.len(),
        "and exactly one (redeliveries deduplicated by Nats-Msg-Id)"
    );
}

#[test]
fn worker_survives_a_nats_server_restart() {
    let mut nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let w = Worker::start(&nats, &bank, threshold, &[]);
    publish(&nats.url(), &good_payloads());
    assert_eq!(
        outputs(&nats.url(), GOOD.len(), Duration::from_secs(60)).len(),
        GOOD.len()
    );
    nats.restart();
    // Ready again once reconnected.
    w.wait_ready();
    let second: Vec<(String, Vec<u8>)> = good_payloads()
        .into_iter()
        .map(|(n, p)| (format!("b-{n}"), p))
        .collect();
    publish(&nats.url(), &second);
    let outs = outputs(&nats.url(), 2 * GOOD.len(), Duration::from_secs(90));
    let mut s = sources(&outs);
    s.dedup();
    assert_eq!(s.len(), 2 * GOOD.len());
}

#[test]
fn sigterm_drains_and_exits_zero_and_nothing_is_lost() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let payloads = good_payloads_times(6);
    publish(&nats.url(), &payloads);
    let mut w = Worker::start(
        &nats,
        &bank,
        threshold,
        &[("OODGATE__SHUTDOWN__DRAIN_TIMEOUT", "10s")],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.metric("oodgate_messages_out_total") < 5.0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    w.signal("TERM");
    assert_eq!(
        w.wait_exit(Duration::from_secs(15)),
        Some(0),
        "SIGTERM exits 0 within the drain timeout"
    );
    // What the first worker NAKed is picked up by the next one; nothing is lost or doubled.
    let _w2 = Worker::start(&nats, &bank, threshold, &[]);
    let outs = outputs(&nats.url(), payloads.len(), Duration::from_secs(90));
    let mut s = sources(&outs);
    let n = s.len();
    s.dedup();
    assert_eq!((s.len(), n), (payloads.len(), payloads.len()));
}

#[test]
fn inputs_that_hit_max_deliver_are_dead_lettered_not_lost() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let env = [
        ("OODGATE__INPUT__MAX_DELIVER", "1"),
        ("OODGATE__INPUT__ACK_WAIT", "2s"),
        ("OODGATE__INPUT__PULL_BATCH", "32"),
    ];
    let mut a = Worker::start(&nats, &bank, threshold, &env);
    let _b = Worker::start(&nats, &bank, threshold, &env);
    let payloads = good_payloads_times(20);
    let url = nats.url();
    let pubs = payloads.clone();
    let publisher = std::thread::spawn(move || publish(&url, &pubs));
    // Kill one worker while it holds pulled, unacked inputs: with max_deliver = 1 the server
    // will not redeliver them, and the other worker dead-letters them from the advisory.
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.metric("oodgate_messages_out_total") < 3.0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    a.signal("KILL");
    let _ = a.wait_exit(Duration::from_secs(5));
    publisher.join().unwrap();
    let outs = outputs(&nats.url(), payloads.len(), Duration::from_secs(60));
    let mut s = sources(&outs);
    let n = s.len();
    s.dedup();
    assert_eq!(
        (s.len(), n),
        (payloads.len(), payloads.len()),
        "every input exactly once"
    );
    let dead = outs
        .iter()
        .filter(|o| {
            o.headers
                .get("Oodgate-Error-Kind")
                .map(|k| k == "max_deliveries")
                .unwrap_or(false)
        })
        .count();
    eprintln!("{dead} inputs dead-lettered after max_deliver");
    assert!(
        dead >= 1,
        "the killed worker's in-flight inputs are dead-lettered"
    );
}

/// `oodgate adaptive reset --bank BANK --nats URL EXTRA...`, which must succeed.
fn adaptive_reset(bank: &std::path::Path, url: &str, extra: &[&str]) {
    let out = common::oodgate()
        .args(["adaptive", "reset", "--bank"])
        .arg(bank)
        .args(["--nats", url])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The adaptive detector on, with `sync`: every image admitted (up to the rate cap), any
/// similarity penalised (k = 1, floor 0, largest penalty 0.25), one image per batch.
fn adaptive_env(sync: &'static str) -> [(&'static str, &'static str); 8] {
    [
        ("OODGATE__DETECTOR__ADAPTIVE__ENABLED", "true"),
        ("OODGATE__DETECTOR__ADAPTIVE__SYNC", sync),
        ("OODGATE__DETECTOR__ADAPTIVE__ADMIT_BELOW", "1e9"),
        ("OODGATE__DETECTOR__ADAPTIVE__MAX_PENALTY", "0.25"),
        ("OODGATE__DETECTOR__ADAPTIVE__K", "1"),
        ("OODGATE__DETECTOR__ADAPTIVE__FLOOR", "0.0"),
        ("OODGATE__DETECTOR__ADAPTIVE__ADMIT_PER_MILLE", "1000"),
        ("OODGATE__BATCH__MAX_SIZE", "1"),
    ]
}

/// `detector.adaptive.enabled` in the daemon: every routed output says what the adaptive term
/// did; the memory starts empty (the first output is `warming`, sequence 0); once an image
/// is admitted, the same image sent again is penalised (cosine 1 > the floor) and
/// `Oodgate-Score` = `Oodgate-Score-Static` − `Oodgate-Adaptive-Penalty`; the memory's size
/// and admissions are in /metrics and, live, in /info. One batch at a time keeps the stream order the input order.
#[test]
fn the_adaptive_detector_in_the_daemon_reports_and_applies_its_penalty() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let w = Worker::start(&nats, &bank, threshold, &adaptive_env("local"));
    let good = std::fs::read(common::fixture("images/chelsea.jpg")).unwrap();
    publish(&nats.url(), &[("first".into(), good.clone())]);
    let first = outputs(&nats.url(), 1, Duration::from_secs(60));
    publish(&nats.url(), &[("second".into(), good)]);
    let outs = outputs(&nats.url(), 2, Duration::from_secs(60));
    assert_eq!((first.len(), outs.len()), (1, 2));
    let h0 = &first[0].headers;
    assert_eq!(h0["Oodgate-Adaptive"], "warming");
    assert_eq!(h0["Oodgate-Adaptive-Seq"], "0");
    assert_eq!(h0["Oodgate-Score"], h0["Oodgate-Score-Static"]);
    let h1 = &outs[1].headers;
    assert_eq!(h1["Oodgate-Adaptive"], "active");
    assert_eq!(h1["Oodgate-Adaptive-Seq"], "1");
    let f = |k: &str| h1[k].parse::<f64>().unwrap();
    // The same image: q1 = 1, a = 1, the full penalty.
    assert!(
        (f("Oodgate-Adaptive-Penalty") - 0.25).abs() < 1e-6,
        "{h1:?}"
    );
    assert!(
        (f("Oodgate-Score") - (f("Oodgate-Score-Static") - 0.25)).abs() < 1e-5,
        "{h1:?}"
    );
    assert_eq!(h1["Oodgate-Score-Static"], h0["Oodgate-Score-Static"]);
    assert_eq!(w.metric("oodgate_adaptive_admissions_total"), 2.0);
    assert_eq!(w.metric("oodgate_adaptive_entries"), 2.0);
    assert_eq!(w.metric("oodgate_adaptive_penalised_total"), 1.0);
    // /info shows the live memory, not only the parameters it started with.
    let (code, body) = w.get("/info").unwrap();
    assert_eq!(code, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    let a = &info["adaptive"];
    assert_eq!(a["sync"], "local");
    assert_eq!(a["params"]["k"], 1);
    assert_eq!(a["live"]["entries"], 2, "{a}");
    assert_eq!(a["live"]["admissions"], 2, "{a}");
    assert_eq!(a["live"]["seq"], 2, "{a}");
}

/// `detector.adaptive.sync = "shared"` with two workers on one server: an admission made by
/// either worker reaches both memories through the stream OODGATE_ADAPT, so the same image
/// sent again is penalised whichever worker takes it; a restarted worker replays the stream
/// and has the same memory again; `oodgate adaptive reset` empties every memory.
#[test]
fn two_workers_share_the_adaptive_memory_through_jetstream() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    let env = adaptive_env("shared");
    let w1 = Worker::start(&nats, &bank, threshold, &env);
    let w2 = Worker::start(&nats, &bank, threshold, &env);
    let good = std::fs::read(common::fixture("images/chelsea.jpg")).unwrap();
    publish(&nats.url(), &[("first".into(), good.clone())]);
    w1.wait_adaptive_entries(1.0);
    w2.wait_adaptive_entries(1.0);
    // Whichever worker takes them, the same image is now penalised in full.
    publish(
        &nats.url(),
        &[
            ("second".into(), good.clone()),
            ("third".into(), good.clone()),
        ],
    );
    let outs = outputs(&nats.url(), 3, Duration::from_secs(60));
    assert_eq!(outs.len(), 3);
    let first = outs
        .iter()
        .find(|o| o.headers["Oodgate-Adaptive"] == "warming")
        .expect("the first output saw an empty memory");
    assert_eq!(first.headers["Oodgate-Adaptive-Seq"], "0");
    for o in outs
        .iter()
        .filter(|o| o.headers["Oodgate-Adaptive"] == "active")
    {
        let p: f64 = o.headers["Oodgate-Adaptive-Penalty"].parse().unwrap();
        assert!((p - 0.25).abs() < 1e-6, "{:?}", o.headers);
    }
    assert!(
        outs.iter()
            .filter(|o| o.headers["Oodgate-Adaptive"] == "active")
            .count()
            >= 2
    );
    w1.wait_adaptive_entries(3.0);
    w2.wait_adaptive_entries(3.0);
    // A restarted worker replays what the stream holds.
    drop(w1);
    let w1 = Worker::start(&nats, &bank, threshold, &env);
    w1.wait_adaptive_entries(3.0);
    // Reset: every memory empties.
    adaptive_reset(&bank, &nats.url(), &[]);
    w1.wait_adaptive_entries(0.0);
    w2.wait_adaptive_entries(0.0);
}

/// Members of a webdataset tar (plain or gzip), in order.
fn tar_members(path: &Path) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let r: Box<dyn Read> = if path.to_string_lossy().ends_with(".gz") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    tar::Archive::new(r)
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let mut d = Vec::new();
            e.read_to_end(&mut d).unwrap();
            (name, d)
        })
        .collect()
}

/// `shard:key` → `decision` from every scores table under `out`, and the same for errors
/// (`kind`).
fn shard_tables(out: &Path, top: &str, col: &str) -> BTreeMap<String, String> {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    let mut m = BTreeMap::new();
    for e in walkdir::WalkDir::new(out.join(top)) {
        let e = e.unwrap();
        if !e.file_type().is_file() {
            continue;
        }
        let f = std::fs::File::open(e.path()).unwrap();
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            let b = b.unwrap();
            let key = b.column_by_name("key").unwrap().as_string::<i32>().clone();
            let shard = b
                .column_by_name("shard")
                .unwrap()
                .as_string::<i32>()
                .clone();
            let v = b.column_by_name(col).unwrap().as_string::<i32>().clone();
            for i in 0..b.num_rows() {
                let k = if key.is_null(i) { "-" } else { key.value(i) };
                m.insert(format!("{}:{k}", shard.value(i)), v.value(i).to_string());
            }
        }
    }
    m
}

#[test]
fn shards_through_two_workers_give_what_filter_gives_on_one_machine() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let (bank, threshold) = make_bank(tmp.path());
    // Two shards with img2dataset members; one sample's image is corrupt, one has none.
    let input = tmp.path().join("in");
    let sample = |key: &str, img: &Path| -> Vec<(String, Vec<u8>)> {
        let ext = img.extension().unwrap().to_str().unwrap().to_string();
        vec![
            (format!("{key}.{ext}"), std::fs::read(img).unwrap()),
            (
                format!("{key}.json"),
                format!("{{\n    \"uid\": \"u{key}\",\n    \"status\": \"success\"\n}}")
                    .into_bytes(),
            ),
            (format!("{key}.txt"), format!("caption {key}").into_bytes()),
        ]
    };
    let write = |path: &Path, members: Vec<(String, Vec<u8>)>, gz: bool| {
        use std::io::Write;
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let f = std::fs::File::create(path).unwrap();
        let w: Box<dyn Write> = if gz {
            Box::new(flate2::write::GzEncoder::new(
                f,
                flate2::Compression::fast(),
            ))
        } else {
            Box::new(f)
        };
        let mut b = tar::Builder::new(w);
        for (name, data) in members {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o444);
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
        b.into_inner().unwrap().flush().unwrap();
    };
    let good: Vec<PathBuf> = GOOD
        .iter()
        .map(|n| common::fixture("images").join(n))
        .collect();
    let mut m0 = Vec::new();
    for (i, p) in good.iter().enumerate() {
        m0.extend(sample(&format!("00000{i:04}"), p));
    }
    m0.extend(sample("000000090", &common::fixture("bad/corrupt.png")));
    m0.push(("000000091.txt".into(), b"no image".to_vec()));
    write(&input.join("00000.tar"), m0, false);
    let mut m1 = Vec::new();
    for (i, p) in good.iter().rev().enumerate().take(7) {
        m1.extend(sample(&format!("00001{i:04}"), p));
    }
    write(&input.join("sub/00001.tar.gz"), m1, true);

    let _a = Worker::start(
        &nats,
        &bank,
        threshold,
        &[("OODGATE__INPUT__PULL_BATCH", "4")],
    );
    let _b = Worker::start(
        &nats,
        &bank,
        threshold,
        &[("OODGATE__INPUT__PULL_BATCH", "4")],
    );
    let state = tmp.path().join("publish-state");
    let publish = || {
        let o = common::oodgate()
            .args(["publish", "--shards", "--nats", &nats.url(), "--state"])
            .arg(&state)
            .arg(&input)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err
    };
    let err = publish();
    assert!(
        err.contains("00000.tar: 16 samples published, 1 not publishable"),
        "{err}"
    );
    // A second publish sends nothing: every shard has its marker.
    let err = publish();
    assert_eq!(
        err.matches("published already, skipped").count(),
        2,
        "{err}"
    );

    let out = tmp.path().join("collected");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = common::oodgate()
            .args([
                "collect",
                "--nats",
                &nats.url(),
                "--idle-exit",
                "2s",
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        if out.join("_state/00000.tar.json").exists()
            && out.join("_state/sub/00001.tar.gz.json").exists()
        {
            break;
        }
        assert!(Instant::now() < deadline, "collect never completed: {err}");
    }

    let local = tmp.path().join("filtered");
    let o = common::oodgate()
        .args(["filter", "--bank"])
        .arg(&bank)
        .arg("--model")
        .arg(common::tiny_model())
        .args([
            "--device",
            "cpu",
            &format!("--threshold={threshold}"),
            "--out",
        ])
        .arg(&local)
        .arg(&input)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let pool = shard_tables(&out, "scores", "decision");
    assert_eq!(pool.len(), 22);
    assert!(pool.values().any(|d| d == "id") && pool.values().any(|d| d == "ood"));
    assert_eq!(pool, shard_tables(&local, "scores", "decision"));
    let errors = shard_tables(&out, "errors", "kind");
    assert_eq!(errors, shard_tables(&local, "errors", "kind"));
    assert_eq!(errors["00000.tar:000000090"], "undecodable");
    assert_eq!(errors["00000.tar:000000091"], "no_image");
    // The filtered shards are the same bytes: members in input order, normalised headers.
    for rel in [
        "id/00000.tar",
        "ood/00000.tar",
        "id/sub/00001.tar.gz",
        "ood/sub/00001.tar.gz",
    ] {
        assert_eq!(
            tar_members(&out.join(rel)),
            tar_members(&local.join(rel)),
            "{rel} differs"
        );
    }
    assert!(
        !out.join("_spool/00000.tar").exists(),
        "the spool of a committed shard is removed"
    );
}
