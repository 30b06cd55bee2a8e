//! Kubernetes discovery against a mocked API server (real HTTP list/watch, JSON fixtures):
//! add / update / not-ready / delete / selector change / watch restart / watch error.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::kube_mock::{Collection, Mock};

use epp::datastore::Datastore;
use epp::discovery::kube::{GROUP_V1, GROUP_V1ALPHA2, PoolRef, run};

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn pod(name: &str, app: &str, ready: bool, ip: &str) -> Value {
    let mut p = fixture("pod.json");
    p["metadata"]["name"] = json!(name);
    p["metadata"]["labels"]["app"] = json!(app);
    p["status"]["podIP"] = json!(ip);
    p["status"]["podIPs"] = json!([{"ip": ip}]);
    p["status"]["conditions"][1]["status"] = json!(if ready { "True" } else { "False" });
    p
}

async fn wait_for(ds: &Datastore, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut names: Vec<String> = ds.endpoints().iter().map(|e| e.name.clone()).collect();
        names.sort();
        if names == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "endpoints {names:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_watches(c: &Collection, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.watches.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "watch not (re)established");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_v1_pods_follow_add_update_delete_selector_and_restarts() {
    let (mock, client) = Mock::start(
        "/apis/inference.networking.k8s.io/v1/namespaces/ns/inferencepools",
        fixture("inferencepool-v1.json"),
        vec![
            pod("a", "vllm", true, "10.0.0.1"),
            pod("b", "vllm", false, "10.0.0.2"),
            pod("c", "other", true, "10.0.0.3"),
        ],
    )
    .await;
    let ds = Arc::new(Datastore::new());
    let pool = PoolRef {
        name: "vllm-pool".into(),
        namespace: "ns".into(),
        group: GROUP_V1.into(),
    };
    let task = tokio::spawn(run(client, pool, ds.clone()));

    // Initial list: only the ready, matching pod, one endpoint per target port.
    wait_for(&ds, &["a-rank-0", "a-rank-1"]).await;
    assert!(ds.is_ready());
    let a0 = ds
        .endpoints()
        .into_iter()
        .find(|e| e.name == "a-rank-1")
        .unwrap();
    assert_eq!(a0.address.to_string(), "10.0.0.1:8001");
    wait_watches(&mock.pods, 1).await;
    wait_watches(&mock.pools, 1).await;

    // Update: b becomes ready. Not ready: a. Add: d. Delete: b.
    mock.pods
        .event("MODIFIED", pod("b", "vllm", true, "10.0.0.2"));
    wait_for(&ds, &["a-rank-0", "a-rank-1", "b-rank-0", "b-rank-1"]).await;
    mock.pods
        .event("MODIFIED", pod("a", "vllm", false, "10.0.0.1"));
    wait_for(&ds, &["b-rank-0", "b-rank-1"]).await;
    mock.pods.event("ADDED", pod("d", "vllm", true, "10.0.0.4"));
    mock.pods
        .event("DELETED", pod("b", "vllm", true, "10.0.0.2"));
    wait_for(&ds, &["d-rank-0", "d-rank-1"]).await;

    // Selector change on the pool.
    let mut p = fixture("inferencepool-v1.json");
    p["spec"]["selector"]["matchLabels"]["app"] = json!("other");
    mock.pools.event("MODIFIED", p);
    wait_for(&ds, &["c-rank-0", "c-rank-1"]).await;

    // Watch restart: the stream ends; the watcher re-watches and later events still apply.
    mock.pods.close_watches();
    wait_watches(&mock.pods, 2).await;
    mock.pods
        .event("ADDED", pod("e", "other", true, "10.0.0.5"));
    wait_for(&ds, &["c-rank-0", "c-rank-1", "e-rank-0", "e-rank-1"]).await;

    // Watch error: the next watch fails with 500; the watcher backs off and recovers.
    mock.pods.fail_next_watch.store(true, Ordering::SeqCst);
    mock.pods.close_watches();
    wait_watches(&mock.pods, 3).await;
    mock.pods
        .event("DELETED", pod("c", "other", true, "10.0.0.3"));
    wait_for(&ds, &["e-rank-0", "e-rank-1"]).await;

    // Pool deleted: no endpoints.
    mock.pools
        .event("DELETED", fixture("inferencepool-v1.json"));
    wait_for(&ds, &[]).await;

    // Every call was a GET of pods or of the pool collection (what the RBAC role grants).
    for call in mock.calls.lock().iter() {
        assert!(
            call == "GET /api/v1/namespaces/ns/pods"
                || call == "GET /apis/inference.networking.k8s.io/v1/namespaces/ns/inferencepools",
            "unexpected call {call}"
        );
    }
    task.abort();
}

/// The API server answers the first pod lists with 500: discovery retries with backoff (not
/// in a hot loop) and converges once it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_lists_are_retried_with_backoff_until_the_api_recovers() {
    let (mock, client) = Mock::start(
        "/apis/inference.networking.k8s.io/v1/namespaces/ns/inferencepools",
        fixture("inferencepool-v1.json"),
        vec![pod("a", "vllm", true, "10.0.0.1")],
    )
    .await;
    mock.pods.fail_lists.store(2, Ordering::SeqCst);
    let ds = Arc::new(Datastore::new());
    let pool = PoolRef {
        name: "vllm-pool".into(),
        namespace: "ns".into(),
        group: GROUP_V1.into(),
    };
    let started = Instant::now();
    let task = tokio::spawn(run(client, pool, ds.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while ds.endpoints().is_empty() {
        assert!(Instant::now() < deadline, "discovery never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        mock.pods.lists.load(Ordering::SeqCst),
        3,
        "one list per attempt"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "retried without backing off"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_v1alpha2_uses_selector_map_and_target_port_number() {
    let (_mock, client) = Mock::start(
        "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/ns/inferencepools",
        fixture("inferencepool-v1alpha2.json"),
        vec![
            pod("a", "vllm", true, "10.0.0.1"),
            pod("b", "x", true, "10.0.0.2"),
        ],
    )
    .await;
    let ds = Arc::new(Datastore::new());
    let pool = PoolRef {
        name: "vllm-pool".into(),
        namespace: "ns".into(),
        group: GROUP_V1ALPHA2.into(),
    };
    let task = tokio::spawn(run(client, pool, ds.clone()));
    wait_for(&ds, &["a-rank-0"]).await;
    assert_eq!(ds.endpoints()[0].address.to_string(), "10.0.0.1:8000");
    task.abort();
}

/// `--endpoint-selector`: pods chosen by a label selector the API server applies (no
/// InferencePool), one endpoint per target port, engine from the pod label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_selector_watches_pods_without_a_pool() {
    let mut sglang = pod("s", "vllm", true, "10.0.0.9");
    let labels = sglang["metadata"]["labels"].as_object_mut().unwrap();
    labels.remove("llm-d.ai/engine-type");
    labels.insert(
        "inference.networking.k8s.io/engine-type".into(),
        json!("sglang"),
    );
    let (mock, client) = Mock::start(
        "/apis/inference.networking.k8s.io/v1/namespaces/ns/inferencepools",
        fixture("inferencepool-v1.json"),
        vec![pod("a", "vllm", true, "10.0.0.1"), sglang],
    )
    .await;
    let ds = Arc::new(Datastore::new());
    let source = epp::discovery::kube::Source::Selector(epp::discovery::kube::SelectorRef {
        namespace: "ns".into(),
        selector: "app=vllm,tier in (a,b)".into(),
        target_ports: vec![8000, 8002],
    });
    let task = tokio::spawn(epp::discovery::kube::run_source(
        client,
        source,
        ds.clone(),
        None,
    ));
    wait_for(&ds, &["a-rank-0", "a-rank-1", "s-rank-0", "s-rank-1"]).await;
    assert!(ds.is_ready());
    let s1 = ds
        .endpoints()
        .into_iter()
        .find(|e| e.name == "s-rank-1")
        .unwrap();
    assert_eq!(s1.address.to_string(), "10.0.0.9:8002");
    assert_eq!(s1.engine.as_str(), "sglang");
    let queries = mock.pods.queries.lock().clone();
    assert!(
        queries.iter().all(
            |q| q.contains("labelSelector=app%3Dvllm%2Ctier+in+%28a%2Cb%29")
                || q.contains("labelSelector=app%3Dvllm%2Ctier%20in%20%28a%2Cb%29")
        ),
        "{queries:?}"
    );
    // The pool is never asked for.
    assert!(mock.pools.queries.lock().is_empty());
    task.abort();
}
