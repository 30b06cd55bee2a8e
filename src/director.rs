//! Request control: from a parsed request to a scheduling decision.
//!
//! 1. take the datastore snapshot; none ⇒ 503;
//! 2. apply the subset hint (keep endpoints whose IP is listed; listed-but-empty ⇒ 503);
//! 3. judge each endpoint's metrics ([`Health`]): stale, failing or never-scraped endpoints stay
//!    candidates — their load then comes from epp's own accounting and they lose ties — so one
//!    endpoint with fresh metrics never takes all traffic; only endpoints whose serving port
//!    refused the last scrape are left out, and only while another endpoint is reachable;
//!    so are endpoints ejected for answering with server errors ([`OutlierDetector`]), while
//!    another endpoint remains;
//! 4. admission: a sheddable request (priority < 0) while every candidate is saturated ⇒ 429;
//! 5. run the scheduler, which reserves the request's load on its target; everything filtered
//!    out ⇒ 429.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use crate::datastore::{
    Candidate, Datastore, Endpoint, Health, Moment, OutlierDetector, OutlierPolicy, Verdict,
};
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

/// The candidate list of a recent decision, reused while young (see
/// [`Director::with_candidate_reuse`]).
#[derive(Debug)]
struct Reuse {
    members: u64,
    built: Instant,
    candidates: Arc<[Candidate]>,
}

/// Routes requests over a datastore with a scheduler.
#[derive(Debug)]
pub struct Director {
    pub datastore: Arc<Datastore>,
    pub scheduler: Arc<Scheduler>,
    pub staleness_threshold: Duration,
    reuse_for: Duration,
    reuse: ArcSwapOption<Reuse>,
    outliers: OutlierDetector,
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
            reuse_for: Duration::ZERO,
            reuse: ArcSwapOption::empty(),
            outliers: OutlierDetector::default(),
        }
    }

    /// Ejects endpoints that keep answering with server errors by `policy` (default:
    /// [`OutlierPolicy::default`]).
    pub fn with_outlier_policy(mut self, policy: OutlierPolicy) -> Self {
        self.outliers = OutlierDetector::new(policy);
        self
    }

    /// Records the HTTP status of a response `endpoint` gave (see [`OutlierDetector`]).
    pub fn observe_response(&self, endpoint: &Endpoint, status: u16) -> Verdict {
        self.outliers.observe(endpoint, status, Instant::now(), || {
            self.datastore.endpoints()
        })
    }

    /// Reuses a decision's candidate list (endpoints with their metrics and health) for up to
    /// `age` when no endpoint joined or left meanwhile, instead of rebuilding it per request.
    /// Metrics then lag by at most `age` more — a few milliseconds against a 50 ms scrape —
    /// while epp's own load accounting, which the scorers read live, does not lag at all.
    pub fn with_candidate_reuse(mut self, age: Duration) -> Self {
        self.reuse_for = age;
        self
    }

    /// All endpoints with their health, rebuilt or reused.
    fn all_candidates(&self, now: Instant) -> Result<Arc<[Candidate]>, RouteError> {
        let members = self.datastore.membership();
        if let Some(r) = self.reuse.load().as_ref()
            && r.members == members
            && now.saturating_duration_since(r.built) < self.reuse_for
        {
            return Ok(r.candidates.clone());
        }
        let snapshot = self.datastore.snapshot();
        if snapshot.candidates.is_empty() {
            return Err(RouteError::NoEndpoints);
        }
        let mut list = snapshot.candidates.clone();
        for c in &mut list {
            c.assess(now, self.staleness_threshold);
        }
        let candidates: Arc<[Candidate]> = list.into();
        if !self.reuse_for.is_zero() {
            self.reuse.store(Some(Arc::new(Reuse {
                members,
                built: now,
                candidates: candidates.clone(),
            })));
        }
        Ok(candidates)
    }

    /// The endpoints `request` may go to, with their health judged now (step 1–3 above).
    pub fn candidates(&self, subset: Option<&[IpAddr]>) -> Result<Arc<[Candidate]>, RouteError> {
        let now = Instant::now();
        let all = self.all_candidates(now)?;
        let in_subset =
            |c: &Candidate| subset.is_none_or(|ips| ips.contains(&c.endpoint.address.ip()));
        let moment = self.outliers.enabled().then(|| Moment::of(now));
        let avoided = |c: &Candidate| {
            c.health == Health::Unreachable
                || moment.is_some_and(|m| c.endpoint.outlier.is_ejected_at(m))
        };
        if all.iter().all(|c| in_subset(c) && !avoided(c)) {
            return Ok(all);
        }
        if !all.iter().any(in_subset) {
            return Err(RouteError::SubsetEmpty);
        }
        let mut chosen: Vec<Candidate> = all
            .iter()
            .filter(|c| in_subset(c) && !avoided(c))
            .cloned()
            .collect();
        if chosen.is_empty() {
            // Only avoided endpoints in the subset: route anyway (Envoy reports the error).
            chosen = all.iter().filter(|c| in_subset(c)).cloned().collect();
        }
        Ok(chosen.into())
    }

    /// Picks the endpoint(s) for `request` and reserves its load there. `subset`: `None`
    /// without a hint, otherwise the IPs the hint allows.
    pub fn route(
        &self,
        request: &LlmRequest,
        subset: Option<&[IpAddr]>,
    ) -> Result<ScheduleResult, RouteError> {
        let candidates = self.candidates(subset)?;
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
    use crate::datastore::{EndpointMetrics, EndpointSpec, ScrapeFailure};

    fn request(prompt: &str) -> LlmRequest {
        LlmRequest {
            model: "m".into(),
            target_model: "m".into(),
            prompt: prompt.as_bytes().to_vec(),
            ..Default::default()
        }
    }

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

    fn fresh(q: u32) -> EndpointMetrics {
        EndpointMetrics {
            waiting_queue: Some(q),
            running: Some(0),
            kv_cache_usage: Some(0.1),
            updated: Some(Instant::now()),
            ..Default::default()
        }
    }

    #[test]
    fn one_fresh_endpoint_never_takes_all_traffic() {
        // Regression (issue 7): endpoints without fresh metrics used to be dropped whenever one
        // endpoint had fresh metrics, so that one took every request.
        let d = director(4);
        let eps = d.datastore.endpoints();
        d.datastore.update_metrics(eps[1].id, fresh(0));
        let mut held = Vec::new();
        let mut per = [0usize; 4];
        for i in 0..200 {
            let r = d
                .route(
                    &request(&format!("distinct prompt {i} {}", "x".repeat(300))),
                    None,
                )
                .unwrap();
            per[r.primary().endpoint.id as usize] += 1;
            held.push(r);
        }
        assert!(per.iter().all(|n| *n >= 30), "{per:?}");
        drop(held);
        assert!(eps.iter().all(|e| e.load.is_idle()));
    }

    #[test]
    fn unreachable_endpoints_are_avoided_while_others_serve() {
        let d = director(3);
        let eps = d.datastore.endpoints();
        d.datastore
            .scrape_failed(eps[0].id, ScrapeFailure::Unreachable);
        for i in 0..50 {
            let r = d.route(&request(&format!("p{i}")), None).unwrap();
            assert_ne!(r.primary().endpoint.id, eps[0].id);
        }
        // A failing metrics page (not a refused connection) only de-prioritizes.
        d.datastore
            .scrape_failed(eps[0].id, ScrapeFailure::BadStatus);
        let hits = (0..60)
            .filter(|i| {
                let r = d.route(&request(&format!("q{i}")), None).unwrap();
                r.primary().endpoint.id == eps[0].id
            })
            .count();
        assert!(hits > 0, "a degraded endpoint still gets traffic");
        // When every endpoint is unreachable, routing still happens (Envoy reports the error).
        for e in &eps {
            d.datastore.scrape_failed(e.id, ScrapeFailure::Unreachable);
        }
        assert!(d.route(&request("z"), None).is_ok());
    }

    #[test]
    fn an_endpoint_answering_with_server_errors_is_ejected_but_never_the_last() {
        let d = director(4);
        let eps = d.datastore.endpoints();
        for _ in 0..4 {
            assert_eq!(d.observe_response(&eps[2], 503), Verdict::Unchanged);
        }
        assert!(matches!(
            d.observe_response(&eps[2], 500),
            Verdict::Ejected(_)
        ));
        for i in 0..60 {
            let r = d.route(&request(&format!("p{i}")), None).unwrap();
            assert_ne!(r.primary().endpoint.id, eps[2].id);
        }
        // One in four may be ejected at once (10 %, at least one).
        for _ in 0..5 {
            d.observe_response(&eps[0], 502);
        }
        assert!(!eps[0].outlier.is_ejected(Instant::now()));
        // A subset holding only the ejected endpoint still routes there.
        let only = [eps[2].address.ip()];
        let r = d.route(&request("s"), Some(&only)).unwrap();
        assert_eq!(r.primary().endpoint.id, eps[2].id);
        // Detection off: nothing is ejected.
        let off = director(2).with_outlier_policy(OutlierPolicy::disabled());
        let e = off.datastore.endpoints();
        for _ in 0..20 {
            assert_eq!(off.observe_response(&e[0], 503), Verdict::Unchanged);
        }
    }

    #[test]
    fn sheddable_request_is_429_when_saturated() {
        let d = director(2);
        for ep in d.datastore.endpoints() {
            d.datastore.update_metrics(ep.id, fresh(50));
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
