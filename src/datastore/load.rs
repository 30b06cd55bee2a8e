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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Endpoint;
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
    held: bool,
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
        load.dispatched.fetch_add(1, Ordering::Relaxed);
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
            held: true,
        }
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    pub fn amount(&self) -> LoadAmount {
        self.amount
    }

    /// Its first token came `seconds` after the routing decision: one observation for its
    /// pool's first-token fit.
    pub fn observe_first_token(&self, seconds: f64) {
        self.endpoint.ttft.observe(self.observation, seconds);
    }

    /// The first response byte arrived: the prompt has been computed, so its prefill work
    /// leaves the endpoint's queue. Later calls do nothing.
    pub fn prefill_done(&mut self) {
        if self.prefill_held {
            self.prefill_held = false;
            self.endpoint
                .load
                .pending_prefill
                .fetch_sub(self.amount.uncached_tokens, Ordering::Relaxed);
            self.endpoint
                .load
                .prefilling
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The request is over (completed, failed or reset). Later calls, and the drop, do
    /// nothing.
    pub fn release(&mut self) {
        self.prefill_done();
        if self.held {
            self.held = false;
            let load = &self.endpoint.load;
            load.requests.fetch_sub(1, Ordering::Relaxed);
            load.prompt_tokens
                .fetch_sub(self.amount.prompt_tokens, Ordering::Relaxed);
            load.output_tokens
                .fetch_sub(self.amount.output_tokens, Ordering::Relaxed);
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
        let result = std::panic::catch_unwind(move || {
            let _r = Reservation::new(ep2, AMOUNT);
            panic!("handler bug");
        });
        assert!(result.is_err());
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
