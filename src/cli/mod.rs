//! epp's command line: the flags of the Go EPP (GIE v1.x and llm-d-router), spelled and
//! defaulted as they are there, in the forms Go programs accept (`--flag value`,
//! `--flag=value`, `--bool`, `--bool=false`, values wrapped in literal quotes as Helm charts
//! pass them), plus epp's own. [`compat`] holds the parsers for those forms and the list of
//! Go flags that epp accepts without having the feature (each logged once at start-up).

pub mod compat;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::{discovery, duration, tls};
use compat::{go_string, port_list, size};

/// Endpoint Picker for LLM inference gateways (Envoy ext_proc). Flag names follow the Go EPP.
#[derive(Debug, Clone, Parser)]
#[command(name = "epp", version, about, args_override_self = true)]
pub struct Cli {
    // ---- Servers ----
    /// ext_proc gRPC port.
    #[arg(long, default_value_t = 9002)]
    pub grpc_port: u16,
    /// gRPC health port (grpc.health.v1).
    #[arg(long, default_value_t = 9003)]
    pub grpc_health_port: u16,
    /// Prometheus metrics port (`/metrics`).
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Address the servers bind to.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// Also serve gRPC health on the ext_proc port.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub health_checking: bool,
    /// Largest gRPC message accepted on the ext_proc port (e.g. `10MiB`, `25MB`; default: the
    /// body limit plus 1 MiB).
    #[arg(long, value_parser = size)]
    pub grpc_max_recv_msg_size: Option<usize>,
    /// Largest gRPC message sent on the ext_proc port (default: as received).
    #[arg(long, value_parser = size)]
    pub grpc_max_send_msg_size: Option<usize>,
    /// On SIGTERM, how long in-flight requests may run before epp exits.
    #[arg(long, default_value = "60s", value_parser = duration::parse)]
    pub drain_timeout: Duration,
    /// Threads serving ext_proc connections (each connection stays on one thread); default:
    /// the number of CPUs.
    #[arg(long)]
    pub ext_proc_threads: Option<usize>,

    // ---- TLS ----
    /// Serve ext_proc over TLS (a self-signed certificate unless --cert-path is given);
    /// `--secure-serving=false` for plaintext.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = true, default_missing_value = "true")]
    pub secure_serving: bool,
    /// Directory holding tls.crt and tls.key (e.g. a mounted TLS secret).
    #[arg(long, value_parser = go_string)]
    pub cert_path: Option<String>,
    /// Re-read the certificate from --cert-path when its files change.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub enable_cert_reload: bool,
    /// Lowest TLS version accepted: `VersionTLS12` (default) or `VersionTLS13`.
    #[arg(long, value_parser = go_string)]
    pub tls_min_version: Option<String>,
    /// PEM CA bundle: ext_proc clients (Envoy) must present a certificate it signed (mutual
    /// TLS). Needs --secure-serving.
    #[arg(long)]
    pub client_ca_path: Option<PathBuf>,
    /// Write a local CA, epp's certificate (tls.crt/tls.key, for --cert-path) and a client
    /// certificate for Envoy (client.crt/client.key) into this directory, then exit.
    #[arg(long, value_name = "DIR")]
    pub write_certs: Option<PathBuf>,
    /// Names and addresses epp's certificate is valid for (with --write-certs).
    #[arg(long, value_delimiter = ',', default_values_t = tls::DEFAULT_HOSTS.map(String::from))]
    pub cert_hosts: Vec<String>,

    // ---- Configuration ----
    /// EndpointPickerConfig file (plugins and scheduling profiles); overrides the scheduler
    /// environment variables.
    #[arg(long, value_parser = go_string)]
    pub config_file: Option<String>,
    /// EndpointPickerConfig as text (instead of --config-file).
    #[arg(long, value_parser = go_string)]
    pub config_text: Option<String>,

    // ---- Endpoints ----
    /// Static endpoints, `ip:port,ip:port…` (no Kubernetes).
    #[arg(long, env = "EPP_ENDPOINTS")]
    pub endpoints: Option<String>,
    /// Static endpoints file (YAML; reloaded when it changes).
    #[arg(long)]
    pub endpoints_file: Option<PathBuf>,
    /// InferencePool to follow (Kubernetes discovery); also labels the pool metrics.
    #[arg(long, value_parser = go_string)]
    pub pool_name: Option<String>,
    /// Namespace of the InferencePool (or of the pods with --endpoint-selector).
    #[arg(long, env = "NAMESPACE", default_value = "default", value_parser = go_string)]
    pub pool_namespace: String,
    /// API group of the InferencePool: inference.networking.k8s.io (v1) or
    /// inference.networking.x-k8s.io (v1alpha2).
    #[arg(long, default_value = discovery::kube::GROUP_V1, value_parser = go_string)]
    pub pool_group: String,
    /// Pods to route to, by label selector (`app=vllm,tier in (a,b)`), without an
    /// InferencePool; needs --endpoint-target-ports.
    #[arg(long, value_parser = go_string)]
    pub endpoint_selector: Option<String>,
    /// Model-server ports on each selected pod (1 to 8), with --endpoint-selector.
    #[arg(long, value_parser = port_list, action = ArgAction::Append)]
    pub endpoint_target_ports: Vec<Vec<u16>>,
    /// Ignore the subset hint (`x-gateway-destination-endpoint-subset`) Envoy may send.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub disable_endpoint_subset_filter: bool,
    /// Kubeconfig file (default: in-cluster, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG", value_parser = go_string)]
    pub kubeconfig: Option<String>,
    /// Leader election across replicas with a Lease (only the leader reports ready);
    /// needs Kubernetes discovery.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub ha_enable_leader_election: bool,
    /// The Lease leader election uses (default `<pool-name>-epp-leader`; with
    /// --endpoint-selector, `epp-<hash of the selector>-leader`).
    #[arg(long, value_parser = go_string)]
    pub lease_name: Option<String>,

    // ---- Model-server metrics ----
    /// Model-server metrics scrape interval.
    #[arg(long, default_value = "50ms", value_parser = duration::parse)]
    pub refresh_metrics_interval: Duration,
    /// Accepted for compatibility with the Go EPP; epp computes its pool gauges whenever its
    /// /metrics is scraped, so they are never older than the scrape.
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    pub refresh_prometheus_metrics_interval: Duration,
    /// Age after which an endpoint's metrics are stale.
    #[arg(long, default_value = "2s", value_parser = duration::parse)]
    pub metrics_staleness_threshold: Duration,
    /// Scheme of the model servers' metrics endpoint: http or https.
    #[arg(long, value_parser = go_string)]
    pub model_server_metrics_scheme: Option<String>,
    /// Path of the model servers' metrics endpoint.
    #[arg(long, value_parser = go_string)]
    pub model_server_metrics_path: Option<String>,
    /// Port of the model servers' metrics endpoint (default: the serving port).
    #[arg(long)]
    pub model_server_metrics_port: Option<u16>,
    /// With https, do not verify the model servers' certificates.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub model_server_metrics_https_insecure_skip_verify: Option<bool>,
    /// Metric of waiting requests (`name` or `name{label=value}`) for the default engine.
    #[arg(long, value_parser = go_string)]
    pub total_queued_requests_metric: Option<String>,
    /// Metric of running requests for the default engine.
    #[arg(long, value_parser = go_string)]
    pub total_running_requests_metric: Option<String>,
    /// Metric of KV-cache use (0–1) for the default engine.
    #[arg(long, value_parser = go_string)]
    pub kv_cache_usage_percentage_metric: Option<String>,
    /// LoRA info metric for the default engine (empty: none).
    #[arg(long, value_parser = go_string)]
    pub lora_info_metric: Option<String>,
    /// Cache config info metric for the default engine (empty: none).
    #[arg(long, value_parser = go_string)]
    pub cache_info_metric: Option<String>,

    // ---- Passive health (outlier detection) ----
    /// Server errors (5xx, Envoy's 502/503/504 for failed connections included) in a row
    /// that eject an endpoint from routing; 0 turns ejection off.
    #[arg(long, default_value_t = 5)]
    pub outlier_consecutive_5xx: u32,
    /// First ejection's length; each ejection in a row lasts this much longer.
    #[arg(long, default_value = "30s", value_parser = duration::parse)]
    pub outlier_base_ejection_time: Duration,
    /// Longest ejection.
    #[arg(long, default_value = "300s", value_parser = duration::parse)]
    pub outlier_max_ejection_time: Duration,
    /// Largest share of the pool ejected at once, in percent (at least one endpoint of two
    /// or more, never all).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub outlier_max_ejection_percent: u32,

    // ---- Requests ----
    /// Largest request body accepted (bytes); larger ones get 413.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_request_body_bytes: usize,
    /// Request-body bytes held at once across all requests; past it requests get 429.
    #[arg(long, default_value_t = 256 << 20)]
    pub max_inflight_body_bytes: usize,
    /// InferenceObjective list (YAML) for static mode: objective name → priority.
    #[arg(long)]
    pub objectives_file: Option<PathBuf>,

    // ---- Observability ----
    /// Distinct model names that label request metrics; later names are counted as `other`
    /// (names come from requests, and every label value is a series kept forever).
    #[arg(long, default_value_t = crate::telemetry::cardinality::DEFAULT_MAX_VALUES)]
    pub max_model_label_values: usize,
    /// Require a Kubernetes bearer token allowed to GET /metrics (TokenReview and
    /// SubjectAccessReview), as the Go EPP does; Kubernetes mode only.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub metrics_endpoint_auth: bool,
    /// File holding a bearer token /metrics requires (static mode; re-read on change).
    #[arg(long)]
    pub metrics_bearer_token_file: Option<PathBuf>,
    /// Log verbosity as the Go EPP counts it (0–2 info, 3–4 debug, 5+ trace); RUST_LOG
    /// overrides.
    #[arg(short = 'v', long = "v", default_value_t = 2)]
    pub verbosity: u8,
    /// Log level: trace, debug, info, warn or error (overrides -v).
    #[arg(long, value_parser = go_string)]
    pub log_level: Option<String>,
    /// zap's encoder: `json` (one JSON object per line) or `console`.
    #[arg(long, value_parser = go_string)]
    pub zap_encoder: Option<String>,
    /// zap's level: debug, info, error, panic, or a number (−N is V(N)).
    #[arg(long, value_parser = go_string)]
    pub zap_log_level: Option<String>,
    /// zap's development mode: console output and debug level.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub zap_devel: Option<bool>,
    /// zap's time encoding: epoch, millis, nano, iso8601, rfc3339 or rfc3339nano.
    #[arg(long, value_parser = go_string)]
    pub zap_time_encoding: Option<String>,
    /// zap's stack-trace level (accepted; epp logs no stack traces).
    #[arg(long, value_parser = go_string)]
    pub zap_stacktrace_level: Option<String>,

    // ---- Go EPP flags epp accepts without the feature (one warning each) ----
    /// OpenTelemetry tracing (not in epp).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub tracing: Option<bool>,
    /// Go pprof handlers (not in epp).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enable_pprof: Option<bool>,
    /// Per-endpoint scores in a response header (not in epp).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub emit_endpoint_scores: Option<bool>,
    /// gRPC stream metrics (not in epp).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enable_grpc_stream_metrics: Option<bool>,
    /// Experimental plugins (epp has no experimental plugin gate).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_experimental_plugins: Option<bool>,
    /// TLS cipher suites (epp uses rustls' defaults).
    #[arg(long, value_parser = go_string)]
    pub tls_cipher_suites: Option<String>,
    /// Client CA for the metrics port (metrics are served in plaintext).
    #[arg(long, value_parser = go_string)]
    pub metrics_client_ca_file: Option<String>,
    /// Certificate directory for the metrics port (metrics are served in plaintext).
    #[arg(long, value_parser = go_string)]
    pub metrics_cert_dir: Option<String>,
}

impl Cli {
    /// The ports given with --endpoint-target-ports, flattened, duplicates dropped.
    pub fn target_ports(&self) -> Vec<u16> {
        let mut out: Vec<u16> = Vec::new();
        for p in self.endpoint_target_ports.iter().flatten() {
            if !out.contains(p) {
                out.push(*p);
            }
        }
        out
    }

    /// Checks combinations the parser cannot; each error names the flags.
    pub fn validate(&self) -> Result<(), String> {
        if self.refresh_metrics_interval.is_zero() {
            return Err("--refresh-metrics-interval must be greater than 0".into());
        }
        if self.config_file.is_some() && self.config_text.is_some() {
            return Err("give --config-file or --config-text, not both".into());
        }
        if self.pool_name.is_some() && self.endpoint_selector.is_some() {
            return Err("give --pool-name or --endpoint-selector, not both".into());
        }
        if self.endpoint_selector.is_some() && !(1..=8).contains(&self.target_ports().len()) {
            return Err(
                "--endpoint-target-ports needs 1 to 8 ports with --endpoint-selector".into(),
            );
        }
        if let Some(s) = &self.model_server_metrics_scheme
            && s != "http"
            && s != "https"
        {
            return Err(format!(
                "--model-server-metrics-scheme must be http or https, not {s:?}"
            ));
        }
        if self.ha_enable_leader_election
            && self.pool_name.is_none()
            && self.endpoint_selector.is_none()
        {
            return Err(
                "--ha-enable-leader-election needs Kubernetes discovery (--pool-name or --endpoint-selector)"
                    .into(),
            );
        }
        if !self.secure_serving && self.client_ca_path.is_some() {
            return Err("--client-ca-path needs --secure-serving".into());
        }
        Ok(())
    }
}
