//! A mocked Kubernetes API server for tests: real HTTP list and watch of InferencePools and
//! pods from JSON fixtures, with injectable failures.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// One API resource collection: its items, and the watch streams open on it.
pub struct Collection {
    pub kind: &'static str,
    pub items: Mutex<Vec<Value>>,
    pub rv: AtomicU64,
    pub events: broadcast::Sender<Option<String>>,
    pub watches: AtomicUsize,
    pub fail_next_watch: AtomicBool,
    /// Lists still to answer with 500 (the API server failing at start-up).
    pub fail_lists: AtomicUsize,
    pub lists: AtomicUsize,
    /// Query strings of every request, in order.
    pub queries: Mutex<Vec<String>>,
}

impl Collection {
    pub fn new(kind: &'static str, items: Vec<Value>) -> Arc<Self> {
        Arc::new(Self {
            kind,
            items: Mutex::new(items),
            rv: AtomicU64::new(10),
            events: broadcast::channel(64).0,
            watches: AtomicUsize::new(0),
            fail_next_watch: AtomicBool::new(false),
            fail_lists: AtomicUsize::new(0),
            lists: AtomicUsize::new(0),
            queries: Mutex::new(Vec::new()),
        })
    }

    /// Applies a change to the stored list and sends it to open watches.
    pub fn event(&self, kind: &str, mut obj: Value) {
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
    pub fn close_watches(&self) {
        let _ = self.events.send(None);
    }
}

#[derive(Clone)]
pub struct Mock {
    pub pools: Arc<Collection>,
    pub pods: Arc<Collection>,
    pub calls: Arc<Mutex<Vec<String>>>,
    /// Where the mock listens.
    pub addr: SocketAddr,
}

async fn serve(
    c: Arc<Collection>,
    calls: Arc<Mutex<Vec<String>>>,
    uri: Uri,
    query: Option<String>,
) -> Response {
    calls.lock().push(format!("GET {}", uri.path()));
    c.queries.lock().push(query.clone().unwrap_or_default());
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
    pub async fn start(
        pool_path: &'static str,
        pool: Value,
        pods: Vec<Value>,
    ) -> (Mock, kube::Client) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mock = Mock {
            addr,
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
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        config.default_namespace = "ns".into();
        (mock, kube::Client::try_from(config).unwrap())
    }

    /// A kubeconfig file pointing at the mock (namespace `ns`).
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: http://{}\nusers:\n- name: tester\n  user: {{}}\ncontexts:\n- name: mock\n  context:\n    cluster: mock\n    user: tester\n    namespace: ns\ncurrent-context: mock\n",
                self.addr
            ),
        )
        .unwrap();
        path
    }
}
