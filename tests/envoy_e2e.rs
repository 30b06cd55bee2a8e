//! End to end through a real Envoy: client → Envoy (ext_proc) → epp → Envoy → fake backends.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{BodyMode, Stack};

fn system_prompt(tag: &str) -> String {
    // ~4 KB shared prefix: 64 prefix blocks.
    format!("[{tag}] ").repeat(4096 / (tag.len() + 3))
}

async fn assert_still_serving(stack: &Stack) {
    let r = stack.complete("are you still there?").await;
    assert_eq!(r.status, 200, "epp stopped serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefix_sticks_to_one_backend() {
    for mode in [BodyMode::Streamed, BodyMode::FullDuplex] {
        let stack = Stack::start(3, mode, &[]).await;
        let sys = system_prompt("acme support bot");
        let mut seen = HashSet::new();
        for i in 0..12 {
            let r = stack.complete(&format!("{sys} question {i}: why?")).await;
            seen.insert(r.backend());
        }
        assert_eq!(
            seen.len(),
            1,
            "{mode:?}: shared prefix spread over {seen:?}"
        );
    }
}

/// Backends whose engines report prefix caching off (vLLM's `--no-enable-prefix-caching`)
/// gain nothing from a prefix they were sent before: a shared prefix is spread like any load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_spreads_over_backends_that_report_prefix_caching_off() {
    let stack = Stack::start(3, BodyMode::Streamed, &[]).await;
    for b in &stack.backends {
        b.set_prefix_caching(false);
    }
    for b in &stack.backends {
        b.scraped_again(2).await;
    }
    let sys = system_prompt("acme support bot");
    let mut seen = HashSet::new();
    for i in 0..12 {
        let r = stack.complete(&format!("{sys} question {i}: why?")).await;
        assert_eq!(r.status, 200);
        seen.insert(r.backend());
    }
    // All 12 on one of 3 backends by chance: 3 × 3^-12 ≈ 6e-6.
    assert!(seen.len() > 1, "the prefix stuck to {seen:?}");
}

/// A gateway that sends epp no response bodies (`response_body_mode: NONE`) closes the
/// ext_proc stream at the response headers, or right after routing when it skips those too,
/// while the event stream goes on: epp keeps the request counted on its backend until the
/// backend's metrics show it finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_gateway_hides_stays_counted_until_the_engine_reports_it_done() {
    for skip_response_headers in [false, true] {
        let options = common::EnvoyOptions {
            no_response_body: true,
            skip_response_headers,
            ..common::EnvoyOptions::new(BodyMode::Streamed)
        };
        let stack = Stack::start_with(1, options, &[]).await;
        let backend = &stack.backends[0];
        backend.report_running();
        let context = format!("response headers skipped: {skip_response_headers}");
        let page = metrics_while_streaming(&stack).await;
        let inflight = metric_sum(&page, "llm_d_epp_inflight_requests");
        assert_eq!(inflight, 1.0, "while streaming; {context}");
        assert_eq!(
            metric_sum(&page, "epp_inflight_parked_requests"),
            1.0,
            "{context}"
        );
        let page = stack
            .metrics_when(250, |p| metric_sum(p, "llm_d_epp_inflight_requests") == 0.0)
            .await;
        let inflight = metric_sum(&page, "llm_d_epp_inflight_requests");
        assert_eq!(inflight, 0.0, "after it ended; {context}");
        assert_eq!(
            metric_sum(&page, "epp_inflight_parked_requests"),
            0.0,
            "{context}"
        );
    }
}

/// deploy/envoy/envoy-route-only.yaml sends epp no response chunks, and Envoy keeps epp's
/// stream open until the response ends (it waits for response trailers): a streamed request
/// is counted on its open stream, not parked, for as long as it streams. At its end the
/// stream closes without a message, like one a gateway closes early, so epp parks the request
/// until a scrape shows the backend done. The stream costs the messages of a one-chunk
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_only_config_counts_a_stream_while_it_runs_without_its_chunks() {
    let options = common::EnvoyOptions {
        config: "envoy-route-only.yaml",
        ..common::EnvoyOptions::new(BodyMode::Streamed)
    };
    let stack = Stack::start_with(1, options, &[]).await;
    stack.backends[0].report_running();
    let sent = "http.gateway.ext_proc.stream_msgs_sent";
    let before = stack.envoy_counter(sent);
    let page = metrics_while_streaming(&stack).await;
    assert_eq!(metric_sum(&page, "llm_d_epp_inflight_requests"), 1.0);
    assert_eq!(metric_sum(&page, "epp_inflight_parked_requests"), 0.0);
    let page = stack
        .metrics_when(250, |p| metric_sum(p, "llm_d_epp_inflight_requests") == 0.0)
        .await;
    assert_eq!(metric_sum(&page, "llm_d_epp_inflight_requests"), 0.0);
    assert_eq!(metric_sum(&page, "epp_inflight_parked_requests"), 0.0);
    // Request headers, body and (empty) trailers, response headers; a 60-event stream in
    // STREAMED adds one message per chunk.
    let messages = stack.envoy_counter(sent) - before;
    assert!(messages <= 5, "{messages} ext_proc messages for one stream");
    assert_still_serving(&stack).await;
}

/// Streams about 1.8 s from the stack's only backend; returns epp's metrics page taken three
/// scrapes into the stream, once the whole stream has arrived intact.
async fn metrics_while_streaming(stack: &Stack) -> String {
    let backend = &stack.backends[0];
    let body = serde_json::json!({"model": "m", "prompt": "tell me more", "stream": true, "max_tokens": 60});
    let request = stack.send(
        "POST",
        "/v1/completions",
        &[],
        body.to_string().into_bytes(),
    );
    let page = async {
        while backend.streaming() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        backend.scraped_again(3).await;
        let page = stack.get_epp(stack.epp_metrics_port, "/metrics").await;
        assert_eq!(backend.streaming(), 1, "the stream should still be going");
        page
    };
    let (reply, page) = tokio::join!(request, page);
    assert_eq!(reply.status, 200);
    assert!(String::from_utf8_lossy(&reply.body).ends_with("data: [DONE]\n\n"));
    page
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_prefixes_spread_across_backends() {
    let stack = Stack::start(3, BodyMode::FullDuplex, &[]).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..30 {
        let r = stack
            .complete(&format!("{} tail", system_prompt(&format!("tenant {i}"))))
            .await;
        *counts.entry(r.backend()).or_default() += 1;
    }
    assert_eq!(
        counts.len(),
        3,
        "distinct prefixes should use every backend: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_queue_backend_stops_receiving_new_work() {
    let stack = Stack::start(3, BodyMode::FullDuplex, &[]).await;
    let busy = &stack.backends[0];
    busy.set_queue(50);
    // Let epp scrape the new queue depth (every 20 ms in tests).
    busy.scraped_again(3).await;
    for i in 0..30 {
        let r = stack.complete(&format!("fresh prompt number {i}")).await;
        assert_ne!(
            r.backend(),
            busy.id,
            "request {i} went to the backend with a deep queue"
        );
    }
    busy.set_queue(0);
}

/// An SSE stream reaches the client intact in both response body modes epp serves: the
/// shipped STREAMED (Envoy keeps each chunk, epp only answers it) and FULL_DUPLEX_STREAMED (the
/// Go EPP's gateways; epp echoes each chunk). Its usage and first byte reach epp's metrics,
/// and with the model rewritten, every event names the client's model again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_passes_through_intact_in_both_response_modes() {
    for duplex_response in [false, true] {
        let options = common::EnvoyOptions {
            strip_client_headers: false,
            duplex_response,
            ..common::EnvoyOptions::new(BodyMode::FullDuplex)
        };
        let stack = Stack::start_with(2, options, &[]).await;
        let body = serde_json::json!({"model": "alias", "prompt": "stream me", "stream": true});
        let r = stack
            .send(
                "POST",
                "/v1/completions",
                &[("x-gateway-model-name-rewrite", "real-model")],
                body.to_string().into_bytes(),
            )
            .await;
        assert_eq!(r.status, 200, "duplex response: {duplex_response}");
        assert_eq!(
            r.headers.get("content-type").unwrap(),
            "text/event-stream",
            "content type preserved"
        );
        let text = String::from_utf8(r.body).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 7, "5 tokens, usage, [DONE]: {text}");
        for (i, ev) in events[..5].iter().enumerate() {
            let v: serde_json::Value =
                serde_json::from_str(ev.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(v["choices"][0]["text"], format!("tok{i} "));
            assert_eq!(v["model"], "alias", "duplex response: {duplex_response}");
        }
        assert_eq!(events[6], "data: [DONE]");
        let page = stack
            .metrics_when(50, |p| {
                metric_sum(p, "inference_objective_output_tokens_sum{") > 0.0
            })
            .await;
        assert_eq!(
            metric_sum(&page, "inference_objective_output_tokens_sum{"),
            5.0,
            "duplex response: {duplex_response}\n{page}"
        );
        for family in [
            "inference_objective_request_ttft_seconds_count{",
            "inference_objective_request_tpot_seconds_count{",
            "inference_objective_normalized_time_per_output_token_seconds_count{",
        ] {
            assert_eq!(metric_sum(&page, family), 1.0, "{family}\n{page}");
        }
        assert_still_serving(&stack).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_400_with_epp_message() {
    let stack = Stack::start(2, BodyMode::FullDuplex, &[]).await;
    let cases: [(&str, &[u8], &str); 4] = [
        ("/v1/completions", b"this is not json", "not valid JSON"),
        ("/v1/completions", br#"{"prompt":"no model"}"#, "\"model\""),
        ("/v1/chat/completions", br#"{"model":"m"}"#, "messages"),
        ("/v1/completions", br#"{"model":"m"}"#, "prompt"),
    ];
    for (path, body, needle) in cases {
        let r = stack.send("POST", path, &[], body.to_vec()).await;
        assert_eq!(r.status, 400, "{path} {:?}", String::from_utf8_lossy(body));
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            msg.contains(needle),
            "message {msg:?} should mention {needle:?}"
        );
        assert_still_serving(&stack).await;
    }
    let served: usize = stack.backends.iter().map(|b| b.requests()).sum();
    assert_eq!(served, 4, "malformed requests never reach a backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_gets_413() {
    for mode in [BodyMode::Streamed, BodyMode::FullDuplex] {
        let stack = Stack::start(2, mode, &["--max-request-body-bytes", "100000"]).await;
        let r = stack.complete(&"x".repeat(150_000)).await;
        assert_eq!(r.status, 413, "{mode:?}");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("100000")
        );
        assert_still_serving(&stack).await;
    }
}

/// A body larger than Envoy's per-connection buffer (32 MiB in the shipped config) and epp's
/// limit: refused with 413 in STREAMED too, where Envoy holds every chunk until epp answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_envoys_buffer_gets_413_not_a_stall() {
    let stack = Stack::start(2, BodyMode::Streamed, &[]).await;
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        stack.complete(&"x".repeat(40 << 20)),
    )
    .await
    .expect("the oversized request stalled");
    assert_eq!(r.status, 413);
    assert_still_serving(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_body_arrives_intact_in_chunks() {
    // Larger than one 62,000-byte streamed_response chunk, so in FULL_DUPLEX_STREAMED epp
    // re-sends it in pieces; in STREAMED Envoy sends it in several messages.
    Stack::assert_prompt_arrives_intact("y", 300_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cannot_choose_its_backend() {
    let stack = Stack::start(2, BodyMode::FullDuplex, &[]).await;
    let body = serde_json::json!({"model": "m", "prompt": "hi"}).to_string();
    // Nothing listens on port 1: if Envoy used the client's header the request would fail.
    let r = stack
        .send(
            "POST",
            "/v1/completions",
            &[("x-gateway-destination-endpoint", "127.0.0.1:1")],
            body.into_bytes(),
        )
        .await;
    let v = r.json();
    let backend = r.backend();
    let chosen = stack.backends.iter().find(|b| b.id == backend).unwrap();
    assert_eq!(v["destination_header"], chosen.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_less_request_is_routed() {
    let stack = Stack::start(2, BodyMode::FullDuplex, &[]).await;
    let r = stack.send("GET", "/v1/models", &[], Vec::new()).await;
    assert_eq!(r.status, 200);
    assert!(r.json()["backend"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_route_by_shared_prefix() {
    let stack = Stack::start(3, BodyMode::FullDuplex, &[]).await;
    let sys = system_prompt("travel agent");
    let mut seen = HashSet::new();
    for i in 0..8 {
        let body = serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": sys},
            {"role": "user", "content": format!("trip {i}")}
        ]});
        let r = stack
            .send(
                "POST",
                "/v1/chat/completions",
                &[],
                body.to_string().into_bytes(),
            )
            .await;
        seen.insert(r.backend());
    }
    assert_eq!(seen.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_mode_routes_and_rejects_like_full_duplex() {
    let stack = Stack::start(3, BodyMode::Buffered, &[]).await;
    let sys = system_prompt("buffered");
    let mut seen = HashSet::new();
    for i in 0..8 {
        seen.insert(stack.complete(&format!("{sys} q{i}")).await.backend());
    }
    assert_eq!(seen.len(), 1);
    let r = stack
        .send("POST", "/v1/completions", &[], b"{not json".to_vec())
        .await;
    assert_eq!(r.status, 400);
    assert_still_serving(&stack).await;
}

/// A rewritten model's JSON answer names the client's model again, in both response body
/// modes (see `sse_stream_passes_through_intact_in_both_response_modes`). The request body
/// spans several ext_proc messages: in STREAMED the rewritten body replaces the first and the
/// others are cleared; in FULL_DUPLEX_STREAMED epp sends the new body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_rewrite_header_changes_the_served_model() {
    let prompt = "w".repeat(200_000);
    for (mode, duplex_response) in [
        (BodyMode::Streamed, false),
        (BodyMode::FullDuplex, false),
        (BodyMode::FullDuplex, true),
    ] {
        // The header as a trusted filter in front of epp would set it: the shipped config's
        // client-header strip is left out here.
        let options = common::EnvoyOptions {
            strip_client_headers: false,
            duplex_response,
            ..common::EnvoyOptions::new(mode)
        };
        let stack = Stack::start_with(2, options, &[]).await;
        let body = serde_json::json!({"model": "alias", "prompt": prompt}).to_string();
        let r = stack
            .send(
                "POST",
                "/v1/completions",
                &[("x-gateway-model-name-rewrite", "real-model")],
                body.clone().into_bytes(),
            )
            .await;
        let case = format!("{mode:?}, duplex response: {duplex_response}");
        assert_eq!(r.status, 200, "{case}");
        // The backend saw the rewritten model and the whole prompt; the client sees its own
        // model name back.
        let sent = body.replace("\"alias\"", "\"real-model\"");
        assert_eq!(r.json()["served_model"], "real-model", "{case}");
        r.assert_backend_got(&sent, &case);
        assert_eq!(r.json()["model"], "alias", "{case}");
    }
}

/// The shipped Envoy config strips client-sent routing headers before ext_proc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_envoy_config_drops_client_routing_headers() {
    let stack = Stack::start(2, BodyMode::FullDuplex, &[]).await;
    let body = serde_json::json!({"model": "alias", "prompt": "hello"}).to_string();
    let r = stack
        .send(
            "POST",
            "/v1/completions",
            &[
                ("x-gateway-model-name-rewrite", "chosen-by-client"),
                ("x-gateway-destination-endpoint", "127.0.0.1:1"),
            ],
            body.into_bytes(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["served_model"], "alias");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epp_metrics_count_requests() {
    let stack = Stack::start(2, BodyMode::FullDuplex, &[]).await;
    for i in 0..3 {
        stack.complete(&format!("count me {i}")).await;
    }
    stack
        .send("POST", "/v1/completions", &[], b"bad".to_vec())
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let page = stack.get_epp(stack.epp_metrics_port, "/metrics").await;
    assert!(
        page.contains(
            "inference_objective_request_total{model_name=\"m\",target_model_name=\"m\"} 3"
        ),
        "{page}"
    );
    assert!(
        page.contains("inference_objective_request_error_total{"),
        "{page}"
    );
    assert!(
        page.contains("inference_pool_ready_pods{name=\"static\"} 2"),
        "{page}"
    );
    assert!(
        page.contains("inference_extension_prefix_indexer_size"),
        "{page}"
    );
    // One attempt per routed request, labelled with the chosen pod; the bad body never
    // reached the scheduler.
    let attempts = "inference_extension_scheduler_attempts_total{";
    for l in page.lines().filter(|l| l.starts_with(attempts)) {
        assert!(
            l.contains("status=\"success\"") && l.contains("pod_name=\"b"),
            "{l}"
        );
    }
    assert_eq!(metric_sum(&page, attempts), 3.0, "{page}");
}

/// epp applies a decision's prefix-index record once its reply is on its way to Envoy, not
/// only when a later decision needs the index: after a single request, with nothing after it,
/// the index holds its blocks (regression: the record waited in a queue, and the index-size
/// gauge read 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_is_recorded_after_its_reply_without_a_later_request() {
    let stack = Stack::start(2, BodyMode::FullDuplex, &[]).await;
    stack
        .complete(&"a prompt long enough for many blocks ".repeat(40))
        .await;
    let size = |page: &str| metric_sum(page, "inference_extension_prefix_indexer_size ");
    let entries = size(&stack.metrics_when(50, |p| size(p) > 0.0).await);
    assert!(
        entries >= 20.0,
        "index entries after one request: {entries}"
    );
}

/// Model names come from clients: past `--max-model-label-values` distinct names, request
/// metrics count them as `other` instead of growing a series per name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_name_labels_are_capped() {
    let stack = Stack::start(2, BodyMode::FullDuplex, &["--max-model-label-values", "3"]).await;
    for i in 0..12 {
        let body =
            serde_json::json!({"model": format!("model-{i}"), "prompt": "hi", "max_tokens": 1});
        let reply = stack
            .send(
                "POST",
                "/v1/completions",
                &[],
                body.to_string().into_bytes(),
            )
            .await;
        assert_eq!(reply.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let page = stack.get_epp(stack.epp_metrics_port, "/metrics").await;
    let names: HashSet<&str> = page
        .lines()
        .filter(|l| l.starts_with("inference_objective_request_total{"))
        .filter_map(|l| l.split("model_name=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        names,
        HashSet::from(["model-0", "model-1", "model-2", "other"]),
        "{page}"
    );
    assert!(
        page.contains(
            "inference_objective_request_total{model_name=\"other\",target_model_name=\"other\"} 9"
        ),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_ext_proc_with_self_signed_certificate() {
    let stack = Stack::start(3, BodyMode::FullDuplex, &["--secure-serving=true"]).await;
    let sys = system_prompt("over tls");
    let mut seen = HashSet::new();
    for i in 0..6 {
        seen.insert(stack.complete(&format!("{sys} q{i}")).await.backend());
    }
    assert_eq!(seen.len(), 1);
    let r = stack
        .send("POST", "/v1/completions", &[], b"nope".to_vec())
        .await;
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_ext_proc_with_mounted_certificate() {
    // The shipped Envoy config verifies epp's certificate against the CA next to it.
    let certs = write_certs();
    let dir = certs.path().to_str().unwrap().to_owned();
    let stack = Stack::start(
        2,
        BodyMode::FullDuplex,
        &["--secure-serving=true", "--cert-path", &dir],
    )
    .await;
    assert_eq!(stack.complete("hello over mounted tls").await.status, 200);
}

/// `epp --write-certs` into a temporary directory.
fn write_certs() -> tempfile::TempDir {
    let certs = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
        .arg("--write-certs")
        .arg(certs.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    certs
}

/// Envoy checks epp's certificate: one signed by another CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_refuses_an_epp_certificate_from_another_ca() {
    let epp_certs = write_certs();
    let other = write_certs();
    let dir = epp_certs.path().to_str().unwrap().to_owned();
    let options = common::EnvoyOptions {
        tls: common::EnvoyTls::Verified(other.path().to_owned()),
        ..common::EnvoyOptions::new(BodyMode::FullDuplex)
    };
    let stack =
        Stack::start_with(2, options, &["--secure-serving=true", "--cert-path", &dir]).await;
    let r = stack.complete("who are you?").await;
    assert!(r.status >= 500, "status {}", r.status);
    let served: usize = stack.backends.iter().map(|b| b.requests()).sum();
    assert_eq!(served, 0);
}

/// With --client-ca-path epp serves only clients holding a certificate from that CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_envoy_with_a_client_certificate_only() {
    let certs = write_certs();
    let dir = certs.path().to_str().unwrap().to_owned();
    let ca = certs.path().join("ca.crt").to_str().unwrap().to_owned();
    let args = [
        "--secure-serving=true",
        "--cert-path",
        &dir,
        "--client-ca-path",
        &ca,
    ];
    let stack = Stack::start(2, BodyMode::FullDuplex, &args).await;
    assert_eq!(stack.complete("with my certificate").await.status, 200);

    let without = common::EnvoyOptions {
        tls: common::EnvoyTls::Verified(certs.path().to_owned()),
        ..common::EnvoyOptions::new(BodyMode::FullDuplex)
    };
    let stack = Stack::start_with(2, without, &args).await;
    let r = stack.complete("without a certificate").await;
    assert!(r.status >= 500, "status {}", r.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_reports_ready_services() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let stack = Stack::start(1, BodyMode::FullDuplex, &[]).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", stack.health_port))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut client = HealthClient::new(channel);
    // Without leader election every name answers with the sync state, as in the Go EPP
    // (its chart probes `inference-extension`).
    for service in [
        "",
        "liveness",
        "readiness",
        "inference-extension",
        "envoy.service.ext_proc.v3.ExternalProcessor",
        "any-name",
    ] {
        let resp = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "service {service:?}");
    }
}

/// `--health-checking`: the ext_proc port answers gRPC health too (TLS, as Envoy's health
/// checks of the epp cluster would reach it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checking_serves_health_on_the_ext_proc_port() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let stack = Stack::start(1, BodyMode::FullDuplex, &["--health-checking"]).await;
    let grpc_port = stack.grpc_port;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "inference-extension".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status(), ServingStatus::Serving);
    assert_eq!(stack.complete("still routes").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_selects_the_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("epp.yaml");
    // Only the queue scorer: prefixes no longer stick, deep queues are still avoided.
    std::fs::write(
        &cfg,
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: random-picker\nschedulingProfiles:\n- name: default\n  plugins: [{pluginRef: queue-scorer}, {pluginRef: random-picker}]\n",
    )
    .unwrap();
    let stack = Stack::start(
        3,
        BodyMode::FullDuplex,
        &["--config-file", cfg.to_str().unwrap()],
    )
    .await;
    let sys = system_prompt("no prefix scoring");
    let mut seen = HashSet::new();
    for i in 0..30 {
        seen.insert(stack.complete(&format!("{sys} q{i}")).await.backend());
    }
    assert!(
        seen.len() > 1,
        "a random picker spreads a shared prefix: {seen:?}"
    );
}

#[test]
fn bad_config_file_fails_startup_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("epp.yaml");
    std::fs::write(
        &cfg,
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n  parameters: {bogus: 1}\nschedulingProfiles: [{name: p}]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
        .args([
            "--secure-serving=false",
            "--endpoints",
            "127.0.0.1:1",
            "--config-file",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("plugins[0].parameters.bogus"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["--endpoints", "127.0.0.1:1", "--no-such-flag"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_file_reload_removes_pods_and_empty_pool_gets_503() {
    let stack = Stack::start(2, BodyMode::FullDuplex, &[]).await;
    assert_eq!(stack.complete("before").await.status, 200);
    let file = stack.dir.path().join("endpoints.yaml");
    // Keep only backend b1: everything goes there from now on.
    let b1 = &stack.backends[1];
    std::fs::write(
        &file,
        format!(
            "endpoints:\n  - address: {}\n    name: {}\n",
            b1.addr, b1.id
        ),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let hits: HashSet<String> = {
            let mut s = HashSet::new();
            for i in 0..6 {
                s.insert(stack.complete(&format!("after reload {i}")).await.backend());
            }
            s
        };
        if hits.len() == 1 && hits.contains(&b1.id) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reload not applied: {hits:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // No endpoints at all: 503 with epp's message, and epp keeps serving.
    std::fs::write(&file, "endpoints: []\n").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = stack.complete("nobody home").await;
        if r.status == 503 {
            let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
            assert!(msg.contains("no ready endpoints"), "{msg}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {}", r.status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sums one of epp's metric families over all its label sets.
fn metric_sum(page: &str, family: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_accounting_returns_to_zero_after_errors_and_client_resets() {
    use http_body_util::BodyExt;
    let stack = Stack::start(3, BodyMode::FullDuplex, &[]).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let client = stack.client.clone();
        let url = format!("http://127.0.0.1:{}/v1/completions", stack.gateway);
        tasks.push(tokio::spawn(async move {
            let body = match i % 3 {
                // A streamed response the client abandons after the first chunk.
                0 => {
                    serde_json::json!({"model": "m", "prompt": format!("drop {i}"), "stream": true})
                        .to_string()
                }
                // A complete request.
                1 => serde_json::json!({"model": "m", "prompt": format!("keep {i}")}).to_string(),
                // Bad input: answered by epp, never routed.
                _ => "{not json".to_owned(),
            };
            let req = hyper::Request::post(url)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            let mut body = resp.into_body();
            if i % 3 == 0 {
                let _first = body.frame().await;
                drop(body); // reset mid-stream
            } else {
                let _ = body.collect().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let page = stack
        .metrics_when(150, |p| {
            metric_sum(p, "llm_d_epp_inflight_requests") == 0.0
                && metric_sum(p, "epp_inflight_prompt_tokens") == 0.0
        })
        .await;
    for family in [
        "llm_d_epp_inflight_requests",
        "llm_d_epp_inflight_tokens",
        "epp_inflight_prompt_tokens",
        "inference_objective_running_requests",
    ] {
        assert_eq!(metric_sum(&page, family), 0.0, "{family}:\n{page}");
    }
    assert_still_serving(&stack).await;
}

/// Two Envoys (two ext_proc connections) against epp with two serving threads: every request
/// through either is routed; SIGTERM then stops epp cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_threads_take_every_connection_and_stop_on_sigterm() {
    let mut stack = Stack::start(3, BodyMode::FullDuplex, &["--ext-proc-threads", "2"]).await;
    let grpc_port = stack.grpc_port;
    let second_dir = tempfile::tempdir().unwrap();
    let (_second_envoy, second_gateway) = common::start_envoy(
        second_dir.path(),
        &common::envoy_config(grpc_port, BodyMode::FullDuplex),
    );
    let gateways = [stack.gateway, second_gateway];
    let sends = (0..24).map(|i| {
        let mut body = serde_json::json!({"model": "m", "prompt": format!("request {i}")});
        body["max_tokens"] = 2.into();
        let uri = format!(
            "http://127.0.0.1:{}/v1/completions",
            gateways[i % gateways.len()]
        );
        let client = stack.client.clone();
        async move {
            let req = hyper::Request::post(uri)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    body.to_string(),
                )))
                .unwrap();
            client.request(req).await.unwrap().status().as_u16()
        }
    });
    let statuses = futures::future::join_all(sends).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let pid = stack.epp.child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = stack.epp.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "epp ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}\n{}", stack.epp.logs());
    // The log reader thread may lag the exit by a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        stack.epp.logs().contains("epp stopped"),
        "{}",
        stack.epp.logs()
    );
}

/// More than Envoy's default circuit-breaker thresholds (1,024) of long streamed requests at
/// once are all routed and answered: the shipped config raises the thresholds of both clusters,
/// and caps streams per ext_proc connection at 16, so Envoy spreads them over many connections
/// (hence over epp's serving threads) instead of queueing or refusing them. Run with epp's
/// built-in profile (queue, KV and prefix scorers, whose in-flight reads once raced) and with
/// the shipped default config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_a_thousand_concurrent_streams_are_all_served() {
    // 1,100 client and 1,100 backend sockets here, as many in Envoy (which inherits it).
    common::raise_open_files_limit(4096);
    for config in [&[][..], &["--config-file", common::DEFAULT_CONFIG][..]] {
        let args = [&["--ext-proc-threads", "2"][..], config].concat();
        let stack = Stack::start(2, BodyMode::FullDuplex, &args).await;
        let connections = thousand_streams(&stack).await;
        assert!(
            connections > 1,
            "{args:?}: one ext_proc connection for every stream"
        );
    }
}

/// Sends 1,100 concurrent streamed requests, each open for over a second (40 events 30 ms
/// apart); asserts every one is answered in full and epp's in-flight count returns to zero;
/// returns the ext_proc connections Envoy opened.
async fn thousand_streams(stack: &Stack) -> usize {
    let sends = (0..1100).map(|i| {
        let body = serde_json::json!({"model": "m", "prompt": format!("stream {i}"), "stream": true, "max_tokens": 40});
        stack.send("POST", "/v1/completions", &[], body.to_string().into_bytes())
    });
    let replies = futures::future::join_all(sends).await;
    let failed: Vec<_> = replies
        .iter()
        .filter(|r| r.status != 200 || !r.body.ends_with(b"data: [DONE]\n\n"))
        .map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned()))
        .take(3)
        .collect();
    assert!(
        failed.is_empty(),
        "{failed:?}\nenvoy:\n{}\nepp:\n{}",
        stack.envoy.logs(),
        stack.epp.logs()
    );
    // Every reservation is released once its stream ends.
    let page = stack
        .metrics_when(150, |p| metric_sum(p, "llm_d_epp_inflight_requests") == 0.0)
        .await;
    assert_eq!(
        metric_sum(&page, "llm_d_epp_inflight_requests"),
        0.0,
        "{page}"
    );
    let admin = std::fs::read_to_string(stack.dir.path().join("admin.txt")).unwrap();
    let port: u16 = admin.trim().rsplit(':').next().unwrap().parse().unwrap();
    let stats = stack
        .get_epp(port, "/stats?filter=cluster.epp.upstream_cx_total")
        .await;
    stats
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no connection count in {stats:?}"))
}

/// InferenceObjective priorities and InferenceModelRewrite rules from `--objectives-file`:
/// a sheddable objective (either header name) gets 429 while the pool is saturated, others
/// are served; a rewrite rule changes the served model and the client sees its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objectives_shed_sheddable_requests_and_rewrites_apply() {
    let dir = tempfile::tempdir().unwrap();
    let objectives = dir.path().join("objectives.yaml");
    std::fs::write(
        &objectives,
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\nmetadata: {name: batch}\nspec: {priority: -1, poolRef: {name: static}}\n---\napiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\nmetadata: {name: alias-to-real, creationTimestamp: \"2026-01-01T00:00:00Z\"}\nspec:\n  poolRef: {name: static}\n  rules:\n  - matches: [{model: {type: Exact, value: alias}}]\n    targets: [{modelRewrite: real, weight: 1}]\n",
    )
    .unwrap();
    let path = objectives.to_str().unwrap().to_owned();
    let stack = Stack::start(2, BodyMode::FullDuplex, &["--objectives-file", &path]).await;
    let body = serde_json::json!({"model": "alias", "prompt": "hello"}).to_string();
    let r = stack
        .send("POST", "/v1/completions", &[], body.clone().into_bytes())
        .await;
    assert_eq!(r.json()["served_model"], "real");
    assert_eq!(r.json()["model"], "alias");

    for b in &stack.backends {
        b.set_queue(50);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for header in [
        "x-gateway-inference-objective",
        "x-llm-d-inference-objective",
    ] {
        let shed = stack
            .send(
                "POST",
                "/v1/completions",
                &[(header, "batch")],
                body.clone().into_bytes(),
            )
            .await;
        assert_eq!(
            shed.status,
            429,
            "{header}: {:?}",
            String::from_utf8_lossy(&shed.body)
        );
    }
    let served = stack
        .send(
            "POST",
            "/v1/completions",
            &[("x-gateway-inference-objective", "unknown-objective")],
            body.clone().into_bytes(),
        )
        .await;
    assert_eq!(served.status, 200);
    let page = stack.get_epp(stack.epp_metrics_port, "/metrics").await;
    assert!(
        page.contains("inference_extension_model_rewrite_decisions_total{model_rewrite_name=\"alias-to-real\",model_name=\"alias\",target_model=\"real\"}"),
        "{page}"
    );
}

/// `--metrics-bearer-token-file`: /metrics needs that token (401 without or with another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_require_the_bearer_token_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "let-me-in\n").unwrap();
    let path = token.to_str().unwrap().to_owned();
    let stack = Stack::start(
        1,
        BodyMode::FullDuplex,
        &["--metrics-bearer-token-file", &path],
    )
    .await;
    let get = |auth: Option<&'static str>| {
        let mut req = hyper::Request::get(format!(
            "http://127.0.0.1:{}/metrics",
            stack.epp_metrics_port
        ));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let client = stack.client.clone();
        async move { client.request(req).await.unwrap().status().as_u16() }
    };
    assert_eq!(get(None).await, 401);
    assert_eq!(get(Some("Bearer wrong")).await, 401);
    assert_eq!(get(Some("Bearer let-me-in")).await, 200);
}
