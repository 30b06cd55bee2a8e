//! The Envoy ext_proc gRPC service: one [`stream::StreamHandler`] per HTTP request.

pub mod body;
pub mod messages;
pub mod response;
pub mod stream;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
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
    /// is the body limit plus room for the message's other fields, not more.
    pub fn into_server(self) -> ExternalProcessorServer<Self> {
        let limit = self.shared.limits.max_body_bytes.saturating_add(1 << 20);
        ExternalProcessorServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let mut handler = StreamHandler::new(self.shared.clone());
        tokio::spawn(async move {
            'stream: loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        for reply in handler.handle(msg) {
                            if tx.send(Ok(reply)).await.is_err() {
                                break 'stream;
                            }
                        }
                        handler.replies_sent();
                        if handler.is_done() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    // Envoy resets the stream after the last message of a request: not an error.
                    Err(status) => {
                        tracing::trace!(%status, "ext_proc stream ended");
                        break;
                    }
                }
            }
            drop(handler);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
