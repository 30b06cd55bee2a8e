//! Kubernetes discovery against a mocked API server (real HTTP list/watch, JSON fixtures):
//! add / update / not-ready / delete / selector change / watch restart / watch error.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use epp::datastore::Datastore;
use epp::discovery::kube::{GROUP_V1, GROUP_V1ALPHA2, PoolRef, run};

/// One API resource collection: its items, and the watch streams open on it.
struct Collection {
    kind: &'static str,
    items: Mutex<Vec<Value>>,
    rv: AtomicU64,
    events: broadcast::Sender<Option<String>>,
    watches: AtomicUsize,
    fail_next_watch: AtomicBool,
    /// Lists still to answer with 500 (the API server failing at start-up).
    fail_lists: AtomicUsize,
    lists: AtomicUsize,
}

impl Collection {
    fn new(kind: &'static str, items: Vec<Value>) -> Arc<Self> {
        Arc::new(Self {
            kind,
            items: Mutex::new(items),
            rv: AtomicU64::new(10),
            events: broadcast::channel(64).0,
            watches: AtomicUsize::new(0),
            fail_next_watch: AtomicBool::new(false),
            fail_lists: AtomicUsize::new(0),
            lists: AtomicUsize::new(0),
        })
    }

    /// Applies a change to the stored list and sends it to open watches.
    fn event(&self, kind: &str, mut obj: Value) {
        let rv = self.rv.fetch_add(1, Ordering::SeqCst) + 1;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = obj["metadata"]["name"].clone();
        let mut items = self.items.lock();
        items.retain(|i| i["metadata"]["name"] != name);
        if kind != "DELETED" {
            items.push(obj.clone());
        }
        let _ = self
            .events
            .send(Some(json!({"type": kind, "object": obj}).to_string()));
    }

    /// Ends every open watch stream (the watcher must re-watch).
    fn close_watches(&self) {
        let _ = self.events.send(None);
    }
}

#[derive(Clone)]
struct Mock {
    pools: Arc<Collection>,
    pods: Arc<Collection>,
    calls: Arc<Mutex<Vec<String>>>,
}

async fn serve(
    c: Arc<Collection>,
    calls: Arc<Mutex<Vec<String>>>,
    uri: Uri,
    query: Option<String>,
) -> Response {
    calls.lock().push(format!("GET {}", uri.path()));
    let query = query.unwrap_or_default();
    if !query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1")
    {
        c.lists.fetch_add(1, Ordering::SeqCst);
        let failing = c
            .fail_lists
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "injected failure", "reason": "InternalError", "code": 500});
            return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(status)).into_response();
        }
        let list = json!({
            "apiVersion": "v1", "kind": format!("{}List", c.kind),
            "metadata": {"resourceVersion": c.rv.load(Ordering::SeqCst).to_string()},
            "items": *c.items.lock(),
        });
        return axum::Json(list).into_response();
    }
    if c.fail_next_watch.swap(false, Ordering::SeqCst) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "injected failure", "reason": "InternalError", "code": 500});
        return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(status)).into_response();
    }
    c.watches.fetch_add(1, Ordering::SeqCst);
    let mut rx = c.events.subscribe();
    let (tx, out) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        while let Ok(Some(line)) = rx.recv().await {
            if tx.send(Ok(Bytes::from(line + "\n"))).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(out),
        ))
        .unwrap()
}

impl Mock {
    async fn start(pool_path: &'static str, pool: Value, pods: Vec<Value>) -> (Mock, kube::Client) {
        let mock = Mock {
            pools: Collection::new("InferencePool", vec![pool]),
            pods: Collection::new("Pod", pods),
            calls: Arc::new(Mutex::new(Vec::new())),
        };
        let m1 = mock.clone();
        let m2 = mock.clone();
        let app = Router::new()
            .route(
                pool_path,
                get(move |uri: Uri, RawQuery(q): RawQuery| {
                    serve(m1.pools.clone(), m1.calls.clone(), uri, q)
                }),
            )
            .route(
                "/api/v1/namespaces/ns/pods",
                get(move |uri: Uri, RawQuery(q): RawQuery| {
                    serve(m2.pods.clone(), m2.calls.clone(), uri, q)
                }),
            )
            .fallback(
                |uri: Uri, State(calls): State<Arc<Mutex<Vec<String>>>>| async move {
                    calls.lock().push(format!("UNEXPECTED {uri}"));
                    StatusCode::NOT_FOUND
                },
            )
            .with_state(mock.calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        config.default_namespace = "ns".into();
        (mock, kube::Client::try_from(config).unwrap())
    }
}

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
