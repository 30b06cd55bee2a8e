//! The Envoy ext_proc gRPC service: one [`stream::StreamHandler`] per HTTP request.

pub mod body;
pub mod grpc;
pub mod messages;
pub mod process;
pub mod proto;
pub mod response;
pub mod serve;
pub mod stream;

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::codegen::Service;
use tonic::codegen::http::{self, HeaderValue, header};
use tonic::server::NamedService;
use tonic::{Code, Status};

pub use stream::{Limits, Shared, StreamHandler};

/// gRPC service name (also a health-check service name).
pub const SERVICE_NAME: &str = "envoy.service.ext_proc.v3.ExternalProcessor";
/// The one method: a bidirectional stream per HTTP request.
const PROCESS_PATH: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";

/// The ext_proc service.
#[derive(Debug, Clone)]
pub struct ExtProcService {
    shared: Shared,
}

impl ExtProcService {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    /// The gRPC service. Messages may carry a whole body (BUFFERED mode): the decoding limit
    /// is the body limit plus room for the message's other fields, not more (unless
    /// `--grpc-max-recv-msg-size` sets it).
    pub fn into_server(self) -> ExtProcServer {
        let limits = self.shared.limits;
        let max_decode = limits
            .max_recv_message
            .unwrap_or(limits.max_body_bytes.saturating_add(1 << 20));
        let max_encode = limits.max_send_message.unwrap_or(max_decode);
        ExtProcServer {
            shared: self.shared,
            max_decode,
            max_encode,
        }
    }
}

/// The tower service tonic's router calls for [`SERVICE_NAME`]: each `Process` call's reply
/// body is a [`process::ProcessBody`] (epp's own gRPC framing, see [`grpc`]).
#[derive(Debug, Clone)]
pub struct ExtProcServer {
    shared: Shared,
    max_decode: usize,
    max_encode: usize,
}

impl Service<http::Request<tonic::body::Body>> for ExtProcServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() != PROCESS_PATH {
            return std::future::ready(Ok(
                Status::new(Code::Unimplemented, "unknown method").into_http()
            ));
        }
        let handler = StreamHandler::new(self.shared.clone());
        let body =
            process::ProcessBody::new(req.into_body(), handler, self.max_decode, self.max_encode);
        let mut response = http::Response::new(tonic::body::Body::new(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        std::future::ready(Ok(response))
    }
}

impl NamedService for ExtProcServer {
    const NAME: &'static str = SERVICE_NAME;
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
