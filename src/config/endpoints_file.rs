//! Static endpoints: the `--endpoints ip:port,…` flag and the `--endpoints-file` YAML file.
//!
//! ```yaml
//! endpoints:
//!   - address: 127.0.0.1:8000          # where requests go (required)
//!     metricsAddress: 127.0.0.1:9000   # where /metrics is scraped (default: address)
//!     name: pod-a                      # default: the address
//!     engine: vllm                     # vllm | sglang | trtllm-serve | … (default: the
//!                                      # defaultEngine, vllm, or the engine the page shows)
//! ```

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use super::ConfigError;
use crate::datastore::{EndpointSpec, EngineType};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    endpoints: Vec<Item>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Item {
    address: String,
    metrics_address: Option<String>,
    name: Option<String>,
    engine: Option<String>,
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an ip:port address"))
}

/// Parses the `--endpoints` flag value.
pub fn parse_list(list: &str) -> Result<Vec<EndpointSpec>, ConfigError> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let a = addr(part).map_err(ConfigError::Endpoints)?;
        out.push(EndpointSpec::new(a.to_string(), a));
    }
    check_unique(&out).map_err(ConfigError::Endpoints)?;
    Ok(out)
}

/// Parses an endpoints file's text; `path` is only used in messages.
pub fn parse_file_text(path: &str, text: &str) -> Result<Vec<EndpointSpec>, ConfigError> {
    let err = |reason: String| ConfigError::EndpointsFile {
        path: path.to_owned(),
        reason,
    };
    let file: File = serde_saphyr::from_str(text).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::with_capacity(file.endpoints.len());
    for (i, item) in file.endpoints.into_iter().enumerate() {
        let field = |f: &str, e: String| err(format!("endpoints[{i}].{f}: {e}"));
        let address = addr(&item.address).map_err(|e| field("address", e))?;
        let metrics_address = match &item.metrics_address {
            Some(m) => addr(m).map_err(|e| field("metricsAddress", e))?,
            None => address,
        };
        let engine: EngineType = item
            .engine
            .as_deref()
            .map_or(Ok(EngineType::default()), str::parse)
            .map_err(|e| field("engine", e))?;
        out.push(EndpointSpec {
            name: item.name.unwrap_or_else(|| address.to_string()),
            address,
            metrics_address,
            engine,
        });
    }
    check_unique(&out).map_err(err)?;
    Ok(out)
}

/// Reads and parses an endpoints file.
pub fn read_file(path: &Path) -> Result<Vec<EndpointSpec>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::EndpointsFile {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    parse_file_text(&shown, &text)
}

fn check_unique(specs: &[EndpointSpec]) -> Result<(), String> {
    for (i, s) in specs.iter().enumerate() {
        if specs[..i].iter().any(|o| o.name == s.name) {
            return Err(format!("endpoint {:?} is listed twice", s.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_list() {
        let v = parse_list("127.0.0.1:8000, 127.0.0.1:8001,").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].name, "127.0.0.1:8001");
        assert!(parse_list("localhost:80").is_err());
        assert!(parse_list("127.0.0.1:1,127.0.0.1:1").is_err());
    }

    #[test]
    fn file_with_metrics_address_and_engine() {
        let v = parse_file_text(
            "f",
            "endpoints:\n  - address: 127.0.0.1:8000\n    metricsAddress: 127.0.0.1:9000\n    engine: sglang\n  - address: 127.0.0.1:8001\n    name: b\n",
        )
        .unwrap();
        assert_eq!(v[0].metrics_address.port(), 9000);
        assert_eq!(v[0].engine.as_str(), "sglang");
        assert_eq!(v[1].name, "b");
        assert_eq!(v[1].metrics_address.port(), 8001);
        assert!(!v[1].engine.is_named(), "no engine: the pool's default");
    }

    #[test]
    fn file_errors_name_the_field() {
        let e = parse_file_text("f", "endpoints:\n  - address: nope\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("endpoints[0].address"), "{e}");
        let e = parse_file_text(
            "f",
            "endpoints:\n  - address: 127.0.0.1:1\n    engine: \"not an engine!\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("endpoints[0].engine"), "{e}");
        let e = parse_file_text("f", "endpoints:\n  - address: 127.0.0.1:1\n    port: 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
    }
}
