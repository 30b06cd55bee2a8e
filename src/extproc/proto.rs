//! The ext_proc messages that carry body bytes, declared here instead of taken from
//! envoy-types: the same wire format (field numbers of
//! `envoy/service/ext_proc/v3/external_processor.proto`), but bodies are [`Bytes`]. A body chunk
//! decoded from the gRPC stream is then a view of the received HTTP/2 frame when its message
//! lies inside one (see [`super::grpc`]), kept as received and sent back without another copy
//! (envoy-types decodes every chunk into a fresh `Vec`).
//! Fields epp never reads are left out (protobuf decoding skips unknown fields); messages
//! without body bytes are envoy-types' own.

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
