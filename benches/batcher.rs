//! The cost of forming a batch tensor: `oodgate::stream::batcher::assemble` normalises N
//! decoded `224 × 224` u8 crops into one `[N, 3, 224, 224]` array with CLIP's mean and std,
//! exactly as the daemon's batcher does before handing it to the encoder thread. Compare with
//! `benches/encoder.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a bench is a failed assertion

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use oodgate::model::Preprocessor;
use oodgate::model::preprocess::Limits;
use oodgate::stream::batcher::assemble;

const SIZE: usize = 224;
const MAX: usize = 32;

fn bench_batch_copy(c: &mut Criterion) {
    let len = 3 * SIZE * SIZE;
    let items: Vec<Vec<u8>> = (0..MAX)
        .map(|i| (0..len).map(|j| ((i * 31 + j) % 255) as u8).collect())
        .collect();
    let pre = Preprocessor::new(
        SIZE as u32,
        [0.481_454_66, 0.457_827_5, 0.408_210_73],
        [0.268_629_54, 0.261_302_6, 0.275_777_1],
        Limits::default(),
    );

    let mut g = c.benchmark_group("batch_copy");
    for n in [1usize, 8, 32] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                let tensor = assemble(
                    items.iter().take(n).map(|v| black_box(v.as_slice())),
                    SIZE,
                    |hwc, out| pre.normalize_hwc_into(hwc, out),
                )
                .unwrap();
                black_box(tensor.as_ptr());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_batch_copy);
criterion_main!(benches);
