//! `epp-sim` over real HTTP, alone and behind Envoy + epp.

mod common;

use std::process::Command;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use common::{BodyMode, HttpClient, Proc};

/// Starts epp-sim on an OS-chosen port, 50× faster than the modelled GPU.
fn start_sim(name: &str) -> (Proc, String) {
    common::start_sim(name, 0, &[])
}

fn start_sim_with(name: &str, extra: &[&str]) -> (Proc, String) {
    common::start_sim(name, 0, extra)
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

async fn call(
    c: &HttpClient,
    method: &str,
    url: &str,
    body: &str,
) -> (u16, hyper::HeaderMap, String) {
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

fn long_prompt(tag: &str) -> String {
    format!("{tag} ").repeat(2000 / (tag.len() + 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_prefix_caching_the_same_prompt_is_computed_whole_again() {
    let (_sim, addr) = start_sim_with("s0", &["--no-enable-prefix-caching"]);
    let c = client();
    let url = format!("http://{addr}/v1/completions");
    let body =
        serde_json::json!({"model": "model", "prompt": long_prompt("same"), "max_tokens": 2});
    for _ in 0..2 {
        let (status, _, text) = call(&c, "POST", &url, &body.to_string()).await;
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    }
    let (_, _, metrics) = call(&c, "GET", &format!("http://{addr}/metrics"), "").await;
    let hits = metrics
        .lines()
        .find(|l| l.starts_with("vllm:prefix_cache_hits_total"))
        .unwrap_or_else(|| panic!("no prefix hits line in\n{metrics}"));
    assert!(hits.ends_with(" 0"), "{hits}");
    assert!(
        metrics.contains("enable_prefix_caching=\"False\""),
        "the cache config says so, as vLLM's does:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_json_reports_usage_and_prefix_hits() {
    let (_sim, addr) = start_sim("s0");
    let c = client();
    let url = format!("http://{addr}/v1/completions");
    let body = serde_json::json!({"model": "model", "prompt": long_prompt("same"), "max_tokens": 3, "unknown_field": true});
    let (status, headers, text) = call(&c, "POST", &url, &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(headers["x-served-by"], "s0");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let answer = v["choices"][0]["text"].as_str().unwrap().to_owned();
    assert!(!answer.is_empty());
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    // The same prompt again: every full block but the last is served from the cache.
    let (_, _, text) = call(&c, "POST", &url, &body.to_string()).await;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["choices"][0]["text"], answer,
        "greedy decoding is deterministic"
    );
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= prompt_tokens.saturating_sub(32) && cached < prompt_tokens,
        "{cached} of {prompt_tokens}"
    );

    let (_, _, metrics) = call(&c, "GET", &format!("http://{addr}/metrics"), "").await;
    for name in [
        "vllm:num_requests_waiting{model_name=\"model\"} 0",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"6500\"",
        "vllm:lora_requests_info",
        "vllm:prefix_cache_hits_total",
        "vllm:request_success_total{model_name=\"model\"} 2",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    // epp's own parser accepts the page.
    let m = epp::scrape::parse_metrics(
        &epp::scrape::mapping::Mappings::default().get("vllm"),
        &metrics,
        std::time::Instant::now(),
    )
    .unwrap();
    assert_eq!(m.num_gpu_blocks, Some(6500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streaming_with_usage_and_errors() {
    let (_sim, addr) = start_sim("s0");
    let c = client();
    let body = serde_json::json!({"model": "model", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}});
    let (status, headers, text) = call(
        &c,
        "POST",
        &format!("http://{addr}/v1/chat/completions"),
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 6, "4 tokens, usage, [DONE]: {text}");
    let first: serde_json::Value = serde_json::from_str(&events[0][6..]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage: serde_json::Value = serde_json::from_str(&events[4][6..]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert_eq!(events[5], "data: [DONE]");

    let (status, _, text) = call(
        &c,
        "POST",
        &format!("http://{addr}/v1/completions"),
        "{oops",
    )
    .await;
    assert_eq!(status, 400, "{text}");
    let (status, _, _) = call(
        &c,
        "POST",
        &format!("http://{addr}/v1/completions"),
        r#"{"model":"nope","prompt":"x"}"#,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _, text) = call(&c, "GET", &format!("http://{addr}/v1/models"), "").await;
    assert_eq!(status, 200);
    assert!(text.contains("\"id\":\"model\""));
    let (status, _, _) = call(&c, "GET", &format!("http://{addr}/health"), "").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epp_routes_repeated_prefixes_to_the_warm_simulated_pod() {
    let sims: Vec<(Proc, String)> = (0..3).map(|i| start_sim(&format!("sim-{i}"))).collect();
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints.yaml");
    let mut text = String::from("endpoints:\n");
    for (i, (_, addr)) in sims.iter().enumerate() {
        text.push_str(&format!("  - address: {addr}\n    name: sim-{i}\n"));
    }
    std::fs::write(&endpoints, text).unwrap();
    // epp's shipped default (sticky to the prefix holder until it is saturated). The GIE
    // environment profile the other tests use weighs queue and KV use against the prefix one
    // to one, and a scrape taken while the first request ran could tip a sequence over.
    let (_epp, grpc, _) = common::start_epp(&endpoints, &["--config-file", common::DEFAULT_CONFIG]);
    let (_envoy, gateway) = common::start_envoy(
        dir.path(),
        &common::envoy_config(grpc, BodyMode::FullDuplex),
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let c = client();
    let sys = long_prompt("system prompt of tenant seven");
    let mut served = std::collections::HashSet::new();
    let mut cached = Vec::new();
    for i in 0..6 {
        let body = serde_json::json!({"model": "model", "prompt": format!("{sys} question {i}"), "max_tokens": 2});
        let (status, headers, text) = call(
            &c,
            "POST",
            &format!("http://127.0.0.1:{gateway}/v1/completions"),
            &body.to_string(),
        )
        .await;
        assert_eq!(status, 200, "{text}");
        served.insert(headers["x-served-by"].to_str().unwrap().to_owned());
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        cached.push(
            v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(served.len(), 1, "one warm pod: {served:?}\n{}", _epp.logs());
    assert_eq!(cached[0], 0);
    assert!(
        cached[1..].iter().all(|c| *c >= 400),
        "system prompt reused: {cached:?}"
    );
}

/// Sums the values of one of epp's metric families (all label sets).
fn metric_sum(page: &str, family: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_export_metrics_late_still_get_traffic_and_load_drains() {
    // Regression (issue 7): pods whose /metrics lack the vllm:* families until their first
    // request were treated as failing, and one pod took every request.
    let late = ["--metrics-after-first-request"];
    let (per_pod, page) = forty_streams_through_epp(&[&late, &late, &late, &late]).await;
    assert!(per_pod.values().all(|n| *n >= 5), "{per_pod:?}");
    assert!(
        page.contains("epp_endpoint_health{endpoint_name=\"sim-0\",state=\"fresh\"} 1"),
        "{page}"
    );
}

/// A pod whose /metrics always fails (`--fail-metrics 1`) is routed by epp's own count of
/// what it sent there: it loses ties but still serves its share of a burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_metrics_never_answer_still_gets_traffic_and_load_drains() {
    let (per_pod, page) =
        forty_streams_through_epp(&[&["--fail-metrics", "1"], &[], &[], &[]]).await;
    assert!(per_pod["sim-0"] >= 5, "{per_pod:?}");
    assert!(
        page.contains("epp_endpoint_health{endpoint_name=\"sim-0\",state=\"degraded\"} 1"),
        "{page}"
    );
}

/// A pod whose exporter fails half the scrapes keeps fresh metrics: one failure among
/// successes is not a state change, so epp neither de-prioritizes the pod nor logs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_exporter_neither_flips_the_pods_health_nor_fills_the_log() {
    let (_sim, addr) = start_sim_with("flaky", &["--fail-metrics", "0.5"]);
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints.yaml");
    std::fs::write(
        &endpoints,
        format!("endpoints:\n  - address: {addr}\n    name: flaky\n"),
    )
    .unwrap();
    let (epp, _grpc, metrics_port) = common::start_epp(&endpoints, &[]);
    let c = client();
    let page_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let fresh = "epp_endpoint_health{endpoint_name=\"flaky\",state=\"fresh\"} 1";
    // Fresh from its first good scrape on.
    for _ in 0..100 {
        if call(&c, "GET", &page_url, "").await.2.contains(fresh) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Then 40 reads over about 1 s (20 scrapes, about 10 of them failed): fresh at each.
    for _ in 0..40 {
        let page = call(&c, "GET", &page_url, "").await.2;
        assert!(page.contains(fresh), "{page}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    // At most the failures before the first good scrape, when the pod had no metrics.
    let logs = epp.logs();
    assert!(
        logs.matches("metrics scrape failing").count() <= 1,
        "{logs}"
    );
}

/// Sends 40 concurrent streamed chats with distinct prompts through Envoy + epp over one
/// epp-sim per `pod_args`; asserts every pod served and epp's load counters drained. Returns
/// the requests each pod served and epp's metrics page.
async fn forty_streams_through_epp(
    pod_args: &[&[&str]],
) -> (std::collections::HashMap<String, usize>, String) {
    let sims: Vec<(Proc, String)> = pod_args
        .iter()
        .enumerate()
        .map(|(i, args)| start_sim_with(&format!("sim-{i}"), args))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints.yaml");
    let mut text = String::from("endpoints:\n");
    for (i, (_, addr)) in sims.iter().enumerate() {
        text.push_str(&format!("  - address: {addr}\n    name: sim-{i}\n"));
    }
    std::fs::write(&endpoints, text).unwrap();
    let (_epp, grpc, metrics_port) =
        common::start_epp(&endpoints, &["--config-file", common::DEFAULT_CONFIG]);
    let (_envoy, gateway) = common::start_envoy(
        dir.path(),
        &common::envoy_config(grpc, BodyMode::FullDuplex),
    );
    let c = client();
    let url = format!("http://127.0.0.1:{gateway}/v1/chat/completions");
    let requests = (0..40).map(|i| {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            let body = serde_json::json!({"model": "model", "stream": true, "max_tokens": 8,
                "messages": [{"role": "user", "content": format!("question {i}: {}", long_prompt(&format!("topic {i}")))}]});
            let (status, headers, text) = call(&c, "POST", &url, &body.to_string()).await;
            assert_eq!(status, 200, "{text}");
            headers["x-served-by"].to_str().unwrap().to_owned()
        })
    });
    let mut per_pod = std::collections::HashMap::new();
    for r in futures::future::join_all(requests).await {
        *per_pod.entry(r.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(
        per_pod.len(),
        pod_args.len(),
        "every pod served: {per_pod:?}"
    );
    let page_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let mut page = String::new();
    for _ in 0..100 {
        page = call(&c, "GET", &page_url, "").await.2;
        if metric_sum(&page, "llm_d_epp_inflight_requests") == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for family in [
        "llm_d_epp_inflight_requests",
        "llm_d_epp_inflight_tokens",
        "epp_inflight_prompt_tokens",
    ] {
        assert_eq!(metric_sum(&page, family), 0.0, "{family}: {page}");
    }
    (per_pod, page)
}

/// Waits up to 5 s for `pred` to hold on epp's log.
async fn wait_for_log(epp: &Proc, pred: impl Fn(&str) -> bool) -> String {
    for _ in 0..250 {
        let logs = epp.logs();
        if pred(&logs) {
            return logs;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    epp.logs()
}

/// Pods exporting SGLang's metric names behind an endpoints file that names no engine are
/// read by SGLang's names once their page shows them (here after the first request, as a
/// late exporter gives); a pod whose engine is named `vllm` keeps vLLM's names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_engine_is_read_by_the_metric_names_its_page_shows() {
    let sglang = ["--metric-names", "sglang"];
    let (_late, late_addr) = start_sim_with(
        "late",
        &[&sglang[..], &["--metrics-after-first-request"]].concat(),
    );
    let (_named, named_addr) = start_sim_with("named", &sglang);
    let c = client();
    let (status, _, page) = call(&c, "GET", &format!("http://{named_addr}/metrics"), "").await;
    assert_eq!(status, 200);
    assert!(page.contains("sglang:num_queue_reqs"), "{page}");
    assert!(!page.contains("vllm:"), "{page}");
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints.yaml");
    std::fs::write(
        &endpoints,
        format!(
            "endpoints:\n  - address: {late_addr}\n    name: late\n  - address: {named_addr}\n    name: named\n    engine: vllm\n"
        ),
    )
    .unwrap();
    let (epp, _grpc, _metrics) = common::start_epp(&endpoints, &[]);
    let lacks = |name: &str| {
        let needle = format!("endpoint={name}");
        move |logs: &str| {
            logs.lines()
                .any(|l| l.contains(&needle) && l.contains("metrics page lacks families"))
        }
    };
    let logs = wait_for_log(&epp, |l| lacks("late")(l) && lacks("named")(l)).await;
    assert!(lacks("late")(&logs) && lacks("named")(&logs), "{logs}");
    assert!(
        !logs.contains("reading its names"),
        "no engine's families yet: {logs}"
    );
    let body = serde_json::json!({"model": "model", "prompt": "hi", "max_tokens": 2});
    let (status, _, text) = call(
        &c,
        "POST",
        &format!("http://{late_addr}/v1/completions"),
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let switched = |logs: &str| {
        logs.lines().any(|l| {
            l.contains("endpoint=late")
                && l.contains("engine=sglang")
                && l.contains("reading its names")
        })
    };
    let logs = wait_for_log(&epp, switched).await;
    assert!(switched(&logs), "{logs}");
    assert!(
        logs.lines()
            .any(|l| l.contains("endpoint=late") && l.contains("every family epp reads")),
        "{logs}"
    );
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("endpoint=named") && l.contains("reading its names")),
        "a named engine is not second-guessed: {logs}"
    );
}

/// epp-sim's `--fail-metrics` fails /metrics only, and a share outside 0–1 is refused by
/// name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_metrics_leave_serving_alone_and_bad_shares_are_refused() {
    let (_sim, addr) = start_sim_with("s0", &["--fail-metrics", "1"]);
    let c = client();
    let (status, _, _) = call(&c, "GET", &format!("http://{addr}/metrics"), "").await;
    assert_eq!(status, 503);
    let body = serde_json::json!({"model": "model", "prompt": "hi", "max_tokens": 2});
    let url = format!("http://{addr}/v1/completions");
    let (status, _, text) = call(&c, "POST", &url, &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_epp-sim"))
        .args(["--port", "0", "--fail-metrics", "1.5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--fail-metrics must be between 0 and 1"),
        "{stderr}"
    );
}

#[test]
fn official_openai_python_client_works_unchanged() {
    let python = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.exists(),
        "run scripts/setup.sh (creates .venv with the openai package)"
    );
    let (_sim, addr) = start_sim("s0");
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(format!("http://{addr}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "OK",
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One `epp-sim` pod (with `sim_args`) behind Envoy + epp with the default plugins, STREAMED
/// request bodies; everything stops when it is dropped.
struct OnePodStack {
    // Dropped in this order: Envoy, epp, the pod, the directory.
    _envoy: Proc,
    epp: Proc,
    _sim: Proc,
    _dir: tempfile::TempDir,
    gateway: u16,
    metrics_port: u16,
}

impl OnePodStack {
    fn start(sim_args: &[&str]) -> Self {
        let (sim, addr) = start_sim_with("sim-0", sim_args);
        let dir = tempfile::tempdir().unwrap();
        let endpoints = common::endpoints_file(dir.path(), "sim", &[addr]);
        let (epp, grpc, metrics_port) =
            common::start_epp(&endpoints, &["--config-file", common::DEFAULT_CONFIG]);
        let (envoy, gateway) =
            common::start_envoy(dir.path(), &common::envoy_config(grpc, BodyMode::Streamed));
        Self {
            _envoy: envoy,
            epp,
            _sim: sim,
            _dir: dir,
            gateway,
            metrics_port,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epp_learns_the_pods_bytes_per_token_from_response_usage() {
    // The prefix index sizes a pod's capacity from its cache geometry in tokens; the bytes a
    // token stands for come from the pod's own usage reports, not a fixed 4.
    let stack = OnePodStack::start(&[]);
    let (epp, metrics_port) = (&stack.epp, stack.metrics_port);
    let c = client();
    let url = format!("http://127.0.0.1:{}/v1/completions", stack.gateway);
    let mut rng = fastrand::Rng::with_seed(7);
    let (mut bytes, mut tokens) = (0u64, 0u64);
    for _ in 0..12 {
        // The workload generator's prose (what the fleet simulator sends).
        let prompt = epp::sim::text::prose(&mut rng, 500);
        let body = serde_json::json!({"model": "model", "prompt": prompt, "max_tokens": 2});
        let (status, _, text) = call(&c, "POST", &url, &body.to_string()).await;
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        bytes += prompt.len() as u64;
        tokens += v["usage"]["prompt_tokens"].as_u64().unwrap();
    }
    let expected = bytes as f64 / tokens as f64;
    assert!(
        (expected - 4.0).abs() > 0.2,
        "the simulator's tokenizer: {expected}"
    );
    let page_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let family = "epp_endpoint_prompt_bytes_per_token{endpoint_name=\"sim-0\"}";
    let close = |page: &str| (metric_sum(page, family) - expected).abs() < 0.01 * expected;
    let mut page = String::new();
    // The last responses' usage is recorded as their ext_proc streams end.
    for _ in 0..100 {
        page = call(&c, "GET", &page_url, "").await.2;
        if close(&page) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let learned = metric_sum(&page, family);
    assert!(
        close(&page),
        "learned {learned}, the responses said {expected}\n{page}\n{}",
        epp.logs()
    );
}

/// Reads one gauge from epp's /metrics until `done` holds for it (or 2 s pass).
async fn gauge_when(page_url: &str, family: &str, done: impl Fn(f64) -> bool) -> (f64, String) {
    let c = client();
    let mut page = String::new();
    for _ in 0..100 {
        page = call(&c, "GET", page_url, "").await.2;
        if page.contains(family) && done(metric_sum(&page, family)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    (metric_sum(&page, family), page)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_keeps_less_than_its_metrics_claim_is_found_out_by_its_cached_tokens() {
    // 256 blocks of 16 tokens really (one ~3,000-token prompt fits), 100,000 claimed in
    // vllm:cache_config_info. Six prompts in turn: from the second round on the index says
    // the pod holds each one, and every response reports that it did not.
    let stack = OnePodStack::start(&["--kv-blocks", "256", "--kv-blocks-reported", "100000"]);
    let url = format!("http://127.0.0.1:{}/v1/completions", stack.gateway);
    let page_url = format!("http://127.0.0.1:{}/metrics", stack.metrics_port);
    let family = "epp_endpoint_cache_capacity_scale{endpoint_name=\"sim-0\"}";
    let c = client();
    let mut rng = fastrand::Rng::with_seed(3);
    let prompts: Vec<String> = (0..6)
        .map(|_| epp::sim::text::prose(&mut rng, 2_500))
        .collect();
    let mut cached = Vec::new();
    for round in 0..3 {
        for prompt in &prompts {
            let body = serde_json::json!({"model": "model", "prompt": prompt, "max_tokens": 2});
            let (status, _, text) = call(&c, "POST", &url, &body.to_string()).await;
            assert_eq!(status, 200, "{text}");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            cached.push(v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64());
        }
        if round == 0 {
            // Nothing was predicted yet, so nothing was checked.
            let (scale, page) = gauge_when(&page_url, family, |s| s == 1.0).await;
            assert_eq!(scale, 1.0, "{page}");
        }
    }
    assert!(cached.iter().all(|c| *c == Some(0)), "{cached:?}");
    let (scale, page) = gauge_when(&page_url, family, |s| s < 0.05).await;
    assert!(
        scale < 0.05,
        "scale {scale} after 12 predicted hits the pod did not have\n{page}\n{}",
        stack.epp.logs()
    );
}

/// Sends `count` completions of `max_tokens` with prompts of 100 to 1,500 words, four at a
/// time, and checks each answered 200.
async fn send_four_at_a_time(url: &str, count: usize, max_tokens: u32, stream: bool) {
    let c = client();
    let mut rng = fastrand::Rng::with_seed(11);
    for round in 0..count.div_ceil(4) {
        let calls: Vec<_> = (0..4)
            .map(|i| {
                let words = rng.usize(100..1500);
                let prompt = format!("{round}-{i} {}", "lorem ipsum ".repeat(words / 2));
                let body = serde_json::json!({
                    "model": "model", "prompt": prompt, "max_tokens": max_tokens, "stream": stream,
                });
                let (c, url) = (c.clone(), url.to_owned());
                tokio::spawn(async move { call(&c, "POST", &url, &body.to_string()).await })
            })
            .collect();
        for call in calls {
            let (status, _, text) = call.await.unwrap();
            assert_eq!(status, 200, "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epp_fits_its_cost_weights_to_streamed_first_token_times_only() {
    // The plumbing through the real interface: Envoy → epp's stream handler → the pool's fit
    // → /metrics. What the weights come out as on a given engine is timing and is checked on
    // synthetic timings (`datastore::ttft_fit`, `prefill_cost::learned_tests`). The pod runs
    // one sequence at a time at 5× the modelled GPU, so first-token times grow clearly with
    // the prompt and the queue even on a loaded machine.
    let stack = OnePodStack::start(&["--max-num-seqs", "1", "--speed", "5"]);
    let url = format!("http://127.0.0.1:{}/v1/completions", stack.gateway);
    let page_url = format!("http://127.0.0.1:{}/metrics", stack.metrics_port);
    let c = client();
    // Unstreamed responses start when they end: not first-token times. (80 would be enough
    // observations for the fit.)
    send_four_at_a_time(&url, 80, 1, false).await;
    let page = call(&c, "GET", &page_url, "").await.2;
    assert!(!page.contains("epp_prefill_cost_weight"), "{page}");
    // 80 observations weigh 78.5 after forgetting: past the fit's 64. The fit also waits for a
    // slope clear of the noise, so on a loaded machine it may take a few more.
    let mut page = String::new();
    for count in [80, 140, 140, 140] {
        send_four_at_a_time(&url, count, 10, true).await;
        page = call(&c, "GET", &page_url, "").await.2;
        if page.contains("epp_prefill_cost_weight") {
            break;
        }
    }
    for term in ["queued_token", "inflight_request", "waiting_request"] {
        let family = format!("epp_prefill_cost_weight{{term=\"{term}\"}}");
        let line = page.lines().find(|l| l.starts_with(&family));
        let value = line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        assert!(
            value.is_some_and(|v| v.is_finite() && v >= 0.0),
            "{term}: {line:?}\n{page}\n{}",
            stack.epp.logs()
        );
    }
}
