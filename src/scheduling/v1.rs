//! The legacy (V1) scheduler: a decision tree of filters and a random pick, built from the same
//! filter plugins as V2.
//!
//! ```text
//! critical (priority ≥ 0) → low-latency tree:
//!   low-queue(q ≤ QUEUING_THRESHOLD_LORA=128)
//!     ok   → lora-affinity(LORA_AFFINITY_THRESHOLD=0.999) → least-queue → least-kv-cache
//!     fail → least-queue → lora-affinity → least-kv-cache
//! sheddable (priority < 0):
//!   has-capacity(q ≤ QUEUE_THRESHOLD_CRITICAL=5, kv ≤ KV_CACHE_THRESHOLD=0.8)
//!     ok   → low-latency tree
//!     fail → nothing (the request is shed: 429)
//! then: random pick among the survivors
//! ```

use std::sync::Arc;

use crate::datastore::Candidate;
use crate::scheduling::framework::{Filter, Profile, SchedulingContext};
use crate::scheduling::plugins::decision_tree::DecisionTreeFilter;
use crate::scheduling::plugins::has_capacity::HasCapacityFilter;
use crate::scheduling::plugins::least_kv_cache::LeastKvCacheFilter;
use crate::scheduling::plugins::least_queue::LeastQueueFilter;
use crate::scheduling::plugins::lora_affinity_filter::LoraAffinityFilter;
use crate::scheduling::plugins::low_queue::LowQueueFilter;
use crate::scheduling::plugins::random::RandomPicker;

/// Thresholds of the V1 tree (env vars of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct V1Thresholds {
    pub kv_cache_threshold: f64,
    pub queue_threshold_critical: u32,
    pub queueing_threshold_lora: u32,
    pub lora_affinity_threshold: f64,
}

impl Default for V1Thresholds {
    fn default() -> Self {
        Self {
            kv_cache_threshold: 0.8,
            queue_threshold_critical: 5,
            queueing_threshold_lora: 128,
            lora_affinity_threshold: 0.999,
        }
    }
}

/// Chooses the critical or the sheddable tree by request priority.
#[derive(Debug)]
pub struct V1Filter {
    critical: DecisionTreeFilter,
    sheddable: DecisionTreeFilter,
}

impl V1Filter {
    pub fn new(t: V1Thresholds) -> Self {
        let lora: Arc<dyn Filter> = Arc::new(LoraAffinityFilter {
            threshold: t.lora_affinity_threshold,
        });
        let least_kv: Arc<dyn Filter> = Arc::new(LeastKvCacheFilter);
        let least_queue: Arc<dyn Filter> = Arc::new(LeastQueueFilter);
        let on_low_queue = DecisionTreeFilter::then(
            lora.clone(),
            Arc::new(DecisionTreeFilter::then(
                least_queue.clone(),
                least_kv.clone(),
            )),
        );
        let on_high_queue = DecisionTreeFilter::then(
            least_queue,
            Arc::new(DecisionTreeFilter::then(lora, least_kv)),
        );
        let critical = DecisionTreeFilter {
            name: "v1-low-latency".into(),
            next_on_success: Some(Arc::new(on_low_queue)),
            next_on_failure: Some(Arc::new(on_high_queue)),
            ..DecisionTreeFilter::leaf(Arc::new(LowQueueFilter {
                threshold: t.queueing_threshold_lora,
            }))
        };
        let sheddable = DecisionTreeFilter {
            name: "v1-sheddable".into(),
            next_on_success: Some(Arc::new(critical.clone())),
            ..DecisionTreeFilter::leaf(Arc::new(HasCapacityFilter {
                queue_threshold: t.queue_threshold_critical,
                kv_cache_threshold: t.kv_cache_threshold,
            }))
        };
        Self {
            critical,
            sheddable,
        }
    }
}

impl Filter for V1Filter {
    fn name(&self) -> &str {
        "v1-decision-tree"
    }

    fn filter<'a>(
        &self,
        ctx: &mut SchedulingContext<'_>,
        candidates: Vec<&'a Candidate>,
    ) -> Vec<&'a Candidate> {
        if ctx.request.priority < 0 {
            self.sheddable.filter(ctx, candidates)
        } else {
            self.critical.filter(ctx, candidates)
        }
    }
}

/// The V1 profile: the tree, then a random pick.
pub fn profile(t: V1Thresholds) -> Profile {
    let mut p = Profile::new("v1", Arc::new(RandomPicker::default()));
    p.filters.push(Arc::new(V1Filter::new(t)));
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::LlmRequest;
    use crate::scheduling::framework::ScheduleError;
    use crate::scheduling::plugins::test_support::{candidates, metrics_q};

    #[test]
    fn critical_goes_to_shortest_queues() {
        let cs = candidates(&[metrics_q(0), metrics_q(50), metrics_q(60)]);
        let p = profile(V1Thresholds::default());
        let req = LlmRequest::default();
        for seed in 0..20 {
            let mut ctx = SchedulingContext::new(&req, fastrand::Rng::with_seed(seed));
            let r = p.run(&mut ctx, &cs, None).unwrap();
            assert_eq!(r.primary().endpoint.id, cs[0].endpoint.id);
        }
    }

    #[test]
    fn sheddable_is_dropped_when_saturated() {
        let cs = candidates(&[metrics_q(6), metrics_q(7)]);
        let p = profile(V1Thresholds::default());
        let req = LlmRequest {
            priority: -1,
            ..Default::default()
        };
        let mut ctx = SchedulingContext::new(&req, fastrand::Rng::with_seed(1));
        assert!(matches!(
            p.run(&mut ctx, &cs, None),
            Err(ScheduleError::AllFiltered { .. })
        ));
        let critical = LlmRequest::default();
        let mut ctx = SchedulingContext::new(&critical, fastrand::Rng::with_seed(1));
        assert!(p.run(&mut ctx, &cs, None).is_ok());
    }
}
