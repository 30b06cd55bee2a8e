//! Keeps the request [`Policy`] (InferenceObjective priorities, InferenceModelRewrite rules)
//! current: from the Kubernetes API (both kinds watched in the pool's namespace, objects of
//! other pools ignored), or from a file of the same manifests in static mode (re-read when it
//! changes).
//!
//! A cluster without the v1alpha2 CRDs is not an error: the first failure is logged once and
//! the watch keeps retrying with backoff (priorities stay 0, no rewrites) until they appear.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;

use crate::objectives::{GROUP, Objects, Policy, VERSION, add_object, for_pool, parse_file};

/// Rebuilds the policy from every object seen.
fn install(policy: &Policy, objects: &Keyed, pool: Option<&str>) {
    let mut parsed = Objects::default();
    for ((kind, name), obj) in objects {
        if !for_pool(obj, pool) {
            continue;
        }
        if let Err(e) = add_object(&mut parsed, obj) {
            tracing::warn!(%kind, %name, error = %e, "ignoring invalid object");
        }
    }
    tracing::info!(
        objectives = parsed.priorities.len(),
        rewrite_rules = parsed.rules.len(),
        "request policy updated"
    );
    policy.install(parsed);
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind), plural)
}

/// Watches both kinds in `namespace` until the task is dropped.
pub async fn watch(
    client: kube::Client,
    namespace: String,
    pool: Option<String>,
    policy: Arc<Policy>,
) {
    let stream_of = |kind: &'static str, plural: &str| {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &namespace, &resource(kind, plural));
        watcher(api, watcher::Config::default())
            .default_backoff()
            .map(move |e| (kind, e))
    };
    let mut events = std::pin::pin!(futures::stream::select(
        stream_of("InferenceObjective", "inferenceobjectives"),
        stream_of("InferenceModelRewrite", "inferencemodelrewrites"),
    ));
    let mut seen = Seen::default();
    let mut reported_failure = false;
    while let Some((kind, event)) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                if !reported_failure {
                    tracing::warn!(%kind, error = %e, "cannot watch InferenceObjective/InferenceModelRewrite (CRDs installed? RBAC?); retrying with backoff");
                    reported_failure = true;
                }
                continue;
            }
        };
        if let Some(objects) = seen.apply(kind, event) {
            install(&policy, objects, pool.as_deref());
        }
    }
}

type Keyed = BTreeMap<(String, String), Value>;

/// The objects of both kinds as the watch events leave them, and what the policy was last
/// built from.
#[derive(Debug, Default)]
struct Seen {
    objects: Keyed,
    installed: Option<Keyed>,
}

impl Seen {
    /// Folds in one event of `kind`; returns the objects to build the policy from when they
    /// differ from the last build. A (re)list replaces that kind's objects once it is done,
    /// so the policy never lacks them halfway through, and a relist that finds the same
    /// objects (watches restart every few minutes) builds and logs nothing.
    fn apply(&mut self, kind: &str, event: watcher::Event<DynamicObject>) -> Option<&Keyed> {
        let key =
            |o: &DynamicObject| (kind.to_owned(), o.metadata.name.clone().unwrap_or_default());
        let value = |o: DynamicObject| {
            let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
            v["kind"] = Value::String(kind.to_owned());
            v
        };
        match event {
            watcher::Event::Apply(o) => {
                self.objects.insert(key(&o), value(o));
            }
            watcher::Event::Delete(o) => {
                self.objects.remove(&key(&o));
            }
            watcher::Event::Init => {
                self.objects.retain(|(k, _), _| k != kind);
                return None;
            }
            watcher::Event::InitApply(o) => {
                self.objects.insert(key(&o), value(o));
                return None;
            }
            watcher::Event::InitDone => {}
        }
        if self.installed.as_ref() == Some(&self.objects) {
            return None;
        }
        self.installed = Some(self.objects.clone());
        self.installed.as_ref()
    }
}

/// Reads `path` now and whenever it changes (checked every 2 s). A bad file is logged and the
/// previous policy kept.
pub fn watch_file(
    path: PathBuf,
    policy: Arc<Policy>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let read = |path: &PathBuf| -> Result<Objects, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        parse_file(&text, None).map_err(|e| format!("{}: {e}", path.display()))
    };
    let first = read(&path)?;
    policy.install(first);
    Ok(tokio::spawn(async move {
        let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut last = modified(&path);
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = modified(&path);
            if now == last {
                continue;
            }
            last = now;
            match read(&path) {
                Ok(objects) => {
                    tracing::info!(path = %path.display(), "objectives file reloaded");
                    policy.install(objects);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "objectives file: keeping the previous policy")
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str, priority: i64) -> DynamicObject {
        let mut o =
            DynamicObject::new(name, &resource("InferenceObjective", "inferenceobjectives"));
        o.data = serde_json::json!({"spec": {"priority": priority}});
        o
    }

    const KIND: &str = "InferenceObjective";

    fn relist(seen: &mut Seen, objects: &[DynamicObject]) -> Option<usize> {
        assert!(seen.apply(KIND, watcher::Event::Init).is_none());
        for o in objects {
            assert!(
                seen.apply(KIND, watcher::Event::InitApply(o.clone()))
                    .is_none(),
                "no build halfway through a list"
            );
        }
        seen.apply(KIND, watcher::Event::InitDone)
            .map(BTreeMap::len)
    }

    #[test]
    fn the_policy_is_built_once_per_change_not_per_relist() {
        let mut seen = Seen::default();
        assert_eq!(
            relist(&mut seen, &[]),
            Some(0),
            "an empty first list builds once"
        );
        let (a, b) = (object("a", 1), object("b", 2));
        assert_eq!(relist(&mut seen, &[a.clone(), b.clone()]), Some(2));
        assert_eq!(
            relist(&mut seen, &[a.clone(), b.clone()]),
            None,
            "same objects"
        );
        assert!(seen.apply(KIND, watcher::Event::Apply(a.clone())).is_none());
        let changed = object("a", 5);
        assert_eq!(
            seen.apply(KIND, watcher::Event::Apply(changed))
                .map(BTreeMap::len),
            Some(2)
        );
        assert_eq!(
            seen.apply(KIND, watcher::Event::Delete(b))
                .map(BTreeMap::len),
            Some(1)
        );
        assert_eq!(
            relist(&mut seen, &[]),
            Some(0),
            "a relist that finds none clears"
        );
        // Another kind's objects survive this kind's relist.
        let rewrite = "InferenceModelRewrite";
        assert!(
            seen.apply(rewrite, watcher::Event::Apply(object("r", 0)))
                .is_some()
        );
        assert_eq!(relist(&mut seen, &[a]), Some(2));
    }
}
