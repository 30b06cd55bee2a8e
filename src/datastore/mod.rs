//! The set of endpoints epp may route to, and the latest metrics of each.
//!
//! Writers (discovery, scrapers) go through one mutex; readers (every scheduling decision) take a
//! cached, immutable [`Snapshot`] with a single atomic load. The snapshot is rebuilt lazily by the
//! first reader after a change, so a busy scrape loop costs nothing until someone schedules.

pub mod cache_fit;
mod endpoint;
pub mod load;
pub mod outlier;
pub mod tokenization;
pub mod ttft_fit;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

pub use endpoint::{
    Endpoint, EndpointId, EndpointMetrics, EndpointSpec, EngineType, ScrapeFailure,
};
pub use load::{EndpointLoad, LoadAmount, LoadSnapshot, Reservation, SampleClock};
pub use outlier::{Moment, OutlierDetector, OutlierPolicy, Verdict};

/// Nanoseconds from the first instant ever passed here to `t` (0 for earlier instants): the
/// one time base of the averaged loads ([`SampleClock`]) and of ejection deadlines
/// ([`Moment`]), kept in atomics as `u64`. The origin is the first caller's instant, so a
/// simulator's clock works as well as the real one.
fn nanos_since_origin(t: Instant) -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| t);
    u64::try_from(t.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
}

/// How far epp trusts an endpoint's scraped metrics at decision time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    /// Scraped successfully within the staleness threshold.
    Fresh,
    /// Never scraped, or its last good metrics are older than the staleness threshold
    /// (scrapes that fail only stop refreshing them): still routable, but its load is taken
    /// from epp's own accounting and it loses ties.
    Degraded,
    /// The last scrape could not connect to the serving port: avoided while any other
    /// endpoint is reachable.
    Unreachable,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Fresh => "fresh",
            Health::Degraded => "degraded",
            Health::Unreachable => "unreachable",
        }
    }
}

/// One endpoint with the metrics it had when the snapshot was taken; its load
/// ([`Endpoint::load`]) is live.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub endpoint: Arc<Endpoint>,
    pub metrics: Arc<EndpointMetrics>,
    pub health: Health,
}

impl Candidate {
    /// A candidate whose health is judged from its metrics alone, as if just scraped;
    /// [`Candidate::assess`] also applies the staleness threshold.
    pub fn new(endpoint: Arc<Endpoint>, metrics: Arc<EndpointMetrics>) -> Self {
        let age = metrics.updated.map(|_| Duration::ZERO);
        let mut c = Self {
            endpoint,
            metrics,
            health: Health::Degraded,
        };
        c.assess_age(age, Duration::MAX);
        c
    }

    /// Sets [`Candidate::health`] as of `now`.
    pub fn assess(&mut self, now: Instant, staleness: Duration) {
        let age = self
            .metrics
            .updated
            .map(|t| now.saturating_duration_since(t));
        self.assess_age(age, staleness);
    }

    /// Sets [`Candidate::health`] from the age of the last good metrics (`None`: never
    /// scraped); the fleet simulator passes virtual ages. A scrape that fails without proving
    /// the server down (an error status, a bad page, a timeout) only leaves the last good
    /// metrics to age: one failure among successes, as a flaky exporter gives, must not flip
    /// the endpoint between fresh and degraded at every scrape.
    pub fn assess_age(&mut self, age: Option<Duration>, staleness: Duration) {
        let m = &self.metrics;
        self.health = if self.endpoint.proven_down(m.failure) {
            Health::Unreachable
        } else if age.is_none_or(|a| a > staleness) {
            Health::Degraded
        } else {
            Health::Fresh
        };
    }

    /// Whether the metrics were refreshed within `threshold` of `now`.
    pub fn is_fresh(&self, now: Instant, threshold: Duration) -> bool {
        self.metrics
            .updated
            .is_some_and(|t| now.saturating_duration_since(t) <= threshold)
    }

    /// Requests epp routed here after the metrics were scraped (so not in the scraped
    /// figures) that may still be in flight: at most the ones in flight now.
    pub fn unseen_requests(&self) -> u64 {
        let load = &self.endpoint.load;
        load.dispatched()
            .saturating_sub(self.metrics.dispatched_at_scrape)
            .min(load.requests())
    }

    /// Requests epp has in flight on this endpoint.
    pub fn inflight_requests(&self) -> u32 {
        clamp_u32(self.endpoint.load.requests())
    }

    /// Waiting requests as the scorers should see them: the scraped queue plus what epp sent
    /// since that scrape when the metrics are fresh; otherwise epp's own in-flight count.
    pub fn waiting(&self) -> u32 {
        match (self.health, self.metrics.waiting_queue) {
            (Health::Fresh, Some(q)) => clamp_u32(u64::from(q) + self.unseen_requests()),
            _ => self.inflight_requests(),
        }
    }

    /// Running requests: the scraped figure when fresh, else epp's own in-flight count.
    pub fn running(&self) -> u32 {
        match (self.health, self.metrics.running) {
            (Health::Fresh, Some(r)) => r,
            _ => self.inflight_requests(),
        }
    }

    /// KV-cache utilisation in `[0, 1]`: the last value scraped, 0 if none ever was.
    pub fn kv_usage(&self) -> f64 {
        self.metrics.kv_cache_usage.unwrap_or(0.0).clamp(0.0, 1.0)
    }
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// An immutable view of all endpoints, shared by every request scheduled until the next change.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub candidates: Vec<Candidate>,
    pub generation: u64,
}

/// Called when endpoints leave the datastore (e.g. to purge them from the prefix index).
pub trait EndpointObserver: Send + Sync {
    fn endpoint_removed(&self, endpoint: &Endpoint);
}

#[derive(Debug)]
struct Entry {
    endpoint: Arc<Endpoint>,
    metrics: Arc<EndpointMetrics>,
}

/// Endpoints and their metrics. Cheap to share (`Arc<Datastore>`).
pub struct Datastore {
    entries: Mutex<Vec<Entry>>,
    generation: AtomicU64,
    /// Bumped when endpoints join or leave (not on metric updates).
    members: AtomicU64,
    snapshot: ArcSwap<Snapshot>,
    next_id: AtomicU32,
    observers: Mutex<Vec<Arc<dyn EndpointObserver>>>,
    ready: std::sync::atomic::AtomicBool,
    /// Removed endpoints that still had requests in flight (kept for the load metrics until
    /// they drain).
    draining: Mutex<Vec<Arc<Endpoint>>>,
    /// The pool's learned first-token cost, shared by its endpoints.
    ttft: Arc<ttft_fit::TtftFit>,
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datastore")
            .field("endpoints", &self.entries.lock().len())
            .finish()
    }
}

impl Default for Datastore {
    fn default() -> Self {
        Self::new()
    }
}

impl Datastore {
    /// The pool's learned first-token cost, shared by its endpoints.
    pub fn ttft_fit(&self) -> &ttft_fit::TtftFit {
        &self.ttft
    }

    pub fn new() -> Self {
        Self {
            entries: Mutex::new(Vec::new()),
            generation: AtomicU64::new(1),
            members: AtomicU64::new(1),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            next_id: AtomicU32::new(0),
            observers: Mutex::new(Vec::new()),
            ready: false.into(),
            draining: Mutex::new(Vec::new()),
            ttft: Arc::default(),
        }
    }

    pub fn add_observer(&self, observer: Arc<dyn EndpointObserver>) {
        self.observers.lock().push(observer);
    }

    /// Marks the endpoint set as synced with its source (readiness).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Replaces the whole endpoint set. Endpoints are matched by name; one whose address,
    /// metrics address or engine changed is replaced (new id, fresh metrics). Returns the
    /// endpoints removed.
    pub fn set_endpoints(&self, specs: Vec<EndpointSpec>) -> Vec<Arc<Endpoint>> {
        let removed = {
            let mut entries = self.entries.lock();
            let mut kept: Vec<Entry> = Vec::with_capacity(specs.len());
            let mut old: Vec<Entry> = std::mem::take(&mut *entries);
            for spec in specs {
                if kept.iter().any(|e| e.endpoint.name == spec.name) {
                    continue;
                }
                if let Some(pos) = old.iter().position(|e| e.endpoint.name == spec.name)
                    && old[pos].endpoint.spec() == spec
                {
                    kept.push(old.swap_remove(pos));
                    continue;
                }
                kept.push(Entry {
                    endpoint: Arc::new(
                        Endpoint::new(self.next_id.fetch_add(1, Ordering::Relaxed), spec)
                            .in_pool(self.ttft.clone()),
                    ),
                    metrics: Arc::new(EndpointMetrics::default()),
                });
            }
            *entries = kept;
            old.into_iter().map(|e| e.endpoint).collect::<Vec<_>>()
        };
        self.members.fetch_add(1, Ordering::AcqRel);
        self.bump();
        self.notify_removed(&removed);
        removed
    }

    /// Adds or replaces one endpoint (matched by name).
    pub fn upsert(&self, spec: EndpointSpec) -> Arc<Endpoint> {
        let (endpoint, replaced) = {
            let mut entries = self.entries.lock();
            let pos = entries.iter().position(|e| e.endpoint.name == spec.name);
            if let Some(p) = pos
                && entries[p].endpoint.spec() == spec
            {
                return entries[p].endpoint.clone();
            }
            let endpoint = Arc::new(
                Endpoint::new(self.next_id.fetch_add(1, Ordering::Relaxed), spec)
                    .in_pool(self.ttft.clone()),
            );
            let entry = Entry {
                endpoint: endpoint.clone(),
                metrics: Arc::new(EndpointMetrics::default()),
            };
            let replaced = match pos {
                Some(p) => Some(std::mem::replace(&mut entries[p], entry).endpoint),
                None => {
                    entries.push(entry);
                    None
                }
            };
            (endpoint, replaced)
        };
        self.members.fetch_add(1, Ordering::AcqRel);
        self.bump();
        self.notify_removed(replaced.as_slice());
        endpoint
    }

    /// Removes one endpoint by name.
    pub fn remove(&self, name: &str) -> Option<Arc<Endpoint>> {
        let removed = {
            let mut entries = self.entries.lock();
            let pos = entries.iter().position(|e| e.endpoint.name == name)?;
            entries.remove(pos).endpoint
        };
        self.members.fetch_add(1, Ordering::AcqRel);
        self.bump();
        self.notify_removed(std::slice::from_ref(&removed));
        Some(removed)
    }

    /// Stores fresh metrics for an endpoint (ignored if it left meanwhile).
    pub fn update_metrics(&self, id: EndpointId, metrics: EndpointMetrics) {
        let mut entries = self.entries.lock();
        if let Some(e) = entries.iter_mut().find(|e| e.endpoint.id == id) {
            e.metrics = Arc::new(metrics);
            drop(entries);
            self.bump();
        }
    }

    /// Records a failed scrape: the last values stay, marked as failing with `failure`.
    pub fn scrape_failed(&self, id: EndpointId, failure: ScrapeFailure) {
        let mut entries = self.entries.lock();
        if let Some(e) = entries.iter_mut().find(|e| e.endpoint.id == id)
            && e.metrics.failure != Some(failure)
        {
            let mut m = (*e.metrics).clone();
            m.failure = Some(failure);
            e.metrics = Arc::new(m);
            drop(entries);
            self.bump();
        }
    }

    /// Endpoints that left the datastore with requests still in flight (drained ones are
    /// dropped from the list as a side effect).
    pub fn draining(&self) -> Vec<Arc<Endpoint>> {
        let mut d = self.draining.lock();
        d.retain(|e| !e.load.is_idle());
        d.clone()
    }

    /// Current endpoints, in discovery order.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.entries
            .lock()
            .iter()
            .map(|e| e.endpoint.clone())
            .collect()
    }

    /// Latest metrics for one endpoint.
    pub fn metrics(&self, id: EndpointId) -> Option<Arc<EndpointMetrics>> {
        self.entries
            .lock()
            .iter()
            .find(|e| e.endpoint.id == id)
            .map(|e| e.metrics.clone())
    }

    /// The current snapshot; rebuilt only if something changed since the last call.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let current = self.snapshot.load_full();
        let generation = self.generation.load(Ordering::Acquire);
        if current.generation == generation {
            return current;
        }
        let entries = self.entries.lock();
        // Re-read under the lock: writers bump after releasing it, so this is at least as new.
        let generation = self.generation.load(Ordering::Acquire);
        let snap = Arc::new(Snapshot {
            candidates: entries
                .iter()
                .map(|e| Candidate::new(e.endpoint.clone(), e.metrics.clone()))
                .collect(),
            generation,
        });
        drop(entries);
        self.snapshot.store(snap.clone());
        snap
    }

    /// Changes whenever an endpoint joins or leaves.
    pub fn membership(&self) -> u64 {
        self.members.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn notify_removed(&self, removed: &[Arc<Endpoint>]) {
        if removed.is_empty() {
            return;
        }
        // No scrape will reconcile a removed endpoint's parked requests.
        for ep in removed {
            ep.load.release_parked();
        }
        self.draining
            .lock()
            .extend(removed.iter().filter(|e| !e.load.is_idle()).cloned());
        let observers = self.observers.lock().clone();
        for ep in removed {
            tracing::info!(endpoint = %ep.name, address = %ep.address, "endpoint removed");
            for o in &observers {
                o.endpoint_removed(ep);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn spec(name: &str, port: u16) -> EndpointSpec {
        EndpointSpec::new(name, ([127, 0, 0, 1], port).into())
    }

    struct Count(AtomicUsize);
    impl EndpointObserver for Count {
        fn endpoint_removed(&self, _: &Endpoint) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn set_endpoints_keeps_unchanged_and_replaces_changed() {
        let ds = Datastore::new();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        ds.add_observer(count.clone());
        ds.set_endpoints(vec![spec("a", 1), spec("b", 2)]);
        let a = ds.endpoints()[0].clone();
        let removed = ds.set_endpoints(vec![spec("a", 1), spec("b", 3), spec("c", 4)]);
        assert_eq!(removed.len(), 1, "b changed port");
        assert_eq!(ds.endpoints()[0].id, a.id, "a kept its id");
        assert_eq!(ds.endpoints().len(), 3);
        ds.remove("c");
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
        assert!(ds.remove("zzz").is_none());
    }

    #[test]
    fn snapshot_is_cached_until_a_change() {
        let ds = Datastore::new();
        ds.upsert(spec("a", 1));
        let s1 = ds.snapshot();
        let s2 = ds.snapshot();
        assert!(Arc::ptr_eq(&s1, &s2));
        let id = s1.candidates[0].endpoint.id;
        ds.update_metrics(
            id,
            EndpointMetrics {
                waiting_queue: Some(7),
                ..Default::default()
            },
        );
        let s3 = ds.snapshot();
        assert_eq!(s3.candidates[0].metrics.waiting_queue, Some(7));
        assert_eq!(
            s1.candidates[0].metrics.waiting_queue, None,
            "old snapshot unchanged"
        );
    }

    #[test]
    fn failed_scrapes_degrade_an_endpoint_only_once_its_metrics_are_stale() {
        let ep = Arc::new(Endpoint::new(0, spec("a", 1)));
        let staleness = Duration::from_secs(2);
        let health = |failure, age: Option<u64>| {
            let m = EndpointMetrics {
                updated: Some(Instant::now()),
                failure,
                ..Default::default()
            };
            let mut c = Candidate::new(ep.clone(), Arc::new(m));
            c.assess_age(age.map(Duration::from_millis), staleness);
            c.health
        };
        let flaky = Some(ScrapeFailure::BadStatus);
        assert_eq!(health(None, Some(100)), Health::Fresh);
        assert_eq!(
            health(flaky, Some(100)),
            Health::Fresh,
            "one failure among successes"
        );
        assert_eq!(
            health(flaky, Some(2_100)),
            Health::Degraded,
            "failing for longer"
        );
        assert_eq!(health(None, Some(2_100)), Health::Degraded, "stale");
        assert_eq!(health(None, None), Health::Degraded, "never scraped");
        let down = Some(ScrapeFailure::Unreachable);
        assert_eq!(health(down, Some(100)), Health::Unreachable, "down at once");
    }

    #[test]
    fn freshness_follows_threshold() {
        let ep = Arc::new(Endpoint::new(0, spec("a", 1)));
        let now = Instant::now();
        let never = Candidate::new(ep.clone(), Arc::new(EndpointMetrics::default()));
        assert!(!never.is_fresh(now, Duration::from_secs(2)));
        let m = EndpointMetrics {
            updated: Some(now),
            ..Default::default()
        };
        let c = Candidate::new(ep, Arc::new(m));
        assert!(c.is_fresh(now + Duration::from_secs(1), Duration::from_secs(2)));
        assert!(!c.is_fresh(now + Duration::from_secs(3), Duration::from_secs(2)));
    }
}
