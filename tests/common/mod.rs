//! Shared test fixtures: the project root, the tiny random-weight model (generated on demand,
//! cached in models/), and a real nats-server harness.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

pub mod nats;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

static MODEL_LOCK: Mutex<()> = Mutex::new(());

/// The project's Python venv interpreter, created by deploy/setup/venv.sh when missing.
pub fn python() -> PathBuf {
    let py = root().join(".venv/bin/python");
    if !py.exists() {
        let st = Command::new("bash")
            .arg(root().join("deploy/setup/venv.sh"))
            .status()
            .expect("run deploy/setup/venv.sh");
        assert!(st.success(), "deploy/setup/venv.sh failed");
    }
    py
}

/// A random-weight model of the real CLIP architecture, generated once and cached in
/// `models/<preset>-random` (so a cold cache costs a second, never a failure).
pub fn test_model(preset: &str) -> PathBuf {
    let _g = MODEL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = root().join("models").join(format!("{preset}-random"));
    // The generator is idempotent (a second call with the same preset, seed and generator
    // version returns at once) and regenerates a folder made by an older generator version.
    {
        let st = Command::new(python())
            .arg(root().join("deploy/model/make_test_model.py"))
            .args(["--preset", preset, "-o"])
            .arg(&dir)
            .status()
            .expect("run make_test_model.py");
        assert!(st.success(), "make_test_model.py --preset {preset} failed");
    }
    dir
}

pub fn tiny_model() -> PathBuf {
    test_model("tiny")
}

/// The oodgate binary under test: the one built for this test run, or `OODGATE_TEST_BIN`
/// (to show that a test fails on an older build).
pub fn oodgate_bin() -> PathBuf {
    std::env::var_os("OODGATE_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_oodgate")))
}

/// The oodgate binary built for this test run.
pub fn oodgate() -> Command {
    let mut c = Command::new(oodgate_bin());
    c.env("NO_COLOR", "1").env("RUST_LOG", "warn");
    c
}

/// Reads a uint8 .npy.
pub fn read_u8_npy(path: &Path) -> ndarray::ArrayD<u8> {
    ndarray_npy::read_npy(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A progressive JPEG of `size` × `size` flat pixels whose last scan is repeated `extra` more
/// times: a small file whose every scan costs the decoder a pass over the whole image.
#[allow(dead_code)]
pub fn jpeg_with_repeated_scans(size: usize, extra: usize) -> Vec<u8> {
    let pixels = [120u8, 80, 200].repeat(size * size);
    let image = turbojpeg::Image {
        pixels: pixels.as_slice(),
        width: size,
        pitch: size * 3,
        height: size,
        format: turbojpeg::PixelFormat::RGB,
    };
    let mut c = turbojpeg::Compressor::new().unwrap();
    c.set_progressive(true).unwrap();
    let jpeg = c.compress_to_vec(image).unwrap();
    // Entropy-coded data never contains FF DA (0xFF is stuffed), so the last FF DA starts the
    // last scan, which runs to the end-of-image marker.
    let last = jpeg.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
    let end = jpeg.len() - 2;
    let mut out = jpeg[..end].to_vec();
    for _ in 0..extra {
        out.extend_from_slice(&jpeg[last..end]);
    }
    out.extend_from_slice(&jpeg[end..]);
    out
}
