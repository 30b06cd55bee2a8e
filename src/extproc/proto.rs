//! The ext_proc messages that carry body bytes, declared here instead of taken from
//! envoy-types: the same wire format (field numbers of
//! `envoy/service/ext_proc/v3/external_processor.proto`), but bodies are [`Bytes`]. A body chunk
//! decoded from the gRPC stream is then a view of tonic's receive buffer, kept as received and
//! sent back without another copy (envoy-types decodes every chunk into a fresh `Vec`).
//! Fields epp never reads are left out (protobuf decoding skips unknown fields); messages
//! without body bytes are envoy-types' own.
//!
//! Also the gRPC service glue for these types ([`ExternalProcessorServer`]), what tonic's code
//! generator would write for them.

use bytes::Bytes;

pub use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
pub use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
pub use envoy_types::pb::envoy::service::ext_proc::v3::{
    HeaderMutation, HttpHeaders, HttpTrailers, ImmediateResponse, ProtocolConfiguration,
    TrailersResponse,
};
pub use envoy_types::pb::google::protobuf::Struct;

/// A message from Envoy: one phase of the HTTP request or response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessingRequest {
    #[prost(oneof = "processing_request::Request", tags = "2, 3, 4, 5, 6, 7")]
    pub request: Option<processing_request::Request>,
    #[prost(message, optional, tag = "8")]
    pub metadata_context: Option<Metadata>,
    #[prost(message, optional, tag = "11")]
    pub protocol_config: Option<ProtocolConfiguration>,
}

pub mod processing_request {
    use super::{HttpBody, HttpHeaders, HttpTrailers};

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Request {
        #[prost(message, tag = "2")]
        RequestHeaders(HttpHeaders),
        #[prost(message, tag = "3")]
        ResponseHeaders(HttpHeaders),
        #[prost(message, tag = "4")]
        RequestBody(HttpBody),
        #[prost(message, tag = "5")]
        ResponseBody(HttpBody),
        #[prost(message, tag = "6")]
        RequestTrailers(HttpTrailers),
        #[prost(message, tag = "7")]
        ResponseTrailers(HttpTrailers),
    }
}

/// A body chunk (or, in BUFFERED mode, the whole body).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpBody {
    #[prost(bytes = "bytes", tag = "1")]
    pub body: Bytes,
    #[prost(bool, tag = "2")]
    pub end_of_stream: bool,
}

/// epp's answer to one message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessingResponse {
    #[prost(oneof = "processing_response::Response", tags = "1, 2, 3, 4, 5, 6, 7")]
    pub response: Option<processing_response::Response>,
    #[prost(message, optional, tag = "8")]
    pub dynamic_metadata: Option<Struct>,
}

pub mod processing_response {
    use super::{BodyResponse, HeadersResponse, ImmediateResponse, TrailersResponse};

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Response {
        #[prost(message, tag = "1")]
        RequestHeaders(HeadersResponse),
        #[prost(message, tag = "2")]
        ResponseHeaders(HeadersResponse),
        #[prost(message, tag = "3")]
        RequestBody(BodyResponse),
        #[prost(message, tag = "4")]
        ResponseBody(BodyResponse),
        #[prost(message, tag = "5")]
        RequestTrailers(TrailersResponse),
        #[prost(message, tag = "6")]
        ResponseTrailers(TrailersResponse),
        #[prost(message, tag = "7")]
        ImmediateResponse(ImmediateResponse),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeadersResponse {
    #[prost(message, optional, tag = "1")]
    pub response: Option<CommonResponse>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BodyResponse {
    #[prost(message, optional, tag = "1")]
    pub response: Option<CommonResponse>,
}

/// Header and body changes; `status` 0 is CONTINUE.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommonResponse {
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(message, optional, tag = "2")]
    pub header_mutation: Option<HeaderMutation>,
    #[prost(message, optional, tag = "3")]
    pub body_mutation: Option<BodyMutation>,
    #[prost(bool, tag = "5")]
    pub clear_route_cache: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BodyMutation {
    #[prost(oneof = "body_mutation::Mutation", tags = "1, 2, 3")]
    pub mutation: Option<body_mutation::Mutation>,
}

pub mod body_mutation {
    use bytes::Bytes;

    use super::StreamedBodyResponse;

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Mutation {
        /// The whole new body (BUFFERED mode).
        #[prost(bytes = "bytes", tag = "1")]
        Body(Bytes),
        #[prost(bool, tag = "2")]
        ClearBody(bool),
        /// One chunk of the body (FULL_DUPLEX_STREAMED mode).
        #[prost(message, tag = "3")]
        StreamedResponse(StreamedBodyResponse),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamedBodyResponse {
    #[prost(bytes = "bytes", tag = "1")]
    pub body: Bytes,
    #[prost(bool, tag = "2")]
    pub end_of_stream: bool,
}

pub use server::{ExternalProcessor, ExternalProcessorServer};

/// The tonic service for [`ProcessingRequest`]/[`ProcessingResponse`] streams: what
/// `tonic-build` generates for `ExternalProcessor.Process`, for these types.
mod server {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tonic::codec::{BufferSettings, Codec};
    use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
    use tonic::server::{Grpc, NamedService, StreamingService};
    use tonic::{Code, Request, Response, Status, Streaming};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    use super::{ProcessingRequest, ProcessingResponse};

    const PROCESS_PATH: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";

    /// Each stream's decode and encode buffers start at this size instead of tonic's 8 KiB:
    /// most ext_proc messages and replies are a few hundred bytes, a body chunk reserves its
    /// own length when its header arrives, and every in-flight request holds one stream.
    const STREAM_BUFFER: usize = 1024;
    /// tonic's default: replies queued together are sent as one piece up to this size.
    const YIELD_THRESHOLD: usize = 32 * 1024;

    /// prost encoding with [`STREAM_BUFFER`]-sized buffers.
    #[derive(Debug, Default, Clone, Copy)]
    struct ExtProcCodec;

    impl Codec for ExtProcCodec {
        type Encode = ProcessingResponse;
        type Decode = ProcessingRequest;
        type Encoder = ProstEncoder<ProcessingResponse>;
        type Decoder = ProstDecoder<ProcessingRequest>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<ProcessingResponse, ProcessingRequest>::raw_encoder(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<ProcessingResponse, ProcessingRequest>::raw_decoder(settings())
        }
    }

    fn settings() -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER, YIELD_THRESHOLD)
    }

    /// The ext_proc service: one bidirectional stream per HTTP request.
    #[tonic::async_trait]
    pub trait ExternalProcessor: Send + Sync + 'static {
        type ProcessStream: futures::Stream<Item = Result<ProcessingResponse, Status>>
            + Send
            + 'static;

        async fn process(
            &self,
            request: Request<Streaming<ProcessingRequest>>,
        ) -> Result<Response<Self::ProcessStream>, Status>;
    }

    /// A tower service routing `Process` calls to an [`ExternalProcessor`].
    #[derive(Debug)]
    pub struct ExternalProcessorServer<T> {
        inner: Arc<T>,
        max_decode: Option<usize>,
        max_encode: Option<usize>,
    }

    impl<T> Clone for ExternalProcessorServer<T> {
        fn clone(&self) -> Self {
            Self {
                inner: self.inner.clone(),
                max_decode: self.max_decode,
                max_encode: self.max_encode,
            }
        }
    }

    impl<T> ExternalProcessorServer<T> {
        pub fn new(inner: T) -> Self {
            Self {
                inner: Arc::new(inner),
                max_decode: None,
                max_encode: None,
            }
        }

        /// Largest messages decoded and encoded (tonic's default is 4 MiB).
        #[must_use]
        pub fn max_message_sizes(mut self, decode: usize, encode: usize) -> Self {
            self.max_decode = Some(decode);
            self.max_encode = Some(encode);
            self
        }
    }

    struct Process<T>(Arc<T>);

    impl<T: ExternalProcessor> StreamingService<ProcessingRequest> for Process<T> {
        type Response = ProcessingResponse;
        type ResponseStream = T::ProcessStream;
        type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

        fn call(&mut self, request: Request<Streaming<ProcessingRequest>>) -> Self::Future {
            let inner = self.0.clone();
            Box::pin(async move { inner.process(request).await })
        }
    }

    impl<T, B> Service<http::Request<B>> for ExternalProcessorServer<T>
    where
        T: ExternalProcessor,
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<B>) -> Self::Future {
            if req.uri().path() != PROCESS_PATH {
                return Box::pin(async {
                    Ok(Status::new(Code::Unimplemented, "unknown method").into_http())
                });
            }
            let method = Process(self.inner.clone());
            let (decode, encode) = (self.max_decode, self.max_encode);
            Box::pin(async move {
                let mut grpc =
                    Grpc::new(ExtProcCodec).apply_max_message_size_config(decode, encode);
                Ok(grpc.streaming(method, req).await)
            })
        }
    }

    impl<T> NamedService for ExternalProcessorServer<T> {
        const NAME: &'static str = crate::extproc::SERVICE_NAME;
    }
}
