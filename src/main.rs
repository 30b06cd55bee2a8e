//! `epp`: parse config → build datastore → start discovery and scrapers → build scheduler →
//! serve ext_proc and metrics → wait for shutdown.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{ArgAction, Parser};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use epp::config::env::SchedulerEnv;
use epp::config::{endpoints_file, picker_config};
use epp::datastore::Datastore;
use epp::director::Director;
use epp::extproc::body::BodyBudget;
use epp::extproc::serve::{self, ServeOptions};
use epp::extproc::{ExtProcService, Limits, Shared};
use epp::request::ScanLimits;
use epp::scheduling::PluginTimer;
use epp::scheduling::plugins::prefix::PrefixObserver;
use epp::telemetry::endpoints::EndpointCollector;
use epp::telemetry::process::ProcessCollector;
use epp::telemetry::{self, Metrics};
use epp::{discovery, duration, leader, scrape, tls};

#[cfg(feature = "alloc-stats")]
#[global_allocator]
static ALLOCATOR: epp::telemetry::alloc::Counting = epp::telemetry::alloc::Counting;

#[cfg(not(feature = "alloc-stats"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long one decision's candidate list serves the next ones (metrics lag by at most this
/// much more than their scrape; epp's own load accounting is read live).
const CANDIDATE_REUSE: Duration = Duration::from_millis(5);

/// Endpoint Picker for LLM inference gateways (Envoy ext_proc). Flag names follow the Go EPP.
#[derive(Debug, Parser)]
#[command(name = "epp", version, about)]
struct Cli {
    /// ext_proc gRPC port.
    #[arg(long, default_value_t = 9002)]
    grpc_port: u16,
    /// gRPC health port (grpc.health.v1).
    #[arg(long, default_value_t = 9003)]
    grpc_health_port: u16,
    /// Prometheus metrics port (`/metrics`).
    #[arg(long, default_value_t = 9090)]
    metrics_port: u16,
    /// Address the servers bind to.
    #[arg(long, default_value = "0.0.0.0")]
    bind_address: IpAddr,
    /// Serve ext_proc over TLS (a self-signed certificate unless --cert-path is given);
    /// `--secure-serving=false` for plaintext.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = true, default_missing_value = "true")]
    secure_serving: bool,
    /// Directory holding tls.crt and tls.key (e.g. a mounted TLS secret).
    #[arg(long)]
    cert_path: Option<PathBuf>,
    /// PEM CA bundle: ext_proc clients (Envoy) must present a certificate it signed (mutual
    /// TLS). Needs --secure-serving.
    #[arg(long)]
    client_ca_path: Option<PathBuf>,
    /// Write a local CA, epp's certificate (tls.crt/tls.key, for --cert-path) and a client
    /// certificate for Envoy (client.crt/client.key) into this directory, then exit.
    #[arg(long, value_name = "DIR")]
    write_certs: Option<PathBuf>,
    /// Names and addresses epp's certificate is valid for (with --write-certs).
    #[arg(long, value_delimiter = ',', default_values_t = tls::DEFAULT_HOSTS.map(String::from))]
    cert_hosts: Vec<String>,
    /// EndpointPickerConfig file (plugins and scheduling profiles); overrides the scheduler
    /// environment variables.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// EndpointPickerConfig as text (instead of --config-file).
    #[arg(long)]
    config_text: Option<String>,
    /// Static endpoints, `ip:port,ip:port…` (no Kubernetes).
    #[arg(long, env = "EPP_ENDPOINTS")]
    endpoints: Option<String>,
    /// Static endpoints file (YAML; reloaded when it changes).
    #[arg(long)]
    endpoints_file: Option<PathBuf>,
    /// InferencePool to follow (Kubernetes discovery); also labels the pool metrics.
    #[arg(long)]
    pool_name: Option<String>,
    /// Namespace of the InferencePool.
    #[arg(long, env = "NAMESPACE", default_value = "default")]
    pool_namespace: String,
    /// API group of the InferencePool: inference.networking.k8s.io (v1) or
    /// inference.networking.x-k8s.io (v1alpha2).
    #[arg(long, default_value = discovery::kube::GROUP_V1)]
    pool_group: String,
    /// Model-server metrics scrape interval.
    #[arg(long, default_value = "50ms", value_parser = duration::parse)]
    refresh_metrics_interval: Duration,
    /// Accepted for compatibility with the Go EPP; epp computes its pool gauges whenever its
    /// /metrics is scraped, so they are never older than the scrape.
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    refresh_prometheus_metrics_interval: Duration,
    /// Age after which an endpoint's metrics are stale.
    #[arg(long, default_value = "2s", value_parser = duration::parse)]
    metrics_staleness_threshold: Duration,
    /// Largest request body accepted (bytes); larger ones get 413.
    #[arg(long, default_value_t = 32 << 20)]
    max_request_body_bytes: usize,
    /// Distinct model names that label request metrics; later names are counted as `other`
    /// (names come from requests, and every label value is a series kept forever).
    #[arg(long, default_value_t = epp::telemetry::cardinality::DEFAULT_MAX_VALUES)]
    max_model_label_values: usize,
    /// Threads serving ext_proc connections (each connection stays on one thread); default:
    /// the number of CPUs.
    #[arg(long)]
    ext_proc_threads: Option<usize>,
    /// Request-body bytes held at once across all requests; past it requests get 429.
    #[arg(long, default_value_t = 256 << 20)]
    max_inflight_body_bytes: usize,
    /// Leader election across replicas with a Lease (only the leader reports ready);
    /// needs --pool-name.
    #[arg(long)]
    ha_enable_leader_election: bool,
    /// Log verbosity (0 info, 1–2 debug, 3+ trace); RUST_LOG overrides.
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    verbosity: u8,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_tracing(cli.verbosity);
    if let Some(dir) = &cli.write_certs {
        tls::write_bundle(dir, &cli.cert_hosts)?;
        println!(
            "wrote ca.crt, tls.crt, tls.key, client.crt, client.key to {}",
            dir.display()
        );
        return Ok(());
    }
    if cli.ha_enable_leader_election && cli.pool_name.is_none() {
        bail!("--ha-enable-leader-election needs --pool-name (a Kubernetes pool)");
    }

    if cli.refresh_metrics_interval.is_zero() {
        bail!("--refresh-metrics-interval must be greater than 0");
    }

    // Configuration → scheduler (config file over environment).
    let datastore = Arc::new(Datastore::new());
    let budget = BodyBudget::new(cli.max_inflight_body_bytes);
    let metrics = Metrics::new(
        cli.pool_name.as_deref().unwrap_or("static"),
        vec![
            Box::new(EndpointCollector::new(
                datastore.clone(),
                cli.metrics_staleness_threshold,
            )),
            Box::new(ProcessCollector::new(budget.clone())),
        ],
        cli.max_model_label_values,
    );
    let observer = Some(metrics.clone() as Arc<dyn PrefixObserver>);
    let env = SchedulerEnv::from_env()?;
    let scheduler = match picker_config::load(
        cli.config_file.as_deref(),
        cli.config_text.as_deref(),
        observer.clone(),
    )? {
        Some(s) => s.with_saturation(env.saturation()),
        None => env.build_observed(observer),
    };
    let scheduler = Arc::new(scheduler.with_timer(metrics.clone() as Arc<dyn PluginTimer>));
    scheduler
        .record_in_background()
        .context("starting the prefix index recorder")?;
    tracing::info!(profile = ?scheduler.profile(), "scheduler configured");

    // Discovery.
    for observer in scheduler.endpoint_observers() {
        datastore.add_observer(observer);
    }
    let (_discovery, leader) = start_discovery(&cli, &datastore).await?;
    tokio::spawn(reconcile_indexes(scheduler.clone(), datastore.clone()));
    let _scrapers = scrape::spawn(
        datastore.clone(),
        scrape::ScrapeConfig {
            interval: cli.refresh_metrics_interval,
            ..Default::default()
        },
    );

    // Servers.
    let metrics_listener = TcpListener::bind(SocketAddr::new(cli.bind_address, cli.metrics_port))
        .await
        .context("binding the metrics port")?;
    tracing::info!(address = %metrics_listener.local_addr()?, "metrics server listening");
    let metrics_server = tokio::spawn(telemetry::serve_metrics(
        metrics_listener,
        metrics.clone(),
        datastore.clone(),
    ));

    let director = Arc::new(
        Director::new(
            datastore.clone(),
            scheduler,
            cli.metrics_staleness_threshold,
        )
        .with_candidate_reuse(CANDIDATE_REUSE),
    );
    let limits = Limits {
        max_body_bytes: cli.max_request_body_bytes,
        scan: ScanLimits {
            prompt_cap: director.scheduler.prompt_cap(),
            ..ScanLimits::default()
        },
    };
    let service = ExtProcService::new(Shared {
        budget,
        ..Shared::new(director, Some(metrics), limits)
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let health_listener =
        TcpListener::bind(SocketAddr::new(cli.bind_address, cli.grpc_health_port))
            .await
            .context("binding the health port")?;
    tracing::info!(address = %health_listener.local_addr()?, "health server listening");
    tokio::spawn(telemetry::health::maintain(
        health_reporter,
        datastore.clone(),
        move || leader.as_ref().is_none_or(|l| l.load(Ordering::Acquire)),
    ));
    let health_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming(TcpIncoming::from(health_listener).with_nodelay(Some(true))),
    );

    let grpc_listener = TcpListener::bind(SocketAddr::new(cli.bind_address, cli.grpc_port))
        .await
        .context("binding the ext_proc port")?;
    let tls = server_tls(&cli)?;
    let threads = cli.ext_proc_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    tracing::info!(
        address = %grpc_listener.local_addr()?,
        tls = cli.secure_serving,
        threads,
        "ext_proc server listening"
    );
    let options = ServeOptions {
        threads,
        tls,
        keepalive: Duration::from_secs(30),
    };
    serve::serve(grpc_listener, service, options, shutdown_signal())
        .await
        .context("ext_proc server")?;
    metrics_server.abort();
    health_server.abort();
    tracing::info!("epp stopped");
    Ok(())
}

/// The ext_proc TLS configuration the flags ask for (`None`: plaintext).
fn server_tls(cli: &Cli) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    if !cli.secure_serving {
        if cli.client_ca_path.is_some() {
            bail!("--client-ca-path needs --secure-serving");
        }
        return Ok(None);
    }
    let pair = match &cli.cert_path {
        Some(dir) => tls::from_dir(dir)?,
        None => tls::self_signed()?,
    };
    let client_ca = cli
        .client_ca_path
        .as_deref()
        .map(tls::read_pem)
        .transpose()?;
    Ok(Some(tls::server_config(&pair, client_ca.as_deref())))
}

/// Starts the endpoint source the flags name; returns its task and, with leader election,
/// the flag telling whether this replica leads.
async fn start_discovery(
    cli: &Cli,
    datastore: &Arc<Datastore>,
) -> anyhow::Result<(Option<JoinHandle<()>>, Option<Arc<AtomicBool>>)> {
    match (&cli.endpoints, &cli.endpoints_file, &cli.pool_name) {
        (Some(_), Some(_), _) => bail!("give either --endpoints or --endpoints-file, not both"),
        (Some(list), None, _) => {
            discovery::static_::install_list(datastore, endpoints_file::parse_list(list)?);
            Ok((None, None))
        }
        (None, Some(path), _) => Ok((
            Some(discovery::static_::watch_file(
                datastore.clone(),
                path.clone(),
            )?),
            None,
        )),
        (None, None, Some(name)) => {
            let pool = discovery::kube::PoolRef {
                name: name.clone(),
                namespace: cli.pool_namespace.clone(),
                group: cli.pool_group.clone(),
            };
            pool.api_resource()?;
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            let mut leader = None;
            if cli.ha_enable_leader_election {
                let identity = std::env::var("POD_NAME")
                    .or_else(|_| std::env::var("HOSTNAME"))
                    .unwrap_or_else(|_| format!("epp-{:08x}", fastrand::u32(..)));
                let elector = leader::Elector::new(
                    kube::Api::namespaced(client.clone(), &pool.namespace),
                    leader::lease_name(&pool.name),
                    identity,
                    leader::Timing::default(),
                );
                leader = Some(elector.leader_flag());
                tokio::spawn(elector.run());
            }
            let task = tokio::spawn(discovery::kube::run(client, pool, datastore.clone()));
            Ok((Some(task), leader))
        }
        (None, None, None) => bail!(
            "no endpoint source: pass --pool-name (Kubernetes), --endpoints or --endpoints-file"
        ),
    }
}

/// Every 30 s, drops from the prefix indexes any endpoint the datastore no longer has (a
/// safety net behind the removal notifications).
async fn reconcile_indexes(scheduler: Arc<epp::scheduling::Scheduler>, datastore: Arc<Datastore>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let live: Vec<u32> = datastore.endpoints().iter().map(|e| e.id).collect();
        scheduler.reconcile(&live);
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
