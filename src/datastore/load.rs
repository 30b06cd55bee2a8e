//! epp's own load accounting: what epp routed to each endpoint and has not yet seen finish.
//!
//! Scraped metrics are at best one scrape interval old and frozen between scrapes, so every
//! decision in between would see the same picture and pile onto the same endpoint. epp
//! therefore counts, per endpoint, the work it dispatched itself:
//!
//! | counter | added when | released when |
//! |---|---|---|
//! | `requests` | the request is routed | the response ends, fails or is reset |
//! | `prompt_tokens` | routed (estimated prompt tokens) | as `requests` |
//! | `pending_prefill` | routed (prompt tokens minus the prefix epp expects cached there) | the first response byte (prefill done), or the end |
//! | `prefilling` | routed (one per request) | as `pending_prefill` |
//! | `output_tokens` | routed, only when output estimation is on (`inflight-load-producer`) | as `requests` |
//! | `dispatched` | routed (monotonic; never released) | — |
//!
//! A [`Reservation`] adds its amounts inside the scheduling decision (so concurrent decisions
//! see each other) and takes them back exactly once: early for the prefill part
//! ([`Reservation::prefill_done`]), and everything else on [`Reservation::release`] or when it
//! is dropped — a stream that ends in any way, a panic unwinding through its handler included,
//! cannot leak load.
//!
//! **Ends epp cannot see.** A gateway that does not send response bodies to epp (Envoy's
//! `response_body_mode: NONE`) closes the ext_proc stream while a streamed response is still
//! being generated. Such a request is *parked* ([`Reservation::park`]): it stays counted on its
//! endpoint until the endpoint's own metrics show it gone. Each successful scrape reconciles
//! the parked requests with the engine's counts ([`EndpointLoad::reconcile_parked`]), looking
//! only at those parked before the scrape started:
//!
//! * at most (the engine's running + waiting − epp's requests there on open streams) stay
//!   parked; the oldest of the others are released;
//! * at most (the engine's waiting − epp's open requests there still prefilling) keep their
//!   prefill; the oldest of the others give it up (the engine has scheduled them).
//!
//! Without response bodies epp sees no first byte either, even while Envoy keeps the stream
//! open to the response's end (waiting for response trailers): an event stream's prefill is
//! parked at the response headers ([`Reservation::park_prefill`]) and ends by the second
//! rule, or with its request.
//!
//! A page without a count releases what that count would bound; a failed scrape changes
//! nothing. At most [`PARKED_CAP`] requests stay parked per endpoint (the oldest go first), and
//! an endpoint leaving the pool releases its own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Endpoint;
use super::cache_fit::CacheCheck;
use super::ttft_fit::Observation;

/// Live counters of one endpoint (shared by every reservation against it).
#[derive(Debug, Default)]
pub struct EndpointLoad {
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    pending_prefill: AtomicU64,
    prefilling: AtomicU64,
    output_tokens: AtomicU64,
    dispatched: AtomicU64,
    smoothed: SmoothedRequests,
    /// Requests whose end epp cannot see, oldest first (see the module docs).
    parked: Mutex<VecDeque<Parked>>,
}

/// Most requests kept parked on one endpoint; past it the oldest is released.
pub const PARKED_CAP: usize = 16_384;

/// A parked request: what it still holds of its endpoint's load. An entry that holds only
/// the prefill belongs to a request still on an open stream ([`Reservation::park_prefill`]).
#[derive(Debug, Clone, Copy)]
struct Parked {
    amount: LoadAmount,
    /// Its place in the endpoint's dispatch order ([`EndpointLoad::dispatched`] before it).
    seq: u64,
    prefill_held: bool,
    request_held: bool,
}

/// What one scrape says the engine holds; `None` where the page did not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineCounts {
    /// Running plus waiting requests.
    pub requests: Option<u64>,
    /// Requests not yet scheduled (their prompts not yet computed).
    pub waiting: Option<u64>,
}

/// How many of `old` parked entries the engine cannot be holding: it holds at most `engine`
/// requests of the kind, `attached` of which are epp's requests on open streams.
fn beyond_engine(old: u64, engine: Option<u64>, attached: u64) -> u64 {
    old.saturating_sub(engine.map_or(0, |n| n.saturating_sub(attached)))
}

/// How many of `entries` are `before` a scrape, and how many there are.
fn tally<'a>(
    entries: impl Iterator<Item = &'a Parked>,
    before: impl Fn(&Parked) -> bool,
) -> (u64, u64) {
    entries.fold((0, 0), |(old, all), p| {
        (old + u64::from(before(p)), all + 1)
    })
}

/// A consistent-enough reading of [`EndpointLoad`] (each field is read once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadSnapshot {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub pending_prefill: u64,
    /// Requests that have not yet started answering.
    pub prefilling: u64,
    pub output_tokens: u64,
    pub dispatched: u64,
}

impl LoadSnapshot {
    /// In-flight tokens as llm-d's `inflight-load-producer` counts them: uncached prompt
    /// tokens still being prefilled, plus estimated output tokens when that is enabled.
    pub fn tokens(&self) -> u64 {
        self.pending_prefill + self.output_tokens
    }
}

impl EndpointLoad {
    pub fn snapshot(&self) -> LoadSnapshot {
        LoadSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            pending_prefill: self.pending_prefill.load(Ordering::Relaxed),
            prefilling: self.prefilling.load(Ordering::Relaxed),
            output_tokens: self.output_tokens.load(Ordering::Relaxed),
            dispatched: self.dispatched.load(Ordering::Relaxed),
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn pending_prefill(&self) -> u64 {
        self.pending_prefill.load(Ordering::Relaxed)
    }

    /// Requests routed here since the process started (monotonic).
    pub fn dispatched(&self) -> u64 {
        self.dispatched.load(Ordering::Relaxed)
    }

    /// Requests in flight averaged over about the last window of `clock` (see
    /// [`SmoothedRequests`]), sampled now.
    pub fn smoothed_requests(&self, clock: &SampleClock) -> f64 {
        self.smoothed.sample(self.requests(), clock)
    }

    /// Requests parked now (see the module docs); parked prefills of open requests not
    /// counted.
    pub fn parked(&self) -> usize {
        self.parked.lock().iter().filter(|p| p.request_held).count()
    }

    /// Reconciles the parked requests with a scrape of the endpoint that started when
    /// [`Self::dispatched`] was `dispatched_at_scrape` (see the module docs). Returns how many
    /// requests were released.
    pub fn reconcile_parked(&self, engine: EngineCounts, dispatched_at_scrape: u64) -> usize {
        let mut parked = self.parked.lock();
        let before = |p: &Parked| p.seq < dispatched_at_scrape;
        let released = self.release_beyond(&mut parked, engine.requests, before);
        self.end_prefill_beyond(&mut parked, engine.waiting, before);
        parked.retain(|p| p.request_held || p.prefill_held);
        released
    }

    /// Releases the oldest of the parked requests `before` a scrape that the engine's
    /// `requests` count leaves no room for; returns how many.
    fn release_beyond(
        &self,
        parked: &mut VecDeque<Parked>,
        requests: Option<u64>,
        before: impl Fn(&Parked) -> bool,
    ) -> usize {
        let (old, all) = tally(parked.iter().filter(|p| p.request_held), &before);
        let attached = self.requests().saturating_sub(all);
        let mut excess = beyond_engine(old, requests, attached);
        let released = excess as usize;
        parked.retain(|p| {
            if excess == 0 || !p.request_held || !before(p) {
                return true;
            }
            excess -= 1;
            self.take_back(p);
            false
        });
        released
    }

    /// Ends the prefill of the oldest parked requests `before` a scrape that the engine's
    /// `waiting` count leaves no room for.
    fn end_prefill_beyond(
        &self,
        parked: &mut VecDeque<Parked>,
        waiting: Option<u64>,
        before: impl Fn(&Parked) -> bool,
    ) {
        let (old, all) = tally(parked.iter().filter(|p| p.prefill_held), &before);
        let attached = self.prefilling().saturating_sub(all);
        let excess = beyond_engine(old, waiting, attached) as usize;
        let old_prefilling = parked.iter_mut().filter(|p| p.prefill_held && before(p));
        for p in old_prefilling.take(excess) {
            p.prefill_held = false;
            self.end_prefill(p.amount);
        }
    }

    /// Releases every parked request (the endpoint left the pool).
    pub fn release_parked(&self) {
        for p in self.parked.lock().drain(..) {
            self.take_back(&p);
        }
    }

    fn park(&self, p: Parked) {
        let mut parked = self.parked.lock();
        if parked.len() >= PARKED_CAP
            && let Some(oldest) = parked.pop_front()
        {
            self.take_back(&oldest);
        }
        parked.push_back(p);
    }

    fn prefilling(&self) -> u64 {
        self.prefilling.load(Ordering::Relaxed)
    }

    /// The prefill parked for the request dispatched as `seq`, if still parked, ends (the
    /// request itself has ended).
    fn unpark_prefill(&self, seq: u64) {
        let mut parked = self.parked.lock();
        let found = parked.iter().position(|p| p.seq == seq && !p.request_held);
        if let Some(p) = found.and_then(|i| parked.remove(i)) {
            self.take_back(&p);
        }
    }

    /// Subtracts what a parked entry holds.
    fn take_back(&self, p: &Parked) {
        if p.prefill_held {
            self.end_prefill(p.amount);
        }
        if p.request_held {
            self.end_request(p.amount);
        }
    }

    /// Subtracts a request's prefill.
    fn end_prefill(&self, amount: LoadAmount) {
        self.pending_prefill
            .fetch_sub(amount.uncached_tokens, Ordering::Relaxed);
        self.prefilling.fetch_sub(1, Ordering::Relaxed);
    }

    /// Subtracts what a request holds after its prefill.
    fn end_request(&self, amount: LoadAmount) {
        self.requests.fetch_sub(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_sub(amount.prompt_tokens, Ordering::Relaxed);
        self.output_tokens
            .fetch_sub(amount.output_tokens, Ordering::Relaxed);
    }

    /// True when nothing is in flight.
    pub fn is_idle(&self) -> bool {
        let s = self.snapshot();
        s.requests == 0
            && s.prompt_tokens == 0
            && s.pending_prefill == 0
            && s.prefilling == 0
            && s.output_tokens == 0
    }
}

/// Samples per window at most; reads in between return the last mean.
const SAMPLES_PER_WINDOW: u64 = 64;

/// The time of one decision and the averaging window, worked out once for all candidates.
#[derive(Debug, Clone, Copy)]
pub struct SampleClock {
    /// [`super::nanos_since_origin`] + 1 (0 means "never" in a sample).
    t: u64,
    window_ns: u64,
    min_gap_ns: u64,
}

impl SampleClock {
    pub fn new(now: Instant, window: Duration) -> Self {
        let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX).max(1);
        Self {
            t: super::nanos_since_origin(now).min(u64::MAX - 1) + 1,
            window_ns,
            min_gap_ns: window_ns / SAMPLES_PER_WINDOW,
        }
    }
}

/// In-flight requests averaged over time: an exponentially weighted mean with the clock's
/// window as time constant, sampled by the decisions that read it (at most
/// [`SAMPLES_PER_WINDOW`] times per window), so an imbalance that lasts stands out from one that
/// passes. Concurrent readers race benignly: a lost sample only delays the mean.
#[derive(Debug, Default)]
pub struct SmoothedRequests {
    mean_bits: AtomicU64,
    /// [`SampleClock`] time of the last sample (0: never sampled).
    at: AtomicU64,
}

impl SmoothedRequests {
    /// Folds `current` into the mean if the last sample is old enough; returns the mean.
    pub fn sample(&self, current: u64, clock: &SampleClock) -> f64 {
        let at = self.at.load(Ordering::Relaxed);
        if at == 0 {
            self.store(current as f64, clock.t);
            return current as f64;
        }
        let mean = f64::from_bits(self.mean_bits.load(Ordering::Relaxed));
        let elapsed = clock.t.saturating_sub(at);
        if elapsed < clock.min_gap_ns {
            return mean;
        }
        let keep = (-(elapsed as f64) / clock.window_ns as f64).exp();
        let next = mean * keep + current as f64 * (1.0 - keep);
        self.store(next, clock.t);
        next
    }

    fn store(&self, mean: f64, t: u64) {
        self.mean_bits.store(mean.to_bits(), Ordering::Relaxed);
        self.at.store(t, Ordering::Relaxed);
    }
}

/// What one request adds to its endpoint's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadAmount {
    pub prompt_tokens: u64,
    /// Prompt tokens epp expects the endpoint to compute (not cached there).
    pub uncached_tokens: u64,
    /// Estimated output tokens (0 unless output estimation is on).
    pub output_tokens: u64,
}

/// One request's share of an endpoint's load; released exactly once (see the module docs).
#[derive(Debug)]
pub struct Reservation {
    endpoint: Arc<Endpoint>,
    amount: LoadAmount,
    /// The request and what the endpoint had in flight before it, as the pool's first-token
    /// fit sees them (each counter read in the same atomic step as the request's add to it).
    observation: Observation,
    prefill_held: bool,
    /// Its prefill waits in the endpoint's parked entries ([`Self::park_prefill`]).
    prefill_parked: bool,
    held: bool,
    /// Its place in the endpoint's dispatch order.
    seq: u64,
    /// What the decision predicted the endpoint's cache holds of the prompt, once noted.
    cache_check: OnceLock<CacheCheck>,
    /// Seconds to its first token, until the fit is given them ([`Self::observe_first_token`]).
    first_token: Option<f64>,
}

impl Reservation {
    /// Adds `amount` to `endpoint`'s load.
    pub fn new(endpoint: Arc<Endpoint>, amount: LoadAmount) -> Self {
        let load = &endpoint.load;
        let requests = load.requests.fetch_add(1, Ordering::Relaxed);
        load.prompt_tokens
            .fetch_add(amount.prompt_tokens, Ordering::Relaxed);
        let pending_prefill = load
            .pending_prefill
            .fetch_add(amount.uncached_tokens, Ordering::Relaxed);
        let prefilling = load.prefilling.fetch_add(1, Ordering::Relaxed);
        load.output_tokens
            .fetch_add(amount.output_tokens, Ordering::Relaxed);
        let seq = load.dispatched.fetch_add(1, Ordering::Relaxed);
        Self {
            endpoint,
            amount,
            observation: Observation {
                uncached: amount.uncached_tokens,
                queued: pending_prefill,
                inflight: requests,
                waiting: prefilling,
            },
            prefill_held: true,
            prefill_parked: false,
            held: true,
            seq,
            cache_check: OnceLock::new(),
            first_token: None,
        }
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    pub fn amount(&self) -> LoadAmount {
        self.amount
    }

    /// Notes what the decision predicted of the endpoint's cache (the first note counts).
    pub fn note_cache_check(&self, check: CacheCheck) {
        let _ = self.cache_check.set(check);
    }

    /// The engine reported `cached` of the prompt's `prompt` tokens cached: the noted
    /// prediction is checked against it ([`crate::datastore::cache_fit`]), and the first-token
    /// observation waiting for it goes to the fit with the prompt tokens the engine really
    /// computed instead of those predicted.
    pub fn observe_cached(&mut self, cached: u64, prompt: u64) {
        if prompt == 0 {
            return;
        }
        let share = cached.min(prompt) as f64 / prompt as f64;
        if let Some(check) = self.cache_check.get() {
            self.endpoint.cache_fit.observe(*check, share);
        }
        self.fit_first_token(Some(1.0 - share));
    }

    /// Its first token came `seconds` after the routing decision: one observation for its
    /// pool's first-token fit, given when the response's usage shows what the engine computed
    /// ([`Self::observe_cached`]), or as predicted when the request ends without it.
    pub fn observe_first_token(&mut self, seconds: f64) {
        self.first_token.get_or_insert(seconds);
    }

    /// Gives the waiting first-token observation to the fit, with the request's uncached
    /// tokens at `uncached_share` of its prompt where the engine said (once).
    fn fit_first_token(&mut self, uncached_share: Option<f64>) {
        let Some(seconds) = self.first_token.take() else {
            return;
        };
        let mut observation = self.observation;
        if let Some(share) = uncached_share {
            observation.uncached = (self.amount.prompt_tokens as f64 * share).round() as u64;
        }
        self.endpoint.ttft.observe(observation, seconds);
    }

    /// The first response byte arrived: the prompt has been computed, so its prefill work
    /// leaves the endpoint's queue. Later calls do nothing.
    pub fn prefill_done(&mut self) {
        if std::mem::take(&mut self.prefill_held) {
            self.endpoint.load.end_prefill(self.amount);
        }
    }

    /// The response goes on where epp sees no first token (Envoy sends no response bodies):
    /// the prefill stays counted until a scrape shows the engine has scheduled it, as a
    /// parked request's does (see the module docs), or until the request ends.
    pub fn park_prefill(&mut self) {
        if std::mem::take(&mut self.prefill_held) {
            self.prefill_parked = true;
            self.endpoint.load.park(Parked {
                amount: self.amount,
                seq: self.seq,
                prefill_held: true,
                request_held: false,
            });
        }
    }

    /// The request is over (completed, failed or reset). Later calls, and the drop, do
    /// nothing.
    pub fn release(&mut self) {
        self.fit_first_token(None);
        self.prefill_done();
        if std::mem::take(&mut self.prefill_parked) {
            self.endpoint.load.unpark_prefill(self.seq);
        }
        if self.held {
            self.held = false;
            self.endpoint.load.end_request(self.amount);
        }
    }

    /// The request goes on at its endpoint where epp cannot see its end: what it holds stays
    /// counted until scrapes show it gone, its prefill until one shows it scheduled (see the
    /// module docs).
    pub fn park(mut self) {
        if std::mem::take(&mut self.held) {
            self.prefill_parked = false;
            self.endpoint.load.park(Parked {
                amount: self.amount,
                seq: self.seq,
                prefill_held: std::mem::take(&mut self.prefill_held),
                request_held: true,
            });
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::EndpointSpec;

    fn endpoint() -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            0,
            EndpointSpec::new("a", ([127, 0, 0, 1], 1).into()),
        ))
    }

    const AMOUNT: LoadAmount = LoadAmount {
        prompt_tokens: 100,
        uncached_tokens: 60,
        output_tokens: 7,
    };

    #[test]
    fn first_token_times_are_fitted_with_the_tokens_the_engine_computed() {
        // Every request was predicted a full hit, but the engine had evicted the prefix and
        // computed each prompt whole, at 0.1 ms per token.
        let fit = |engine_reports: bool| {
            let ep = endpoint();
            let mut rng = fastrand::Rng::with_seed(5);
            for _ in 0..300 {
                let prompt = rng.u64(500..4000);
                let amount = LoadAmount {
                    prompt_tokens: prompt,
                    uncached_tokens: 0,
                    output_tokens: 0,
                };
                let mut r = Reservation::new(ep.clone(), amount);
                r.observe_first_token(1e-4 * prompt as f64);
                if engine_reports {
                    r.observe_cached(0, prompt);
                }
            }
            // One observation per request (decayed), whichever way it was given.
            assert!((250.0..300.0).contains(&ep.ttft.observations()));
            ep.ttft.weights()
        };
        // With the cached tokens reported, the per-token cost shows and the fit is used; with
        // the prediction alone the times are unexplained and the scorer keeps its defaults.
        assert!(fit(true).is_some());
        assert!(fit(false).is_none());
    }

    #[test]
    fn reserve_prefill_done_release_balance() {
        let ep = endpoint();
        let mut r = Reservation::new(ep.clone(), AMOUNT);
        let s = ep.load.snapshot();
        assert_eq!(
            (
                s.requests,
                s.prompt_tokens,
                s.pending_prefill,
                s.output_tokens
            ),
            (1, 100, 60, 7)
        );
        assert_eq!(s.tokens(), 67);
        assert_eq!(s.prefilling, 1);
        let alone = Observation {
            uncached: 60,
            ..Observation::default()
        };
        assert_eq!(r.observation, alone);
        let second = Reservation::new(ep.clone(), AMOUNT);
        let behind_one = Observation {
            uncached: 60,
            queued: 60,
            inflight: 1,
            waiting: 1,
        };
        assert_eq!(
            second.observation, behind_one,
            "what the second request waits behind"
        );
        drop(second);
        r.prefill_done();
        r.prefill_done();
        assert_eq!(ep.load.pending_prefill(), 0);
        assert_eq!(ep.load.snapshot().prefilling, 0);
        assert_eq!(ep.load.requests(), 1);
        r.release();
        r.release();
        drop(r);
        assert!(ep.load.is_idle());
        assert_eq!(ep.load.dispatched(), 2, "the dispatch count is monotonic");
    }

    #[test]
    fn drop_releases_everything_once() {
        let ep = endpoint();
        {
            let _a = Reservation::new(ep.clone(), AMOUNT);
            let mut b = Reservation::new(ep.clone(), AMOUNT);
            b.prefill_done();
            assert_eq!(ep.load.pending_prefill(), 60);
        }
        assert!(ep.load.is_idle());
    }

    #[test]
    fn panicking_holder_still_releases() {
        let ep = endpoint();
        let ep2 = ep.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _r = Reservation::new(ep2, AMOUNT);
            panic!("handler bug");
        }));
        assert!(result.is_err());
        assert!(ep.load.is_idle());
    }

    fn counts(requests: u64, waiting: u64) -> EngineCounts {
        EngineCounts {
            requests: Some(requests),
            waiting: Some(waiting),
        }
    }

    #[test]
    fn parked_requests_stay_until_the_engine_counts_show_them_gone() {
        let ep = endpoint();
        let load = &ep.load;
        for _ in 0..3 {
            Reservation::new(ep.clone(), AMOUNT).park();
        }
        let open = Reservation::new(ep.clone(), AMOUNT);
        let s = load.snapshot();
        assert_eq!((s.requests, s.prompt_tokens, s.output_tokens), (4, 400, 28));
        assert_eq!(
            (s.pending_prefill, s.prefilling),
            (240, 4),
            "parked prefill stays"
        );
        assert_eq!(load.parked(), 3);
        // A scrape that started after all four: the engine holds 3 (the open one among them),
        // 2 waiting (the open one and one parked).
        assert_eq!(load.reconcile_parked(counts(3, 2), 4), 1);
        let s = load.snapshot();
        assert_eq!((s.requests, load.parked()), (3, 2));
        assert_eq!(
            (s.pending_prefill, s.prefilling),
            (120, 2),
            "one parked still waits"
        );
        // The engine holds more than epp sent (another router's): nothing more goes.
        assert_eq!(load.reconcile_parked(counts(10, 10), 4), 0);
        assert_eq!(load.snapshot().prefilling, 2);
        // Idle engine: every parked request goes; the open one stays counted.
        assert_eq!(load.reconcile_parked(counts(0, 0), 4), 2);
        let s = load.snapshot();
        assert_eq!((s.requests, s.prefilling, load.parked()), (1, 1, 0));
        drop(open);
        assert!(load.is_idle());
    }

    #[test]
    fn a_parked_prefill_waits_for_a_scrape_or_its_requests_end() {
        let ep = endpoint();
        let load = &ep.load;
        let mut a = Reservation::new(ep.clone(), AMOUNT);
        let mut b = Reservation::new(ep.clone(), AMOUNT);
        a.park_prefill();
        b.park_prefill();
        let unanswered = Reservation::new(ep.clone(), AMOUNT);
        let s = load.snapshot();
        assert_eq!((s.requests, s.pending_prefill, s.prefilling), (3, 180, 3));
        assert_eq!(load.parked(), 0, "no request is parked, only prefills");
        // 2 waiting: the unanswered one and one more; the oldest parked prefill (a's) ends.
        assert_eq!(load.reconcile_parked(counts(3, 2), 3), 0);
        let s = load.snapshot();
        assert_eq!((s.requests, s.pending_prefill, s.prefilling), (3, 120, 2));
        // b ends before any scrape shows its prefill scheduled: the prefill goes with it.
        drop(b);
        let s = load.snapshot();
        assert_eq!((s.requests, s.pending_prefill, s.prefilling), (2, 60, 1));
        drop(a);
        drop(unanswered);
        assert!(load.is_idle());
        // Trailers skipped as well: the request parks after its prefill did.
        let mut c = Reservation::new(ep.clone(), AMOUNT);
        c.park_prefill();
        c.park();
        assert_eq!((load.parked(), load.snapshot().prefilling), (1, 1));
        assert_eq!(load.reconcile_parked(counts(0, 0), 4), 1);
        assert!(load.is_idle());
    }

    #[test]
    fn a_scrape_older_than_a_parking_does_not_release_it() {
        let ep = endpoint();
        let load = &ep.load;
        Reservation::new(ep.clone(), AMOUNT).park();
        let scrape_started_at = load.dispatched();
        Reservation::new(ep.clone(), AMOUNT).park();
        // The engine reports nothing, but only the first was sent before the scrape.
        assert_eq!(load.reconcile_parked(counts(0, 0), scrape_started_at), 1);
        assert_eq!((load.parked(), load.snapshot().prefilling), (1, 1));
        // A page with a running count but no waiting one: the prefill goes, the request stays.
        let running_only = EngineCounts {
            requests: Some(1),
            waiting: None,
        };
        assert_eq!(load.reconcile_parked(running_only, load.dispatched()), 0);
        assert_eq!((load.parked(), load.snapshot().prefilling), (1, 0));
        // A page without either count releases what was parked before it.
        assert_eq!(
            load.reconcile_parked(EngineCounts::default(), load.dispatched()),
            1
        );
        assert!(load.is_idle());
    }

    #[test]
    fn parking_is_bounded_and_an_endpoint_leaving_releases_its_own() {
        let ep = endpoint();
        for _ in 0..PARKED_CAP + 5 {
            Reservation::new(ep.clone(), AMOUNT).park();
        }
        assert_eq!(ep.load.parked(), PARKED_CAP);
        assert_eq!(ep.load.requests(), PARKED_CAP as u64);
        ep.load.release_parked();
        assert!(ep.load.is_idle());
    }

    #[test]
    fn smoothed_requests_follow_a_lasting_change_and_skip_close_samples() {
        let s = SmoothedRequests::default();
        let window = Duration::from_secs(10);
        // Later than any clock origin another test thread may set meanwhile.
        let t0 = Instant::now() + Duration::from_secs(1);
        let at = |d: Duration| SampleClock::new(t0 + d, window);
        assert_eq!(s.sample(0, &at(Duration::ZERO)), 0.0);
        // Within 1/64 of the window: the mean is returned as it is.
        assert_eq!(s.sample(10, &at(Duration::from_millis(100))), 0.0);
        // One window later: 1 − 1/e of the way to the new value.
        let m = s.sample(10, &at(window));
        assert!((m - 10.0 * (1.0 - (-1.0f64).exp())).abs() < 1e-6, "{m}");
        // Many windows later: there.
        let m = s.sample(10, &at(20 * window));
        assert!((m - 10.0).abs() < 1e-3, "{m}");
    }
}
