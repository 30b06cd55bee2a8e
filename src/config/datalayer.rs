//! The data-layer part of an EndpointPickerConfig: where model-server metrics are scraped
//! (`metrics-data-source`) and which metric means what (`core-metrics-extractor`), plus the
//! `dataLayer` section that wires sources to extractors. Parameter names and defaults are
//! the Go EPP's.
//!
//! | plugin | parameters (default) |
//! |---|---|
//! | `metrics-data-source` | `scheme` (http), `path` (/metrics), `insecureSkipVerify` (true), `interval` (every `--refresh-metrics-interval`) |
//! | `core-metrics-extractor` | `engineLabelKey` (llm-d.ai/engine-type, then inference.networking.k8s.io/engine-type), `defaultEngine` (vllm), `engineConfigs` ([] — see [`crate::scrape::mapping::EngineConfig`]) |

use std::time::Duration;

use super::params::Params;
use super::picker_config::PickerConfigError;
use crate::scrape::mapping::{EngineConfig, Mappings};

/// `metrics-data-source` parameters; `None` leaves the flag value (or default) in place.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSource {
    pub https: Option<bool>,
    pub path: Option<String>,
    pub insecure_skip_verify: Option<bool>,
    pub interval: Option<Duration>,
}

pub fn metrics_source(p: &mut Params<'_>) -> Result<MetricsSource, PickerConfigError> {
    let https = match p.string("scheme")?.as_deref() {
        None => None,
        Some("http") => Some(false),
        Some("https") => Some(true),
        Some(other) => {
            return Err(p.error("scheme", format!("{other:?} is not http or https")));
        }
    };
    let path = p.string("path")?;
    if let Some(path) = &path
        && !path.starts_with('/')
    {
        return Err(p.error("path", "must start with '/'"));
    }
    let interval = match p.string("interval")? {
        None => None,
        Some(s) => Some(
            crate::duration::parse(&s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| p.error("interval", format!("{s:?} is not a positive duration")))?,
        ),
    };
    for key in ["caCertPath", "clientCertPath", "clientKeyPath"] {
        if p.string(key)?.is_some() {
            return Err(p.error(
                key,
                "not supported: epp scrapes https with the system roots or insecureSkipVerify",
            ));
        }
    }
    Ok(MetricsSource {
        https,
        path,
        insecure_skip_verify: p.boolean("insecureSkipVerify")?,
        interval,
    })
}

pub fn metrics_extractor(p: &mut Params<'_>) -> Result<Mappings, PickerConfigError> {
    let label_key = p.string("engineLabelKey")?;
    let default_engine = p.string("defaultEngine")?;
    let configs: Vec<EngineConfig> = match p.get("engineConfigs") {
        None => Vec::new(),
        Some(v) => {
            serde_json::from_value(v).map_err(|e| p.error("engineConfigs", e.to_string()))?
        }
    };
    Mappings::new(&configs, default_engine.as_deref(), label_key.as_deref())
        .map_err(|e| p.error("engineConfigs", e.to_string()))
}

/// What a config says about scraping.
#[derive(Debug, Clone, Default)]
pub struct DataLayer {
    pub source: Option<MetricsSource>,
    pub mappings: Option<Mappings>,
}
