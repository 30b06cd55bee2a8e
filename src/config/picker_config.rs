//! `EndpointPickerConfig`: the Go EPP's plugin configuration file (`--config-file`,
//! `--config-text`), which takes precedence over the scheduler environment variables.
//!
//! ```yaml
//! apiVersion: inference.networking.x-k8s.io/v1alpha1   # or llm-d.ai/v1alpha1
//! kind: EndpointPickerConfig
//! plugins:
//! - type: prefix-cache-scorer          # name defaults to the type
//!   parameters: {blockSize: 64, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250}
//! - type: queue-scorer
//! - name: picker
//!   type: max-score-picker
//! schedulingProfiles:
//! - name: default
//!   plugins:
//!   - pluginRef: prefix-cache-scorer
//!     weight: 3
//!   - pluginRef: queue-scorer            # weight defaults to 1
//!   - pluginRef: picker
//! ```
//!
//! A profile's plugins run in their role's place (filters in the order listed, scorers with
//! their weights, one picker — max-score by default, as the Go EPP injects it). Unknown types,
//! unknown parameters, missing references and bad values are startup errors naming the field.
//! The plugin types and their parameters are in [`super::plugin_factory`].

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::params::Params;
use super::plugin_factory::{self, Built};
use crate::scheduling::Scheduler;
use crate::scheduling::framework::{Filter, Profile};
use crate::scheduling::plugins::decision_tree::DecisionTreeFilter;
use crate::scheduling::plugins::max_score::MaxScorePicker;
use crate::scheduling::plugins::prefix::{PrefixCachePlugin, PrefixObserver};

/// A config problem: the field (path) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("EndpointPickerConfig: {field}: {reason}")]
pub struct PickerConfigError {
    pub field: String,
    pub reason: String,
}

pub(crate) fn err(field: impl Into<String>, reason: impl Into<String>) -> PickerConfigError {
    PickerConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

const API_VERSIONS: [&str; 2] = [
    "inference.networking.x-k8s.io/v1alpha1",
    "llm-d.ai/v1alpha1",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    api_version: String,
    kind: String,
    #[serde(default)]
    plugins: Vec<RawPlugin>,
    #[serde(default)]
    scheduling_profiles: Vec<RawProfile>,
    #[serde(default)]
    feature_gates: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    parameters: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    #[serde(default)]
    plugins: Vec<RawRef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRef {
    plugin_ref: String,
    #[serde(default)]
    weight: Option<f64>,
}

/// The plugins of a parsed config, by name: `(type, instance)`.
struct Registry {
    by_name: HashMap<String, (String, Built)>,
}

impl Registry {
    fn get(&self, name: &str, field: &str) -> Result<&(String, Built), PickerConfigError> {
        self.by_name
            .get(name)
            .ok_or_else(|| err(field, format!("no plugin named {name:?}")))
    }

    fn filter(&self, name: &str, field: &str) -> Result<Arc<dyn Filter>, PickerConfigError> {
        match &self.get(name, field)?.1 {
            Built::Filter(f) => Ok(f.clone()),
            _ => Err(err(field, format!("plugin {name:?} is not a filter"))),
        }
    }
}

/// A decision-tree node: `{pluginRef: name}` or an inline `{current, nextOn…}` tree.
fn tree_node(reg: &Registry, v: &Value, field: &str) -> Result<Arc<dyn Filter>, PickerConfigError> {
    let Value::Object(m) = v else {
        return Err(err(field, "must be a mapping"));
    };
    if let Some(r) = m.get("pluginRef") {
        if m.len() > 1 {
            return Err(err(
                field,
                "give either pluginRef or an inline tree, not both",
            ));
        }
        let name = r
            .as_str()
            .ok_or_else(|| err(format!("{field}.pluginRef"), "must be a string"))?;
        return reg.filter(name, &format!("{field}.pluginRef"));
    }
    Ok(Arc::new(decision_tree(reg, m, field)?))
}

fn decision_tree(
    reg: &Registry,
    m: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<DecisionTreeFilter, PickerConfigError> {
    const KEYS: [&str; 4] = [
        "current",
        "nextOnSuccess",
        "nextOnFailure",
        "nextOnSuccessOrFailure",
    ];
    if let Some(k) = m.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(err(format!("{field}.{k}"), "unknown parameter"));
    }
    let current = m
        .get("current")
        .ok_or_else(|| err(format!("{field}.current"), "required"))?;
    let node = |k: &str| -> Result<Option<Arc<dyn Filter>>, PickerConfigError> {
        m.get(k)
            .map(|v| tree_node(reg, v, &format!("{field}.{k}")))
            .transpose()
    };
    Ok(DecisionTreeFilter {
        name: crate::scheduling::plugins::decision_tree::TYPE.to_owned(),
        current: tree_node(reg, current, &format!("{field}.current"))?,
        next_on_success: node("nextOnSuccess")?,
        next_on_failure: node("nextOnFailure")?,
        next_on_success_or_failure: node("nextOnSuccessOrFailure")?,
    })
}

/// Parses the document and checks its header.
fn parse_document(text: &str) -> Result<RawConfig, PickerConfigError> {
    let raw: RawConfig =
        serde_saphyr::from_str(text).map_err(|e| err("(document)", e.to_string()))?;
    if !API_VERSIONS.contains(&raw.api_version.as_str()) {
        return Err(err(
            "apiVersion",
            format!("{:?} is not one of {API_VERSIONS:?}", raw.api_version),
        ));
    }
    if raw.kind != "EndpointPickerConfig" {
        return Err(err(
            "kind",
            format!("{:?} is not EndpointPickerConfig", raw.kind),
        ));
    }
    if !raw.feature_gates.is_empty() {
        tracing::warn!(gates = ?raw.feature_gates, "featureGates are accepted but have no effect in epp");
    }
    Ok(raw)
}

/// Instantiates every plugin: leaf plugins first, decision trees (which reference others)
/// after.
fn register_plugins(
    plugins: &[RawPlugin],
    observer: Option<&Arc<dyn PrefixObserver>>,
) -> Result<Registry, PickerConfigError> {
    let mut reg = Registry {
        by_name: HashMap::new(),
    };
    let mut trees: Vec<(usize, String, Option<Value>)> = Vec::new();
    for (i, p) in plugins.iter().enumerate() {
        let field = format!("plugins[{i}]");
        let name = p.name.clone().unwrap_or_else(|| p.kind.clone());
        if reg.by_name.contains_key(&name) || trees.iter().any(|(_, n, _)| *n == name) {
            return Err(err(
                format!("{field}.name"),
                format!("duplicate plugin name {name:?}"),
            ));
        }
        if p.kind == crate::scheduling::plugins::decision_tree::TYPE {
            trees.push((i, name, p.parameters.clone()));
            continue;
        }
        let mut params = Params::new(format!("{field}.parameters"), &p.parameters)?;
        let Some(built) = plugin_factory::build(&p.kind, &mut params, observer)? else {
            return Err(err(
                format!("{field}.type"),
                format!("unknown plugin type {:?}", p.kind),
            ));
        };
        params.finish()?;
        reg.by_name.insert(name, (p.kind.clone(), built));
    }
    for (i, name, params) in trees {
        let field = format!("plugins[{i}].parameters");
        let Some(Value::Object(m)) = params else {
            return Err(err(
                field,
                "decision-tree-filter needs parameters with `current`",
            ));
        };
        let tree = decision_tree(&reg, &m, &field)?;
        reg.by_name.insert(
            name,
            ("decision-tree-filter".into(), Built::Filter(Arc::new(tree))),
        );
    }
    Ok(reg)
}

/// The weight a profile gives a plugin: only scorers take one (default 1).
fn weight(r: &RawRef, kind: &str, built: &Built, field: &str) -> Result<f64, PickerConfigError> {
    match r.weight {
        None => Ok(1.0),
        Some(w) if built.is_scorer() && w.is_finite() && w >= 0.0 => Ok(w),
        Some(_) if built.is_scorer() => Err(err(format!("{field}.weight"), "must be a number ≥ 0")),
        Some(_) => Err(err(
            format!("{field}.weight"),
            format!("{kind} is not a scorer"),
        )),
    }
}

/// Assembles the (single) scheduling profile from the registry.
fn build_profile(
    raw: &RawProfile,
    reg: &Registry,
) -> Result<(Profile, Vec<Arc<PrefixCachePlugin>>), PickerConfigError> {
    let mut profile = Profile::new(raw.name.clone(), Arc::new(MaxScorePicker::default()));
    let mut picker_set = false;
    let mut prefixes = Vec::new();
    for (j, r) in raw.plugins.iter().enumerate() {
        let field = format!("schedulingProfiles[0].plugins[{j}]");
        let (kind, built) = reg.get(&r.plugin_ref, &format!("{field}.pluginRef"))?;
        let weight = weight(r, kind, built, &field)?;
        match built.clone() {
            Built::Prefix { plugin, scores } => {
                profile.pre_schedule.push(plugin.clone());
                if scores {
                    profile.scorers.push((plugin.clone(), weight));
                }
                profile.post_schedule.push(plugin.clone());
                prefixes.push(plugin);
            }
            Built::Scorer(s) => profile.scorers.push((s, weight)),
            Built::Filter(f) => profile.filters.push(f),
            Built::Picker(p) => {
                if picker_set {
                    return Err(err(field, "a profile has one picker"));
                }
                profile.picker = p;
                picker_set = true;
            }
            Built::LoadProducer(l) => profile.load = l,
            Built::ProfileHandler => {}
        }
    }
    Ok((profile, prefixes))
}

/// Parses and builds a scheduler from config text (YAML or JSON).
pub fn build_scheduler(
    text: &str,
    observer: Option<Arc<dyn PrefixObserver>>,
) -> Result<Scheduler, PickerConfigError> {
    let raw = parse_document(text)?;
    let reg = register_plugins(&raw.plugins, observer.as_ref())?;
    let profile_raw = match raw.scheduling_profiles.as_slice() {
        [] => {
            return Err(err(
                "schedulingProfiles",
                "at least one profile is required",
            ));
        }
        [p] => p,
        _ => {
            return Err(err(
                "schedulingProfiles",
                "only one profile is supported (single-profile-handler)",
            ));
        }
    };
    let (profile, prefixes) = build_profile(profile_raw, &reg)?;
    Ok(Scheduler::new(profile, prefixes))
}

/// Reads `--config-file` or uses `--config-text`.
pub fn load(
    file: Option<&std::path::Path>,
    text: Option<&str>,
    observer: Option<Arc<dyn PrefixObserver>>,
) -> Result<Option<Scheduler>, PickerConfigError> {
    let text = match (file, text) {
        (Some(_), Some(_)) => {
            return Err(err("--config-file/--config-text", "give one, not both"));
        }
        (Some(path), None) => std::fs::read_to_string(path)
            .map_err(|e| err(format!("--config-file {}", path.display()), e.to_string()))?,
        (None, Some(t)) => t.to_owned(),
        (None, None) => return Ok(None),
    };
    build_scheduler(&text, observer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::BlockHasher;

    const DEFAULT: &str = include_str!("../../config/default-plugins.yaml");

    fn names(s: &Scheduler) -> Vec<(String, f64)> {
        s.profile()
            .scorers
            .iter()
            .map(|(p, w)| (p.name().to_owned(), *w))
            .collect()
    }

    #[test]
    fn shipped_configs_build() {
        let s = build_scheduler(DEFAULT, None).unwrap();
        assert_eq!(names(&s), vec![("prefill-cost-scorer".to_owned(), 1.0)]);
        assert_eq!(s.profile().picker.name(), "max-score-picker");
        assert!(s.prefix_plugin().is_some());
        let gie = build_scheduler(include_str!("../../config/gie-plugins.yaml"), None).unwrap();
        assert_eq!(
            names(&gie),
            vec![
                ("queue-scorer".to_owned(), 2.0),
                ("kv-cache-utilization-scorer".to_owned(), 2.0),
                ("prefix-cache-scorer".to_owned(), 3.0)
            ]
        );
        let llmd = build_scheduler(include_str!("../../config/llm-d-plugins.yaml"), None).unwrap();
        assert_eq!(names(&llmd), vec![("token-load-scorer".to_owned(), 1.0)]);
        assert_eq!(
            llmd.profile().filters[0].name(),
            "prefix-cache-affinity-filter"
        );
    }

    #[test]
    fn parameters_reach_the_plugins() {
        let s = build_scheduler(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: prefix-cache-scorer\n  parameters: {blockSizeTokens: 32, maxPrefixBlocksToMatch: 10, lruCapacityPerServer: 99, autoTune: false}\n- {name: pick, type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}\nschedulingProfiles:\n- name: p\n  plugins: [{pluginRef: prefix-cache-scorer, weight: 5}, {pluginRef: pick}]\n",
            None,
        )
        .unwrap();
        let cfg = *s.prefix_plugin().unwrap().config();
        assert_eq!(
            cfg.hasher,
            BlockHasher {
                block_size: 128,
                max_blocks: 10,
                max_bytes: crate::index::hash::DEFAULT_MAX_BYTES,
            }
        );
        assert_eq!(cfg.lru_capacity_per_server, 99);
        assert!(!cfg.auto_tune);
        assert_eq!(names(&s), vec![("prefix-cache-scorer".to_owned(), 5.0)]);
    }

    #[test]
    fn decision_tree_with_refs_and_inline_nodes() {
        let text = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: low-queue-filter, parameters: {threshold: 10}}
- type: least-queue-filter
- type: least-kv-cache-filter
- name: tree
  type: decision-tree-filter
  parameters:
    current: {pluginRef: low-queue-filter}
    nextOnSuccessOrFailure:
      current: {pluginRef: least-queue-filter}
      nextOnSuccessOrFailure: {pluginRef: least-kv-cache-filter}
- type: random-picker
schedulingProfiles:
- name: v1
  plugins: [{pluginRef: tree}, {pluginRef: random-picker}]
"#;
        let s = build_scheduler(text, None).unwrap();
        assert_eq!(s.profile().filters.len(), 1);
        assert_eq!(s.profile().picker.name(), "random-picker");
    }

    fn error(text: &str) -> String {
        build_scheduler(text, None).unwrap_err().to_string()
    }

    const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "plugins:\n- type: magic-scorer\nschedulingProfiles: [{name: p}]\n",
                "plugins[0].type",
            ),
            (
                "plugins:\n- type: queue-scorer\n  parameters: {speed: 3}\nschedulingProfiles: [{name: p}]\n",
                "plugins[0].parameters.speed",
            ),
            (
                "plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSize: -4}\nschedulingProfiles: [{name: p}]\n",
                "plugins[0].parameters.blockSize",
            ),
            (
                "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins: [{pluginRef: nope}]\n",
                "schedulingProfiles[0].plugins[0].pluginRef",
            ),
            (
                "plugins:\n- type: random-picker\nschedulingProfiles:\n- name: p\n  plugins: [{pluginRef: random-picker, weight: 2}]\n",
                "schedulingProfiles[0].plugins[0].weight",
            ),
            (
                "plugins:\n- {name: t, type: decision-tree-filter, parameters: {current: {pluginRef: x}}}\nschedulingProfiles: [{name: p}]\n",
                "plugins[0].parameters.current.pluginRef",
            ),
            (
                "plugins: []\nschedulingProfiles: []\n",
                "schedulingProfiles",
            ),
            (
                "plugins: []\nschedulingProfiles: [{name: a}, {name: b}]\n",
                "schedulingProfiles",
            ),
            (
                "plugins: []\nbogus: 1\nschedulingProfiles: [{name: a}]\n",
                "bogus",
            ),
        ];
        for (body, field) in cases {
            let e = error(&format!("{HEAD}{body}"));
            assert!(e.contains(field), "{e:?} should name {field}");
        }
        assert!(error("apiVersion: v9\nkind: EndpointPickerConfig\n").contains("apiVersion"));
        assert!(error("apiVersion: llm-d.ai/v1alpha1\nkind: Pod\n").contains("kind"));
    }

    #[test]
    fn load_prefers_exactly_one_source() {
        assert!(load(None, None, None).unwrap().is_none());
        assert!(load(Some("x".as_ref()), Some("y"), None).is_err());
        let e = load(Some("/nonexistent/epp.yaml".as_ref()), None, None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/epp.yaml"));
        assert!(load(None, Some(DEFAULT), None).unwrap().is_some());
    }
}
