//! Set-up for the ext_proc stream benches: the reply body of one `Process` call
//! ([`ProcessBody`]) driven in-process, without Envoy, HTTP/2 or a socket, so what is timed is
//! epp's own work per message: deframing, protobuf decoding, the handler (parse, decide,
//! account) and encoding the replies. `tests/chunk_allocations.rs` uses it too.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use epp::director::Director;
use epp::extproc::process::ProcessBody;
use epp::extproc::proto::{
    BodySendMode, HeaderMap, HeaderValue, HttpBody, HttpHeaders, ProcessingRequest,
    ProtocolConfiguration, processing_request::Request,
};
use epp::extproc::{Limits, Shared, StreamHandler};
use http_body::{Body, Frame};
use prost::Message;

/// Envoy's side of one stream: DATA frames queued by the bench, `Pending` when none is.
#[derive(Clone, Default)]
pub struct Inbound(Arc<Mutex<VecDeque<Bytes>>>);

impl Body for Inbound {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        match self.0.lock().unwrap().pop_front() {
            Some(frame) => Poll::Ready(Some(Ok(Frame::data(frame)))),
            None => Poll::Pending,
        }
    }
}

/// One stream: Envoy's side and epp's reply body.
pub struct Stream {
    inbound: Inbound,
    body: ProcessBody,
}

impl Stream {
    pub fn new(shared: &Shared) -> Self {
        let inbound = Inbound::default();
        let handler = StreamHandler::new(shared.clone());
        let body = ProcessBody::new(
            tonic::body::Body::new(inbound.clone()),
            handler,
            4 << 20,
            4 << 20,
        );
        Self { inbound, body }
    }

    /// Hands epp one message and takes every reply frame it produces; returns their count.
    pub fn send(&mut self, frame: Bytes) -> usize {
        self.inbound.0.lock().unwrap().push_back(frame);
        let mut cx = Context::from_waker(Waker::noop());
        let mut frames = 0;
        while let Poll::Ready(Some(frame)) = Pin::new(&mut self.body).poll_frame(&mut cx) {
            assert!(frame.is_ok(), "the stream failed");
            frames += 1;
        }
        frames
    }
}

pub fn shared(director: Director) -> Shared {
    Shared::new(Arc::new(director), None, Limits::default())
}

/// One gRPC message as a DATA frame, its buffer already shared (as h2's are): cloning or
/// slicing it is a reference count, not an allocation.
pub fn frame(message: &ProcessingRequest) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + message.encoded_len());
    buf.put_u8(0);
    buf.put_u32(message.encoded_len() as u32);
    message.encode(&mut buf).unwrap();
    let frame = buf.freeze();
    drop(frame.slice(..1));
    frame
}

fn headers(pairs: &[(&str, &str)]) -> Option<HeaderMap> {
    Some(HeaderMap {
        headers: pairs
            .iter()
            .map(|(k, v)| HeaderValue {
                key: k.to_string(),
                raw_value: v.as_bytes().to_vec(),
                ..Default::default()
            })
            .collect(),
    })
}

fn message(request: Request) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(request),
        ..Default::default()
    }
}

/// A request's messages up to its response body, as the shipped Envoy config sends them
/// (request body STREAMED, sent before the headers are answered): request headers, `body`
/// to `path`, response headers of `content_type`; the response body in `response_mode`.
pub fn opening(
    path: &str,
    body: String,
    content_type: &str,
    response_mode: BodySendMode,
) -> Vec<Bytes> {
    let mut first = message(Request::RequestHeaders(HttpHeaders {
        headers: headers(&[
            (":path", path),
            (":method", "POST"),
            ("content-type", "application/json"),
            ("x-request-id", "bench"),
        ]),
        ..Default::default()
    }));
    first.protocol_config = Some(ProtocolConfiguration {
        request_body_mode: BodySendMode::Streamed as i32,
        response_body_mode: response_mode as i32,
        send_body_without_waiting_for_header_response: true,
    });
    vec![
        frame(&first),
        frame(&message(Request::RequestBody(HttpBody {
            body: Bytes::from(body),
            end_of_stream: true,
        }))),
        frame(&message(Request::ResponseHeaders(HttpHeaders {
            headers: headers(&[(":status", "200"), ("content-type", content_type)]),
            ..Default::default()
        }))),
    ]
}

/// A completion request for `prompt` whose JSON response `response` comes in one chunk.
pub fn completion(prompt: &str, response: &'static [u8]) -> Vec<Bytes> {
    let body = serde_json::json!({ "model": "m", "prompt": prompt, "max_tokens": 16 });
    let mut frames = opening(
        "/v1/completions",
        body.to_string(),
        "application/json",
        BodySendMode::Streamed,
    );
    frames.push(response_chunk(Bytes::from_static(response), true));
    frames
}

/// One response body chunk.
pub fn response_chunk(body: Bytes, end_of_stream: bool) -> Bytes {
    frame(&message(Request::ResponseBody(HttpBody {
        body,
        end_of_stream,
    })))
}

/// One SSE token event as a response body chunk.
pub fn sse_chunk() -> Bytes {
    response_chunk(
        Bytes::from_static(
            b"data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\" token\",\"finish_reason\":null}]}\n\n",
        ),
        false,
    )
}
