//! Bench fixture for `scripts/bench_extproc.sh`: an upstream that answers at once, so a run
//! measures the gateway path, not a model server.
//!
//! `x-sse-chunks: N` → a `text/event-stream` response of N small `data:` events (then a usage
//! event and `[DONE]`), each event written on its own; otherwise a small JSON completion. When the client sends
//! `x-sent-ns` (wall-clock nanoseconds at send), the response carries `x-path-ns`: how long the
//! request took to reach this server (first request byte sent → request head received).
//!
//! `cargo run --release --example bench_upstream -- 127.0.0.1:PORT[,127.0.0.1:PORT…]` (one
//! process, one thread, every address).

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::serve::ListenerExt;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

async fn answer(headers: HeaderMap, body: Bytes) -> Response {
    let arrived = now_ns();
    let path_ns = headers
        .get("x-sent-ns")
        .and_then(|v| v.to_str().ok()?.parse::<u128>().ok())
        .map(|sent| arrived.saturating_sub(sent));
    let chunks: usize = headers
        .get("x-sse-chunks")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let mut resp = if chunks == 0 {
        let text = format!(
            r#"{{"id":"x","object":"text_completion","model":"m","choices":[{{"index":0,"text":"ok","finish_reason":"length"}}],"usage":{{"prompt_tokens":{},"completion_tokens":1,"total_tokens":{}}}}}"#,
            body.len() / 4,
            body.len() / 4 + 1
        );
        ([(header::CONTENT_TYPE, "application/json")], text).into_response()
    } else {
        let events = (0..chunks)
            .map(|i| {
                Ok::<_, Infallible>(Bytes::from(format!(
                    "data: {{\"id\":\"x\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"text\":\"t{i} \"}}]}}\n\n"
                )))
            })
            .chain([
                Ok(Bytes::from_static(
                    b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n",
                )),
                Ok(Bytes::from_static(b"data: [DONE]\n\n")),
            ]);
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Body::from_stream(futures::StreamExt::then(
                futures::stream::iter(events),
                |event| async {
                    // One write per event, as a model server flushes each token.
                    tokio::task::yield_now().await;
                    event
                },
            )))
            .unwrap_or_default()
    };
    if let Some(ns) = path_ns
        && let Ok(v) = HeaderValue::from_str(&ns.to_string())
    {
        resp.headers_mut().insert("x-path-ns", v);
    }
    resp
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addrs = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8000".into());
    let app = Router::new()
        .route("/metrics", get(|| async { "" }))
        .route("/{*path}", any(answer))
        // Bodies of any size (axum refuses over 2 MB by default).
        .layer(axum::extract::DefaultBodyLimit::disable());
    let mut servers = Vec::new();
    for addr in addrs.split(',') {
        let listener = tokio::net::TcpListener::bind(addr).await?.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        servers.push(tokio::spawn(
            axum::serve(listener, app.clone()).into_future(),
        ));
    }
    eprintln!("bench_upstream listening on {addrs}");
    for s in servers {
        s.await??;
    }
    Ok(())
}
