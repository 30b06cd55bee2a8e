//! A streamed response's chunks pass through epp's ext_proc path without allocating: the
//! gRPC stream's reply body ([`ProcessBody`]) reads each chunk's message, decodes it, lets the
//! handler scan it for usage and answers it, with every buffer reused. Counted by this test
//! binary's own global allocator, on the test's thread only, in both response body modes
//! (STREAMED: a short answer; FULL_DUPLEX_STREAMED: the chunk echoed back).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use epp::config::env::SchedulerEnv;
use epp::datastore::{Datastore, EndpointSpec};
use epp::director::Director;
use epp::extproc::process::ProcessBody;
use epp::extproc::proto::{
    BodySendMode, HeaderMap, HeaderValue, HttpBody, HttpHeaders, ProcessingRequest,
    ProtocolConfiguration, processing_request::Request,
};
use epp::extproc::{Limits, Shared, StreamHandler};
use http_body::{Body, Frame};
use prost::Message;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// The system allocator, counting the allocations of a thread while it has counting on.
struct Counting;

// SAFETY: every method forwards to `System` unchanged; the thread-local cells have no
// destructors and allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count() {
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations_of(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    f();
    COUNTING.with(|on| on.set(false));
    ALLOCATIONS.with(Cell::get)
}

/// Envoy's side of the stream: DATA frames queued by the test, `Pending` when none is.
#[derive(Clone, Default)]
struct Inbound(Arc<Mutex<VecDeque<Bytes>>>);

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

/// One gRPC message as a DATA frame whose buffer is already shared (as h2's are), so that
/// slicing it is a reference count, not a promotion.
fn frame(message: ProcessingRequest) -> Bytes {
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

/// The messages up to the response's first chunk: a routed chat request, an SSE response.
fn opening(response_mode: BodySendMode) -> Vec<Bytes> {
    let mut first = message(Request::RequestHeaders(HttpHeaders {
        headers: headers(&[(":path", "/v1/chat/completions"), (":method", "POST")]),
        ..Default::default()
    }));
    first.protocol_config = Some(ProtocolConfiguration {
        request_body_mode: BodySendMode::FullDuplexStreamed as i32,
        response_body_mode: response_mode as i32,
        ..Default::default()
    });
    let body = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    vec![
        frame(first),
        frame(message(Request::RequestBody(HttpBody {
            body: Bytes::from_static(body),
            end_of_stream: true,
        }))),
        frame(message(Request::ResponseHeaders(HttpHeaders {
            headers: headers(&[(":status", "200"), ("content-type", "text/event-stream")]),
            ..Default::default()
        }))),
    ]
}

/// One SSE event of `len` bytes or so, as a response body chunk.
fn chunk(i: usize, len: usize) -> Bytes {
    let pad = "x".repeat(len.saturating_sub(80));
    let event = format!(
        "data: {{\"id\":\"c{i}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{pad}\"}}}}]}}\n\n"
    );
    frame(message(Request::ResponseBody(HttpBody {
        body: Bytes::from(event),
        end_of_stream: false,
    })))
}

/// Polls the reply body until it waits for Envoy, dropping the frames it yields (as h2 does
/// once they are written). Returns how many it yielded.
fn drain(body: &mut ProcessBody) -> usize {
    let mut cx = Context::from_waker(Waker::noop());
    let mut frames = 0;
    while let Poll::Ready(Some(frame)) = Pin::new(&mut *body).poll_frame(&mut cx) {
        assert!(frame.is_ok(), "the stream failed");
        frames += 1;
    }
    frames
}

fn reply_body(inbound: &Inbound) -> ProcessBody {
    let ds = Arc::new(Datastore::new());
    ds.set_endpoints(
        (0..2)
            .map(|i| EndpointSpec::new(format!("p{i}"), ([127, 0, 0, i + 1], 8000).into()))
            .collect(),
    );
    let scheduler = Arc::new(SchedulerEnv::default().build());
    let director = Director::new(ds, scheduler, Duration::from_secs(2));
    let handler = StreamHandler::new(Shared::new(Arc::new(director), None, Limits::default()));
    ProcessBody::new(
        tonic::body::Body::new(inbound.clone()),
        handler,
        4 << 20,
        4 << 20,
    )
}

/// Allocations over `chunks` response chunks of `len` bytes, after the request was routed
/// and a few chunks went through.
fn allocations_per_chunk(mode: BodySendMode, len: usize, chunks: usize) -> u64 {
    let inbound = Inbound::default();
    let mut body = reply_body(&inbound);
    let warm_up = 8;
    let frames: Vec<Bytes> = (0..warm_up + chunks).map(|i| chunk(i, len)).collect();
    let (warm, counted) = frames.split_at(warm_up);
    let mut opened = 0;
    for f in opening(mode).into_iter().chain(warm.iter().cloned()) {
        inbound.0.lock().unwrap().push_back(f);
        opened += drain(&mut body);
    }
    // The headers and body of the request (one batch), the response headers, each chunk.
    assert!(
        opened >= 2 + warm_up,
        "{opened} reply frames in the opening"
    );
    let mut replies = 0;
    let allocations = allocations_of(|| {
        for f in counted {
            inbound.0.lock().unwrap().push_back(f.clone());
            replies += drain(&mut body);
        }
    });
    assert!(
        replies >= chunks,
        "{replies} reply frames for {chunks} chunks"
    );
    allocations
}

#[test]
fn streamed_response_chunks_are_answered_without_allocating() {
    for len in [100, 1_000, 10_000] {
        let n = allocations_per_chunk(BodySendMode::Streamed, len, 1_000);
        assert_eq!(n, 0, "{n} allocations for 1,000 chunks of {len} bytes");
    }
}

#[test]
fn echoed_response_chunks_are_answered_without_allocating() {
    for len in [100, 1_000, 10_000] {
        let n = allocations_per_chunk(BodySendMode::FullDuplexStreamed, len, 1_000);
        assert_eq!(n, 0, "{n} allocations for 1,000 chunks of {len} bytes");
    }
}
