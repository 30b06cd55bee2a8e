//! `least-queue-filter`: keeps the endpoints with the shortest queues.
//!
//! Algorithm: with `min`/`max` the queue lengths over the N candidates, keep those with
//! `q ≤ min + (max − min) / N` (integer division, as in the Go EPP). No parameters.

use crate::datastore::Candidate;
use crate::scheduling::framework::{Filter, SchedulingContext};

pub const TYPE: &str = "least-queue-filter";

#[derive(Debug, Default, Clone)]
pub struct LeastQueueFilter;

impl Filter for LeastQueueFilter {
    fn name(&self) -> &str {
        TYPE
    }

    fn filter<'a>(
        &self,
        _: &mut SchedulingContext<'_>,
        mut candidates: Vec<&'a Candidate>,
    ) -> Vec<&'a Candidate> {
        let n = candidates.len() as u32;
        if n == 0 {
            return candidates;
        }
        // Queues include in-flight counts other threads change: read each once, so the
        // candidate with the least queue is always kept.
        let queues: Vec<u32> = candidates.iter().map(|c| c.waiting()).collect();
        let (min, max) = queues
            .iter()
            .fold((u32::MAX, 0), |(lo, hi), &q| (lo.min(q), hi.max(q)));
        let limit = min + (max - min) / n;
        let mut queue = queues.into_iter();
        candidates.retain(|_| queue.next().is_some_and(|q| q <= limit));
        candidates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for, metrics_q, under_churn};

    /// Regression: queues were read twice (for the limit, then per candidate), and counts that
    /// grew in between could filter every candidate out.
    #[test]
    fn never_empties_while_inflight_counts_change() {
        under_churn(4, 200_000, |cs| {
            assert!(
                !LeastQueueFilter
                    .filter(&mut ctx_for(), cs.iter().collect())
                    .is_empty()
            );
        });
    }

    #[test]
    fn keeps_bottom_band() {
        let cs = candidates(&[metrics_q(0), metrics_q(3), metrics_q(4), metrics_q(12)]);
        let kept = LeastQueueFilter.filter(&mut ctx_for(), cs.iter().collect());
        // limit = 0 + 12 / 4 = 3
        let qs: Vec<u32> = kept.iter().map(|c| c.waiting()).collect();
        assert_eq!(qs, vec![0, 3]);
    }
}
