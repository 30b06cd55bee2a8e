//! `running-requests-size-scorer`: prefers endpoints running fewer requests (llm-d's scorer).
//!
//! Algorithm: with `r` each endpoint's running requests (scraped when fresh; epp's own
//! in-flight count otherwise, see [`Candidate::running`]) and `min`/`max` over the candidates,
//! `score = (max − r) / (max − min)`; every candidate scores 1 when all are equal. No
//! parameters.

use crate::datastore::Candidate;
use crate::scheduling::framework::{SchedulingContext, Scorer};

pub const TYPE: &str = "running-requests-size-scorer";

#[derive(Debug, Default, Clone)]
pub struct RunningRequestsScorer;

impl Scorer for RunningRequestsScorer {
    fn name(&self) -> &str {
        TYPE
    }

    fn score(&self, _: &SchedulingContext<'_>, candidates: &[&Candidate], scores: &mut [f64]) {
        let running: Vec<u32> = candidates.iter().map(|c| c.running()).collect();
        let min = running.iter().copied().min().unwrap_or(0);
        let max = running.iter().copied().max().unwrap_or(0);
        for (r, s) in running.iter().zip(scores.iter_mut()) {
            *s = if max == min {
                1.0
            } else {
                f64::from(max - r) / f64::from(max - min)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::EndpointMetrics;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for};

    fn running(r: u32) -> EndpointMetrics {
        EndpointMetrics {
            running: Some(r),
            updated: Some(std::time::Instant::now()),
            ..Default::default()
        }
    }

    #[test]
    fn normalised_between_fewest_and_most_running() {
        let cs = candidates(&[running(2), running(6), running(10)]);
        let refs: Vec<_> = cs.iter().collect();
        let mut s = vec![0.0; 3];
        RunningRequestsScorer.score(&ctx_for(), &refs, &mut s);
        assert_eq!(s, vec![1.0, 0.5, 0.0]);
    }
}
