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

use super::datalayer::DataLayer;
use super::params::Params;
use super::plugin_factory::{self, Built};
use crate::scheduling::Scheduler;
use crate::scheduling::framework::{Filter, Profile};
use crate::scheduling::plugins::decision_tree::DecisionTreeFilter;
use crate::scheduling::plugins::max_score::MaxScorePicker;
use crate::scheduling::plugins::prefix::{PrefixCachePlugin, PrefixObserver};
use crate::scheduling::plugins::utilization::{self, SaturationDetector, UtilizationDetector};

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
    #[serde(default)]
    saturation_detector: Option<RawPluginRef>,
    #[serde(default)]
    data_layer: Option<RawDataLayer>,
    #[serde(default)]
    parser: Option<RawPluginRef>,
    #[serde(default)]
    flow_control: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPluginRef {
    #[serde(default)]
    plugin_ref: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataLayer {
    #[serde(default)]
    sources: Vec<RawSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSource {
    plugin_ref: String,
    #[serde(default)]
    extractors: Vec<RawPluginRef>,
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
    if raw.flow_control.is_some() {
        return Err(err("flowControl", super::feature_gates::NO_FLOW_CONTROL));
    }
    super::feature_gates::check(&raw.feature_gates)?;
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
            Built::Utilization(u) => profile.filters.push(u),
            Built::ProfileHandler => {}
            Built::MetricsSource(_) | Built::MetricsExtractor(_) | Built::Parser => {
                return Err(err(
                    format!("{field}.pluginRef"),
                    format!("{kind} is not a scheduling plugin"),
                ));
            }
        }
    }
    Ok((profile, prefixes))
}

/// A built config: the scheduler and what it says about scraping.
#[derive(Debug)]
pub struct LoadedConfig {
    pub scheduler: Scheduler,
    pub data_layer: DataLayer,
}

/// Parses and builds a scheduler from config text (YAML or JSON).
pub fn build_scheduler(
    text: &str,
    observer: Option<Arc<dyn PrefixObserver>>,
) -> Result<Scheduler, PickerConfigError> {
    build_config(text, observer).map(|c| c.scheduler)
}

/// Parses and builds everything a config describes, injecting the Go EPP's defaults: a
/// profile of every filter, scorer and picker when none is given, the max-score picker, the
/// utilization detector, the OpenAI parser, and the metrics source and extractor.
pub fn build_config(
    text: &str,
    observer: Option<Arc<dyn PrefixObserver>>,
) -> Result<LoadedConfig, PickerConfigError> {
    let raw = parse_document(text)?;
    let reg = register_plugins(&raw.plugins, observer.as_ref())?;
    let default_profile;
    let profile_raw = match raw.scheduling_profiles.as_slice() {
        [] => {
            default_profile = implicit_profile(&raw.plugins, &reg);
            &default_profile
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
    check_parser(raw.parser.as_ref(), &reg)?;
    let scheduler = Scheduler::new(profile, prefixes)
        .with_saturation(saturation_detector(raw.saturation_detector.as_ref(), &reg)?);
    Ok(LoadedConfig {
        scheduler,
        data_layer: data_layer(raw.data_layer.as_ref(), &raw.plugins, &reg)?,
    })
}

/// The profile the Go EPP assumes without `schedulingProfiles`: every filter, scorer and
/// picker, in the order the plugins are listed, scorers weighted 1.
fn implicit_profile(plugins: &[RawPlugin], reg: &Registry) -> RawProfile {
    let refs = plugins
        .iter()
        .map(|p| p.name.clone().unwrap_or_else(|| p.kind.clone()))
        .filter(|name| {
            reg.by_name.get(name).is_some_and(|(_, b)| {
                matches!(
                    b,
                    Built::Prefix { .. }
                        | Built::Scorer(_)
                        | Built::Filter(_)
                        | Built::Utilization(_)
                        | Built::Picker(_)
                        | Built::LoadProducer(_)
                )
            })
        })
        .map(|plugin_ref| RawRef {
            plugin_ref,
            weight: None,
        })
        .collect();
    RawProfile {
        name: "default".into(),
        plugins: refs,
    }
}

/// `saturationDetector.pluginRef`: a `utilization-detector` plugin, or (unset, or naming the
/// type) one with default parameters.
fn saturation_detector(
    raw: Option<&RawPluginRef>,
    reg: &Registry,
) -> Result<Arc<dyn SaturationDetector>, PickerConfigError> {
    let name = raw
        .map(|r| r.plugin_ref.as_str())
        .filter(|n| !n.is_empty())
        .unwrap_or(utilization::TYPE);
    match reg.by_name.get(name) {
        Some((_, Built::Utilization(u))) => Ok(u.clone()),
        Some((kind, _)) => Err(err(
            "saturationDetector.pluginRef",
            format!("{kind} is not a saturation detector"),
        )),
        None if name == utilization::TYPE => Ok(Arc::new(UtilizationDetector::default())),
        None => Err(err(
            "saturationDetector.pluginRef",
            format!("no plugin named {name:?}"),
        )),
    }
}

/// `parser.pluginRef`: epp parses OpenAI-style bodies only (`openai-parser`).
fn check_parser(raw: Option<&RawPluginRef>, reg: &Registry) -> Result<(), PickerConfigError> {
    let Some(name) = raw.map(|r| r.plugin_ref.as_str()).filter(|n| !n.is_empty()) else {
        return Ok(());
    };
    match reg.by_name.get(name) {
        Some((_, Built::Parser)) => Ok(()),
        Some((kind, _)) => Err(err("parser.pluginRef", format!("{kind} is not a parser"))),
        None if name == "openai-parser" => Ok(()),
        None => Err(err("parser.pluginRef", format!("no plugin named {name:?}"))),
    }
}

/// The data source and extractor: those the `dataLayer` section wires (one source, one
/// extractor), else the ones listed among the plugins.
fn data_layer(
    raw: Option<&RawDataLayer>,
    plugins: &[RawPlugin],
    reg: &Registry,
) -> Result<DataLayer, PickerConfigError> {
    let mut out = DataLayer::default();
    let Some(raw) = raw else {
        for p in plugins {
            let name = p.name.clone().unwrap_or_else(|| p.kind.clone());
            match reg.by_name.get(&name).map(|(_, b)| b) {
                Some(Built::MetricsSource(s)) if out.source.is_none() => {
                    out.source = Some(s.clone())
                }
                Some(Built::MetricsExtractor(m)) if out.mappings.is_none() => {
                    out.mappings = Some(m.clone());
                }
                _ => {}
            }
        }
        return Ok(out);
    };
    if raw.sources.len() > 1 {
        return Err(err("dataLayer.sources", "epp supports one metrics source"));
    }
    for (i, source) in raw.sources.iter().enumerate() {
        let field = format!("dataLayer.sources[{i}]");
        match reg.get(&source.plugin_ref, &format!("{field}.pluginRef"))? {
            (_, Built::MetricsSource(s)) => out.source = Some(s.clone()),
            (kind, _) => {
                return Err(err(
                    format!("{field}.pluginRef"),
                    format!("{kind} is not a data source"),
                ));
            }
        }
        if source.extractors.len() > 1 {
            return Err(err(
                format!("{field}.extractors"),
                "epp supports one extractor",
            ));
        }
        for (j, e) in source.extractors.iter().enumerate() {
            let f = format!("{field}.extractors[{j}].pluginRef");
            match reg.get(&e.plugin_ref, &f)? {
                (_, Built::MetricsExtractor(m)) => out.mappings = Some(m.clone()),
                (kind, _) => return Err(err(f, format!("{kind} is not an extractor"))),
            }
        }
    }
    Ok(out)
}

/// Reads `--config-file` or uses `--config-text`.
pub fn load(
    file: Option<&std::path::Path>,
    text: Option<&str>,
    observer: Option<Arc<dyn PrefixObserver>>,
) -> Result<Option<LoadedConfig>, PickerConfigError> {
    let text = match (file, text) {
        (Some(_), Some(_)) => {
            return Err(err("--config-file/--config-text", "give one, not both"));
        }
        (Some(path), None) => std::fs::read_to_string(path)
            .map_err(|e| err(format!("--config-file {}", path.display()), e.to_string()))?,
        (None, Some(t)) => t.to_owned(),
        (None, None) => return Ok(None),
    };
    build_config(&text, observer).map(Some)
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
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: prefix-cache-scorer\n  parameters: {blockSizeTokens: 32, maxPrefixBlocksToMatch: 10, lruCapacityPerServer: 99, autoTune: false, respectEnablePrefixCaching: false, learnCapacity: false}\n- {name: pick, type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}\nschedulingProfiles:\n- name: p\n  plugins: [{pluginRef: prefix-cache-scorer, weight: 5}, {pluginRef: pick}]\n",
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
        assert!(!cfg.respect_enable_prefix_caching);
        assert!(!cfg.learn_capacity);
        let defaults = crate::scheduling::plugins::prefix::PrefixConfig::default();
        assert!(defaults.respect_enable_prefix_caching && defaults.learn_capacity);
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
                "plugins: []\nflowControl: {maxBytes: 1Gi}\nschedulingProfiles: [{name: a}]\n",
                "flowControl",
            ),
            (
                "plugins:\n- type: queue-scorer\nsaturationDetector: {pluginRef: queue-scorer}\nschedulingProfiles: [{name: a}]\n",
                "saturationDetector.pluginRef",
            ),
            (
                "plugins:\n- type: queue-scorer\ndataLayer: {sources: [{pluginRef: queue-scorer}]}\nschedulingProfiles: [{name: a}]\n",
                "dataLayer.sources[0].pluginRef",
            ),
            (
                "plugins:\n- type: metrics-data-source\n  parameters: {scheme: ftp}\nschedulingProfiles: [{name: a}]\n",
                "plugins[0].parameters.scheme",
            ),
            (
                "plugins:\n- type: core-metrics-extractor\n  parameters: {engineConfigs: [{name: x, kvUsageSpec: 'a{b'}]}\nschedulingProfiles: [{name: a}]\n",
                "plugins[0].parameters.engineConfigs",
            ),
            (
                "plugins:\n- type: prefill-cost-scorer\n  parameters: {saturationWindowSeconds: 0}\nschedulingProfiles: [{name: a}]\n",
                "plugins[0].parameters.saturationWindowSeconds",
            ),
            (
                "plugins:\n- type: prefill-cost-scorer\n  parameters: {saturationRatio: -1}\nschedulingProfiles: [{name: a}]\n",
                "plugins[0].parameters.saturationRatio",
            ),
            (
                "plugins:\n- type: prefill-cost-scorer\n  parameters: {priceEvictions: maybe}\nschedulingProfiles: [{name: a}]\n",
                "plugins[0].parameters.priceEvictions",
            ),
            (
                "plugins:\n- type: prefix-cache-scorer\n  parameters: {learnCapacity: 2}\nschedulingProfiles: [{name: a}]\n",
                "plugins[0].parameters.learnCapacity",
            ),
            (
                "plugins:\n- type: utilization-detector\n  parameters: {kvCacheUtilThreshold: 1.5}\nschedulingProfiles: [{name: a}]\n",
                "plugins[0].parameters.kvCacheUtilThreshold",
            ),
            (
                "plugins: []\nparser: {pluginRef: vllmgrpc-parser}\nschedulingProfiles: [{name: a}]\n",
                "parser.pluginRef",
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

    /// GIE v1.5.0's chart config: no picker, no profile handler, a data source and extractor.
    #[test]
    fn gie_chart_config_gets_the_injected_defaults() {
        let text = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
  parameters:
    scheme: "https"
    path: "/prometheus/metrics"
    insecureSkipVerify: true
- type: core-metrics-extractor
  parameters:
    defaultEngine: "sglang"
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"#;
        let c = build_config(text, None).unwrap();
        assert_eq!(c.scheduler.profile().picker.name(), "max-score-picker");
        let source = c.data_layer.source.unwrap();
        assert_eq!(source.https, Some(true));
        assert_eq!(source.path.as_deref(), Some("/prometheus/metrics"));
        let mappings = c.data_layer.mappings.unwrap();
        assert_eq!(mappings.default_mapping().name, "sglang");
    }

    #[test]
    fn no_profile_means_every_scheduling_plugin_with_weight_one() {
        let text = format!(
            "{HEAD}plugins:\n- type: queue-scorer\n- type: utilization-detector\n  parameters: {{queueDepthThreshold: 9, headroom: 0.5}}\n- type: random-picker\n- type: openai-parser\nparser: {{pluginRef: openai-parser}}\nsaturationDetector: {{pluginRef: utilization-detector}}\ndataLayer: {{sources: []}}\n"
        );
        let c = build_config(&text, None).unwrap();
        let p = c.scheduler.profile();
        assert_eq!(names(&c.scheduler), vec![("queue-scorer".to_owned(), 1.0)]);
        assert_eq!(p.filters[0].name(), "utilization-detector");
        assert_eq!(p.picker.name(), "random-picker");
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
