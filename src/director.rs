//! Request control: from a parsed request to a scheduling decision.
//!
//! 1. take the datastore snapshot; none ⇒ 503;
//! 2. apply the subset hint (keep endpoints whose IP is listed; listed-but-empty ⇒ 503);
//! 3. prefer endpoints with fresh metrics (all of them if none is fresh, e.g. right after start);
//! 4. admission: a sheddable request (priority < 0) while every candidate is saturated ⇒ 429;
//! 5. run the scheduler; everything filtered out ⇒ 429.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::datastore::{Candidate, Datastore};
use crate::request::LlmRequest;
use crate::scheduling::{ScheduleError, ScheduleResult, Scheduler};

/// Why a request could not be routed; each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no ready endpoints")]
    NoEndpoints,
    #[error("no endpoint matches the subset hint")]
    SubsetEmpty,
    #[error("all endpoints are saturated; sheddable request dropped")]
    Shed,
    #[error("{0}")]
    Filtered(String),
}

impl RouteError {
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NoEndpoints | RouteError::SubsetEmpty => 503,
            RouteError::Shed | RouteError::Filtered(_) => 429,
        }
    }
}

/// Routes requests over a datastore with a scheduler.
#[derive(Debug)]
pub struct Director {
    pub datastore: Arc<Datastore>,
    pub scheduler: Arc<Scheduler>,
    pub staleness_threshold: Duration,
}

impl Director {
    pub fn new(
        datastore: Arc<Datastore>,
        scheduler: Arc<Scheduler>,
        staleness_threshold: Duration,
    ) -> Self {
        Self {
            datastore,
            scheduler,
            staleness_threshold,
        }
    }

    /// Picks the endpoint(s) for `request`. `subset`: `None` without a hint, otherwise the IPs
    /// the hint allows.
    pub fn route(
        &self,
        request: &LlmRequest,
        subset: Option<&[IpAddr]>,
    ) -> Result<ScheduleResult, RouteError> {
        let snapshot = self.datastore.snapshot();
        if snapshot.candidates.is_empty() {
            return Err(RouteError::NoEndpoints);
        }
        let now = Instant::now();
        let allowed =
            |c: &Candidate| subset.is_none_or(|ips| ips.contains(&c.endpoint.address.ip()));
        let in_subset = snapshot.candidates.iter().filter(|c| allowed(c));
        let fresh: Vec<Candidate> = in_subset
            .clone()
            .filter(|c| c.is_fresh(now, self.staleness_threshold))
            .cloned()
            .collect();
        let candidates = if fresh.is_empty() {
            in_subset.cloned().collect()
        } else {
            fresh
        };
        if candidates.is_empty() {
            return Err(RouteError::SubsetEmpty);
        }
        if request.priority < 0 && self.scheduler.is_saturated(&candidates) {
            return Err(RouteError::Shed);
        }
        self.scheduler
            .schedule(request, &candidates)
            .map_err(|e| match e {
                ScheduleError::NoCandidates => RouteError::NoEndpoints,
                e @ ScheduleError::AllFiltered { .. } => RouteError::Filtered(e.to_string()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::env::SchedulerEnv;
    use crate::datastore::{EndpointMetrics, EndpointSpec};

    fn director(n: u8) -> Director {
        let ds = Arc::new(Datastore::new());
        ds.set_endpoints(
            (0..n)
                .map(|i| EndpointSpec::new(format!("p{i}"), ([127, 0, 0, i + 1], 8000).into()))
                .collect(),
        );
        let env = SchedulerEnv {
            use_v2: true,
            enable_prefix: true,
            ..Default::default()
        };
        Director::new(ds, Arc::new(env.build()), Duration::from_secs(2))
    }

    #[test]
    fn empty_datastore_is_503() {
        let d = director(0);
        let e = d.route(&LlmRequest::default(), None).unwrap_err();
        assert_eq!((e.clone(), e.status()), (RouteError::NoEndpoints, 503));
    }

    #[test]
    fn subset_hint_restricts_and_empty_subset_is_503() {
        let d = director(3);
        let ip: IpAddr = [127, 0, 0, 2].into();
        for _ in 0..20 {
            let r = d.route(&LlmRequest::default(), Some(&[ip])).unwrap();
            assert_eq!(r.primary().endpoint.address.ip(), ip);
        }
        assert_eq!(
            d.route(&LlmRequest::default(), Some(&[])).unwrap_err(),
            RouteError::SubsetEmpty
        );
    }

    #[test]
    fn fresh_metrics_are_preferred() {
        let d = director(3);
        let eps = d.datastore.endpoints();
        d.datastore.update_metrics(
            eps[1].id,
            EndpointMetrics {
                updated: Some(Instant::now()),
                ..Default::default()
            },
        );
        for _ in 0..20 {
            let r = d.route(&LlmRequest::default(), None).unwrap();
            assert_eq!(r.primary().endpoint.id, eps[1].id);
        }
    }

    #[test]
    fn sheddable_request_is_429_when_saturated() {
        let d = director(2);
        for ep in d.datastore.endpoints() {
            d.datastore.update_metrics(
                ep.id,
                EndpointMetrics {
                    waiting_queue: 50,
                    updated: Some(Instant::now()),
                    ..Default::default()
                },
            );
        }
        let sheddable = LlmRequest {
            priority: -1,
            ..Default::default()
        };
        let e = d.route(&sheddable, None).unwrap_err();
        assert_eq!((e.clone(), e.status()), (RouteError::Shed, 429));
        assert!(d.route(&LlmRequest::default(), None).is_ok());
    }
}
