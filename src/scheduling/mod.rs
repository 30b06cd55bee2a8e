//! Scheduling: the framework, the plugins, the V1 tree, and the [`Scheduler`] that runs one
//! profile per request.

pub mod framework;
pub mod plugins;
pub mod v1;

use std::sync::Arc;

use crate::datastore::{Candidate, EndpointObserver};
use crate::index::BlockHasher;
use crate::request::LlmRequest;
use crate::scheduling::plugins::has_capacity::HasCapacityFilter;
use crate::scheduling::plugins::prefix::PrefixCachePlugin;
use crate::scheduling::plugins::utilization::SaturationDetector;

pub use framework::{
    PluginTimer, Profile, ScheduleError, ScheduleResult, SchedulingContext, ScoredEndpoint,
};

/// Runs the configured profile for each request. Shared by the ext_proc server and the fleet
/// simulator (which passes its own seeded RNG).
pub struct Scheduler {
    profile: Profile,
    prefixes: Vec<Arc<PrefixCachePlugin>>,
    saturation: Arc<dyn SaturationDetector>,
    timer: Option<Arc<dyn PluginTimer>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("profile", &self.profile)
            .finish()
    }
}

impl Scheduler {
    /// A scheduler for `profile`. `prefixes` are the profile's prefix plugins, so that the
    /// datastore can purge departed endpoints from their indexes.
    pub fn new(profile: Profile, prefixes: Vec<Arc<PrefixCachePlugin>>) -> Self {
        Self {
            profile,
            prefixes,
            saturation: Arc::new(HasCapacityFilter::default()),
            timer: None,
        }
    }

    /// What decides that the pool is saturated (for shedding).
    pub fn with_saturation(mut self, saturation: Arc<dyn SaturationDetector>) -> Self {
        self.saturation = saturation;
        self
    }

    pub fn with_timer(mut self, timer: Arc<dyn PluginTimer>) -> Self {
        self.timer = Some(timer);
        self
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Prompt bytes the profile's prefix plugins read at most (0 without one): the scanner
    /// renders no more.
    pub fn prompt_cap(&self) -> usize {
        self.prefixes
            .iter()
            .map(|p| p.config().hasher.hashed_limit())
            .max()
            .unwrap_or(0)
    }

    /// The block layout whose digests the scanner computes ahead of the decision: the first
    /// prefix plugin's (others hash the prompt themselves).
    pub fn digest_hasher(&self) -> Option<BlockHasher> {
        self.prefixes.first().map(|p| p.config().hasher)
    }

    /// Moves the prefix plugins' index recording to background threads.
    pub fn record_in_background(&self) -> std::io::Result<()> {
        self.prefixes
            .iter()
            .try_for_each(|p| p.record_in_background())
    }

    /// Queues the prefix plugins' index records until [`Scheduler::apply_pending_records`] or
    /// the next decision (see [`crate::index::recorder`]): epp's default.
    pub fn record_after_reply(&self) {
        self.prefixes.iter().for_each(|p| p.record_after_reply());
    }

    /// Whether decisions queue index records for [`Scheduler::apply_pending_records`].
    pub fn defers_records(&self) -> bool {
        self.prefixes.iter().any(|p| p.defers_records())
    }

    /// Applies the queued index records (the ext_proc stream's call once its reply is sent).
    pub fn apply_pending_records(&self) {
        self.prefixes.iter().for_each(|p| p.apply_pending_records());
    }

    /// Drops from the prefix indexes every endpoint not in `live` (see
    /// [`crate::index::PrefixIndex::reconcile`]).
    pub fn reconcile(&self, live: &[crate::datastore::EndpointId]) {
        for p in &self.prefixes {
            p.index().reconcile(live);
        }
    }

    /// The profile's first prefix plugin, if any.
    pub fn prefix_plugin(&self) -> Option<&Arc<PrefixCachePlugin>> {
        self.prefixes.first()
    }

    /// What the datastore should tell when endpoints leave.
    pub fn endpoint_observers(&self) -> Vec<Arc<dyn EndpointObserver>> {
        self.prefixes
            .iter()
            .map(|p| p.clone() as Arc<dyn EndpointObserver>)
            .collect()
    }

    /// True when the saturation detector says the pool is saturated: sheddable requests are
    /// then refused.
    pub fn is_saturated(&self, candidates: &[Candidate]) -> bool {
        self.saturation.saturation(candidates) >= 1.0
    }

    pub fn schedule(
        &self,
        request: &LlmRequest,
        candidates: &[Candidate],
    ) -> Result<ScheduleResult, ScheduleError> {
        self.schedule_with_rng(request, candidates, fastrand::Rng::new())
    }

    pub fn schedule_with_rng(
        &self,
        request: &LlmRequest,
        candidates: &[Candidate],
        rng: fastrand::Rng,
    ) -> Result<ScheduleResult, ScheduleError> {
        self.schedule_at(request, candidates, rng, std::time::Instant::now())
    }

    /// [`Self::schedule_with_rng`] at a given time (a simulator's clock).
    pub fn schedule_at(
        &self,
        request: &LlmRequest,
        candidates: &[Candidate],
        rng: fastrand::Rng,
        now: std::time::Instant,
    ) -> Result<ScheduleResult, ScheduleError> {
        let mut ctx = SchedulingContext::new(request, rng);
        ctx.now = now;
        self.profile
            .run(&mut ctx, candidates, self.timer.as_deref())
    }
}
