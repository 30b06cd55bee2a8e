//! epp's own Prometheus metrics, named as the Go EPP names them (DESIGN §8), served on
//! `--metrics-port` at `/metrics` in the Prometheus text format (prometheus-client).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;

use super::cardinality::BoundedLabel;
use crate::datastore::Datastore;
use crate::scheduling::PluginTimer;
use crate::scheduling::plugins::prefix::PrefixObserver;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model_name: String,
    pub target_model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub model_name: String,
    pub target_model_name: String,
    pub error_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunningLabels {
    pub model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RewriteLabels {
    pub model_rewrite_name: String,
    pub model_name: String,
    pub target_model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub status: String,
    pub target_model_name: String,
    pub pod_name: String,
    pub namespace: String,
    pub port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    commit: String,
    build_ref: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub extension_point: String,
    pub plugin_type: String,
    pub plugin_name: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_hist() -> Histogram {
    Histogram::new([
        0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
        10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0,
    ])
}

fn size_hist() -> Histogram {
    Histogram::new(exponential_buckets(64.0, 4.0, 12))
}

fn token_hist() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 18))
}

fn tpot_hist() -> Histogram {
    Histogram::new([
        0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5,
        0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 12.0, 18.0, 24.0, 30.0, 36.0, 48.0, 60.0,
    ])
}

fn scheduler_hist() -> Histogram {
    Histogram::new(exponential_buckets(1e-6, 2.0, 20))
}

/// All of epp's metrics.
pub struct Metrics {
    registry: Registry,
    pool_name: String,
    pub request_total: Family<ModelLabels, Counter>,
    pub request_error_total: Family<ErrorLabels, Counter>,
    pub request_duration: HistFamily<ModelLabels>,
    pub request_ttft: HistFamily<ModelLabels>,
    pub request_sizes: HistFamily<ModelLabels>,
    pub response_sizes: HistFamily<ModelLabels>,
    pub input_tokens: HistFamily<ModelLabels>,
    pub output_tokens: HistFamily<ModelLabels>,
    pub cached_tokens: HistFamily<ModelLabels>,
    /// Seconds per output token after the first: (duration − TTFT) / (output tokens − 1).
    pub request_tpot: HistFamily<ModelLabels>,
    /// Request duration / output tokens.
    pub normalized_tpot: HistFamily<ModelLabels>,
    pub running_requests: Family<RunningLabels, Gauge>,
    pub pool_avg_kv: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    pub pool_avg_queue: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    pub pool_avg_running: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    pub scheduler_attempts: Family<AttemptLabels, Counter>,
    pub model_rewrites: Family<RewriteLabels, Counter>,
    pub pool_ready_pods: Family<PoolLabels, Gauge>,
    pub scheduler_e2e: Histogram,
    pub plugin_duration: HistFamily<PluginLabels>,
    pub prefix_indexer_size: Gauge,
    pub prefix_hit_ratio: Histogram,
    pub prefix_hit_bytes: Histogram,
    /// The cap on distinct `model_name`/`target_model_name` values (they come from requests).
    pub models: BoundedLabel,
    /// The pool's namespace (a label of `scheduler_attempts_total`; empty in static mode).
    pub namespace: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Creates and registers every metric. `pool_name` labels the pool gauges; `collectors`
    /// (per-endpoint and process gauges) are read at each scrape; at most
    /// `max_model_labels` distinct model names label the request metrics (the rest: `other`).
    pub fn new(
        pool_name: &str,
        namespace: &str,
        collectors: Vec<Box<dyn Collector>>,
        max_model_labels: usize,
    ) -> Arc<Self> {
        let mut registry = Registry::default();
        let m = Metrics {
            pool_name: pool_name.to_owned(),
            request_total: Family::default(),
            request_error_total: Family::default(),
            request_duration: Family::new_with_constructor(latency_hist as fn() -> Histogram),
            request_ttft: Family::new_with_constructor(latency_hist as fn() -> Histogram),
            request_sizes: Family::new_with_constructor(size_hist as fn() -> Histogram),
            response_sizes: Family::new_with_constructor(size_hist as fn() -> Histogram),
            input_tokens: Family::new_with_constructor(token_hist as fn() -> Histogram),
            output_tokens: Family::new_with_constructor(token_hist as fn() -> Histogram),
            cached_tokens: Family::new_with_constructor(token_hist as fn() -> Histogram),
            request_tpot: Family::new_with_constructor(tpot_hist as fn() -> Histogram),
            normalized_tpot: Family::new_with_constructor(tpot_hist as fn() -> Histogram),
            running_requests: Family::default(),
            pool_avg_kv: Family::default(),
            pool_avg_queue: Family::default(),
            pool_avg_running: Family::default(),
            scheduler_attempts: Family::default(),
            model_rewrites: Family::default(),
            pool_ready_pods: Family::default(),
            scheduler_e2e: scheduler_hist(),
            plugin_duration: Family::new_with_constructor(scheduler_hist as fn() -> Histogram),
            prefix_indexer_size: Gauge::default(),
            prefix_hit_ratio: Histogram::new(linear_buckets(0.0, 0.1, 11)),
            prefix_hit_bytes: Histogram::new(exponential_buckets(64.0, 2.0, 16)),
            registry: Registry::default(),
            models: BoundedLabel::new(max_model_labels),
            namespace: namespace.to_owned(),
        };
        let objective = registry.sub_registry_with_prefix("inference_objective");
        objective.register(
            "request",
            "Counter of inference objective requests",
            m.request_total.clone(),
        );
        objective.register(
            "request_error",
            "Counter of inference objective requests errors",
            m.request_error_total.clone(),
        );
        objective.register(
            "request_duration_seconds",
            "Inference objective response latency distribution in seconds",
            m.request_duration.clone(),
        );
        objective.register(
            "request_ttft_seconds",
            "Time to first response byte seen by epp, in seconds",
            m.request_ttft.clone(),
        );
        objective.register(
            "request_sizes",
            "Inference objective requests size distribution in bytes",
            m.request_sizes.clone(),
        );
        objective.register(
            "response_sizes",
            "Inference objective responses size distribution in bytes",
            m.response_sizes.clone(),
        );
        objective.register(
            "input_tokens",
            "Inference objective input token count distribution",
            m.input_tokens.clone(),
        );
        objective.register(
            "output_tokens",
            "Inference objective output token count distribution",
            m.output_tokens.clone(),
        );
        objective.register(
            "prompt_cached_tokens",
            "Inference objective prompt cached token count distribution",
            m.cached_tokens.clone(),
        );
        objective.register(
            "request_tpot_seconds",
            "Inference objective time per output token after the first, in seconds",
            m.request_tpot.clone(),
        );
        objective.register(
            "normalized_time_per_output_token_seconds",
            "Inference objective request latency divided by output tokens, in seconds",
            m.normalized_tpot.clone(),
        );
        objective.register(
            "running_requests",
            "Inference objective number of running requests",
            m.running_requests.clone(),
        );
        let pool = registry.sub_registry_with_prefix("inference_pool");
        pool.register(
            "average_kv_cache_utilization",
            "The average kv cache utilization for an inference server pool",
            m.pool_avg_kv.clone(),
        );
        pool.register(
            "average_queue_size",
            "The average number of requests pending in the model server queue",
            m.pool_avg_queue.clone(),
        );
        pool.register(
            "average_running_requests",
            "The average number of requests running in the model servers",
            m.pool_avg_running.clone(),
        );
        pool.register(
            "ready_pods",
            "The number of ready pods in the inference server pool",
            m.pool_ready_pods.clone(),
        );
        let ext = registry.sub_registry_with_prefix("inference_extension");
        ext.register(
            "scheduler_e2e_duration_seconds",
            "End-to-end scheduling latency distribution in seconds",
            m.scheduler_e2e.clone(),
        );
        ext.register(
            "scheduler_attempts",
            "Scheduling attempts by outcome and chosen endpoint",
            m.scheduler_attempts.clone(),
        );
        ext.register(
            "model_rewrite_decisions",
            "Requests whose model an InferenceModelRewrite rule changed",
            m.model_rewrites.clone(),
        );
        let info: Family<InfoLabels, Gauge> = Family::default();
        info.get_or_create(&InfoLabels {
            commit: option_env!("EPP_COMMIT").unwrap_or("unknown").to_owned(),
            build_ref: env!("CARGO_PKG_VERSION").to_owned(),
        })
        .set(1);
        ext.register(
            "info",
            "General information about the running epp build",
            info,
        );
        ext.register(
            "plugin_duration_seconds",
            "Plugin processing latency distribution in seconds",
            m.plugin_duration.clone(),
        );
        ext.register(
            "prefix_indexer_size",
            "Size of the prefix indexer (block, pod) entries",
            m.prefix_indexer_size.clone(),
        );
        ext.register(
            "prefix_indexer_hit_ratio",
            "Ratio of prefix length matched to total prefix length",
            m.prefix_hit_ratio.clone(),
        );
        ext.register(
            "prefix_indexer_hit_bytes",
            "Length of the prefix match in bytes",
            m.prefix_hit_bytes.clone(),
        );
        for c in collectors {
            registry.register_collector(c);
        }
        Arc::new(Metrics { registry, ..m })
    }

    /// Refreshes the pool gauges from the datastore and renders the text page.
    pub fn render(&self, datastore: &Datastore) -> String {
        let snap = datastore.snapshot();
        let n = snap.candidates.len();
        let labels = PoolLabels {
            name: self.pool_name.clone(),
        };
        let (kv, q, r) = snap
            .candidates
            .iter()
            .fold((0.0, 0.0, 0.0), |(kv, q, r), c| {
                (
                    kv + c.metrics.kv_cache_usage.unwrap_or(0.0),
                    q + f64::from(c.metrics.waiting_queue.unwrap_or(0)),
                    r + f64::from(c.running()),
                )
            });
        let avg = |x: f64| if n == 0 { 0.0 } else { x / n as f64 };
        self.pool_avg_kv.get_or_create(&labels).set(avg(kv));
        self.pool_avg_queue.get_or_create(&labels).set(avg(q));
        self.pool_avg_running.get_or_create(&labels).set(avg(r));
        self.pool_ready_pods.get_or_create(&labels).set(n as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl PluginTimer for Metrics {
    fn observe(&self, extension_point: &'static str, plugin: &str, seconds: f64) {
        self.plugin_duration
            .get_or_create(&PluginLabels {
                extension_point: extension_point.to_owned(),
                plugin_type: plugin.to_owned(),
                plugin_name: plugin.to_owned(),
            })
            .observe(seconds);
    }
}

impl PrefixObserver for Metrics {
    fn observe_match(&self, matched_bytes: usize, hashed_bytes: usize) {
        if hashed_bytes > 0 {
            self.prefix_hit_ratio
                .observe(matched_bytes as f64 / hashed_bytes as f64);
        }
        self.prefix_hit_bytes.observe(matched_bytes as f64);
    }

    fn observe_index_size(&self, entries: usize) {
        self.prefix_indexer_size.set(entries as i64);
    }
}
