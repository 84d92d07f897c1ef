//! ONNX Runtime encoders on the random-weight ViT-B/32 at `models/vit-b-32-random` (device
//! cpu, all cores): the image encoder at batch 1, 8 and 32, the text encoder at batch 64 with
//! short (one-word) labels. Skipped with a message when the model folder or the ONNX Runtime
//! library is missing. Random weights cost exactly what trained weights cost.
//!
//! Few samples and a short measurement time keep the run to a few minutes on 2 cores (one
//! batch-32 image call is over a second there); expect criterion to stretch the time.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use ndarray::{Array4, s};
use oodgate::model::encoder::EncoderOptions;
use oodgate::model::preprocess::Limits;
use oodgate::model::{ClipTokenizer, Device, Encoder, ModelManifest, OrtEncoder, Preprocessor};

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/vit-b-32-random")
}

fn load() -> Option<OrtEncoder> {
    let dir = model_dir();
    if !dir.join("model.toml").exists() {
        println!(
            "encoder bench skipped: {} is missing (generate it with deploy/model/make_test_model.py --preset vit-b-32)",
            dir.display()
        );
        return None;
    }
    let manifest = match ModelManifest::load(&dir) {
        Ok(m) => m,
        Err(e) => {
            println!("encoder bench skipped: {e}");
            return None;
        }
    };
    let opts = EncoderOptions {
        device: Device::Cpu,
        intra_threads: 0,
        load_text: true,
        ..Default::default()
    };
    match OrtEncoder::load(manifest, opts) {
        Ok(enc) => Some(enc),
        Err(e) => {
            println!("encoder bench skipped: {e}");
            None
        }
    }
}

fn bench_encoder(c: &mut Criterion) {
    let Some(mut enc) = load() else {
        return;
    };
    let info = enc.info().clone();
    println!(
        "encoder: {} on {} ({} intra-op threads), ONNX Runtime {}",
        info.model, info.provider, info.intra_threads, info.ort_version
    );

    // A real preprocessed photo, replicated across the batch.
    let pre = Preprocessor::from_manifest(enc.manifest(), Limits::default());
    let photo = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/images/coffee.jpg"
    );
    let one = pre
        .preprocess(&std::fs::read(photo).expect("read coffee.jpg"))
        .expect("preprocess");
    let size = pre.size() as usize;
    let max = 32;
    let mut batch = Array4::<f32>::zeros((max, 3, size, size));
    for i in 0..max {
        batch.slice_mut(s![i, .., .., ..]).assign(&one);
    }
    enc.warm_up(&[1, 8, 32]).expect("warm up");

    let mut g = c.benchmark_group("image_encoder");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for n in [1usize, 8, 32] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("batch", n), &n, |b, &n| {
            b.iter(|| {
                black_box(
                    enc.embed_images(batch.slice(s![..n, .., .., ..]))
                        .expect("embed images"),
                )
            })
        });
    }
    g.finish();

    let context = enc
        .manifest()
        .text
        .as_ref()
        .map_or(77, |t| t.context_length);
    let pad = enc.manifest().text.as_ref().map_or(0, |t| t.pad_id);
    let tok = ClipTokenizer::new(context, pad);
    let labels = [
        "dog", "cat", "airplane", "truck", "ship", "frog", "horse", "bird", "deer", "apple",
        "tulip", "castle", "bicycle", "lobster", "maple", "rocket",
    ];
    let texts: Vec<&str> = (0..64).map(|i| labels[i % labels.len()]).collect();
    let tokens = tok.encode_batch(&texts);
    enc.embed_texts(tokens.view()).expect("warm up text");

    let mut g = c.benchmark_group("text_encoder");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(texts.len() as u64));
    g.bench_function("batch_64_short_labels", |b| {
        b.iter(|| black_box(enc.embed_texts(tokens.view()).expect("embed texts")))
    });
    g.finish();
}

criterion_group!(benches, bench_encoder);
criterion_main!(benches);
