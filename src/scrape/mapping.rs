//! Which metric on a model server's page means what: one [`EngineMapping`] per engine name,
//! built in for vllm, sglang, trtllm-serve, triton-tensorrt-llm and triton (the Go EPP's
//! `core-metrics-extractor` defaults), replaced or extended by `engineConfigs` in the config
//! file, and by the Go EPP's five legacy metric flags for the default engine.
//!
//! A metric spec is `name` or `name{label=value,label2="value 2"}`: the series of `name`
//! whose labels include every pair given. An empty spec means "not exported by this engine".

use std::collections::HashMap;
use std::sync::Arc;

/// A metric family, optionally narrowed to series with some label values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSpec {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

/// Why a spec or an engine config is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metric spec {spec:?}: {reason}")]
pub struct SpecError {
    pub spec: String,
    pub reason: String,
}

impl MetricSpec {
    /// Parses a spec; `Ok(None)` for the empty spec.
    pub fn parse(spec: &str) -> Result<Option<MetricSpec>, SpecError> {
        let bad = |reason: &str| SpecError {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let s = spec.trim();
        if s.is_empty() {
            return Ok(None);
        }
        let (name, rest) = match s.find('{') {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(bad("invalid metric name"));
        }
        let mut labels = Vec::new();
        if let Some(rest) = rest {
            let inner = rest.strip_suffix('}').ok_or_else(|| bad("missing '}'"))?;
            for pair in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| bad("a label matcher needs '='"))?;
                let v = v.trim().trim_matches('"');
                labels.push((k.trim().to_owned(), v.to_owned()));
            }
        }
        Ok(Some(MetricSpec {
            name: name.to_owned(),
            labels,
        }))
    }

    fn one(spec: &str) -> Option<MetricSpec> {
        // Only for the built-in tables, which are valid.
        MetricSpec::parse(spec).ok().flatten()
    }
}

/// Where an engine reports its KV-cache geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheInfo {
    None,
    /// An info metric whose labels carry the block size and the block count.
    Labels {
        spec: MetricSpec,
        block_size_label: String,
        blocks_label: String,
    },
    /// Two gauges.
    Gauges {
        block_size: Option<MetricSpec>,
        blocks: Option<MetricSpec>,
    },
}

/// One engine's metric names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineMapping {
    pub name: String,
    /// Waiting requests; the first spec present on the page counts.
    pub queued: Vec<MetricSpec>,
    pub running: Vec<MetricSpec>,
    /// KV-cache use, 0–1.
    pub kv_usage: Vec<MetricSpec>,
    /// vLLM-style LoRA info (labels `running_lora_adapters`, `waiting_lora_adapters`,
    /// `max_lora`).
    pub lora: Option<MetricSpec>,
    pub cache: CacheInfo,
}

impl EngineMapping {
    /// The names of its load families (waiting, running, KV use).
    pub fn load_names(&self) -> impl Iterator<Item = &str> {
        self.queued
            .iter()
            .chain(&self.running)
            .chain(&self.kv_usage)
            .map(|s| s.name.as_str())
    }

    /// Every metric name this mapping reads.
    pub fn metric_names(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .queued
            .iter()
            .chain(&self.running)
            .chain(&self.kv_usage)
            .chain(&self.lora)
            .map(|s| s.name.as_str())
            .collect();
        match &self.cache {
            CacheInfo::None => {}
            CacheInfo::Labels { spec, .. } => out.push(&spec.name),
            CacheInfo::Gauges { block_size, blocks } => {
                out.extend(block_size.iter().chain(blocks).map(|s| s.name.as_str()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

fn specs(list: &[&str]) -> Vec<MetricSpec> {
    list.iter().filter_map(|s| MetricSpec::one(s)).collect()
}

fn info(spec: &str, block_size_label: &str, blocks_label: &str) -> CacheInfo {
    match MetricSpec::one(spec) {
        Some(spec) => CacheInfo::Labels {
            spec,
            block_size_label: block_size_label.to_owned(),
            blocks_label: blocks_label.to_owned(),
        },
        None => CacheInfo::None,
    }
}

/// The built-in engines.
pub fn builtin() -> Vec<EngineMapping> {
    vec![
        EngineMapping {
            name: "vllm".into(),
            queued: specs(&["vllm:num_requests_waiting"]),
            running: specs(&["vllm:num_requests_running"]),
            // vLLM before 0.10 named it gpu_cache_usage_perc.
            kv_usage: specs(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]),
            lora: MetricSpec::one("vllm:lora_requests_info"),
            cache: info("vllm:cache_config_info", "block_size", "num_gpu_blocks"),
        },
        EngineMapping {
            name: "sglang".into(),
            queued: specs(&["sglang:num_queue_reqs"]),
            running: specs(&["sglang:num_running_reqs"]),
            kv_usage: specs(&["sglang:token_usage"]),
            lora: None,
            cache: info("sglang:cache_config_info", "page_size", "num_pages"),
        },
        EngineMapping {
            name: "trtllm-serve".into(),
            queued: specs(&["trtllm_num_requests_waiting"]),
            running: specs(&["trtllm_num_requests_running"]),
            kv_usage: specs(&["trtllm_kv_cache_utilization"]),
            lora: None,
            cache: CacheInfo::Gauges {
                block_size: MetricSpec::one("trtllm_kv_cache_tokens_per_block"),
                blocks: MetricSpec::one("trtllm_kv_cache_max_blocks"),
            },
        },
        EngineMapping {
            name: "triton-tensorrt-llm".into(),
            queued: specs(&["nv_trt_llm_request_metrics{request_type=waiting}"]),
            running: specs(&["nv_trt_llm_request_metrics{request_type=scheduled}"]),
            kv_usage: specs(&["nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"]),
            lora: None,
            cache: CacheInfo::Gauges {
                block_size: MetricSpec::one(
                    "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}",
                ),
                blocks: MetricSpec::one(
                    "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}",
                ),
            },
        },
        EngineMapping {
            name: "triton".into(),
            queued: specs(&["nv_inference_pending_request_count"]),
            running: specs(&["nv_inference_exec_count"]),
            kv_usage: Vec::new(),
            lora: None,
            cache: CacheInfo::None,
        },
    ]
}

/// One `engineConfigs` entry of `core-metrics-extractor` (field names as in the Go EPP).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EngineConfig {
    pub name: String,
    #[serde(default)]
    pub queued_requests_spec: String,
    #[serde(default)]
    pub running_requests_spec: String,
    #[serde(default)]
    pub kv_usage_spec: String,
    #[serde(default)]
    pub lora_spec: String,
    #[serde(default)]
    pub cache_info_spec: String,
    #[serde(default)]
    pub cache_block_size_label_name: String,
    #[serde(default)]
    pub cache_num_blocks_label_name: String,
    #[serde(default)]
    pub cache_block_size_spec: String,
    #[serde(default)]
    pub cache_num_blocks_spec: String,
    /// Extra metrics the Go EPP stores as endpoint attributes; epp's plugins do not read
    /// them, so they are validated and otherwise ignored.
    #[serde(default)]
    pub custom_metrics: Vec<CustomMetric>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomMetric {
    pub attribute_key: String,
    pub metric_spec: String,
}

impl EngineConfig {
    pub fn to_mapping(&self) -> Result<EngineMapping, SpecError> {
        let one = |s: &str| MetricSpec::parse(s);
        let cache = if let Some(spec) = one(&self.cache_info_spec)? {
            let or = |v: &str, d: &str| {
                if v.is_empty() {
                    d.to_owned()
                } else {
                    v.to_owned()
                }
            };
            CacheInfo::Labels {
                spec,
                block_size_label: or(&self.cache_block_size_label_name, "block_size"),
                blocks_label: or(&self.cache_num_blocks_label_name, "num_gpu_blocks"),
            }
        } else {
            let block_size = one(&self.cache_block_size_spec)?;
            let blocks = one(&self.cache_num_blocks_spec)?;
            if block_size.is_none() && blocks.is_none() {
                CacheInfo::None
            } else {
                CacheInfo::Gauges { block_size, blocks }
            }
        };
        for c in &self.custom_metrics {
            one(&c.metric_spec)?;
        }
        Ok(EngineMapping {
            name: self.name.clone(),
            queued: one(&self.queued_requests_spec)?.into_iter().collect(),
            running: one(&self.running_requests_spec)?.into_iter().collect(),
            kv_usage: one(&self.kv_usage_spec)?.into_iter().collect(),
            lora: one(&self.lora_spec)?,
            cache,
        })
    }
}

/// The Go EPP's legacy metric flags; `Some("")` disables a metric.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegacyNames {
    pub queued: Option<String>,
    pub running: Option<String>,
    pub kv_usage: Option<String>,
    pub lora: Option<String>,
    pub cache_info: Option<String>,
}

/// Pod labels naming a pod's engine, in order: llm-d's, then GIE's older one.
pub const ENGINE_LABELS: [&str; 2] = [
    "llm-d.ai/engine-type",
    "inference.networking.k8s.io/engine-type",
];

/// All engines, the default one, and the pod label that picks one.
#[derive(Debug, Clone)]
pub struct Mappings {
    engines: HashMap<String, Arc<EngineMapping>>,
    default_engine: String,
    /// The configured label key (`engineLabelKey`), tried before [`ENGINE_LABELS`].
    pub label_key: Option<String>,
}

impl Default for Mappings {
    fn default() -> Self {
        Self {
            engines: builtin()
                .into_iter()
                .map(|m| (m.name.clone(), Arc::new(m)))
                .collect(),
            default_engine: "vllm".into(),
            label_key: None,
        }
    }
}

impl Mappings {
    /// Built-ins, replaced or extended by `configs`, with `default_engine` (must exist).
    pub fn new(
        configs: &[EngineConfig],
        default_engine: Option<&str>,
        label_key: Option<&str>,
    ) -> Result<Self, SpecError> {
        let mut m = Mappings::default();
        for c in configs {
            m.engines.insert(c.name.clone(), Arc::new(c.to_mapping()?));
        }
        if let Some(d) = default_engine.filter(|d| !d.is_empty()) {
            if !m.engines.contains_key(d) {
                return Err(SpecError {
                    spec: d.to_owned(),
                    reason: "defaultEngine names no engine config".into(),
                });
            }
            m.default_engine = d.to_owned();
        }
        m.label_key = label_key.filter(|k| !k.is_empty()).map(str::to_owned);
        Ok(m)
    }

    /// Applies the legacy flags to the default engine.
    pub fn with_legacy(mut self, names: &LegacyNames) -> Result<Self, SpecError> {
        let mut m = (*self.default_mapping()).clone();
        let list = |v: &str| MetricSpec::parse(v).map(|s| s.into_iter().collect::<Vec<_>>());
        if let Some(v) = &names.queued {
            m.queued = list(v)?;
        }
        if let Some(v) = &names.running {
            m.running = list(v)?;
        }
        if let Some(v) = &names.kv_usage {
            m.kv_usage = list(v)?;
        }
        if let Some(v) = &names.lora {
            m.lora = MetricSpec::parse(v)?;
        }
        if let Some(v) = &names.cache_info {
            m.cache = match MetricSpec::parse(v)? {
                None => CacheInfo::None,
                Some(spec) => {
                    // sglang labels its geometry differently; keep the engine's label names.
                    let (bs, nb) = match &m.cache {
                        CacheInfo::Labels {
                            block_size_label,
                            blocks_label,
                            ..
                        } => (block_size_label.clone(), blocks_label.clone()),
                        _ => ("block_size".into(), "num_gpu_blocks".into()),
                    };
                    let (bs, nb) = if spec.name.starts_with("sglang:") {
                        ("page_size".into(), "num_pages".into())
                    } else {
                        (bs, nb)
                    };
                    CacheInfo::Labels {
                        spec,
                        block_size_label: bs,
                        blocks_label: nb,
                    }
                }
            };
        }
        self.engines
            .insert(self.default_engine.clone(), Arc::new(m));
        Ok(self)
    }

    pub fn default_mapping(&self) -> Arc<EngineMapping> {
        self.engines
            .get(&self.default_engine)
            .cloned()
            .unwrap_or_else(|| Arc::new(builtin().remove(0)))
    }

    /// The mapping of engine `name`, or the default one for an unknown or empty name.
    pub fn get(&self, name: &str) -> Arc<EngineMapping> {
        self.engines
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.default_mapping())
    }

    pub fn knows(&self, name: &str) -> bool {
        self.engines.contains_key(name)
    }

    /// Every engine's mapping, in name order.
    pub fn all(&self) -> Vec<Arc<EngineMapping>> {
        let mut out: Vec<_> = self.engines.values().cloned().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The engine a pod's labels name (configured key first), if any.
    pub fn engine_of<'a>(&self, labels: impl Fn(&str) -> Option<&'a str>) -> Option<&'a str> {
        self.label_key
            .iter()
            .map(String::as_str)
            .chain(ENGINE_LABELS)
            .find_map(labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_names_and_label_matchers() {
        assert_eq!(MetricSpec::parse("").unwrap(), None);
        let s = MetricSpec::parse(r#"nv_trt{request_type=waiting, tier="gold"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(s.name, "nv_trt");
        assert_eq!(
            s.labels,
            vec![
                ("request_type".into(), "waiting".into()),
                ("tier".into(), "gold".into())
            ]
        );
        assert!(MetricSpec::parse("bad name").is_err());
        assert!(MetricSpec::parse("m{a=b").is_err());
        assert!(MetricSpec::parse("m{a}").is_err());
    }

    #[test]
    fn configs_replace_builtins_and_legacy_flags_edit_the_default() {
        let custom = EngineConfig {
            name: "mine".into(),
            queued_requests_spec: "q".into(),
            kv_usage_spec: "kv{x=1}".into(),
            ..Default::default()
        };
        let m = Mappings::new(&[custom], Some("mine"), Some("example.com/engine")).unwrap();
        assert_eq!(m.get("unknown").name, "mine");
        assert_eq!(m.get("sglang").queued[0].name, "sglang:num_queue_reqs");
        let m = Mappings::default()
            .with_legacy(&LegacyNames {
                queued: Some("sglang:num_queue_reqs".into()),
                lora: Some(String::new()),
                cache_info: Some("sglang:cache_config_info".into()),
                ..Default::default()
            })
            .unwrap();
        let d = m.default_mapping();
        assert_eq!(d.queued[0].name, "sglang:num_queue_reqs");
        assert_eq!(d.lora, None);
        assert!(
            matches!(&d.cache, CacheInfo::Labels { block_size_label, .. } if block_size_label == "page_size")
        );
        assert!(Mappings::new(&[], Some("nope"), None).is_err());
        let labels = |k: &str| (k == "inference.networking.k8s.io/engine-type").then_some("sglang");
        assert_eq!(Mappings::default().engine_of(labels), Some("sglang"));
    }
}
