//! `least-kv-cache-filter`: keeps the endpoints with the most free KV cache.
//!
//! Algorithm: with `min`/`max` the KV utilisations over the N candidates, keep those with
//! `kv ≤ min + (max − min) / N`. No parameters.

use crate::datastore::Candidate;
use crate::scheduling::framework::{Filter, SchedulingContext};

pub const TYPE: &str = "least-kv-cache-filter";

#[derive(Debug, Default, Clone)]
pub struct LeastKvCacheFilter;

impl Filter for LeastKvCacheFilter {
    fn name(&self) -> &str {
        TYPE
    }

    fn filter<'a>(
        &self,
        _: &mut SchedulingContext<'_>,
        mut candidates: Vec<&'a Candidate>,
    ) -> Vec<&'a Candidate> {
        if candidates.is_empty() {
            return candidates;
        }
        let n = candidates.len() as f64;
        let kv = candidates.iter().map(|c| c.kv_usage());
        let (min, max) = kv.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), k| {
            (lo.min(k), hi.max(k))
        });
        let limit = min + (max - min) / n;
        candidates.retain(|c| c.kv_usage() <= limit);
        candidates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for, metrics_kv};

    #[test]
    fn keeps_bottom_band() {
        let cs = candidates(&[metrics_kv(0.1), metrics_kv(0.2), metrics_kv(0.9)]);
        let kept = LeastKvCacheFilter.filter(&mut ctx_for(), cs.iter().collect());
        // limit = 0.1 + 0.8 / 3 ≈ 0.367
        assert_eq!(kept.len(), 2);
    }
}
