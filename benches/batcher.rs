//! The cost of forming a batch tensor: copying N decoded `[3, 224, 224]` tensors into the
//! preallocated `[32, 3, 224, 224]` array, exactly as the daemon's inference loop does
//! (`tensor.slice_mut(s![i, .., .., ..]).as_slice_mut().copy_from_slice(..)`) before handing
//! `tensor.slice(s![..n, ..])` to the encoder. Compare with `benches/encoder.rs`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ndarray::{Array4, s};

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
    let mut tensor = Array4::<f32>::zeros((MAX, 3, SIZE, SIZE));

    let mut g = c.benchmark_group("batch_copy");
    for n in [1usize, 8, 32] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                for (i, item) in items.iter().take(n).enumerate() {
                    if let Some(dst) = tensor.slice_mut(s![i, .., .., ..]).as_slice_mut() {
                        dst.copy_from_slice(black_box(item));
                    }
                }
                // The view the encoder receives; as_standard_layout() on it is a borrow.
                let view = tensor.slice(s![..n, .., .., ..]);
                black_box(view.as_standard_layout().as_ptr());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_batch_copy);
criterion_main!(benches);
