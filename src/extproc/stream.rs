//! The per-request ext_proc state machine (one per gRPC stream), independent of gRPC so it can
//! be driven message by message in tests.
//!
//! Request side, by the body mode Envoy announces in `protocol_config`:
//! * `FULL_DUPLEX_STREAMED`: no reply to the headers; body chunks are accumulated until
//!   end-of-stream (body or trailers); then one RequestHeaders response (destination header,
//!   Content-Length, `clear_route_cache`, `envoy.lb` metadata) followed by the body as
//!   streamed_response chunks.
//! * `BUFFERED` (and other non-duplex modes): headers answered at once with CONTINUE; the
//!   complete body is answered with the header mutation, the new body if it was rewritten, and
//!   the metadata.
//! * headers with end-of-stream (no body): routed at once with the headers reply.
//!
//! Response side: headers continue unchanged; body chunks are echoed (streamed_response in
//! FULL_DUPLEX_STREAMED, CONTINUE otherwise) while usage is parsed for metrics; trailers
//! continue.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, processing_request::Request,
};
use envoy_types::pb::google::protobuf::value::Kind;

use super::messages as msg;
use crate::datastore::Reservation;
use crate::director::{Director, RouteError};
use crate::request::usage::{Usage, UsageParser};
use crate::request::{self, Api, LlmRequest};
use crate::telemetry::metrics::{ErrorLabels, Metrics, ModelLabels, RunningLabels};

/// Header overriding the model the request is served as.
pub const MODEL_REWRITE_HEADER: &str = "x-gateway-model-name-rewrite";
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
        }
    }
}

/// What the handler needs from the server.
#[derive(Debug, Clone)]
pub struct Shared {
    pub director: Arc<Director>,
    pub metrics: Option<Arc<Metrics>>,
    pub limits: Limits,
}

#[derive(Debug, Default)]
struct RequestInfo {
    path: String,
    request_id: Option<String>,
    model_rewrite: Option<String>,
}

/// A routed request: what it was, where it went, and its share of that endpoint's load.
#[derive(Debug)]
struct Routed {
    request: LlmRequest,
    destination: String,
    /// Released when the response ends, or when the handler is dropped (any other end).
    reservation: Option<Reservation>,
    /// Decrements `running_requests` when dropped.
    _running: Option<RunningGuard>,
}

/// One `inference_objective_running_requests` unit, given back on drop.
#[derive(Debug)]
struct RunningGuard {
    metrics: Arc<Metrics>,
    labels: RunningLabels,
}

impl RunningGuard {
    fn new(metrics: Arc<Metrics>, model: &str) -> Self {
        let labels = RunningLabels {
            model_name: model.to_owned(),
        };
        metrics.running_requests.get_or_create(&labels).inc();
        Self { metrics, labels }
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.metrics
            .running_requests
            .get_or_create(&self.labels)
            .dec();
    }
}

#[derive(Debug, Default)]
struct ResponseInfo {
    usage: Option<UsageParser>,
    bytes: usize,
    first_byte: Option<Instant>,
    complete: bool,
    /// `("model":"target")` → `("model":"original")` when the model was rewritten.
    model_swap: Option<(Vec<u8>, Vec<u8>)>,
}

/// State of one ext_proc stream.
#[derive(Debug)]
pub struct StreamHandler {
    shared: Shared,
    started: Instant,
    request_mode: BodySendMode,
    response_mode: BodySendMode,
    mode_known: bool,
    info: RequestInfo,
    subset: Option<Vec<IpAddr>>,
    body: Vec<u8>,
    body_done: bool,
    routed: Option<Routed>,
    response: ResponseInfo,
    done: bool,
}

fn header_value(map: &Option<HeaderMap>, key: &str) -> Option<String> {
    let h = map.as_ref()?.headers.iter().find(|h| h.key == key)?;
    if h.raw_value.is_empty() {
        Some(h.value.clone())
    } else {
        Some(String::from_utf8_lossy(&h.raw_value).into_owned())
    }
}

/// IPs listed by the subset hint; `None` when there is no hint.
fn subset_hint(md: &Option<Metadata>) -> Option<Vec<IpAddr>> {
    let ns = md.as_ref()?.filter_metadata.get(msg::SUBSET_NAMESPACE)?;
    let value = ns.fields.get(msg::SUBSET_KEY)?;
    let items: Vec<&str> = match &value.kind {
        Some(Kind::ListValue(l)) => l
            .values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            })
            .collect(),
        Some(Kind::StringValue(s)) => s.split(',').map(str::trim).collect(),
        _ => Vec::new(),
    };
    Some(
        items
            .into_iter()
            .filter_map(|s| {
                s.parse::<SocketAddr>()
                    .map(|a| a.ip())
                    .or_else(|_| s.parse::<IpAddr>())
                    .ok()
            })
            .collect(),
    )
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    let first = haystack.windows(from.len()).position(|w| w == from)?;
    let mut out = Vec::with_capacity(haystack.len());
    out.extend_from_slice(&haystack[..first]);
    let mut rest = &haystack[first..];
    while !rest.is_empty() {
        if rest.starts_with(from) {
            out.extend_from_slice(to);
            rest = &rest[from.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    Some(out)
}

impl StreamHandler {
    pub fn new(shared: Shared) -> Self {
        Self {
            shared,
            started: Instant::now(),
            request_mode: BodySendMode::FullDuplexStreamed,
            response_mode: BodySendMode::FullDuplexStreamed,
            mode_known: false,
            info: RequestInfo::default(),
            subset: None,
            body: Vec::new(),
            body_done: false,
            routed: None,
            response: ResponseInfo::default(),
            done: false,
        }
    }

    /// True once an immediate response was sent: the stream should end.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Handles one message from Envoy; returns the replies to send (possibly none yet).
    pub fn handle(&mut self, req: ProcessingRequest) -> Vec<ProcessingResponse> {
        if !self.mode_known
            && let Some(pc) = &req.protocol_config
        {
            self.request_mode =
                BodySendMode::try_from(pc.request_body_mode).unwrap_or(BodySendMode::None);
            self.response_mode =
                BodySendMode::try_from(pc.response_body_mode).unwrap_or(BodySendMode::None);
            self.mode_known = true;
        }
        if self.subset.is_none() {
            self.subset = subset_hint(&req.metadata_context);
        }
        let Some(r) = req.request else {
            return Vec::new();
        };
        if self.done {
            return Vec::new();
        }
        match r {
            Request::RequestHeaders(h) => self.on_request_headers(h),
            Request::RequestBody(b) => self.on_request_body(b),
            Request::RequestTrailers(_) => self.on_request_trailers(),
            Request::ResponseHeaders(h) => self.on_response_headers(h),
            Request::ResponseBody(b) => self.on_response_body(b),
            Request::ResponseTrailers(_) => vec![msg::response_trailers()],
        }
    }

    fn duplex(&self) -> bool {
        self.request_mode == BodySendMode::FullDuplexStreamed
    }

    fn on_request_headers(&mut self, h: HttpHeaders) -> Vec<ProcessingResponse> {
        self.info = RequestInfo {
            path: header_value(&h.headers, ":path").unwrap_or_default(),
            request_id: header_value(&h.headers, REQUEST_ID_HEADER),
            model_rewrite: header_value(&h.headers, MODEL_REWRITE_HEADER).filter(|m| !m.is_empty()),
        };
        if h.end_of_stream {
            // No body (e.g. GET /v1/models): route on load alone.
            self.body_done = true;
            let request = LlmRequest {
                request_id: self.request_id(),
                ..Default::default()
            };
            return match self.route(request) {
                Ok(dest) => {
                    let common = msg::routing_common(&dest, None, &[]);
                    vec![msg::request_headers(
                        common,
                        Some(msg::destination_metadata(&dest)),
                    )]
                }
                Err((status, message)) => self.fail(status, &message),
            };
        }
        if self.duplex() {
            Vec::new()
        } else {
            vec![msg::continue_request_headers()]
        }
    }

    fn on_request_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        if self.body_done {
            return Vec::new();
        }
        if self.body.len() + b.body.len() > self.shared.limits.max_body_bytes {
            let limit = self.shared.limits.max_body_bytes;
            return self.fail(413, &format!("request body exceeds {limit} bytes"));
        }
        self.body.extend_from_slice(&b.body);
        if !b.end_of_stream {
            return if self.duplex() {
                Vec::new()
            } else {
                vec![msg::continue_request_body()]
            };
        }
        self.body_done = true;
        self.complete_request(true)
    }

    fn on_request_trailers(&mut self) -> Vec<ProcessingResponse> {
        let mut out = Vec::new();
        if !self.body_done {
            self.body_done = true;
            out = self.complete_request(false);
            if self.done {
                return out;
            }
        }
        out.push(msg::request_trailers());
        out
    }

    /// The whole body is here: parse, route, and build the replies.
    fn complete_request(&mut self, body_end_of_stream: bool) -> Vec<ProcessingResponse> {
        let api = Api::from_path(&self.info.path);
        let mut request = match request::parse(api, &self.body) {
            Ok(r) => r,
            Err(e) => return self.fail(400, &e.to_string()),
        };
        request.request_id = self.request_id();
        let mut body_out: Option<Vec<u8>> = None;
        if let Some(target) = self.info.model_rewrite.clone()
            && target != request.model
        {
            match request::rewrite_model(&self.body, &target) {
                Ok(b) => body_out = Some(b),
                Err(e) => return self.fail(400, &e.to_string()),
            }
            self.response.model_swap = Some((
                format!("\"model\":\"{target}\"").into_bytes(),
                format!("\"model\":\"{}\"", request.model).into_bytes(),
            ));
            request.target_model = target;
        }
        let id = request.request_id.clone();
        let dest = match self.route(request) {
            Ok(d) => d,
            Err((status, message)) => return self.fail(status, &message),
        };
        let body = body_out.unwrap_or_else(|| std::mem::take(&mut self.body));
        let generated_id = self.info.request_id.is_none();
        let extra: Vec<(&str, &[u8])> = if generated_id {
            vec![(REQUEST_ID_HEADER, id.as_bytes())]
        } else {
            Vec::new()
        };
        let common = msg::routing_common(&dest, Some(body.len()), &extra);
        let metadata = Some(msg::destination_metadata(&dest));
        if self.duplex() {
            let mut out = vec![msg::request_headers(common, metadata)];
            out.extend(msg::streamed_request_body(&body, body_end_of_stream));
            out
        } else {
            let mut common = common;
            if self.response.model_swap.is_some() {
                common.body_mutation = Some(envoy_types::pb::envoy::service::ext_proc::v3::BodyMutation {
                    mutation: Some(
                        envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation::Body(body),
                    ),
                });
            }
            vec![msg::request_body(common, metadata)]
        }
    }

    fn request_id(&self) -> String {
        if let Some(id) = &self.info.request_id {
            return id.clone();
        }
        format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
    }

    /// Routes the request; on success remembers it and returns the destination.
    fn route(&mut self, request: LlmRequest) -> Result<String, (u16, String)> {
        let started = Instant::now();
        let result = self.shared.director.route(&request, self.subset.as_deref());
        if let Some(m) = &self.shared.metrics {
            m.scheduler_e2e.observe(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(mut r) => {
                let destination = r.destination();
                tracing::debug!(
                    request_id = %request.request_id,
                    model = %request.target_model,
                    destination = %destination,
                    score = r.scores[0],
                    "request routed"
                );
                let running = self.shared.metrics.as_ref().map(|m| {
                    let labels = model_labels(&request);
                    m.request_total.get_or_create(&labels).inc();
                    m.request_sizes
                        .get_or_create(&labels)
                        .observe(self.body.len() as f64);
                    RunningGuard::new(m.clone(), &request.model)
                });
                self.routed = Some(Routed {
                    request,
                    destination: destination.clone(),
                    reservation: r.reservation.take(),
                    _running: running,
                });
                Ok(destination)
            }
            Err(e) => {
                self.count_error(&request, e.status());
                Err((e.status(), route_message(&e)))
            }
        }
    }

    fn count_error(&self, request: &LlmRequest, status: u16) {
        if let Some(m) = &self.shared.metrics {
            m.request_error_total
                .get_or_create(&ErrorLabels {
                    model_name: request.model.clone(),
                    target_model_name: request.target_model.clone(),
                    error_code: status.to_string(),
                })
                .inc();
        }
    }

    fn fail(&mut self, status: u16, message: &str) -> Vec<ProcessingResponse> {
        tracing::debug!(status, message, "immediate response");
        if status == 400 || status == 413 {
            self.count_error(&LlmRequest::default(), status);
        }
        self.done = true;
        vec![msg::immediate(status, message)]
    }

    fn on_response_headers(&mut self, h: HttpHeaders) -> Vec<ProcessingResponse> {
        let content_type = header_value(&h.headers, "content-type");
        self.response.usage = Some(UsageParser::new(content_type.as_deref()));
        if h.end_of_stream {
            self.response_ended();
        }
        vec![msg::continue_response_headers()]
    }

    /// The model server's first bytes mean the prompt was computed: its prefill work leaves the
    /// endpoint's queue in epp's accounting.
    fn first_response_bytes(&mut self) {
        if self.response.first_byte.is_none() {
            self.response.first_byte = Some(Instant::now());
            if let Some(r) = self.routed.as_mut().and_then(|r| r.reservation.as_mut()) {
                r.prefill_done();
            }
        }
    }

    /// The response is complete: the request no longer loads its endpoint.
    fn response_ended(&mut self) {
        self.response.complete = true;
        if let Some(r) = self.routed.as_mut().and_then(|r| r.reservation.as_mut()) {
            r.release();
        }
    }

    fn on_response_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        if !b.body.is_empty() {
            self.first_response_bytes();
        }
        self.response.bytes += b.body.len();
        self.response
            .usage
            .get_or_insert_with(|| UsageParser::new(None))
            .push(&b.body);
        if b.end_of_stream {
            self.response_ended();
        }
        if self.response_mode != BodySendMode::FullDuplexStreamed {
            return vec![msg::continue_response_body()];
        }
        let body = match &self.response.model_swap {
            Some((from, to)) => replace_all(&b.body, from, to).unwrap_or(b.body),
            None => b.body,
        };
        vec![msg::streamed_response_body(body, b.end_of_stream)]
    }

    /// Records the finished request's metrics (once; also on drop). The reservation and the
    /// running-requests unit are given back when `routed` is dropped.
    fn record_finished(&mut self) {
        let Some(routed) = self.routed.take() else {
            return;
        };
        let Some(m) = self.shared.metrics.clone() else {
            return;
        };
        if !self.response.complete {
            return;
        }
        let labels = model_labels(&routed.request);
        m.request_duration
            .get_or_create(&labels)
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(t) = self.response.first_byte {
            m.request_ttft
                .get_or_create(&labels)
                .observe(t.duration_since(self.started).as_secs_f64());
        }
        m.response_sizes
            .get_or_create(&labels)
            .observe(self.response.bytes as f64);
        let usage: Option<Usage> = self.response.usage.as_mut().and_then(|u| u.finish());
        if let Some(u) = usage {
            m.input_tokens
                .get_or_create(&labels)
                .observe(u.prompt_tokens as f64);
            m.output_tokens
                .get_or_create(&labels)
                .observe(u.completion_tokens as f64);
            m.cached_tokens
                .get_or_create(&labels)
                .observe(u.cached_tokens as f64);
        }
        tracing::trace!(request_id = %routed.request.request_id, destination = %routed.destination, "request finished");
    }
}

impl Drop for StreamHandler {
    /// However the stream ended — response complete, error, reset, or a panic unwinding through
    /// the handler — the request's metrics are recorded and its load is released.
    fn drop(&mut self) {
        self.record_finished();
    }
}

fn model_labels(r: &LlmRequest) -> ModelLabels {
    ModelLabels {
        model_name: r.model.clone(),
        target_model_name: r.target_model.clone(),
    }
}

fn route_message(e: &RouteError) -> String {
    match e {
        RouteError::Filtered(m) => format!("no endpoint can take this request: {m}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use envoy_types::pb::envoy::config::core::v3::{HeaderValue, Metadata};
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        HttpTrailers, ProtocolConfiguration, processing_response::Response,
    };
    use envoy_types::pb::google::protobuf::{ListValue, Struct, Value};

    use crate::config::env::SchedulerEnv;
    use crate::datastore::{Datastore, EndpointSpec};

    fn handler(endpoints: u8) -> StreamHandler {
        let ds = Arc::new(Datastore::new());
        ds.set_endpoints(
            (0..endpoints)
                .map(|i| EndpointSpec::new(format!("p{i}"), ([127, 0, 0, i + 1], 8000).into()))
                .collect(),
        );
        let director = Director::new(
            ds,
            Arc::new(SchedulerEnv::default().build()),
            Duration::from_secs(2),
        );
        StreamHandler::new(Shared {
            director: Arc::new(director),
            metrics: None,
            limits: Limits::default(),
        })
    }

    fn headers(path: &str, end_of_stream: bool, mode: BodySendMode) -> ProcessingRequest {
        ProcessingRequest {
            protocol_config: Some(ProtocolConfiguration {
                request_body_mode: mode as i32,
                response_body_mode: BodySendMode::FullDuplexStreamed as i32,
                ..Default::default()
            }),
            request: Some(Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![HeaderValue {
                        key: ":path".into(),
                        raw_value: path.as_bytes().to_vec(),
                        ..Default::default()
                    }],
                }),
                end_of_stream,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn body(b: &[u8], end_of_stream: bool) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(Request::RequestBody(HttpBody {
                body: b.to_vec(),
                end_of_stream,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    const BODY: &[u8] = br#"{"model":"m","prompt":"hello"}"#;

    #[test]
    fn duplex_waits_for_body_end_then_routes() {
        let mut h = handler(2);
        assert!(
            h.handle(headers(
                "/v1/completions",
                false,
                BodySendMode::FullDuplexStreamed
            ))
            .is_empty()
        );
        assert!(h.handle(body(&BODY[..5], false)).is_empty());
        let out = h.handle(body(&BODY[5..], true));
        assert_eq!(out.len(), 2, "headers response + one body chunk");
        assert!(matches!(out[0].response, Some(Response::RequestHeaders(_))));
        assert!(out[0].dynamic_metadata.is_some());
        assert!(matches!(out[1].response, Some(Response::RequestBody(_))));
    }

    #[test]
    fn duplex_body_ended_by_trailers() {
        let mut h = handler(1);
        h.handle(headers(
            "/v1/completions",
            false,
            BodySendMode::FullDuplexStreamed,
        ));
        assert!(h.handle(body(BODY, false)).is_empty());
        let out = h.handle(ProcessingRequest {
            request: Some(Request::RequestTrailers(HttpTrailers::default())),
            ..Default::default()
        });
        assert_eq!(out.len(), 3, "headers, body, trailers responses");
        assert!(matches!(
            out[2].response,
            Some(Response::RequestTrailers(_))
        ));
    }

    #[test]
    fn buffered_answers_headers_at_once_and_routes_on_body() {
        let mut h = handler(1);
        let out = h.handle(headers("/v1/completions", false, BodySendMode::Buffered));
        assert!(matches!(out[0].response, Some(Response::RequestHeaders(_))));
        let out = h.handle(body(BODY, true));
        let Some(Response::RequestBody(b)) = &out[0].response else {
            panic!("expected a body response")
        };
        let set = &b
            .response
            .as_ref()
            .unwrap()
            .header_mutation
            .as_ref()
            .unwrap()
            .set_headers;
        assert_eq!(set[0].header.as_ref().unwrap().raw_value, b"127.0.0.1:8000");
    }

    #[test]
    fn no_endpoints_is_503_and_ends_the_stream() {
        let mut h = handler(0);
        let out = h.handle(headers(
            "/v1/models",
            true,
            BodySendMode::FullDuplexStreamed,
        ));
        let Some(Response::ImmediateResponse(r)) = &out[0].response else {
            panic!("expected an immediate response")
        };
        assert_eq!(r.status.unwrap().code, 503);
        assert!(h.is_done());
        assert!(
            h.handle(body(BODY, true)).is_empty(),
            "nothing after an immediate response"
        );
    }

    fn hint(values: Vec<&str>) -> Option<Metadata> {
        let list = Value {
            kind: Some(Kind::ListValue(ListValue {
                values: values
                    .into_iter()
                    .map(|v| Value {
                        kind: Some(Kind::StringValue(v.into())),
                    })
                    .collect(),
            })),
        };
        Some(Metadata {
            filter_metadata: [(
                msg::SUBSET_NAMESPACE.to_owned(),
                Struct {
                    fields: [(msg::SUBSET_KEY.to_owned(), list)].into(),
                },
            )]
            .into(),
            ..Default::default()
        })
    }

    #[test]
    fn subset_hint_parsing() {
        assert_eq!(subset_hint(&None), None);
        assert_eq!(
            subset_hint(&hint(vec!["10.0.0.1:8000", "10.0.0.2", "junk"])),
            Some(vec![
                "10.0.0.1".parse().unwrap(),
                "10.0.0.2".parse().unwrap()
            ])
        );
        assert_eq!(subset_hint(&hint(vec![])), Some(vec![]));
    }

    #[test]
    fn subset_hint_restricts_routing_end_to_end() {
        let mut h = handler(3);
        let mut req = headers("/v1/completions", false, BodySendMode::FullDuplexStreamed);
        req.metadata_context = hint(vec!["127.0.0.3:8000"]);
        h.handle(req);
        let out = h.handle(body(BODY, true));
        let Some(md) = &out[0].dynamic_metadata else {
            panic!("no metadata")
        };
        let Some(Kind::StructValue(lb)) = &md.fields["envoy.lb"].kind else {
            panic!()
        };
        assert_eq!(
            lb.fields["x-gateway-destination-endpoint"].kind,
            Some(Kind::StringValue("127.0.0.3:8000".into()))
        );
        let mut h = handler(3);
        let mut req = headers("/v1/completions", false, BodySendMode::FullDuplexStreamed);
        req.metadata_context = hint(vec![]);
        h.handle(req);
        let out = h.handle(body(BODY, true));
        let Some(Response::ImmediateResponse(r)) = &out[0].response else {
            panic!()
        };
        assert_eq!(r.status.unwrap().code, 503);
    }

    #[test]
    fn model_swap_replaces_every_occurrence() {
        assert_eq!(
            replace_all(
                b"a\"model\":\"x\"b\"model\":\"x\"",
                b"\"model\":\"x\"",
                b"\"model\":\"yy\""
            )
            .unwrap(),
            b"a\"model\":\"yy\"b\"model\":\"yy\"".to_vec()
        );
        assert_eq!(replace_all(b"nothing", b"zz", b"y"), None);
    }
}
