//! The Envoy ext_proc gRPC service: one [`stream::StreamHandler`] per HTTP request.

pub mod body;
pub mod messages;
pub mod proto;
pub mod response;
pub mod serve;
pub mod stream;

use proto::{ExternalProcessor, ExternalProcessorServer, ProcessingRequest, ProcessingResponse};
use tonic::{Request, Response, Status, Streaming};

pub use stream::{Limits, Shared, StreamHandler};

/// gRPC service name (also a health-check service name).
pub const SERVICE_NAME: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// The ext_proc service.
#[derive(Debug, Clone)]
pub struct ExtProcService {
    shared: Shared,
}

impl ExtProcService {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    /// The tonic server. Messages may carry a whole body (BUFFERED mode): the decoding limit
    /// is the body limit plus room for the message's other fields, not more (unless
    /// `--grpc-max-recv-msg-size` sets it).
    pub fn into_server(self) -> ExternalProcessorServer<Self> {
        let limits = self.shared.limits;
        let recv = limits
            .max_recv_message
            .unwrap_or(limits.max_body_bytes.saturating_add(1 << 20));
        let send = limits.max_send_message.unwrap_or(recv);
        ExternalProcessorServer::new(self).max_message_sizes(recv, send)
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = Replies;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        Ok(Response::new(Replies {
            inbound: request.into_inner(),
            handler: Some(StreamHandler::new(self.shared.clone())),
            pending: Vec::new().into_iter(),
        }))
    }
}

/// The reply stream of one ext_proc stream. Each inbound message is handled inside the poll
/// that asks for the next reply (no task or channel between the gRPC stream and the handler:
/// a hop costs two wake-ups per message). Ends when the handler is done or Envoy ends the
/// stream; dropping it (the stream reset) drops the handler, which releases the request's load.
pub struct Replies {
    inbound: Streaming<ProcessingRequest>,
    handler: Option<StreamHandler>,
    pending: std::vec::IntoIter<ProcessingResponse>,
}

impl futures::Stream for Replies {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            let Some(handler) = this.handler.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(reply) = this.pending.next() {
                if this.pending.len() == 0 {
                    handler.replies_sent();
                }
                return Poll::Ready(Some(Ok(reply)));
            }
            if let Some(scheduler) = handler.take_queued_records() {
                apply_records_after_reply(scheduler);
            }
            if handler.is_done() {
                this.handler = None;
                continue;
            }
            match futures::ready!(std::pin::Pin::new(&mut this.inbound).poll_next(cx)) {
                Some(Ok(msg)) => {
                    this.pending = handler.handle(msg).into_iter();
                    if this.pending.len() == 0 {
                        handler.replies_sent();
                    }
                }
                Some(Err(status)) => {
                    // A reset after the request's last message is the usual end; a failure
                    // before its answer must fail the request, never let it through unrouted.
                    tracing::debug!(%status, "ext_proc stream ended with an error");
                    if let Some(reply) = handler.stream_failed(&status) {
                        this.pending = vec![reply].into_iter();
                        continue;
                    }
                    this.handler = None;
                    return Poll::Ready(Some(Err(status)));
                }
                None if handler.awaiting_answer() => {
                    this.handler = None;
                    return Poll::Ready(Some(Err(Status::aborted(
                        "ext_proc stream closed before the request was routed",
                    ))));
                }
                None => this.handler = None,
            }
        }
    }
}

/// Applies a decision's queued prefix-index records once its replies are on their way: the
/// task spawned here yields once, so the connection task (woken when the replies were handed
/// to it) writes them to Envoy first. A later decision applies whatever is still queued
/// before it matches, so none is missed.
fn apply_records_after_reply(scheduler: std::sync::Arc<crate::scheduling::Scheduler>) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                tokio::task::yield_now().await;
                scheduler.apply_pending_records();
            });
        }
        Err(_) => scheduler.apply_pending_records(),
    }
}
