//! `prefix-cache-affinity-filter`: "sticky until saturated" (llm-d's filter, same parameters).
//!
//! Algorithm, with `p(e)` the request's prefix match ratio on endpoint `e` (from the prefix
//! plugin; 0 without one):
//! 1. with probability `explorationProbability` (default 0) keep every candidate;
//! 2. the sticky set is `{e : p(e) ≥ affinityThreshold}` (default 0.80); if it is empty, keep
//!    every candidate;
//! 3. TTFT load gate (`maxTTFTPenaltyMs`, default 18,000; 0 = always stick): with each
//!    endpoint's TTFT estimated as `inFlightTokens / peakPrefillThroughput` (default 15,928
//!    tokens/s; in-flight tokens from epp's own accounting), if the best sticky endpoint's TTFT
//!    exceeds the best non-sticky one's by more than the penalty, keep every candidate;
//! 4. otherwise keep the sticky set.
//!
//! `ttftSource` accepts `prefillThroughput` (the default, above); `latencyPredictor` needs a
//! latency predictor epp does not have and is a configuration error. The producer-name
//! parameters are accepted: epp has one prefix match and one load accounting per profile.

use crate::datastore::Candidate;
use crate::scheduling::framework::{Filter, SchedulingContext};

pub const TYPE: &str = "prefix-cache-affinity-filter";
pub const DEFAULT_AFFINITY_THRESHOLD: f64 = 0.80;
pub const DEFAULT_MAX_TTFT_PENALTY_MS: f64 = 18_000.0;
/// llm-d's calibration: one unloaded 8,192-token chunk of Qwen 32B on 2×H100 (TP=2).
pub const DEFAULT_PEAK_PREFILL_THROUGHPUT: f64 = 15_928.0;

#[derive(Debug, Clone, PartialEq)]
pub struct PrefixAffinityFilter {
    pub affinity_threshold: f64,
    pub exploration_probability: f64,
    pub max_ttft_penalty_ms: f64,
    pub peak_prefill_throughput: f64,
}

impl Default for PrefixAffinityFilter {
    fn default() -> Self {
        Self {
            affinity_threshold: DEFAULT_AFFINITY_THRESHOLD,
            exploration_probability: 0.0,
            max_ttft_penalty_ms: DEFAULT_MAX_TTFT_PENALTY_MS,
            peak_prefill_throughput: DEFAULT_PEAK_PREFILL_THROUGHPUT,
        }
    }
}

impl PrefixAffinityFilter {
    /// Estimated TTFT of `c` in milliseconds from its in-flight tokens.
    fn ttft_ms(&self, c: &Candidate) -> f64 {
        c.endpoint.load.snapshot().tokens() as f64 / self.peak_prefill_throughput * 1000.0
    }

    fn best_ttft_ms(&self, cs: &[&Candidate]) -> f64 {
        cs.iter()
            .map(|c| self.ttft_ms(c))
            .fold(f64::INFINITY, f64::min)
    }
}

impl Filter for PrefixAffinityFilter {
    fn name(&self) -> &str {
        TYPE
    }

    fn filter<'a>(
        &self,
        ctx: &mut SchedulingContext<'_>,
        candidates: Vec<&'a Candidate>,
    ) -> Vec<&'a Candidate> {
        if candidates.len() <= 1 || self.affinity_threshold <= 0.0 {
            return candidates;
        }
        if self.exploration_probability > 0.0 && ctx.rng.f64() < self.exploration_probability {
            return candidates;
        }
        let ratio = |c: &Candidate| ctx.prefix.as_ref().map_or(0.0, |p| p.ratio(c.endpoint.id));
        let (sticky, rest): (Vec<&'a Candidate>, Vec<&'a Candidate>) = candidates
            .iter()
            .partition(|c| ratio(c) >= self.affinity_threshold);
        if sticky.is_empty() {
            return candidates;
        }
        if self.max_ttft_penalty_ms > 0.0
            && !rest.is_empty()
            && self.best_ttft_ms(&sticky) - self.best_ttft_ms(&rest) > self.max_ttft_penalty_ms
        {
            return candidates;
        }
        sticky
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{EndpointMetrics, LoadAmount, Reservation};
    use crate::scheduling::framework::PrefixMatchInfo;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for};

    fn ctx_with(matched: Vec<(u32, usize)>) -> SchedulingContext<'static> {
        let mut ctx = ctx_for();
        ctx.prefix = Some(PrefixMatchInfo {
            hashed_bytes: 100,
            matched,
            ..Default::default()
        });
        ctx
    }

    #[test]
    fn keeps_sticky_endpoints_until_the_penalty_is_exceeded() {
        let cs = candidates(&vec![EndpointMetrics::default(); 3]);
        let f = PrefixAffinityFilter {
            max_ttft_penalty_ms: 1000.0,
            peak_prefill_throughput: 1000.0,
            ..Default::default()
        };
        let mut ctx = ctx_with(vec![(0, 90), (1, 50)]);
        let kept = f.filter(&mut ctx, cs.iter().collect());
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].endpoint.id, 0);
        // 1,500 in-flight tokens at 1,000 tokens/s: 1.5 s worse than idle endpoints ⇒ all kept.
        let load = LoadAmount {
            prompt_tokens: 1500,
            uncached_tokens: 1500,
            output_tokens: 0,
        };
        let r = Reservation::new(cs[0].endpoint.clone(), load);
        assert_eq!(f.filter(&mut ctx, cs.iter().collect()).len(), 3);
        drop(r);
        assert_eq!(f.filter(&mut ctx, cs.iter().collect()).len(), 1);
    }

    #[test]
    fn no_sticky_endpoint_or_no_prefix_keeps_all() {
        let cs = candidates(&vec![EndpointMetrics::default(); 3]);
        let f = PrefixAffinityFilter::default();
        assert_eq!(
            f.filter(&mut ctx_with(vec![(0, 10)]), cs.iter().collect())
                .len(),
            3
        );
        assert_eq!(f.filter(&mut ctx_for(), cs.iter().collect()).len(), 3);
        let always = PrefixAffinityFilter {
            exploration_probability: 1.0,
            ..Default::default()
        };
        assert_eq!(
            always
                .filter(&mut ctx_with(vec![(1, 100)]), cs.iter().collect())
                .len(),
            3
        );
    }
}
