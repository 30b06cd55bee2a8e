//! `epp-sim`: a simulated vLLM model server on loopback. It runs the engine model of
//! `epp::sim::engine` in real time (each step sleeps its modelled duration, divided by
//! `--speed`) and speaks enough of vLLM's OpenAI API for gateways, load generators and the
//! `openai` client: `/v1/completions` and `/v1/chat/completions` (JSON or SSE with
//! `stream_options.include_usage`), `/v1/models`, `/health`, and `/metrics` with vLLM's metric
//! names. Every response reports `usage.prompt_tokens_details.cached_tokens`. Unknown request
//! fields are ignored, as vLLM does.
//!
//! It shares nothing with epp's request handling: bodies are read here, prompts go through the
//! simulator's own chat template and tokenizer (`epp::sim::tokenizer`), and the output is the
//! engine's deterministic prose, one token per step. `--metrics-after-first-request` leaves the
//! `vllm:*` families off `/metrics` until the first request (as some exporters do);
//! `--kv-blocks-reported` makes the cache-config metric claim another size than the real one;
//! `--metric-names sglang` exports SGLang's names instead of vLLM's.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use clap::Parser;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use epp::sim::engine::{Engine, EngineConfig, EngineEvent, EngineRequest};
use epp::sim::tokenizer::{TokenId, tokenizer};

#[derive(Debug, Parser)]
#[command(
    name = "epp-sim",
    about = "Simulated vLLM model server (paged KV cache, prefix caching, continuous batching)"
)]
struct Cli {
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port (0: let the OS choose; the bound address is logged).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Served model name.
    #[arg(long, default_value = "model")]
    model: String,
    /// KV-cache blocks (default: H100 80 GB with Llama-2-7B).
    #[arg(long, default_value_t = 6_500)]
    kv_blocks: usize,
    /// KV-cache blocks claimed in `vllm:cache_config_info` (default: the real number).
    #[arg(long)]
    kv_blocks_reported: Option<usize>,
    /// Leave the engine families off /metrics until the first request arrives.
    #[arg(long)]
    metrics_after_first_request: bool,
    /// Whose metric names /metrics uses: vLLM's (`vllm:num_requests_waiting`, …, the cache
    /// config and LoRA info) or SGLang's (`sglang:num_queue_reqs`, `sglang:num_running_reqs`,
    /// `sglang:token_usage` and its token counters; no cache config).
    #[arg(long, value_enum, default_value_t = MetricNames::Vllm)]
    metric_names: MetricNames,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 8_192)]
    max_batched_tokens: usize,
    /// Compute every prompt whole, reusing no cached prefix (vLLM's flag of the same name).
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// Time scale: 2 runs twice as fast as the modelled GPU.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Name reported in the `x-served-by` response header (default: the bound address).
    #[arg(long)]
    name: Option<String>,
    /// `max_tokens` when a request gives none.
    #[arg(long, default_value_t = 16)]
    default_max_tokens: usize,
    /// Share of completion requests (0–1) answered at once with 500, as an API server whose
    /// engine died does; /metrics keeps reporting the (idle) engine.
    #[arg(long, default_value_t = 0.0)]
    fail_requests: f64,
    /// Share of /metrics requests (0–1) answered at once with 503, as an exporter that fails
    /// now and then (1: the endpoint's metrics are never readable); serving goes on.
    #[arg(long, default_value_t = 0.0)]
    fail_metrics: f64,
}

/// An engine whose metric names `/metrics` imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MetricNames {
    Vllm,
    Sglang,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheConfigLabels {
    block_size: String,
    num_gpu_blocks: String,
    enable_prefix_caching: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoraLabels {
    max_lora: String,
    running_lora_adapters: String,
    waiting_lora_adapters: String,
}

struct Metrics {
    registry: Registry,
    waiting: Family<ModelLabel, Gauge>,
    running: Family<ModelLabel, Gauge>,
    kv: Family<ModelLabel, Gauge<f64, AtomicU64>>,
    gpu_cache: Family<ModelLabel, Gauge<f64, AtomicU64>>,
    cache_config: Family<CacheConfigLabels, Gauge>,
    lora: Family<LoraLabels, Gauge<f64, AtomicU64>>,
    prefix_queries: Family<ModelLabel, Counter>,
    prefix_hits: Family<ModelLabel, Counter>,
    success: Family<ModelLabel, Counter>,
    prompt_tokens: Family<ModelLabel, Counter>,
    generation_tokens: Family<ModelLabel, Counter>,
}

impl Metrics {
    fn new(names: MetricNames) -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            waiting: Family::default(),
            running: Family::default(),
            kv: Family::default(),
            gpu_cache: Family::default(),
            cache_config: Family::default(),
            lora: Family::default(),
            prefix_queries: Family::default(),
            prefix_hits: Family::default(),
            success: Family::default(),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
        };
        match names {
            MetricNames::Vllm => m.register_vllm(&mut registry),
            MetricNames::Sglang => m.register_sglang(&mut registry),
        }
        Metrics { registry, ..m }
    }

    fn register_vllm(&self, registry: &mut Registry) {
        let (r, m) = (registry, self);
        r.register(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            m.waiting.clone(),
        );
        r.register(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            m.running.clone(),
        );
        r.register(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            m.kv.clone(),
        );
        r.register(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage (older name).",
            m.gpu_cache.clone(),
        );
        r.register(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            m.cache_config.clone(),
        );
        r.register(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            m.lora.clone(),
        );
        r.register(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            m.prefix_queries.clone(),
        );
        r.register(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            m.prefix_hits.clone(),
        );
        r.register(
            "vllm:request_success",
            "Count of successfully processed requests.",
            m.success.clone(),
        );
        r.register(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            m.prompt_tokens.clone(),
        );
        r.register(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            m.generation_tokens.clone(),
        );
    }

    fn register_sglang(&self, registry: &mut Registry) {
        let (r, m) = (registry, self);
        r.register(
            "sglang:num_queue_reqs",
            "The number of requests in the waiting queue.",
            m.waiting.clone(),
        );
        r.register(
            "sglang:num_running_reqs",
            "The number of running requests.",
            m.running.clone(),
        );
        r.register(
            "sglang:token_usage",
            "The token usage of the KV cache.",
            m.kv.clone(),
        );
        r.register(
            "sglang:prompt_tokens",
            "Number of prefill tokens processed.",
            m.prompt_tokens.clone(),
        );
        r.register(
            "sglang:generation_tokens",
            "Number of generation tokens processed.",
            m.generation_tokens.clone(),
        );
    }
}

struct Server {
    engine: Mutex<Engine>,
    wake: Notify,
    waiters: Mutex<HashMap<u64, mpsc::UnboundedSender<EngineEvent>>>,
    next_id: AtomicU64,
    model: String,
    name: Mutex<String>,
    speed: f64,
    default_max_tokens: usize,
    metrics: Metrics,
    /// Counter values already added (the engine keeps totals).
    reported: Mutex<(u64, u64)>,
    /// `--metrics-after-first-request`, and whether a request has arrived.
    late_metrics: bool,
    served_any: std::sync::atomic::AtomicBool,
    /// `--fail-requests`.
    fail_requests: f64,
    /// `--fail-metrics`.
    fail_metrics: f64,
}

type St = Arc<Server>;

/// Runs engine steps in real time and hands each step's events to the waiting requests.
async fn engine_loop(s: St) {
    loop {
        let step = {
            let mut e = s.engine.lock();
            e.has_work().then(|| e.step())
        };
        match step {
            Some(step) if step.duration > 0.0 => {
                tokio::time::sleep(Duration::from_secs_f64(step.duration / s.speed)).await;
                let waiters = s.waiters.lock();
                let label = ModelLabel {
                    model_name: s.model.clone(),
                };
                for ev in step.events {
                    if let EngineEvent::Finished {
                        prompt_tokens,
                        output_tokens,
                        ..
                    } = ev
                    {
                        s.metrics.success.get_or_create(&label).inc();
                        s.metrics
                            .prompt_tokens
                            .get_or_create(&label)
                            .inc_by(prompt_tokens as u64);
                        s.metrics
                            .generation_tokens
                            .get_or_create(&label)
                            .inc_by(output_tokens as u64);
                    }
                    let id = match ev {
                        EngineEvent::FirstToken { id, .. }
                        | EngineEvent::Token { id, .. }
                        | EngineEvent::Finished { id, .. } => id,
                    };
                    if let Some(tx) = waiters.get(&id) {
                        let _ = tx.send(ev);
                    }
                }
            }
            // Idle (or blocked on memory with nothing running): wait for a new request.
            _ => s.wake.notified().await,
        }
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message, "type": kind, "code": status.as_u16()}})),
    )
        .into_response()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usage(prompt: usize, cached: usize, output: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cached}
    })
}

/// A request body as this server reads it.
struct SimBody {
    chat: bool,
    model: String,
    prompt: Vec<TokenId>,
    max_tokens: usize,
    stream: bool,
    include_usage: bool,
}

/// An OpenAI-style error answer.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.status, self.kind, &self.message)
    }
}

fn bad_request(message: &str) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        kind: "BadRequestError",
        message: message.to_owned(),
    }
}

/// Message content: a string, or parts whose `text` fields are concatenated.
fn content_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        ),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

/// The prompt's tokens: chat messages through the template, or a completions prompt (text, a
/// one-element list of text, or token ids).
fn prompt_tokens(chat: bool, v: &Value) -> Result<Vec<TokenId>, &'static str> {
    let t = tokenizer();
    if chat {
        let Some(Value::Array(messages)) = v.get("messages") else {
            return Err("\"messages\" must be an array");
        };
        let mut turns = Vec::with_capacity(messages.len());
        for m in messages {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or("every message needs a \"role\"")?;
            let content = content_text(m.get("content").unwrap_or(&Value::Null))
                .ok_or("message content must be a string or a list of parts")?;
            turns.push((role.to_owned(), content));
        }
        return Ok(t.render_chat(turns.iter().map(|(r, c)| (r.as_str(), c.as_str()))));
    }
    match v.get("prompt") {
        Some(Value::String(p)) => Ok(t.render_completion(p)),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            Ok(t.render_completion(items[0].as_str().unwrap_or_default()))
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) => Ok(items
            .iter()
            .filter_map(Value::as_u64)
            .map(|id| (id % t.vocab_size() as u64) as TokenId)
            .collect()),
        _ => Err("\"prompt\" must be a string or a list of token ids"),
    }
}

fn parse_body(path: &str, body: &[u8]) -> Result<SimBody, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad_request(&format!("invalid JSON body: {e}")))?;
    let chat = path.ends_with("/chat/completions");
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request("\"model\" is required"))?
        .to_owned();
    let prompt = prompt_tokens(chat, &v).map_err(bad_request)?;
    let max_tokens = v
        .get("max_tokens")
        .or_else(|| v.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    Ok(SimBody {
        chat,
        model,
        prompt,
        max_tokens: max_tokens.unwrap_or(0),
        stream: v.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: v
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// Queues the request on the engine; returns its id and event receiver.
fn enqueue(
    s: &St,
    prompt: Vec<TokenId>,
    max_tokens: usize,
) -> Result<(u64, mpsc::UnboundedReceiver<EngineEvent>), ApiError> {
    let id = s.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    {
        let mut e = s.engine.lock();
        if !e.fits(prompt.len(), max_tokens) {
            let msg = format!(
                "This model's KV cache holds {} tokens; the request needs {} prompt + {max_tokens} output tokens.",
                e.config().num_blocks * e.config().block_tokens,
                prompt.len()
            );
            return Err(bad_request(&msg));
        }
        s.waiters.lock().insert(id, tx);
        e.add_request(EngineRequest {
            id,
            prompt: prompt.into(),
            max_tokens,
        });
    }
    s.served_any.store(true, Ordering::Relaxed);
    s.wake.notify_one();
    Ok((id, rx))
}

async fn generate(State(s): State<St>, uri: Uri, body: Bytes) -> Response {
    let b = match parse_body(uri.path(), &body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if b.model != s.model {
        let msg = format!("The model `{}` does not exist.", b.model);
        return error(StatusCode::NOT_FOUND, "NotFoundError", &msg);
    }
    if s.fail_requests > 0.0 && fastrand::f64() < s.fail_requests {
        s.served_any.store(true, Ordering::Relaxed);
        let msg = "EngineCore encountered an issue. See stack trace for the root cause.";
        return error(StatusCode::INTERNAL_SERVER_ERROR, "EngineDeadError", msg);
    }
    let max_tokens = if b.max_tokens == 0 {
        s.default_max_tokens
    } else {
        b.max_tokens
    };
    let (id, rx) = match enqueue(&s, b.prompt, max_tokens) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let reply = Reply {
        chat: b.chat,
        id: if b.chat {
            format!("chatcmpl-{id}")
        } else {
            format!("cmpl-{id}")
        },
        created: now_secs(),
        model: s.model.clone(),
    };
    if b.stream {
        reply.stream(s, id, rx, b.include_usage)
    } else {
        reply.json(s, id, rx).await
    }
}

/// How a response names itself.
struct Reply {
    chat: bool,
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, false) => "chat.completion",
            (true, true) => "chat.completion.chunk",
            (false, _) => "text_completion",
        }
    }

    async fn json(self, s: St, id: u64, mut rx: mpsc::UnboundedReceiver<EngineEvent>) -> Response {
        let mut tokens = Vec::new();
        let usage_of = loop {
            match rx.recv().await {
                Some(EngineEvent::FirstToken { token, .. } | EngineEvent::Token { token, .. }) => {
                    tokens.push(token)
                }
                Some(EngineEvent::Finished {
                    prompt_tokens,
                    cached_tokens,
                    output_tokens,
                    ..
                }) => break usage(prompt_tokens, cached_tokens, output_tokens),
                None => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalServerError",
                        "engine stopped",
                    );
                }
            }
        };
        s.waiters.lock().remove(&id);
        let text = tokenizer().decode(&tokens);
        let choice = if self.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": "length"})
        };
        axum::Json(json!({
            "id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage_of
        }))
        .into_response()
    }

    fn chunk(&self, text: &str, first: bool) -> Bytes {
        let choice = if self.chat {
            let delta = if first {
                json!({"role": "assistant", "content": text})
            } else {
                json!({"content": text})
            };
            json!({"index": 0, "delta": delta, "finish_reason": null})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null})
        };
        let ev = json!({"id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [choice]});
        Bytes::from(format!("data: {ev}\n\n"))
    }

    fn stream(
        self,
        s: St,
        id: u64,
        mut rx: mpsc::UnboundedReceiver<EngineEvent>,
        include_usage: bool,
    ) -> Response {
        let (out_tx, out_rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let bytes = match ev {
                    EngineEvent::FirstToken { token, .. } | EngineEvent::Token { token, .. } => {
                        let piece = String::from_utf8_lossy(tokenizer().piece(token)).into_owned();
                        self.chunk(&piece, matches!(ev, EngineEvent::FirstToken { .. }))
                    }
                    EngineEvent::Finished {
                        prompt_tokens,
                        cached_tokens,
                        output_tokens,
                        ..
                    } => {
                        if include_usage {
                            let ev = json!({"id": self.id, "object": self.object(true),
                                "created": self.created, "model": self.model, "choices": [],
                                "usage": usage(prompt_tokens, cached_tokens, output_tokens)});
                            let _ = out_tx
                                .send(Ok(Bytes::from(format!("data: {ev}\n\n"))))
                                .await;
                        }
                        let _ = out_tx
                            .send(Ok(Bytes::from_static(b"data: [DONE]\n\n")))
                            .await;
                        break;
                    }
                };
                if out_tx.send(Ok(bytes)).await.is_err() {
                    break;
                }
            }
            s.waiters.lock().remove(&id);
        });
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(out_rx),
            ))
            .expect("static response parts")
    }
}

async fn metrics(State(s): State<St>) -> Response {
    if s.fail_metrics > 0.0 && fastrand::f64() < s.fail_metrics {
        return (StatusCode::SERVICE_UNAVAILABLE, "metrics unavailable\n").into_response();
    }
    if s.late_metrics && !s.served_any.load(Ordering::Relaxed) {
        // No engine families yet: only a process-level line, as some exporters start.
        return (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 0\n",
        )
            .into_response();
    }
    let m = s.engine.lock().metrics();
    let label = ModelLabel {
        model_name: s.model.clone(),
    };
    let mm = &s.metrics;
    mm.waiting.get_or_create(&label).set(m.waiting as i64);
    mm.running.get_or_create(&label).set(m.running as i64);
    mm.kv.get_or_create(&label).set(m.kv_usage);
    mm.gpu_cache.get_or_create(&label).set(m.kv_usage);
    mm.cache_config
        .get_or_create(&CacheConfigLabels {
            block_size: m.block_tokens.to_string(),
            num_gpu_blocks: m.num_blocks.to_string(),
            // As vLLM prints a Python bool.
            enable_prefix_caching: if m.prefix_caching { "True" } else { "False" }.into(),
        })
        .set(1);
    mm.lora
        .get_or_create(&LoraLabels {
            max_lora: "0".into(),
            running_lora_adapters: String::new(),
            waiting_lora_adapters: String::new(),
        })
        .set(now_secs() as f64);
    {
        let mut reported = s.reported.lock();
        mm.prefix_queries
            .get_or_create(&label)
            .inc_by(m.prefix_query_tokens - reported.0);
        mm.prefix_hits
            .get_or_create(&label)
            .inc_by(m.prefix_hit_tokens - reported.1);
        *reported = (m.prefix_query_tokens, m.prefix_hit_tokens);
    }
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &mm.registry);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn models(State(s): State<St>) -> Response {
    axum::Json(json!({"object": "list", "data": [
        {"id": s.model, "object": "model", "created": now_secs(), "owned_by": "epp-sim", "root": s.model}
    ]}))
    .into_response()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    epp::telemetry::logging::init(&epp::telemetry::logging::LogOptions::default());
    anyhow::ensure!(cli.speed > 0.0, "--speed must be greater than 0");
    for (flag, share) in [
        ("--fail-requests", cli.fail_requests),
        ("--fail-metrics", cli.fail_metrics),
    ] {
        anyhow::ensure!(
            (0.0..=1.0).contains(&share),
            "{flag} must be between 0 and 1"
        );
    }
    anyhow::ensure!(
        cli.kv_blocks > 0 && cli.block_size > 0,
        "--kv-blocks and --block-size must be greater than 0"
    );
    let engine = Engine::new(
        EngineConfig {
            num_blocks: cli.kv_blocks,
            reported_blocks: cli.kv_blocks_reported,
            block_tokens: cli.block_size,
            max_num_seqs: cli.max_num_seqs.max(1),
            max_batched_tokens: cli.max_batched_tokens.max(1),
            prefix_caching: !cli.no_enable_prefix_caching,
            ..Default::default()
        },
        &cli.model,
    );
    let server = Arc::new(Server {
        engine: Mutex::new(engine),
        wake: Notify::new(),
        waiters: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        model: cli.model.clone(),
        name: Mutex::new(cli.name.clone().unwrap_or_default()),
        speed: cli.speed,
        default_max_tokens: cli.default_max_tokens,
        metrics: Metrics::new(cli.metric_names),
        reported: Mutex::new((0, 0)),
        late_metrics: cli.metrics_after_first_request,
        served_any: false.into(),
        fail_requests: cli.fail_requests,
        fail_metrics: cli.fail_metrics,
    });
    tokio::spawn(engine_loop(server.clone()));
    let app = Router::new()
        .route("/v1/completions", post(generate))
        .route("/v1/chat/completions", post(generate))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics))
        .with_state(server.clone())
        .layer(axum::middleware::map_response({
            let server = server.clone();
            move |mut r: Response| {
                let name = server.name.lock().clone();
                async move {
                    if let Ok(v) = header::HeaderValue::from_str(&name) {
                        r.headers_mut().insert("x-served-by", v);
                    }
                    r
                }
            }
        }));
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(cli.host, cli.port)).await?;
    if cli.name.is_none() {
        *server.name.lock() = listener.local_addr()?.to_string();
    }
    tracing::info!(address = %listener.local_addr()?, model = %cli.model, "epp-sim listening");
    // Real servers (uvicorn) set TCP_NODELAY: without it each SSE chunk after the headers
    // waits for a delayed ACK from the proxy in front (≈40 ms on Linux).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
