//! Leader election against a mocked coordination.k8s.io API (Lease get/create/replace with
//! resourceVersion conflicts): exactly one leader; the other takes over when it stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parking_lot::Mutex;
use serde_json::{Value, json};

use epp::leader::{Elector, Timing};

type Leases = Arc<Mutex<HashMap<String, Value>>>;

fn status(code: u16, reason: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": reason, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

async fn get_lease(State(l): State<Leases>, Path(name): Path<String>) -> Response {
    match l.lock().get(&name) {
        Some(v) => axum::Json(v.clone()).into_response(),
        None => status(404, "NotFound"),
    }
}

async fn create(State(l): State<Leases>, axum::Json(mut v): axum::Json<Value>) -> Response {
    let name = v["metadata"]["name"].as_str().unwrap().to_owned();
    let mut leases = l.lock();
    if leases.contains_key(&name) {
        return status(409, "AlreadyExists");
    }
    v["metadata"]["resourceVersion"] = json!("1");
    leases.insert(name, v.clone());
    axum::Json(v).into_response()
}

async fn replace(
    State(l): State<Leases>,
    Path(name): Path<String>,
    axum::Json(mut v): axum::Json<Value>,
) -> Response {
    let mut leases = l.lock();
    let Some(cur) = leases.get(&name) else {
        return status(404, "NotFound");
    };
    if cur["metadata"]["resourceVersion"] != v["metadata"]["resourceVersion"] {
        return status(409, "Conflict");
    }
    let rv: u64 = cur["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    v["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
    leases.insert(name, v.clone());
    axum::Json(v).into_response()
}

async fn mock() -> (Leases, kube::Client) {
    let leases: Leases = Arc::default();
    let app = Router::new()
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/ns/leases",
            axum::routing::post(create),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/ns/leases/{name}",
            get(get_lease).put(replace),
        )
        .with_state(leases.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    (leases, kube::Client::try_from(config).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_takeover_after_expiry() {
    let (leases, client) = mock().await;
    let timing = Timing {
        lease_duration: Duration::from_secs(1),
        retry_period: Duration::from_millis(100),
    };
    let make = |id: &str| {
        Elector::new(
            kube::Api::namespaced(client.clone(), "ns"),
            epp::leader::lease_name("pool"),
            id.to_owned(),
            timing,
        )
    };
    let (a, b) = (make("a"), make("b"));
    let (fa, fb) = (a.leader_flag(), b.leader_flag());
    let ta = tokio::spawn(a.run());
    let tb = tokio::spawn(b.run());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (la, lb) = (fa.load(Ordering::SeqCst), fb.load(Ordering::SeqCst));
    assert!(la ^ lb, "exactly one leader (a={la}, b={lb})");
    let (leader_task, follower_flag, follower) = if la { (ta, fb, "b") } else { (tb, fa, "a") };
    let holder = leases.lock()["pool-epp-leader"]["spec"]["holderIdentity"].clone();
    assert_eq!(holder, if la { "a" } else { "b" });

    // The leader stops renewing: the other candidate takes over once the Lease expires.
    leader_task.abort();
    let start = Instant::now();
    while !follower_flag.load(Ordering::SeqCst) {
        assert!(start.elapsed() < Duration::from_secs(5), "no takeover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "took over before expiry"
    );
    let lease = leases.lock()["pool-epp-leader"].clone();
    assert_eq!(lease["spec"]["holderIdentity"], follower);
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}
