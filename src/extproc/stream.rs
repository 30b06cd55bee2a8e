//! The per-request ext_proc state machine (one per gRPC stream), independent of gRPC so it can
//! be driven message by message in tests and by the fuzzer.
//!
//! Request side, by the body mode Envoy announces in `protocol_config`:
//! * `STREAMED` with `send_body_without_waiting_for_header_response` (the shipped Envoy
//!   config): Envoy sends each chunk as it arrives and keeps it. No answer until end-of-stream
//!   (body or trailers); then one RequestHeaders response (the routing decision as below)
//!   followed by one answer per chunk: a few bytes each, or, when the model was rewritten, the
//!   new body in the first and the others cleared.
//! * `FULL_DUPLEX_STREAMED` (the Go EPP's gateways): no reply to the headers; body chunks are
//!   kept and scanned as they arrive until end-of-stream (body or trailers); then one
//!   RequestHeaders response (destination header, Content-Length, `clear_route_cache`,
//!   `envoy.lb` metadata) followed by the body as streamed_response chunks (the received
//!   buffers, moved).
//! * `BUFFERED`: headers answered at once with CONTINUE; the body message holds the whole body
//!   (also when trailers follow it) and is answered with the header mutation, the new body if
//!   it was rewritten, and the metadata.
//! * `NONE`, `BUFFERED_PARTIAL`, and `STREAMED` without the early body: the headers must be
//!   answered before the whole body can be seen, so the request is routed on load alone right
//!   there (the destination header is always set — a client-sent one never survives), and
//!   body chunks continue unchanged. This is logged once per mode: prefix-aware routing needs
//!   one of the modes above.
//! * headers with end-of-stream (no body): routed at once with the headers reply.
//!
//! Response side: headers continue unchanged; body chunks are echoed as streamed_response in
//! `FULL_DUPLEX_STREAMED` and answered with CONTINUE in the other modes (the shipped Envoy
//! config's `STREAMED`: Envoy keeps the chunk, so nothing is sent back but a few bytes), or
//! replaced when the model name was swapped back; usage is parsed for metrics; trailers
//! continue. The first response bytes release the request's prefill from the endpoint's load;
//! the end of the response (or of the stream, however it ends) releases the rest. Where Envoy
//! sends no response body (`NONE`), no first byte comes: an event stream's prefill is parked
//! at its headers until a scrape shows it scheduled or the request ends; and as the stream
//! then closes without showing the response's end (at the response headers when Envoy skips
//! response trailers, at the response's end when it waits for them), an event stream's
//! request is parked on its endpoint until a scrape shows it gone
//! ([`crate::datastore::load`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::google::protobuf::value::Kind;

use super::body::{BodyBudget, BudgetHold, RequestBody};
use super::messages as msg;
use super::proto::{
    BodySendMode, CommonResponse, HeaderMap, HttpBody, HttpHeaders, Metadata, ProcessingRequest,
    ProcessingResponse, Struct, processing_request::Request,
};
use super::response::ResponseState;
use crate::datastore::{Endpoint, Reservation};
use crate::director::{Director, RouteError};
use crate::objectives::{OBJECTIVE_HEADERS, Policy};
use crate::request::usage::Usage;
use crate::request::{self, Api, LlmRequest, ScanLimits};
use crate::scheduling::ScheduleResult;
use crate::telemetry::metrics::{
    AttemptLabels, ErrorLabels, Metrics, ModelLabels, RewriteLabels, RunningLabels,
};

/// Header overriding the model the request is served as.
pub const MODEL_REWRITE_HEADER: &str = "x-gateway-model-name-rewrite";
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub scan: ScanLimits,
    /// Largest gRPC message decoded (default: the body limit plus 1 MiB).
    pub max_recv_message: Option<usize>,
    /// Largest gRPC message encoded (default: as decoded).
    pub max_send_message: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            scan: ScanLimits::default(),
            max_recv_message: None,
            max_send_message: None,
        }
    }
}

/// What the handler needs from the server.
#[derive(Debug, Clone)]
pub struct Shared {
    pub director: Arc<Director>,
    pub metrics: Option<Arc<Metrics>>,
    pub limits: Limits,
    /// Process-wide allowance of request-body bytes held at once.
    pub budget: Arc<BodyBudget>,
    /// InferenceObjective priorities and InferenceModelRewrite rules.
    pub policy: Arc<Policy>,
    /// Ignore Envoy's subset hint (`--disable-endpoint-subset-filter`).
    pub ignore_subset_hint: bool,
}

impl Shared {
    pub fn new(director: Arc<Director>, metrics: Option<Arc<Metrics>>, limits: Limits) -> Self {
        Self {
            director,
            metrics,
            limits,
            budget: BodyBudget::new(usize::MAX),
            policy: Policy::new(),
            ignore_subset_hint: false,
        }
    }
}

#[derive(Debug, Default)]
struct RequestInfo {
    path: String,
    request_id: Option<String>,
    model_rewrite: Option<String>,
    /// The InferenceObjective the request names.
    objective: Option<String>,
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
    /// When it was routed, and whether its response status is a success: a streamed 2xx
    /// response's first byte times the pool's first-token fit.
    at: Instant,
    succeeded: bool,
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
            model_name: metrics.models.bound(model),
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

/// Body modes in which epp cannot see the body before it must answer the headers.
/// `STREAMED` hides it unless Envoy sends the body without waiting for that answer.
fn routes_at_headers(mode: BodySendMode, body_without_waiting: bool) -> bool {
    match mode {
        BodySendMode::FullDuplexStreamed | BodySendMode::Buffered => false,
        BodySendMode::Streamed => !body_without_waiting,
        _ => true,
    }
}

/// Logs once per process that `mode` limits routing to load alone.
fn warn_once_about(mode: BodySendMode) {
    static WARNED: [AtomicBool; 6] = [const { AtomicBool::new(false) }; 6];
    let i = (mode as usize).min(5);
    if !WARNED[i].swap(true, Ordering::Relaxed) {
        tracing::warn!(
            mode = mode.as_str_name(),
            "Envoy's request body mode hides the body until after routing: requests are routed on \
             load alone; use STREAMED with send_body_without_waiting_for_header_response, \
             FULL_DUPLEX_STREAMED or BUFFERED for prefix-aware routing"
        );
    }
}

/// Whether a response goes on after its headers, for a gateway that shows epp no response
/// bodies: a successful event stream, or a response of unknown type (`event_stream` is
/// `None` before any headers or without a content type), but not a whole JSON answer or an
/// error.
fn goes_on_after_headers(event_stream: Option<bool>, succeeded: bool) -> bool {
    event_stream.is_none_or(|sse| sse && succeeded)
}

/// Logs once per process that Envoy sends epp no response bodies.
fn note_unseen_ends_once() {
    static NOTED: AtomicBool = AtomicBool::new(false);
    if !NOTED.swap(true, Ordering::Relaxed) {
        tracing::info!(
            "Envoy's response body mode is NONE: epp sees no response chunks, so it learns no \
             first-token times or tokens per byte, and cannot see when a streamed response \
             ends: each stays counted on its endpoint, and its prompt queued, until the \
             endpoint's metrics show it done and scheduled; STREAMED response bodies give \
             both exactly"
        );
    }
}

/// The answers to a `STREAMED` request held until its end: the routing headers, then one
/// answer per body chunk (Envoy keeps the chunks; a rewritten body replaces the first chunk
/// and clears the others).
fn streamed_answers(
    common: CommonResponse,
    metadata: Option<Struct>,
    rewritten: Option<Bytes>,
    chunks: usize,
) -> Vec<ProcessingResponse> {
    let mut out = Vec::with_capacity(chunks + 1);
    out.push(msg::request_headers(common, metadata));
    let replaced = rewritten.is_some();
    out.extend(rewritten.map(msg::replaced_request_body));
    let answer = if replaced {
        msg::cleared_request_body
    } else {
        msg::continue_request_body
    };
    out.extend((out.len() - 1..chunks).map(|_| answer()));
    out
}

/// State of one ext_proc stream.
#[derive(Debug)]
pub struct StreamHandler {
    shared: Shared,
    started: Instant,
    request_mode: BodySendMode,
    response_mode: BodySendMode,
    /// Envoy sends body chunks before the headers are answered
    /// (`send_body_without_waiting_for_header_response`).
    body_without_waiting: bool,
    mode_known: bool,
    /// Request-body messages received in `STREAMED`, each owed one answer.
    streamed_chunks: usize,
    info: RequestInfo,
    subset: Option<Vec<IpAddr>>,
    body: Option<RequestBody>,
    body_done: bool,
    /// Budget of a body whose replies are being sent (released by [`Self::replies_sent`]).
    hold: Option<BudgetHold>,
    routed: Option<Routed>,
    response: ResponseState,
    done: bool,
    /// A decision queued index records since [`Self::take_queued_records`] last looked.
    records_queued: bool,
}

fn header_value(map: &Option<HeaderMap>, key: &str) -> Option<String> {
    let h = map.as_ref()?.headers.iter().find(|h| h.key == key)?;
    if h.raw_value.is_empty() {
        Some(h.value.clone())
    } else {
        Some(String::from_utf8_lossy(&h.raw_value).into_owned())
    }
}

/// The `x-gateway-destination-endpoint-served` entry of the `envoy.lb` metadata, if any.
fn served_endpoint(md: &Option<Metadata>) -> Option<String> {
    let ns = md.as_ref()?.filter_metadata.get(msg::LB_NAMESPACE)?;
    match &ns.fields.get(msg::SERVED_KEY)?.kind {
        Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
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

impl StreamHandler {
    pub fn new(shared: Shared) -> Self {
        Self {
            shared,
            started: Instant::now(),
            request_mode: BodySendMode::FullDuplexStreamed,
            response_mode: BodySendMode::FullDuplexStreamed,
            body_without_waiting: false,
            mode_known: false,
            streamed_chunks: 0,
            info: RequestInfo::default(),
            subset: None,
            body: None,
            body_done: false,
            hold: None,
            routed: None,
            response: ResponseState::default(),
            done: false,
            records_queued: false,
        }
    }

    /// True once an immediate response was sent: the stream should end.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The scheduler whose queued index records are to be applied, if a decision queued
    /// some since the last call (see [`crate::index::recorder`]).
    pub fn take_queued_records(&mut self) -> Option<Arc<crate::scheduling::Scheduler>> {
        let scheduler = &self.shared.director.scheduler;
        (std::mem::take(&mut self.records_queued) && scheduler.defers_records())
            .then(|| scheduler.clone())
    }

    /// The replies of the last message were sent: the body they carried is no longer held.
    pub fn replies_sent(&mut self) {
        self.hold = None;
    }

    /// True while Envoy waits for epp's answer to the request (headers seen, neither routed
    /// nor refused): ending the gRPC stream now must not look like a clean finish, or Envoy
    /// would send the request on unrouted.
    pub fn awaiting_answer(&self) -> bool {
        !self.done && self.routed.is_none() && (self.body.is_some() || self.body_done)
    }

    /// The gRPC stream failed while the request awaited its answer. A message over the gRPC
    /// size limit (a body far past `--max-request-body-bytes`) is answered with 413; for any
    /// other failure there is no reply (the stream ends with the error, and Envoy fails the
    /// request closed).
    pub fn stream_failed(&mut self, status: &tonic::Status) -> Option<ProcessingResponse> {
        if !self.awaiting_answer() {
            return None;
        }
        match status.code() {
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
                let limit = self.shared.limits.max_body_bytes;
                let message = format!("request body exceeds {limit} bytes");
                self.fail(413, &message).pop()
            }
            _ => None,
        }
    }

    /// Handles one message from Envoy; returns the replies to send (possibly none yet).
    pub fn handle(&mut self, req: ProcessingRequest) -> Vec<ProcessingResponse> {
        let mut replies = Vec::new();
        self.handle_into(req, &mut replies);
        replies
    }

    /// As [`Self::handle`], appending the replies to `out`: a caller that reuses `out` handles
    /// response chunks without allocating (one reply each).
    pub fn handle_into(&mut self, req: ProcessingRequest, out: &mut Vec<ProcessingResponse>) {
        if !self.mode_known
            && let Some(pc) = &req.protocol_config
        {
            self.request_mode =
                BodySendMode::try_from(pc.request_body_mode).unwrap_or(BodySendMode::None);
            self.response_mode =
                BodySendMode::try_from(pc.response_body_mode).unwrap_or(BodySendMode::None);
            self.body_without_waiting = pc.send_body_without_waiting_for_header_response;
            self.mode_known = true;
            if self.response_mode == BodySendMode::None {
                note_unseen_ends_once();
            }
        }
        if self.subset.is_none() && !self.shared.ignore_subset_hint {
            self.subset = subset_hint(&req.metadata_context);
        }
        if let Some(Request::ResponseHeaders(_)) = &req.request {
            self.check_served(&req.metadata_context);
        }
        let Some(r) = req.request else {
            return;
        };
        if self.done {
            return;
        }
        match r {
            Request::RequestHeaders(h) => out.extend(self.on_request_headers(h)),
            Request::RequestBody(b) => out.extend(self.on_request_body(b)),
            Request::RequestTrailers(_) => out.extend(self.on_request_trailers()),
            Request::ResponseHeaders(h) => out.push(self.on_response_headers(h)),
            Request::ResponseBody(b) => out.push(self.on_response_body(b)),
            Request::ResponseTrailers(_) => {
                self.response_ended();
                out.push(msg::response_trailers());
            }
        }
    }

    fn duplex(&self) -> bool {
        self.request_mode == BodySendMode::FullDuplexStreamed
    }

    /// `STREAMED` with the body sent before the headers are answered: the chunks are
    /// scanned as they arrive and every answer waits for the end of the body.
    fn streamed(&self) -> bool {
        self.request_mode == BodySendMode::Streamed
    }

    fn on_request_headers(&mut self, h: HttpHeaders) -> Vec<ProcessingResponse> {
        if self.routed.is_some() || self.body.is_some() || self.body_done {
            return Vec::new(); // a second headers message: ignored
        }
        self.info = RequestInfo {
            path: header_value(&h.headers, ":path").unwrap_or_default(),
            request_id: header_value(&h.headers, REQUEST_ID_HEADER),
            model_rewrite: header_value(&h.headers, MODEL_REWRITE_HEADER).filter(|m| !m.is_empty()),
            objective: OBJECTIVE_HEADERS
                .iter()
                .find_map(|k| header_value(&h.headers, k))
                .filter(|o| !o.is_empty()),
        };
        if h.end_of_stream || routes_at_headers(self.request_mode, self.body_without_waiting) {
            if !h.end_of_stream {
                warn_once_about(self.request_mode);
            }
            // No body to see (e.g. GET /v1/models, or a body mode that hides it): route on
            // load alone, and always set the destination.
            self.body_done = true;
            return self.route_without_body();
        }
        let api = Api::from_path(&self.info.path);
        let limits = self.shared.limits;
        let body = RequestBody::new(
            api,
            limits.scan,
            limits.max_body_bytes,
            self.shared.budget.clone(),
        );
        // Only FULL_DUPLEX_STREAMED sends the body on from epp; the other modes need the
        // chunks only to rewrite the model.
        let may_rewrite = self.info.model_rewrite.is_some() || self.shared.policy.has_rewrites();
        self.body = Some(if self.duplex() || may_rewrite {
            body
        } else {
            body.scan_only()
        });
        if self.duplex() || self.streamed() {
            Vec::new()
        } else {
            vec![msg::continue_request_headers()]
        }
    }

    fn route_without_body(&mut self) -> Vec<ProcessingResponse> {
        let request = LlmRequest {
            request_id: self.request_id(),
            priority: self.shared.policy.priority(self.info.objective.as_deref()),
            ..Default::default()
        };
        match self.route(request, 0) {
            Ok(dest) => {
                let common = msg::routing_common(&dest, None, &[]);
                vec![msg::request_headers(
                    common,
                    Some(msg::destination_metadata(&dest)),
                )]
            }
            Err((status, message)) => self.fail(status, &message),
        }
    }

    fn on_request_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        if self.body_done {
            // Routed at the headers (STREAMED, BUFFERED_PARTIAL) or a stray chunk.
            return if self.duplex() {
                Vec::new()
            } else {
                vec![msg::continue_request_body()]
            };
        }
        let Some(body) = self.body.as_mut() else {
            return self.fail(500, "request body before its headers");
        };
        if let Err(e) = body.push(b.body) {
            return self.fail(e.status(), &e.to_string());
        }
        if self.streamed() {
            self.streamed_chunks += 1;
            if !b.end_of_stream {
                return Vec::new();
            }
        }
        // BUFFERED sends the whole body in one message (end_of_stream is false only when
        // trailers follow).
        if b.end_of_stream || !self.duplex() {
            self.body_done = true;
            return self.complete_request(b.end_of_stream);
        }
        Vec::new()
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

    /// The whole body is here: route, and build the replies.
    fn complete_request(&mut self, body_end_of_stream: bool) -> Vec<ProcessingResponse> {
        let Some(mut body) = self.body.take() else {
            return self.fail(500, "no request body");
        };
        let scanned = match body.finish() {
            Ok(s) => s,
            Err(e) => return self.fail(e.status(), &e.to_string()),
        };
        let span = scanned.model_span;
        let mut request = LlmRequest::from_scanned(scanned);
        request.request_id = self.request_id();
        request.priority = self.shared.policy.priority(self.info.objective.as_deref());
        let mut rewritten: Option<Bytes> = None;
        // A rule installed while the body streamed finds no chunks kept: not applied.
        if body.keeps_chunks()
            && let Some(target) = self.rewrite_target(&request.model)
            && target != request.model
        {
            let Some(span) = span else {
                return self.fail(400, "cannot rewrite a model that is not a top-level string");
            };
            rewritten = Some(request::rewrite_model(body.chunks(), span, &target).into());
            self.response.swap_model(&target, &request.model);
            request.target_model = target;
        }
        let id = request.request_id.clone();
        let body_len = rewritten.as_ref().map_or(body.len(), Bytes::len);
        let dest = match self.route(request, body.len()) {
            Ok(d) => d,
            Err((status, message)) => return self.fail(status, &message),
        };
        let extra: Vec<(&str, &[u8])> = if self.info.request_id.is_none() {
            vec![(REQUEST_ID_HEADER, id.as_bytes())]
        } else {
            Vec::new()
        };
        let mut common = msg::routing_common(&dest, Some(body_len), &extra);
        let metadata = Some(msg::destination_metadata(&dest));
        if self.duplex() {
            let (chunks, hold) = body.into_messages(rewritten, body_end_of_stream);
            self.hold = Some(hold);
            let mut out = vec![msg::request_headers(common, metadata)];
            out.extend(chunks);
            return out;
        }
        self.hold = Some(body.into_hold());
        if self.streamed() {
            return streamed_answers(common, metadata, rewritten, self.streamed_chunks);
        }
        if let Some(new_body) = rewritten {
            common.body_mutation = Some(msg::replace_body(new_body));
        }
        vec![msg::request_body(common, metadata)]
    }

    /// The model the request is served as: the rewrite header's, else an
    /// InferenceModelRewrite rule's (counted), else none.
    fn rewrite_target(&self, model: &str) -> Option<String> {
        if let Some(t) = &self.info.model_rewrite {
            return Some(t.clone());
        }
        let rewrite = self
            .shared
            .policy
            .rewrite(model, &mut fastrand::Rng::new())?;
        if let Some(m) = &self.shared.metrics {
            m.model_rewrites
                .get_or_create(&RewriteLabels {
                    model_rewrite_name: rewrite.object.clone(),
                    model_name: m.models.bound(model),
                    target_model: m.models.bound(&rewrite.target),
                })
                .inc();
        }
        Some(rewrite.target)
    }

    /// Envoy reports the endpoint that served the request (`envoy.lb` /
    /// `x-gateway-destination-endpoint-served`); when it is not the one epp picked, the
    /// request's load moves there.
    fn check_served(&mut self, md: &Option<Metadata>) {
        let Some(served) = served_endpoint(md) else {
            return;
        };
        let Some(routed) = self.routed.as_mut() else {
            return;
        };
        if routed.destination.split(',').next() == Some(served.as_str()) {
            return;
        }
        let endpoint = self
            .shared
            .director
            .datastore
            .endpoints()
            .into_iter()
            .find(|e| e.address_str == served);
        tracing::debug!(picked = %routed.destination, %served, known = endpoint.is_some(), "served by another endpoint");
        if let (Some(endpoint), Some(old)) = (endpoint, routed.reservation.take()) {
            routed.reservation = Some(Reservation::new(endpoint, old.amount()));
        }
        routed.destination = served;
    }

    fn request_id(&self) -> String {
        if let Some(id) = &self.info.request_id {
            return id.clone();
        }
        format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
    }

    /// Routes the request; on success remembers it and returns the destination.
    fn route(&mut self, request: LlmRequest, body_len: usize) -> Result<String, (u16, String)> {
        let started = Instant::now();
        let result = self.shared.director.route(&request, self.subset.as_deref());
        if let Some(m) = &self.shared.metrics {
            m.scheduler_e2e.observe(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(r) => Ok(self.routed(request, r, body_len)),
            Err(e) => {
                self.count_error(&request, e.status());
                self.count_attempt(&request, None);
                Err((e.status(), route_message(&e)))
            }
        }
    }

    /// Remembers a routed request (its load reservation, its running-request count) and
    /// returns its destination.
    fn routed(&mut self, request: LlmRequest, mut r: ScheduleResult, body_len: usize) -> String {
        self.records_queued = true;
        let destination = r.destination();
        tracing::debug!(
            request_id = %request.request_id,
            model = %request.target_model,
            destination = %destination,
            score = r.scores[0],
            "request routed"
        );
        self.count_attempt(&request, Some(&r.primary().endpoint));
        let running = self.shared.metrics.as_ref().map(|m| {
            let labels = model_labels(m, &request);
            m.request_total.get_or_create(&labels).inc();
            m.request_sizes
                .get_or_create(&labels)
                .observe(body_len as f64);
            RunningGuard::new(m.clone(), &request.model)
        });
        self.routed = Some(Routed {
            request,
            destination: destination.clone(),
            reservation: r.reservation.take(),
            _running: running,
            at: Instant::now(),
            succeeded: false,
        });
        destination
    }

    /// Counts a scheduling attempt: a success on `endpoint`, or a failure (`None`).
    fn count_attempt(&self, request: &LlmRequest, endpoint: Option<&Endpoint>) {
        let Some(m) = &self.shared.metrics else {
            return;
        };
        let labels = AttemptLabels {
            status: if endpoint.is_some() {
                "success"
            } else {
                "failure"
            }
            .into(),
            target_model_name: m.models.bound(&request.target_model),
            pod_name: endpoint.map(|e| e.name.clone()).unwrap_or_default(),
            namespace: m.namespace.clone(),
            port: endpoint
                .map(|e| e.address.port().to_string())
                .unwrap_or_default(),
        };
        m.scheduler_attempts.get_or_create(&labels).inc();
    }

    fn count_error(&self, request: &LlmRequest, status: u16) {
        if let Some(m) = &self.shared.metrics {
            m.request_error_total
                .get_or_create(&ErrorLabels {
                    model_name: m.models.bound(&request.model),
                    target_model_name: m.models.bound(&request.target_model),
                    error_code: status.to_string(),
                })
                .inc();
        }
    }

    /// Ends the request with an immediate response (logged once, by severity).
    fn fail(&mut self, status: u16, message: &str) -> Vec<ProcessingResponse> {
        match status {
            500.. => tracing::warn!(status, message, path = %self.info.path, "request failed"),
            429 => tracing::info!(status, message, "request refused"),
            _ => tracing::debug!(status, message, path = %self.info.path, "bad request"),
        }
        if matches!(status, 400 | 413) || (status == 429 && self.routed.is_none()) {
            self.count_error(&LlmRequest::default(), status);
        }
        self.done = true;
        self.body = None;
        vec![msg::immediate(status, message)]
    }

    fn on_response_headers(&mut self, h: HttpHeaders) -> ProcessingResponse {
        self.observe_status(&h.headers);
        let content_type = header_value(&h.headers, "content-type");
        self.response.headers(content_type.as_deref());
        if h.end_of_stream {
            self.response_ended();
        } else if self.mode_known && self.response_mode == BodySendMode::None {
            self.prefill_unseen();
        }
        msg::continue_response_headers()
    }

    /// Envoy sends no response bodies, so no first byte will tell epp the prompt was
    /// computed: a response that goes on (an event stream, or one of unknown type) parks its
    /// prefill until a scrape shows it scheduled; any other answer is complete (a whole JSON
    /// answer comes after its generation) or an error.
    fn prefill_unseen(&mut self) {
        let Some(routed) = self.routed.as_mut() else {
            return;
        };
        let goes_on = goes_on_after_headers(self.response.event_stream, routed.succeeded);
        if let Some(r) = routed.reservation.as_mut() {
            if goes_on {
                r.park_prefill();
            } else {
                r.prefill_done();
            }
        }
    }

    /// Tells the outlier detector how the endpoint that served the request answered.
    fn observe_status(&mut self, headers: &Option<HeaderMap>) {
        let Some(status) = header_value(headers, ":status").and_then(|s| s.parse::<u16>().ok())
        else {
            return;
        };
        let Some(routed) = self.routed.as_mut() else {
            return;
        };
        routed.succeeded = (200..300).contains(&status);
        let Some(reservation) = routed.reservation.as_ref() else {
            return;
        };
        self.shared
            .director
            .observe_response(reservation.endpoint(), status);
    }

    /// The response is complete: the request no longer loads its endpoint.
    fn response_ended(&mut self) {
        self.response.complete = true;
        if let Some(r) = self.routed.as_mut().and_then(|r| r.reservation.as_mut()) {
            r.release();
        }
    }

    fn on_response_body(&mut self, b: HttpBody) -> ProcessingResponse {
        let chunk = self.response.chunk(b.body);
        if chunk.first {
            self.first_response_byte();
        }
        if b.end_of_stream {
            self.response_ended();
        }
        match self.response_mode {
            BodySendMode::FullDuplexStreamed => {
                msg::streamed_response_body(chunk.body, b.end_of_stream)
            }
            _ if chunk.rewritten => msg::replaced_response_body(chunk.body),
            _ => msg::continue_response_body(),
        }
    }

    /// The model server's first bytes mean the prompt was computed: its prefill leaves the
    /// endpoint's queue, and a streamed success times the pool's first-token fit — where
    /// Envoy passes response chunks on as they come (in `BUFFERED` and `BUFFERED_PARTIAL`
    /// the first bytes epp sees may have waited for the rest).
    fn first_response_byte(&mut self) {
        let chunks_as_they_come = matches!(
            self.response_mode,
            BodySendMode::Streamed | BodySendMode::FullDuplexStreamed
        );
        let Some(routed) = self.routed.as_mut() else {
            return;
        };
        let Some(r) = routed.reservation.as_mut() else {
            return;
        };
        r.prefill_done();
        if routed.request.stream && routed.succeeded && chunks_as_they_come {
            r.observe_first_token(routed.at.elapsed().as_secs_f64());
        }
    }

    /// Records the finished request's metrics (once; also on drop). The reservation and the
    /// running-requests unit are given back when `routed` is dropped.
    fn record_finished(&mut self) {
        let Some(mut routed) = self.routed.take() else {
            return;
        };
        if !self.response.complete {
            if self.end_unseen(&routed)
                && let Some(r) = routed.reservation
            {
                r.park();
            }
            return;
        }
        let usage = self.response.usage();
        if let (Some(u), Some(r)) = (usage, routed.reservation.as_mut()) {
            // The endpoint's bytes per token and kept share, for the prefix index's capacity.
            r.endpoint()
                .tokenization
                .observe(routed.request.prompt_len() as u64, u.prompt_tokens);
            if let Some(cached) = u.cached_tokens {
                r.observe_cached(cached, u.prompt_tokens);
            }
        }
        if let Some(m) = self.shared.metrics.clone() {
            self.observe_finished(&m, &routed.request, usage);
        }
        tracing::trace!(request_id = %routed.request.request_id, destination = %routed.destination, "request finished");
    }

    /// Envoy closed the stream before the response's end and would never have shown it
    /// (response body mode `NONE`): the request goes on at its endpoint unless its response
    /// started as something other than a successful event stream (a whole JSON answer, an
    /// error).
    fn end_unseen(&self, routed: &Routed) -> bool {
        self.mode_known
            && self.response_mode == BodySendMode::None
            && goes_on_after_headers(self.response.event_stream, routed.succeeded)
    }

    /// The finished request's latency, size and token histograms.
    fn observe_finished(&self, m: &Metrics, request: &LlmRequest, usage: Option<Usage>) {
        let labels = model_labels(m, request);
        let elapsed = self.started.elapsed().as_secs_f64();
        let ttft = self
            .response
            .first_byte
            .map(|t| t.duration_since(self.started).as_secs_f64());
        m.request_duration.get_or_create(&labels).observe(elapsed);
        if let Some(t) = ttft {
            m.request_ttft.get_or_create(&labels).observe(t);
        }
        m.response_sizes
            .get_or_create(&labels)
            .observe(self.response.bytes as f64);
        let Some(u) = usage else {
            return;
        };
        if u.completion_tokens > 0 {
            m.normalized_tpot
                .get_or_create(&labels)
                .observe(elapsed / u.completion_tokens as f64);
        }
        if let Some(t) = ttft
            && u.completion_tokens > 1
        {
            m.request_tpot
                .get_or_create(&labels)
                .observe((elapsed - t).max(0.0) / (u.completion_tokens - 1) as f64);
        }
        m.input_tokens
            .get_or_create(&labels)
            .observe(u.prompt_tokens as f64);
        m.output_tokens
            .get_or_create(&labels)
            .observe(u.completion_tokens as f64);
        m.cached_tokens
            .get_or_create(&labels)
            .observe(u.cached_tokens.unwrap_or(0) as f64);
    }
}

impl Drop for StreamHandler {
    /// However the stream ended — response complete, error, reset, or a panic unwinding through
    /// the handler — the request's metrics are recorded and its load is released.
    fn drop(&mut self) {
        self.record_finished();
    }
}

fn model_labels(m: &Metrics, r: &LlmRequest) -> ModelLabels {
    ModelLabels {
        model_name: m.models.bound(&r.model),
        target_model_name: m.models.bound(&r.target_model),
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

    use crate::extproc::proto::{
        HttpTrailers, ProtocolConfiguration, body_mutation as body_mutation_of,
        processing_response::Response,
    };
    use envoy_types::pb::envoy::config::core::v3::{HeaderValue, Metadata};
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
        StreamHandler::new(Shared::new(Arc::new(director), None, Limits::default()))
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
                body: Bytes::copy_from_slice(b),
                end_of_stream,
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

    fn streamed_headers(path: &str, body_without_waiting: bool) -> ProcessingRequest {
        let mut req = headers(path, false, BodySendMode::Streamed);
        let pc = req.protocol_config.as_mut().unwrap();
        pc.send_body_without_waiting_for_header_response = body_without_waiting;
        req
    }

    fn body_mutation(r: &ProcessingResponse) -> Option<&body_mutation_of::Mutation> {
        let Some(Response::RequestBody(b)) = &r.response else {
            panic!("expected a request body answer, got {r:?}")
        };
        b.response
            .as_ref()?
            .body_mutation
            .as_ref()?
            .mutation
            .as_ref()
    }

    /// Adds the model-rewrite header (to "real") to a headers message.
    fn with_rewrite_header(mut req: ProcessingRequest) -> ProcessingRequest {
        let Some(Request::RequestHeaders(h)) = &mut req.request else {
            unreachable!("not a headers message")
        };
        h.headers.as_mut().unwrap().headers.push(HeaderValue {
            key: MODEL_REWRITE_HEADER.into(),
            raw_value: b"real".to_vec(),
            ..Default::default()
        });
        req
    }

    fn response_headers(status: &str, content_type: &str) -> ProcessingRequest {
        let header = |key: &str, value: &str| HeaderValue {
            key: key.into(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        };
        ProcessingRequest {
            request: Some(Request::ResponseHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![
                        header(":status", status),
                        header("content-type", content_type),
                    ],
                }),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    /// A one-endpoint handler that routed a buffered request `body` under Envoy's response
    /// body mode `mode`.
    fn routed_with_response_mode(mode: BodySendMode, request_body: &[u8]) -> StreamHandler {
        let mut h = handler(1);
        let mut req = headers("/v1/completions", false, BodySendMode::Buffered);
        req.protocol_config.as_mut().unwrap().response_body_mode = mode as i32;
        h.handle(req);
        h.handle(body(request_body, true));
        h
    }

    /// Envoy sends no response body (`NONE`) and ends the stream after the response headers
    /// (or, with those skipped too, after routing): a request whose response goes on as a
    /// successful event stream stays counted (parked); a whole JSON answer or an error is over.
    #[test]
    fn a_request_whose_end_envoy_hides_stays_counted_only_while_it_can_go_on() {
        let cases = [
            (Some(("200", "text/event-stream")), 1),
            (None, 1),
            (Some(("200", "application/json")), 0),
            (Some(("503", "text/event-stream")), 0),
        ];
        for (response, counted) in cases {
            let mut h = routed_with_response_mode(BodySendMode::None, BODY);
            if let Some((status, content_type)) = response {
                h.handle(response_headers(status, content_type));
            }
            let endpoint = h.shared.director.datastore.endpoints()[0].clone();
            drop(h);
            let load = &endpoint.load;
            assert_eq!(load.requests(), counted, "{response:?}");
            assert_eq!(load.parked() as u64, counted, "{response:?}");
            let prefilling = load.snapshot().prefilling;
            assert_eq!(
                prefilling, counted,
                "{response:?}: a parked prompt waits for a scrape"
            );
        }
    }

    /// Envoy sends no response body (`NONE`), so no first byte comes: an event stream's
    /// prompt is parked at its headers, while the request stays on its open stream (Envoy
    /// keeps it open to the response's end when it waits for response trailers), until a
    /// scrape shows it scheduled. A whole JSON answer's or an error's prompt was computed
    /// before its headers.
    #[test]
    fn without_response_bodies_a_streams_prompt_is_parked_at_its_headers() {
        let cases = [
            ("200", "text/event-stream", 1),
            ("200", "application/json", 0),
            ("503", "text/event-stream", 0),
        ];
        for (status, content_type, queued) in cases {
            let mut h = routed_with_response_mode(BodySendMode::None, BODY);
            h.handle(response_headers(status, content_type));
            let endpoint = h.shared.director.datastore.endpoints()[0].clone();
            let load = &endpoint.load;
            let s = load.snapshot();
            let context = format!("{status} {content_type}");
            assert_eq!((s.requests, s.prefilling), (1, queued), "{context}");
            assert_eq!(load.parked(), 0, "{context}: the request is on its stream");
            // A scrape shows the request running, none waiting: its prompt was scheduled.
            let engine = crate::datastore::load::EngineCounts {
                requests: Some(1),
                waiting: Some(0),
            };
            load.reconcile_parked(engine, 1);
            let s = load.snapshot();
            assert_eq!((s.requests, s.prefilling), (1, 0), "{context}");
            drop(h);
        }
    }

    /// A streamed response's first bytes time the first-token fit only where Envoy passes
    /// chunks on as they come: in BUFFERED the first bytes epp sees come with the last.
    #[test]
    fn only_chunks_passed_on_as_they_come_time_the_first_token() {
        for (mode, observed) in [
            (BodySendMode::Streamed, 1.0),
            (BodySendMode::FullDuplexStreamed, 1.0),
            (BodySendMode::Buffered, 0.0),
            (BodySendMode::BufferedPartial, 0.0),
        ] {
            let mut h =
                routed_with_response_mode(mode, br#"{"model":"m","prompt":"hi","stream":true}"#);
            h.handle(response_headers("200", "text/event-stream"));
            h.handle(ProcessingRequest {
                request: Some(Request::ResponseBody(HttpBody {
                    body: Bytes::from_static(b"data: {}\n\ndata: [DONE]\n\n"),
                    end_of_stream: true,
                })),
                ..Default::default()
            });
            let endpoint = h.shared.director.datastore.endpoints()[0].clone();
            assert_eq!(endpoint.ttft.observations(), observed, "{mode:?}");
            drop(h);
            assert!(endpoint.load.is_idle(), "{mode:?}");
        }
    }

    /// With response bodies sent, a stream that ends early is a reset: nothing is parked.
    #[test]
    fn a_stream_reset_mid_response_releases_when_envoy_sends_response_bodies() {
        let mut h = handler(1);
        h.handle(headers("/v1/completions", false, BodySendMode::Buffered));
        h.handle(body(BODY, true));
        h.handle(response_headers("200", "text/event-stream"));
        let endpoint = h.shared.director.datastore.endpoints()[0].clone();
        drop(h);
        assert!(endpoint.load.is_idle());
        assert_eq!(endpoint.load.parked(), 0);
    }

    #[test]
    fn streamed_with_early_body_routes_on_the_body_and_answers_every_chunk() {
        let mut h = handler(2);
        assert!(
            h.handle(streamed_headers("/v1/completions", true))
                .is_empty()
        );
        assert!(h.handle(body(&BODY[..5], false)).is_empty());
        assert!(h.handle(body(&BODY[5..20], false)).is_empty());
        let out = h.handle(body(&BODY[20..], true));
        assert_eq!(out.len(), 4, "headers answer + one per chunk: {out:?}");
        assert!(matches!(out[0].response, Some(Response::RequestHeaders(_))));
        assert!(out[0].dynamic_metadata.is_some());
        for chunk in &out[1..] {
            assert_eq!(body_mutation(chunk), None, "Envoy keeps the chunk as it is");
        }
    }

    #[test]
    fn streamed_rewrite_replaces_the_first_chunk_and_clears_the_others() {
        let mut h = handler(1);
        h.handle(with_rewrite_header(streamed_headers(
            "/v1/completions",
            true,
        )));
        h.handle(body(&BODY[..9], false));
        let out = h.handle(body(&BODY[9..], false));
        assert!(out.is_empty());
        let out = h.handle(ProcessingRequest {
            request: Some(Request::RequestTrailers(HttpTrailers::default())),
            ..Default::default()
        });
        assert_eq!(out.len(), 4, "headers, two chunks, trailers: {out:?}");
        let Some(body_mutation_of::Mutation::Body(new)) = body_mutation(&out[1]) else {
            panic!("first chunk not replaced: {:?}", out[1])
        };
        assert_eq!(&new[..], br#"{"model":"real","prompt":"hello"}"#);
        assert_eq!(
            body_mutation(&out[2]),
            Some(&body_mutation_of::Mutation::ClearBody(true))
        );
        assert!(matches!(
            out[3].response,
            Some(Response::RequestTrailers(_))
        ));
    }

    #[test]
    fn only_a_body_epp_may_send_on_is_kept() {
        for (mode, rewrite, kept_expected) in [
            (BodySendMode::FullDuplexStreamed, false, true),
            (BodySendMode::Streamed, true, true),
            (BodySendMode::Streamed, false, false),
        ] {
            let mut h = handler(1);
            let mut req = headers("/v1/completions", false, mode);
            req.protocol_config
                .as_mut()
                .unwrap()
                .send_body_without_waiting_for_header_response = true;
            if rewrite {
                req = with_rewrite_header(req);
            }
            h.handle(req);
            h.handle(body(&BODY[..9], false));
            let kept = !h.body.as_ref().unwrap().chunks().is_empty();
            assert_eq!(kept, kept_expected, "{mode:?}, rewrite {rewrite}");
            assert!(
                h.shared.budget.in_use() > 0,
                "the budget counts it either way"
            );
        }
    }

    #[test]
    fn streamed_without_early_body_routes_at_the_headers() {
        let mut h = handler(1);
        let out = h.handle(streamed_headers("/v1/completions", false));
        assert!(matches!(out[0].response, Some(Response::RequestHeaders(_))));
        assert!(out[0].dynamic_metadata.is_some(), "routed at the headers");
        let out = h.handle(body(BODY, true));
        assert_eq!(body_mutation(&out[0]), None);
    }

    #[test]
    fn streamed_bad_json_gets_400_and_no_chunk_answers() {
        let mut h = handler(1);
        h.handle(streamed_headers("/v1/completions", true));
        assert!(h.handle(body(b"{not json", false)).is_empty());
        let out = h.handle(body(b"}", true));
        assert_eq!(out.len(), 1, "{out:?}");
        let Some(Response::ImmediateResponse(r)) = &out[0].response else {
            panic!("expected an immediate response, got {out:?}")
        };
        assert_eq!(r.status.unwrap().code, 400);
        assert!(h.is_done());
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
}
