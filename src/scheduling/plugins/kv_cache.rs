//! `kv-cache-utilization-scorer`: prefers endpoints with free KV-cache space.
//!
//! Algorithm: `score = 1 − kv_cache_usage` (usage in `[0, 1]`, the last value scraped; 0 for an
//! endpoint that never reported it). No parameters.

use crate::datastore::Candidate;
use crate::scheduling::framework::{SchedulingContext, Scorer};

pub const TYPE: &str = "kv-cache-utilization-scorer";

#[derive(Debug, Default)]
pub struct KvCacheScorer;

impl Scorer for KvCacheScorer {
    fn name(&self) -> &str {
        TYPE
    }

    fn score(&self, _: &SchedulingContext<'_>, candidates: &[&Candidate], scores: &mut [f64]) {
        for (c, s) in candidates.iter().zip(scores.iter_mut()) {
            *s = 1.0 - c.kv_usage();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for, metrics_kv};

    #[test]
    fn free_space_scores_higher() {
        let cs = candidates(&[metrics_kv(0.0), metrics_kv(0.25), metrics_kv(1.5)]);
        let refs: Vec<_> = cs.iter().collect();
        let mut s = vec![0.0; 3];
        KvCacheScorer.score(&ctx_for(), &refs, &mut s);
        assert_eq!(s, vec![1.0, 0.75, 0.0]);
    }
}
