//! Bench fixture for `scripts/bench_extproc.sh`: the naive minimal ext_proc picker epp is
//! compared with. FULL_DUPLEX_STREAMED only: buffers the request body into one vector, hashes
//! it with xxh3, picks `hash % N` among the endpoints, sends the destination header and
//! metadata, re-emits the body in 62,000-byte copies, and echoes response chunks. No parsing,
//! no load tracking, plaintext gRPC.
//!
//! `cargo run --release --example naive_picker -- PORT ip:port,ip:port,…`

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation,
    processing_request::Request, processing_response::Response,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Clone)]
struct Picker {
    endpoints: Vec<String>,
}

fn streamed(body: Vec<u8>, end_of_stream: bool) -> CommonResponse {
    CommonResponse {
        body_mutation: Some(BodyMutation {
            mutation: Some(body_mutation::Mutation::StreamedResponse(
                StreamedBodyResponse {
                    body,
                    end_of_stream,
                    ..Default::default()
                },
            )),
        }),
        ..Default::default()
    }
}

fn reply(r: Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

impl Picker {
    fn route(&self, body: Vec<u8>) -> Vec<ProcessingResponse> {
        let h = xxhash_rust::xxh3::xxh3_64(&body);
        let dest = &self.endpoints[(h % self.endpoints.len() as u64) as usize];
        let common = CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "x-gateway-destination-endpoint".into(),
                        raw_value: dest.as_bytes().to_vec(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                remove_headers: Vec::new(),
            }),
            clear_route_cache: true,
            ..Default::default()
        };
        let inner = Struct {
            fields: HashMap::from([(
                "x-gateway-destination-endpoint".to_owned(),
                Value {
                    kind: Some(Kind::StringValue(dest.clone())),
                },
            )]),
        };
        let metadata = Struct {
            fields: HashMap::from([(
                "envoy.lb".to_owned(),
                Value {
                    kind: Some(Kind::StructValue(inner)),
                },
            )]),
        };
        let mut out = vec![ProcessingResponse {
            response: Some(Response::RequestHeaders(HeadersResponse {
                response: Some(common),
            })),
            dynamic_metadata: Some(metadata),
            ..Default::default()
        }];
        let n = body.len().div_ceil(62_000).max(1);
        for i in 0..n {
            let chunk =
                body[(i * 62_000).min(body.len())..((i + 1) * 62_000).min(body.len())].to_vec();
            out.push(reply(Response::RequestBody(BodyResponse {
                response: Some(streamed(chunk, i + 1 == n)),
            })));
        }
        out
    }

    fn handle(&self, msg: ProcessingRequest, body: &mut Vec<u8>) -> Vec<ProcessingResponse> {
        match msg.request {
            Some(Request::RequestHeaders(h)) if h.end_of_stream => self.route(Vec::new()),
            Some(Request::RequestHeaders(_)) => Vec::new(),
            Some(Request::RequestBody(b)) => {
                body.extend_from_slice(&b.body);
                if b.end_of_stream {
                    self.route(std::mem::take(body))
                } else {
                    Vec::new()
                }
            }
            Some(Request::RequestTrailers(_)) => {
                vec![reply(
                    Response::RequestTrailers(TrailersResponse::default()),
                )]
            }
            Some(Request::ResponseHeaders(_)) => {
                vec![reply(Response::ResponseHeaders(HeadersResponse::default()))]
            }
            Some(Request::ResponseBody(b)) => vec![reply(Response::ResponseBody(BodyResponse {
                response: Some(streamed(b.body, b.end_of_stream)),
            }))],
            Some(Request::ResponseTrailers(_)) => {
                vec![reply(Response::ResponseTrailers(
                    TrailersResponse::default(),
                ))]
            }
            None => Vec::new(),
        }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Picker {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, tonic::Status>>;

    async fn process(
        &self,
        request: tonic::Request<tonic::Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let picker = self.clone();
        tokio::spawn(async move {
            let mut body = Vec::new();
            while let Ok(Some(msg)) = inbound.message().await {
                for r in picker.handle(msg, &mut body) {
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().unwrap_or_else(|| "9002".into()).parse()?;
    let endpoints: Vec<String> = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8000".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    eprintln!("naive_picker listening on 127.0.0.1:{port}");
    tonic::transport::Server::builder()
        .add_service(
            ExternalProcessorServer::new(Picker { endpoints })
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
