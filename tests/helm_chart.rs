//! deploy/charts/epp rendered by the real Helm engine (helm-python-sdk, installed into .venv
//! by scripts/setup.sh) with values files in the layouts of GIE v1.5.0's inferencepool chart
//! and of llm-d-router's gateway chart; every object parsed as its Kubernetes type; the epp
//! container's arguments parsed by epp's own command line; and one rendering run for real:
//! epp started with exactly the rendered arguments against a mocked Kubernetes API, its
//! probes answered, a request routed through Envoy.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A rendered chart: its objects by `Kind/name`.
struct Rendered {
    objects: HashMap<String, Value>,
}

impl Rendered {
    fn get(&self, key: &str) -> &Value {
        self.objects
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {:?}", self.objects.keys()))
    }

    fn has(&self, key: &str) -> bool {
        self.objects.contains_key(key)
    }

    fn typed<T: serde::de::DeserializeOwned>(&self, key: &str) -> T {
        serde_json::from_value(self.get(key).clone())
            .unwrap_or_else(|e| panic!("{key} does not parse as its Kubernetes type: {e}"))
    }

    fn deployment(&self, release: &str) -> Deployment {
        self.typed(&format!("Deployment/{release}-epp"))
    }

    fn args(&self, release: &str) -> Vec<String> {
        self.deployment(release)
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .containers[0]
            .args
            .clone()
            .unwrap()
    }
}

/// Renders the chart (or returns Helm's error).
fn render_values(values: &Path, release: &str) -> Result<Rendered, String> {
    let python = root().join(".venv/bin/python");
    let out = Command::new(&python)
        .arg(root().join("tests/python/render_chart.py"))
        .arg(root().join("deploy/charts/epp"))
        .arg(values)
        .args([release, "ns"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", python.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    if let Some(e) = result["error"].as_str() {
        return Err(e.to_owned());
    }
    let lint_errors = result["lint"]["errors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(lint_errors.is_empty(), "helm lint: {lint_errors:?}");
    let mut objects = HashMap::new();
    for (template, text) in result["templates"].as_object().unwrap() {
        if template.ends_with("NOTES.txt") {
            continue;
        }
        for doc in text.as_str().unwrap().split("\n---") {
            if doc
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
            {
                continue;
            }
            let v: Value =
                serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{template}: {e}\n{doc}"));
            let key = format!(
                "{}/{}",
                v["kind"].as_str().unwrap(),
                v["metadata"]["name"].as_str().unwrap()
            );
            assert!(objects.insert(key.clone(), v).is_none(), "{key} twice");
        }
    }
    Ok(Rendered { objects })
}

fn render(fixture: &str, release: &str) -> Rendered {
    render_values(&root().join("tests/fixtures/helm").join(fixture), release)
        .unwrap_or_else(|e| panic!("{fixture}: {e}"))
}

/// What every rendering must hold: typed objects, arguments epp accepts, a config epp builds.
fn check_common(r: &Rendered, release: &str) {
    let _: Service = r.typed(&format!("Service/{release}-epp"));
    let _: ServiceAccount = r.typed(&format!("ServiceAccount/{release}-epp"));
    let role: Role = r.typed(&format!("Role/{release}-epp"));
    let _: RoleBinding = r.typed(&format!("RoleBinding/{release}-epp"));
    let reads = role.rules.unwrap();
    assert!(reads.iter().all(|rule| {
        rule.verbs
            .iter()
            .all(|v| ["get", "list", "watch"].contains(&v.as_str()))
    }));
    let d = r.deployment(release);
    let pod = d.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    assert!(
        c.image.as_deref().unwrap().contains("/epp:"),
        "{:?}",
        c.image
    );
    let mut argv = vec!["epp".to_owned()];
    argv.extend(c.args.clone().unwrap());
    let cli = epp::cli::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    cli.validate().unwrap();
    let config_file = cli.config_file.clone().unwrap();
    let file = config_file.strip_prefix("/config/").unwrap();
    let cm: ConfigMap = r.typed(&format!("ConfigMap/{release}-epp"));
    let text = &cm.data.unwrap()[file];
    let loaded = epp::config::picker_config::build_config(text, None)
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(loaded.data_layer.source.is_some() || file != "default-plugins.yaml");
    let probes = [c.liveness_probe.clone(), c.readiness_probe.clone()];
    for p in probes.iter().flatten() {
        assert_eq!(p.grpc.as_ref().unwrap().port, 9003);
    }
}

#[test]
fn gie_default_values_render_epp() {
    let r = render("gie-default.yaml", "vllm-pool");
    check_common(&r, "vllm-pool");
    let args = r.args("vllm-pool");
    assert!(args.windows(2).any(|w| w == ["--pool-name", "vllm-pool"]));
    assert!(!args.iter().any(|a| a == "--ha-enable-leader-election"));
    // The Go EPP's image in the values is replaced by epp's.
    let d = r.deployment("vllm-pool");
    let image = d.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone()
        .unwrap();
    assert!(
        !image.contains("gateway-api-inference-extension"),
        "{image}"
    );
    let pool = r.get("InferencePool/vllm-pool");
    assert_eq!(pool["apiVersion"], "inference.networking.k8s.io/v1");
    assert_eq!(
        pool["spec"]["selector"]["matchLabels"]["app"],
        "vllm-llama3-8b-instruct"
    );
    assert_eq!(pool["spec"]["endpointPickerRef"]["port"]["number"], 9002);
    // No leader election, no metrics auth, no cluster-wide RBAC.
    assert!(!r.has("Role/vllm-pool-epp-leader-election"));
    assert!(!r.objects.keys().any(|k| k.starts_with("ClusterRole")));
}

#[test]
fn gie_sglang_with_replicas_monitoring_and_istio() {
    let r = render("gie-sglang-ha.yaml", "pool");
    check_common(&r, "pool");
    let args = r.args("pool");
    for want in [
        "--ha-enable-leader-election",
        "--metrics-endpoint-auth=true",
        "--refresh-metrics-interval",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
    }
    let d = r.deployment("pool");
    let c = &d.spec.unwrap().template.spec.unwrap().containers[0];
    let service = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .unwrap()
            .grpc
            .as_ref()
            .unwrap()
            .service
            .clone()
            .unwrap()
    };
    assert_eq!(service(&c.liveness_probe), "liveness");
    assert_eq!(service(&c.readiness_probe), "readiness");
    // Leader election may touch only its own Lease.
    let le: Role = r.typed("Role/pool-epp-leader-election");
    let rules = le.rules.unwrap();
    let named = rules
        .iter()
        .find(|rule| rule.verbs.iter().any(|v| v == "update"))
        .unwrap();
    assert_eq!(
        named.resource_names.as_deref(),
        Some(&["pool-epp-leader".to_owned()][..])
    );
    let _: RoleBinding = r.typed("RoleBinding/pool-epp-leader-election");
    let _: ClusterRole = r.typed("ClusterRole/pool-ns-epp");
    let _: ClusterRoleBinding = r.typed("ClusterRoleBinding/pool-ns-epp");
    let _: Secret = r.typed("Secret/metrics-reader");
    let monitor = r.get("ServiceMonitor/pool-epp-monitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "kube-prometheus");
    let cm: ConfigMap = r.typed("ConfigMap/pool-epp");
    let config =
        epp::config::picker_config::build_config(&cm.data.unwrap()["default-plugins.yaml"], None)
            .unwrap();
    assert_eq!(
        config.data_layer.mappings.unwrap().default_mapping().name,
        "sglang"
    );
    assert_eq!(r.get("InferenceObjective/batch")["spec"]["priority"], -1);
    assert_eq!(
        r.get("InferencePool/pool")["spec"]["targetPorts"][1]["number"],
        30001
    );
    assert_eq!(
        r.get("DestinationRule/pool-epp")["spec"]["trafficPolicy"]["connectionPool"]["http"]["maxRequestsPerConnection"],
        256000
    );
    assert_eq!(
        r.get("HTTPRoute/pool")["spec"]["parentRefs"][0]["name"],
        "my-gateway"
    );
}

#[test]
fn gie_trtllm_on_gke_with_the_v1alpha2_pool() {
    let r = render("gie-trtllm-gke.yaml", "trt");
    check_common(&r, "trt");
    let pool = r.get("InferencePool/trt");
    assert_eq!(pool["apiVersion"], "inference.networking.x-k8s.io/v1alpha2");
    assert_eq!(pool["spec"]["targetPortNumber"], 8001);
    let args = r.args("trt");
    assert!(
        args.windows(2)
            .any(|w| w == ["--pool-group", "inference.networking.x-k8s.io"])
    );
    let cm: ConfigMap = r.typed("ConfigMap/trt-epp");
    let config =
        epp::config::picker_config::build_config(&cm.data.unwrap()["default-plugins.yaml"], None)
            .unwrap();
    assert_eq!(
        config.data_layer.source.unwrap().path.as_deref(),
        Some("/prometheus/metrics")
    );
    assert!(r.has("HealthCheckPolicy/trt") && r.has("GCPBackendPolicy/trt"));
}

#[test]
fn gie_standalone_selects_pods_and_restricts_ingress() {
    let r = render("gie-standalone.yaml", "solo");
    check_common(&r, "solo");
    assert!(!r.has("InferencePool/solo"));
    let args = r.args("solo");
    assert!(
        args.windows(2)
            .any(|w| w == ["--endpoint-selector", "app=vllm,tier in (gold,silver)"])
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--lease-name", "solo-epp-leader"])
    );
    let np: NetworkPolicy = r.typed("NetworkPolicy/solo-epp");
    let ingress = np.spec.unwrap().ingress.unwrap();
    assert_eq!(ingress.len(), 2);
    let d = r.deployment("solo");
    assert_eq!(
        d.spec.unwrap().selector.match_labels.unwrap()["epp"],
        "solo-epp"
    );
}

#[test]
fn llm_d_gateway_values_render_epp() {
    let r = render("llmd-gateway.yaml", "qwen");
    check_common(&r, "qwen");
    let args = r.args("qwen");
    assert!(
        args.windows(2)
            .any(|w| w == ["--config-file", "/config/custom-plugins.yaml"])
    );
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--metrics-endpoint-auth"))
    );
    let pool = r.get("InferencePool/qwen");
    assert_eq!(
        pool["spec"]["endpointPickerRef"]["failureMode"],
        "FailClose"
    );
    assert_eq!(
        r.get("InferenceObjective/interactive")["spec"]["priority"],
        10
    );
    assert_eq!(
        r.get("HTTPRoute/qwen")["spec"]["rules"][0]["backendRefs"][0]["name"],
        "qwen"
    );
    let d = r.deployment("qwen");
    let pod = d.spec.unwrap().template;
    assert_eq!(
        pod.metadata.unwrap().annotations.unwrap()["prometheus.io/scrape"],
        "true"
    );
}

#[test]
fn missing_model_server_labels_fail_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, "inferencePool:\n  modelServerType: vllm\n").unwrap();
    let e = render_values(&values, "p").err().unwrap();
    assert!(e.contains("matchLabels"), "{e}");
}

fn pod(name: &str, labels: Value, ip: &str) -> Value {
    let text = std::fs::read_to_string(root().join("tests/fixtures/pod.json")).unwrap();
    let mut p: Value = serde_json::from_str(&text).unwrap();
    p["metadata"]["name"] = json!(name);
    p["metadata"]["labels"] = labels;
    p["status"]["podIP"] = json!(ip);
    p["status"]["podIPs"] = json!([{"ip": ip}]);
    p
}

/// A mocked API serving the InferencePool `release` renders and one ready pod `<app>-0` on
/// loopback, labelled `app: <app>`.
async fn mock_api(r: &Rendered, release: &str, app: &str) -> common::kube_mock::Mock {
    let mut pool = r.get(&format!("InferencePool/{release}")).clone();
    pool["metadata"]["resourceVersion"] = json!("1");
    let (mock, _) = common::kube_mock::Mock::start(
        "/apis/inference.networking.k8s.io/v1/namespaces/ns/inferencepools",
        pool,
        vec![pod(&format!("{app}-0"), json!({ "app": app }), "127.0.0.1")],
    )
    .await;
    mock
}

/// The epp container `release` renders, made runnable here: its ConfigMap written under
/// `dir/config` and a TLS secret (as `epp --write-certs` writes one) under `dir/tls`, the
/// mount paths in its arguments mapped to them. Returns the arguments, the container and
/// the TLS directory.
fn rendered_container(
    r: &Rendered,
    release: &str,
    dir: &Path,
) -> (Vec<String>, k8s_openapi::api::core::v1::Container, PathBuf) {
    let d = r.deployment(release);
    let container = d.spec.unwrap().template.spec.unwrap().containers[0].clone();
    let cm: ConfigMap = r.typed(&format!("ConfigMap/{release}-epp"));
    let config_dir = dir.join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    for (name, text) in cm.data.unwrap() {
        std::fs::write(config_dir.join(name), text).unwrap();
    }
    let certs = dir.join("tls");
    let status = Command::new(env!("CARGO_BIN_EXE_epp"))
        .arg("--write-certs")
        .arg(&certs)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let args = container
        .args
        .clone()
        .unwrap()
        .into_iter()
        .map(|a| a.replace("/config/", &format!("{}/", config_dir.display())))
        .map(|a| a.replace("/etc/epp-tls", certs.to_str().unwrap()))
        .collect();
    (args, container, certs)
}

/// GIE-shaped values → the real Helm engine → epp started with exactly the rendered args and
/// env (the config mount path mapped to a temporary directory, the API to a mock) → the
/// rendered probes answer SERVING → a request is routed through Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_deployment_runs() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let b0 = common::Backend::start("b0").await;
    let b1 = common::Backend::start("b1").await;
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        format!(
            "tls:\n  secretName: epp-tls\n  clientCAKey: ca.crt\ninferenceExtension:\n  flags:\n    v: 1\ninferencePool:\n  targetPorts:\n  - number: {}\n  - number: {}\n  modelServerType: vllm\n  modelServers:\n    matchLabels:\n      app: vllm\n",
            b0.addr.port(),
            b1.addr.port()
        ),
    )
    .unwrap();
    let r = render_values(&values, "vllm-pool").unwrap();

    let mock = mock_api(&r, "vllm-pool", "vllm").await;
    let kubeconfig = mock.kubeconfig(dir.path());

    let (args, container, certs) = rendered_container(&r, "vllm-pool", dir.path());
    let secret = r
        .deployment("vllm-pool")
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .volumes;
    let secret = secret.unwrap().into_iter().find_map(|v| v.secret);
    assert_eq!(
        secret.and_then(|s| s.secret_name).as_deref(),
        Some("epp-tls")
    );
    let mounts = container.volume_mounts.clone().unwrap();
    assert!(mounts.iter().any(|m| m.mount_path == "/etc/epp-tls"));
    assert!(args.iter().any(|a| a == "--enable-cert-reload=true"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_epp"));
    cmd.args(&args)
        .env("NAMESPACE", "ns")
        .env("POD_NAME", "vllm-pool-epp-0")
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info");
    let (epp, _) = common::spawn_and_wait("epp", cmd, |l| {
        l.contains("ext_proc server listening")
            .then(|| l.to_owned())
    });

    // Every rendered probe's service answers SERVING on the rendered port.
    let mut probes = Vec::new();
    for p in [container.liveness_probe, container.readiness_probe]
        .into_iter()
        .flatten()
    {
        let g = p.grpc.unwrap();
        probes.push((g.port, g.service.unwrap_or_default()));
    }
    assert!(!probes.is_empty());
    for (port, service) in probes {
        let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = client
                .check(HealthCheckRequest {
                    service: service.clone(),
                })
                .await
                .map(|r| r.into_inner().status());
            if matches!(status, Ok(ServingStatus::Serving)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "probe {service:?} on {port}: {status:?}\n{}",
                epp.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // And a request is routed through Envoy as the shipped config runs it: epp's certificate
    // verified against the secret's CA, Envoy's client certificate verified by epp.
    let options = common::EnvoyOptions {
        tls: common::EnvoyTls::Mutual(certs.clone()),
        ..common::EnvoyOptions::new(common::BodyMode::FullDuplex)
    };
    let (_envoy, gateway) =
        common::start_envoy(dir.path(), &common::envoy_config_with(9002, options));
    let client: common::HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let body = json!({"model": "m", "prompt": "hello from the chart"}).to_string();
    let req = hyper::Request::post(format!("http://127.0.0.1:{gateway}/v1/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "{}", epp.logs());
    assert_eq!(b0.requests() + b1.requests(), 1);
}

/// `modelServerType: sglang` renders `defaultEngine: sglang`, so pods without an engine label
/// are read by SGLang's metric names from their first scrape. Regression: a pod without the
/// label was always read by vLLM's names, so an SGLang pool's load families never showed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sglang_pool_is_read_by_sglangs_metric_names() {
    let (_sim, addr) = common::start_sim("sglang-0", 0, &["--metric-names", "sglang"]);
    let port = addr.rsplit(':').next().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        format!(
            "inferencePool:\n  targetPorts:\n  - number: {port}\n  modelServerType: sglang\n  modelServers:\n    matchLabels:\n      app: sglang\n"
        ),
    )
    .unwrap();
    let r = render_values(&values, "sglang-pool").unwrap();
    let cm: ConfigMap = r.typed("ConfigMap/sglang-pool-epp");
    let config = cm.data.unwrap().into_values().collect::<String>();
    assert!(config.contains("defaultEngine: \"sglang\""), "{config}");
    let mock = mock_api(&r, "sglang-pool", "sglang").await;
    let (args, _, _) = rendered_container(&r, "sglang-pool", dir.path());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_epp"));
    cmd.args(&args)
        .args([
            "--grpc-port",
            "0",
            "--grpc-health-port",
            "0",
            "--metrics-port",
            "0",
        ])
        .args([
            "--refresh-metrics-interval",
            "20ms",
            "--bind-address",
            "127.0.0.1",
        ])
        .env("NAMESPACE", "ns")
        .env("POD_NAME", "sglang-pool-epp-0")
        .env("KUBECONFIG", mock.kubeconfig(dir.path()))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    // The chart logs JSON with zap's keys: {"msg":"metrics server listening","address":"…",…}.
    let (epp, metrics_addr) = common::spawn_and_wait("epp", cmd, |l| {
        let v: Value = serde_json::from_str(l).ok()?;
        (v["msg"] == "metrics server listening")
            .then(|| v["address"].as_str().map(str::to_owned))
            .flatten()
    });
    // Once the pod is fresh, a scrape has read its page (a page read by the wrong names
    // logs the families it lacks before the scrape counts).
    let page_url = format!("http://{metrics_addr}/metrics");
    let fresh = "epp_endpoint_health{endpoint_name=\"sglang-0-rank-0\",state=\"fresh\"} 1";
    let client: common::HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !common::get_text(&client, &page_url).await.contains(fresh) {
        assert!(Instant::now() < deadline, "never fresh:\n{}", epp.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = epp.logs();
    assert!(!logs.contains("metrics page lacks families"), "{logs}");
    assert!(!logs.contains("reading its names"), "{logs}");
}
