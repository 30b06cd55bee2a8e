//! Figures for BENCHMARKS.md that criterion does not give:
//! - per-decision latency percentiles (p50/p99/p99.9) of a full routing decision for a 32 KB
//!   prompt (candidates, hash, match, score, pick, reserve, record) over 4/100/1000 pods, and
//!   over 100 pods filled to 31,250 / 70,000 / 200,000 blocks each, with the prefix index
//!   recorded inline, by the background recorder thread, or after the reply (epp's default);
//! - prefix-index memory per (block, pod) entry;
//! - decisions per second with 1 and 2 threads sharing one scheduler (index contention).
//!
//! `cargo bench --bench index_figures`

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use epp::director::Director;
use epp::index::PrefixIndex;
use epp::request::LlmRequest;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// How a decision's prefix-index record is applied.
#[derive(Clone, Copy)]
enum Recording {
    /// On the deciding thread, inside the decision.
    Inline,
    /// By the recorder thread, woken per record.
    Background,
    /// Queued, and applied once the answer is out (epp's ext_proc stream does it from a task
    /// it spawns after sending its reply; here, right after the timed decision).
    AfterReply,
}

impl Recording {
    const ALL: [Recording; 3] = [Self::Inline, Self::Background, Self::AfterReply];

    fn name(self) -> &'static str {
        match self {
            Self::Inline => "inline",
            Self::Background => "background",
            Self::AfterReply => "after reply",
        }
    }

    fn scheduler(self, capacity: usize) -> epp::scheduling::Scheduler {
        let s = support::scheduler(capacity);
        match self {
            Self::Inline => {}
            Self::Background => s.record_in_background().unwrap(),
            Self::AfterReply => s.record_after_reply(),
        }
        s
    }

    /// Idle time between measured decisions: lets the recorder thread drain, as it does at
    /// realistic request rates.
    fn gap(self) -> Duration {
        Duration::from_micros(match self {
            Self::Background => 100,
            _ => 0,
        })
    }
}

/// Times `n` decisions; `gap`: idle time between them. Records queued for after the reply are
/// applied after each timed decision.
fn measure(d: &Director, requests: &[LlmRequest], n: usize, gap: Duration) -> [f64; 3] {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let r = &requests[i % requests.len()];
        let t = Instant::now();
        let out = d.route(r, None).unwrap();
        samples.push(t.elapsed());
        drop(std::hint::black_box(out));
        d.scheduler.apply_pending_records();
        let until = Instant::now() + gap;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
    samples.sort();
    let us = |p| percentile(&samples, p).as_secs_f64() * 1e6;
    [us(0.5), us(0.99), us(0.999)]
}

/// Requests with fresh unique tails, to fill pods to capacity.
fn filler(n: usize) -> Vec<LlmRequest> {
    (0..n).map(|i| support::request(10_000 + i)).collect()
}

fn latency() {
    println!("## routing decision latency, 32 KB prompt (µs)");
    println!("| pods | blocks per pod | recording | p50 | p99 | p99.9 |");
    println!("|---:|---|---|---:|---:|---:|");
    let requests = support::requests();
    for n in [4usize, 100, 1000] {
        for mode in Recording::ALL {
            let d = support::director(n, mode.scheduler(31_250));
            support::warm(&d, &requests);
            let [p50, p99, p999] = measure(&d, &requests, 20_000, mode.gap());
            let mode = mode.name();
            println!("| {n} | warm (4,096 prompts) | {mode} | {p50:.1} | {p99:.1} | {p999:.1} |");
        }
    }
    for capacity in [31_250usize, 70_000, 200_000] {
        for mode in Recording::ALL {
            let d = support::director(100, mode.scheduler(capacity));
            // Each prompt adds ~144 new blocks: fill every pod past its capacity.
            support::warm(&d, &filler(capacity * 100 / 144 + 4096));
            support::warm(&d, &requests);
            let [p50, p99, p999] = measure(&d, &requests, 20_000, mode.gap());
            let mode = mode.name();
            println!("| 100 | {capacity} (full) | {mode} | {p50:.1} | {p99:.1} | {p999:.1} |");
        }
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
        // Dense-block hashes: the top bit clear (a set top bit marks a coarse block).
        let groups: Vec<Vec<u64>> = (0..64)
            .map(|_| (0..64).map(|_| rng.u64(..) >> 1).collect())
            .collect();
        let requests = 3 * capacity * 100 / 256;
        for r in 0..requests {
            let mut hashes = groups[r % 64].clone();
            hashes.extend((0..192).map(|_| rng.u64(..) >> 1));
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
    let requests = Arc::new(support::requests());
    let make = || {
        let d = Arc::new(support::director(100, support::scheduler(31_250)));
        support::warm(&d, &requests);
        d
    };
    let one = make();
    let directors: Vec<_> = (0..threads)
        .map(|_| if shared { one.clone() } else { make() })
        .collect();
    let per_thread = 40_000;
    let start = Instant::now();
    let handles: Vec<_> = directors
        .into_iter()
        .enumerate()
        .map(|(t, d)| {
            let q = requests.clone();
            std::thread::spawn(move || {
                for i in 0..per_thread {
                    let r = &q[(i * 7 + t * 1000) % q.len()];
                    std::hint::black_box(d.route(r, None).unwrap());
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

/// The recording mode `EPP_RECORDING` names (inline, background; by default after reply).
fn profiled_recording() -> Recording {
    match std::env::var("EPP_RECORDING").as_deref() {
        Ok("inline") => Recording::Inline,
        Ok("background") => Recording::Background,
        _ => Recording::AfterReply,
    }
}

/// Collects every plugin call's duration, per extension point and plugin.
#[derive(Default)]
struct StageTimer(std::sync::Mutex<std::collections::BTreeMap<String, Vec<Duration>>>);

impl epp::scheduling::framework::PluginTimer for StageTimer {
    fn observe(&self, point: &'static str, plugin: &str, seconds: f64) {
        let mut m = self.0.lock().unwrap();
        m.entry(format!("{point}/{plugin}"))
            .or_default()
            .push(Duration::from_secs_f64(seconds));
    }
}

/// p50/p99 of each plugin call within decisions `gap` µs apart (100 pods; recording as
/// `EPP_RECORDING` says: inline, background or, by default, after reply).
fn stages(requests: &[LlmRequest], gap: u64) {
    let timer = Arc::new(StageTimer::default());
    let mode = profiled_recording();
    println!("stages, recording {}:", mode.name());
    let s = mode.scheduler(31_250).with_timer(timer.clone());
    let d = support::director(100, s);
    support::warm(&d, requests);
    timer.0.lock().unwrap().clear();
    measure(&d, requests, 20_000, Duration::from_micros(gap));
    for (stage, mut v) in std::mem::take(&mut *timer.0.lock().unwrap()) {
        v.sort();
        let us = |p| percentile(&v, p).as_secs_f64() * 1e6;
        println!("{stage}: p50 {:.2} p99 {:.2} µs", us(0.5), us(0.99));
    }
}

fn main() {
    // `cargo test --benches` / nextest run bench targets as tests: keep that instant.
    if std::env::args().any(|a| a == "--test" || a == "--list" || a == "--exact") {
        return;
    }
    // For `perf record`: only decisions, at 100 pods, for a while.
    if std::env::var_os("EPP_PROFILE_DECISIONS").is_some() {
        let requests = support::requests();
        let d = support::director(100, profiled_recording().scheduler(31_250));
        support::warm(&d, &requests);
        let time = |name: &str, f: &mut dyn FnMut(usize)| {
            let mut v: Vec<Duration> = (0..20_000)
                .map(|i| {
                    let t = Instant::now();
                    f(i);
                    t.elapsed()
                })
                .collect();
            v.sort();
            println!(
                "{name}: p50 {:.2} µs",
                percentile(&v, 0.5).as_secs_f64() * 1e6
            );
        };
        time("candidates", &mut |_| {
            std::hint::black_box(d.candidates(None).unwrap());
        });
        let hasher = epp::index::BlockHasher::default();
        time("hash", &mut |i| {
            std::hint::black_box(hasher.hash(7, &requests[i % 4096].prompt));
        });
        let idx = d.scheduler.prefix_plugin().unwrap().index().clone();
        let seed = epp::index::BlockHasher::seed("llama", None);
        let hs: Vec<Vec<u64>> = requests
            .iter()
            .map(|r| hasher.hash(seed, &r.prompt))
            .collect();
        time("match", &mut |i| {
            std::hint::black_box(idx.match_prefix(&hs[i % 4096]));
        });
        let cands = d.candidates(None).unwrap();
        time("schedule", &mut |i| {
            std::hint::black_box(d.scheduler.schedule(&requests[i % 4096], &cands).unwrap());
        });
        let gap = std::env::var("EPP_GAP_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100);
        let [a, b, c] = measure(&d, &requests, 20_000, Duration::from_micros(gap));
        println!("gap {gap} µs: p50 {a:.1} p99 {b:.1} p99.9 {c:.1}");
        stages(&requests, gap);
        return;
    }
    latency();
    memory();
    throughput();
}
