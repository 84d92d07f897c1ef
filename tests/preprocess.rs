//! CLIP preprocessing against reference tensors computed with Pillow
//! (deploy/tools/make_preprocess_refs.py) on CC0/public-domain images.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

mod common;

use oodgate::model::preprocess::{Limits, PreprocessError, Preprocessor};

#[allow(clippy::excessive_precision)]
const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
const STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

fn clip() -> Preprocessor {
    Preprocessor::new(224, MEAN, STD, Limits::default())
}

#[test]
fn matches_pillow_reference_on_every_fixture() {
    let pre = clip();
    let refs = common::fixture("preprocess");
    let mut checked = 0;
    let mut report = Vec::new();
    for entry in std::fs::read_dir(common::fixture("images")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".md") {
            continue;
        }
        let reference = common::read_u8_npy(&refs.join(format!("{name}.npy")));
        assert_eq!(reference.shape(), &[224, 224, 3], "{name}");
        let bytes = std::fs::read(&path).unwrap();
        let ours = pre
            .preprocess(&bytes)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (mut max, mut sum) = (0f32, 0f64);
        for c in 0..3 {
            for y in 0..224 {
                for x in 0..224 {
                    let r = (reference[[y, x, c]] as f32 / 255.0 - MEAN[c]) / STD[c];
                    let d = (ours[[c, y, x]] - r).abs();
                    max = max.max(d);
                    sum += d as f64;
                }
            }
        }
        let mean = sum / (3.0 * 224.0 * 224.0);
        report.push(format!("{name}: max {max:.4} mean {mean:.5}"));
        assert!(
            max <= 0.03 && mean <= 0.002,
            "{name}: max |Δ| {max} mean |Δ| {mean}\n{}",
            report.join("\n")
        );
        // libjpeg-turbo and the Pillow resampler are reproduced exactly, so everything but
        // CMYK JPEGs (converted by the generic decoder) is bit-identical to Pillow.
        if name != "cmyk.jpg" {
            assert!(max < 1e-6, "{name} is not pixel-identical to Pillow: {max}");
        }
        checked += 1;
    }
    eprintln!("{}", report.join("\n"));
    assert!(checked >= 10, "only {checked} fixtures checked");
}

#[test]
fn bad_inputs_give_typed_errors_naming_the_cause() {
    let pre = clip();
    let cases = [
        ("empty.jpg", "empty"),
        ("truncated.jpg", "corrupt"),
        ("not-an-image.txt", "not_image"),
        ("corrupt.png", "corrupt"),
        ("bomb.png", "too_many_pixels"),
        ("huge-dims.jpg", "too_many_pixels"),
    ];
    for (file, kind) in cases {
        let bytes = std::fs::read(common::fixture("bad").join(file)).unwrap();
        let err = pre.preprocess(&bytes).expect_err(file);
        assert_eq!(err.kind(), kind, "{file}: {err}");
        assert!(!err.to_string().is_empty());
    }
    let limited = Preprocessor::new(
        224,
        MEAN,
        STD,
        Limits {
            max_bytes: 1000,
            max_pixels: 1 << 30,
            ..Limits::default()
        },
    );
    let big = std::fs::read(common::fixture("images/chelsea.jpg")).unwrap();
    assert!(matches!(
        limited.preprocess(&big),
        Err(PreprocessError::TooLarge { .. })
    ));
}

#[test]
fn format_is_sniffed_not_taken_from_the_name() {
    let pre = clip();
    let png = std::fs::read(common::fixture("images/palette.png")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lying = dir.path().join("photo.jpg");
    std::fs::write(&lying, &png).unwrap();
    let a = pre.preprocess(&png).unwrap();
    let b = pre.preprocess(&std::fs::read(&lying).unwrap()).unwrap();
    assert_eq!(a, b);
}
