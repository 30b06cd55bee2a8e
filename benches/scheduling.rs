//! Criterion benches for BENCHMARKS.md: hashing a 32 KB prompt, and one full routing decision
//! (candidates + hash + match + score + pick + reserve + record) for a 32 KB prompt over 4,
//! 100, 1000 pods with epp's default configuration.
//!
//! `cargo bench --bench scheduling`

mod support;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use epp::index::BlockHasher;

fn hashing(c: &mut Criterion) {
    let req = support::request(1);
    let dense = BlockHasher {
        block_size: 64,
        max_blocks: usize::MAX,
        max_bytes: 0,
    };
    let default = BlockHasher::default();
    let seed = BlockHasher::seed("llama", None);
    let mut out = Vec::new();
    let mut g = c.benchmark_group("hash_32k_prompt");
    g.throughput(Throughput::Bytes(req.prompt.len() as u64));
    g.bench_function("all_512_dense_blocks", |b| {
        b.iter(|| dense.hash_into(seed, std::hint::black_box(&req.prompt), &mut out))
    });
    g.bench_function("default_256_dense_then_coarse", |b| {
        b.iter(|| default.hash_into(seed, std::hint::black_box(&req.prompt), &mut out))
    });
    g.finish();
}

fn decision(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_32k_prompt");
    for n in [4usize, 100, 1000] {
        let d = support::director(n, support::scheduler(31_250));
        let requests = support::requests();
        support::warm(&d, &requests);
        let mut i = 0;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % requests.len();
                d.route(&requests[i], None).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hashing, decision);
criterion_main!(benches);
