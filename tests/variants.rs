//! Encoder variants and their fidelity gate, end to end with the real tools: variants written
//! by deploy/model/optimize.py from the tiny random model, checked by `oodgate model check`
//! against a bank of the reference, and refused by `score` until a check passes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn oodgate(args: &[&str]) -> Output {
    common::oodgate().args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn optimize(reference: &Path, out: &Path, precision: &str, extra: &[&str]) {
    let o = Command::new(common::python())
        .arg(common::root().join("deploy/model/optimize.py"))
        .args(["--reference", s(reference), "--out", s(out), "--precision"])
        .arg(precision)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "optimize.py {precision}: {}", text(&o));
}

/// A bank of the reference with a calibrated threshold, on CIFAR-10 and a few words.
fn bank(dir: &Path, model: &Path) -> PathBuf {
    let words = dir.join("words.txt");
    std::fs::write(
        &words,
        "tractor\nviolin\nvolcano\nspoon\nglacier\nsaxophone\n",
    )
    .unwrap();
    let bank = dir.join("b.oodb");
    // Calibrated on other images than the checked ones: the threshold is one of the
    // calibration scores, and a checked image exactly at it would flip on any rounding.
    let images = common::fixture("draft");
    for args in [
        vec![
            "bank",
            "build",
            "--id",
            "cifar10",
            "--outliers",
            s(&words),
            "--templates",
            "mcm",
            "--prototypes",
            "none",
            "--hard-prototypes",
            "0",
            "-o",
            s(&bank),
            "--model",
            s(model),
            "--device",
            "cpu",
        ],
        vec![
            "calibrate",
            "--bank",
            s(&bank),
            "--id",
            s(&images),
            "--write",
            "--model",
            s(model),
            "--device",
            "cpu",
        ],
    ] {
        let o = oodgate(&args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    }
    bank
}

fn check(reference: &Path, variant: &Path, bank: &Path, extra: &[&str]) -> Output {
    let images = common::fixture("images");
    let mut args = vec![
        "model",
        "check",
        "--reference",
        s(reference),
        "--model",
        s(variant),
        "--bank",
        s(bank),
        "--device",
        "cpu",
        "--min-images",
        "10",
        "--json",
    ];
    args.extend_from_slice(extra);
    args.push(s(&images));
    oodgate(&args)
}

fn score(model: &Path, bank: &Path) -> Output {
    oodgate(&[
        "score",
        "--bank",
        s(bank),
        "--model",
        s(model),
        "--device",
        "cpu",
        s(&common::fixture("images")),
    ])
}

fn decisions(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            format!("{} {}", v["input"], v["decision"])
        })
        .collect()
}

/// The gate: an unchecked variant of the bank's model is refused (naming `model check`); a
/// faithful one (fused fp32) passes, is recorded, and then scores with the reference's
/// decisions; a deliberately broken one (another model's weights under the variant's
/// manifest) is refused and stays refused; a variant whose file changed after its check is
/// refused again; the int8 variant's check reports its figures.
#[test]
fn the_fidelity_gate_admits_faithful_variants_only() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = common::tiny_model();
    let bank = bank(tmp.path(), &reference);
    let fp32 = tmp.path().join("fp32");
    optimize(&reference, &fp32, "fp32", &[]);
    let manifest = std::fs::read_to_string(fp32.join("model.toml")).unwrap();
    assert!(manifest.contains("[variant]") && manifest.contains("precision = \"fp32\""));

    // Unchecked: refused.
    let o = score(&fp32, &bank);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("has not passed `oodgate model check`"),
        "{}",
        text(&o)
    );

    // Faithful: passes, recorded, same decisions as the reference.
    let o = check(&reference, &fp32, &bank, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["compatible"], true, "{r}");
    assert_eq!(r["agreement"], 1.0, "{r}");
    assert!(r["cosine_min"].as_f64().unwrap() > 0.99999, "{r}");
    assert_eq!(r["images"], 15, "{r}");
    assert!(fp32.join("compatibility.json").is_file());
    let ours = score(&fp32, &bank);
    assert!(ours.status.success(), "{}", text(&ours));
    assert!(text(&ours).contains("encoder variant"), "{}", text(&ours));
    let theirs = score(&reference, &bank);
    assert_eq!(decisions(&ours), decisions(&theirs));

    // Broken: another model's image tower under the variant's manifest. With the threshold
    // at the reference's median score about half the decisions are OOD, so chance agreement
    // is far below 99.5%.
    let mut scores: Vec<f64> = String::from_utf8_lossy(&theirs.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["score"]
                .as_f64()
                .unwrap()
        })
        .collect();
    scores.sort_by(f64::total_cmp);
    let median = format!("{}", scores[scores.len() / 2]);
    let other = tmp.path().join("other");
    let o = Command::new(common::python())
        .arg(common::root().join("deploy/model/make_test_model.py"))
        .args([
            "--preset",
            "tiny",
            "--seed",
            "7",
            "--no-check",
            "-o",
            s(&other),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(fp32.join("model.toml"), broken.join("model.toml")).unwrap();
    std::fs::copy(other.join("image.onnx"), broken.join("image.onnx")).unwrap();
    let o = check(&reference, &broken, &bank, &["--threshold", &median]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["compatible"], false, "{r}");
    assert!(r["agreement"].as_f64().unwrap() < 0.995, "{r}");
    assert!(!broken.join("compatibility.json").exists());
    let o = score(&broken, &bank);
    assert!(!o.status.success(), "{}", text(&o));

    // A record does not survive a change of the file it was made for.
    std::fs::copy(
        fp32.join("compatibility.json"),
        broken.join("compatibility.json"),
    )
    .unwrap();
    let o = score(&broken, &bank);
    assert!(
        !o.status.success() && text(&o).contains("files changed since the check"),
        "{}",
        text(&o)
    );

    // int8: the check reports its figures, whatever they are on random weights.
    let int8 = tmp.path().join("int8");
    optimize(&reference, &int8, "int8", &[]);
    let o = check(&reference, &int8, &bank, &[]);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["precision"], "int8");
    assert!(r["cosine_min"].as_f64().unwrap() > 0.99, "{r}");
    assert_eq!(o.status.success(), r["compatible"] == true, "{r}");
}

/// A variant with its weights as ONNX external data: the manifest lists the data file, the
/// check covers it, and changing one byte of the weights after the check (the graph file
/// untouched) makes `score` refuse the variant.
#[test]
fn external_data_weights_are_part_of_the_checked_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = common::tiny_model();
    let bank = bank(tmp.path(), &reference);
    let ext = tmp.path().join("ext");
    optimize(&reference, &ext, "fp32", &["--external-data"]);
    let manifest = std::fs::read_to_string(ext.join("model.toml")).unwrap();
    assert!(
        manifest.contains("external_data = [\"image.onnx.data\"]"),
        "{manifest}"
    );
    let data = ext.join("image.onnx.data");
    assert!(
        std::fs::metadata(&data).unwrap().len()
            > std::fs::metadata(ext.join("image.onnx")).unwrap().len()
    );
    let o = check(&reference, &ext, &bank, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let ours = score(&ext, &bank);
    assert!(ours.status.success(), "{}", text(&ours));
    assert_eq!(decisions(&ours), decisions(&score(&reference, &bank)));
    // One weight byte changed; the graph file is the same.
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&data, bytes).unwrap();
    let o = score(&ext, &bank);
    assert!(
        !o.status.success() && text(&o).contains("files changed since the check"),
        "{}",
        text(&o)
    );
}
