//! epp's own observability: Prometheus metrics on `--metrics-port`, and logging.

#[cfg(feature = "alloc-stats")]
pub mod alloc;
pub mod auth;
pub mod cardinality;
pub mod endpoints;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod zap_json;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::datastore::Datastore;
pub use auth::{Decision, MetricsAuth};
pub use metrics::Metrics;

/// Content type of the Prometheus text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

type MetricsState = (Arc<Metrics>, Arc<Datastore>, Arc<MetricsAuth>);

async fn metrics_page(
    State((metrics, datastore, auth)): State<MetricsState>,
    headers: HeaderMap,
) -> Response {
    let authorization = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    match auth.check(authorization).await {
        Decision::Allowed => {
            ([(CONTENT_TYPE, TEXT_FORMAT)], metrics.render(&datastore)).into_response()
        }
        Decision::Unauthenticated => StatusCode::UNAUTHORIZED.into_response(),
        Decision::Forbidden => StatusCode::FORBIDDEN.into_response(),
    }
}

/// Serves `/metrics` on an already bound listener until the task is dropped.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    datastore: Arc<Datastore>,
    auth: MetricsAuth,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .with_state((metrics, datastore, Arc::new(auth)));
    axum::serve(listener, app).await
}
