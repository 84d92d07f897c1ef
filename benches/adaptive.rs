//! The adaptive term's cost beyond the static score (issue target: ≤ 30 µs per image with
//! 2,000 memory entries at batch 32 on one core): D = 512 unit rows, a full memory, a batch of
//! 32 queries near the entries' directions; scoring only (no admission), and scoring with the
//! gate admitting about one image per batch (the fold included).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

mod common;

use std::hint::black_box;

use common::Rng;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use oodgate::detect::adaptive::{
    AdaptiveCalibration, AdaptiveMemory, AdaptiveParams, Admission, Admit,
};

const D: usize = 512;
const BATCH: usize = 32;

fn memory(n: usize, rng: &mut Rng) -> AdaptiveMemory {
    let mut m = AdaptiveMemory::new(
        AdaptiveParams {
            capacity: n,
            bucket_cap: n,
            ..AdaptiveParams::default()
        },
        AdaptiveCalibration {
            admit_below: 0.3,
            max_penalty: 0.2,
            q_out: 0.01,
            epsilon: 0.03,
            floor: None,
        },
        D,
    )
    .unwrap();
    let rows = rng.unit_rows(n, D);
    for (i, r) in rows.rows().into_iter().enumerate() {
        m.fold(Admission {
            embedding: r.to_vec(),
            bucket: (i % 1000) as u32,
            score: 0.1,
            ts_ms: 0,
        })
        .unwrap();
    }
    m
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng::new(0xADA9);
    let queries = rng.unit_rows(BATCH, D);
    let mut g = c.benchmark_group("adaptive_batch32");
    g.throughput(Throughput::Elements(BATCH as u64));
    for n in [500, 2000] {
        let mut mem = memory(n, &mut rng);
        let statics: Vec<(f64, u32)> = (0..BATCH).map(|i| (0.9, i as u32)).collect();
        g.bench_function(BenchmarkId::new("score", n), |b| {
            b.iter(|| {
                black_box(
                    mem.score_batch(black_box(queries.view()), &statics, &[], Admit::Off)
                        .unwrap(),
                )
            })
        });
        // One image per batch below the admission threshold: scored, admitted and folded.
        let mut statics = statics.clone();
        statics[BATCH / 2].0 = 0.1;
        let mut mem = memory(n, &mut rng);
        g.bench_function(BenchmarkId::new("score+admit", n), |b| {
            b.iter(|| {
                black_box(
                    mem.score_batch(black_box(queries.view()), &statics, &[], Admit::Fold)
                        .unwrap(),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
