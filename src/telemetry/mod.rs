//! epp's own observability: Prometheus metrics on `--metrics-port`, and logging.

#[cfg(feature = "alloc-stats")]
pub mod alloc;
pub mod cardinality;
pub mod endpoints;
pub mod health;
pub mod metrics;
pub mod process;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::datastore::Datastore;
pub use metrics::Metrics;

/// Content type of the Prometheus text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

type MetricsState = (Arc<Metrics>, Arc<Datastore>);

async fn metrics_page(State((metrics, datastore)): State<MetricsState>) -> impl IntoResponse {
    ([(CONTENT_TYPE, TEXT_FORMAT)], metrics.render(&datastore))
}

/// Serves `/metrics` on an already bound listener until the task is dropped.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    datastore: Arc<Datastore>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .with_state((metrics, datastore));
    axum::serve(listener, app).await
}

/// Logging: `-v N` maps to a level (0 info, 1–2 debug, 3+ trace) unless `RUST_LOG` is set.
pub fn init_tracing(verbosity: u8) {
    let default = match verbosity {
        0 => "info",
        1 | 2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
