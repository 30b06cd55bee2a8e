//! Scraping model-server metrics: one loop per endpoint, `GET http://<metrics address>/metrics`
//! every `--refresh-metrics-interval` (default 50 ms), each request bounded by a timeout. A
//! failed scrape leaves the previous metrics in place; they go stale after
//! `--metrics-staleness-threshold` and the scheduler then prefers endpoints with fresh metrics.

pub mod engine;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;

use crate::datastore::{Datastore, Endpoint};

pub use engine::{MetricsError, parse_metrics};

/// Largest `/metrics` page accepted.
const MAX_PAGE_BYTES: usize = 8 << 20;
/// How often the set of scrape loops is reconciled with the datastore.
const RECONCILE_EVERY: Duration = Duration::from_millis(100);

/// Why one scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("GET {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("GET {url}: timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: {source}")]
    Metrics {
        url: String,
        #[source]
        source: MetricsError,
    },
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Scrape settings.
#[derive(Debug, Clone, Copy)]
pub struct ScrapeConfig {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
        }
    }
}

/// Scrapes one endpoint once.
pub async fn scrape_once(
    client: &HttpClient,
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<crate::datastore::EndpointMetrics, ScrapeError> {
    let url = format!("http://{}/metrics", endpoint.metrics_address);
    let http = |reason: String| ScrapeError::Http {
        url: url.clone(),
        reason,
    };
    let fetch = async {
        let uri: hyper::Uri = url.parse().map_err(|e| http(format!("{e}")))?;
        let resp = client.get(uri).await.map_err(|e| http(format!("{e}")))?;
        if !resp.status().is_success() {
            return Err(http(format!("status {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), MAX_PAGE_BYTES)
            .collect()
            .await
            .map_err(|e| http(format!("reading body: {e}")))?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| http("body is not UTF-8".into()))
    };
    let text = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ScrapeError::Timeout {
            url: url.clone(),
            timeout,
        })??;
    parse_metrics(endpoint.engine, &text, Instant::now())
        .map_err(|source| ScrapeError::Metrics { url, source })
}

async fn scrape_loop(
    client: HttpClient,
    datastore: Arc<Datastore>,
    endpoint: Arc<Endpoint>,
    cfg: ScrapeConfig,
) {
    let mut failing = false;
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match scrape_once(&client, &endpoint, cfg.timeout).await {
            Ok(m) => {
                if failing {
                    tracing::info!(endpoint = %endpoint.name, "metrics scrape recovered");
                    failing = false;
                }
                datastore.update_metrics(endpoint.id, m);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(endpoint = %endpoint.name, error = %e, "metrics scrape failed");
                    failing = true;
                }
            }
        }
    }
}

/// Keeps one scrape loop running per endpoint in the datastore.
pub fn spawn(datastore: Arc<Datastore>, cfg: ScrapeConfig) -> JoinHandle<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(cfg.timeout));
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    tokio::spawn(async move {
        let mut loops: HashMap<u32, JoinHandle<()>> = HashMap::new();
        loop {
            let endpoints = datastore.endpoints();
            loops.retain(|id, handle| {
                let keep = endpoints.iter().any(|e| e.id == *id);
                if !keep {
                    handle.abort();
                }
                keep
            });
            for ep in endpoints {
                loops.entry(ep.id).or_insert_with(|| {
                    tokio::spawn(scrape_loop(client.clone(), datastore.clone(), ep, cfg))
                });
            }
            tokio::time::sleep(RECONCILE_EVERY).await;
        }
    })
}
