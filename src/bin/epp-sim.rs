//! `epp-sim`: a simulated vLLM model server on loopback. It runs the engine model of
//! `epp::sim::engine` in real time (each step sleeps its modelled duration, divided by
//! `--speed`) and speaks enough of vLLM's OpenAI API for gateways, load generators and the
//! `openai` client: `/v1/completions` and `/v1/chat/completions` (JSON or SSE with
//! `stream_options.include_usage`), `/v1/models`, `/health`, and `/metrics` with vLLM's metric
//! names. Every response reports `usage.prompt_tokens_details.cached_tokens`. Unknown request
//! fields are ignored, as vLLM does. Output text is `tok` repeated, one per generated token.

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
use clap::Parser;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use epp::request::{self, Api};
use epp::sim::engine::{Engine, EngineConfig, EngineEvent, EngineRequest};
use epp::sim::tokens;

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
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 8_192)]
    max_batched_tokens: usize,
    /// Time scale: 2 runs twice as fast as the modelled GPU.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Name reported in the `x-served-by` response header (default: the bound address).
    #[arg(long)]
    name: Option<String>,
    /// `max_tokens` when a request gives none.
    #[arg(long, default_value_t = 16)]
    default_max_tokens: usize,
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
    fn new() -> Self {
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
        let r = &mut registry;
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
        Metrics { registry, ..m }
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
                        EngineEvent::FirstToken { id }
                        | EngineEvent::Token { id }
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

async fn generate(State(s): State<St>, uri: Uri, body: Bytes) -> Response {
    let api = Api::from_path(uri.path());
    let parsed = match request::parse(api, &body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequestError", &e.to_string()),
    };
    if parsed.model != s.model {
        let msg = format!("The model `{}` does not exist.", parsed.model);
        return error(StatusCode::NOT_FOUND, "NotFoundError", &msg);
    }
    let raw: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let max_tokens = raw
        .get("max_tokens")
        .or_else(|| raw.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map_or(s.default_max_tokens, |n| n as usize)
        .max(1);
    let include_usage = raw
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let chat = api == Api::ChatCompletions;

    let prompt_tokens = tokens::count(&parsed.prompt);
    let id = s.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    {
        let mut e = s.engine.lock();
        if !e.fits(prompt_tokens, max_tokens) {
            let msg = format!(
                "This model's KV cache holds {} tokens; the request needs {prompt_tokens} prompt + {max_tokens} output tokens.",
                e.config().num_blocks * e.config().block_tokens
            );
            return error(StatusCode::BAD_REQUEST, "BadRequestError", &msg);
        }
        s.waiters.lock().insert(id, tx);
        let block_tokens = e.config().block_tokens;
        e.add_request(EngineRequest {
            id,
            prompt_tokens,
            block_hashes: tokens::block_hashes(&s.model, &parsed.prompt, block_tokens),
            max_tokens,
        });
    }
    s.wake.notify_one();

    let rid = if chat {
        format!("chatcmpl-{id}")
    } else {
        format!("cmpl-{id}")
    };
    let created = now_secs();
    let model = s.model.clone();

    if !parsed.stream {
        let (prompt, cached, output) = loop {
            match rx.recv().await {
                Some(EngineEvent::Finished {
                    prompt_tokens,
                    cached_tokens,
                    output_tokens,
                    ..
                }) => break (prompt_tokens, cached_tokens, output_tokens),
                Some(_) => {}
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
        let text = "tok ".repeat(output);
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": "length"})
        };
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        return axum::Json(json!({
            "id": rid, "object": object, "created": created, "model": model,
            "choices": [choice], "usage": usage(prompt, cached, output)
        }))
        .into_response();
    }

    let (out_tx, out_rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let server = s.clone();
    tokio::spawn(async move {
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |delta: Value| -> Bytes {
            let choice = if chat {
                json!({"index": 0, "delta": delta, "finish_reason": null})
            } else {
                json!({"index": 0, "text": delta["content"], "logprobs": null, "finish_reason": null})
            };
            let ev = json!({"id": rid, "object": object, "created": created, "model": model, "choices": [choice]});
            Bytes::from(format!("data: {ev}\n\n"))
        };
        while let Some(ev) = rx.recv().await {
            match ev {
                EngineEvent::FirstToken { .. } => {
                    let delta = if chat {
                        json!({"role": "assistant", "content": "tok "})
                    } else {
                        json!({"content": "tok "})
                    };
                    if out_tx.send(Ok(chunk(delta))).await.is_err() {
                        break;
                    }
                }
                EngineEvent::Token { .. } => {
                    if out_tx
                        .send(Ok(chunk(json!({"content": "tok "}))))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                EngineEvent::Finished {
                    prompt_tokens,
                    cached_tokens,
                    output_tokens,
                    ..
                } => {
                    if include_usage {
                        let ev = json!({"id": rid, "object": object, "created": created, "model": model,
                            "choices": [], "usage": usage(prompt_tokens, cached_tokens, output_tokens)});
                        let _ = out_tx
                            .send(Ok(Bytes::from(format!("data: {ev}\n\n"))))
                            .await;
                    }
                    let _ = out_tx
                        .send(Ok(Bytes::from_static(b"data: [DONE]\n\n")))
                        .await;
                    break;
                }
            }
        }
        server.waiters.lock().remove(&id);
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        ))
        .expect("static response parts")
}

async fn metrics(State(s): State<St>) -> Response {
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
            enable_prefix_caching: "True".into(),
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
    epp::telemetry::init_tracing(0);
    anyhow::ensure!(cli.speed > 0.0, "--speed must be greater than 0");
    anyhow::ensure!(
        cli.kv_blocks > 0 && cli.block_size > 0,
        "--kv-blocks and --block-size must be greater than 0"
    );
    let engine = Engine::new(EngineConfig {
        num_blocks: cli.kv_blocks,
        block_tokens: cli.block_size,
        max_num_seqs: cli.max_num_seqs.max(1),
        max_batched_tokens: cli.max_batched_tokens.max(1),
        ..Default::default()
    });
    let server = Arc::new(Server {
        engine: Mutex::new(engine),
        wake: Notify::new(),
        waiters: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        model: cli.model.clone(),
        name: Mutex::new(cli.name.clone().unwrap_or_default()),
        speed: cli.speed,
        default_max_tokens: cli.default_max_tokens,
        metrics: Metrics::new(),
        reported: Mutex::new((0, 0)),
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
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
