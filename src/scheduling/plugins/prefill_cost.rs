//! `prefill-cost-scorer`: epp's "sticky until it costs more than it saves" scorer — a request
//! goes where its first token is expected soonest.
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
//!   prefilled token, i.e. 10–25 tokens for 1–3k-token contexts.
//!
//! With no prefix plugin in the profile every endpoint has `uncached = prompt`, and the scorer
//! balances the queued prefill work and the decode load. Near-equal costs are ties for the
//! picker, which then prefers the endpoint with the fewest requests in flight.

use crate::datastore::Candidate;
use crate::scheduling::framework::{SchedulingContext, Scorer};
use crate::scheduling::plugins::inflight_load::tokens_of;

pub const TYPE: &str = "prefill-cost-scorer";
pub const DEFAULT_DECODE_TOKENS_PER_REQUEST: f64 = 16.0;

#[derive(Debug, Clone, PartialEq)]
pub struct PrefillCostScorer {
    pub decode_tokens_per_request: f64,
}

impl Default for PrefillCostScorer {
    fn default() -> Self {
        Self {
            decode_tokens_per_request: DEFAULT_DECODE_TOKENS_PER_REQUEST,
        }
    }
}

impl PrefillCostScorer {
    /// The cost of sending the request of `ctx` to `c`, in prompt tokens (≥ 1).
    pub fn cost(&self, ctx: &SchedulingContext<'_>, c: &Candidate) -> f64 {
        let load = c.endpoint.load.snapshot();
        let prompt = tokens_of(ctx.request.prompt_len());
        let cached = tokens_of(ctx.matched_bytes(c.endpoint.id)).min(prompt);
        let uncached = prompt - cached;
        1.0 + load.pending_prefill as f64
            + uncached as f64
            + self.decode_tokens_per_request * load.requests as f64
    }
}

impl Scorer for PrefillCostScorer {
    fn name(&self) -> &str {
        TYPE
    }

    fn score(&self, ctx: &SchedulingContext<'_>, candidates: &[&Candidate], scores: &mut [f64]) {
        let costs: Vec<f64> = candidates.iter().map(|c| self.cost(ctx, c)).collect();
        let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
        for (cost, s) in costs.iter().zip(scores.iter_mut()) {
            *s = min / cost;
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
}
