//! Criterion benches for BENCHMARKS.md: hashing a 32 KB prompt, and one full scheduling
//! decision (hash + match + score + pick + record) for a 32 KB prompt over 4, 100, 1000 pods.
//!
//! `cargo bench --bench scheduling`

mod support;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use epp::index::BlockHasher;

fn hashing(c: &mut Criterion) {
    let req = support::request(1);
    let hasher = BlockHasher {
        block_size: 64,
        max_blocks: usize::MAX,
        max_bytes: 0,
    };
    let capped = BlockHasher::default();
    let seed = BlockHasher::seed("llama", None);
    let mut out = Vec::new();
    let mut g = c.benchmark_group("hash_32k_prompt");
    g.throughput(Throughput::Bytes(req.prompt.len() as u64));
    g.bench_function("all_512_blocks", |b| {
        b.iter(|| hasher.hash_into(seed, std::hint::black_box(&req.prompt), &mut out))
    });
    g.bench_function("default_dense_256_then_coarse", |b| {
        b.iter(|| capped.hash_into(seed, std::hint::black_box(&req.prompt), &mut out))
    });
    g.finish();
}

fn decision(c: &mut Criterion) {
    let mut g = c.benchmark_group("schedule_32k_prompt");
    for n in [4usize, 100, 1000] {
        let pods = support::pods(n);
        let requests = support::requests();
        let scheduler = support::warmed_scheduler(&pods, &requests);
        let mut i = 0;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % requests.len();
                scheduler.schedule(&requests[i], &pods).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hashing, decision);
criterion_main!(benches);
