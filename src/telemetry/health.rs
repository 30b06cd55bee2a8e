//! gRPC health (`grpc.health.v1`) on `--grpc-health-port`: services `""` and `liveness` are
//! SERVING while the process runs; `readiness` and the ext_proc service name are SERVING only
//! once the datastore is synced with its endpoint source (static: at once; Kubernetes: after
//! the pool and pods were listed) and, with leader election, only on the leader.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::datastore::Datastore;
use crate::extproc::SERVICE_NAME;

/// Services whose status follows readiness.
pub const READY_SERVICES: [&str; 2] = ["readiness", SERVICE_NAME];

/// Keeps the health statuses current; `is_leader` gates readiness (always true without
/// leader election).
pub async fn maintain(
    reporter: HealthReporter,
    datastore: Arc<Datastore>,
    is_leader: impl Fn() -> bool + Send + 'static,
) {
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    let mut last = None;
    loop {
        let ready = datastore.is_ready() && is_leader();
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for s in READY_SERVICES {
                reporter.set_service_status(s, status).await;
            }
            tracing::info!(ready, "readiness changed");
            last = Some(ready);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
