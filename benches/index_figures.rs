//! Figures for BENCHMARKS.md that criterion does not give:
//! - per-decision latency percentiles (p50/p99/p99.9) for a 32 KB prompt over 4/100/1000 pods;
//! - prefix-index memory per (block, pod) entry;
//! - decisions per second with 1 and 2 threads sharing one scheduler (index contention).
//!
//! `cargo bench --bench index_figures`

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use epp::index::PrefixIndex;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn latency() {
    println!("## decision latency, 32 KB prompt (hash + match + score + pick + record)");
    println!("| pods | p50 µs | p99 µs | p99.9 µs |");
    println!("|---:|---:|---:|---:|");
    for n in [4usize, 100, 1000] {
        let pods = support::pods(n);
        let requests = support::requests();
        let scheduler = support::warmed_scheduler(&pods, &requests);
        let mut samples = Vec::with_capacity(20_000);
        for i in 0..20_000 {
            let r = &requests[i % requests.len()];
            let t = Instant::now();
            let out = scheduler.schedule(r, &pods).unwrap();
            samples.push(t.elapsed());
            std::hint::black_box(out);
        }
        samples.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "| {n} | {:.1} | {:.1} | {:.1} |",
            us(percentile(&samples, 0.5)),
            us(percentile(&samples, 0.99)),
            us(percentile(&samples, 0.999))
        );
    }
}

fn memory() {
    println!("\n## prefix index memory, 100 pods at capacity (steady state after churn)");
    println!("| capacity per pod (blocks) | entries | bytes | bytes per (block, pod) entry |");
    println!("|---:|---:|---:|---:|");
    for capacity in [5_000usize, 15_000, 31_250] {
        let idx = PrefixIndex::new(capacity);
        let mut rng = fastrand::Rng::with_seed(7);
        // Each request records 256 blocks on one pod: 64 shared by a group, 192 unique, so
        // blocks are held by one or several pods; record 3× the capacity to reach steady state.
        let groups: Vec<Vec<u64>> = (0..64)
            .map(|_| (0..64).map(|_| rng.u64(..)).collect())
            .collect();
        let requests = 3 * capacity * 100 / 256;
        for r in 0..requests {
            let mut hashes = groups[r % 64].clone();
            hashes.extend((0..192).map(|_| rng.u64(..)));
            idx.record((r % 100) as u32, &hashes);
        }
        let bytes = idx.memory_bytes();
        println!(
            "| {capacity} | {} | {bytes} | {:.1} |",
            idx.len(),
            bytes as f64 / idx.len() as f64
        );
    }
}

/// Decisions per second with `threads` threads; `shared`: one scheduler for all threads (the
/// real case) or one each (no shared state at all: the machine's own scaling limit).
fn rate(threads: usize, shared: bool) -> f64 {
    let pods = Arc::new(support::pods(100));
    let requests = Arc::new(support::requests());
    let make = || Arc::new(support::warmed_scheduler(&pods, &requests));
    let one = make();
    let schedulers: Vec<_> = (0..threads)
        .map(|_| if shared { one.clone() } else { make() })
        .collect();
    let per_thread = 40_000;
    let start = Instant::now();
    let handles: Vec<_> = schedulers
        .into_iter()
        .enumerate()
        .map(|(t, s)| {
            let (p, q) = (pods.clone(), requests.clone());
            std::thread::spawn(move || {
                for i in 0..per_thread {
                    let r = &q[(i * 7 + t * 1000) % q.len()];
                    std::hint::black_box(s.schedule(r, &p).unwrap());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    (threads * per_thread) as f64 / start.elapsed().as_secs_f64()
}

fn throughput() {
    println!("\n## concurrent throughput, 100 pods, 32 KB prompts");
    let one = rate(1, true);
    let two = rate(2, true);
    let independent = rate(2, false);
    println!("1 thread: {one:.0} decisions/s");
    println!(
        "2 threads, one shared scheduler: {two:.0} decisions/s ({:.2}×)",
        two / one
    );
    println!(
        "2 threads, a scheduler each (nothing shared): {independent:.0} decisions/s ({:.2}×)",
        independent / one
    );
}

fn main() {
    // `cargo test --benches` / nextest run bench targets as tests: keep that instant.
    if std::env::args().any(|a| a == "--test" || a == "--list" || a == "--exact") {
        return;
    }
    latency();
    memory();
    throughput();
}
