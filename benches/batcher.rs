//! The cost of forming a batch tensor: `oodgate::stream::batcher::assemble` copies N decoded
//! `[3, 224, 224]` tensors into one `[N, 3, 224, 224]` array, exactly as the daemon's batcher
//! does before handing it to the encoder thread. Compare with `benches/encoder.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a bench is a failed assertion

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use oodgate::stream::batcher::assemble;

const SIZE: usize = 224;
const MAX: usize = 32;

fn bench_batch_copy(c: &mut Criterion) {
    let len = 3 * SIZE * SIZE;
    let items: Vec<Vec<f32>> = (0..MAX)
        .map(|i| {
            (0..len)
                .map(|j| ((i * 31 + j) % 255) as f32 / 255.0)
                .collect()
        })
        .collect();

    let mut g = c.benchmark_group("batch_copy");
    for n in [1usize, 8, 32] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                let tensor =
                    assemble(items.iter().take(n).map(|v| black_box(v.as_slice())), SIZE).unwrap();
                black_box(tensor.as_ptr());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_batch_copy);
criterion_main!(benches);
