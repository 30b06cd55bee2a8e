//! Every fuzz target (src/fuzz.rs) on its seed corpus (fuzz/seeds/<target>) and on a few
//! thousand inputs mutated from it by a fixed-seed generator: the CI smoke of the fuzzers
//! (the long libFuzzer runs are recorded in RELIABILITY.md).

use std::path::PathBuf;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// One mutation of `input`: flip, insert, delete, duplicate a span, or splice another seed.
fn mutate(rng: &mut fastrand::Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.usize(1..4) {
        let at = rng.usize(..=v.len());
        match rng.u8(..5) {
            0 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.u8(..8);
            }
            1 => v.insert(at, rng.u8(..)),
            2 if at < v.len() => {
                let end = rng.usize(at..=v.len());
                v.drain(at..end);
            }
            3 if at < v.len() => {
                let end = rng.usize(at..=v.len().min(at + 32));
                let span = v[at..end].to_vec();
                v.splice(at..at, span);
            }
            _ => {
                let other = &others[rng.usize(..others.len())];
                let from = rng.usize(..=other.len());
                v.splice(at.., other[from..].iter().copied());
            }
        }
    }
    v
}

fn run(target: &str, f: fn(&[u8]), rounds: usize) {
    let corpus = seeds(target);
    for s in &corpus {
        f(s);
    }
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut input = corpus[0].clone();
    for i in 0..rounds {
        if i % 16 == 0 {
            input = corpus[rng.usize(..corpus.len())].clone();
        }
        input = mutate(&mut rng, &input, &corpus);
        f(&input);
    }
}

#[test]
fn body_scanner() {
    run("body_scanner", epp::fuzz::body_scanner, 20_000);
}

#[test]
fn metrics_page() {
    run("metrics_page", epp::fuzz::metrics_page, 5_000);
}

#[test]
fn usage() {
    run("usage", epp::fuzz::usage, 20_000);
}

#[test]
fn grpc_stream() {
    run("grpc_stream", epp::fuzz::grpc_stream, 20_000);
}

#[test]
fn ext_proc_stream() {
    run("ext_proc_stream", epp::fuzz::ext_proc_stream, 5_000);
}
