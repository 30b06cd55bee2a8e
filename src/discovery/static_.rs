//! Static discovery: a fixed `--endpoints` list, or an `--endpoints-file` that is re-read when it
//! changes (checked every second), so endpoints can be added or removed without a restart. An
//! invalid edit is logged and the previous set kept.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

use crate::config::ConfigError;
use crate::config::endpoints_file;
use crate::datastore::{Datastore, EndpointSpec};

const POLL_EVERY: Duration = Duration::from_secs(1);

/// Installs a fixed endpoint list and marks the datastore ready.
pub fn install_list(datastore: &Datastore, specs: Vec<EndpointSpec>) {
    for s in &specs {
        tracing::info!(endpoint = %s.name, address = %s.address, "static endpoint");
    }
    datastore.set_endpoints(specs);
    datastore.set_ready(true);
}

/// Loads `path` now (failing if invalid) and watches it for changes.
pub fn watch_file(datastore: Arc<Datastore>, path: PathBuf) -> Result<JoinHandle<()>, ConfigError> {
    let specs = endpoints_file::read_file(&path)?;
    install_list(&datastore, specs);
    let mut seen = modified(&path);
    Ok(tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL_EVERY).await;
            let now = modified(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match endpoints_file::read_file(&path) {
                Ok(specs) => {
                    tracing::info!(path = %path.display(), endpoints = specs.len(), "endpoints file reloaded");
                    datastore.set_endpoints(specs);
                }
                Err(e) => tracing::error!(error = %e, "keeping previous endpoints"),
            }
        }
    }))
}

fn modified(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())))
}
