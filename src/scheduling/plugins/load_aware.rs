//! `load-aware-scorer`: absolute waiting-queue normalization (llm-d's scorer).
//!
//! Algorithm, with `q` the endpoint's waiting queue (see [`Candidate::waiting`]): `q = 0`
//! scores 0.5; `0 < q < threshold` scores `0.5 × (1 − q / threshold)`; `q ≥ threshold` scores
//! 0. `threshold` defaults to 128; non-positive values are rejected. The 0.5 ceiling is
//! llm-d's: an empty queue shows availability, not spare capacity.

use crate::datastore::Candidate;
use crate::scheduling::framework::{SchedulingContext, Scorer};

pub const TYPE: &str = "load-aware-scorer";
pub const DEFAULT_THRESHOLD: u32 = 128;

#[derive(Debug, Clone, PartialEq)]
pub struct LoadAwareScorer {
    pub threshold: u32,
}

impl Default for LoadAwareScorer {
    fn default() -> Self {
        Self {
            threshold: DEFAULT_THRESHOLD,
        }
    }
}

impl Scorer for LoadAwareScorer {
    fn name(&self) -> &str {
        TYPE
    }

    fn score(&self, _: &SchedulingContext<'_>, candidates: &[&Candidate], scores: &mut [f64]) {
        let threshold = f64::from(self.threshold.max(1));
        for (c, s) in candidates.iter().zip(scores.iter_mut()) {
            let q = f64::from(c.waiting());
            *s = 0.5 * (1.0 - (q / threshold).min(1.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for, metrics_q};

    #[test]
    fn absolute_queue_normalisation() {
        let cs = candidates(&[metrics_q(0), metrics_q(64), metrics_q(200)]);
        let refs: Vec<_> = cs.iter().collect();
        let mut s = vec![0.0; 3];
        LoadAwareScorer::default().score(&ctx_for(), &refs, &mut s);
        assert_eq!(s, vec![0.5, 0.25, 0.0]);
    }
}
