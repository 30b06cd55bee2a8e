//! `epp`: the Endpoint Picker server. Flags follow the Go EPP (see `epp::cli`).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use epp::cli::{Cli, compat};
use epp::config::datalayer::DataLayer;
use epp::config::env::SchedulerEnv;
use epp::config::{endpoints_file, picker_config};
use epp::datastore::{Datastore, OutlierPolicy};
use epp::director::Director;
use epp::extproc::body::BodyBudget;
use epp::extproc::serve::{self, ServeOptions};
use epp::extproc::{ExtProcService, Limits, Shared};
use epp::objectives::Policy;
use epp::request::ScanLimits;
use epp::scheduling::plugins::prefix::PrefixObserver;
use epp::scheduling::{PluginTimer, Scheduler};
use epp::scrape::mapping::{LegacyNames, Mappings};
use epp::scrape::{MetricsTarget, ScrapeConfig};
use epp::telemetry::endpoints::EndpointCollector;
use epp::telemetry::health::{HealthService, HealthState};
use epp::telemetry::logging::{self, LogOptions};
use epp::telemetry::process::ProcessCollector;
use epp::telemetry::{self, Metrics, MetricsAuth};
use epp::{discovery, leader, scrape, tls};

#[cfg(feature = "alloc-stats")]
#[global_allocator]
static ALLOCATOR: epp::telemetry::alloc::Counting = epp::telemetry::alloc::Counting;

#[cfg(not(feature = "alloc-stats"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long one decision's candidate list serves the next ones (metrics lag by at most this
/// much more than their scrape; epp's own load accounting is read live).
const CANDIDATE_REUSE: Duration = Duration::from_millis(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log = LogOptions::from_flags(
        cli.verbosity,
        cli.log_level.as_deref(),
        cli.zap_log_level.as_deref(),
        cli.zap_devel,
        cli.zap_encoder.as_deref(),
        cli.zap_time_encoding.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    logging::init(&log);
    if let Some(dir) = &cli.write_certs {
        tls::write_bundle(dir, &cli.cert_hosts)?;
        println!(
            "wrote ca.crt, tls.crt, tls.key, client.crt, client.key to {}",
            dir.display()
        );
        return Ok(());
    }
    cli.validate().map_err(anyhow::Error::msg)?;
    for (flag, note) in compat::unsupported(&cli) {
        tracing::warn!(flag, "flag accepted without effect: {note}");
    }
    run(cli).await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let datastore = Arc::new(Datastore::new());
    let budget = BodyBudget::new(cli.max_inflight_body_bytes);
    let kube_mode = cli.pool_name.is_some() || cli.endpoint_selector.is_some();
    let metrics = Metrics::new(
        cli.pool_name.as_deref().unwrap_or("static"),
        if kube_mode { &cli.pool_namespace } else { "" },
        vec![
            Box::new(EndpointCollector::new(
                datastore.clone(),
                cli.metrics_staleness_threshold,
            )),
            Box::new(ProcessCollector::new(budget.clone())),
        ],
        cli.max_model_label_values,
    );
    let (scheduler, data_layer) = scheduler(&cli, &metrics)?;
    tracing::info!(profile = ?scheduler.profile(), "scheduler configured");
    let scrape_config = scrape_config(&cli, data_layer)?;
    for observer in scheduler.endpoint_observers() {
        datastore.add_observer(observer);
    }

    // Endpoints, request policy, scrapes.
    let kube = if kube_mode {
        Some(kube_client(&cli).await?)
    } else {
        None
    };
    let policy = Policy::new();
    let (_discovery, leader) =
        start_discovery(&cli, &datastore, kube.clone(), &scrape_config.mappings)?;
    let _policy_task = start_policy(&cli, kube.clone(), &policy)?;
    tokio::spawn(reconcile_indexes(scheduler.clone(), datastore.clone()));
    let _scrapers = scrape::spawn(datastore.clone(), scrape_config);

    // Servers.
    let health = HealthState::new(datastore.clone(), leader);
    tokio::spawn(telemetry::health::log_changes(health.clone()));
    let metrics_server = serve_metrics(&cli, metrics.clone(), datastore.clone(), kube).await?;
    let health_server = serve_health(&cli, health.clone()).await?;
    let service = ext_proc_service(&cli, scheduler, datastore, metrics, budget, policy);
    let grpc_listener = TcpListener::bind(SocketAddr::new(cli.bind_address, cli.grpc_port))
        .await
        .context("binding the ext_proc port")?;
    let options = serve_options(&cli, &health)?;
    tracing::info!(
        address = %grpc_listener.local_addr()?,
        tls = cli.secure_serving,
        threads = options.threads,
        "ext_proc server listening"
    );
    let drain = health.clone();
    serve::serve(grpc_listener, service, options, async move {
        shutdown_signal().await;
        drain.start_draining();
    })
    .await
    .context("ext_proc server")?;
    metrics_server.abort();
    health_server.abort();
    tracing::info!("epp stopped");
    Ok(())
}

/// The scheduler from the config file (or the environment), and what the config says about
/// scraping.
fn scheduler(cli: &Cli, metrics: &Arc<Metrics>) -> anyhow::Result<(Arc<Scheduler>, DataLayer)> {
    let observer = Some(metrics.clone() as Arc<dyn PrefixObserver>);
    let (scheduler, data_layer) = match picker_config::load(
        cli.config_file.as_deref().map(std::path::Path::new),
        cli.config_text.as_deref(),
        observer.clone(),
    )? {
        Some(c) => (c.scheduler, c.data_layer),
        None => (
            SchedulerEnv::from_env()?.build_observed(observer),
            DataLayer::default(),
        ),
    };
    let scheduler = Arc::new(scheduler.with_timer(metrics.clone() as Arc<dyn PluginTimer>));
    scheduler.record_after_reply();
    Ok((scheduler, data_layer))
}

/// Where and how model-server metrics are scraped: the config's `metrics-data-source` and
/// `core-metrics-extractor`, else the flags, else the defaults.
fn scrape_config(cli: &Cli, data_layer: DataLayer) -> anyhow::Result<ScrapeConfig> {
    let source = data_layer.source.unwrap_or_default();
    let target = MetricsTarget {
        https: source
            .https
            .unwrap_or(cli.model_server_metrics_scheme.as_deref() == Some("https")),
        path: source
            .path
            .or_else(|| cli.model_server_metrics_path.clone())
            .unwrap_or_else(|| "/metrics".into()),
        port: cli.model_server_metrics_port,
        insecure_skip_verify: source
            .insecure_skip_verify
            .or(cli.model_server_metrics_https_insecure_skip_verify)
            .unwrap_or(true),
    };
    let legacy = LegacyNames {
        queued: cli.total_queued_requests_metric.clone(),
        running: cli.total_running_requests_metric.clone(),
        kv_usage: cli.kv_cache_usage_percentage_metric.clone(),
        lora: cli.lora_info_metric.clone(),
        cache_info: cli.cache_info_metric.clone(),
    };
    let mappings = data_layer
        .mappings
        .unwrap_or_default()
        .with_legacy(&legacy)
        .context("legacy metric flags")?;
    let interval = source.interval.unwrap_or(cli.refresh_metrics_interval);
    Ok(ScrapeConfig {
        interval,
        target,
        staleness: cli.metrics_staleness_threshold,
        mappings: Arc::new(mappings),
        ..ScrapeConfig::default()
    })
}

fn ext_proc_service(
    cli: &Cli,
    scheduler: Arc<Scheduler>,
    datastore: Arc<Datastore>,
    metrics: Arc<Metrics>,
    budget: Arc<BodyBudget>,
    policy: Arc<Policy>,
) -> ExtProcService {
    let prompt_cap = scheduler.prompt_cap();
    let director = Arc::new(
        Director::new(datastore, scheduler, cli.metrics_staleness_threshold)
            .with_candidate_reuse(CANDIDATE_REUSE)
            .with_outlier_policy(OutlierPolicy {
                consecutive_5xx: cli.outlier_consecutive_5xx,
                base_ejection_time: cli.outlier_base_ejection_time,
                max_ejection_time: cli.outlier_max_ejection_time,
                max_ejection_percent: cli.outlier_max_ejection_percent,
            }),
    );
    let limits = Limits {
        max_body_bytes: cli.max_request_body_bytes,
        scan: ScanLimits {
            prompt_cap,
            digests: director.scheduler.digest_hasher(),
            ..ScanLimits::default()
        },
        max_recv_message: cli.grpc_max_recv_msg_size,
        max_send_message: cli.grpc_max_send_msg_size,
    };
    ExtProcService::new(Shared {
        budget,
        policy,
        ignore_subset_hint: cli.disable_endpoint_subset_filter,
        ..Shared::new(director, Some(metrics), limits)
    })
}

fn serve_options(cli: &Cli, health: &Arc<HealthState>) -> anyhow::Result<ServeOptions> {
    let tls = if cli.secure_serving {
        let tls13_only = cli
            .tls_min_version
            .as_deref()
            .map(tls::parse_min_version)
            .transpose()
            .map_err(anyhow::Error::msg)?
            .unwrap_or(false);
        let options = tls::ServerTlsOptions {
            cert: match &cli.cert_path {
                Some(dir) => tls::CertSource::Dir {
                    path: dir.into(),
                    reload: cli.enable_cert_reload,
                },
                None => tls::CertSource::SelfSigned,
            },
            client_ca: cli
                .client_ca_path
                .as_deref()
                .map(tls::read_pem)
                .transpose()?,
            tls13_only,
        };
        Some(tls::server_acceptor(&options)?)
    } else {
        None
    };
    Ok(ServeOptions {
        threads: cli.ext_proc_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
        tls,
        keepalive: Duration::from_secs(30),
        health: cli.health_checking.then(|| health.clone()),
        drain_timeout: cli.drain_timeout,
    })
}

async fn serve_metrics(
    cli: &Cli,
    metrics: Arc<Metrics>,
    datastore: Arc<Datastore>,
    kube: Option<kube::Client>,
) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
    let listener = TcpListener::bind(SocketAddr::new(cli.bind_address, cli.metrics_port))
        .await
        .context("binding the metrics port")?;
    let auth = match (
        &cli.metrics_bearer_token_file,
        cli.metrics_endpoint_auth,
        kube,
    ) {
        (Some(path), _, _) => MetricsAuth::Token(path.clone()),
        (None, true, Some(client)) => MetricsAuth::kubernetes(client),
        (None, true, None) => {
            tracing::warn!(
                "--metrics-endpoint-auth needs Kubernetes discovery; /metrics is open (use --metrics-bearer-token-file)"
            );
            MetricsAuth::Open
        }
        (None, false, _) => MetricsAuth::Open,
    };
    tracing::info!(address = %listener.local_addr()?, auth = ?auth, "metrics server listening");
    Ok(tokio::spawn(telemetry::serve_metrics(
        listener, metrics, datastore, auth,
    )))
}

async fn serve_health(
    cli: &Cli,
    health: Arc<HealthState>,
) -> anyhow::Result<JoinHandle<Result<(), tonic::transport::Error>>> {
    let listener = TcpListener::bind(SocketAddr::new(cli.bind_address, cli.grpc_health_port))
        .await
        .context("binding the health port")?;
    tracing::info!(address = %listener.local_addr()?, "health server listening");
    Ok(tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HealthService::server(health))
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
    ))
}

async fn kube_client(cli: &Cli) -> anyhow::Result<kube::Client> {
    let config = match &cli.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {path}"))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {path}"))?
        }
        None => kube::Config::infer()
            .await
            .context("finding the Kubernetes API (in-cluster or ~/.kube/config)")?,
    };
    kube::Client::try_from(config).context("connecting to the Kubernetes API")
}

type Discovery = (Option<JoinHandle<()>>, Option<Arc<AtomicBool>>);

/// Starts the endpoint source the flags name; returns its task and, with leader election,
/// the flag telling whether this replica leads.
fn start_discovery(
    cli: &Cli,
    datastore: &Arc<Datastore>,
    kube: Option<kube::Client>,
    mappings: &Mappings,
) -> anyhow::Result<Discovery> {
    if let Some(client) = kube {
        let source = match (&cli.pool_name, &cli.endpoint_selector) {
            (Some(name), _) => {
                let pool = discovery::kube::PoolRef {
                    name: name.clone(),
                    namespace: cli.pool_namespace.clone(),
                    group: cli.pool_group.clone(),
                };
                pool.api_resource()?;
                discovery::kube::Source::Pool(pool)
            }
            (None, Some(selector)) => {
                discovery::kube::Source::Selector(discovery::kube::SelectorRef {
                    namespace: cli.pool_namespace.clone(),
                    selector: selector.clone(),
                    target_ports: cli.target_ports(),
                })
            }
            (None, None) => bail!("Kubernetes discovery needs --pool-name or --endpoint-selector"),
        };
        let leader = cli
            .ha_enable_leader_election
            .then(|| start_leader_election(cli, client.clone()));
        let task = tokio::spawn(discovery::kube::run_source(
            client,
            source,
            datastore.clone(),
            mappings.label_key.clone(),
        ));
        return Ok((Some(task), leader));
    }
    match (&cli.endpoints, &cli.endpoints_file) {
        (Some(_), Some(_)) => bail!("give either --endpoints or --endpoints-file, not both"),
        (Some(list), None) => {
            discovery::static_::install_list(datastore, endpoints_file::parse_list(list)?);
            Ok((None, None))
        }
        (None, Some(path)) => Ok((
            Some(discovery::static_::watch_file(
                datastore.clone(),
                path.clone(),
            )?),
            None,
        )),
        (None, None) => bail!(
            "no endpoint source: pass --pool-name or --endpoint-selector (Kubernetes), --endpoints or --endpoints-file"
        ),
    }
}

fn start_leader_election(cli: &Cli, client: kube::Client) -> Arc<AtomicBool> {
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("epp-{:08x}", fastrand::u32(..)));
    let lease = cli
        .lease_name
        .clone()
        .unwrap_or_else(|| match &cli.pool_name {
            Some(pool) => leader::lease_name(pool),
            None => {
                let selector = cli.endpoint_selector.as_deref().unwrap_or_default();
                let hash = xxhash_rust::xxh3::xxh3_64(selector.as_bytes());
                leader::lease_name(&format!("epp-{:08x}", hash as u32))
            }
        });
    let elector = leader::Elector::new(
        kube::Api::namespaced(client, &cli.pool_namespace),
        lease,
        identity,
        leader::Timing::default(),
    );
    let flag = elector.leader_flag();
    tokio::spawn(elector.run());
    flag
}

/// Keeps the request policy current: watched in Kubernetes mode, read from
/// `--objectives-file` in static mode.
fn start_policy(
    cli: &Cli,
    kube: Option<kube::Client>,
    policy: &Arc<Policy>,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    if let Some(path) = &cli.objectives_file {
        let task = discovery::policy::watch_file(path.clone(), policy.clone())
            .map_err(anyhow::Error::msg)?;
        return Ok(Some(task));
    }
    Ok(kube.map(|client| {
        tokio::spawn(discovery::policy::watch(
            client,
            cli.pool_namespace.clone(),
            cli.pool_name.clone(),
            policy.clone(),
        ))
    }))
}

/// Every 30 s, drops from the prefix indexes any endpoint the datastore no longer has (a
/// safety net behind the removal notifications).
async fn reconcile_indexes(scheduler: Arc<Scheduler>, datastore: Arc<Datastore>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let live: Vec<u32> = datastore.endpoints().iter().map(|e| e.id).collect();
        scheduler.reconcile(&live);
    }
}

/// Resolves at SIGTERM or Ctrl-C (at once if the SIGTERM handler cannot be installed, so
/// that a broken signal setup cannot keep epp from stopping).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGTERM handler; waiting for Ctrl-C");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
