//! Fuzz targets: each takes arbitrary bytes, drives one of epp's input surfaces with them, and
//! panics only when a property is broken. `fuzz/` runs them under libFuzzer (cargo fuzz);
//! `tests/fuzz_smoke.rs` runs them on the seed corpus and on generated inputs in every CI run.
//!
//! * [`body_scanner`]: the request-body JSON scanner. Properties: no panic; the result (value
//!   or error) does not depend on how the body is split into chunks.
//! * [`metrics_page`]: the model-server `/metrics` parser for every engine. No panic; values
//!   are finite and not negative.
//! * [`usage`]: the response usage parser (JSON and SSE). No panic; the usage found does not
//!   depend on chunking (for bodies whose lines fit its buffer).
//! * [`grpc_stream`]: the gRPC deframer of the ext_proc stream, fed the bytes as HTTP/2 frames
//!   split two ways. No panic; the same messages (or the same error) whichever the split;
//!   every message decodes or fails as protobuf without panicking.
//! * [`ext_proc_stream`]: the per-request ext_proc state machine, fed a sequence of messages
//!   built from the bytes (any order, any body mode, any content), then dropped. No panic, and
//!   afterwards every endpoint's in-flight load is back to zero.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::env::SchedulerEnv;
use crate::datastore::{Datastore, EndpointSpec};
use crate::director::Director;
use crate::extproc::grpc::Deframer;
use crate::extproc::proto::{
    BodySendMode, HeaderMap, HeaderValue, HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest,
    ProtocolConfiguration, processing_request::Request,
};
use crate::extproc::{Limits, Shared, StreamHandler};
use crate::request::usage::UsageParser;
use crate::request::{Api, BodyScanner, ScanLimits, Scanned};
use crate::scrape::engine::parse_metrics;
use crate::scrape::mapping::Mappings;

/// Splits `data` into chunks whose sizes come from `seed` (1..=64 bytes each, cycling).
fn chunks<'a>(data: &'a [u8], seed: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let size = seed
            .get(i % seed.len().max(1))
            .map_or(7, |b| usize::from(b % 64) + 1);
        let (head, tail) = rest.split_at(size.min(rest.len()));
        out.push(head);
        rest = tail;
        i += 1;
    }
    out
}

const APIS: [Api; 4] = [
    Api::Completions,
    Api::ChatCompletions,
    Api::Responses,
    Api::Embeddings,
];

/// The body scanner, whole and chunked.
pub fn body_scanner(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let api = APIS[usize::from(selector) % APIS.len()];
    let limits = ScanLimits {
        // Small caps so the fuzzer reaches the capping paths too.
        prompt_cap: 64 + usize::from(selector),
        ..ScanLimits::default()
    };
    let scan = |pieces: &[&[u8]]| {
        let mut scanner = BodyScanner::new(api, limits);
        for p in pieces {
            scanner.feed(p)?;
        }
        scanner.finish()
    };
    let whole = scan(&[body]);
    let split = scan(&chunks(body, &[selector, selector.wrapping_mul(7), 3]));
    assert_eq!(whole, split, "chunking changed the scan of {body:?}");
    // Digests taken as the body arrived chain to the hashes of the finished prompt.
    if let Ok(Scanned {
        digests: Some(d),
        prompt,
        ..
    }) = &split
    {
        let mut chained = Vec::new();
        d.chain_into(5, &mut chained);
        assert_eq!(chained, d.hasher().hash(5, prompt), "{body:?}");
    }
}

/// The `/metrics` parser, for each engine.
pub fn metrics_page(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mappings = Mappings::default();
    for engine in [
        "vllm",
        "sglang",
        "trtllm-serve",
        "triton-tensorrt-llm",
        "triton",
    ] {
        if let Ok(m) = parse_metrics(&mappings.get(engine), &text, Instant::now()) {
            for v in [m.kv_cache_usage, m.waiting_queue.map(f64::from)]
                .into_iter()
                .flatten()
            {
                assert!(
                    v.is_finite() && v >= 0.0,
                    "{engine:?} gave {v} for {text:?}"
                );
            }
        }
    }
}

/// The usage parser, whole and chunked.
pub fn usage(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = (selector & 1 == 1).then_some("text/event-stream");
    let run = |pieces: &[&[u8]]| {
        let mut p = UsageParser::new(content_type);
        for piece in pieces {
            p.push(piece);
        }
        p.finish()
    };
    let whole = run(&[body]);
    let split = run(&chunks(body, &[selector >> 1, 5]));
    if body.len() < 16 << 10 {
        assert_eq!(whole, split, "chunking changed the usage of {body:?}");
    }
}

/// The gRPC deframer, on the whole input as one frame and split into frames.
pub fn grpc_stream(data: &[u8]) {
    use prost::Message;
    let Some((&selector, wire)) = data.split_first() else {
        return;
    };
    let max = usize::from(selector) * 64;
    let run = |pieces: &[&[u8]]| {
        let mut d = Deframer::new(max);
        let mut out = Vec::new();
        for piece in pieces {
            d.push(Bytes::copy_from_slice(piece));
            loop {
                match d.next_message() {
                    Ok(Some(m)) => out.push(Ok(m)),
                    Ok(None) => break,
                    Err(status) => {
                        out.push(Err(status.code()));
                        return out;
                    }
                }
            }
        }
        out
    };
    let whole = run(&[wire]);
    let split = run(&chunks(wire, &[selector, 3]));
    assert_eq!(whole, split, "framing changed the messages of {wire:?}");
    for message in whole.into_iter().flatten() {
        let _ = ProcessingRequest::decode(message);
    }
}

struct Fixture {
    datastore: Arc<Datastore>,
    shared: Shared,
}

/// One director over three endpoints, shared by every run (as a server shares it).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let datastore = Arc::new(Datastore::new());
        datastore.set_endpoints(
            (0..3u8)
                .map(|i| EndpointSpec::new(format!("p{i}"), ([10, 0, 0, i + 1], 8000).into()))
                .collect(),
        );
        let director = Director::new(
            datastore.clone(),
            Arc::new(SchedulerEnv::default().build()),
            Duration::from_secs(3600),
        );
        let limits = Limits {
            max_body_bytes: 4096,
            ..Limits::default()
        };
        Fixture {
            datastore,
            shared: Shared::new(Arc::new(director), None, limits),
        }
    })
}

const MODES: [BodySendMode; 5] = [
    BodySendMode::None,
    BodySendMode::Streamed,
    BodySendMode::Buffered,
    BodySendMode::BufferedPartial,
    BodySendMode::FullDuplexStreamed,
];

const PATHS: [&str; 5] = [
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/other",
];

fn header_map(pairs: &[(&str, &[u8])]) -> Option<HeaderMap> {
    Some(HeaderMap {
        headers: pairs
            .iter()
            .map(|(k, v)| HeaderValue {
                key: (*k).to_owned(),
                raw_value: v.to_vec(),
                ..Default::default()
            })
            .collect(),
    })
}

/// Reads messages from `data`: one op byte, then (for bodies) a length byte and that many
/// bytes of payload.
fn messages(data: &[u8]) -> Vec<ProcessingRequest> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let eos = op & 0x80 != 0;
        let request = match op & 0x0f {
            0 | 1 => {
                let path = PATHS[usize::from(op >> 4) % PATHS.len()];
                let rewrite: &[u8] = if op & 0x40 != 0 { b"other-model" } else { b"" };
                Request::RequestHeaders(HttpHeaders {
                    headers: header_map(&[
                        (":path", path.as_bytes()),
                        ("x-gateway-model-name-rewrite", rewrite),
                    ]),
                    end_of_stream: eos,
                    ..Default::default()
                })
            }
            2..=4 => {
                let n = rest.first().map_or(0, |b| usize::from(*b));
                let payload = rest
                    .get(1..1 + n)
                    .unwrap_or(rest.get(1..).unwrap_or_default());
                rest = rest.get(1 + payload.len()..).unwrap_or_default();
                Request::RequestBody(HttpBody {
                    body: Bytes::copy_from_slice(payload),
                    end_of_stream: eos,
                })
            }
            5 => Request::RequestTrailers(HttpTrailers::default()),
            6 => Request::ResponseHeaders(HttpHeaders {
                headers: header_map(&[(
                    "content-type",
                    if eos {
                        b"text/event-stream"
                    } else {
                        b"application/json"
                    },
                )]),
                end_of_stream: op & 0x40 != 0,
                ..Default::default()
            }),
            7 | 8 => {
                let n = rest.first().map_or(0, |b| usize::from(*b));
                let payload = rest
                    .get(1..1 + n)
                    .unwrap_or(rest.get(1..).unwrap_or_default());
                rest = rest.get(1 + payload.len()..).unwrap_or_default();
                Request::ResponseBody(HttpBody {
                    body: Bytes::copy_from_slice(payload),
                    end_of_stream: eos,
                })
            }
            9 => Request::ResponseTrailers(HttpTrailers::default()),
            _ => continue,
        };
        out.push(ProcessingRequest {
            request: Some(request),
            ..Default::default()
        });
    }
    out
}

/// The ext_proc state machine: any message sequence, then the stream ends.
pub fn ext_proc_stream(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let mut msgs = messages(rest);
    if let Some(first) = msgs.first_mut() {
        first.protocol_config = Some(ProtocolConfiguration {
            request_body_mode: MODES[usize::from(mode) % MODES.len()] as i32,
            response_body_mode: MODES[usize::from(mode >> 4) % MODES.len()] as i32,
            send_body_without_waiting_for_header_response: mode & 0x08 != 0,
        });
    }
    // Also the protobuf decoder on the raw bytes.
    let _ = <ProcessingRequest as prost::Message>::decode(rest);
    let mut handler = StreamHandler::new(f.shared.clone());
    for m in msgs {
        let _ = handler.handle(m);
        handler.replies_sent();
        if handler.is_done() {
            break;
        }
    }
    drop(handler);
    for e in f.datastore.endpoints() {
        // With no response bodies a request may stay parked, at most this one; a scrape
        // showing an idle engine releases it.
        assert!(
            e.load.parked() <= 1,
            "{} parked on {}",
            e.load.parked(),
            e.name
        );
        let idle = crate::datastore::load::EngineCounts {
            requests: Some(0),
            waiting: Some(0),
        };
        e.load.reconcile_parked(idle, e.load.dispatched());
        assert!(
            e.load.is_idle(),
            "load left on {}: {:?}",
            e.name,
            e.load.snapshot()
        );
    }
}
