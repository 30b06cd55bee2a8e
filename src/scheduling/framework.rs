//! The scheduling framework: one-method plugin traits and the profile runner.
//!
//! A decision runs `pre-schedule → filters → scorers → picker → post-schedule`:
//! filters run in order and stop once no candidate is left; each scorer's scores are clamped to
//! `[0, 1]` and summed with the scorer's weight; the picker chooses from the scored candidates;
//! post-schedule plugins see the result (the prefix plugin records it in its index).
//!
//! Plugins work on borrowed candidates (`&Candidate` from the request's datastore snapshot), so a
//! decision clones nothing per endpoint. Per-request plugin state lives in [`CycleState`], keyed
//! by a type private to the plugin that owns it.

use std::any::{Any, TypeId};
use std::sync::Arc;
use std::time::Instant;

use crate::datastore::Candidate;
use crate::request::LlmRequest;

/// Per-decision scratch space shared by the plugins of one scheduling cycle.
#[derive(Default)]
pub struct CycleState {
    entries: Vec<(TypeId, Box<dyn Any + Send>)>,
}

impl CycleState {
    pub fn insert<T: Any + Send>(&mut self, value: T) {
        let id = TypeId::of::<T>();
        self.entries.retain(|(k, _)| *k != id);
        self.entries.push((id, Box::new(value)));
    }

    pub fn get<T: Any + Send>(&self) -> Option<&T> {
        let id = TypeId::of::<T>();
        self.entries
            .iter()
            .find(|(k, _)| *k == id)
            .and_then(|(_, v)| v.downcast_ref())
    }
}

/// Everything a plugin may look at while scheduling one request.
pub struct SchedulingContext<'r> {
    pub request: &'r LlmRequest,
    pub rng: fastrand::Rng,
    pub state: CycleState,
}

impl<'r> SchedulingContext<'r> {
    pub fn new(request: &'r LlmRequest, rng: fastrand::Rng) -> Self {
        Self {
            request,
            rng,
            state: CycleState::default(),
        }
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
#[derive(Debug, Clone)]
pub struct ScheduleResult {
    /// Chosen endpoints, primary first.
    pub targets: Vec<Candidate>,
    /// Their scores, aligned with `targets`.
    pub scores: Vec<f64>,
    pub profile: String,
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
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("name", &self.name)
            .field(
                "pre_schedule",
                &self
                    .pre_schedule
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>(),
            )
            .field(
                "filters",
                &self.filters.iter().map(|p| p.name()).collect::<Vec<_>>(),
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
                &self
                    .post_schedule
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>(),
            )
            .finish()
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
        }
    }

    /// Runs the profile over `candidates`.
    pub fn run(
        &self,
        ctx: &mut SchedulingContext<'_>,
        candidates: &[Candidate],
        timer: Option<&dyn PluginTimer>,
    ) -> Result<ScheduleResult, ScheduleError> {
        if candidates.is_empty() {
            return Err(ScheduleError::NoCandidates);
        }
        let time = |point: &'static str, name: &str, start: Option<Instant>| {
            if let (Some(t), Some(s)) = (timer, start) {
                t.observe(point, name, s.elapsed().as_secs_f64());
            }
        };
        let now = || timer.map(|_| Instant::now());

        for p in &self.pre_schedule {
            let s = now();
            p.pre_schedule(ctx, candidates);
            time("PreSchedule", p.name(), s);
        }

        let mut remaining: Vec<&Candidate> = candidates.iter().collect();
        for f in &self.filters {
            let s = now();
            remaining = f.filter(ctx, remaining);
            time("Filter", f.name(), s);
            if remaining.is_empty() {
                return Err(ScheduleError::AllFiltered {
                    filter: f.name().to_owned(),
                });
            }
        }

        let mut total = vec![0.0; remaining.len()];
        if !self.scorers.is_empty() {
            let mut scores = vec![0.0; remaining.len()];
            for (scorer, weight) in &self.scorers {
                let s = now();
                scores.fill(0.0);
                scorer.score(ctx, &remaining, &mut scores);
                for (t, v) in total.iter_mut().zip(&scores) {
                    let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
                    *t += weight * v;
                }
                time("Scorer", scorer.name(), s);
            }
        }

        let scored: Vec<ScoredEndpoint<'_>> = remaining
            .into_iter()
            .zip(total)
            .map(|(candidate, score)| ScoredEndpoint { candidate, score })
            .collect();
        let s = now();
        let picked = self.picker.pick(ctx, scored);
        time("Picker", self.picker.name(), s);
        if picked.is_empty() {
            return Err(ScheduleError::AllFiltered {
                filter: self.picker.name().to_owned(),
            });
        }
        let result = ScheduleResult {
            scores: picked.iter().map(|p| p.score).collect(),
            targets: picked.into_iter().map(|p| p.candidate.clone()).collect(),
            profile: self.name.clone(),
        };
        for p in &self.post_schedule {
            let s = now();
            p.post_schedule(ctx, &result);
            time("PostSchedule", p.name(), s);
        }
        Ok(result)
    }
}
