//! A streamed response's chunks pass through epp's ext_proc path without allocating: the
//! gRPC stream's reply body (`ProcessBody`, driven as in the benches' `stream` module) reads each chunk's message, decodes it, lets the
//! handler scan it for usage and answers it, with every buffer reused. Counted by this test
//! binary's own global allocator, on the test's thread only, in both response body modes
//! (STREAMED: a short answer; FULL_DUPLEX_STREAMED: the chunk echoed back).

// The benches' in-process stream driver; this test uses part of it.
#[allow(dead_code)]
#[path = "../benches/stream.rs"]
mod stream;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use epp::config::env::SchedulerEnv;
use epp::datastore::{Datastore, EndpointSpec};
use epp::director::Director;
use epp::extproc::proto::BodySendMode;

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

/// A routed chat request whose SSE response body comes in `response_mode`, on a stream over
/// two endpoints without metrics.
fn routed_stream(response_mode: BodySendMode) -> stream::Stream {
    let ds = Arc::new(Datastore::new());
    ds.set_endpoints(
        (0..2)
            .map(|i| EndpointSpec::new(format!("p{i}"), ([127, 0, 0, i + 1], 8000).into()))
            .collect(),
    );
    let scheduler = Arc::new(SchedulerEnv::default().build());
    let director = Director::new(ds, scheduler, Duration::from_secs(2));
    let mut s = stream::Stream::new(&stream::shared(director));
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let opening = stream::opening(
        "/v1/chat/completions",
        body.into(),
        "text/event-stream",
        response_mode,
    );
    // The request's headers and body are answered together, then the response headers.
    let replies: usize = opening.into_iter().map(|f| s.send(f)).sum();
    assert!(replies >= 2, "{replies} reply frames in the opening");
    s
}

/// One SSE event of `len` bytes or so, as a response body chunk.
fn chunk(i: usize, len: usize) -> Bytes {
    let pad = "x".repeat(len.saturating_sub(80));
    let event = format!(
        "data: {{\"id\":\"c{i}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{pad}\"}}}}]}}\n\n"
    );
    stream::response_chunk(Bytes::from(event), false)
}

/// Allocations over `chunks` response chunks of `len` bytes, after the request was routed
/// and a few chunks went through.
fn allocations_per_chunk(mode: BodySendMode, len: usize, chunks: usize) -> u64 {
    let mut s = routed_stream(mode);
    let warm_up = 8;
    let frames: Vec<Bytes> = (0..warm_up + chunks).map(|i| chunk(i, len)).collect();
    let (warm, counted) = frames.split_at(warm_up);
    for f in warm {
        assert!(s.send(f.clone()) >= 1, "a chunk went unanswered");
    }
    let mut replies = 0;
    let allocations = allocations_of(|| {
        for f in counted {
            replies += s.send(f.clone());
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
