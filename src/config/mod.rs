//! Configuration: environment variables of the Go EPP (this module), command-line flags (in
//! `main.rs`), and the static endpoints file.

pub mod datalayer;
pub mod endpoints_file;
pub mod env;
pub mod feature_gates;
pub mod params;
pub mod picker_config;
pub mod plugin_factory;

/// A configuration problem, naming the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Env {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("endpoints file {path}: {reason}")]
    EndpointsFile { path: String, reason: String },
    #[error("--endpoints: {0}")]
    Endpoints(String),
    #[error(transparent)]
    PickerConfig(#[from] picker_config::PickerConfigError),
}
