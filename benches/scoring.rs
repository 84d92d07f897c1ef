//! Exact GEMM scoring and the HNSW index on synthetic unit vectors: D = 512, 1,000 ID rows
//! (plus 1,000 "no" rows T̄ where benchmarked "with_no"), 200 outlier rows, a batch of 64.
//!
//! Bank rows are uniform on the sphere. Queries are `normalize(0.6·t + 0.8·u)` for an ID row
//! t and a random unit u, so each sits near one label as an image embedding does; uniform
//! random queries (every row nearly orthogonal) are the worst case for HNSW, and their recall
//! is printed too.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

mod common;

use std::hint::black_box;
use std::sync::OnceLock;

use common::Rng;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ndarray::{Array2, ArrayView2, Axis, concatenate};
use oodgate::detect::index::{IndexParams, VectorIndex, exact_top_k, recall_at_k};
use oodgate::detect::method::{Method, ScoreParams};
use oodgate::detect::norm::l2_normalize;
use oodgate::detect::scorer::Scorer;

const D: usize = 512;
const N_ID: usize = 1000;
const N_OUT: usize = 200;
const BATCH: usize = 64;

struct Data {
    id: Array2<f32>,
    no: Array2<f32>,
    out: Array2<f32>,
    /// `[id; out]`: the 1,200 rows the index is built over.
    all: Array2<f32>,
    queries: Array2<f32>,
    random_queries: Array2<f32>,
}

fn data() -> &'static Data {
    static DATA: OnceLock<Data> = OnceLock::new();
    DATA.get_or_init(|| {
        let mut rng = Rng::new(0x00D6_A7E0);
        let id = rng.unit_rows(N_ID, D);
        let no = rng.unit_rows(N_ID, D);
        let out = rng.unit_rows(N_OUT, D);
        let noise = rng.unit_rows(BATCH, D);
        let mut queries = Array2::<f32>::zeros((BATCH, D));
        for (i, mut q) in queries.rows_mut().into_iter().enumerate() {
            let t = id.row((i * 7919) % N_ID);
            q.assign(&(&t * 0.6 + &noise.row(i) * 0.8));
            l2_normalize(q.as_slice_mut().expect("contiguous row"));
        }
        let random_queries = rng.unit_rows(BATCH, D);
        let all = concatenate(Axis(0), &[id.view(), out.view()]).expect("stack banks");
        Data {
            id,
            no,
            out,
            all,
            queries,
            random_queries,
        }
    })
}

fn scorer(d: &Data, with_no: bool, method: Method) -> (Scorer, ScoreParams) {
    let params = ScoreParams::for_method(method);
    let no: Option<ArrayView2<'_, f32>> = with_no.then(|| d.no.view());
    let s = Scorer::new(d.id.view(), no, d.out.view(), &params).expect("scorer");
    (s, params)
}

fn bench_exact(c: &mut Criterion) {
    let d = data();
    let mut g = c.benchmark_group("score_batch_detailed_64x1200");
    g.throughput(Throughput::Elements(BATCH as u64));
    for with_no in [false, true] {
        for method in [Method::Ole, Method::Mcm, Method::NegLabel] {
            let (s, params) = scorer(d, with_no, method);
            let id = format!("{}{}", method, if with_no { "+no" } else { "" });
            g.bench_function(BenchmarkId::from_parameter(id), |b| {
                b.iter(|| {
                    black_box(
                        s.score_batch_detailed(black_box(d.queries.view()), method, &params)
                            .expect("score"),
                    )
                })
            });
        }
    }
    g.finish();
}

fn bench_index(c: &mut Criterion) {
    let d = data();
    let index = VectorIndex::build(d.all.view(), IndexParams::default());
    let r_near = recall_at_k(&index, d.all.view(), d.queries.view(), 10);
    let r_rand = recall_at_k(&index, d.all.view(), d.random_queries.view(), 10);
    println!(
        "HNSW over {} rows (M=16, ef_construction=200, ef_search=64): recall@10 = {r_near:.4} \
         (near-label queries), {r_rand:.4} (uniform random queries)",
        index.len()
    );

    let qs: Vec<Vec<f32>> = d.queries.rows().into_iter().map(|r| r.to_vec()).collect();
    let mut g = c.benchmark_group("top_k_1200_rows");
    // Per query: each iteration runs the whole batch of 64 queries.
    g.throughput(Throughput::Elements(BATCH as u64));
    for k in [3usize, 10] {
        g.bench_with_input(BenchmarkId::new("hnsw", k), &k, |b, &k| {
            b.iter(|| {
                for q in &qs {
                    black_box(index.search(black_box(q), k));
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("exact", k), &k, |b, &k| {
            b.iter(|| {
                for q in &qs {
                    black_box(exact_top_k(d.all.view(), black_box(q), k));
                }
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("hnsw_build_1200_rows");
    g.sample_size(10);
    g.bench_function("build", |b| {
        b.iter(|| black_box(VectorIndex::build(d.all.view(), IndexParams::default())))
    });
    g.finish();
}

criterion_group!(benches, bench_exact, bench_index);
criterion_main!(benches);
