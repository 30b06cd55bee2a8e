//! The bad-input table (RELIABILITY.md): requests a client can send, through a real Envoy in
//! front of epp, each with the status and error message it must get, and after each one a
//! valid request proving epp still serves. Then the cases that need more than one request
//! body: a client that disconnects mid-stream, a body trickled in many small chunks, a body
//! over 1 MiB, a client waiting for `100 Continue`, and a spoofed routing header in every body
//! mode Envoy offers.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Backend, BodyMode, EnvoyOptions, Stack};

/// One row of the table.
struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    body: Vec<u8>,
    status: u16,
    /// Substring of the JSON error message (epp's cases), or `None` when the request is
    /// routed and the backend answers.
    message: Option<&'static str>,
}

fn case(name: &'static str, path: &'static str, body: impl Into<Vec<u8>>) -> Case {
    Case {
        name,
        method: "POST",
        path,
        body: body.into(),
        status: 400,
        message: None,
    }
}

impl Case {
    fn rejected(mut self, status: u16, message: &'static str) -> Case {
        self.status = status;
        self.message = Some(message);
        self
    }

    fn served(mut self, status: u16) -> Case {
        self.status = status;
        self.message = None;
        self
    }
}

const C: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

fn table() -> Vec<Case> {
    let deep = format!(
        r#"{{"model":"m","prompt":"x","extra":{}{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let long_model = format!(r#"{{"model":"{}","prompt":"x"}}"#, "m".repeat(10_240));
    let messages = |n: usize| {
        format!(
            r#"{{"model":"m","messages":[{}]}}"#,
            vec![r#"{"role":"user","content":"hi"}"#; n].join(",")
        )
    };
    let mut invalid_utf8 = br#"{"model":"m","prompt":"caf"#.to_vec();
    invalid_utf8.extend_from_slice(&[0xc3, 0x28]);
    invalid_utf8.extend_from_slice(br#""}"#);
    vec![
        case("not JSON", C, "this is not json").rejected(400, "not valid JSON"),
        case("truncated JSON", C, r#"{"model":"m","prompt":"abc"#)
            .rejected(400, "unexpected end of the body"),
        case("invalid UTF-8", C, invalid_utf8).rejected(400, "UTF-8"),
        case("array root", C, "[1,2,3]").rejected(400, "must be a JSON object"),
        case("null root", C, "null").rejected(400, "must be a JSON object"),
        case("deep nesting", C, deep).rejected(400, "nests deeper"),
        case("duplicate keys", C, r#"{"model":"a","model":"b","prompt":"x"}"#)
            .rejected(400, "duplicate key"),
        case("trailing garbage", C, r#"{"model":"m","prompt":"x"} tail"#)
            .rejected(400, "trailing characters"),
        case("invalid escape", C, r#"{"model":"m","prompt":"a\qb"}"#)
            .rejected(400, "invalid escape"),
        case("lone surrogate", C, r#"{"model":"m","prompt":"\ud800"}"#)
            .rejected(400, "surrogate"),
        // Valid JSON, so epp routes it; the fake backend (serde_json) refuses numbers past f64.
        case(
            "huge number",
            C,
            format!(r#"{{"model":"m","prompt":"x","max_tokens":1{}}}"#, "0".repeat(400)),
        )
        .served(400),
        case("model missing", C, r#"{"prompt":"x"}"#).rejected(400, "\"model\""),
        case("model not a string", C, r#"{"model":7,"prompt":"x"}"#)
            .rejected(400, "must be a string"),
        case("model empty", C, r#"{"model":"","prompt":"x"}"#).rejected(400, "must not be empty"),
        case("model 10 KB long", C, long_model).rejected(400, "longer than"),
        case("prompt an object", C, r#"{"model":"m","prompt":{"a":1}}"#)
            .rejected(400, "\"prompt\""),
        case("prompt empty", C, r#"{"model":"m","prompt":""}"#).rejected(400, "must not be empty"),
        case("prompt missing", C, r#"{"model":"m"}"#).rejected(400, "\"prompt\""),
        case("token ids out of range", C, r#"{"model":"m","prompt":[1,4294967296]}"#)
            .rejected(400, "token"),
        case("chat without messages", CHAT, r#"{"model":"m"}"#).rejected(400, "messages"),
        case("chat messages empty", CHAT, r#"{"model":"m","messages":[]}"#)
            .rejected(400, "must not be empty"),
        case("chat messages an object", CHAT, r#"{"model":"m","messages":{}}"#)
            .rejected(400, "messages"),
        case("chat message a string", CHAT, r#"{"model":"m","messages":["hi"]}"#)
            .rejected(400, "must be an object"),
        case(
            "chat unknown role",
            CHAT,
            r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
        )
        .rejected(400, "role"),
        case(
            "chat mixed content blocks",
            CHAT,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#,
        )
        .served(200),
        case("chat with 5,000 messages", CHAT, messages(5_000)).served(200),
        // 3.1 MB: past the 256 KiB limit by more than a gRPC message may carry (regression:
        // the failed decode ended the ext_proc stream cleanly and Envoy sent the request on
        // unrouted).
        case("chat with 100,000 messages", CHAT, messages(100_000)).rejected(413, "exceeds"),
        // No body at all is a body-less request (DESIGN: routed on load, like a GET); the
        // model server answers it.
        case("POST without a body", C, "").served(400),
        case(
            "body over the limit",
            C,
            format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(300_000)),
        )
        .rejected(413, "exceeds"),
        // Any other path with a body is read as a completions request (as the Go EPP does).
        case("unknown path", "/v1/unknown", r#"{"anything":1}"#).rejected(400, "\"model\""),
        case("unknown path, completions body", "/v1/unknown", r#"{"model":"m","prompt":"x"}"#)
            .served(404),
        Case {
            method: "GET",
            ..case("GET without a body", "/v1/models", "").served(200)
        },
    ]
}

/// In the shipped request body mode (STREAMED) and the Go EPP's (FULL_DUPLEX_STREAMED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_status_and_epp_serves_on() {
    for mode in [BodyMode::Streamed, BodyMode::FullDuplex] {
        let stack = Stack::start(2, mode, &["--max-request-body-bytes", "262144"]).await;
        check_every_case(&stack, &format!("{mode:?}")).await;
        let logs = stack.epp.logs();
        assert!(!logs.contains("panicked"), "{logs}");
    }
}

async fn check_every_case(stack: &Stack, mode: &str) {
    let cases = table();
    assert!(cases.len() >= 25);
    for c in &cases {
        let reply = stack.send(c.method, c.path, &[], c.body.clone()).await;
        assert_eq!(
            reply.status,
            c.status,
            "{mode}, {}: {}",
            c.name,
            String::from_utf8_lossy(&reply.body)
        );
        if let Some(needle) = c.message {
            let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_else(|e| {
                panic!(
                    "{mode}, {}: not an epp error ({e}): {}",
                    c.name,
                    String::from_utf8_lossy(&reply.body)
                )
            });
            let message = json["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(needle),
                "{mode}, {}: message {message:?} lacks {needle:?}",
                c.name
            );
            assert_eq!(json["error"]["code"], c.status, "{mode}, {}", c.name);
        }
        let ok = stack.complete("still serving?").await;
        assert_eq!(
            ok.status, 200,
            "{mode}, after {}: epp stopped serving",
            c.name
        );
    }
}

/// A raw HTTP/1.1 request over TCP: `body_parts` written one by one with `pause` between them
/// (chunked encoding), then the whole response read.
fn raw_request(port: u16, path: &str, body_parts: &[&[u8]], pause: Duration) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    for part in body_parts {
        write!(s, "{:x}\r\n", part.len()).unwrap();
        s.write_all(part).unwrap();
        s.write_all(b"\r\n").unwrap();
        s.flush().unwrap();
        std::thread::sleep(pause);
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The test backend's raw HTTP answer carries the xxh3 of the body it received.
fn assert_raw_reply_echoes(raw: &str, body: &str, mode: BodyMode) {
    let expected = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(body.as_bytes()));
    assert!(
        raw.contains(&expected),
        "{mode:?}: body changed on the way: {raw}"
    );
}

/// In STREAMED and FULL_DUPLEX_STREAMED: a completion whose prompt is `prompt`, sent by the
/// raw-socket client `send(gateway port, body)` on a blocking thread, is answered 200 by a
/// backend that got it byte for byte.
async fn assert_raw_client_is_routed(prompt: String, send: fn(u16, &[u8]) -> String) {
    Stack::in_streaming_body_modes(&prompt, async |stack, body, mode| {
        let gateway = stack.gateway;
        let sent = body.clone();
        let raw = tokio::task::spawn_blocking(move || send(gateway, sent.as_bytes()))
            .await
            .unwrap();
        assert!(raw.contains(" 200 OK"), "{mode:?}: {raw}");
        assert_raw_reply_echoes(&raw, &body, mode);
    })
    .await;
}

/// Every piece is its own ext_proc message: in STREAMED each is answered once the body has
/// ended, in FULL_DUPLEX_STREAMED each is echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_in_many_small_chunks_arrives_whole() {
    assert_raw_client_is_routed("z".repeat(4000), |port, body| {
        let parts: Vec<&[u8]> = body.chunks(20).collect();
        raw_request(port, "/v1/completions", &parts, Duration::from_millis(1))
    })
    .await;
}

/// A client that sends `Expect: 100-continue` and waits for `100 Continue` before the body (as
/// curl does for large bodies) must get it before epp has answered anything: in STREAMED and
/// FULL_DUPLEX_STREAMED epp answers the headers only after the body.
fn expect_continue_request(port: u16, body: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_for_100_continue_gets_it_and_is_routed() {
    assert_raw_client_is_routed("e".repeat(100_000), expect_continue_request).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_one_mebibyte_passes_intact() {
    Stack::assert_prompt_arrives_intact("q", 1_500_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_leaves_no_load() {
    let stack = Stack::start(2, BodyMode::FullDuplex, &[]).await;
    let gateway = stack.gateway;
    tokio::task::spawn_blocking(move || {
        let body = serde_json::json!({"model": "m", "prompt": "stream then leave", "stream": true})
            .to_string();
        let mut s = TcpStream::connect(("127.0.0.1", gateway)).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut first = [0u8; 64];
        let n = s.read(&mut first).unwrap();
        assert!(first[..n].starts_with(b"HTTP/1.1 200"));
        // Gone before the stream ends.
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = stack.get_epp(stack.epp_metrics_port, "/metrics").await;
        let busy: Vec<&str> = page
            .lines()
            .filter(|l| l.starts_with("llm_d_epp_inflight_requests{") && !l.ends_with(" 0"))
            .collect();
        if busy.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "in-flight load never released: {busy:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stack.complete("after the disconnect").await.status, 200);
}

/// Envoy's filter that strips client routing headers is removed here: epp itself must never
/// let a client-sent `x-gateway-destination-endpoint` choose the backend, whatever the mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_destination_never_reaches_the_decoy_in_any_body_mode() {
    let decoy = Backend::start("decoy").await;
    let spoof = decoy.addr.to_string();
    for mode in BodyMode::ALL {
        let options = EnvoyOptions {
            strip_client_headers: false,
            ..EnvoyOptions::new(mode)
        };
        let stack = Stack::start_with(2, options, &[]).await;
        let body = serde_json::json!({"model": "m", "prompt": "take me elsewhere"}).to_string();
        for _ in 0..3 {
            let reply = stack
                .send(
                    "POST",
                    "/v1/completions",
                    &[("x-gateway-destination-endpoint", spoof.as_str())],
                    body.clone().into_bytes(),
                )
                .await;
            // Routed by epp (200 from a pool member) or refused; never the decoy.
            if reply.status == 200 {
                let backend = reply.backend();
                assert_ne!(backend, "decoy", "{mode:?}");
            } else {
                assert!(reply.status >= 500, "{mode:?}: {}", reply.status);
            }
        }
        let body_less = stack
            .send(
                "GET",
                "/v1/models",
                &[("x-gateway-destination-endpoint", spoof.as_str())],
                Vec::new(),
            )
            .await;
        assert_eq!(body_less.status, 200, "{mode:?}");
        assert_ne!(body_less.json()["backend"], "decoy", "{mode:?}");
        assert_eq!(decoy.requests(), 0, "{mode:?}: the decoy was reached");
    }
}
