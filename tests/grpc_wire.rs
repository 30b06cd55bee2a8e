//! epp's ext_proc port spoken to over raw HTTP/2 (no Envoy): gRPC messages cut into DATA
//! frames at awkward places, and the framing errors a client can cause: a compressed message,
//! a message over the size limit, a stream that ends inside a message. Each must get its
//! gRPC status (or, for the oversized body, epp's 413), and epp must keep serving.

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{Backend, Proc, endpoints_file, start_epp};
use epp::extproc::proto::{
    BodySendMode, HeaderMap, HeaderValue, HttpBody, HttpHeaders, ProcessingRequest,
    ProcessingResponse, ProtocolConfiguration, body_mutation, processing_request::Request,
    processing_response::Response,
};
use prost::Message;

const PROCESS: &str = "http://epp/envoy.service.ext_proc.v3.ExternalProcessor/Process";

struct Epp {
    _proc: Proc,
    _backend: Backend,
    _dir: tempfile::TempDir,
    port: u16,
}

async fn start(extra: &[&str]) -> Epp {
    let backend = Backend::start("b0").await;
    let dir = tempfile::tempdir().unwrap();
    let file = endpoints_file(dir.path(), "b", &[backend.addr.to_string()]);
    let (proc, port, _) = start_epp(&file, extra);
    Epp {
        _proc: proc,
        _backend: backend,
        _dir: dir,
        port,
    }
}

fn headers(mode: BodySendMode) -> ProcessingRequest {
    let pairs = [(":path", "/v1/completions"), (":method", "POST")];
    ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: pairs
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).into(),
                        raw_value: v.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            end_of_stream: false,
            ..Default::default()
        })),
        protocol_config: Some(ProtocolConfiguration {
            request_body_mode: mode as i32,
            response_body_mode: BodySendMode::Streamed as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn body(bytes: &[u8]) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestBody(HttpBody {
            body: Bytes::copy_from_slice(bytes),
            end_of_stream: true,
        })),
        ..Default::default()
    }
}

fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// What came back on one stream: the decoded replies and the `grpc-status`.
struct Answer {
    replies: Vec<ProcessingResponse>,
    status: String,
}

/// One Process call: `pieces` sent as separate DATA frames, the last ending the stream.
async fn call(port: u16, pieces: Vec<Vec<u8>>) -> Answer {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = tonic::codegen::http::Request::post(PROCESS)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    let n = pieces.len();
    for (i, piece) in pieces.into_iter().enumerate() {
        send.send_data(Bytes::from(piece), i + 1 == n).unwrap();
    }
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let mut body = response.into_body();
    let mut wire = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        wire.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    let mut replies = Vec::new();
    let mut wire = wire.freeze();
    while !wire.is_empty() {
        assert_eq!(wire[0], 0, "epp never compresses");
        let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
        replies.push(ProcessingResponse::decode(wire.slice(5..5 + len)).unwrap());
        wire = wire.slice(5 + len..);
    }
    let status = trailers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    Answer { replies, status }
}

/// The body bytes epp sent back as streamed chunks, and the destination it set.
fn routed(answer: &Answer) -> (Vec<u8>, String) {
    let mut echoed = Vec::new();
    let mut destination = String::new();
    for r in &answer.replies {
        let common = match &r.response {
            Some(Response::RequestHeaders(h)) => h.response.as_ref(),
            Some(Response::RequestBody(b)) => b.response.as_ref(),
            other => panic!("unexpected reply {other:?}"),
        };
        let Some(common) = common else { continue };
        for h in common.header_mutation.iter().flat_map(|m| &m.set_headers) {
            let h = h.header.as_ref().unwrap();
            if h.key == "x-gateway-destination-endpoint" {
                destination = String::from_utf8(h.raw_value.clone()).unwrap();
            }
        }
        if let Some(body_mutation::Mutation::StreamedResponse(s)) = common
            .body_mutation
            .as_ref()
            .and_then(|m| m.mutation.as_ref())
        {
            echoed.extend_from_slice(&s.body);
        }
    }
    (echoed, destination)
}

fn immediate_status(answer: &Answer) -> Option<i32> {
    answer.replies.iter().find_map(|r| match &r.response {
        Some(Response::ImmediateResponse(i)) => i.status.as_ref().map(|s| s.code),
        _ => None,
    })
}

fn request_wire(prompt_len: usize) -> (Vec<u8>, Vec<u8>) {
    let json = format!(
        r#"{{"model":"m","prompt":"{}","max_tokens":1}}"#,
        "p".repeat(prompt_len)
    );
    let mut wire = framed(
        0,
        &headers(BodySendMode::FullDuplexStreamed).encode_to_vec(),
    );
    wire.extend(framed(0, &body(json.as_bytes()).encode_to_vec()));
    (wire, json.into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cut_anywhere_into_frames_are_routed_and_echoed_intact() {
    let epp = start(&[]).await;
    // Small and large bodies (the large one is echoed from its own buffers), in frames of
    // 1, 7 and 4,099 bytes.
    for (prompt_len, frame) in [(10, 1), (10, 7), (100_000, 4_099), (100_000, 7)] {
        let (wire, json) = request_wire(prompt_len);
        let pieces = wire.chunks(frame).map(<[u8]>::to_vec).collect();
        let answer = call(epp.port, pieces).await;
        let (echoed, destination) = routed(&answer);
        assert_eq!(answer.status, "0", "prompt {prompt_len}, frames of {frame}");
        assert!(destination.starts_with("127.0.0.1:"), "{destination:?}");
        assert!(
            echoed == json,
            "prompt {prompt_len}: the body came back changed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_errors_get_their_grpc_status_and_epp_keeps_serving() {
    let epp = start(&["--grpc-max-recv-msg-size", "65536"]).await;
    let headers = framed(
        0,
        &headers(BodySendMode::FullDuplexStreamed).encode_to_vec(),
    );

    // A compressed message: epp announces no compression.
    let compressed = framed(1, &body(b"{}").encode_to_vec());
    let answer = call(epp.port, vec![headers.clone(), compressed]).await;
    assert_eq!(answer.status, "12", "UNIMPLEMENTED");

    // A body message over the limit is refused from its prefix alone: the request gets 413.
    let mut big = framed(0, &body(&vec![b'x'; 70_000]).encode_to_vec());
    big.truncate(100);
    let answer = call(epp.port, vec![headers.clone(), big]).await;
    assert_eq!(immediate_status(&answer), Some(413));
    assert_eq!(answer.status, "0");

    // The stream ends inside a message before the request was answered.
    let mut cut = framed(0, &body(b"{\"model\":\"m\"}").encode_to_vec());
    cut.truncate(8);
    let answer = call(epp.port, vec![headers.clone(), cut]).await;
    assert_eq!(answer.status, "13", "INTERNAL");
    assert!(answer.replies.is_empty());

    // Bytes that are not a ProcessingRequest.
    let answer = call(epp.port, vec![headers, framed(0, &[0xff; 16])]).await;
    assert_eq!(answer.status, "13", "INTERNAL");

    let (wire, json) = request_wire(10);
    let answer = call(epp.port, vec![wire]).await;
    assert_eq!(routed(&answer).0, json, "epp still serves");
}
