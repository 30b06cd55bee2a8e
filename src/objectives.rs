//! Request policy from the Gateway API Inference Extension's v1alpha2 objects: an
//! InferenceObjective gives requests that name it (header `x-gateway-inference-objective`, or
//! llm-d's `x-llm-d-inference-objective`) a priority; an InferenceModelRewrite sends requests
//! for one model to others, by weight. Only objects whose `spec.poolRef.name` is this pool
//! apply. They come from the Kubernetes API (watched) or, in static mode, from a file of the
//! same manifests (`--objectives-file`).
//!
//! * Priority: the named objective's `spec.priority`; 0 when the header is absent or names no
//!   objective. Negative priorities are sheddable (429 while the pool is saturated).
//! * Rewrite: rules that list the request's model exactly win over rules without matches
//!   (which apply to every model); among equals the oldest object wins (as in the Go EPP).
//!   The target is drawn by weight among the rule's targets. A client's own
//!   `x-gateway-model-name-rewrite` header takes precedence.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde_json::Value;

/// Request headers naming the objective.
pub const OBJECTIVE_HEADERS: [&str; 2] = [
    "x-gateway-inference-objective",
    "x-llm-d-inference-objective",
];

/// The objects' API group and version.
pub const GROUP: &str = "inference.networking.x-k8s.io";
pub const VERSION: &str = "v1alpha2";

/// One rewrite rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RewriteRule {
    /// The object it came from (for logs and metrics).
    pub object: String,
    /// Models matched exactly; empty matches every model.
    pub models: Vec<String>,
    /// `(model, weight)`.
    pub targets: Vec<(String, u32)>,
    /// Creation order of the object (older first).
    pub created: String,
}

/// A rewrite decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub target: String,
    pub object: String,
}

#[derive(Debug, Default)]
struct Snapshot {
    priorities: HashMap<String, i32>,
    /// Exact-match rules by model, oldest first.
    exact: HashMap<String, Vec<Arc<RewriteRule>>>,
    /// Rules without matches, oldest first.
    generic: Vec<Arc<RewriteRule>>,
}

/// The objectives and rewrite rules in force (swapped whole on every change).
#[derive(Debug, Default)]
pub struct Policy {
    current: ArcSwap<Snapshot>,
}

/// A problem in one object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name}: {reason}")]
pub struct ObjectError {
    pub kind: String,
    pub name: String,
    pub reason: String,
}

/// The objects of one kind, parsed.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub priorities: HashMap<String, i32>,
    pub rules: Vec<RewriteRule>,
}

impl Policy {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The priority of a request carrying `objective` (0 when unknown).
    pub fn priority(&self, objective: Option<&str>) -> i32 {
        objective
            .and_then(|o| self.current.load().priorities.get(o).copied())
            .unwrap_or(0)
    }

    /// True when some rule may rewrite a request's model.
    pub fn has_rewrites(&self) -> bool {
        let snap = self.current.load();
        !snap.exact.is_empty() || !snap.generic.is_empty()
    }

    /// Where a request for `model` goes instead, if a rule says so.
    pub fn rewrite(&self, model: &str, rng: &mut fastrand::Rng) -> Option<Rewrite> {
        let snap = self.current.load();
        let rule = snap
            .exact
            .get(model)
            .and_then(|r| r.first())
            .or_else(|| snap.generic.first())?;
        let total: u64 = rule.targets.iter().map(|(_, w)| u64::from(*w)).sum();
        let target = if total == 0 {
            rule.targets.first()?.0.clone()
        } else {
            let mut pick = rng.u64(..total);
            rule.targets
                .iter()
                .find(|(_, w)| {
                    let w = u64::from(*w);
                    if pick < w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })?
                .0
                .clone()
        };
        (target != model).then(|| Rewrite {
            target,
            object: rule.object.clone(),
        })
    }

    /// Model names the rules mention (their metric labels are pinned).
    pub fn model_names(&self) -> Vec<String> {
        let snap = self.current.load();
        let mut out: Vec<String> = snap.exact.keys().cloned().collect();
        for rules in snap.exact.values().chain(std::iter::once(&snap.generic)) {
            for r in rules {
                out.extend(r.targets.iter().map(|(t, _)| t.clone()));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Replaces everything in force.
    pub fn install(&self, objects: Objects) {
        let mut rules = objects.rules;
        rules.sort_by(|a, b| a.created.cmp(&b.created).then(a.object.cmp(&b.object)));
        let mut snap = Snapshot {
            priorities: objects.priorities,
            ..Default::default()
        };
        for rule in rules.into_iter().map(Arc::new) {
            if rule.models.is_empty() {
                snap.generic.push(rule);
            } else {
                for m in &rule.models {
                    snap.exact.entry(m.clone()).or_default().push(rule.clone());
                }
            }
        }
        self.current.store(Arc::new(snap));
    }
}

fn field<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    obj.pointer(path)
}

/// Whether `obj` (any kind) references pool `pool` (no pool given: every object applies).
pub fn for_pool(obj: &Value, pool: Option<&str>) -> bool {
    match pool {
        None => true,
        Some(p) => field(obj, "/spec/poolRef/name").and_then(Value::as_str) == Some(p),
    }
}

/// Adds one InferenceObjective or InferenceModelRewrite object to `into`.
pub fn add_object(into: &mut Objects, obj: &Value) -> Result<(), ObjectError> {
    let kind = field(obj, "/kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = field(obj, "/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let bad = |reason: &str| ObjectError {
        kind: kind.to_owned(),
        name: name.clone(),
        reason: reason.to_owned(),
    };
    if name.is_empty() {
        return Err(bad("metadata.name is required"));
    }
    match kind {
        "InferenceObjective" => {
            let priority = match field(obj, "/spec/priority") {
                None | Some(Value::Null) => 0,
                Some(v) => v
                    .as_i64()
                    .and_then(|p| i32::try_from(p).ok())
                    .ok_or_else(|| bad("spec.priority must be an integer"))?,
            };
            into.priorities.insert(name, priority);
        }
        "InferenceModelRewrite" => {
            let rules = field(obj, "/spec/rules")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("spec.rules must be a list"))?;
            let created = field(obj, "/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            for rule in rules {
                into.rules
                    .push(parse_rule(rule, &name, &created).map_err(|r| bad(&r))?);
            }
        }
        other => return Err(bad(&format!("unsupported kind {other:?}"))),
    }
    Ok(())
}

fn parse_rule(rule: &Value, object: &str, created: &str) -> Result<RewriteRule, String> {
    let mut models = Vec::new();
    for m in rule
        .get("matches")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(model) = m.get("model") else {
            continue;
        };
        let kind = model.get("type").and_then(Value::as_str).unwrap_or("Exact");
        if kind != "Exact" {
            return Err(format!("match type {kind:?} is not supported (Exact only)"));
        }
        let value = model
            .get("value")
            .and_then(Value::as_str)
            .ok_or("a model match needs a value")?;
        models.push(value.to_owned());
    }
    let mut targets = Vec::new();
    for t in rule
        .get("targets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let target = t
            .get("modelRewrite")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or("a target needs modelRewrite")?;
        let weight = t.get("weight").and_then(Value::as_u64).unwrap_or(1);
        targets.push((target.to_owned(), u32::try_from(weight).unwrap_or(u32::MAX)));
    }
    if targets.is_empty() {
        return Err("a rule needs at least one target".into());
    }
    Ok(RewriteRule {
        object: object.to_owned(),
        models,
        targets,
        created: created.to_owned(),
    })
}

/// Parses a multi-document YAML file of objects (static mode).
pub fn parse_file(text: &str, pool: Option<&str>) -> Result<Objects, ObjectError> {
    let mut out = Objects::default();
    for (i, doc) in text.split("\n---").enumerate() {
        if doc
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        let v: Value = serde_saphyr::from_str(doc).map_err(|e| ObjectError {
            kind: "document".into(),
            name: i.to_string(),
            reason: e.to_string(),
        })?;
        if for_pool(&v, pool) {
            add_object(&mut out, &v)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rewrite(name: &str, created: &str, matches: &[&str], targets: &[(&str, u32)]) -> Value {
        json!({"kind": "InferenceModelRewrite",
               "metadata": {"name": name, "creationTimestamp": created},
               "spec": {"poolRef": {"name": "pool"}, "rules": [{
                   "matches": matches.iter().map(|m| json!({"model": {"value": m}})).collect::<Vec<_>>(),
                   "targets": targets.iter().map(|(t, w)| json!({"modelRewrite": t, "weight": w})).collect::<Vec<_>>()}]}})
    }

    #[test]
    fn priorities_default_to_zero() {
        let p = Policy::new();
        let mut o = Objects::default();
        add_object(&mut o, &json!({"kind": "InferenceObjective", "metadata": {"name": "batch"}, "spec": {"priority": -1}})).unwrap();
        p.install(o);
        assert_eq!(p.priority(Some("batch")), -1);
        assert_eq!(p.priority(Some("other")), 0);
        assert_eq!(p.priority(None), 0);
    }

    #[test]
    fn exact_rules_beat_generic_ones_and_older_wins() {
        let mut o = Objects::default();
        add_object(
            &mut o,
            &rewrite("generic", "2026-01-01T00:00:00Z", &[], &[("base", 1)]),
        )
        .unwrap();
        add_object(
            &mut o,
            &rewrite("new", "2026-03-01T00:00:00Z", &["a"], &[("a-new", 1)]),
        )
        .unwrap();
        add_object(
            &mut o,
            &rewrite("old", "2026-02-01T00:00:00Z", &["a"], &[("a-old", 1)]),
        )
        .unwrap();
        let p = Policy::new();
        p.install(o);
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(p.rewrite("a", &mut rng).unwrap().target, "a-old");
        assert_eq!(p.rewrite("z", &mut rng).unwrap().target, "base");
        assert!(p.model_names().contains(&"a-new".to_owned()));
    }

    #[test]
    fn targets_split_by_weight() {
        let mut o = Objects::default();
        add_object(
            &mut o,
            &rewrite("split", "t", &["m"], &[("x", 3), ("y", 1)]),
        )
        .unwrap();
        let p = Policy::new();
        p.install(o);
        let mut rng = fastrand::Rng::with_seed(7);
        let xs = (0..4000)
            .filter(|_| p.rewrite("m", &mut rng).unwrap().target == "x")
            .count();
        assert!((2800..3200).contains(&xs), "{xs}");
    }

    #[test]
    fn file_of_manifests_for_this_pool() {
        let text = "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\nmetadata: {name: hi}\nspec: {priority: 5, poolRef: {name: pool}}\n---\nkind: InferenceObjective\nmetadata: {name: elsewhere}\nspec: {priority: 9, poolRef: {name: other}}\n";
        let o = parse_file(text, Some("pool")).unwrap();
        assert_eq!(o.priorities, HashMap::from([("hi".to_owned(), 5)]));
        let e = parse_file(
            "kind: InferenceObjective\nmetadata: {name: x}\nspec: {priority: high}\n",
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("spec.priority"), "{e}");
    }
}
