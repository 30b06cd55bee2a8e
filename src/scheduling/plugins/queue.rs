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
        let queues = candidates.iter().map(|c| c.waiting());
        let (min, max) = queues.fold((u32::MAX, 0), |(lo, hi), q| (lo.min(q), hi.max(q)));
        for (c, s) in candidates.iter().zip(scores.iter_mut()) {
            *s = if max == min {
                1.0
            } else {
                f64::from(max - c.waiting()) / f64::from(max - min)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for, metrics_q};

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
