//! Passive outlier detection: endpoints that keep answering with server errors are ejected
//! for a while.
//!
//! Scraped metrics cannot show a broken engine. A pod whose API server answers every request
//! at once with a 5xx while its `/metrics` still reports an idle engine looks like the
//! least-loaded endpoint, and epp's own in-flight count for it stays near zero too (its
//! requests finish instantly), so load-aware scoring would send it ever more traffic. epp
//! therefore watches the status of every response it sees, Envoy's own replies for failed
//! connections and timeouts (502/503/504) included:
//!
//! * `consecutive_5xx` (default 5) server errors in a row eject the endpoint; a success (any
//!   status below 400) resets the count; 4xx are the client's and neither count nor reset it
//!   (a client sending bad requests cannot keep a broken endpoint in the pool);
//! * an ejection lasts `base_ejection_time` (30 s) times the number of ejections in a row, at
//!   most `max_ejection_time` (300 s); then the endpoint is routable again but on probation:
//!   one server error before its first success ejects it again (a circuit breaker's half-open
//!   state, so a still-broken endpoint fails one request per ejection, not five), and that
//!   first success resets the number of ejections;
//! * an ejected endpoint whose metrics server refused connections and answers again (its
//!   server restarted or became reachable again) is routable again at once, on probation
//!   (Envoy's `successful_active_health_check_uneject_host`); one whose scrapes never failed
//!   or only timed out or erred, such as a broken engine behind a healthy metrics page,
//!   serves out its ejection;
//! * at most `max_ejection_percent` (10 %) of the pool's endpoints are ejected at once, but
//!   at least one when the pool has two or more, and never the only one;
//! * ejected endpoints are left out of the candidates while any other endpoint remains
//!   ([`crate::director::Director`]).
//!
//! These are Envoy's outlier-detection rules and defaults (consecutive 5xx), which Envoy
//! itself cannot apply here: with the destination picked per request by epp, its cluster has
//! no fixed hosts to eject. `consecutive_5xx: 0` turns detection off.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Endpoint;

/// A point in time as ejection deadlines are kept; take it once per decision, not per
/// endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Moment(u64);

impl Moment {
    pub fn of(t: Instant) -> Self {
        Self(super::nanos_since_origin(t))
    }
}

/// The detection rules (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierPolicy {
    /// Server errors in a row that eject an endpoint (0: never eject).
    pub consecutive_5xx: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// Largest share of the pool ejected at once, in percent (at least one endpoint).
    pub max_ejection_percent: u32,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

impl OutlierPolicy {
    pub fn disabled() -> Self {
        Self {
            consecutive_5xx: 0,
            ..Self::default()
        }
    }

    /// Endpoints that may be ejected at once in a pool of `pool` endpoints.
    pub fn max_ejected(&self, pool: usize) -> usize {
        if pool < 2 {
            return 0;
        }
        let share = pool * self.max_ejection_percent.min(100) as usize / 100;
        share.clamp(1, pool - 1)
    }

    fn ejection_time(&self, ejections: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(ejections.max(1))
            .min(self.max_ejection_time.max(self.base_ejection_time))
    }
}

/// Live response health of one endpoint (shared by all snapshots, like its load).
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_errors: AtomicU32,
    /// Ejections in a row (the ejection time multiplier); reset by a success after one ends.
    ejections: AtomicU32,
    /// Total ejections since the endpoint joined (for the metrics).
    total_ejections: AtomicU64,
    /// End of the current or last ejection, as a [`Moment`] (0: never ejected).
    ejected_until: AtomicU64,
    /// Ejected since its last success: one more server error ejects it again.
    probation: AtomicBool,
}

impl OutlierState {
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.is_ejected_at(Moment::of(now))
    }

    pub fn is_ejected_at(&self, now: Moment) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now.0
    }

    pub fn total_ejections(&self) -> u64 {
        self.total_ejections.load(Ordering::Relaxed)
    }

    /// Counts a success; true when it ends a run of errors (for the caller's log).
    fn success(&self, now: Instant) -> bool {
        let run = self.consecutive_errors.swap(0, Ordering::Relaxed);
        if !self.is_ejected(now) {
            self.ejections.store(0, Ordering::Relaxed);
            self.probation.store(false, Ordering::Relaxed);
        }
        run > 0
    }

    /// Counts a server error; true when it is enough to eject (`threshold` in a row, or
    /// one on probation).
    fn error(&self, threshold: u32) -> bool {
        let run = self.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1;
        run >= threshold || self.probation.load(Ordering::Relaxed)
    }

    /// The endpoint's metrics answer again after refused connections (its server was down or
    /// unreachable and is back): a current ejection ends now, on probation, as Envoy lifts an
    /// outlier ejection on a successful active health check. One server error before the
    /// first success ejects it again, for longer. True when an ejection was lifted.
    pub fn reachable_again(&self, now: Instant) -> bool {
        if !self.is_ejected(now) {
            return false;
        }
        self.ejected_until
            .store(Moment::of(now).0, Ordering::Relaxed);
        true
    }

    fn eject(&self, now: Instant, policy: &OutlierPolicy) -> Duration {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        self.total_ejections.fetch_add(1, Ordering::Relaxed);
        self.consecutive_errors.store(0, Ordering::Relaxed);
        self.probation.store(true, Ordering::Relaxed);
        let time = policy.ejection_time(n);
        self.ejected_until
            .store(Moment::of(now + time).0, Ordering::Relaxed);
        time
    }
}

/// What a response did to its endpoint's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed that matters.
    Unchanged,
    /// The endpoint was ejected for this long.
    Ejected(Duration),
    /// The run of errors reached the threshold, but the pool's ejection cap is reached.
    CapReached,
}

/// Applies [`OutlierPolicy`] to the responses of a pool's endpoints.
#[derive(Debug, Default)]
pub struct OutlierDetector {
    policy: OutlierPolicy,
    /// Serializes ejections, so two at once cannot both pass the cap.
    ejecting: Mutex<()>,
}

impl OutlierDetector {
    pub fn new(policy: OutlierPolicy) -> Self {
        Self {
            policy,
            ejecting: Mutex::new(()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.policy.consecutive_5xx > 0
    }

    /// Records the HTTP `status` of a response from `endpoint`. `pool` is every endpoint
    /// in the pool now (read only when an ejection is due, to apply the cap).
    pub fn observe(
        &self,
        endpoint: &Endpoint,
        status: u16,
        now: Instant,
        pool: impl FnOnce() -> Vec<std::sync::Arc<Endpoint>>,
    ) -> Verdict {
        if !self.enabled() {
            return Verdict::Unchanged;
        }
        let state = &endpoint.outlier;
        if (400..500).contains(&status) {
            return Verdict::Unchanged;
        }
        if status < 500 {
            if state.success(now) {
                tracing::debug!(endpoint = %endpoint.name, status, "endpoint answered again after server errors");
            }
            return Verdict::Unchanged;
        }
        if !state.error(self.policy.consecutive_5xx) {
            return Verdict::Unchanged;
        }
        let _one_at_a_time = self.ejecting.lock();
        let moment = Moment::of(now);
        if state.is_ejected_at(moment) {
            return Verdict::Unchanged;
        }
        let pool = pool();
        let ejected = pool
            .iter()
            .filter(|e| e.outlier.is_ejected_at(moment))
            .count();
        if ejected >= self.policy.max_ejected(pool.len()) {
            return Verdict::CapReached;
        }
        let time = state.eject(now, &self.policy);
        tracing::warn!(
            endpoint = %endpoint.name,
            status,
            ejections_in_a_row = state.ejections.load(Ordering::Relaxed),
            ejected_for = ?time,
            "endpoint keeps answering with server errors: ejected"
        );
        Verdict::Ejected(time)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::datastore::EndpointSpec;

    /// `n` endpoints, ids 0..n (shared with other modules' tests).
    pub(crate) fn pool(n: u8) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                let spec =
                    EndpointSpec::new(format!("e{i}"), format!("10.0.0.{i}:8000").parse().unwrap());
                Arc::new(Endpoint::new(u32::from(i), spec))
            })
            .collect()
    }

    fn fail(
        d: &OutlierDetector,
        e: &Arc<Endpoint>,
        n: u32,
        now: Instant,
        all: &[Arc<Endpoint>],
    ) -> Verdict {
        let mut last = Verdict::Unchanged;
        for _ in 0..n {
            last = d.observe(e, 503, now, || all.to_vec());
        }
        last
    }

    #[test]
    fn reachable_again_lifts_an_ejection_on_probation() {
        let d = OutlierDetector::default();
        let all = pool(4);
        let now = Instant::now();
        assert!(
            !all[0].outlier.reachable_again(now),
            "not ejected: nothing to lift"
        );
        assert_eq!(
            fail(&d, &all[0], 5, now, &all),
            Verdict::Ejected(Duration::from_secs(30))
        );
        let later = now + Duration::from_secs(2);
        assert!(all[0].outlier.reachable_again(later));
        assert!(!all[0].outlier.is_ejected(later));
        // On probation: the next server error ejects again, for twice as long.
        assert_eq!(
            d.observe(&all[0], 503, later, || all.clone()),
            Verdict::Ejected(Duration::from_secs(60))
        );
    }

    #[test]
    fn five_server_errors_in_a_row_eject_and_a_success_between_resets() {
        let d = OutlierDetector::default();
        let all = pool(4);
        let now = Instant::now();
        assert_eq!(fail(&d, &all[0], 4, now, &all), Verdict::Unchanged);
        d.observe(&all[0], 200, now, || all.clone());
        assert_eq!(fail(&d, &all[0], 4, now, &all), Verdict::Unchanged);
        // 4xx are the client's: they neither count nor reset.
        d.observe(&all[0], 429, now, || all.clone());
        assert!(!all[0].outlier.is_ejected(now));
        assert_eq!(
            d.observe(&all[0], 500, now, || all.clone()),
            Verdict::Ejected(Duration::from_secs(30))
        );
        assert!(all[0].outlier.is_ejected(now + Duration::from_secs(29)));
        assert!(!all[0].outlier.is_ejected(now + Duration::from_secs(31)));
        assert_eq!(all[0].outlier.total_ejections(), 1);
    }

    #[test]
    fn ejections_in_a_row_last_longer_up_to_the_maximum_and_a_success_resets_them() {
        let d = OutlierDetector::default();
        let all = pool(4);
        let mut now = Instant::now();
        let mut times = Vec::new();
        // Five errors eject; back on probation, each single error ejects again.
        let mut errors = 5;
        for _ in 0..12 {
            match fail(&d, &all[1], errors, now, &all) {
                Verdict::Ejected(t) => {
                    times.push(t.as_secs());
                    now += t + Duration::from_secs(1);
                }
                v => panic!("expected an ejection, got {v:?}"),
            }
            errors = 1;
        }
        assert_eq!(&times[..4], &[30, 60, 90, 120]);
        assert_eq!(*times.last().unwrap(), 300);
        // Errors from requests still in flight while it is ejected change nothing.
        let during = now - Duration::from_secs(2);
        assert_eq!(fail(&d, &all[1], 3, during, &all), Verdict::Unchanged);
        // A success ends probation and the run of ejections: five errors again, 30 s again.
        d.observe(&all[1], 200, now, || all.clone());
        assert_eq!(fail(&d, &all[1], 4, now, &all), Verdict::Unchanged);
        assert_eq!(
            fail(&d, &all[1], 1, now, &all),
            Verdict::Ejected(Duration::from_secs(30))
        );
    }

    #[test]
    fn the_cap_keeps_most_of_the_pool_and_never_ejects_the_only_endpoint() {
        let policy = OutlierPolicy::default();
        assert_eq!(policy.max_ejected(1), 0);
        assert_eq!(policy.max_ejected(2), 1);
        assert_eq!(policy.max_ejected(4), 1);
        assert_eq!(policy.max_ejected(25), 2);
        let all_ejectable = OutlierPolicy {
            max_ejection_percent: 100,
            ..OutlierPolicy::default()
        };
        assert_eq!(all_ejectable.max_ejected(4), 3);

        let d = OutlierDetector::default();
        let all = pool(4);
        let now = Instant::now();
        assert!(matches!(
            fail(&d, &all[0], 5, now, &all),
            Verdict::Ejected(_)
        ));
        assert_eq!(fail(&d, &all[1], 5, now, &all), Verdict::CapReached);
        assert!(!all[1].outlier.is_ejected(now));
        let one = pool(1);
        assert_eq!(fail(&d, &one[0], 50, now, &one), Verdict::CapReached);
    }

    #[test]
    fn disabled_detection_never_ejects() {
        let d = OutlierDetector::new(OutlierPolicy::disabled());
        let all = pool(4);
        let now = Instant::now();
        assert_eq!(fail(&d, &all[0], 100, now, &all), Verdict::Unchanged);
        assert!(!all[0].outlier.is_ejected(now));
    }
}
