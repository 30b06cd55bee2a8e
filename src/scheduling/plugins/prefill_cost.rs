//! `prefill-cost-scorer`: epp's "sticky until it costs more than it saves" scorer — a request
//! goes where its first token is expected soonest, unless its prefix holder carries far more
//! than its share of the load.
//!
//! Algorithm. For each candidate `e`, in prompt tokens:
//!
//! ```text
//! cost(e) = queued(e) + uncached(e) + decodeTokensPerRequest × inflight(e)
//! score(e) = min_e' cost(e') / cost(e)          (1 for the cheapest; costs + 1 to avoid 0)
//! ```
//!
//! * `queued(e)`: uncached prompt tokens epp routed to `e` that are still being prefilled (its own
//!   load accounting; released at each request's first response byte) — the prefill work this
//!   request would wait behind;
//! * `uncached(e)`: this request's prompt tokens minus those the prefix plugin expects `e` to
//!   hold — the prefill it would cost there. A holder of a long shared prefix is cheaper by the
//!   length of that prefix, so requests stick to it until its queue is longer than what
//!   recomputing the prefix elsewhere would take; then they spill to the next cheapest endpoint,
//!   which becomes a second holder (a hot prefix gets as many replicas as its load needs);
//! * `inflight(e)`: requests epp has in flight there, each slowing every engine step (and so
//!   the new request's prefill step) by its decode. `decodeTokensPerRequest` (default 16)
//!   prices that in prompt tokens: a decoding sequence costs a step about `20 µs` plus its KV
//!   read (`~0.16 µs` per context token for a 7–8B model on an H100), against `~25 µs` per
//!   prefilled token, i.e. 10–25 tokens for 1–3k-token contexts. (The learned weights below
//!   come out near 40 on such an engine: a new request also waits out the step in progress.)
//!
//! Saturated holders. The cost above is one request's first token; it never weighs what a
//! request does to the requests after it. Prefixes are dealt to endpoints as they first
//! appear, so some endpoints end up holding more hot prefixes than others, and a holder that
//! stays cheaper for each single request keeps that extra load for good. An endpoint is
//! therefore saturated when its requests in flight exceed `saturationRatio` (default 1.5) × the
//! candidates' mean and the mean + `saturationMargin` (default 2), both right now and averaged
//! over `saturationWindowSeconds` (default 10 s; an exponentially weighted mean): the imbalance
//! has lasted, it is not the noise of a few requests. A saturated endpoint's cached prefix
//! does not count (`uncached(e) = prompt`), so the request goes to another holder below the
//! limit if there is one, else to the cheapest endpoint, which becomes a holder: the hot
//! prefix gets a replica where there is room, and its later requests split between the
//! holders by cost. 1.5 is sglang-router's `balance_rel_threshold`; the margin keeps a nearly
//! idle pool (mean 0.5, holder 1) from counting as imbalanced. `saturationRatio: 0` turns
//! saturation off.
//!
//! Evictions. Where an endpoint's cache is full, the part of the prompt it does not hold
//! pushes as much cached prompt out of it, and the pool pays for that again when it asks for
//! the evicted blocks. With `priceEvictions` (default true) the cost adds
//!
//! ```text
//! displaced(e) = uncached(e) × returning     (0 where e's cache has room for it)
//! ```
//!
//! `returning` is the share of the blocks the prefix index evicted lately that the pool has
//! asked for again ([`crate::index::PrefixIndex::displacement`]). Where prompts are unique
//! nothing comes back and the term is 0; where caches are too small for the prefixes in use
//! it approaches the prompt itself: one more copy of a prefix costs its recompute there and
//! the recompute of what it evicts, so a hot prefix gets a replica only where its holder's
//! queue is worth both, and the holders keep their hits when every queue is long. A cache
//! counts as full when the blocks would not fit (room within the index's eviction
//! granularity is not room), so between full endpoints the term does not pick favourites;
//! an endpoint with real room (new, or bigger) gets new prefixes first.
//!
//! Learned weights. The weights 1 (queued tokens) and `decodeTokensPerRequest` are right
//! for engines that batch prefill under a per-step token budget. With `learnWeights` (default
//! true) the scorer uses instead the weights its pool learned from its own streamed
//! responses' first-token times ([`crate::datastore::ttft_fit`]):
//!
//! ```text
//! cost(e) = w_q × queued(e) + uncached(e) + w_n × inflight(e) + w_w × waiting(e)
//! ```
//!
//! with `waiting(e)` the requests in flight there that have not started answering. On an
//! engine that runs only a few sequences at once such a request costs a wait for a slot
//! (thousands of tokens' worth), and the scorer spreads by them; on one that prefills requests
//! in parallel, queued tokens cost nothing; on one that reuses no cached prefix (or answers
//! after a fixed delay), a request costs the same wherever it goes, the prices of requests
//! reach their clamps, and the scorer spreads by load whichever endpoints hold the prefix.
//! `w_n` is never below `decodeTokensPerRequest`, so a fit misled by noisy timings cannot make
//! the scorer blind to load. Until the fit has enough observations, and with
//! `learnWeights: false`, `w_q = 1`, `w_n = decodeTokensPerRequest` and `w_w = 0`.
//!
//! With no prefix plugin in the profile every endpoint has `uncached = prompt`, and the scorer
//! balances the queued prefill work and the decode load. Near-equal costs are ties for the
//! picker, which then prefers the endpoint with the fewest requests in flight.

use std::time::Duration;

use crate::datastore::ttft_fit::{CostWeights, TtftFit};
use crate::datastore::{Candidate, LoadSnapshot, SampleClock};
use crate::scheduling::framework::{SchedulingContext, Scorer};
use crate::scheduling::plugins::inflight_load::tokens_of;

pub const TYPE: &str = "prefill-cost-scorer";
pub const DEFAULT_DECODE_TOKENS_PER_REQUEST: f64 = 16.0;
pub const DEFAULT_SATURATION_RATIO: f64 = 1.5;
pub const DEFAULT_SATURATION_MARGIN: f64 = 2.0;
pub const DEFAULT_SATURATION_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
pub struct PrefillCostScorer {
    pub decode_tokens_per_request: f64,
    /// × the candidates' mean in-flight requests above which a holder is saturated (0: off).
    pub saturation_ratio: f64,
    /// In-flight requests a saturated holder has at least above the mean.
    pub saturation_margin: f64,
    /// Time constant of the averaged in-flight requests.
    pub saturation_window: Duration,
    /// Price queued tokens and requests in flight by the pool's learned first-token cost.
    pub learn_weights: bool,
    /// Add the cached prompt a request would evict where caches are full.
    pub price_evictions: bool,
}

impl Default for PrefillCostScorer {
    fn default() -> Self {
        Self {
            decode_tokens_per_request: DEFAULT_DECODE_TOKENS_PER_REQUEST,
            saturation_ratio: DEFAULT_SATURATION_RATIO,
            saturation_margin: DEFAULT_SATURATION_MARGIN,
            saturation_window: DEFAULT_SATURATION_WINDOW,
            learn_weights: true,
            price_evictions: true,
        }
    }
}

impl PrefillCostScorer {
    /// The cost of sending the request of `ctx` to `c`, in prompt tokens (≥ 1), with `c`'s
    /// cached prefix counted (no saturation check).
    pub fn cost(&self, ctx: &SchedulingContext<'_>, c: &Candidate) -> f64 {
        let weights = self.weights(Some(&c.endpoint.ttft));
        self.cost_with(ctx, c, &c.endpoint.load.snapshot(), weights, false)
    }

    /// The weights of queued tokens and requests in flight: learned, or the configured ones.
    fn weights(&self, fit: Option<&TtftFit>) -> CostWeights {
        let configured = CostWeights {
            queued: 1.0,
            inflight_tokens: self.decode_tokens_per_request,
            waiting_tokens: 0.0,
        };
        let Some(learned) = fit
            .filter(|_| self.learn_weights)
            .and_then(TtftFit::weights)
        else {
            return configured;
        };
        // A fit may raise the price of a request in flight, never take away the configured
        // one: noisy first-token times must not leave the scorer blind to load.
        CostWeights {
            inflight_tokens: learned.inflight_tokens.max(configured.inflight_tokens),
            ..learned
        }
    }

    fn cost_with(
        &self,
        ctx: &SchedulingContext<'_>,
        c: &Candidate,
        load: &LoadSnapshot,
        w: CostWeights,
        saturated: bool,
    ) -> f64 {
        let prompt = tokens_of(ctx.request.prompt_len());
        let cached = if saturated {
            0
        } else {
            tokens_of(ctx.matched_bytes(c.endpoint.id)).min(prompt)
        };
        let uncached = prompt - cached;
        let displaced = if self.price_evictions {
            let bytes = ctx
                .prefix
                .as_ref()
                .map_or(0, |p| p.displaced_bytes(c.endpoint.id));
            tokens_of(bytes).min(uncached)
        } else {
            0
        };
        1.0 + w.queued * load.pending_prefill as f64
            + (uncached + displaced) as f64
            + w.inflight_tokens * load.requests as f64
            + w.waiting_tokens * load.prefilling as f64
    }

    /// In-flight requests above which one endpoint stands out, given the candidates' `total`.
    fn saturation_limit(&self, total: f64, candidates: usize) -> f64 {
        let mean = total / candidates as f64;
        (mean * self.saturation_ratio).max(mean + self.saturation_margin)
    }

    fn saturation_on(&self, candidates: usize) -> bool {
        self.saturation_ratio > 0.0 && candidates >= 2
    }
}

/// What the scorer reads of one candidate: its load and its averaged in-flight requests.
struct Reading {
    load: LoadSnapshot,
    averaged: f64,
}

impl Scorer for PrefillCostScorer {
    fn name(&self) -> &str {
        TYPE
    }

    fn score(&self, ctx: &SchedulingContext<'_>, candidates: &[&Candidate], scores: &mut [f64]) {
        let saturation = self.saturation_on(candidates.len());
        // Only sampled when saturation is on: off, nothing reads the averages.
        let clock = saturation.then(|| SampleClock::new(ctx.now, self.saturation_window));
        let (mut now_total, mut averaged_total) = (0.0, 0.0);
        let readings: Vec<Reading> = candidates
            .iter()
            .map(|c| {
                let load = c.endpoint.load.snapshot();
                let averaged = clock
                    .as_ref()
                    .map_or(0.0, |k| c.endpoint.load.smoothed_requests(k));
                now_total += load.requests as f64;
                averaged_total += averaged;
                Reading { load, averaged }
            })
            .collect();
        // One fit per pool: every candidate shares it.
        let weights = self.weights(candidates.first().map(|c| &*c.endpoint.ttft));
        let now_limit = self.saturation_limit(now_total, candidates.len());
        let averaged_limit = self.saturation_limit(averaged_total, candidates.len());
        let mut min = f64::INFINITY;
        for ((c, r), s) in candidates.iter().zip(&readings).zip(scores.iter_mut()) {
            let saturated =
                saturation && r.load.requests as f64 > now_limit && r.averaged > averaged_limit;
            *s = self.cost_with(ctx, c, &r.load, weights, saturated);
            min = min.min(*s);
        }
        // Scores are costs until here.
        for s in scores.iter_mut() {
            *s = min / *s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{EndpointMetrics, LoadAmount, Reservation};
    use crate::request::LlmRequest;
    use crate::scheduling::framework::PrefixMatchInfo;
    use crate::scheduling::plugins::test_support::candidates;

    fn ctx(req: &LlmRequest, matched: Vec<(u32, usize)>) -> SchedulingContext<'_> {
        let mut ctx = SchedulingContext::new(req, fastrand::Rng::with_seed(1));
        ctx.prefix = Some(PrefixMatchInfo {
            hashed_bytes: req.prompt_len(),
            matched,
            ..Default::default()
        });
        ctx
    }

    fn score(s: &PrefillCostScorer, ctx: &SchedulingContext<'_>, cs: &[Candidate]) -> Vec<f64> {
        let refs: Vec<_> = cs.iter().collect();
        let mut out = vec![0.0; cs.len()];
        s.score(ctx, &refs, &mut out);
        out
    }

    #[test]
    fn the_holder_wins_until_its_queue_outweighs_the_recompute() {
        let cs = candidates(&vec![EndpointMetrics::default(); 2]);
        // 4,000 bytes = 1,000 tokens, 3,600 bytes of which endpoint 0 holds.
        let req = LlmRequest {
            prompt: vec![b'x'; 4000],
            ..Default::default()
        };
        let s = PrefillCostScorer {
            decode_tokens_per_request: 0.0,
            ..Default::default()
        };
        let c = ctx(&req, vec![(0, 3600)]);
        let sc = score(&s, &c, &cs);
        assert_eq!(sc[0], 1.0);
        assert!((sc[1] - 101.0 / 1001.0).abs() < 1e-9);
        // 950 tokens already queued on the holder: 1,051 vs 1,001 ⇒ the other endpoint wins.
        let queued = LoadAmount {
            prompt_tokens: 950,
            uncached_tokens: 950,
            output_tokens: 0,
        };
        let r = Reservation::new(cs[0].endpoint.clone(), queued);
        let sc = score(&s, &c, &cs);
        assert_eq!(sc[1], 1.0);
        assert!(sc[0] < 1.0);
        drop(r);
    }

    #[test]
    fn a_replica_that_evicts_what_comes_back_costs_its_eviction_too() {
        let cs = candidates(&vec![EndpointMetrics::default(); 2]);
        let req = LlmRequest {
            prompt: vec![b'x'; 4000],
            ..Default::default()
        };
        let mut c = ctx(&req, vec![(0, 3600)]);
        // Endpoint 1's cache is full and half of what it evicts comes back: 2,000 bytes.
        c.prefix.as_mut().unwrap().displaced = vec![(1, 2000)];
        // The holder has 950 tokens queued: 1,051 against 1,001 + 500 ⇒ the holder wins.
        let queued = LoadAmount {
            prompt_tokens: 950,
            uncached_tokens: 950,
            output_tokens: 0,
        };
        let _r = Reservation::new(cs[0].endpoint.clone(), queued);
        let on = PrefillCostScorer {
            decode_tokens_per_request: 0.0,
            ..Default::default()
        };
        let sc = score(&on, &c, &cs);
        assert_eq!(sc[0], 1.0);
        assert!((sc[1] - 1051.0 / 1501.0).abs() < 1e-9, "{sc:?}");
        let off = PrefillCostScorer {
            price_evictions: false,
            ..on.clone()
        };
        assert_eq!(score(&off, &c, &cs)[1], 1.0, "priceEvictions: false");
        // Never more than the uncached prompt itself.
        c.prefix.as_mut().unwrap().displaced = vec![(1, 40_000)];
        assert!((score(&on, &c, &cs)[1] - 1051.0 / 2001.0).abs() < 1e-9);
    }

    #[test]
    fn decode_load_prices_inflight_requests() {
        let cs = candidates(&vec![EndpointMetrics::default(); 2]);
        let req = LlmRequest {
            prompt: vec![b'x'; 400],
            ..Default::default()
        };
        let held: Vec<_> = (0..5)
            .map(|_| Reservation::new(cs[0].endpoint.clone(), LoadAmount::default()))
            .collect();
        let s = PrefillCostScorer::default();
        let c = ctx(&req, vec![]);
        // 1 + 100 + 16 × 5 = 181 vs 101.
        assert_eq!(s.cost(&c, &cs[0]), 181.0);
        assert_eq!(s.cost(&c, &cs[1]), 101.0);
        drop(held);
    }

    /// 4 endpoints; endpoint 0 holds 3,600 of the request's 4,000 bytes and has `busy`
    /// requests in flight, the others 1 each.
    fn hot_holder(busy: usize) -> (Vec<Candidate>, Vec<Reservation>) {
        let cs = candidates(&vec![EndpointMetrics::default(); 4]);
        let held = cs
            .iter()
            .enumerate()
            .flat_map(|(i, c)| {
                let n = if i == 0 { busy } else { 1 };
                (0..n).map(|_| Reservation::new(c.endpoint.clone(), LoadAmount::default()))
            })
            .collect();
        (cs, held)
    }

    fn long_request() -> LlmRequest {
        LlmRequest {
            prompt: vec![b'x'; 4000],
            ..Default::default()
        }
    }

    #[test]
    fn a_holder_far_above_the_mean_is_saturated_and_the_request_seeds_a_replica() {
        let req = long_request();
        let c = ctx(&req, vec![(0, 3600)]);
        // 8 in flight against a mean of 2.75 (limit 4.75): the holder's prefix does not count.
        let (cs, held) = hot_holder(8);
        let sc = score(&PrefillCostScorer::default(), &c, &cs);
        assert!(sc[0] < sc[1], "{sc:?}");
        assert_eq!(sc[1], 1.0);
        drop(held);
        // 3 in flight (mean 1.5, limit 3.5): still sticky.
        let (cs, held) = hot_holder(3);
        let sc = score(&PrefillCostScorer::default(), &c, &cs);
        assert_eq!(sc[0], 1.0, "{sc:?}");
        drop(held);
        // Turned off, the busy holder keeps the request.
        let off = PrefillCostScorer {
            saturation_ratio: 0.0,
            ..Default::default()
        };
        let (cs, held) = hot_holder(8);
        assert_eq!(score(&off, &c, &cs)[0], 1.0);
        drop(held);
    }

    #[test]
    fn another_holder_below_the_limit_takes_the_request_of_a_saturated_one() {
        let req = long_request();
        let c = ctx(&req, vec![(0, 3600), (2, 3600)]);
        let (cs, held) = hot_holder(8);
        let sc = score(&PrefillCostScorer::default(), &c, &cs);
        assert_eq!(sc[2], 1.0, "{sc:?}");
        assert!(sc[1] < 0.2 && sc[0] < 0.2, "{sc:?}");
        drop(held);
    }

    #[test]
    fn a_passing_spike_does_not_saturate_a_lasting_one_does() {
        let req = long_request();
        let mut c = ctx(&req, vec![(0, 3600)]);
        let s = PrefillCostScorer::default();
        let t0 = c.now;
        // Balanced for the first sample …
        let (cs, held) = hot_holder(1);
        assert_eq!(score(&s, &c, &cs)[0], 1.0);
        // … then endpoint 0 jumps to 8: one second later the 10-second mean has barely moved.
        let more: Vec<_> = (0..7)
            .map(|_| Reservation::new(cs[0].endpoint.clone(), LoadAmount::default()))
            .collect();
        c.now = t0 + Duration::from_secs(1);
        assert_eq!(score(&s, &c, &cs)[0], 1.0);
        // Thirty seconds on, the imbalance has lasted: saturated.
        c.now = t0 + Duration::from_secs(30);
        assert!(score(&s, &c, &cs)[0] < 1.0);
        drop((held, more));
    }
}

#[cfg(test)]
mod learned_tests {
    use std::sync::Arc;

    use super::*;
    use crate::datastore::ttft_fit::{Observation, feed};
    use crate::datastore::{Endpoint, EndpointMetrics, EndpointSpec, LoadAmount, Reservation};
    use crate::request::LlmRequest;
    use crate::scheduling::framework::PrefixMatchInfo;

    /// Two endpoints of one pool whose fit saw a slot-bound engine: every request waiting
    /// ahead cost 50 ms, a prefilled token 25 µs (2,000 tokens per waiting request).
    fn slot_bound_pool() -> Vec<Candidate> {
        pool_that_saw(|o| 25e-6 * o.uncached as f64 + 0.05 * o.waiting as f64)
    }

    /// Two endpoints of one pool whose fit saw first-token times `ttft`.
    fn pool_that_saw(ttft: impl FnMut(&Observation) -> f64) -> Vec<Candidate> {
        let fit = Arc::new(TtftFit::default());
        feed(&fit, 1000, ttft);
        (0..2)
            .map(|i| {
                let spec = EndpointSpec::new(format!("pod-{i}"), ([10, 0, 0, i + 1], 8000).into());
                let endpoint = Endpoint::new(u32::from(i), spec).in_pool(fit.clone());
                Candidate::new(Arc::new(endpoint), Arc::new(EndpointMetrics::default()))
            })
            .collect()
    }

    #[test]
    fn a_fit_that_prices_requests_at_nothing_keeps_the_configured_price() {
        // Regression: first-token times that did not track the load (a loaded CI machine)
        // fitted every load weight to 0, and the scorer stopped seeing requests in flight.
        let fit = TtftFit::default();
        feed(&fit, 1000, |o| {
            25e-6 * o.uncached as f64 - 0.01 * o.inflight as f64
        });
        let learned = fit.weights().unwrap();
        assert!(learned.inflight_tokens < 1.0, "{learned:?}");
        let used = PrefillCostScorer::default().weights(Some(&fit));
        assert_eq!(used.inflight_tokens, DEFAULT_DECODE_TOKENS_PER_REQUEST);
    }

    /// The scores of `cs` for a request of `prompt` bytes whose first `held` bytes endpoint 0
    /// is believed to hold.
    fn scores(
        scorer: &PrefillCostScorer,
        cs: &[Candidate],
        prompt: usize,
        held: usize,
    ) -> Vec<f64> {
        let req = LlmRequest {
            prompt: vec![b'x'; prompt],
            ..Default::default()
        };
        let mut ctx = SchedulingContext::new(&req, fastrand::Rng::with_seed(1));
        ctx.prefix = Some(PrefixMatchInfo {
            hashed_bytes: prompt,
            matched: vec![(0, held)],
            ..Default::default()
        });
        let refs: Vec<_> = cs.iter().collect();
        let mut scores = vec![0.0; cs.len()];
        scorer.score(&ctx, &refs, &mut scores);
        scores
    }

    #[test]
    fn learned_weights_send_a_request_away_from_a_holder_with_requests_waiting() {
        let cs = slot_bound_pool();
        // Endpoint 0 holds 3,600 of the 4,000 bytes but has three requests waiting to start.
        let waiting: Vec<_> = (0..3)
            .map(|_| Reservation::new(cs[0].endpoint.clone(), LoadAmount::default()))
            .collect();
        let learned = scores(&PrefillCostScorer::default(), &cs, 4000, 3600);
        assert_eq!(learned[1], 1.0, "learned: {learned:?}");
        // With the fixed weights the holder wins: 3 × 16 tokens < the 900 it saves.
        let fixed = PrefillCostScorer {
            learn_weights: false,
            ..Default::default()
        };
        let fixed = scores(&fixed, &cs, 4000, 3600);
        assert_eq!(fixed[0], 1.0, "fixed: {fixed:?}");
        drop(waiting);
    }

    #[test]
    fn where_prompts_cost_nothing_a_long_prefix_does_not_outweigh_one_request_waiting() {
        // An engine without prefix caching, or with a fixed first-token delay: only the slot
        // wait (80 ms per request waiting ahead) shows in first-token times.
        let mut rng = fastrand::Rng::with_seed(2);
        let cs = pool_that_saw(|o| 0.2 + 0.08 * o.waiting as f64 + 0.02 * rng.f64());
        let waiting = Reservation::new(cs[0].endpoint.clone(), LoadAmount::default());
        // Endpoint 0 is believed to hold 39,000 of the 40,000 bytes.
        let s = scores(&PrefillCostScorer::default(), &cs, 40_000, 39_000);
        assert_eq!(s[1], 1.0, "{s:?}");
        drop(waiting);
    }
}
