//! What `serve` and `bench` load from settings: the encoder, the detector and the
//! preprocessing of one worker.

use anyhow::{Context, bail};
use oodgate::config::Settings;
use oodgate::detect::adaptive::{AdaptiveCalibration, AdaptiveMemory, AdaptiveParams};
use oodgate::detect::detector::{Detector, DetectorSpec, ThresholdChoice};
use oodgate::detect::method::Method;
use oodgate::model::preprocess::Limits;
use oodgate::model::{Encoder, OrtEncoder, Preprocessor, heap};

use super::model::fingerprint_for_bank;
use super::{load_bank, load_encoder};

/// The detector spec of `detector.*`; `threshold` decides what happens without
/// `detector.threshold`.
pub fn detector_spec(s: &Settings, threshold: ThresholdChoice) -> anyhow::Result<DetectorSpec> {
    let method: Method = s
        .detector
        .method
        .parse()
        .map_err(|e| anyhow::anyhow!("detector.method: {e}"))?;
    Ok(DetectorSpec {
        method,
        scale: s.detector.scale,
        threshold: s
            .detector
            .threshold
            .map_or(threshold, ThresholdChoice::Given),
        // Outputs always name their top label and nearest outliers.
        top_k: s.detector.top_k.max(1),
        approx: s.detector.approx_params(),
    })
}

/// The adaptive detector's memory when `detector.adaptive.enabled`: its thresholds from the
/// bank's calibration of the method, or from `detector.adaptive.admit_below` /
/// `max_penalty`.
pub fn adaptive_memory(
    s: &Settings,
    detector: &Detector,
) -> anyhow::Result<Option<AdaptiveMemory>> {
    let a = &s.detector.adaptive;
    if !a.enabled {
        return Ok(None);
    }
    let method = detector.method();
    let stored = detector
        .bank()
        .meta
        .thresholds
        .get(method.as_str())
        .and_then(|t| t.adaptive);
    let calib = match (stored, a.admit_below, a.max_penalty) {
        (_, Some(admit_below), Some(max_penalty)) => AdaptiveCalibration {
            admit_below,
            max_penalty,
            q_out: f64::NAN,
            epsilon: f64::NAN,
            floor: stored.and_then(|c| c.floor),
        },
        (Some(c), admit, penalty) => AdaptiveCalibration {
            admit_below: admit.unwrap_or(c.admit_below),
            max_penalty: penalty.unwrap_or(c.max_penalty),
            ..c
        },
        (None, _, _) => bail!(
            "detector.adaptive.enabled: the bank has no adaptive calibration for method {method}; \
             run `oodgate calibrate --method {method} --write` on held-out ID images, or set \
             detector.adaptive.admit_below and detector.adaptive.max_penalty"
        ),
    };
    let params = AdaptiveParams {
        floor: calib.resolve_floor(a.floor),
        ..s.detector.adaptive_params()
    };
    let mem = AdaptiveMemory::new(params, calib, detector.bank().meta.dim)
        .context("detector.adaptive")?;
    tracing::info!(
        capacity = a.capacity,
        k = a.k,
        floor = mem.params().floor,
        admit_below = calib.admit_below,
        max_penalty = calib.max_penalty,
        "adaptive detector on"
    );
    Ok(Some(mem))
}

/// Loads the encoder (warmed up when `model.warm_up`), the bank (checked against the
/// model's fingerprint) and the detector. `threshold` applies when `detector.threshold` is
/// not set.
pub fn load_worker(
    s: &Settings,
    threshold: ThresholdChoice,
) -> anyhow::Result<(OrtEncoder, Detector, Preprocessor)> {
    // Each weight in a mapping of its own while loading: the load's transient copies go
    // straight back to the system instead of fragmenting the heap (README "Performance").
    heap::map_large_buffers();
    let mut enc = load_encoder(&s.model.dir, s.model.encoder_options()?)
        .with_context(|| format!("model.dir = {}", s.model.dir.display()))?;
    tracing::info!(provider = %enc.info().provider, threads = enc.info().intra_threads, "encoder loaded");
    heap::reuse_large_buffers();
    if s.model.warm_up {
        let mut sizes = vec![1, s.batch.max_size];
        sizes.dedup();
        enc.warm_up(&sizes)?;
    }
    // What loading and the warm-up freed goes back to the system: serve's resident size when
    // ready fell from about 500 to 380 MiB for a 335 MiB model (README "Performance").
    heap::release_free();
    let Some(bank_path) = &s.detector.bank else {
        bail!("detector.bank is required for serve")
    };
    let bank = load_bank(bank_path)?;
    let fp = fingerprint_for_bank(
        enc.manifest(),
        &enc.info().identity(),
        &bank,
        s.detector.force_fingerprint,
    )?;
    bank.check_model(&fp, s.detector.force_fingerprint)?;
    let detector = Detector::new(bank, &detector_spec(s, threshold)?)
        .with_context(|| format!("detector.bank = {}", bank_path.display()))?;
    let pre = Preprocessor::from_manifest(
        enc.manifest(),
        Limits {
            max_bytes: s.limits.max_bytes as usize,
            max_pixels: s.limits.max_pixels,
            max_jpeg_scans: s.limits.max_jpeg_scans,
        },
    )
    .with_jpeg_draft(s.preprocess.jpeg_draft);
    tracing::info!(
        bank = %detector.bank().version(),
        method = %detector.method(),
        threshold = detector.threshold().map(|t| t.value),
        "bank loaded"
    );
    Ok((enc, detector, pre))
}

/// glibc gives threads that allocate at once heaps of their own (up to 8 per core); the
/// encoder's and the decoders' large short-lived buffers then stay reserved in several of
/// them. Two arenas lowered `serve`'s peak memory at batch 32 by about 140 MiB with no
/// measurable change in speed (README "Performance"). A `MALLOC_ARENA_MAX` in the
/// environment wins. Call before any thread starts.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes a glibc tunable; called before other threads allocate.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
