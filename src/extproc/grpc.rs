//! gRPC message framing of the ext_proc stream, done by epp instead of tonic's codec.
//!
//! A gRPC message on the wire is a 5-byte prefix (compressed flag, big-endian length) and the
//! protobuf bytes, split across HTTP/2 DATA frames however the sender chose.
//!
//! * [`Deframer`] keeps the received frames as they are and cuts messages out of them: a
//!   message inside one frame is a view of that frame (no copy; its body bytes stay views
//!   after protobuf decoding); only a message spanning frames is copied into one buffer.
//!   A message longer than the limit is refused as soon as its prefix arrives.
//! * [`Encoder`] batches small replies into one buffer (one DATA frame for all replies ready
//!   at once) and sends a large body chunk ([`ZERO_COPY_MIN`] bytes or more) as the buffer it
//!   arrived in: the protobuf fields around the chunk are encoded into a short prefix, and the
//!   chunk follows as its own frame. Prefixes and batches share one buffer, reclaimed once h2
//!   has written its frames, so answering a chunk allocates nothing.
//!
//! tonic's codec copies every received frame into a decode buffer and every reply into an
//! encode buffer: for a 200 KB request body echoed in FULL_DUPLEX_STREAMED that is 400 KB of
//! copies per request.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{encode_varint, encoded_len_varint};
use tonic::Status;

use super::proto::{
    CommonResponse, ProcessingResponse, StreamedBodyResponse, body_mutation, processing_response,
};

/// Length of the gRPC message prefix.
const PREFIX: usize = 5;
/// Body chunks at least this long are sent from their own buffer instead of being copied.
pub const ZERO_COPY_MIN: usize = 4096;
/// Replies batched into one buffer are handed on once it is this long (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// Cuts gRPC messages out of received DATA frames.
#[derive(Debug)]
pub struct Deframer {
    frames: VecDeque<Bytes>,
    buffered: usize,
    max_message: usize,
}

impl Deframer {
    pub fn new(max_message: usize) -> Self {
        Self {
            frames: VecDeque::new(),
            buffered: 0,
            max_message,
        }
    }

    pub fn push(&mut self, frame: Bytes) {
        if !frame.is_empty() {
            self.buffered += frame.len();
            self.frames.push_back(frame);
        }
    }

    /// Bytes received and not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// The next complete message, `None` until all of it has arrived. Errors: a compressed
    /// message (epp does not announce any `grpc-accept-encoding`) or one over the limit.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.buffered < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        self.peek(&mut prefix);
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        match prefix[0] {
            0 => {}
            1 => {
                return Err(Status::unimplemented(
                    "compressed gRPC messages are not supported",
                ));
            }
            f => {
                return Err(Status::internal(format!(
                    "protocol error: invalid compression flag {f}"
                )));
            }
        }
        if len > self.max_message {
            return Err(Status::out_of_range(format!(
                "decoded message length too large: found {len} bytes, the limit is {} bytes",
                self.max_message
            )));
        }
        if self.buffered < PREFIX + len {
            return Ok(None);
        }
        self.advance(PREFIX);
        Ok(Some(self.take(len)))
    }

    fn peek(&self, out: &mut [u8]) {
        let mut filled = 0;
        for f in &self.frames {
            let n = (out.len() - filled).min(f.len());
            out[filled..filled + n].copy_from_slice(&f[..n]);
            filled += n;
            if filled == out.len() {
                return;
            }
        }
    }

    fn advance(&mut self, mut n: usize) {
        self.buffered -= n;
        while n > 0 {
            let Some(front) = self.frames.front_mut() else {
                return;
            };
            if front.len() > n {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.frames.pop_front();
        }
    }

    /// `len` bytes (all buffered): a view of the first frame when it holds them all.
    fn take(&mut self, len: usize) -> Bytes {
        self.buffered -= len;
        let Some(front) = self.frames.front_mut() else {
            return Bytes::new();
        };
        if front.len() >= len {
            let message = front.split_to(len);
            if front.is_empty() {
                self.frames.pop_front();
            }
            return message;
        }
        let mut message = BytesMut::with_capacity(len);
        while message.len() < len {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            let n = (len - message.len()).min(front.len());
            message.extend_from_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                self.frames.pop_front();
            }
        }
        message.freeze()
    }
}

/// Encodes replies into the DATA frames to send, in order.
#[derive(Debug)]
pub struct Encoder {
    batch: BytesMut,
    ready: VecDeque<Bytes>,
    max_message: usize,
}

impl Encoder {
    pub fn new(max_message: usize) -> Self {
        Self {
            batch: BytesMut::new(),
            ready: VecDeque::new(),
            max_message,
        }
    }

    /// Queues one reply. Errors if it is longer than the limit.
    pub fn push(&mut self, mut reply: ProcessingResponse) -> Result<(), Status> {
        if let Some(parts) = take_chunk(&mut reply) {
            let lens = parts.lens();
            self.check(lens.total)?;
            // The replies before it, then its prefix (from the same buffer), then it.
            self.flush_batch();
            encode_around_chunk(&parts, &lens, &mut self.batch);
            self.flush_batch();
            self.ready.push_back(parts.chunk);
            return Ok(());
        }
        let len = reply.encoded_len();
        self.check(len)?;
        self.batch.reserve(PREFIX + len);
        self.batch.put_u8(0);
        self.batch.put_u32(len as u32);
        // Cannot fail: the buffer has room for `len` bytes.
        let _ = reply.encode(&mut self.batch);
        if self.batch.len() >= YIELD_THRESHOLD {
            self.flush_batch();
        }
        Ok(())
    }

    fn check(&self, len: usize) -> Result<(), Status> {
        if len > self.max_message {
            return Err(Status::out_of_range(format!(
                "encoded message length too large: found {len} bytes, the limit is {} bytes",
                self.max_message
            )));
        }
        Ok(())
    }

    /// The next frame whose turn has come: queued whole frames, then (only when `flush`) the
    /// batch of small replies.
    pub fn next_frame(&mut self, flush: bool) -> Option<Bytes> {
        if let Some(frame) = self.ready.pop_front() {
            return Some(frame);
        }
        (flush && !self.batch.is_empty()).then(|| self.batch.split().freeze())
    }

    fn flush_batch(&mut self) {
        if !self.batch.is_empty() {
            self.ready.push_back(self.batch.split().freeze());
        }
    }
}

/// A reply that carries a large streamed body chunk, taken apart: the chunk, and the
/// messages on the path to it without the field that leads to it.
struct AroundChunk {
    /// `ProcessingResponse` field number of the body response (request or response body).
    tag: u32,
    /// The reply without its body response.
    outer: ProcessingResponse,
    /// The body response's `CommonResponse` without its body mutation.
    common: CommonResponse,
    /// The `StreamedBodyResponse` without its body.
    streamed: StreamedBodyResponse,
    chunk: Bytes,
}

/// Takes a streamed body chunk of at least [`ZERO_COPY_MIN`] bytes, and the reply around it,
/// out of `reply`. `None` (and `reply` unchanged) for any other reply.
fn take_chunk(reply: &mut ProcessingResponse) -> Option<AroundChunk> {
    use processing_response::Response;
    let (tag, body) = match reply.response.as_mut()? {
        Response::RequestBody(b) => (3, b),
        Response::ResponseBody(b) => (4, b),
        _ => return None,
    };
    let Some(body_mutation::Mutation::StreamedResponse(streamed)) = body
        .response
        .as_mut()
        .and_then(|c| c.body_mutation.as_mut())
        .and_then(|m| m.mutation.as_mut())
    else {
        return None;
    };
    if streamed.body.len() < ZERO_COPY_MIN {
        return None;
    }
    let chunk = std::mem::take(&mut streamed.body);
    let streamed = std::mem::take(streamed);
    let mut common = body.response.take().unwrap_or_default();
    common.body_mutation = None;
    reply.response = None;
    Some(AroundChunk {
        tag,
        outer: std::mem::take(reply),
        common,
        streamed,
        chunk,
    })
}

/// The encoded lengths of the messages on the path to a chunk, each including the chunk.
struct PathLens {
    streamed: usize,
    mutation: usize,
    common: usize,
    body: usize,
    /// The whole reply.
    total: usize,
}

impl AroundChunk {
    /// Innermost first: each level's length includes the one inside it.
    fn lens(&self) -> PathLens {
        let streamed = self.streamed.encoded_len() + field_len(1, self.chunk.len());
        let mutation = field_len(3, streamed);
        let common = self.common.encoded_len() + field_len(3, mutation);
        let body = field_len(1, common);
        let total = self.outer.encoded_len() + field_len(self.tag, body);
        PathLens {
            streamed,
            mutation,
            common,
            body,
            total,
        }
    }
}

/// Writes to `out` the bytes before the chunk: the gRPC prefix, then each message on the path
/// to the chunk (`outer` ProcessingResponse → BodyResponse → `common` CommonResponse →
/// BodyMutation → `streamed` StreamedBodyResponse), each as its other fields' encoding
/// followed by the field leading to the chunk. Protobuf readers accept fields in any order,
/// so the chunk is the message's final bytes and needs no copy.
fn encode_around_chunk(parts: &AroundChunk, lens: &PathLens, out: &mut BytesMut) {
    out.reserve(PREFIX + lens.total - parts.chunk.len());
    out.put_u8(0);
    out.put_u32(lens.total as u32);
    // Cannot fail: `out` grows as needed.
    let _ = parts.outer.encode(out);
    put_header(out, parts.tag, lens.body);
    put_header(out, 1, lens.common);
    let _ = parts.common.encode(out);
    put_header(out, 3, lens.mutation);
    put_header(out, 3, lens.streamed);
    let _ = parts.streamed.encode(out);
    put_header(out, 1, parts.chunk.len());
}

/// Bytes of a length-delimited field `tag` whose content is `len` bytes.
fn field_len(tag: u32, len: usize) -> usize {
    encoded_len_varint(u64::from(tag << 3 | 2)) + encoded_len_varint(len as u64) + len
}

fn put_header(out: &mut BytesMut, tag: u32, len: usize) {
    encode_varint(u64::from(tag << 3 | 2), out);
    encode_varint(len as u64, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extproc::messages as msg;
    use crate::extproc::proto::{
        BodyMutation, CommonResponse, HttpBody, ProcessingRequest, StreamedBodyResponse,
        processing_request,
    };

    fn framed(messages: &[Vec<u8>]) -> Vec<u8> {
        let mut wire = Vec::new();
        for m in messages {
            wire.push(0);
            wire.extend_from_slice(&(m.len() as u32).to_be_bytes());
            wire.extend_from_slice(m);
        }
        wire
    }

    fn body_request(body: &[u8], end: bool) -> Vec<u8> {
        ProcessingRequest {
            request: Some(processing_request::Request::RequestBody(HttpBody {
                body: Bytes::copy_from_slice(body),
                end_of_stream: end,
            })),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn drain(d: &mut Deframer) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(m) = d.next_message().unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn messages_are_found_at_every_split_of_the_stream() {
        let messages = vec![
            body_request(b"hello", false),
            Vec::new(),
            body_request(&[7; 300], true),
        ];
        let wire = framed(&messages);
        for a in 0..=wire.len() {
            for b in a..=wire.len() {
                let mut d = Deframer::new(1 << 20);
                let mut got = Vec::new();
                for piece in [&wire[..a], &wire[a..b], &wire[b..]] {
                    d.push(Bytes::copy_from_slice(piece));
                    got.extend(drain(&mut d));
                }
                let got: Vec<Vec<u8>> = got.iter().map(|m| m.to_vec()).collect();
                assert_eq!(got, messages, "split at {a}, {b}");
                assert_eq!(d.buffered(), 0);
            }
        }
    }

    #[test]
    fn a_message_inside_one_frame_is_a_view_of_it() {
        let wire = Bytes::from(framed(&[body_request(&[1; 1000], false)]));
        let mut d = Deframer::new(1 << 20);
        d.push(wire.clone());
        let m = d.next_message().unwrap().unwrap();
        assert_eq!(m.as_ptr(), wire[PREFIX..].as_ptr());
        let req = ProcessingRequest::decode(m).unwrap();
        let Some(processing_request::Request::RequestBody(b)) = req.request else {
            panic!("not a body");
        };
        // The decoded body still points into the received frame.
        let inside = wire.as_ptr_range();
        assert!(inside.contains(&b.body.as_ptr()));
    }

    #[test]
    fn oversized_and_compressed_messages_are_refused_from_their_prefix() {
        let mut d = Deframer::new(100);
        d.push(Bytes::from_static(&[0, 0, 0, 0, 101]));
        assert_eq!(
            d.next_message().unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        let mut d = Deframer::new(100);
        d.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]));
        assert_eq!(
            d.next_message().unwrap_err().code(),
            tonic::Code::Unimplemented
        );
        let mut d = Deframer::new(100);
        d.push(Bytes::from_static(&[9, 0, 0, 0, 1, 0]));
        assert_eq!(d.next_message().unwrap_err().code(), tonic::Code::Internal);
    }

    fn decode_all(frames: &[Bytes]) -> Vec<ProcessingResponse> {
        let mut d = Deframer::new(usize::MAX);
        for f in frames {
            d.push(f.clone());
        }
        drain(&mut d)
            .into_iter()
            .map(|m| ProcessingResponse::decode(m).unwrap())
            .collect()
    }

    fn encode(replies: &[ProcessingResponse]) -> Vec<Bytes> {
        let mut e = Encoder::new(usize::MAX);
        for r in replies {
            e.push(r.clone()).unwrap();
        }
        std::iter::from_fn(|| e.next_frame(true)).collect()
    }

    #[test]
    fn large_chunks_are_sent_from_their_buffer_and_decode_unchanged() {
        let big = Bytes::from(vec![b'x'; 70_000]);
        // A chunk with headers set, route cache cleared and dynamic metadata around it.
        let mut common = msg::routing_common("10.0.0.1:8000", Some(70_000), &[]);
        common.body_mutation = Some(BodyMutation {
            mutation: Some(body_mutation::Mutation::StreamedResponse(
                StreamedBodyResponse {
                    body: big.clone(),
                    end_of_stream: true,
                },
            )),
        });
        let with_metadata =
            msg::request_body(common, Some(msg::destination_metadata("10.0.0.1:8000")));
        let replies = vec![
            msg::continue_request_headers(),
            msg::streamed_request_chunk(big.slice(..ZERO_COPY_MIN), false),
            msg::streamed_response_body(big.clone(), false),
            msg::streamed_request_chunk(Bytes::from_static(b"small"), false),
            with_metadata,
            msg::streamed_response_body(Bytes::new(), true),
            msg::request_body(CommonResponse::default(), None),
        ];
        let frames = encode(&replies);
        assert_eq!(decode_all(&frames), replies);
        // The chunks went out as the same buffers: headers reply, then prefix + chunk.
        let sent_as_is = frames.iter().filter(|f| f.as_ptr() == big.as_ptr()).count();
        assert_eq!(sent_as_is, 3);
    }

    #[test]
    fn small_replies_are_batched_until_flushed() {
        let mut e = Encoder::new(usize::MAX);
        e.push(msg::continue_request_headers()).unwrap();
        e.push(msg::continue_response_body()).unwrap();
        assert_eq!(e.next_frame(false), None);
        let frame = e.next_frame(true).unwrap();
        assert_eq!(decode_all(&[frame]).len(), 2);
        assert_eq!(e.next_frame(true), None);
    }

    #[test]
    fn a_reply_over_the_limit_is_an_error() {
        let mut e = Encoder::new(100);
        let r = msg::streamed_request_chunk(Bytes::from(vec![0; 200]), true);
        assert_eq!(e.push(r).unwrap_err().code(), tonic::Code::OutOfRange);
        // A chunk large enough to be sent from its own buffer is measured the same way.
        let limit = ZERO_COPY_MIN + 64;
        let mut e = Encoder::new(limit);
        let fits = msg::streamed_request_chunk(Bytes::from(vec![0; ZERO_COPY_MIN]), true);
        assert!(fits.encoded_len() <= limit);
        e.push(fits).unwrap();
        let over = msg::streamed_request_chunk(Bytes::from(vec![0; limit]), true);
        let found = format!("found {} bytes", over.encoded_len());
        let err = e.push(over).unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        assert!(err.message().contains(&found), "{err:?}");
    }
}
