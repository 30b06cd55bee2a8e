//! A fake OpenAI-style model server on loopback: answers completions/chat (JSON or SSE) with
//! its own id, serves vLLM-named `/metrics` with a settable queue, and counts what it saw.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

/// How a backend's `/metrics` behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MetricsMode {
    Ok = 0,
    Status500 = 1,
    Garbage = 2,
    Hang = 3,
}

#[derive(Default)]
pub struct Counters {
    pub queue: AtomicU32,
    pub metrics_mode: std::sync::atomic::AtomicU8,
    pub scrapes: AtomicUsize,
    pub requests: AtomicUsize,
    /// Answer every completion with 500 (a dead engine behind a live API server).
    pub failing: std::sync::atomic::AtomicBool,
    /// Report prefix caching off in `vllm:cache_config_info` (vLLM's
    /// `--no-enable-prefix-caching`).
    pub no_prefix_caching: std::sync::atomic::AtomicBool,
    /// Event streams being sent now.
    pub streaming: AtomicU32,
    /// Report `streaming` as `vllm:num_requests_running` (otherwise 0).
    pub report_running: std::sync::atomic::AtomicBool,
}

pub struct Backend {
    pub id: String,
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(id: &str) -> Backend {
        let counters = Arc::new(Counters::default());
        let state = (id.to_owned(), counters.clone());
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/v1/completions", post(generate))
            .route("/v1/chat/completions", post(generate))
            .route("/v1/models", get(models))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Backend {
            id: id.to_owned(),
            addr,
            counters,
            task,
        }
    }

    pub fn set_queue(&self, q: u32) {
        self.counters.queue.store(q, Ordering::SeqCst);
    }

    pub fn set_metrics_mode(&self, mode: MetricsMode) {
        self.counters
            .metrics_mode
            .store(mode as u8, Ordering::SeqCst);
    }

    pub fn set_failing(&self, failing: bool) {
        self.counters.failing.store(failing, Ordering::SeqCst);
    }

    pub fn set_prefix_caching(&self, on: bool) {
        self.counters.no_prefix_caching.store(!on, Ordering::SeqCst);
    }

    /// Report the event streams being sent as the engine's running requests.
    pub fn report_running(&self) {
        self.counters.report_running.store(true, Ordering::SeqCst);
    }

    pub fn streaming(&self) -> u32 {
        self.counters.streaming.load(Ordering::SeqCst)
    }

    /// Returns once epp has scraped this backend `n` more times.
    pub async fn scraped_again(&self, n: usize) {
        let before = self.scrapes();
        while self.scrapes() < before + n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn scrapes(&self) -> usize {
        self.counters.scrapes.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.counters.requests.load(Ordering::SeqCst)
    }
}

type St = (String, Arc<Counters>);

async fn metrics(State((_, c)): State<St>) -> Response {
    c.scrapes.fetch_add(1, Ordering::SeqCst);
    match c.metrics_mode.load(Ordering::SeqCst) {
        1 => return (StatusCode::INTERNAL_SERVER_ERROR, "metrics broke").into_response(),
        2 => {
            return "\u{0}\u{1}{{{ not prometheus !!\nvllm:num_requests_waiting{ oops"
                .into_response();
        }
        3 => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        _ => {}
    }
    let q = c.queue.load(Ordering::SeqCst);
    let running = if c.report_running.load(Ordering::SeqCst) {
        c.streaming.load(Ordering::SeqCst)
    } else {
        0
    };
    let caching = if c.no_prefix_caching.load(Ordering::SeqCst) {
        "False"
    } else {
        "True"
    };
    format!(
        "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"m\"}} {q}\n\
         # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"m\"}} {running}\n\
         # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{model_name=\"m\"}} 0.1\n\
         # TYPE vllm:cache_config_info gauge\n\
         vllm:cache_config_info{{block_size=\"16\",enable_prefix_caching=\"{caching}\",num_gpu_blocks=\"100000\"}} 1\n"
    )
    .into_response()
}

async fn models(State((id, _)): State<St>) -> impl IntoResponse {
    axum::Json(serde_json::json!({"backend": id, "object": "list", "data": []}))
}

async fn generate(State((id, c)): State<St>, headers: HeaderMap, body: Bytes) -> Response {
    c.requests.fetch_add(1, Ordering::SeqCst);
    if c.failing.load(Ordering::SeqCst) {
        let error = serde_json::json!({"backend": id, "error": {"message": "engine dead"}});
        return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(error)).into_response();
    }
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "backend got invalid JSON").into_response();
    };
    let model = req["model"].as_str().unwrap_or_default().to_owned();
    let seen_dest = headers
        .get("x-gateway-destination-endpoint")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body_hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&body));
    if req["stream"].as_bool() == Some(true) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(8);
        // One event per 30 ms: 5, or `max_tokens` (up to 100) to hold the stream longer.
        let events = req["max_tokens"].as_u64().map_or(5, |n| n.clamp(1, 100));
        c.streaming.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            for i in 0..events {
                let ev = serde_json::json!({"backend": id, "model": model, "choices": [{"index": 0, "text": format!("tok{i} ")}]});
                let _ = tx.send(Ok(Bytes::from(format!("data: {ev}\n\n")))).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            let usage = serde_json::json!({"backend": id, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}});
            let _ = tx.send(Ok(Bytes::from(format!("data: {usage}\n\n")))).await;
            let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
            c.streaming.fetch_sub(1, Ordering::SeqCst);
        });
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .unwrap();
    }
    axum::Json(serde_json::json!({
        "backend": id,
        "model": model,
        "served_model": model,
        "destination_header": seen_dest,
        "body_len": body.len(),
        "body_hash": body_hash,
        "choices": [{"index": 0, "text": "ok"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}
    }))
    .into_response()
}
