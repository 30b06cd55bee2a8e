//! The scheduling framework: one-method plugin traits and the profile runner.
//!
//! A decision runs `pre-schedule → filters → scorers → picker → reserve → post-schedule`:
//! filters run in order and stop once no candidate is left; each scorer's scores are clamped to
//! `[0, 1]` and summed with the scorer's weight; the picker chooses from the scored candidates;
//! the request's load is reserved on the primary target at once (so concurrent decisions see
//! it); post-schedule plugins see the result (the prefix plugin records it in its index).
//!
//! Plugins work on borrowed candidates (`&Candidate` from the request's datastore snapshot), so a
//! decision clones nothing per endpoint. Per-request plugin state lives in [`CycleState`], keyed
//! by the owning plugin instance and a type private to it; state other plugins need (the prefix
//! match) travels in [`SchedulingContext`] itself.

use std::any::{Any, TypeId};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::datastore::{Candidate, EndpointId, Reservation};
use crate::request::LlmRequest;
use crate::scheduling::plugins::inflight_load::InflightLoadProducer;

/// Identity of one plugin instance (two instances of one type keep separate per-request state).
pub type PluginId = u64;

/// A fresh [`PluginId`].
pub fn next_plugin_id() -> PluginId {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Per-decision scratch space of the plugins of one scheduling cycle, keyed by the owning
/// plugin instance and the value's type.
#[derive(Default)]
pub struct CycleState {
    entries: Vec<((PluginId, TypeId), Box<dyn Any + Send>)>,
}

impl CycleState {
    pub fn insert<T: Any + Send>(&mut self, owner: PluginId, value: T) {
        let key = (owner, TypeId::of::<T>());
        self.entries.retain(|(k, _)| *k != key);
        self.entries.push((key, Box::new(value)));
    }

    pub fn get<T: Any + Send>(&self, owner: PluginId) -> Option<&T> {
        let key = (owner, TypeId::of::<T>());
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.downcast_ref())
    }
}

/// How much of the request's prompt each endpoint (probably) holds in its KV cache: produced by
/// the prefix plugin, read by the scorers, filters and the load accounting that need it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrefixMatchInfo {
    /// Prompt bytes covered by the hashed blocks (the denominator of the match ratio).
    pub hashed_bytes: usize,
    /// `(endpoint, matched bytes)`, sorted by endpoint; endpoints absent matched nothing.
    pub matched: Vec<(EndpointId, usize)>,
    /// `(endpoint, displaced bytes)`, sorted by endpoint: the cached prompt bytes a record of
    /// this request would cost the endpoint's cache, as far as the pool asks for evicted
    /// blocks again ([`crate::index::PrefixIndex::displacement`]); endpoints absent have room,
    /// or their evictions do not come back.
    pub displaced: Vec<(EndpointId, usize)>,
}

impl PrefixMatchInfo {
    pub fn matched_bytes(&self, endpoint: EndpointId) -> usize {
        self.matched
            .binary_search_by_key(&endpoint, |(e, _)| *e)
            .map_or(0, |i| self.matched[i].1)
    }

    pub fn displaced_bytes(&self, endpoint: EndpointId) -> usize {
        self.displaced
            .binary_search_by_key(&endpoint, |(e, _)| *e)
            .map_or(0, |i| self.displaced[i].1)
    }

    /// Matched fraction of the hashed prompt, in `[0, 1]` (0 for an empty prompt).
    pub fn ratio(&self, endpoint: EndpointId) -> f64 {
        if self.hashed_bytes == 0 {
            return 0.0;
        }
        (self.matched_bytes(endpoint) as f64 / self.hashed_bytes as f64).min(1.0)
    }

    /// The longest match over all endpoints, in bytes.
    pub fn longest(&self) -> usize {
        self.matched.iter().map(|(_, b)| *b).max().unwrap_or(0)
    }
}

/// Everything a plugin may look at while scheduling one request.
pub struct SchedulingContext<'r> {
    pub request: &'r LlmRequest,
    pub rng: fastrand::Rng,
    pub state: CycleState,
    /// Set by the profile's prefix plugin in pre-schedule.
    pub prefix: Option<PrefixMatchInfo>,
    /// The most a candidate can score (the sum of the scorer weights; 1 without scorers), so
    /// pickers can tell near-equal scores apart from real differences.
    pub score_scale: f64,
    pub now: Instant,
}

impl<'r> SchedulingContext<'r> {
    pub fn new(request: &'r LlmRequest, rng: fastrand::Rng) -> Self {
        Self {
            request,
            rng,
            state: CycleState::default(),
            prefix: None,
            score_scale: 1.0,
            now: Instant::now(),
        }
    }

    /// Bytes of the prompt `endpoint` is expected to hold (0 without a prefix plugin).
    pub fn matched_bytes(&self, endpoint: EndpointId) -> usize {
        self.prefix
            .as_ref()
            .map_or(0, |p| p.matched_bytes(endpoint))
    }
}

/// A candidate with its weighted score.
#[derive(Debug, Clone, Copy)]
pub struct ScoredEndpoint<'a> {
    pub candidate: &'a Candidate,
    pub score: f64,
}

/// Runs once per decision before filtering (e.g. hashing the prompt).
pub trait PreSchedule: Send + Sync {
    fn name(&self) -> &str;
    fn pre_schedule(&self, ctx: &mut SchedulingContext<'_>, candidates: &[Candidate]);
}

/// Narrows the candidate set.
pub trait Filter: Send + Sync {
    fn name(&self) -> &str;
    fn filter<'a>(
        &self,
        ctx: &mut SchedulingContext<'_>,
        candidates: Vec<&'a Candidate>,
    ) -> Vec<&'a Candidate>;
}

/// Scores candidates in `[0, 1]`; `scores[i]` belongs to `candidates[i]`.
pub trait Scorer: Send + Sync {
    fn name(&self) -> &str;
    fn score(&self, ctx: &SchedulingContext<'_>, candidates: &[&Candidate], scores: &mut [f64]);
}

/// Chooses the target(s), primary first.
pub trait Picker: Send + Sync {
    fn name(&self) -> &str;
    fn pick<'a>(
        &self,
        ctx: &mut SchedulingContext<'_>,
        scored: Vec<ScoredEndpoint<'a>>,
    ) -> Vec<ScoredEndpoint<'a>>;
}

/// Sees the decision (e.g. to remember where a prefix went).
pub trait PostSchedule: Send + Sync {
    fn name(&self) -> &str;
    fn post_schedule(&self, ctx: &SchedulingContext<'_>, result: &ScheduleResult);
}

/// Where one request goes.
#[derive(Debug)]
pub struct ScheduleResult {
    /// Chosen endpoints, primary first.
    pub targets: Vec<Candidate>,
    /// Their scores, aligned with `targets`.
    pub scores: Vec<f64>,
    pub profile: String,
    /// The request's share of the primary target's load, taken inside the decision; released
    /// when dropped.
    pub reservation: Option<Reservation>,
}

impl ScheduleResult {
    pub fn primary(&self) -> &Candidate {
        &self.targets[0]
    }

    /// `ip:port[,ip:port…]`: the value of the destination header.
    pub fn destination(&self) -> String {
        let mut s = String::new();
        for (i, t) in self.targets.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&t.endpoint.address_str);
        }
        s
    }
}

/// Why no endpoint was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("no ready endpoints")]
    NoCandidates,
    #[error("all endpoints were filtered out by {filter}")]
    AllFiltered { filter: String },
}

/// Receives plugin timings (epp's metrics implement it; the simulator does not care).
pub trait PluginTimer: Send + Sync {
    fn observe(&self, extension_point: &'static str, plugin: &str, seconds: f64);
}

/// One scheduling profile: the plugins of a decision, in order.
#[derive(Clone)]
pub struct Profile {
    pub name: String,
    pub pre_schedule: Vec<Arc<dyn PreSchedule>>,
    pub filters: Vec<Arc<dyn Filter>>,
    pub scorers: Vec<(Arc<dyn Scorer>, f64)>,
    pub picker: Arc<dyn Picker>,
    pub post_schedule: Vec<Arc<dyn PostSchedule>>,
    /// How a routed request is counted against its endpoint's load.
    pub load: Arc<InflightLoadProducer>,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |v: Vec<&str>| v.join(", ");
        f.debug_struct("Profile")
            .field("name", &self.name)
            .field(
                "pre_schedule",
                &names(self.pre_schedule.iter().map(|p| p.name()).collect()),
            )
            .field(
                "filters",
                &names(self.filters.iter().map(|p| p.name()).collect()),
            )
            .field(
                "scorers",
                &self
                    .scorers
                    .iter()
                    .map(|(p, w)| (p.name(), *w))
                    .collect::<Vec<_>>(),
            )
            .field("picker", &self.picker.name())
            .field(
                "post_schedule",
                &names(self.post_schedule.iter().map(|p| p.name()).collect()),
            )
            .field("load", &self.load)
            .finish()
    }
}

/// Times each plugin call when a timer is installed.
struct Timing<'t> {
    timer: Option<&'t dyn PluginTimer>,
}

impl Timing<'_> {
    fn run<T>(&self, point: &'static str, name: &str, f: impl FnOnce() -> T) -> T {
        let Some(timer) = self.timer else {
            return f();
        };
        let start = Instant::now();
        let out = f();
        timer.observe(point, name, start.elapsed().as_secs_f64());
        out
    }
}

impl Profile {
    pub fn new(name: impl Into<String>, picker: Arc<dyn Picker>) -> Self {
        Self {
            name: name.into(),
            pre_schedule: Vec::new(),
            filters: Vec::new(),
            scorers: Vec::new(),
            picker,
            post_schedule: Vec::new(),
            load: Arc::new(InflightLoadProducer::default()),
        }
    }

    /// Runs the profile over `candidates`: pre-schedule, filters, scorers, picker, the load
    /// reservation on the primary target, post-schedule.
    pub fn run(
        &self,
        ctx: &mut SchedulingContext<'_>,
        candidates: &[Candidate],
        timer: Option<&dyn PluginTimer>,
    ) -> Result<ScheduleResult, ScheduleError> {
        if candidates.is_empty() {
            return Err(ScheduleError::NoCandidates);
        }
        let timing = Timing { timer };
        for p in &self.pre_schedule {
            timing.run("PreSchedule", p.name(), || p.pre_schedule(ctx, candidates));
        }
        let remaining = self.filter(ctx, candidates, &timing)?;
        let scored = self.score(ctx, remaining, &timing);
        let picked = timing.run("Picker", self.picker.name(), || {
            self.picker.pick(ctx, scored)
        });
        if picked.is_empty() {
            return Err(ScheduleError::AllFiltered {
                filter: self.picker.name().to_owned(),
            });
        }
        let primary = picked[0].candidate;
        let amount = self
            .load
            .amount(ctx.request, ctx.matched_bytes(primary.endpoint.id));
        let result = ScheduleResult {
            scores: picked.iter().map(|p| p.score).collect(),
            targets: picked.into_iter().map(|p| p.candidate.clone()).collect(),
            profile: self.name.clone(),
            reservation: Some(Reservation::new(primary.endpoint.clone(), amount)),
        };
        for p in &self.post_schedule {
            timing.run("PostSchedule", p.name(), || p.post_schedule(ctx, &result));
        }
        Ok(result)
    }

    /// Runs the filters in order; fails naming the filter that removed the last candidate.
    fn filter<'a>(
        &self,
        ctx: &mut SchedulingContext<'_>,
        candidates: &'a [Candidate],
        timing: &Timing<'_>,
    ) -> Result<Vec<&'a Candidate>, ScheduleError> {
        let mut remaining: Vec<&Candidate> = candidates.iter().collect();
        for f in &self.filters {
            remaining = timing.run("Filter", f.name(), || f.filter(ctx, remaining));
            if remaining.is_empty() {
                return Err(ScheduleError::AllFiltered {
                    filter: f.name().to_owned(),
                });
            }
        }
        Ok(remaining)
    }

    /// Σ weight × score, each score clamped to `[0, 1]` (NaN counts as 0).
    fn score<'a>(
        &self,
        ctx: &mut SchedulingContext<'_>,
        remaining: Vec<&'a Candidate>,
        timing: &Timing<'_>,
    ) -> Vec<ScoredEndpoint<'a>> {
        let mut total = vec![0.0; remaining.len()];
        let mut scores = vec![0.0; remaining.len()];
        for (scorer, weight) in &self.scorers {
            timing.run("Scorer", scorer.name(), || {
                scores.fill(0.0);
                scorer.score(ctx, &remaining, &mut scores);
            });
            for (t, v) in total.iter_mut().zip(&scores) {
                let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
                *t += weight * v;
            }
        }
        let weights: f64 = self.scorers.iter().map(|(_, w)| w).sum();
        ctx.score_scale = if weights > 0.0 { weights } else { 1.0 };
        remaining
            .into_iter()
            .zip(total)
            .map(|(candidate, score)| ScoredEndpoint { candidate, score })
            .collect()
    }
}
