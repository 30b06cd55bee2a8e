//! gRPC health (`grpc.health.v1`) with the Go EPP's semantics, on `--grpc-health-port` and,
//! with `--health-checking`, on the ext_proc port too.
//!
//! "Synced" means the datastore holds its endpoint source's state (static: at once;
//! Kubernetes: after the pool and its pods were listed).
//!
//! * Without leader election every service name (`inference-extension`, `readiness`,
//!   `liveness`, `""`, the ext_proc service…) is SERVING exactly when synced.
//! * With leader election, `liveness` is always SERVING (a follower must not be restarted);
//!   `readiness`, `""` and the ext_proc service are SERVING when synced and leading; any other
//!   name is SERVICE_UNKNOWN.
//! * While draining after SIGTERM, everything but `liveness` is NOT_SERVING.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::datastore::Datastore;
use crate::extproc::SERVICE_NAME;

/// Health service names the Go EPP's charts probe.
pub const LIVENESS: &str = "liveness";
pub const READINESS: &str = "readiness";
pub const INFERENCE_EXTENSION: &str = "inference-extension";

/// What the health answers are computed from.
#[derive(Debug)]
pub struct HealthState {
    datastore: Arc<Datastore>,
    /// `Some` with leader election: whether this replica leads.
    leader: Option<Arc<AtomicBool>>,
    draining: AtomicBool,
}

impl HealthState {
    pub fn new(datastore: Arc<Datastore>, leader: Option<Arc<AtomicBool>>) -> Arc<Self> {
        Arc::new(Self {
            datastore,
            leader,
            draining: AtomicBool::new(false),
        })
    }

    /// From now on report NOT_SERVING (but live): epp is shutting down.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Ready to take traffic: synced, leading (with leader election), not draining.
    pub fn ready(&self) -> bool {
        self.datastore.is_ready()
            && !self.draining.load(Ordering::Acquire)
            && self
                .leader
                .as_ref()
                .is_none_or(|l| l.load(Ordering::Acquire))
    }

    /// The status of `service`; `None` for a name this configuration does not know.
    pub fn status(&self, service: &str) -> Option<ServingStatus> {
        let serving = |ok: bool| {
            if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        if self.leader.is_none() {
            return Some(serving(self.ready()));
        }
        match service {
            LIVENESS => Some(ServingStatus::Serving),
            READINESS | "" | SERVICE_NAME => Some(serving(self.ready())),
            _ => None,
        }
    }
}

/// The `grpc.health.v1.Health` service over a [`HealthState`].
#[derive(Debug, Clone)]
pub struct HealthService {
    state: Arc<HealthState>,
}

impl HealthService {
    pub fn server(state: Arc<HealthState>) -> HealthServer<Self> {
        HealthServer::new(Self { state })
    }
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        match self.state.status(&service) {
            Some(s) => Ok(Response::new(response(s))),
            None => Err(Status::not_found(format!("unknown service {service:?}"))),
        }
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    /// Sends the status at once and then on every change (checked every 200 ms).
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let state = self.state.clone();
        let stream = futures::stream::unfold(None, move |last: Option<ServingStatus>| {
            let (state, service) = (state.clone(), service.clone());
            async move {
                loop {
                    let now = state
                        .status(&service)
                        .unwrap_or(ServingStatus::ServiceUnknown);
                    if last != Some(now) {
                        return Some((Ok(response(now)), Some(now)));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Logs readiness changes (the Go EPP logs each probe; one line per change is enough).
pub async fn log_changes(state: Arc<HealthState>) {
    let mut last = None;
    loop {
        let ready = state.ready();
        if last != Some(ready) {
            tracing::info!(ready, "readiness changed");
            last = Some(ready);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::EndpointSpec;

    fn synced() -> Arc<Datastore> {
        let ds = Arc::new(Datastore::new());
        ds.set_endpoints(vec![EndpointSpec::new("a", ([10, 0, 0, 1], 8000).into())]);
        ds.set_ready(true);
        ds
    }

    #[test]
    fn without_leader_election_every_name_follows_sync() {
        let state = HealthState::new(synced(), None);
        for s in [
            INFERENCE_EXTENSION,
            READINESS,
            LIVENESS,
            "",
            SERVICE_NAME,
            "anything",
        ] {
            assert_eq!(state.status(s), Some(ServingStatus::Serving), "{s}");
        }
        state.start_draining();
        assert_eq!(
            state.status(INFERENCE_EXTENSION),
            Some(ServingStatus::NotServing)
        );
    }

    #[test]
    fn with_leader_election_only_readiness_follows_leadership() {
        let leader = Arc::new(AtomicBool::new(false));
        let state = HealthState::new(synced(), Some(leader.clone()));
        assert_eq!(state.status(LIVENESS), Some(ServingStatus::Serving));
        assert_eq!(state.status(READINESS), Some(ServingStatus::NotServing));
        assert_eq!(state.status(""), Some(ServingStatus::NotServing));
        assert_eq!(state.status(INFERENCE_EXTENSION), None);
        leader.store(true, Ordering::Release);
        assert_eq!(state.status(READINESS), Some(ServingStatus::Serving));
        assert_eq!(state.status(SERVICE_NAME), Some(ServingStatus::Serving));
    }
}
