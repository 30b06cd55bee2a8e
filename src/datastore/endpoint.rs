//! An endpoint (one model-server port on one pod) and the metrics scraped from it.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use super::cache_fit::CacheFit;
use super::load::EndpointLoad;
use super::outlier::OutlierState;
use super::tokenization::Tokenization;
use super::ttft_fit::TtftFit;

/// Process-local identity of an endpoint; never reused, so a stale id cannot alias a new pod.
pub type EndpointId = u32;

/// Which model server runs on the endpoint: an engine name (vllm, sglang, trtllm-serve,
/// triton-tensorrt-llm, triton, or one a config file defines); decides the metric names
/// scraped. Unnamed (the default: no engine label, no `engine:` in the endpoints file) means
/// the pool's `defaultEngine`, until the endpoint's page shows another engine's names (see
/// [`crate::scrape::engine::recognize`]). Unknown names scrape with the default engine's names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct EngineType(Option<Arc<str>>);

impl EngineType {
    /// The engine's name; empty when unnamed.
    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }

    /// Whether discovery named the engine.
    pub fn is_named(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Display for EngineType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_deref().unwrap_or("(default)"))
    }
}

impl FromStr for EngineType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        match name.as_str() {
            "" => Ok(Self::default()),
            "trtllm" => Ok(Self(Some(Arc::from("trtllm-serve")))),
            n if n.len() <= 63
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) =>
            {
                Ok(Self(Some(Arc::from(n))))
            }
            other => Err(format!("invalid engine name {other:?}")),
        }
    }
}

/// What discovery knows about an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// `<pod>-rank-<i>` in Kubernetes; anything unique in static mode.
    pub name: String,
    /// Where requests go.
    pub address: SocketAddr,
    /// Where `/metrics` is scraped (defaults to `address`; some engines use another port).
    pub metrics_address: SocketAddr,
    pub engine: EngineType,
}

impl EndpointSpec {
    pub fn new(name: impl Into<String>, address: SocketAddr) -> Self {
        Self {
            name: name.into(),
            address,
            metrics_address: address,
            engine: EngineType::default(),
        }
    }
}

/// An endpoint in the datastore.
#[derive(Debug)]
pub struct Endpoint {
    pub id: EndpointId,
    pub name: String,
    pub address: SocketAddr,
    /// `address` as the `ip:port` string put in the destination header (formatted once).
    pub address_str: String,
    pub metrics_address: SocketAddr,
    pub engine: EngineType,
    /// What epp has routed here and not yet seen finish (live, shared by all snapshots).
    pub load: EndpointLoad,
    /// Its recent response statuses, and whether it is ejected for them (live).
    pub outlier: OutlierState,
    /// Prompt bytes per token of its tokenizer, learned from its responses' usage.
    pub tokenization: Tokenization,
    /// Share of its configured cache capacity the engine keeps, learned from cached tokens.
    pub cache_fit: CacheFit,
    /// Its pool's learned first-token cost (one shared by every endpoint of a datastore).
    pub ttft: Arc<TtftFit>,
}

impl Endpoint {
    pub fn new(id: EndpointId, spec: EndpointSpec) -> Self {
        Self {
            id,
            address_str: spec.address.to_string(),
            name: spec.name,
            address: spec.address,
            metrics_address: spec.metrics_address,
            engine: spec.engine,
            load: EndpointLoad::default(),
            outlier: OutlierState::default(),
            tokenization: Tokenization::default(),
            cache_fit: CacheFit::default(),
            ttft: Arc::default(),
        }
    }

    /// The same endpoint, sharing its pool's first-token fit.
    pub fn in_pool(self, ttft: Arc<TtftFit>) -> Self {
        Self { ttft, ..self }
    }

    /// Whether a scrape's `failure` proves the serving port down: connections refused on a
    /// metrics port that is the serving port.
    pub fn proven_down(&self, failure: Option<ScrapeFailure>) -> bool {
        failure == Some(ScrapeFailure::Unreachable) && self.metrics_address == self.address
    }

    pub fn spec(&self) -> EndpointSpec {
        EndpointSpec {
            name: self.name.clone(),
            address: self.address,
            metrics_address: self.metrics_address,
            engine: self.engine.clone(),
        }
    }
}

/// Why the latest scrape of an endpoint failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScrapeFailure {
    /// The connection was refused, reset or timed out: the server is probably down.
    Unreachable,
    /// The page did not arrive in time.
    Timeout,
    /// The server answered with an error status.
    BadStatus,
    /// The page could not be read or parsed.
    BadPage,
}

impl ScrapeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            ScrapeFailure::Unreachable => "unreachable",
            ScrapeFailure::Timeout => "timeout",
            ScrapeFailure::BadStatus => "bad status",
            ScrapeFailure::BadPage => "bad page",
        }
    }
}

/// Latest metrics scraped from an endpoint. A value is `None` when the page lacked its family
/// (some engines export a series only after their first request): absent, not a failure.
/// `updated == None` means never scraped successfully.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointMetrics {
    /// Requests waiting in the engine's queue.
    pub waiting_queue: Option<u32>,
    /// Requests being decoded/prefilled.
    pub running: Option<u32>,
    /// KV-cache utilisation, 0..=1.
    pub kv_cache_usage: Option<f64>,
    /// LoRA adapters currently loaded and running.
    pub active_loras: Vec<String>,
    /// LoRA adapters requested but waiting for a slot.
    pub waiting_loras: Vec<String>,
    /// Adapter slots (`max_lora`), 0 if the engine reports none.
    pub max_lora: u32,
    /// KV block size in tokens, from the engine's cache config.
    pub block_size_tokens: Option<u32>,
    /// Number of KV blocks on the device, from the engine's cache config.
    pub num_gpu_blocks: Option<u64>,
    /// Whether the engine reuses cached prompt prefixes, from its cache config's
    /// `enable_prefix_caching` label (vLLM's `--[no-]enable-prefix-caching`); `None` when the
    /// page does not say.
    pub prefix_caching: Option<bool>,
    /// When the values above were scraped.
    pub updated: Option<Instant>,
    /// The endpoint's [`EndpointLoad::dispatched`] count when that scrape started: requests
    /// routed since then are not in the scraped figures yet.
    pub dispatched_at_scrape: u64,
    /// Set when the most recent scrape attempt failed (the values above are then older).
    pub failure: Option<ScrapeFailure>,
}

impl EndpointMetrics {
    /// Whether the page had any load family (waiting, running or KV use).
    pub fn has_load(&self) -> bool {
        self.waiting_queue.is_some() || self.running.is_some() || self.kv_cache_usage.is_some()
    }

    /// The engine's request counts as parked requests are reconciled with
    /// ([`super::load::EngineCounts`]); the total needs the running count.
    pub fn engine_counts(&self) -> super::load::EngineCounts {
        super::load::EngineCounts {
            requests: self
                .running
                .map(|r| u64::from(r) + u64::from(self.waiting_queue.unwrap_or(0))),
            waiting: self.waiting_queue.map(u64::from),
        }
    }
}
