//! Scraping model-server metrics: one loop per endpoint, `GET <scheme>://<metrics address><path>`
//! (default `http://<pod ip>:<serving port>/metrics`; `--model-server-metrics-{scheme,path,port}`
//! or `metrics-data-source` change it) every `--refresh-metrics-interval` (default 50 ms), each
//! request bounded by a timeout. The page is read by the endpoint's engine mapping
//! ([`mapping`]): the named engine's, else the pool's default engine's, else — once the page
//! shows another engine's load families and none of the default's — that engine's
//! ([`engine::recognize`]).
//!
//! A page that lacks a family is a successful scrape with that value absent. A failed scrape
//! keeps the previous values and marks the endpoint as failing, with the kind of failure
//! (unreachable, timeout, bad status, bad page); the director then de-prioritizes it and takes
//! its load from epp's own accounting (see [`crate::datastore::Health`]). Each change of an
//! endpoint's scrape state is logged once, with its reason.

pub mod engine;
pub mod mapping;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;

use crate::datastore::{Datastore, Endpoint, EndpointMetrics, ScrapeFailure};
use mapping::{EngineMapping, Mappings};

pub use engine::{MetricsError, parse_metrics};

/// Largest `/metrics` page accepted.
const MAX_PAGE_BYTES: usize = 8 << 20;
/// How often the set of scrape loops is reconciled with the datastore.
const RECONCILE_EVERY: Duration = Duration::from_millis(100);

/// Why one scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("GET {url}: cannot connect: {reason}")]
    Connect { url: String, reason: String },
    #[error("GET {url}: status {status}")]
    Status { url: String, status: u16 },
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

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Where an endpoint's metrics page is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsTarget {
    pub https: bool,
    pub path: String,
    /// Port override (default: the endpoint's metrics address).
    pub port: Option<u16>,
    /// With https, accept any certificate (the Go EPP's default: pods serve self-signed ones).
    pub insecure_skip_verify: bool,
}

impl Default for MetricsTarget {
    fn default() -> Self {
        Self {
            https: false,
            path: "/metrics".into(),
            port: None,
            insecure_skip_verify: true,
        }
    }
}

impl MetricsTarget {
    pub fn url(&self, endpoint: &Endpoint) -> String {
        let addr = endpoint.metrics_address;
        let port = self.port.unwrap_or(addr.port());
        let scheme = if self.https { "https" } else { "http" };
        let host = match addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let path = if self.path.starts_with('/') {
            self.path.clone()
        } else {
            format!("/{}", self.path)
        };
        format!("{scheme}://{host}:{port}{path}")
    }
}

/// Scrape settings.
#[derive(Debug, Clone)]
pub struct ScrapeConfig {
    pub interval: Duration,
    pub timeout: Duration,
    /// Age past which an endpoint's last good metrics no longer count (as the director's
    /// `--metrics-staleness-threshold`): when a failing scrape de-prioritizes it.
    pub staleness: Duration,
    pub target: MetricsTarget,
    pub mappings: Arc<Mappings>,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
            staleness: Duration::from_secs(2),
            target: MetricsTarget::default(),
            mappings: Arc::new(Mappings::default()),
        }
    }
}

/// An HTTP(S) client for scrapes: TCP_NODELAY, `timeout` to connect, certificates checked
/// against the system roots unless `insecure`.
pub fn client(timeout: Duration, insecure: bool) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(timeout));
    connector.enforce_http(false);
    let tls = crate::tls::client_config(insecure);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https)
}

/// The shortest scrape interval used (a zero interval would make the timer panic).
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

impl ScrapeError {
    /// The failure as the datastore records it.
    pub fn failure(&self) -> ScrapeFailure {
        match self {
            ScrapeError::Connect { .. } => ScrapeFailure::Unreachable,
            ScrapeError::Timeout { .. } => ScrapeFailure::Timeout,
            ScrapeError::Status { .. } => ScrapeFailure::BadStatus,
            ScrapeError::Http { .. } | ScrapeError::Metrics { .. } => ScrapeFailure::BadPage,
        }
    }
}

/// Reads a fetched page by `mapping`.
fn parse_page(
    endpoint: &Endpoint,
    mapping: &EngineMapping,
    target: &MetricsTarget,
    text: &str,
) -> Result<EndpointMetrics, ScrapeError> {
    parse_metrics(mapping, text, Instant::now()).map_err(|source| ScrapeError::Metrics {
        url: target.url(endpoint),
        source,
    })
}

/// Fetches one endpoint's metrics page (at most [`MAX_PAGE_BYTES`], UTF-8).
async fn fetch_page(
    client: &HttpClient,
    endpoint: &Endpoint,
    target: &MetricsTarget,
    timeout: Duration,
) -> Result<String, ScrapeError> {
    let url = target.url(endpoint);
    let http = |reason: String| ScrapeError::Http {
        url: url.clone(),
        reason,
    };
    let fetch = async {
        let uri: hyper::Uri = url.parse().map_err(|e| http(format!("{e}")))?;
        let resp = client.get(uri).await.map_err(|e| {
            if e.is_connect() {
                ScrapeError::Connect {
                    url: url.clone(),
                    reason: error_chain(&e),
                }
            } else {
                http(error_chain(&e))
            }
        })?;
        if !resp.status().is_success() {
            return Err(ScrapeError::Status {
                url: url.clone(),
                status: resp.status().as_u16(),
            });
        }
        let body = Limited::new(resp.into_body(), MAX_PAGE_BYTES)
            .collect()
            .await
            .map_err(|e| http(format!("reading body: {e}")))?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| http("body is not UTF-8".into()))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ScrapeError::Timeout {
            url: url.clone(),
            timeout,
        })?
}

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// What the log last said about an endpoint's scrapes, so that each change is logged once.
#[derive(Debug, Default, PartialEq)]
struct ScrapeState {
    failure: Option<ScrapeFailure>,
    /// Families the page lacked (absent values), by name.
    absent: Vec<String>,
    /// Whether the engine's cache config last said prefix caching is off.
    prefix_caching_off: bool,
    /// When a scrape last succeeded.
    last_success: Option<Instant>,
}

impl ScrapeState {
    /// Notes a successful scrape; true when that changed the state (and was logged).
    fn on_success(
        &mut self,
        endpoint: &Endpoint,
        mapping: &EngineMapping,
        m: &EndpointMetrics,
    ) -> bool {
        self.last_success = Some(Instant::now());
        let recovered = self.note_recovery(endpoint);
        let families = self.note_families(endpoint, mapping, m);
        let caching = self.note_prefix_caching(endpoint, m);
        recovered || families || caching
    }

    /// A scrape succeeded after failing; true when it had been failing.
    fn note_recovery(&mut self, endpoint: &Endpoint) -> bool {
        let Some(f) = self.failure.take() else {
            return false;
        };
        tracing::info!(endpoint = %endpoint.name, previous = f.as_str(), "metrics scrape recovered");
        // Only a server that was down is back: a slow or erroring page says nothing about the
        // engine that was ejected for its answers.
        if f == ScrapeFailure::Unreachable && endpoint.outlier.reachable_again(Instant::now()) {
            tracing::info!(endpoint = %endpoint.name, "reachable again: ejection lifted, on probation");
        }
        true
    }

    /// The families the page lacks; true when they changed.
    fn note_families(
        &mut self,
        endpoint: &Endpoint,
        mapping: &EngineMapping,
        m: &EndpointMetrics,
    ) -> bool {
        let absent: Vec<String> = engine::absent_families(mapping, m)
            .into_iter()
            .map(str::to_owned)
            .collect();
        if absent == self.absent {
            return false;
        }
        if absent.is_empty() {
            tracing::info!(endpoint = %endpoint.name, "metrics page now has every family epp reads");
        } else {
            tracing::info!(
                endpoint = %endpoint.name,
                absent = ?absent,
                "metrics page lacks families; their values are taken from epp's own load accounting"
            );
        }
        self.absent = absent;
        true
    }

    /// Whether the engine says it reuses no cached prefix; true when that changed.
    fn note_prefix_caching(&mut self, endpoint: &Endpoint, m: &EndpointMetrics) -> bool {
        let off = m.prefix_caching == Some(false);
        if off == self.prefix_caching_off {
            return false;
        }
        if off {
            tracing::info!(
                endpoint = %endpoint.name,
                "engine reports prefix caching off; prefix matches on it count as nothing"
            );
        } else {
            tracing::info!(endpoint = %endpoint.name, "engine no longer reports prefix caching off");
        }
        self.prefix_caching_off = off;
        true
    }

    /// Notes a failed scrape; true when that changed the state (and was logged). A failure
    /// de-prioritizes the endpoint only once its server is unreachable or its last good
    /// metrics are older than `staleness` (see [`crate::datastore::Candidate::assess_age`]);
    /// until then it is logged at debug level.
    fn on_failure(
        &mut self,
        endpoint: &Endpoint,
        e: &ScrapeError,
        staleness: Duration,
        now: Instant,
    ) -> bool {
        let f = e.failure();
        let down = endpoint.proven_down(Some(f));
        let stale = self
            .last_success
            .is_none_or(|t| now.saturating_duration_since(t) > staleness);
        if !(down || stale) {
            tracing::debug!(endpoint = %endpoint.name, error = %e, "metrics scrape failed; the last good metrics still count");
            return false;
        }
        if self.failure == Some(f) {
            return false;
        }
        tracing::warn!(
            endpoint = %endpoint.name,
            state = f.as_str(),
            error = %e,
            "metrics scrape failing; endpoint de-prioritized"
        );
        self.failure = Some(f);
        true
    }
}

async fn scrape_loop(
    client: HttpClient,
    datastore: Arc<Datastore>,
    endpoint: Arc<Endpoint>,
    cfg: ScrapeConfig,
) {
    let mut state = ScrapeState::default();
    let mut reader = PageReader::new(&endpoint, &cfg.mappings);
    let mut ticker = tokio::time::interval(cfg.interval.max(MIN_INTERVAL));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let dispatched = endpoint.load.dispatched();
        let scraped = match fetch_page(&client, &endpoint, &cfg.target, cfg.timeout).await {
            Ok(text) => reader.read(&endpoint, &cfg, &text),
            Err(e) => Err(e),
        };
        match scraped {
            Ok(mut m) => {
                let _ = state.on_success(&endpoint, &reader.mapping, &m);
                let released = endpoint
                    .load
                    .reconcile_parked(m.engine_counts(), dispatched);
                if released > 0 {
                    tracing::trace!(endpoint = %endpoint.name, released, "parked requests ended");
                }
                m.dispatched_at_scrape = dispatched;
                datastore.update_metrics(endpoint.id, m);
            }
            Err(e) => {
                let _ = state.on_failure(&endpoint, &e, cfg.staleness, Instant::now());
                datastore.scrape_failed(endpoint.id, e.failure());
            }
        }
    }
}

/// Reads an endpoint's pages by its engine's metric names; for an endpoint whose engine
/// nobody named, by another engine's once a page shows that engine's load families and none
/// of the default engine's ([`engine::recognize`]).
struct PageReader {
    mapping: Arc<EngineMapping>,
    unnamed: bool,
}

impl PageReader {
    fn new(endpoint: &Endpoint, mappings: &Mappings) -> Self {
        let name = endpoint.engine.as_str();
        let mapping = mappings.get(name);
        let unnamed = !endpoint.engine.is_named();
        if !unnamed && !mappings.knows(name) {
            tracing::warn!(endpoint = %endpoint.name, engine = %endpoint.engine, default = %mapping.name, "unknown engine; scraping the default engine's metric names");
        }
        Self { mapping, unnamed }
    }

    fn read(
        &mut self,
        endpoint: &Endpoint,
        cfg: &ScrapeConfig,
        text: &str,
    ) -> Result<EndpointMetrics, ScrapeError> {
        let m = parse_page(endpoint, &self.mapping, &cfg.target, text)?;
        if !self.unnamed || m.has_load() {
            return Ok(m);
        }
        let Some(found) = engine::recognize(&cfg.mappings, &self.mapping, text) else {
            return Ok(m);
        };
        tracing::info!(
            endpoint = %endpoint.name,
            engine = %found.name,
            instead_of = %self.mapping.name,
            "metrics page shows this engine's families; reading its names"
        );
        self.mapping = found;
        parse_page(endpoint, &self.mapping, &cfg.target, text)
    }
}

/// Keeps one scrape loop running per endpoint in the datastore.
pub fn spawn(datastore: Arc<Datastore>, cfg: ScrapeConfig) -> JoinHandle<()> {
    let client = client(cfg.timeout, cfg.target.insecure_skip_verify);
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
                    tokio::spawn(scrape_loop(
                        client.clone(),
                        datastore.clone(),
                        ep,
                        cfg.clone(),
                    ))
                });
            }
            tokio::time::sleep(RECONCILE_EVERY).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::EndpointSpec;

    const SGLANG_PAGE: &str =
        "sglang:num_queue_reqs 4\nsglang:num_running_reqs 1\nsglang:token_usage 0.5\n";

    fn reader_for(engine: &str, cfg: &ScrapeConfig) -> (Endpoint, PageReader) {
        let mut spec = EndpointSpec::new("a", ([127, 0, 0, 1], 1).into());
        spec.engine = engine.parse().unwrap();
        let ep = Endpoint::new(0, spec);
        let reader = PageReader::new(&ep, &cfg.mappings);
        (ep, reader)
    }

    #[test]
    fn an_unnamed_engine_is_read_by_the_names_its_page_shows() {
        let cfg = ScrapeConfig::default();
        let (ep, mut reader) = reader_for("", &cfg);
        assert_eq!(reader.mapping.name, "vllm", "the default engine first");
        let empty = reader
            .read(&ep, &cfg, "process_start_time_seconds 0\n")
            .unwrap();
        assert!(!empty.has_load());
        assert_eq!(reader.mapping.name, "vllm", "no engine's families yet");
        let m = reader.read(&ep, &cfg, SGLANG_PAGE).unwrap();
        assert_eq!((m.waiting_queue, m.running), (Some(4), Some(1)));
        assert_eq!(m.kv_cache_usage, Some(0.5));
        assert_eq!(reader.mapping.name, "sglang");
        let m = reader.read(&ep, &cfg, SGLANG_PAGE).unwrap();
        assert_eq!(m.waiting_queue, Some(4), "and stays with it");
    }

    #[test]
    fn a_named_engine_is_read_by_its_own_names_only() {
        let cfg = ScrapeConfig::default();
        let (ep, mut reader) = reader_for("vllm", &cfg);
        let m = reader.read(&ep, &cfg, SGLANG_PAGE).unwrap();
        assert!(!m.has_load(), "{m:?}");
        assert_eq!(reader.mapping.name, "vllm");
    }

    #[test]
    fn an_unnamed_engine_starts_as_the_configured_default_engine() {
        let cfg = ScrapeConfig {
            mappings: Arc::new(Mappings::new(&[], Some("sglang"), None).unwrap()),
            ..Default::default()
        };
        let (ep, mut reader) = reader_for("", &cfg);
        assert_eq!(reader.mapping.name, "sglang");
        let m = reader.read(&ep, &cfg, SGLANG_PAGE).unwrap();
        assert_eq!(m.running, Some(1));
        let (_, named) = reader_for("vllm", &cfg);
        assert_eq!(named.mapping.name, "vllm", "a named engine keeps its own");
    }

    #[test]
    fn each_state_change_is_logged_once() {
        let ep = Endpoint::new(0, EndpointSpec::new("a", ([127, 0, 0, 1], 1).into()));
        let mut s = ScrapeState::default();
        let full = EndpointMetrics {
            waiting_queue: Some(0),
            running: Some(0),
            kv_cache_usage: Some(0.0),
            ..Default::default()
        };
        let empty = EndpointMetrics::default();
        let vllm = Mappings::default().get("vllm");
        assert!(s.on_success(&ep, &vllm, &empty), "families absent: logged");
        assert!(!s.on_success(&ep, &vllm, &empty), "still absent: quiet");
        assert!(s.on_success(&ep, &vllm, &full), "families appeared: logged");
        let refused = ScrapeError::Connect {
            url: "u".into(),
            reason: "refused".into(),
        };
        let stale = Duration::from_secs(2);
        let now = Instant::now();
        assert!(
            s.on_failure(&ep, &refused, stale, now),
            "server down: logged"
        );
        assert!(
            !s.on_failure(&ep, &refused, stale, now),
            "same failure: quiet"
        );
        assert!(s.on_success(&ep, &vllm, &full), "recovered: logged");
        let status = ScrapeError::Status {
            url: "u".into(),
            status: 500,
        };
        assert!(
            !s.on_failure(&ep, &status, stale, now),
            "an error status while the last good metrics are fresh: quiet"
        );
        let later = now + Duration::from_secs(3);
        assert!(
            s.on_failure(&ep, &status, stale, later),
            "the failures outlast the last good metrics: logged"
        );
        assert_eq!(status.failure(), ScrapeFailure::BadStatus);
        assert!(s.on_success(&ep, &vllm, &full), "recovered: logged");
        assert!(!s.on_success(&ep, &vllm, &full));
        let no_reuse = EndpointMetrics {
            prefix_caching: Some(false),
            ..full.clone()
        };
        assert!(
            s.on_success(&ep, &vllm, &no_reuse),
            "prefix caching off: logged"
        );
        assert!(!s.on_success(&ep, &vllm, &no_reuse));
    }

    #[test]
    fn a_server_reachable_again_lifts_an_ejection_and_a_slow_or_healthy_page_does_not() {
        use crate::datastore::OutlierDetector;
        let pool = crate::datastore::outlier::tests::pool(2);
        let ep = &pool[0];
        let detector = OutlierDetector::default();
        let eject = || {
            for _ in 0..5 {
                detector.observe(ep, 503, Instant::now(), || pool.clone());
            }
            assert!(ep.outlier.is_ejected(Instant::now()));
        };
        let full = EndpointMetrics {
            waiting_queue: Some(0),
            running: Some(0),
            kv_cache_usage: Some(0.0),
            ..Default::default()
        };
        let vllm = Mappings::default().get("vllm");
        let mut s = ScrapeState::default();
        // Scrapes that never failed (a broken engine behind a healthy page): still ejected.
        s.on_success(ep, &vllm, &full);
        eject();
        s.on_success(ep, &vllm, &full);
        assert!(ep.outlier.is_ejected(Instant::now()));
        // A page slow for longer than the metrics stay fresh (a busy server, not a dead one):
        // still ejected.
        let slow = ScrapeError::Timeout {
            url: "u".into(),
            timeout: Duration::from_secs(1),
        };
        let stale = Duration::from_secs(2);
        assert!(s.on_failure(ep, &slow, stale, Instant::now() + 2 * stale));
        s.on_success(ep, &vllm, &full);
        assert!(ep.outlier.is_ejected(Instant::now()));
        // The server went away and came back: routable again.
        let refused = ScrapeError::Connect {
            url: "u".into(),
            reason: "refused".into(),
        };
        assert!(s.on_failure(ep, &refused, stale, Instant::now()));
        s.on_success(ep, &vllm, &full);
        assert!(!ep.outlier.is_ejected(Instant::now()));
    }

    #[tokio::test]
    async fn a_refused_connection_is_unreachable_and_a_500_is_a_bad_status() {
        let client = client(Duration::from_secs(1), true);
        let target = MetricsTarget::default();
        // A port nobody listens on.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let ep = Endpoint::new(0, EndpointSpec::new("a", addr));
        let e = fetch_page(&client, &ep, &target, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(e.failure(), ScrapeFailure::Unreachable, "{e}");
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "no") }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let ep = Endpoint::new(1, EndpointSpec::new("b", addr));
        let e = fetch_page(&client, &ep, &target, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(e.failure(), ScrapeFailure::BadStatus, "{e}");
    }
}
