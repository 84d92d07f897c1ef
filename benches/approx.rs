//! Exact vs approximate OLE scoring of a large outlier bank: D = 512, 1,000 ID rows, 100,000
//! outlier rows, a batch of 64: where exact and approximate costs meet, which is what the
//! default of `detector.exact_limit` rests on.
//!
//! Outlier rows are clustered, as word embeddings are: 2,000 random centres, each row
//! `normalize(c + 0.8·u)`. Half the queries sit near an ID row, half near an outlier row.
//! Besides the timings it prints how far the approximate scores are from the exact ones
//! (relative error, and decisions that flip at a threshold keeping 95% of the ID-like
//! queries). Synthetic vectors: a measurement of the estimator, not of detection quality.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

mod common;

use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use common::Rng;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ndarray::{Array2, Axis, concatenate};
use oodgate::detect::approx::ApproxParams;
use oodgate::detect::index::{IndexParams, VectorIndex};
use oodgate::detect::method::{Method, ScoreParams};
use oodgate::detect::norm::l2_normalize;
use oodgate::detect::scorer::Scorer;

const D: usize = 512;
const N_ID: usize = 1000;
const N_OUT: usize = 100_000;
const CENTRES: usize = 2000;
const BATCH: usize = 64;

/// Row i = normalize(base[(i·7919) mod len] + w·u), u uniform on the sphere.
fn around(rng: &mut Rng, base: &Array2<f32>, n: usize, w: f32) -> Array2<f32> {
    let noise = rng.unit_rows(n, D);
    let mut a = Array2::<f32>::zeros((n, D));
    for (i, mut row) in a.rows_mut().into_iter().enumerate() {
        let b = base.row((i * 7919) % base.nrows());
        row.assign(&(&b + &(&noise.row(i) * w)));
        l2_normalize(row.as_slice_mut().expect("contiguous row"));
    }
    a
}

/// The head sizes (= HNSW ef) compared; the defaults are 256.
const HEADS: [usize; 3] = [64, 128, 256];

struct Data {
    exact: Scorer,
    /// One approximate scorer per entry of [`HEADS`], sharing one index.
    approx: Vec<Scorer>,
    queries: Array2<f32>,
}

fn data() -> &'static Data {
    static DATA: OnceLock<Data> = OnceLock::new();
    DATA.get_or_init(|| {
        let mut rng = Rng::new(0x0A99_B0C5);
        let id = rng.unit_rows(N_ID, D);
        let centres = rng.unit_rows(CENTRES, D);
        let out = around(&mut rng, &centres, N_OUT, 0.8);
        let q_id = around(&mut rng, &id, BATCH / 2, 1.2);
        let q_out = around(&mut rng, &out, BATCH / 2, 1.2);
        let queries = concatenate(Axis(0), &[q_id.view(), q_out.view()]).expect("stack");
        let params = ScoreParams::for_method(Method::Ole);
        let exact = Scorer::new(id.view(), None, out.view(), &params).expect("scorer");
        let t = Instant::now();
        let index = Arc::new(VectorIndex::build(out.view(), IndexParams::default()));
        println!(
            "HNSW over {N_OUT} outlier rows (M=16, ef_construction=200) built in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let approx = HEADS
            .iter()
            .map(|&k| {
                let p = ApproxParams {
                    exact_limit: N_OUT - 1,
                    candidates: k,
                    ef_search: k,
                    ..ApproxParams::default()
                };
                exact
                    .clone()
                    .with_approximation(index.clone(), p)
                    .expect("approximate scorer")
            })
            .collect();
        Data {
            exact,
            approx,
            queries,
        }
    })
}

fn report_error(d: &Data) {
    let p = ScoreParams::for_method(Method::Ole);
    let e = d
        .exact
        .score_batch(d.queries.view(), Method::Ole, &p)
        .expect("exact");
    // Threshold between two ID-like scores (keeping ~95% of them), so that no query sits on it.
    let mut id_like: Vec<f64> = e[..BATCH / 2].to_vec();
    id_like.sort_by(f64::total_cmp);
    let k = ((id_like.len() as f64 * 0.05) as usize).max(1);
    let thr = 0.5 * (id_like[k - 1] + id_like[k]);
    for (ap, head) in d.approx.iter().zip(HEADS) {
        let a = ap
            .score_batch(d.queries.view(), Method::Ole, &p)
            .expect("approx");
        let mut rel: Vec<f64> = e
            .iter()
            .zip(&a)
            .map(|(e, a)| (e - a).abs() / e.abs().max(1e-300))
            .collect();
        rel.sort_by(f64::total_cmp);
        let flips = e
            .iter()
            .zip(&a)
            .filter(|(e, a)| (**e < thr) != (**a < thr))
            .count();
        println!(
            "approx (head {head}, ef {head}, tail sample 4096) vs exact OLE over {} queries: \
             relative error median {:.2e}, p90 {:.2e}, max {:.2e}; {flips} decisions differ \
             at a threshold keeping ~95% of the ID-like queries",
            rel.len(),
            rel[rel.len() / 2],
            rel[rel.len() * 9 / 10],
            rel[rel.len() - 1]
        );
    }
}

fn bench_large_bank(c: &mut Criterion) {
    let d = data();
    report_error(d);
    let p = ScoreParams::for_method(Method::Ole);
    let mut g = c.benchmark_group("ole_64_images_vs_1000_id_100000_outliers");
    g.sample_size(10);
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("exact", |b| {
        b.iter(|| black_box(d.exact.score_batch(d.queries.view(), Method::Ole, &p)))
    });
    for (ap, head) in d.approx.iter().zip(HEADS) {
        g.bench_function(format!("approximate_head_{head}"), |b| {
            b.iter(|| black_box(ap.score_batch(d.queries.view(), Method::Ole, &p)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_large_bank);
criterion_main!(benches);
