//! Faults with real processes: a model server killed under load and brought back, model-server
//! `/metrics` hanging, failing or garbled, epp restarted while Envoy runs, and a client that
//! abandons its request mid-body.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;

use common::{BodyMode, HttpClient, MetricsMode, Proc, Stack};

/// A port that is free now, below the ephemeral range (32768–60999 here) so that no outgoing
/// connection can take it before a simulator binds it, and again when a killed one restarts.
/// (Regression: the port of a bound-and-dropped port-0 listener was ephemeral, and epp-sim
/// failed to start with "Address already in use".) Each test process starts at its own offset.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 24_000;
    const SPAN: u16 = 8_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let offset = std::process::id();
    for _ in 0..SPAN {
        let step = u32::from(NEXT.fetch_add(1, Ordering::Relaxed));
        let port = FIRST + ((offset + step) % u32::from(SPAN)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}

/// One finished request of the load: when it started, whether it completed, who served it.
#[derive(Debug, Clone)]
struct Outcome {
    started: Instant,
    ok: bool,
    served_by: String,
}

/// A streaming completion through the gateway; `ok` only when the whole stream arrived.
async fn stream_once(client: &HttpClient, gateway: u16, i: usize) -> Outcome {
    let started = Instant::now();
    let body = serde_json::json!({"model": "model", "stream": true, "max_tokens": 24,
        "prompt": format!("request {i}: {}", "distinct words ".repeat(40))});
    let req = hyper::Request::post(format!("http://127.0.0.1:{gateway}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let mut outcome = Outcome {
        started,
        ok: false,
        served_by: String::new(),
    };
    let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(20), client.request(req)).await
    else {
        return outcome;
    };
    outcome.served_by = resp
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let status = resp.status().as_u16();
    if let Ok(Ok(body)) =
        tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect()).await
    {
        outcome.ok = status == 200 && body.to_bytes().ends_with(b"data: [DONE]\n\n");
    }
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_model_server_fails_only_its_own_requests_and_rejoins() {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut sims: Vec<(Proc, String)> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| common::start_sim(&format!("sim-{i}"), *p, &[]))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<String> = sims.iter().map(|s| s.1.clone()).collect();
    let endpoints = common::endpoints_file(dir.path(), "sim", &addrs);
    let (_epp, grpc, _) = common::start_epp(&endpoints, &["--config-file", common::DEFAULT_CONFIG]);
    let (_envoy, gateway) = common::start_envoy(
        dir.path(),
        &common::envoy_config(grpc, BodyMode::FullDuplex),
    );
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());

    // Six clients in closed loops for the whole test.
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let stop_at = Instant::now() + Duration::from_secs(7);
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (client, outcomes) = (client.clone(), outcomes.clone());
            tokio::spawn(async move {
                let mut i = w * 10_000;
                while Instant::now() < stop_at {
                    let o = stream_once(&client, gateway, i).await;
                    outcomes.lock().push(o);
                    i += 1;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    drop(sims.remove(1)); // kills sim-1
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted_at = Instant::now();
    sims.insert(1, common::start_sim("sim-1", ports[1], &[]));
    for w in workers {
        w.await.unwrap();
    }

    let all = outcomes.lock().clone();
    let grace = Duration::from_millis(300);
    for o in &all {
        if o.started < killed_at {
            // In flight at the kill: only sim-1's may fail.
            assert!(
                o.ok || o.served_by == "sim-1" || o.served_by.is_empty(),
                "{o:?}"
            );
        } else {
            assert!(
                o.ok || o.started < killed_at + grace,
                "a request {:?} after the kill failed: {o:?}",
                o.started - killed_at
            );
        }
        if o.started > killed_at + grace && o.started < restarted_at {
            assert_ne!(o.served_by, "sim-1", "routed to the dead server: {o:?}");
        }
    }
    let after: HashMap<&str, usize> = all
        .iter()
        .filter(|o| o.started > restarted_at + Duration::from_secs(1))
        .fold(HashMap::new(), |mut m, o| {
            *m.entry(o.served_by.as_str()).or_default() += 1;
            m
        });
    assert!(
        after.get("sim-1").copied().unwrap_or(0) > 0,
        "sim-1 never rejoined: {after:?}"
    );
}

/// A model server whose `/metrics` hangs, fails or is garbage loses ties to healthy ones (it
/// is still used when needed), and each change of state is logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_metrics_deprioritize_the_endpoint_and_log_once_per_state() {
    let stack = Stack::start(3, BodyMode::FullDuplex, &[]).await;
    let sick = &stack.backends[0];
    for mode in [
        MetricsMode::Status500,
        MetricsMode::Garbage,
        MetricsMode::Hang,
    ] {
        sick.set_metrics_mode(mode);
        // Staleness (2 s by default) or a failed scrape marks it degraded.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let before = sick.requests();
        for i in 0..8 {
            let r = stack
                .complete(&format!("{mode:?} distinct prompt {i}"))
                .await;
            assert_eq!(r.status, 200);
        }
        assert_eq!(
            sick.requests(),
            before,
            "{mode:?}: the endpoint with failing metrics still won ties"
        );
        sick.set_metrics_mode(MetricsMode::Ok);
        // A hung scrape ends at its 1 s timeout; then the next one succeeds.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    let logs = stack.epp.logs();
    let changes: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("epp::scrape") && l.contains("endpoint=b0"))
        .collect();
    let expected = [
        "failing; endpoint de-prioritized endpoint=b0 state=\"bad status\"",
        "recovered endpoint=b0 previous=\"bad status\"",
        "failing; endpoint de-prioritized endpoint=b0 state=\"bad page\"",
        "recovered endpoint=b0 previous=\"bad page\"",
        "failing; endpoint de-prioritized endpoint=b0 state=\"timeout\"",
        "recovered endpoint=b0 previous=\"timeout\"",
    ];
    assert_eq!(changes.len(), expected.len(), "{}", changes.join("\n"));
    for (line, want) in changes.iter().zip(expected) {
        assert!(line.contains(want), "{line:?} should contain {want:?}");
    }
}

/// A model server whose engine died answers every request at once with 500 while its
/// `/metrics` still shows an idle engine: it is ejected after five errors in a row (so it
/// cannot attract traffic by looking idle), ejected again after one error while it is still
/// broken, and back in the pool once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_server_answering_500_is_ejected_then_readmitted() {
    let stack = Stack::start(
        3,
        BodyMode::FullDuplex,
        &["--outlier-base-ejection-time", "2s"],
    )
    .await;
    let sick = &stack.backends[0];
    sick.set_failing(true);
    let mut errors = 0;
    for i in 0..40 {
        let r = stack
            .complete(&format!("dead engine, distinct prompt {i}"))
            .await;
        match r.status {
            200 => {}
            500 => errors += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(
        errors, 5,
        "five errors in a row eject; no request after that reaches it"
    );
    assert_eq!(sick.requests(), 5);
    let page = stack
        .metrics_when(250, |p| {
            p.contains("epp_endpoint_ejected{endpoint_name=\"b0\"} 1")
        })
        .await;
    assert!(
        page.contains("epp_endpoint_ejected{endpoint_name=\"b0\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("epp_endpoint_ejections_total{endpoint_name=\"b0\"} 1"),
        "{page}"
    );
    assert!(
        stack.epp.logs().contains("ejected"),
        "the ejection is logged"
    );

    // Its ejection over, it is on probation: still broken, it fails one request and is
    // ejected again, for twice as long.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let mut errors = 0;
    for i in 0..20 {
        let r = stack.complete(&format!("still dead, prompt {i}")).await;
        errors += usize::from(r.status == 500);
    }
    assert_eq!(errors, 1, "on probation, one error ejects again");
    assert_eq!(sick.requests(), 6);

    sick.set_failing(false);
    tokio::time::sleep(Duration::from_millis(4_200)).await;
    let before = sick.requests();
    for i in 0..40 {
        let r = stack
            .complete(&format!("engine restarted, prompt {i}"))
            .await;
        assert_eq!(r.status, 200);
    }
    assert!(
        sick.requests() > before,
        "the endpoint is routable again after its ejection"
    );
}

/// An endpoint whose serving port refuses connections while its metrics port answers (the
/// scrape cannot tell): Envoy's own 503 replies count as its server errors, and it is ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_replies_for_a_dead_serving_port_eject_the_endpoint() {
    let stack = Stack::start(3, BodyMode::FullDuplex, &[]).await;
    let file = stack.dir.path().join("endpoints.yaml");
    let dead = format!("127.0.0.1:{}", free_port());
    let mut text = String::from("endpoints:\n");
    for b in &stack.backends[..2] {
        text.push_str(&format!("  - address: {}\n    name: {}\n", b.addr, b.id));
    }
    let metrics = stack.backends[2].addr;
    text.push_str(&format!(
        "  - address: {dead}\n    metricsAddress: {metrics}\n    name: dead\n"
    ));
    std::fs::write(&file, text).unwrap();
    let page = stack
        .metrics_when(250, |p| p.contains("endpoint_name=\"dead\""))
        .await;
    assert!(
        page.contains("endpoint_name=\"dead\""),
        "reload not applied:\n{page}"
    );
    let mut refused = 0;
    for i in 0..40 {
        let r = stack
            .complete(&format!("dead port, distinct prompt {i}"))
            .await;
        match r.status {
            200 => assert_ne!(r.backend(), "b2"),
            503 => refused += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(refused, 5, "five failed connections eject the endpoint");
    let page = stack
        .metrics_when(250, |p| {
            p.contains("epp_endpoint_ejected{endpoint_name=\"dead\"} 1")
        })
        .await;
    assert!(
        page.contains("epp_endpoint_ejected{endpoint_name=\"dead\"} 1"),
        "{page}"
    );
}

/// epp goes away while Envoy keeps running: clients get Envoy's failure (never an unrouted
/// request), and once epp is back on its port requests are routed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epp_restart_fails_closed_then_service_resumes() {
    let mut stack = Stack::start(2, BodyMode::FullDuplex, &[]).await;
    let grpc_port = stack.grpc_port;
    assert_eq!(stack.complete("before").await.status, 200);
    let _ = stack.epp.child.kill();
    let _ = stack.epp.child.wait();
    let served_before: usize = stack.backends.iter().map(|b| b.requests()).sum();
    let down = stack.complete("while epp is down").await;
    assert!(down.status >= 500, "status {}", down.status);
    let served_after: usize = stack.backends.iter().map(|b| b.requests()).sum();
    assert_eq!(
        served_before, served_after,
        "a request went through unrouted"
    );

    let endpoints = stack.dir.path().join("endpoints.yaml");
    let port = grpc_port.to_string();
    let (epp, _, metrics, _) = common::start_epp_full(&endpoints, &["--grpc-port", &port]);
    stack.epp = epp;
    stack.epp_metrics_port = metrics;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if stack.complete("after the restart").await.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "service never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client sends half a body and vanishes: Envoy resets the ext_proc stream mid-body and epp
/// lets go of everything the request held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_mid_body_releases_what_the_request_held() {
    let stack = Stack::start(2, BodyMode::FullDuplex, &[]).await;
    let gateway = stack.gateway;
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", gateway)).unwrap();
        let half = format!(r#"{{"model":"m","prompt":"{}"#, "h".repeat(500_000));
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: 2000000\r\n\r\n{half}"
        )
        .unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // Dropped: the connection closes with the body unfinished.
    })
    .await
    .unwrap();
    let held = |page: &str| -> f64 {
        page.lines()
            .find(|l| l.starts_with("epp_inflight_request_body_bytes "))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = stack.get_epp(stack.epp_metrics_port, "/metrics").await;
        if held(&page) == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "body bytes still held:\n{page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let served: usize = stack.backends.iter().map(|b| b.requests()).sum();
    assert_eq!(served, 0, "the partial request reached a backend");
    assert_eq!(stack.complete("after the reset").await.status, 200);
}

/// Logs written to a pipe (a file, a container runtime) are plain text: no terminal colour
/// codes, whatever `NO_COLOR` says. Regression: every field name carried escape codes.
#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_epp"));
    cmd.args([
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--grpc-health-port",
        "0",
    ])
    .args(["--bind-address", "127.0.0.1", "--endpoints", "127.0.0.1:9"])
    .args(["--secure-serving=false"])
    .env_remove("NO_COLOR")
    .env("RUST_LOG", "info");
    let (epp, _) = common::spawn_and_wait("epp", cmd, |l| {
        l.contains("ext_proc server listening")
            .then(|| l.to_owned())
    });
    let logs = epp.logs();
    assert!(logs.contains("address="), "{logs}");
    assert!(!logs.contains('\u{1b}'), "{logs:?}");
}
