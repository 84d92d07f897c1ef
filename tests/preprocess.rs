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
        let (max, mean) = deviation(&ours, &reference);
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

/// Max and mean |Δ| between our normalised CHW tensor and a Pillow uint8 HWC crop.
fn deviation(ours: &ndarray::Array3<f32>, reference: &ndarray::ArrayD<u8>) -> (f32, f64) {
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
    (max, sum / (3.0 * 224.0 * 224.0))
}

/// The fast JPEG path (`preprocess.jpeg_draft`) against Pillow's `draft("RGB", (224, 224))`
/// on web-sized JPEGs at every draft scale (1/2, 1/4, 1/8; 4:2:0, 4:4:4, progressive,
/// greyscale, odd sizes): pixel-identical. It really decodes at reduced scale (the exact
/// path's tensor differs), and on images too small for a draft scale it is the exact path.
#[test]
fn the_draft_path_matches_pillow_draft() {
    let draft = clip().with_jpeg_draft(true);
    let exact = clip();
    let dir = common::fixture("draft");
    let mut checked = 0;
    let mut report = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".jpg") {
            continue;
        }
        let reference = common::read_u8_npy(&dir.join(format!("{name}.draft.npy")));
        let bytes = std::fs::read(&path).unwrap();
        let ours = draft.preprocess(&bytes).unwrap();
        let (max, mean) = deviation(&ours, &reference);
        let full = exact.preprocess(&bytes).unwrap();
        let vs_exact = (&ours - &full).mapv(f32::abs);
        let exact_max = vs_exact.iter().copied().fold(0f32, f32::max);
        report.push(format!(
            "{name}: vs Pillow draft max {max:.2e} mean {mean:.2e}; vs exact path max {exact_max:.3} mean {:.4}",
            vs_exact.mean().unwrap()
        ));
        assert!(
            max < 1e-6,
            "{name}: not Pillow's draft pixels: max {max} mean {mean}"
        );
        assert!(
            exact_max > 0.01,
            "{name}: draft gave the exact path's tensor"
        );
        checked += 1;
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(checked, 5);
    // Too small for any draft scale (both sides < 448): the exact path, bit for bit.
    for name in ["chelsea.jpg", "coffee.jpg", "rocket.jpg", "wide.jpg"] {
        let bytes = std::fs::read(common::fixture("images").join(name)).unwrap();
        assert_eq!(
            draft.preprocess(&bytes).unwrap(),
            exact.preprocess(&bytes).unwrap(),
            "{name}"
        );
    }
    assert_eq!(draft.draft_scale(1800, 1800), 8);
    assert_eq!(draft.draft_scale(1001, 999), 4);
    assert_eq!(draft.draft_scale(1024, 447), 1);
    assert_eq!(exact.draft_scale(1800, 1800), 1);
}

/// The daemon queues u8 crops and normalises them when a batch is assembled: the tensor is
/// the one `preprocess` gives, bit for bit, on every fixture and on both JPEG paths.
#[test]
fn queued_crops_normalise_to_the_preprocessed_tensor() {
    for pre in [clip(), clip().with_jpeg_draft(true)] {
        for dir in ["images", "draft"] {
            for entry in std::fs::read_dir(common::fixture(dir)).unwrap() {
                let path = entry.unwrap().path();
                let name = path.to_string_lossy().to_string();
                if name.ends_with(".md") || name.ends_with(".npy") {
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap();
                let crop = pre.crop(&bytes).unwrap();
                assert_eq!(crop.len(), 224 * 224 * 3, "{name}");
                let mut out = vec![0f32; pre.tensor_len()];
                pre.normalize_hwc_into(&crop, &mut out);
                let want = pre.preprocess(&bytes).unwrap();
                assert_eq!(out.as_slice(), want.as_slice().unwrap(), "{name}");
            }
        }
    }
}
