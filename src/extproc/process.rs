//! One ext_proc stream as an HTTP/2 response body: each poll for the next reply frame reads
//! Envoy's messages, hands them to the [`StreamHandler`] and encodes its replies (no task or
//! channel between the two directions: a hop costs two wake-ups per message).
//!
//! Replies ready at once go out as one DATA frame; large body chunks as the buffers they
//! arrived in ([`super::grpc`]). The stream ends with `grpc-status` trailers when the handler
//! is done or Envoy ends its side; dropping the body (a reset) drops the handler, which
//! releases the request's load.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use prost::Message;
use tonic::Status;
use tonic::codegen::http::HeaderMap;

use super::grpc::{Deframer, Encoder};
use super::proto::{ProcessingRequest, ProcessingResponse};
use super::stream::StreamHandler;

/// The reply side of one `Process` call.
pub struct ProcessBody {
    inbound: tonic::body::Body,
    inbound_ended: bool,
    deframer: Deframer,
    encoder: Encoder,
    handler: Option<StreamHandler>,
    /// The handler's replies to the message at hand (kept: its capacity is reused).
    replies: Vec<ProcessingResponse>,
    /// Set when the stream is over: sent after the last reply.
    trailers: Option<HeaderMap>,
}

/// Whether a step made progress or must wait for Envoy.
enum Step {
    Progress,
    Wait,
}

impl ProcessBody {
    pub fn new(
        inbound: tonic::body::Body,
        handler: StreamHandler,
        max_decode: usize,
        max_encode: usize,
    ) -> Self {
        Self {
            inbound,
            inbound_ended: false,
            deframer: Deframer::new(max_decode),
            encoder: Encoder::new(max_encode),
            handler: Some(handler),
            replies: Vec::new(),
            trailers: None,
        }
    }

    /// Reads and handles at most one message from Envoy.
    fn step(&mut self, cx: &mut Context<'_>) -> Step {
        let Some(handler) = self.handler.as_mut() else {
            return Step::Progress;
        };
        if let Some(scheduler) = handler.take_queued_records() {
            super::apply_records_after_reply(scheduler);
        }
        if handler.is_done() {
            self.finish(Status::ok(""));
            return Step::Progress;
        }
        match self.deframer.next_message() {
            Ok(Some(message)) => {
                self.handle(message);
                return Step::Progress;
            }
            Ok(None) => {}
            Err(status) => {
                self.fail(status);
                return Step::Progress;
            }
        }
        if self.inbound_ended {
            self.inbound_ended();
            return Step::Progress;
        }
        match Pin::new(&mut self.inbound).poll_frame(cx) {
            Poll::Pending => return Step::Wait,
            Poll::Ready(Some(Ok(frame))) => {
                // Trailers from Envoy carry nothing epp needs.
                if let Ok(data) = frame.into_data() {
                    self.deframer.push(data);
                }
            }
            Poll::Ready(Some(Err(status))) => self.fail(status),
            Poll::Ready(None) => self.inbound_ended = true,
        }
        Step::Progress
    }

    fn handle(&mut self, message: Bytes) {
        let request = match ProcessingRequest::decode(message) {
            Ok(r) => r,
            Err(e) => return self.fail(Status::internal(format!("decoding a message: {e}"))),
        };
        let Some(handler) = self.handler.as_mut() else {
            return;
        };
        handler.handle_into(request, &mut self.replies);
        let mut result = Ok(());
        for reply in self.replies.drain(..) {
            result = result.and_then(|()| self.encoder.push(reply));
        }
        if let Some(handler) = self.handler.as_mut() {
            handler.replies_sent();
        }
        if let Err(status) = result {
            self.finish(status);
        }
    }

    /// Envoy ended its side of the stream.
    fn inbound_ended(&mut self) {
        let awaiting = self.handler.as_ref().is_some_and(|h| h.awaiting_answer());
        if self.deframer.buffered() > 0 {
            self.fail(Status::internal("the stream ended inside a message"));
        } else if awaiting {
            self.finish(Status::aborted(
                "ext_proc stream closed before the request was routed",
            ));
        } else {
            self.finish(Status::ok(""));
        }
    }

    /// The stream failed. A reset after the request's last message is the usual end; a
    /// failure before its answer must fail the request (the handler's reply, or the error
    /// itself), never let it through unrouted.
    fn fail(&mut self, status: Status) {
        tracing::debug!(%status, "ext_proc stream ended with an error");
        let reply = self.handler.as_mut().and_then(|h| h.stream_failed(&status));
        match reply.map(|r| self.encoder.push(r)) {
            Some(Ok(())) => self.finish(Status::ok("")),
            Some(Err(e)) => self.finish(e),
            None => self.finish(status),
        }
    }

    /// Ends the stream with `status` once the queued replies are sent.
    fn finish(&mut self, status: Status) {
        self.handler = None;
        if self.trailers.is_none() {
            let mut trailers = HeaderMap::new();
            if status.add_header(&mut trailers).is_err() {
                let _ = Status::internal("invalid status").add_header(&mut trailers);
            }
            self.trailers = Some(trailers);
        }
    }
}

impl Body for ProcessBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            let over = this.handler.is_none();
            if let Some(frame) = this.encoder.next_frame(over) {
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
            if over {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if let Step::Wait = this.step(cx) {
                // Nothing more from Envoy for now: send what is batched.
                return match this.encoder.next_frame(true) {
                    Some(frame) => Poll::Ready(Some(Ok(Frame::data(frame)))),
                    None => Poll::Pending,
                };
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.handler.is_none() && self.trailers.is_none()
    }
}
