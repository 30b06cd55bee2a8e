//! `active-request-scorer`: prefers endpoints with fewer in-flight requests (llm-d's scorer).
//!
//! Algorithm, with `n(e)` the requests epp has in flight on `e` and `max` the largest over the
//! candidates: `n ≤ idleThreshold` (default 0) scores 1; a busier endpoint scores
//! `(max − n) / max × maxBusyScore` (default 1.0, in `[0, 1]`), so the busiest scores 0.
//! `requestTimeout` is accepted and ignored (epp releases requests when their stream ends).

use crate::datastore::Candidate;
use crate::scheduling::framework::{SchedulingContext, Scorer};

pub const TYPE: &str = "active-request-scorer";

#[derive(Debug, Clone, PartialEq)]
pub struct ActiveRequestScorer {
    pub idle_threshold: u64,
    pub max_busy_score: f64,
}

impl Default for ActiveRequestScorer {
    fn default() -> Self {
        Self {
            idle_threshold: 0,
            max_busy_score: 1.0,
        }
    }
}

impl Scorer for ActiveRequestScorer {
    fn name(&self) -> &str {
        TYPE
    }

    fn score(&self, _: &SchedulingContext<'_>, candidates: &[&Candidate], scores: &mut [f64]) {
        let counts: Vec<u64> = candidates
            .iter()
            .map(|c| c.endpoint.load.requests())
            .collect();
        let max = counts.iter().copied().max().unwrap_or(0);
        for (n, s) in counts.iter().zip(scores.iter_mut()) {
            *s = if *n <= self.idle_threshold {
                1.0
            } else {
                (max - n) as f64 / max as f64 * self.max_busy_score
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{EndpointMetrics, LoadAmount, Reservation};
    use crate::scheduling::plugins::test_support::{candidates, ctx_for};

    #[test]
    fn idle_scores_one_and_busiest_zero() {
        let cs = candidates(&vec![EndpointMetrics::default(); 3]);
        let mut held = Vec::new();
        for (i, n) in [(1, 1), (2, 4)] {
            for _ in 0..n {
                held.push(Reservation::new(
                    cs[i].endpoint.clone(),
                    LoadAmount::default(),
                ));
            }
        }
        let refs: Vec<_> = cs.iter().collect();
        let mut s = vec![0.0; 3];
        ActiveRequestScorer::default().score(&ctx_for(), &refs, &mut s);
        assert_eq!(s, vec![1.0, 0.75, 0.0]);
        ActiveRequestScorer {
            idle_threshold: 1,
            max_busy_score: 0.5,
        }
        .score(&ctx_for(), &refs, &mut s);
        assert_eq!(s, vec![1.0, 1.0, 0.0]);
    }
}
