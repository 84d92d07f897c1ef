//! CLIP BPE tokenizer: one short label, one OLE template, and a batch of 256 texts
//! (OLE templates filled with labels from `config/labels/ole-nonus.txt`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use oodgate::bank_build::labels::templates;
use oodgate::model::ClipTokenizer;

fn batch_texts(n: usize) -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/labels/ole-nonus.txt");
    let labels: Vec<String> = std::fs::read_to_string(path)
        .map(|s| s.lines().take(n).map(str::to_owned).collect())
        .unwrap_or_default();
    let labels = if labels.is_empty() {
        vec!["golden retriever".to_owned()]
    } else {
        labels
    };
    let tpl = templates("ole").expect("ole templates");
    (0..n)
        .map(|i| tpl.lines[i % tpl.lines.len()].replace("{}", &labels[i % labels.len()]))
        .collect()
}

fn bench_tokenizer(c: &mut Criterion) {
    let tok = ClipTokenizer::default();
    let short = "golden retriever";
    let ole = "'a low resolution photo of the golden retriever.'";
    let texts = batch_texts(256);

    let mut g = c.benchmark_group("tokenizer");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_short_label", |b| {
        b.iter(|| black_box(tok.encode(black_box(short))))
    });
    g.bench_function("encode_ole_template", |b| {
        b.iter(|| black_box(tok.encode(black_box(ole))))
    });
    g.throughput(Throughput::Elements(texts.len() as u64));
    g.bench_function("encode_batch_256", |b| {
        b.iter(|| black_box(tok.encode_batch(black_box(&texts))))
    });
    g.finish();
}

criterion_group!(benches, bench_tokenizer);
criterion_main!(benches);
