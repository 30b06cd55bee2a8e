//! Criterion benches for BENCHMARKS.md: hashing a 32 KB prompt, and one full routing decision
//! (candidates + hash + match + score + pick + reserve + record) for a 32 KB prompt over 4,
//! 100, 1000 pods with epp's default configuration, and at 100 pods with the prompt's block
//! digests taken ahead; and the usage scan of a streamed
//! response (500 SSE events of a chat completion, 4 per chunk as Envoy hands them over); and
//! the scan of a 200 KB chat request; and epp's own work on an ext_proc stream (a whole 1 KB
//! request, one SSE chunk), without Envoy or HTTP/2.
//!
//! `cargo bench --bench scheduling`

mod stream;
mod support;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use epp::extproc::proto::BodySendMode;
use epp::index::{BlockDigests, BlockHasher};

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

/// The same decision at 100 pods with the prompt's block digests taken before it (as the
/// request path does while the body arrives), against hashing the prompt inside it.
fn decision_digested(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_32k_prompt_100_pods");
    let d = support::director(100, support::scheduler(31_250));
    let plain = support::requests();
    support::warm(&d, &plain);
    let digested: Vec<_> = plain
        .iter()
        .map(|r| {
            let mut digests = BlockDigests::new(BlockHasher::default());
            digests.finish(&r.prompt);
            epp::request::LlmRequest {
                digests: Some(digests),
                ..r.clone()
            }
        })
        .collect();
    for (name, requests) in [
        ("hashed_in_decision", &plain),
        ("digested_ahead", &digested),
    ] {
        let mut i = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % requests.len();
                d.route(&requests[i], None).unwrap()
            })
        });
    }
    g.finish();
}

/// Parsing a 200 KB chat request (system prompt and one question, each message written role
/// first as OpenAI clients do) in 16 KiB chunks, as the request path scans it.
fn parse_chat(c: &mut Criterion) {
    let system = "You are a careful assistant. ".repeat(6_000);
    // Written by hand: serde_json would sort the keys, putting "content" before "role".
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"What does the document say about caching?"}}]}}"#
    )
    .into_bytes();
    let mut g = c.benchmark_group("parse_chat");
    g.throughput(Throughput::Bytes(body.len() as u64));
    let with_digests = epp::request::ScanLimits::default();
    let without = epp::request::ScanLimits {
        digests: None,
        ..with_digests
    };
    for (name, limits) in [
        ("200k_in_16k_chunks", with_digests),
        ("200k_in_16k_chunks_no_digests", without),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let api = epp::request::Api::ChatCompletions;
                let mut s = epp::request::BodyScanner::new(api, limits);
                for chunk in body.chunks(16 << 10) {
                    s.feed(std::hint::black_box(chunk)).unwrap();
                }
                s.finish().unwrap()
            })
        });
    }
    g.finish();
}

fn sse_usage(c: &mut Criterion) {
    let event = |i: usize| {
        format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}]}}\n\n"
        )
    };
    let mut chunks: Vec<Vec<u8>> = (0..125)
        .map(|c| {
            (0..4)
                .map(|k| event(c * 4 + k))
                .collect::<String>()
                .into_bytes()
        })
        .collect();
    chunks.push(
        b"data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3000,\"completion_tokens\":500,\"total_tokens\":3500}}\n\ndata: [DONE]\n\n".to_vec(),
    );
    let mut g = c.benchmark_group("sse_usage");
    g.throughput(Throughput::Elements(chunks.len() as u64));
    g.bench_function("500_events_126_chunks", |b| {
        b.iter(|| {
            let mut p = epp::request::usage::UsageParser::new(Some("text/event-stream"));
            for chunk in &chunks {
                p.push(std::hint::black_box(chunk));
            }
            assert_eq!(p.finish().map(|u| u.completion_tokens), Some(500));
        })
    });
    g.finish();
}

/// epp's own work per stream message: a whole 1 KB completion request (4 messages, the
/// decision included) on a new stream each time, and one SSE chunk on a routed stream.
fn ext_proc_stream(c: &mut Criterion) {
    let shared = stream::shared(support::director(4, support::scheduler(31_250)));
    let pad = "x".repeat(1000);
    let usage =
        br#"{"choices":[{"text":"ok"}],"usage":{"prompt_tokens":250,"completion_tokens":16}}"#;
    let mut g = c.benchmark_group("ext_proc_stream");
    let mut i = 0usize;
    g.bench_function("1kb_request", |b| {
        b.iter_batched(
            || {
                i += 1;
                stream::completion(&format!("{i} {pad}"), usage)
            },
            |frames| {
                let mut s = stream::Stream::new(&shared);
                let replies: usize = frames.into_iter().map(|f| s.send(f)).sum();
                assert!(replies >= 3, "{replies} reply frames");
            },
            BatchSize::SmallInput,
        )
    });
    let mut routed = stream::Stream::new(&shared);
    let body = serde_json::json!({ "model": "m", "prompt": pad, "stream": true });
    let opening = stream::opening(
        "/v1/completions",
        body.to_string(),
        "text/event-stream",
        BodySendMode::Streamed,
    );
    for f in opening {
        routed.send(f);
    }
    let chunk = stream::sse_chunk();
    g.bench_function("sse_chunk", |b| {
        b.iter(|| assert_eq!(routed.send(chunk.clone()), 1))
    });
    g.finish();
}

criterion_group!(
    benches,
    hashing,
    decision,
    decision_digested,
    parse_chat,
    sse_usage,
    ext_proc_stream
);
criterion_main!(benches);
