//! A request body as it arrives: the chunks Envoy sent, kept as received (each chunk's buffer
//! is moved, never copied, and re-emitted as it is), a streaming scanner reading them as they
//! arrive (no JSON tree, no second pass), and the process-wide budget of in-flight body bytes.
//!
//! Memory per request is the body itself plus the rendered prompt up to the hasher's limit;
//! across requests the [`BodyBudget`] bounds the bodies held at once (past it: 429).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};

use super::messages as msg;
use super::proto::ProcessingResponse;
use crate::request::{Api, BodyScanner, RequestError, ScanLimits, Scanned};

/// Chunks smaller than this are coalesced when the body is re-emitted (fewer gRPC messages).
const COALESCE_BELOW: usize = 16 << 10;

/// The process-wide allowance of request-body bytes held at once.
#[derive(Debug)]
pub struct BodyBudget {
    used: AtomicUsize,
    limit: usize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held right now.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }
}

/// Bytes of the budget held by one request; given back when dropped.
#[derive(Debug)]
pub struct BudgetHold {
    budget: Arc<BodyBudget>,
    held: usize,
}

impl BudgetHold {
    pub fn new(budget: Arc<BodyBudget>) -> Self {
        Self { budget, held: 0 }
    }

    /// Gives back everything held so far.
    fn release(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::AcqRel);
        self.held = 0;
    }

    fn take(&mut self, n: usize) -> bool {
        if self.budget.try_take(n) {
            self.held += n;
            true
        } else {
            false
        }
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        self.release();
    }
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("too many large requests in flight (over {0} bytes of request bodies); retry later")]
    Busy(usize),
    #[error("{0}")]
    Invalid(#[from] RequestError),
}

impl BodyError {
    pub fn status(&self) -> u16 {
        match self {
            BodyError::TooLarge(_) => 413,
            BodyError::Busy(_) => 429,
            BodyError::Invalid(_) => 400,
        }
    }
}

/// A request body being received.
#[derive(Debug)]
pub struct RequestBody {
    /// Keep the chunks: false when epp neither sends the body on nor may rewrite it, so each
    /// chunk is dropped once scanned. The budget counts the body either way: it bounds the
    /// bodies in flight, which Envoy holds for epp when epp does not.
    keep: bool,
    chunks: Vec<Bytes>,
    len: usize,
    max: usize,
    scanner: Option<BodyScanner>,
    hold: BudgetHold,
    failed: Option<RequestError>,
}

impl RequestBody {
    pub fn new(api: Api, limits: ScanLimits, max: usize, budget: Arc<BodyBudget>) -> Self {
        Self {
            keep: true,
            chunks: Vec::new(),
            len: 0,
            max,
            scanner: Some(BodyScanner::new(api, limits)),
            hold: BudgetHold::new(budget),
            failed: None,
        }
    }

    /// The body is only scanned: chunks are dropped once scanned.
    pub fn scan_only(mut self) -> Self {
        self.keep = false;
        self
    }

    /// True when the chunks are kept (see [`RequestBody::scan_only`]).
    pub fn keeps_chunks(&self) -> bool {
        self.keep
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes the next chunk: size limits, budget, then the scanner. A JSON error is kept and
    /// reported by [`RequestBody::finish`] (the status must wait for the whole body only for
    /// the limits, which are checked on every chunk).
    pub fn push(&mut self, chunk: Bytes) -> Result<(), BodyError> {
        if self.len + chunk.len() > self.max {
            return Err(BodyError::TooLarge(self.max));
        }
        self.len += chunk.len();
        if self.failed.is_some() {
            // The request is refused whatever follows: nothing more is kept.
            return Ok(());
        }
        if !self.hold.take(chunk.len()) {
            return Err(BodyError::Busy(self.hold.budget.limit()));
        }
        if let Some(s) = self.scanner.as_mut()
            && let Err(e) = s.feed(&chunk)
        {
            self.failed = Some(e);
            self.scanner = None;
            // Neither the chunks nor their budget are needed any more.
            self.chunks = Vec::new();
            self.hold.release();
            return Ok(());
        }
        if self.keep && !chunk.is_empty() {
            self.chunks.push(chunk);
        }
        Ok(())
    }

    /// The body is complete: what the scanner found, or why it is invalid.
    pub fn finish(&mut self) -> Result<Scanned, BodyError> {
        if let Some(e) = self.failed.take() {
            return Err(e.into());
        }
        let scanner = self
            .scanner
            .take()
            .ok_or(BodyError::Invalid(RequestError::EmptyBody))?;
        Ok(scanner.finish()?)
    }

    /// The received chunks (for rewriting).
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// The budget the body holds, the body itself no longer needed (joining its chunks
    /// only to drop them was a copy for nothing).
    pub fn into_hold(self) -> BudgetHold {
        self.hold
    }

    /// The body as streamed_response messages of at most [`msg::MAX_CHUNK`] bytes, the last
    /// with `end_of_stream`: received chunks are sent as they are, small neighbours
    /// coalesced (the only copy), oversized ones split into views of the same buffer.
    /// `replacement` (a rewritten body) is sent instead.
    pub fn into_messages(
        self,
        replacement: Option<Bytes>,
        end_of_stream: bool,
    ) -> (Vec<ProcessingResponse>, BudgetHold) {
        let chunks = match replacement {
            Some(b) => vec![b],
            None => self.chunks,
        };
        let mut pieces: Vec<Bytes> = Vec::with_capacity(chunks.len());
        let mut small = BytesMut::new();
        for c in chunks {
            if c.len() < COALESCE_BELOW && small.len() + c.len() <= msg::MAX_CHUNK {
                small.extend_from_slice(&c);
                continue;
            }
            if !small.is_empty() {
                pieces.push(small.split().freeze());
            }
            let mut rest = c;
            while rest.len() > msg::MAX_CHUNK {
                pieces.push(rest.split_to(msg::MAX_CHUNK));
            }
            pieces.push(rest);
        }
        if !small.is_empty() || pieces.is_empty() {
            pieces.push(small.freeze());
        }
        let n = pieces.len();
        let out = pieces
            .into_iter()
            .enumerate()
            .map(|(i, p)| msg::streamed_request_chunk(p, end_of_stream && i + 1 == n))
            .collect();
        (out, self.hold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extproc::proto::{body_mutation, processing_response};

    fn body(budget: &Arc<BodyBudget>, max: usize) -> RequestBody {
        RequestBody::new(Api::Completions, ScanLimits::default(), max, budget.clone())
    }

    fn streamed(msgs: &[ProcessingResponse]) -> Vec<(&Bytes, bool)> {
        msgs.iter()
            .map(|m| match &m.response {
                Some(processing_response::Response::RequestBody(b)) => {
                    match b.response.as_ref().and_then(|c| c.body_mutation.as_ref()) {
                        Some(m) => match &m.mutation {
                            Some(body_mutation::Mutation::StreamedResponse(s)) => {
                                (&s.body, s.end_of_stream)
                            }
                            _ => panic!("not streamed"),
                        },
                        None => panic!("no mutation"),
                    }
                }
                _ => panic!("not a body response"),
            })
            .collect()
    }

    fn payloads(msgs: &[ProcessingResponse]) -> Vec<(usize, bool)> {
        streamed(msgs)
            .into_iter()
            .map(|(b, e)| (b.len(), e))
            .collect()
    }

    #[test]
    fn a_scan_only_body_keeps_no_chunks_but_its_limits_and_budget() {
        let budget = BodyBudget::new(1 << 20);
        let mut b = body(&budget, 1 << 20).scan_only();
        let json = br#"{"model":"m","prompt":""#;
        b.push(Bytes::from_static(json)).unwrap();
        b.push(Bytes::from(vec![b'x'; 100_000])).unwrap();
        b.push(Bytes::from_static(br#""}"#)).unwrap();
        assert!(b.chunks().is_empty());
        assert_eq!(
            budget.in_use(),
            json.len() + 100_002,
            "counted all the same"
        );
        assert_eq!(b.finish().unwrap().prompt_len, 100_000);
        let mut b = body(&budget, 1000).scan_only();
        assert_eq!(
            b.push(Bytes::from(vec![b' '; 1001])).unwrap_err().status(),
            413
        );
        let mut b = body(&budget, 1 << 20).scan_only();
        assert_eq!(
            b.push(Bytes::from(vec![b' '; (1 << 20) - 1000]))
                .unwrap_err()
                .status(),
            429
        );
    }

    #[test]
    fn chunks_are_moved_coalesced_and_split() {
        let budget = BodyBudget::new(1 << 30);
        let mut b = body(&budget, 1 << 30);
        let json = br#"{"model":"m","prompt":""#;
        b.push(Bytes::from_static(json)).unwrap();
        b.push(Bytes::from(vec![b'x'; 20_000])).unwrap();
        b.push(Bytes::from(vec![b'y'; 130_000])).unwrap();
        b.push(Bytes::from_static(br#""}"#)).unwrap();
        let scanned = b.finish().unwrap();
        assert_eq!(scanned.prompt_len, 150_000);
        assert_eq!(budget.in_use(), json.len() + 150_002);
        let (msgs, hold) = b.into_messages(None, true);
        assert_eq!(
            payloads(&msgs),
            vec![
                (json.len(), false),
                (20_000, false),
                (62_000, false),
                (62_000, false),
                (6_000, false),
                (2, true)
            ]
        );
        drop(hold);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn large_chunks_are_sent_from_the_received_buffer() {
        let budget = BodyBudget::new(1 << 30);
        let mut b = body(&budget, 1 << 30);
        let json = Bytes::from(format!(
            r#"{{"model":"m","prompt":"{}"}}"#,
            "z".repeat(100_000)
        ));
        let start = json.as_ptr();
        b.push(json).unwrap();
        b.finish().unwrap();
        let (msgs, _hold) = b.into_messages(None, true);
        let pieces = streamed(&msgs);
        assert_eq!(pieces.len(), 2);
        // Views of the one buffer, not copies.
        assert_eq!(pieces[0].0.as_ptr(), start);
        assert_eq!(pieces[1].0.as_ptr(), start.wrapping_add(msg::MAX_CHUNK));
    }

    #[test]
    fn limits_and_budget_refuse_with_their_status() {
        let budget = BodyBudget::new(100);
        let mut a = body(&budget, 1000);
        a.push(Bytes::from(vec![b' '; 60])).unwrap();
        let mut b = body(&budget, 1000);
        let e = b.push(Bytes::from(vec![b' '; 60])).unwrap_err();
        assert_eq!((e.status(), &e), (429, &BodyError::Busy(100)));
        drop(a);
        b.push(Bytes::from(vec![b' '; 60])).unwrap();
        let mut c = body(&BodyBudget::new(1 << 20), 10);
        assert_eq!(
            c.push(Bytes::from(vec![b' '; 11])).unwrap_err().status(),
            413
        );
    }

    #[test]
    fn a_json_error_is_reported_at_the_end_and_nothing_more_is_held() {
        let budget = BodyBudget::new(1 << 20);
        let mut b = body(&budget, 1 << 20);
        b.push(Bytes::from_static(b"{oops")).unwrap();
        assert_eq!(budget.in_use(), 0, "a refused body holds no budget");
        b.push(Bytes::from(vec![b' '; 4096])).unwrap();
        assert_eq!(budget.in_use(), 0);
        assert!(b.chunks().is_empty());
        // The size limit still applies (413 over 400, whatever the JSON).
        let mut c = body(&budget, 10);
        c.push(Bytes::from_static(b"{bad")).unwrap();
        assert_eq!(
            c.push(Bytes::from(vec![b' '; 20])).unwrap_err().status(),
            413
        );
        assert_eq!(b.finish().unwrap_err().status(), 400);
    }
}
