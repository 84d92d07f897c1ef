//! `oodgate bank build|inspect|export|import`, `score`, `calibrate` and `eval`, end to end: the
//! real binary on the tiny random-weight CLIP, the image fixtures and a small word list.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

/// Words for the outlier corpus; "cat" and "dog" are CIFAR-10 classes and must be cleaned out.
const WORDS: &str = "rock stone mountain river ocean lake tree flower grass cloud sky sun moon star \
planet galaxy comet volcano desert forest jungle island beach wave sand snow ice glacier canyon \
cliff valley hill meadow swamp marsh pond stream waterfall cave tunnel bridge tower castle church \
temple house barn fence road street highway railway station airport harbor market shop bakery \
library museum school hospital factory kitchen bedroom bathroom garden park playground stadium \
theater cinema painting sculpture guitar piano violin drum trumpet hammer wrench screwdriver \
ladder bucket basket bottle cup plate spoon fork knife chair table lamp cat dog";

fn n_words() -> usize {
    WORDS.split_whitespace().count()
}

fn run(args: &[&str]) -> Output {
    common::oodgate()
        .args(args)
        .output()
        .expect("run the oodgate binary")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "oodgate {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fail(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        !out.status.success(),
        "oodgate {args:?} should have failed:\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let words = WORDS.split_whitespace().collect::<Vec<_>>().join("\n") + "\n";
        std::fs::write(dir.path().join("words.txt"), words).unwrap();
        Fixture {
            dir,
            model: common::tiny_model(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn model(&self) -> &str {
        s(&self.model)
    }

    /// `args` followed by `--model <tiny model> --device cpu`.
    fn with_model<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = args.to_vec();
        v.extend_from_slice(&["--model", self.model(), "--device", "cpu"]);
        v
    }

    /// The arguments of `bank build` with the tiny model, CIFAR-10 and the word list, writing
    /// the bank `out` in the fixture folder, then `extra`.
    fn build_args(&self, out: &str, extra: &[&str]) -> Vec<String> {
        let path = |name: &str| s(&self.path(name)).to_owned();
        let mut args: Vec<String> = ["bank", "build", "--id", "cifar10", "--outliers"]
            .map(String::from)
            .into();
        args.push(path("words.txt"));
        args.extend(["--templates", "mcm", "--k", "8", "--quantile", "0.5"].map(String::from));
        args.extend([
            "--cache".to_owned(),
            path("cache"),
            "-o".to_owned(),
            path(out),
        ]);
        args.extend(extra.iter().map(|e| e.to_string()));
        args
    }

    /// `bank build` (see [`Fixture::build_args`]); returns the parsed `--json` summary.
    fn build(&self, out: &str, extra: &[&str]) -> Value {
        let mut args = self.build_args(out, extra);
        args.push("--json".to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&ok(&self.with_model(&args))).expect("build --json prints JSON")
    }
}

fn images() -> PathBuf {
    common::fixture("images")
}

/// The image files `score` picks up in the fixture folder.
fn n_images() -> usize {
    std::fs::read_dir(images())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.path()
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| {
                    oodgate::model::pipeline::IMAGE_EXTENSIONS
                        .contains(&x.to_ascii_lowercase().as_str())
                })
        })
        .count()
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn hopg_needs_enough_id_classes() {
    let f = Fixture::new();
    let bank = f.path("b.oodb");
    let args = f.build_args("b.oodb", &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = fail(&f.with_model(&args));
    assert!(
        err.contains("150")
            && err.contains("only 10 ID classes")
            && err.contains("--hard-prototypes 0"),
        "{err}"
    );
    assert!(!bank.exists());
    // Smaller HOPG settings work with 10 classes.
    let rep = f.build(
        "h.oodb",
        &["--hopg-clusters", "1", "--hopg-per-cluster", "5"],
    );
    assert_eq!(rep["report"]["counts"]["boundary"], 5);
    let inspect: Value = serde_json::from_str(&ok(&[
        "bank",
        "inspect",
        s(&f.path("h.oodb")),
        "--json",
        "--samples",
        "100",
    ]))
    .unwrap();
    let accepted = rep["report"]["counts"]["accepted"].as_u64().unwrap();
    assert_eq!(
        inspect["outlier_kinds"]["hard"].as_u64().unwrap_or(0),
        accepted
    );
    assert_eq!(inspect["build"]["hopg"]["per_cluster"], 5);
}

#[test]
fn build_inspect_and_embedding_cache() {
    let f = Fixture::new();
    let rep = f.build("b.oodb", &["--no-hopg"]);
    let n_labels = (10 + n_words() - 2) as u64;
    assert_eq!(rep["report"]["cached"], 0);
    assert_eq!(rep["report"]["encoded"].as_u64(), Some(n_labels));
    assert_eq!(rep["random_weights"], true);
    let fp = rep["model_fingerprint"].as_str().unwrap().to_string();
    assert_eq!(fp.len(), 64);

    // One cache folder: 64-dimensional rows, one per label.
    let folders: Vec<PathBuf> = std::fs::read_dir(f.path("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(folders.len(), 1);
    assert!(
        folders[0]
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(&fp[..16])
    );
    let vectors = folders[0].join("vectors.f32");
    assert_eq!(file_len(&vectors), n_labels * 64 * 4);

    // A rebuild takes everything from the cache and gives the same bank.
    let rep2 = f.build("b2.oodb", &["--no-hopg"]);
    assert_eq!(rep2["report"]["cached"].as_u64(), Some(n_labels));
    assert_eq!(rep2["report"]["encoded"], 0);
    assert_eq!(rep2["report"]["prompts"], 0);
    assert_eq!(file_len(&vectors), n_labels * 64 * 4, "cache did not grow");
    assert_eq!(rep2["version"], rep["version"]);

    let text = ok(&["bank", "inspect", s(&f.path("b.oodb"))]);
    assert!(
        text.contains("10 ID classes") && text.contains("prototype"),
        "{text}"
    );
    let j: Value =
        serde_json::from_str(&ok(&["bank", "inspect", s(&f.path("b.oodb")), "--json"])).unwrap();
    assert_eq!(j["n_id"], 10);
    assert_eq!(j["dim"], 64);
    assert_eq!(j["format"], 1);
    assert_eq!(j["version"], rep["version"]);
    assert_eq!(j["model_fingerprint"], fp.as_str());
    assert_eq!(j["model_weights"], "random");
    assert_eq!(j["model_name"], "tiny-random");
    assert_eq!(j["has_no_embeddings"], false);
    assert_eq!(j["build"]["k"], 8);
    assert_eq!(j["build"]["quantile"], 0.5);
    assert_eq!(j["build"]["seed"], 42);
    assert_eq!(j["build"]["hopg"], Value::Null);
    assert_eq!(j["build"]["templates"]["name"], "mcm");
    assert_eq!(j["build"]["id"], "cifar10");
    assert_eq!(j["build"]["mode"], "prototypes");
    assert_eq!(j["cleaning"]["outliers"]["exact"], 2, "cat and dog");
    assert_eq!(
        j["cleaning"]["outliers"]["kept"].as_u64(),
        Some(n_labels - 10)
    );
    assert!(j["theta"].as_f64().is_some());
    assert!(j["thresholds"].as_object().unwrap().is_empty());
    let kept = j["build"]["counts"]["kept"].as_u64().unwrap();
    assert!((1..=8).contains(&kept));
    assert_eq!(j["n_outliers"].as_u64(), Some(kept));
    let sample = &j["outliers_sample"][0];
    assert_eq!(sample["kind"], "prototype");
    let sample_words = sample["words"].as_array().unwrap();
    assert!(!sample_words.is_empty() && sample_words.len() <= 10);
    assert_eq!(sample["label"], sample_words[0]);
    let ids: Vec<&str> = j["id_labels_sample"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(ids[..3], ["airplane", "automobile", "bird"]);

    // --raw-outliers keeps every word.
    let raw = f.build("raw.oodb", &["--raw-outliers"]);
    assert_eq!(raw["report"]["n_outliers"].as_u64(), Some(n_labels - 10));
    assert_eq!(raw["report"]["encoded"], 0, "same templates: all cached");
}

#[test]
fn score_images_and_npy_agree() {
    let f = Fixture::new();
    f.build("b.oodb", &["--no-hopg"]);
    let bank = f.path("b.oodb");
    let out = f.path("scores.jsonl");
    let imgs = images();

    // No threshold anywhere: a clear error.
    let err = fail(&f.with_model(&["score", "--bank", s(&bank), s(&imgs)]));
    assert!(
        err.contains("no calibrated threshold") && err.contains("oodgate calibrate"),
        "{err}"
    );

    let threshold = 0.7219;
    ok(&f.with_model(&[
        "score",
        "--bank",
        s(&bank),
        "--threshold",
        &threshold.to_string(),
        s(&imgs),
        "-o",
        s(&out),
    ]));
    let lines = jsonl(&out);
    assert_eq!(lines.len(), n_images());
    for l in &lines {
        for key in [
            "input",
            "score",
            "decision",
            "method",
            "threshold",
            "top_labels",
            "nearest_outliers",
        ] {
            assert!(l.get(key).is_some(), "{key} missing in {l}");
        }
        let score = l["score"].as_f64().unwrap();
        assert!(score > 0.0 && score < 1.0, "{l}");
        let want = if score < threshold { "ood" } else { "id" };
        assert_eq!(l["decision"], want, "{l}");
        assert_eq!(l["method"], "ole");
        assert_eq!(l["threshold"], threshold);
        assert_eq!(l["top_labels"].as_array().unwrap().len(), 3);
        assert!(!l["nearest_outliers"].as_array().unwrap().is_empty());
        assert!(l["top_labels"][0]["label"].is_string() && l["top_labels"][0]["cos"].is_f64());
    }

    // The same images as precomputed embeddings score the same.
    let npy = f.path("emb.npy");
    ok(&f.with_model(&["embed", s(&imgs), "-o", s(&npy)]));
    let out2 = f.path("scores2.jsonl");
    ok(&[
        "score",
        "--bank",
        s(&bank),
        "--threshold",
        &threshold.to_string(),
        s(&npy),
        "-o",
        s(&out2),
    ]);
    let lines2 = jsonl(&out2);
    assert_eq!(lines2.len(), lines.len());
    for (a, b) in lines.iter().zip(&lines2) {
        assert_eq!(a["input"], b["input"], "row names come from emb.txt");
        let (x, y) = (a["score"].as_f64().unwrap(), b["score"].as_f64().unwrap());
        assert!((x - y).abs() < 1e-9, "{x} vs {y}");
        assert_eq!(a["decision"], b["decision"]);
    }

    // Another method, stdout output.
    let stdout = ok(&[
        "score",
        "--bank",
        s(&bank),
        "--method",
        "mcm",
        "--threshold",
        "0.1",
        "--top-k",
        "0",
        s(&npy),
    ]);
    let first: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["method"], "mcm");
    assert_eq!(first["top_labels"], serde_json::json!([]));
    // clipn-atd needs "no" embeddings, which this bank lacks.
    let err = fail(&[
        "score",
        "--bank",
        s(&bank),
        "--method",
        "clipn-atd",
        "--threshold",
        "0.5",
        s(&npy),
    ]);
    assert!(err.contains("\"no\" embeddings"), "{err}");
}

#[test]
fn calibrate_write_then_score_uses_it() {
    let f = Fixture::new();
    f.build("b.oodb", &["--no-hopg"]);
    let bank = f.path("b.oodb");
    let imgs = images();
    let cal: Value = serde_json::from_str(&ok(&f.with_model(&[
        "calibrate",
        "--bank",
        s(&bank),
        "--id",
        s(&imgs),
        "--tpr",
        "0.8",
        "--write",
        "--json",
    ])))
    .unwrap();
    let t = &cal["thresholds"][0];
    assert_eq!(t["method"], "ole");
    assert_eq!(t["n_id"].as_u64(), Some(n_images() as u64));
    assert!(t["achieved_tpr"].as_f64().unwrap() >= 0.8);
    let lambda = t["threshold"].as_f64().unwrap();

    let j: Value = serde_json::from_str(&ok(&["bank", "inspect", s(&bank), "--json"])).unwrap();
    assert_eq!(j["thresholds"]["ole"]["value"].as_f64(), Some(lambda));
    assert_eq!(j["thresholds"]["ole"]["tpr"], 0.8);
    assert_eq!(j["version"], cal["bank_version"]);

    let out = f.path("s.jsonl");
    ok(&f.with_model(&["score", "--bank", s(&bank), s(&imgs), "-o", s(&out)]));
    let lines = jsonl(&out);
    assert!(
        lines
            .iter()
            .all(|l| l["threshold"].as_f64() == Some(lambda))
    );
    let n_id = lines.iter().filter(|l| l["decision"] == "id").count();
    assert!(
        n_id as f64 >= 0.8 * lines.len() as f64,
        "{n_id} of {}",
        lines.len()
    );
    // --threshold still wins.
    let lines = ok(&f.with_model(&[
        "score",
        "--bank",
        s(&bank),
        "--threshold",
        "2",
        s(&imgs.join("chelsea.jpg")),
    ]));
    let l: Value = serde_json::from_str(lines.trim()).unwrap();
    assert_eq!(l["decision"], "ood");

    // A scale override cannot be stored.
    let err = fail(&[
        "calibrate",
        "--bank",
        s(&bank),
        "--model",
        f.model(),
        "--id",
        s(&imgs),
        "--scale",
        "10",
        "--write",
    ]);
    assert!(err.contains("--scale"), "{err}");
}

#[test]
fn eval_table_json_and_plot() {
    let f = Fixture::new();
    f.build("b.oodb", &["--no-hopg"]);
    let bank = f.path("b.oodb");
    let img = |n: &str| images().join(n);
    let (a, b, c, d) = (
        img("chelsea.jpg"),
        img("coffee.jpg"),
        img("astronaut.png"),
        img("rocket.jpg"),
    );
    let (x1, x2, y1) = (img("wide.jpg"), img("tall.png"), img("palette.png"));
    let ood_x1 = format!("x={}", s(&x1));
    let ood_x2 = format!("x={}", s(&x2));
    let ood_y1 = format!("y={}", s(&y1));
    let plot = f.path("eval.png");
    let base = [
        "eval",
        "--bank",
        s(&bank),
        "--model",
        f.model(),
        "--device",
        "cpu",
        "--method",
        "ole,mcm,energy",
        "--id",
        s(&a),
        s(&b),
        s(&c),
        s(&d),
        "--ood",
        &ood_x1,
        "--ood",
        &ood_x2,
        "--ood",
        &ood_y1,
    ];
    let mut args = base.to_vec();
    args.extend(["--plot", s(&plot)]);
    let table = ok(&args);
    assert!(table.contains("random weights"), "banner: {table}");
    for needle in [
        "AUROC", "FPR95", "AUPR-In", "AUPR-Out", "average", "ole", "mcm", "energy",
    ] {
        assert!(table.contains(needle), "{needle} missing:\n{table}");
    }
    let png = std::fs::read(&plot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    let mut args = base.to_vec();
    args.push("--json");
    let j: Value = serde_json::from_str(&ok(&args)).unwrap();
    assert_eq!(j["random_weights"], true);
    assert_eq!(j["n_id"], 4);
    let results = j["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["method"], "ole");
    for r in results {
        assert_eq!(r["sets"]["x"]["n_ood"], 2);
        assert_eq!(r["sets"]["y"]["n_ood"], 1);
        for set in [&r["sets"]["x"], &r["sets"]["y"], &r["average"]] {
            for k in ["auroc", "fpr95", "aupr_in", "aupr_out"] {
                let v = set[k].as_f64().unwrap_or(f64::NAN);
                assert!((0.0..=1.0).contains(&v), "{k} = {v} in {r}");
            }
        }
        let mean = (r["sets"]["x"]["auroc"].as_f64().unwrap()
            + r["sets"]["y"]["auroc"].as_f64().unwrap())
            / 2.0;
        assert!((r["average"]["auroc"].as_f64().unwrap() - mean).abs() < 1e-12);
    }

    let err = fail(&[
        "eval",
        "--bank",
        s(&bank),
        "--model",
        f.model(),
        "--id",
        s(&a),
        "--ood",
        "no-equals-sign",
    ]);
    assert!(err.contains("NAME=INPUT"), "{err}");
}

#[test]
fn export_import_round_trip_and_fingerprint_mismatch() {
    let f = Fixture::new();
    f.build("b.oodb", &["--no-hopg"]);
    let bank = f.path("b.oodb");
    let exp = f.path("exported");
    ok(&["bank", "export", s(&bank), "-o", s(&exp)]);
    let imported = f.path("imported.oodb");
    ok(&[
        "bank",
        "import",
        "--id-embeddings",
        s(&exp.join("id.npy")),
        "--id-labels",
        s(&exp.join("id_labels.txt")),
        "--outliers",
        s(&exp.join("outliers.npy")),
        "--outlier-labels",
        s(&exp.join("outlier_labels.txt")),
        "--model",
        f.model(),
        "-o",
        s(&imported),
    ]);
    let orig: Value = serde_json::from_str(&ok(&["bank", "inspect", s(&bank), "--json"])).unwrap();
    let imp: Value =
        serde_json::from_str(&ok(&["bank", "inspect", s(&imported), "--json"])).unwrap();
    for k in [
        "n_id",
        "n_outliers",
        "dim",
        "model_fingerprint",
        "model_weights",
    ] {
        assert_eq!(orig[k], imp[k], "{k}");
    }
    assert_eq!(imp["outliers_sample"][0]["kind"], "imported");
    assert_eq!(
        imp["outliers_sample"][0]["label"],
        orig["outliers_sample"][0]["label"]
    );
    let imgs = images();
    let score = |b: &Path| {
        let out = ok(&f.with_model(&["score", "--bank", s(b), "--threshold", "0.5", s(&imgs)]));
        out.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["score"]
                    .as_f64()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(score(&bank), score(&imported));

    // A bank for another model is refused, naming both fingerprints; --force overrides.
    let other = f.path("other.oodb");
    ok(&[
        "bank",
        "import",
        "--id-embeddings",
        s(&exp.join("id.npy")),
        "--id-labels",
        "cifar10",
        "--model-fingerprint",
        "deadbeefcafe",
        "-o",
        s(&other),
    ]);
    let fp = orig["model_fingerprint"].as_str().unwrap();
    let err = fail(&f.with_model(&["score", "--bank", s(&other), "--threshold", "0.5", s(&imgs)]));
    assert!(err.contains("deadbeefcafe") && err.contains(fp), "{err}");
    ok(&f.with_model(&[
        "score",
        "--bank",
        s(&other),
        "--threshold",
        "0.5",
        "--force",
        s(&imgs),
    ]));
    // Mismatched label count.
    let err = fail(&[
        "bank",
        "import",
        "--id-embeddings",
        s(&exp.join("id.npy")),
        "--id-labels",
        "cifar100",
        "--model-fingerprint",
        "x",
        "-o",
        s(&f.path("bad.oodb")),
    ]);
    assert!(err.contains("100 ID labels for 10"), "{err}");
}

#[test]
fn neglabel_bank_scores_with_neglabel() {
    let f = Fixture::new();
    let rep = f.build("n.oodb", &["--neglabel"]);
    let candidates = (n_words() - 2) as u64;
    assert_eq!(rep["report"]["mode"], "neglabel");
    assert_eq!(rep["report"]["n_outlier_words"].as_u64(), Some(candidates));
    // 15 % of the candidates, rounded down.
    assert_eq!(
        rep["report"]["n_outliers"].as_u64(),
        Some(candidates * 15 / 100)
    );
    let bank = f.path("n.oodb");
    let j: Value = serde_json::from_str(&ok(&["bank", "inspect", s(&bank), "--json"])).unwrap();
    // --templates (here mcm) embeds the ID labels; the candidates use NegLabel's templates.
    assert_eq!(j["build"]["templates"]["name"], "mcm");
    assert_eq!(
        j["build"]["neglabel"]["noun_templates"]["name"],
        "neglabel-noun"
    );
    assert_eq!(j["outliers_sample"][0]["kind"], "negative");
    let out = ok(&f.with_model(&[
        "score",
        "--bank",
        s(&bank),
        "--method",
        "neglabel",
        "--threshold",
        "0.5",
        s(&images().join("chelsea.jpg")),
    ]));
    let l: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(l["method"], "neglabel");
    let score = l["score"].as_f64().unwrap();
    assert!(score > 0.0 && score < 1.0);
}

/// A bank whose outlier rows exceed `--exact-limit` is scored with the HNSW head plus the
/// sampled tail; with the whole bank as the tail sample the result equals exact scoring. The
/// bank file carries its HNSW index.
#[test]
fn large_outlier_bank_scores_approximately_and_carries_its_index() {
    let f = Fixture::new();
    f.build("b.oodb", &["--no-hopg"]);
    let exp = f.path("exported");
    ok(&["bank", "export", s(&f.path("b.oodb")), "-o", s(&exp)]);
    let id = oodgate::npy::read_npy(&exp.join("id.npy")).unwrap();
    // 3,000 outlier rows: the ID rows mixed with deterministic noise, so some sit close to
    // the images and the softmax mass is spread over many rows.
    let m = 3000;
    let mut state = 7u64;
    let mut noise = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let out = ndarray::Array2::from_shape_fn((m, id.ncols()), |(i, j)| {
        id[[i % id.nrows(), j]] + 0.15 * noise()
    });
    let out_npy = f.path("outliers.npy");
    ndarray_npy::write_npy(&out_npy, &out).unwrap();
    let labels: String = (0..m).map(|i| format!("word{i}\n")).collect();
    std::fs::write(f.path("outlier_labels.txt"), labels).unwrap();
    let bank = f.path("large.oodb");
    ok(&[
        "bank",
        "import",
        "--id-embeddings",
        s(&exp.join("id.npy")),
        "--id-labels",
        s(&exp.join("id_labels.txt")),
        "--outliers",
        s(&out_npy),
        "--outlier-labels",
        s(&f.path("outlier_labels.txt")),
        "--model",
        f.model(),
        "-o",
        s(&bank),
    ]);
    let info: Value = serde_json::from_str(&ok(&["bank", "inspect", s(&bank), "--json"])).unwrap();
    assert_eq!(info["n_outliers"], m);
    // The stored graphs hold at least every vector once (hnsw_rs's data dump).
    let index_bytes = info["index"]["bytes"].as_u64().unwrap();
    assert!(index_bytes > (m * id.ncols() * 4) as u64, "{index_bytes}");

    let emb = f.path("x.npy");
    ok(&f.with_model(&["embed", s(&images()), "-o", s(&emb)]));
    let score = |extra: &[&str]| -> Vec<(f64, String)> {
        let mut args = vec!["score", "--bank", s(&bank), "--threshold", "0.5", s(&emb)];
        args.extend_from_slice(extra);
        ok(&args)
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["score"].as_f64().unwrap(),
                    v["nearest_outliers"][0]["label"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                )
            })
            .collect()
    };
    let exact = score(&[]);
    assert_eq!(exact.len(), n_images());
    let whole_tail = score(&["--exact-limit", "1000", "--approx-tail-sample", "3000"]);
    let sampled = score(&[
        "--exact-limit",
        "1000",
        "--approx-candidates",
        "32",
        "--approx-tail-sample",
        "300",
    ]);
    for ((e, w), a) in exact.iter().zip(&whole_tail).zip(&sampled) {
        assert!(
            (e.0 - w.0).abs() <= 2e-5 * e.0.abs().max(1e-12),
            "{} vs {}",
            e.0,
            w.0
        );
        assert!(a.0 > 0.0 && a.0 < 1.0, "{}", a.0);
        assert!(e.1.starts_with("word") && w.1.starts_with("word"));
    }
    // A 10% tail sample is an estimate: it moves the scores, so the approximate path ran.
    assert!(exact.iter().zip(&sampled).any(|(e, a)| e.0 != a.0));
    // eval and calibrate take the same flags.
    ok(&[
        "calibrate",
        "--bank",
        s(&bank),
        "--id",
        s(&emb),
        "--exact-limit",
        "1000",
    ]);
}

/// `bank build` of CIFAR-10 from the ID matrix `t` and the outlier matrix `o` whose rows are
/// the word lines of `outliers`.
fn precomputed_args<'a>(t: &'a Path, o: &'a Path, outliers: &'a str) -> Vec<&'a str> {
    vec![
        "bank",
        "build",
        "--id",
        "cifar10",
        "--id-embeddings",
        s(t),
        "--outliers",
        outliers,
        "--outlier-embeddings",
        s(o),
    ]
}

/// `bank build --id-embeddings/--outlier-embeddings`: fed the text tower's own label embeddings
/// (a `--prototypes none` bank's export: T and every cleaned word's row), each variant builds
/// the bank that encoding builds (the same rows, byte for byte in the export); the variant and
/// `--scale` are recorded, shown by `bank inspect` and used by `score` and `eval`; impossible
/// variant flags are refused with advice.
#[test]
fn banks_from_precomputed_embeddings_and_variants() {
    let f = Fixture::new();
    f.build("all.oodb", &["--prototypes", "none"]);
    let exp = f.path("all");
    ok(&["bank", "export", s(&f.path("all.oodb")), "-o", s(&exp)]);
    let (t, o, lines) = (
        exp.join("id.npy"),
        exp.join("outliers.npy"),
        exp.join("outlier_labels.txt"),
    );
    let export = |bank: &str| {
        let dir = f.path(&format!("{bank}.export"));
        ok(&["bank", "export", s(&f.path(bank)), "-o", s(&dir)]);
        (
            std::fs::read(dir.join("id.npy")).unwrap(),
            std::fs::read(dir.join("outliers.npy")).unwrap(),
            std::fs::read_to_string(dir.join("outlier_labels.txt")).unwrap(),
        )
    };
    let inspect = |bank: &str| -> Value {
        serde_json::from_str(&ok(&["bank", "inspect", s(&f.path(bank)), "--json"])).unwrap()
    };
    for (variant, extra) in [
        ("words", vec!["--prototypes", "words"]),
        ("kmeans", vec!["--hard-prototypes", "0"]),
        ("none", vec!["--raw-outliers"]),
    ] {
        let encoded = format!("enc-{variant}.oodb");
        f.build(&encoded, &extra);
        let pre = format!("pre-{variant}.oodb");
        let mut args = precomputed_args(&t, &o, s(&lines));
        args.extend(["--model", f.model(), "--k", "8", "--quantile", "0.5"]);
        args.extend(&extra);
        let out = f.path(&pre);
        args.extend(["-o", s(&out)]);
        ok(&args);
        assert_eq!(export(&pre), export(&encoded), "{variant}");
        let (a, b) = (inspect(&pre), inspect(&encoded));
        assert_eq!(a["model_fingerprint"], b["model_fingerprint"]);
        assert_eq!(a["theta"], b["theta"], "{variant}");
        assert_eq!(a["variant"]["label_source"], "precomputed");
        assert_eq!(b["variant"]["label_source"], "text-encoder");
        assert_eq!(a["variant"]["prototypes"], variant);
    }
    assert_eq!(inspect("enc-words.oodb")["variant"]["hard_prototypes"], 0);
    assert_eq!(inspect("all.oodb")["outlier_kinds"]["label"], n_words() - 2);

    // --scale is stored and used: score's JSON and eval's report carry it; a flag overrides.
    let scaled = f.path("scaled.oodb");
    let fingerprint = inspect("all.oodb")["model_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut args = precomputed_args(&t, &o, s(&lines));
    args.extend([
        "--model-fingerprint",
        &fingerprint,
        "--prototypes",
        "words",
        "--quantile",
        "0.5",
        "--scale",
        "12.5",
        "-o",
        s(&scaled),
    ]);
    ok(&args);
    let i = inspect("scaled.oodb");
    assert_eq!(i["scale"], 12.5);
    assert_eq!(i["model_weights"], "unknown");
    let text = ok(&["bank", "inspect", s(&scaled)]);
    assert!(
        text.contains(
            "--prototypes words --hard-prototypes 0, labels from precomputed, scale 12.5"
        ),
        "{text}"
    );
    let emb = f.path("img.npy");
    ok(&f.with_model(&["embed", s(&images()), "-o", s(&emb)]));
    let eval = |extra: &[&str]| -> Value {
        let mut args = vec![
            "eval",
            "--bank",
            s(&scaled),
            "--method",
            "ole",
            "--id",
            s(&emb),
            "--ood",
        ];
        let ood = format!("same={}", s(&emb));
        args.push(&ood);
        args.extend(extra);
        args.push("--json");
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let default_scale = eval(&[]);
    let overridden = eval(&["--scale", "50"]);
    let scale_of = |v: &Value| v.to_string();
    assert!(
        scale_of(&default_scale).contains("\"scale\":12.5"),
        "{default_scale}"
    );
    assert!(
        scale_of(&overridden).contains("\"scale\":50.0"),
        "{overridden}"
    );

    // Refused: HOPG without a refinement, a count that is not a multiple of the components,
    // outlier embeddings whose rows do not match the list, the generated WordNet corpus.
    let base = |outliers: &str, extra: &[&str]| {
        let mut v = precomputed_args(&t, &o, outliers);
        v.extend(["--model-fingerprint", "x"]);
        v.extend(extra);
        v.extend(["-o", s(&scaled)]);
        fail(&v)
    };
    let err = base(
        s(&lines),
        &["--prototypes", "none", "--hard-prototypes", "150"],
    );
    assert!(
        err.contains("θ") && err.contains("--hard-prototypes 0"),
        "{err}"
    );
    let err = base(s(&lines), &["--hard-prototypes", "7"]);
    assert!(err.contains("multiple of --hopg-clusters 5"), "{err}");
    let words = f.path("words.txt");
    let err = base(s(&words), &["--prototypes", "words"]);
    assert!(err.contains("rows but the outlier list has"), "{err}");
    let err = base("wordnet", &["--prototypes", "words"]);
    assert!(err.contains("one per line in row order"), "{err}");
}

/// `eval` compares banks: a row per bank × method on inputs embedded once, and paired bootstrap
/// intervals against the first row. MCM ignores the outlier rows, so the second bank's MCM
/// row equals the first row exactly (difference and interval 0); the seed fixes the intervals.
#[test]
fn eval_compares_banks_with_paired_bootstrap_intervals() {
    let f = Fixture::new();
    f.build("a.oodb", &["--hard-prototypes", "0"]);
    f.build("b.oodb", &["--prototypes", "words"]);
    let emb = f.path("img.npy");
    ok(&f.with_model(&["embed", s(&images()), "-o", s(&emb)]));
    let ood = format!("same={}", s(&emb));
    let (a, b) = (f.path("a.oodb"), f.path("b.oodb"));
    let args = |seed: &'static str, json: bool| {
        let mut v = vec![
            "eval",
            "--bank",
            s(&a),
            "--bank",
            s(&b),
            "--method",
            "mcm,ole",
            "--id",
            s(&emb),
            "--ood",
            &ood,
            "--bootstrap",
            "200",
            "--bootstrap-seed",
            seed,
        ];
        if json {
            v.push("--json");
        }
        ok(&v)
    };
    let out: Value = serde_json::from_str(&args("3", true)).unwrap();
    let rows = out["results"].as_array().unwrap();
    let names: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["bank_label"].as_str().unwrap(),
                r["method"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(names, ["a/mcm", "a/ole", "b/mcm", "b/ole"]);
    assert!(rows[0]["vs_first"].is_null());
    assert_eq!(out["bootstrap"]["reference"], "a/mcm");
    let zero = serde_json::json!({"diff": 0.0, "lo": 0.0, "hi": 0.0});
    assert_eq!(rows[2]["vs_first"]["average"]["auroc"], zero);
    assert_eq!(rows[2]["vs_first"]["sets"]["same"]["fpr95"], zero);
    for r in &rows[1..] {
        for m in ["auroc", "fpr95"] {
            let iv = &r["vs_first"]["average"][m];
            let (d, lo, hi) = (
                iv["diff"].as_f64().unwrap(),
                iv["lo"].as_f64().unwrap(),
                iv["hi"].as_f64().unwrap(),
            );
            let full = r["average"][m].as_f64().unwrap() - rows[0]["average"][m].as_f64().unwrap();
            assert!((d - full).abs() < 1e-12, "{r}");
            assert!(lo <= hi, "{r}");
        }
    }
    assert_eq!(args("3", true), args("3", true));
    let text = args("3", false);
    assert!(text.contains("difference to a/mcm"), "{text}");
    assert!(text.contains("b/ole"), "{text}");

    // Banks of another model cannot share the embeddings.
    let exp = f.path("exp");
    ok(&["bank", "export", s(&a), "-o", s(&exp)]);
    let other = f.path("other.oodb");
    ok(&[
        "bank",
        "import",
        "--id-embeddings",
        s(&exp.join("id.npy")),
        "--id-labels",
        "cifar10",
        "--model-fingerprint",
        "0123456789abcdef",
        "-o",
        s(&other),
    ]);
    let err = fail(&[
        "eval",
        "--bank",
        s(&a),
        "--bank",
        s(&other),
        "--id",
        s(&emb),
        "--ood",
        &ood,
    ]);
    assert!(
        err.contains("the same embeddings cannot serve both"),
        "{err}"
    );
}

/// `score --adaptive` and `eval --adaptive`: the adaptive detector needs the bank's adaptive
/// calibration (stored by `calibrate --write`), reports the static score and what the term
/// did per input, and gives the same output for the same input order (and order seed).
#[test]
fn adaptive_scoring_offline_is_calibrated_and_deterministic() {
    let f = Fixture::new();
    f.build("b.oodb", &["--hard-prototypes", "0"]);
    let bank = f.path("b.oodb");
    let emb = f.path("img.npy");
    ok(&f.with_model(&["embed", s(&images()), "-o", s(&emb)]));
    let score = |extra: &[&str]| {
        let mut args = vec![
            "score",
            "--bank",
            s(&bank),
            "--adaptive",
            "--adaptive-k",
            "1",
        ];
        args.extend(extra);
        args.push(s(&emb));
        run(&args)
    };
    let out = score(&["--threshold", "0.5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no adaptive calibration"),
        "{err}"
    );

    let cal: Value = serde_json::from_str(&ok(&[
        "calibrate",
        "--bank",
        s(&bank),
        "--method",
        "ole",
        "--id",
        s(&emb),
        "--write",
        "--json",
    ]))
    .unwrap();
    let ad = &cal["thresholds"][0]["adaptive"];
    assert!(ad["max_penalty"].as_f64().unwrap() >= 0.0, "{cal}");
    assert!(
        ad["admit_below"].as_f64().unwrap() <= cal["thresholds"][0]["threshold"].as_f64().unwrap()
    );
    // The floor: the 95th percentile (the ⌈0.95 n⌉-th smallest) of each input's 5th-largest
    // cosine to the others, recomputed here from the embeddings with plain loops.
    let x = oodgate::npy::read_npy(&emb).unwrap();
    let n = x.nrows();
    assert!(n > 5, "the fixture needs more than k = 5 images");
    let unit: Vec<Vec<f64>> = x
        .rows()
        .into_iter()
        .map(|r| {
            let norm = r.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
            r.iter().map(|&v| f64::from(v) / norm).collect()
        })
        .collect();
    let mut fifth: Vec<f64> = (0..n)
        .map(|i| {
            let mut c: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum())
                .collect();
            c.sort_by(|a, b| b.total_cmp(a));
            c[4]
        })
        .collect();
    fifth.sort_by(f64::total_cmp);
    let want = fifth[(0.95 * n as f64).ceil() as usize - 1];
    let floor = &ad["floor"];
    assert_eq!(
        (floor["k"].as_u64(), floor["n"].as_u64()),
        (Some(5), Some(n as u64)),
        "{ad}"
    );
    assert!(
        (floor["value"].as_f64().unwrap() - want).abs() < 1e-5,
        "{ad} vs {want}"
    );

    let scored = score(&[]);
    assert!(scored.status.success());
    let a = String::from_utf8_lossy(&scored.stdout).to_string();
    // Without --adaptive-floor, the calibrated floor.
    let note = String::from_utf8_lossy(&scored.stderr);
    let used: f64 = note
        .lines()
        .find_map(|l| l.strip_prefix("adaptive: "))
        .and_then(|l| l.rsplit_once("(floor "))
        .and_then(|(_, r)| r.trim_end().strip_suffix(')'))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{note}"));
    assert!((used - want).abs() < 1e-5, "{note} vs {want}");
    let lines: Vec<Value> = a
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n_images());
    for l in &lines {
        let (sc, st, pen) = (
            l["score"].as_f64().unwrap(),
            l["static_score"].as_f64().unwrap(),
            l["adaptive"]["penalty"].as_f64().unwrap(),
        );
        assert!((sc - (st - pen)).abs() < 1e-12 && pen >= 0.0, "{l}");
    }
    // The first input sees an empty memory.
    assert_eq!(lines[0]["adaptive"]["seq"], 0);
    assert_eq!(lines[0]["adaptive"]["active"], false);
    assert_eq!(a, String::from_utf8_lossy(&score(&[]).stdout));

    let ood = format!("same={}", s(&emb));
    let eval = |seed: &str| {
        ok(&[
            "eval",
            "--bank",
            s(&bank),
            "--method",
            "ole",
            "--id",
            s(&emb),
            "--ood",
            &ood,
            "--adaptive",
            "--order-seed",
            seed,
            "--bootstrap",
            "50",
            "--json",
        ])
    };
    let e: Value = serde_json::from_str(&eval("4")).unwrap();
    let rows = e["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0]["adaptive"].clone(), rows[1]["adaptive"].clone()),
        (false.into(), true.into())
    );
    assert_eq!(eval("4"), eval("4"));
}
