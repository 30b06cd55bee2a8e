//! Kubernetes discovery: watch one InferencePool and the pods of its namespace (kube-runtime
//! watchers, which re-list and re-watch with backoff on errors) and keep the datastore's
//! endpoints equal to the pool's ready pods.
//!
//! * `--pool-group inference.networking.k8s.io` ⇒ InferencePool v1: `spec.selector.matchLabels`,
//!   `spec.targetPorts[].number`; `inference.networking.x-k8s.io` ⇒ v1alpha2: `spec.selector`
//!   (a label map), `spec.targetPortNumber`.
//! * A pod is an endpoint iff its labels match the selector, it is Ready, not being deleted,
//!   and has an IP; it yields one endpoint per target port, named `<pod>-rank-<i>`, engine from
//!   its `llm-d.ai/engine-type` label (default vllm).
//! * Readiness: once both the pool and the pods were listed.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;

use crate::datastore::{Datastore, EndpointSpec, EngineType};

/// Label naming the model server type of a pod.
pub const ENGINE_LABEL: &str = "llm-d.ai/engine-type";
/// InferencePool v1's group.
pub const GROUP_V1: &str = "inference.networking.k8s.io";
/// InferencePool v1alpha2's group.
pub const GROUP_V1ALPHA2: &str = "inference.networking.x-k8s.io";

/// Which pool to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRef {
    pub name: String,
    pub namespace: String,
    pub group: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("--pool-group {0:?} is not {GROUP_V1} or {GROUP_V1ALPHA2}")]
    UnknownGroup(String),
    #[error("InferencePool {name}: {reason}")]
    InvalidSpec { name: String, reason: String },
}

impl PoolRef {
    /// The InferencePool API resource for the pool's group.
    pub fn api_resource(&self) -> Result<ApiResource, PoolError> {
        let version = match self.group.as_str() {
            GROUP_V1 => "v1",
            GROUP_V1ALPHA2 => "v1alpha2",
            other => return Err(PoolError::UnknownGroup(other.to_owned())),
        };
        let gvk = GroupVersionKind::gvk(&self.group, version, "InferencePool");
        Ok(ApiResource::from_gvk_with_plural(&gvk, "inferencepools"))
    }
}

/// What discovery needs from an InferencePool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// Labels a pod must carry (empty: any pod the watch returns).
    pub selector: BTreeMap<String, String>,
    pub target_ports: Vec<u16>,
    /// The pod label naming the engine, tried before the standard ones.
    pub engine_label: Option<String>,
}

fn label_map(v: Option<&Value>) -> Option<BTreeMap<String, String>> {
    v?.as_object()?
        .iter()
        .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}

/// Reads the selector and target ports of a pool object of `group`.
pub fn parse_pool(obj: &DynamicObject, group: &str) -> Result<PoolSpec, PoolError> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let bad = |reason: &str| PoolError::InvalidSpec {
        name: name.clone(),
        reason: reason.to_owned(),
    };
    let spec = obj.data.get("spec").ok_or_else(|| bad("no spec"))?;
    let port = |v: &Value| {
        v.as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
    };
    let (selector, target_ports) = if group == GROUP_V1 {
        let selector = label_map(spec.pointer("/selector/matchLabels"))
            .ok_or_else(|| bad("spec.selector.matchLabels must be a map of strings"))?;
        let ports = spec
            .get("targetPorts")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("spec.targetPorts must be a list"))?
            .iter()
            .map(|p| p.get("number").and_then(port))
            .collect::<Option<Vec<u16>>>()
            .ok_or_else(|| bad("spec.targetPorts[].number must be a port number"))?;
        (selector, ports)
    } else {
        let selector = label_map(spec.get("selector"))
            .ok_or_else(|| bad("spec.selector must be a map of strings"))?;
        let p = spec
            .get("targetPortNumber")
            .and_then(port)
            .ok_or_else(|| bad("spec.targetPortNumber must be a port number"))?;
        (selector, vec![p])
    };
    if selector.is_empty() {
        return Err(bad("the selector is empty"));
    }
    if target_ports.is_empty() {
        return Err(bad("no target ports"));
    }
    Ok(PoolSpec {
        selector,
        target_ports,
        engine_label: None,
    })
}

/// The engine a pod's labels name: `label_key` if given, then llm-d's and GIE's labels.
fn engine_of(
    labels: &BTreeMap<String, String>,
    label_key: Option<&str>,
) -> Result<EngineType, String> {
    label_key
        .into_iter()
        .chain(crate::scrape::mapping::ENGINE_LABELS)
        .find_map(|k| labels.get(k))
        .map_or(Ok(EngineType::default()), |e| e.parse())
}

/// The endpoints one pod contributes to `pool` (none unless it matches and is ready).
pub fn pod_endpoints(pod: &Pod, pool: &PoolSpec) -> Vec<EndpointSpec> {
    let meta = &pod.metadata;
    let labels = meta.labels.clone().unwrap_or_default();
    if meta.deletion_timestamp.is_some()
        || !pool.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return Vec::new();
    }
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let ip: Option<IpAddr> = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok());
    let (true, Some(ip)) = (ready, ip) else {
        return Vec::new();
    };
    let name = meta.name.clone().unwrap_or_default();
    let engine = engine_of(&labels, pool.engine_label.as_deref()).unwrap_or_else(|e| {
        tracing::warn!(pod = %name, error = %e, "using the default engine's metrics");
        EngineType::default()
    });
    pool.target_ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let address = SocketAddr::new(ip, *port);
            EndpointSpec {
                name: format!("{name}-rank-{i}"),
                address,
                metrics_address: address,
                engine: engine.clone(),
            }
        })
        .collect()
}

#[derive(Default)]
struct State {
    pool: Option<PoolSpec>,
    pods: HashMap<String, Pod>,
    /// Pods of a re-list in progress.
    relisting: Option<HashMap<String, Pod>>,
    pool_listed: bool,
    pods_listed: bool,
}

impl State {
    fn endpoints(&self) -> Vec<EndpointSpec> {
        let Some(pool) = &self.pool else {
            return Vec::new();
        };
        let mut names: Vec<&String> = self.pods.keys().collect();
        names.sort();
        names
            .into_iter()
            .flat_map(|n| pod_endpoints(&self.pods[n], pool))
            .collect()
    }
}

enum Change {
    Pool(Box<watcher::Event<DynamicObject>>),
    Pod(Box<watcher::Event<Pod>>),
}

/// Pods selected without an InferencePool (`--endpoint-selector`, `--endpoint-target-ports`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorRef {
    pub namespace: String,
    /// A Kubernetes label selector, filtered by the API server.
    pub selector: String,
    pub target_ports: Vec<u16>,
}

/// What discovery follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Pool(PoolRef),
    Selector(SelectorRef),
}

type Changes = futures::stream::BoxStream<'static, Result<Change, watcher::Error>>;

/// Follows `pool` until the task is dropped.
pub async fn run(client: kube::Client, pool: PoolRef, datastore: Arc<Datastore>) {
    run_source(client, Source::Pool(pool), datastore, None).await;
}

/// Follows `source` until the task is dropped; `engine_label` is the pod label naming each
/// pod's engine (`core-metrics-extractor`'s `engineLabelKey`), tried before the standard ones.
pub async fn run_source(
    client: kube::Client,
    source: Source,
    datastore: Arc<Datastore>,
    engine_label: Option<String>,
) {
    let mut state = State::default();
    let (namespace, pool_events, pod_config, pool_name) = match &source {
        Source::Pool(pool) => {
            let resource = match pool.api_resource() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "kubernetes discovery not started");
                    return;
                }
            };
            let pools: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &pool.namespace, &resource);
            let events: Changes = watcher(
                pools,
                watcher::Config::default().fields(&format!("metadata.name={}", pool.name)),
            )
            .default_backoff()
            .map(|e| e.map(|ev| Change::Pool(Box::new(ev))))
            .boxed();
            tracing::info!(pool = %pool.name, namespace = %pool.namespace, group = %pool.group, "watching InferencePool");
            (
                pool.namespace.clone(),
                events,
                watcher::Config::default(),
                Some(pool.name.clone()),
            )
        }
        Source::Selector(sel) => {
            state.pool = Some(PoolSpec {
                selector: BTreeMap::new(),
                target_ports: sel.target_ports.clone(),
                engine_label: engine_label.clone(),
            });
            state.pool_listed = true;
            tracing::info!(selector = %sel.selector, namespace = %sel.namespace, ports = ?sel.target_ports, "watching pods by label selector");
            let events: Changes = futures::stream::pending().boxed();
            (
                sel.namespace.clone(),
                events,
                watcher::Config::default().labels(&sel.selector),
                None,
            )
        }
    };
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let pod_events: Changes = watcher(pods, pod_config)
        .default_backoff()
        .map(|e| e.map(|ev| Change::Pod(Box::new(ev))))
        .boxed();
    let mut events = futures::stream::select(pool_events, pod_events);
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "watch error; retrying with backoff");
                continue;
            }
        };
        match change {
            Change::Pool(ev) => {
                let group = match &source {
                    Source::Pool(p) => p.group.as_str(),
                    Source::Selector(_) => GROUP_V1,
                };
                apply_pool_event(&mut state, *ev, group, pool_name.as_deref(), &engine_label);
            }
            Change::Pod(ev) => apply_pod_event(&mut state, *ev),
        }
        if state.relisting.is_some() {
            continue; // apply a re-list only once complete
        }
        let endpoints = state.endpoints();
        if datastore.endpoints().len() != endpoints.len()
            || datastore
                .endpoints()
                .iter()
                .zip(&endpoints)
                .any(|(a, b)| a.spec() != *b)
        {
            tracing::info!(endpoints = endpoints.len(), "pool endpoints changed");
            datastore.set_endpoints(endpoints);
        }
        if state.pool_listed && state.pods_listed && !datastore.is_ready() {
            tracing::info!("pool synced");
            datastore.set_ready(true);
        }
    }
}

fn apply_pool_event(
    state: &mut State,
    ev: watcher::Event<DynamicObject>,
    group: &str,
    name: Option<&str>,
    engine_label: &Option<String>,
) {
    match ev {
        watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
            match parse_pool(&obj, group) {
                Ok(mut spec) => {
                    spec.engine_label = engine_label.clone();
                    state.pool = Some(spec);
                }
                Err(e) => tracing::error!(error = %e, "ignoring invalid InferencePool"),
            }
        }
        watcher::Event::Delete(_) => {
            tracing::warn!(pool = name.unwrap_or_default(), "InferencePool deleted");
            state.pool = None;
        }
        watcher::Event::Init => {}
        watcher::Event::InitDone => state.pool_listed = true,
    }
}

fn apply_pod_event(state: &mut State, ev: watcher::Event<Pod>) {
    match ev {
        watcher::Event::Apply(p) => {
            let name = p.metadata.name.clone().unwrap_or_default();
            state.pods.insert(name, p);
        }
        watcher::Event::Delete(p) => {
            state
                .pods
                .remove(p.metadata.name.as_deref().unwrap_or_default());
        }
        watcher::Event::Init => state.relisting = Some(HashMap::new()),
        watcher::Event::InitApply(p) => {
            let name = p.metadata.name.clone().unwrap_or_default();
            state
                .relisting
                .get_or_insert_with(HashMap::new)
                .insert(name, p);
        }
        watcher::Event::InitDone => {
            state.pods = state.relisting.take().unwrap_or_default();
            state.pods_listed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(v: Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn v1_and_v1alpha2_specs() {
        let v1 = pool(
            serde_json::json!({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "p"}, "spec": {"selector": {"matchLabels": {"app": "m"}}, "targetPorts": [{"number": 8000}, {"number": 8001}]}}),
        );
        let s = parse_pool(&v1, GROUP_V1).unwrap();
        assert_eq!(s.target_ports, vec![8000, 8001]);
        assert_eq!(s.selector["app"], "m");
        let a2 = pool(
            serde_json::json!({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferencePool",
            "metadata": {"name": "p"}, "spec": {"selector": {"app": "m"}, "targetPortNumber": 9000}}),
        );
        assert_eq!(
            parse_pool(&a2, GROUP_V1ALPHA2).unwrap().target_ports,
            vec![9000]
        );
        let e = parse_pool(&a2, GROUP_V1).unwrap_err().to_string();
        assert!(e.contains("matchLabels"), "{e}");
        assert!(
            PoolRef {
                name: "p".into(),
                namespace: "n".into(),
                group: "x".into()
            }
            .api_resource()
            .is_err()
        );
    }

    fn pod(name: &str, labels: Value, ready: &str, ip: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
        }))
        .unwrap()
    }

    #[test]
    fn only_ready_matching_pods_with_ips() {
        let spec = PoolSpec {
            selector: [("app".to_owned(), "m".to_owned())].into(),
            target_ports: vec![8000, 8001],
            engine_label: None,
        };
        let ok = pod(
            "a",
            serde_json::json!({"app": "m", ENGINE_LABEL: "sglang"}),
            "True",
            Some("10.0.0.1"),
        );
        let eps = pod_endpoints(&ok, &spec);
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[1].name, "a-rank-1");
        assert_eq!(eps[1].address.to_string(), "10.0.0.1:8001");
        assert_eq!(eps[0].engine.as_str(), "sglang");
        assert!(
            pod_endpoints(
                &pod(
                    "b",
                    serde_json::json!({"app": "m"}),
                    "False",
                    Some("10.0.0.2")
                ),
                &spec
            )
            .is_empty()
        );
        assert!(
            pod_endpoints(
                &pod(
                    "c",
                    serde_json::json!({"app": "x"}),
                    "True",
                    Some("10.0.0.3")
                ),
                &spec
            )
            .is_empty()
        );
        assert!(
            pod_endpoints(
                &pod("d", serde_json::json!({"app": "m"}), "True", None),
                &spec
            )
            .is_empty()
        );
        let mut deleting = ok.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert!(pod_endpoints(&deleting, &spec).is_empty());
    }
}
