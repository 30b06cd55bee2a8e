//! Builders for the ext_proc messages epp sends back to Envoy.

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

use super::proto::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation,
    processing_response::Response,
};

/// Header (and `envoy.lb` metadata key) naming the chosen endpoint(s).
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// Dynamic-metadata namespace read by Envoy's load balancer.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// `envoy.lb` key where Envoy reports the endpoint that served the request.
pub const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";
/// Metadata namespace of the subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Metadata key of the subset hint.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Largest body chunk sent in one streamed_response (Envoy's limit is 64 KiB per message).
pub const MAX_CHUNK: usize = 62_000;

/// A header set with overwrite semantics (a client-supplied value is replaced).
pub fn set_header(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            raw_value: value.to_vec(),
            ..Default::default()
        }),
        append_action: header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": destination}}`.
pub fn destination_metadata(destination: &str) -> Struct {
    let inner = Struct {
        fields: [(DESTINATION_HEADER.to_owned(), string_value(destination))].into(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_owned(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into(),
    }
}

/// The routing decision as a CommonResponse: destination header, Content-Length, extra
/// headers, route cache cleared.
pub fn routing_common(
    destination: &str,
    content_length: Option<usize>,
    extra: &[(&str, &[u8])],
) -> CommonResponse {
    let mut set_headers = vec![set_header(DESTINATION_HEADER, destination.as_bytes())];
    if let Some(len) = content_length {
        set_headers.push(set_header("content-length", len.to_string().as_bytes()));
    }
    for (k, v) in extra {
        set_headers.push(set_header(k, v));
    }
    CommonResponse {
        header_mutation: Some(HeaderMutation {
            set_headers,
            remove_headers: Vec::new(),
        }),
        clear_route_cache: true,
        ..Default::default()
    }
}

pub fn request_headers(common: CommonResponse, metadata: Option<Struct>) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::RequestHeaders(HeadersResponse {
            response: Some(common),
        })),
        dynamic_metadata: metadata,
    }
}

pub fn request_body(common: CommonResponse, metadata: Option<Struct>) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::RequestBody(BodyResponse {
            response: Some(common),
        })),
        dynamic_metadata: metadata,
    }
}

/// A CommonResponse carrying only `mutation` of the body (or chunk) it answers.
fn mutating(mutation: body_mutation::Mutation) -> CommonResponse {
    CommonResponse {
        body_mutation: Some(BodyMutation {
            mutation: Some(mutation),
        }),
        ..Default::default()
    }
}

fn streamed(body: Bytes, end_of_stream: bool) -> CommonResponse {
    mutating(body_mutation::Mutation::StreamedResponse(
        StreamedBodyResponse {
            body,
            end_of_stream,
        },
    ))
}

/// One request-body chunk sent on as a streamed_response.
pub fn streamed_request_chunk(body: Bytes, end_of_stream: bool) -> ProcessingResponse {
    request_body(streamed(body, end_of_stream), None)
}

/// The whole body (or, in `STREAMED`, the chunk being answered) replaced by `body`.
pub fn replace_body(body: Bytes) -> BodyMutation {
    BodyMutation {
        mutation: Some(body_mutation::Mutation::Body(body)),
    }
}

fn response_body(common: CommonResponse) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ResponseBody(BodyResponse {
            response: Some(common),
        })),
        ..Default::default()
    }
}

/// One response-body chunk echoed as a streamed_response.
pub fn streamed_response_body(body: Bytes, end_of_stream: bool) -> ProcessingResponse {
    response_body(streamed(body, end_of_stream))
}

/// Continue without changes (headers of either direction).
pub fn continue_request_headers() -> ProcessingResponse {
    request_headers(CommonResponse::default(), None)
}

pub fn continue_response_headers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ResponseHeaders(HeadersResponse {
            response: Some(CommonResponse::default()),
        })),
        ..Default::default()
    }
}

/// A response-body chunk replaced by `body` (modes other than `FULL_DUPLEX_STREAMED`, where
/// Envoy keeps the chunk it sent and a reply without a mutation passes it on unchanged).
pub fn replaced_response_body(body: Bytes) -> ProcessingResponse {
    response_body(mutating(body_mutation::Mutation::Body(body)))
}

pub fn continue_response_body() -> ProcessingResponse {
    response_body(CommonResponse::default())
}

pub fn continue_request_body() -> ProcessingResponse {
    request_body(CommonResponse::default(), None)
}

/// A `STREAMED` request-body chunk replaced by `body`.
pub fn replaced_request_body(body: Bytes) -> ProcessingResponse {
    request_body(mutating(body_mutation::Mutation::Body(body)), None)
}

/// A `STREAMED` request-body chunk dropped (its bytes went out in an earlier replacement).
pub fn cleared_request_body() -> ProcessingResponse {
    request_body(mutating(body_mutation::Mutation::ClearBody(true)), None)
}

pub fn request_trailers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::RequestTrailers(TrailersResponse::default())),
        ..Default::default()
    }
}

pub fn response_trailers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ResponseTrailers(TrailersResponse::default())),
        ..Default::default()
    }
}

/// The OpenAI-style error type for a status.
fn error_type(status: u16) -> &'static str {
    match status {
        400 => "BadRequest",
        413 => "RequestTooLarge",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalServerError",
    }
}

/// An immediate response: status plus an OpenAI-style JSON error body
/// `{"error":{"message":…,"type":…,"code":status}}`.
pub fn immediate(status: u16, message: &str) -> ProcessingResponse {
    let body = serde_json::json!({
        "error": {"message": message, "type": error_type(status), "code": status}
    });
    ProcessingResponse {
        response: Some(Response::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers: Some(HeaderMutation {
                set_headers: vec![set_header("content-type", b"application/json")],
                remove_headers: Vec::new(),
            }),
            body: body.to_string().into_bytes(),
            details: format!("epp_{}", error_type(status)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_has_json_error() {
        let m = immediate(400, "bad \"thing\"");
        let Some(Response::ImmediateResponse(r)) = m.response else {
            panic!()
        };
        assert_eq!(r.status.unwrap().code, 400);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["message"], "bad \"thing\"");
        assert_eq!(v["error"]["code"], 400);
    }
}
