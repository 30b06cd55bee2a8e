//! `has-capacity-filter`: keeps endpoints that are not saturated (the V1 sheddable branch).
//!
//! Algorithm: keep `queue ≤ queueThreshold` and `kv ≤ kvCacheThreshold`. Defaults
//! `QUEUE_THRESHOLD_CRITICAL` = 5 and `KV_CACHE_THRESHOLD` = 0.8. The same thresholds decide
//! saturation for admission control of sheddable requests.

use crate::datastore::Candidate;
use crate::scheduling::framework::{Filter, SchedulingContext};
use crate::scheduling::plugins::utilization::SaturationDetector;

pub const TYPE: &str = "has-capacity-filter";
pub const DEFAULT_QUEUE_THRESHOLD: u32 = 5;
pub const DEFAULT_KV_CACHE_THRESHOLD: f64 = 0.8;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HasCapacityFilter {
    pub queue_threshold: u32,
    pub kv_cache_threshold: f64,
}

impl Default for HasCapacityFilter {
    fn default() -> Self {
        Self {
            queue_threshold: DEFAULT_QUEUE_THRESHOLD,
            kv_cache_threshold: DEFAULT_KV_CACHE_THRESHOLD,
        }
    }
}

impl HasCapacityFilter {
    /// Uses the candidate's effective queue and KV use (see [`Candidate::waiting`]).
    pub fn has_capacity(&self, c: &Candidate) -> bool {
        c.waiting() <= self.queue_threshold && c.kv_usage() <= self.kv_cache_threshold
    }
}

/// The legacy rule: saturated when no candidate has capacity (saturation is the fraction
/// without).
impl SaturationDetector for HasCapacityFilter {
    fn saturation(&self, candidates: &[Candidate]) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let full = candidates.iter().filter(|c| !self.has_capacity(c)).count();
        full as f64 / candidates.len() as f64
    }
}

impl Filter for HasCapacityFilter {
    fn name(&self) -> &str {
        TYPE
    }

    fn filter<'a>(
        &self,
        _: &mut SchedulingContext<'_>,
        mut candidates: Vec<&'a Candidate>,
    ) -> Vec<&'a Candidate> {
        candidates.retain(|c| self.has_capacity(c));
        candidates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for, metrics_kv, metrics_q};

    #[test]
    fn drops_saturated() {
        let cs = candidates(&[
            metrics_q(5),
            metrics_q(6),
            metrics_kv(0.81),
            metrics_kv(0.8),
        ]);
        let kept = HasCapacityFilter::default().filter(&mut ctx_for(), cs.iter().collect());
        assert_eq!(kept.len(), 2);
    }
}
