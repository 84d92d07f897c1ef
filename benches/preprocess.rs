//! Decode + CLIP preprocess throughput (one thread, so elements/s = images/s per core).
//!
//! Inputs are made once, in memory, from `tests/fixtures/images/coffee.jpg` resized to
//! 640×480 and 1920×1080 and re-encoded as JPEG (quality 90) and PNG. Upscaled content
//! compresses better than a real 1080p photo, so the 1080p figures are slightly optimistic.
//!
//! `preprocess_into` writes into a reused buffer, as the daemon's decode workers do.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

use std::hint::black_box;
use std::io::Cursor;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::imageops::FilterType;
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use oodgate::model::Preprocessor;
use oodgate::model::preprocess::Limits;

// The OpenAI CLIP constants as published (more digits than f32 keeps).
#[allow(clippy::excessive_precision)]
const MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
const STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

fn source() -> RgbImage {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/images/coffee.jpg"
    );
    image::open(path).expect("open coffee.jpg").to_rgb8()
}

fn resized(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    image::imageops::resize(src, w, h, FilterType::CatmullRom)
}

fn jpeg(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(Cursor::new(&mut out), 90)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .expect("encode jpeg");
    out
}

fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(Cursor::new(&mut out))
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .expect("encode png");
    out
}

fn bench_preprocess(c: &mut Criterion) {
    let pre = Preprocessor::new(224, MEAN, STD, Limits::default());
    let src = source();
    let small = resized(&src, 640, 480);
    let large = resized(&src, 1920, 1080);
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("jpeg_640x480", jpeg(&small)),
        ("jpeg_1920x1080", jpeg(&large)),
        ("png_640x480", png(&small)),
        ("png_1920x1080", png(&large)),
    ];
    for (name, bytes) in &inputs {
        println!("input {name}: {} bytes", bytes.len());
    }
    let mut buf = vec![0f32; pre.tensor_len()];

    let mut g = c.benchmark_group("preprocess");
    g.throughput(Throughput::Elements(1));
    for (name, bytes) in &inputs {
        g.bench_function(*name, |b| {
            b.iter(|| {
                pre.preprocess_into(black_box(bytes), &mut buf)
                    .expect("preprocess");
                black_box(&buf);
            })
        });
    }
    g.finish();

    // Where the 1080p JPEG time goes: decode, resize + crop, normalise.
    let (_, large_jpeg) = &inputs[1];
    let decoded = pre.decode(large_jpeg).expect("decode");
    let crop = pre.resize_crop(&decoded).expect("resize");
    let mut g = c.benchmark_group("preprocess_stages_jpeg_1920x1080");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode", |b| {
        b.iter(|| black_box(pre.decode(black_box(large_jpeg)).expect("decode")))
    });
    g.bench_function("resize_crop", |b| {
        b.iter(|| black_box(pre.resize_crop(black_box(&decoded)).expect("resize")))
    });
    g.bench_function("normalize", |b| {
        b.iter(|| {
            pre.normalize_into(black_box(&crop), &mut buf);
            black_box(&buf);
        })
    });
    g.finish();
}

criterion_group!(benches, bench_preprocess);
criterion_main!(benches);
