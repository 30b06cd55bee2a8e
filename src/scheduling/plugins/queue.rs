//! `queue-scorer`: prefers endpoints with short waiting queues.
//!
//! Algorithm: with `q` the endpoint's waiting-queue length (the scraped queue plus the requests
//! epp routed there since that scrape; epp's own in-flight count when the metrics are stale or
//! lack the family, see [`Candidate::waiting`]) and `minQ`/`maxQ` taken over the candidates, `score = (maxQ − q) / (maxQ − minQ)`; every candidate scores 1 when all queues
//! are equal. No parameters.

use crate::datastore::Candidate;
use crate::scheduling::framework::{SchedulingContext, Scorer};

pub const TYPE: &str = "queue-scorer";

#[derive(Debug, Default)]
pub struct QueueScorer;

impl Scorer for QueueScorer {
    fn name(&self) -> &str {
        TYPE
    }

    fn score(&self, _: &SchedulingContext<'_>, candidates: &[&Candidate], scores: &mut [f64]) {
        // Queues include in-flight counts other threads change: read each once (into
        // `scores`), so min, max and every score come from the same values.
        for (c, s) in candidates.iter().zip(scores.iter_mut()) {
            *s = f64::from(c.waiting());
        }
        let (min, max) = scores.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &q| {
            (lo.min(q), hi.max(q))
        });
        for s in scores.iter_mut() {
            *s = if max == min {
                1.0
            } else {
                (max - *s) / (max - min)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for, metrics_q, under_churn};

    /// Regression: queues were read twice (for max, then per score), and a count that grew
    /// in between underflowed `max - q` (a panic in debug builds, a huge score in release).
    #[test]
    fn scores_stay_in_range_while_inflight_counts_change() {
        under_churn(4, 200_000, |cs| {
            let refs: Vec<_> = cs.iter().collect();
            let mut s = vec![0.0; cs.len()];
            QueueScorer.score(&ctx_for(), &refs, &mut s);
            assert!(s.iter().all(|v| (0.0..=1.0).contains(v)), "{s:?}");
            assert!(s.contains(&1.0), "{s:?}");
        });
    }

    #[test]
    fn normalises_between_min_and_max() {
        let cs = candidates(&[metrics_q(0), metrics_q(5), metrics_q(10)]);
        let refs: Vec<_> = cs.iter().collect();
        let mut s = vec![0.0; 3];
        QueueScorer.score(&ctx_for(), &refs, &mut s);
        assert_eq!(s, vec![1.0, 0.5, 0.0]);
    }

    #[test]
    fn equal_queues_all_score_one() {
        let cs = candidates(&[metrics_q(3), metrics_q(3)]);
        let refs: Vec<_> = cs.iter().collect();
        let mut s = vec![0.0; 2];
        QueueScorer.score(&ctx_for(), &refs, &mut s);
        assert_eq!(s, vec![1.0, 1.0]);
    }
}
