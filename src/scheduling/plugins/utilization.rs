//! `utilization-detector`: the Go EPP's default saturation detector, also usable as a filter.
//!
//! Saturation (admission): each candidate scores `max(waiting / queueDepthThreshold,
//! kvUse / kvCacheUtilThreshold)`; the pool's saturation is the mean score, and the pool is
//! saturated at ≥ 1 (sheddable requests, priority < 0, then get 429). An unreachable endpoint
//! scores 1. Where the Go EPP scores an endpoint whose metrics are older than
//! `metricsStalenessThreshold` as 1 (fully saturated), epp scores it from its own accounting
//! of what it routed there (see [`Candidate::waiting`]; metric age is judged by
//! `--metrics-staleness-threshold` for every plugin alike): old metrics are not evidence of
//! load. `metricsStalenessThreshold` is validated and otherwise unused.
//!
//! Filter (scheduling): keeps endpoints with `waiting < queueDepthThreshold·(1+headroom)` and
//! `kvUse < min(1, kvCacheUtilThreshold·(1+headroom))`; if none is left, keeps them all.
//!
//! Parameters (defaults): `queueDepthThreshold` (5, > 0), `kvCacheUtilThreshold` (0.8, in
//! (0, 1]), `metricsStalenessThreshold` ("200ms", > 0), `headroom` (0, ≥ 0).

use std::time::Duration;

use crate::datastore::{Candidate, Health};
use crate::scheduling::framework::{Filter, SchedulingContext};

pub const TYPE: &str = "utilization-detector";

/// Decides whether the pool is saturated (for shedding).
pub trait SaturationDetector: Send + Sync + std::fmt::Debug {
    /// 0 idle, 1 saturated (may exceed 1).
    fn saturation(&self, candidates: &[Candidate]) -> f64;
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UtilizationDetector {
    pub queue_threshold: u32,
    pub kv_threshold: f64,
    pub staleness: Duration,
    pub headroom: f64,
}

impl Default for UtilizationDetector {
    fn default() -> Self {
        Self {
            queue_threshold: 5,
            kv_threshold: 0.8,
            staleness: Duration::from_millis(200),
            headroom: 0.0,
        }
    }
}

impl UtilizationDetector {
    fn score(&self, c: &Candidate) -> f64 {
        if c.health == Health::Unreachable {
            return 1.0;
        }
        let q = f64::from(c.waiting()) / f64::from(self.queue_threshold.max(1));
        let kv = c.kv_usage() / self.kv_threshold;
        q.max(kv)
    }
}

impl SaturationDetector for UtilizationDetector {
    fn saturation(&self, candidates: &[Candidate]) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        candidates.iter().map(|c| self.score(c)).sum::<f64>() / candidates.len() as f64
    }
}

impl Filter for UtilizationDetector {
    fn name(&self) -> &str {
        TYPE
    }

    fn filter<'a>(
        &self,
        _: &mut SchedulingContext<'_>,
        candidates: Vec<&'a Candidate>,
    ) -> Vec<&'a Candidate> {
        let q_limit = f64::from(self.queue_threshold) * (1.0 + self.headroom);
        let kv_limit = (self.kv_threshold * (1.0 + self.headroom)).min(1.0);
        let kept: Vec<&Candidate> = candidates
            .iter()
            .copied()
            .filter(|c| {
                c.health != Health::Unreachable
                    && f64::from(c.waiting()) < q_limit
                    && c.kv_usage() < kv_limit
            })
            .collect();
        if kept.is_empty() { candidates } else { kept }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{Endpoint, EndpointMetrics, EndpointSpec};
    use std::sync::Arc;
    use std::time::Instant;

    fn cand(q: u32, kv: f64) -> Candidate {
        let ep = Arc::new(Endpoint::new(
            0,
            EndpointSpec::new("e", ([10, 0, 0, 1], 8000).into()),
        ));
        let mut c = Candidate::new(
            ep,
            Arc::new(EndpointMetrics {
                waiting_queue: Some(q),
                kv_cache_usage: Some(kv),
                running: Some(0),
                updated: Some(Instant::now()),
                ..Default::default()
            }),
        );
        c.assess(Instant::now(), Duration::from_secs(2));
        c
    }

    #[test]
    fn saturation_is_the_mean_roofline_score() {
        let d = UtilizationDetector::default();
        assert_eq!(d.saturation(&[]), 1.0);
        let s = d.saturation(&[cand(5, 0.0), cand(0, 0.4)]);
        assert!((s - 0.75).abs() < 1e-9, "{s}");
        assert!(d.saturation(&[cand(10, 0.9), cand(5, 0.8)]) >= 1.0);
    }

    #[test]
    fn filter_keeps_headroom_and_fails_open() {
        let d = UtilizationDetector {
            headroom: 0.2,
            ..Default::default()
        };
        let (a, b) = (cand(5, 0.1), cand(7, 0.1));
        let request = Default::default();
        let mut ctx = SchedulingContext::new(&request, fastrand::Rng::with_seed(1));
        let kept = d.filter(&mut ctx, vec![&a, &b]);
        assert_eq!(kept.len(), 1, "6 is the queue limit with 20% headroom");
        let kept = d.filter(&mut ctx, vec![&b]);
        assert_eq!(kept.len(), 1, "all over the limit: keep all");
    }
}
