//! `token-load-scorer`: prefers endpoints with fewer in-flight tokens (llm-d's scorer).
//!
//! Algorithm: `score = 1 − min(1, tokens / queueThresholdTokens)`, with `tokens` the endpoint's
//! in-flight tokens from epp's own accounting (uncached prompt tokens still prefilling, plus
//! estimated output tokens when `inflight-load-producer` adds them). `queueThresholdTokens`
//! defaults to 4,194,304 (128 requests of 32k tokens); non-positive values are rejected.

use crate::datastore::Candidate;
use crate::scheduling::framework::{SchedulingContext, Scorer};

pub const TYPE: &str = "token-load-scorer";
pub const DEFAULT_QUEUE_THRESHOLD_TOKENS: u64 = 4_194_304;

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLoadScorer {
    pub queue_threshold_tokens: u64,
}

impl Default for TokenLoadScorer {
    fn default() -> Self {
        Self {
            queue_threshold_tokens: DEFAULT_QUEUE_THRESHOLD_TOKENS,
        }
    }
}

impl Scorer for TokenLoadScorer {
    fn name(&self) -> &str {
        TYPE
    }

    fn score(&self, _: &SchedulingContext<'_>, candidates: &[&Candidate], scores: &mut [f64]) {
        let threshold = self.queue_threshold_tokens.max(1) as f64;
        for (c, s) in candidates.iter().zip(scores.iter_mut()) {
            let tokens = c.endpoint.load.snapshot().tokens() as f64;
            *s = 1.0 - (tokens / threshold).min(1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{EndpointMetrics, LoadAmount, Reservation};
    use crate::scheduling::plugins::test_support::{candidates, ctx_for};

    #[test]
    fn linear_in_inflight_tokens_up_to_the_threshold() {
        let cs = candidates(&vec![EndpointMetrics::default(); 3]);
        let load = |n| LoadAmount {
            prompt_tokens: n,
            uncached_tokens: n,
            output_tokens: 0,
        };
        let _a = Reservation::new(cs[1].endpoint.clone(), load(250));
        let _b = Reservation::new(cs[2].endpoint.clone(), load(5000));
        let refs: Vec<_> = cs.iter().collect();
        let mut s = vec![0.0; 3];
        TokenLoadScorer {
            queue_threshold_tokens: 1000,
        }
        .score(&ctx_for(), &refs, &mut s);
        assert_eq!(s, vec![1.0, 0.75, 0.0]);
    }
}
