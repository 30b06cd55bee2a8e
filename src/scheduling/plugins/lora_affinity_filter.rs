//! `lora-affinity-filter`: keeps endpoints that have (or can load) the request's LoRA adapter.
//!
//! Algorithm: split candidates into *affinity* (adapter running or waiting there) and
//! *available* (a free adapter slot: running + waiting adapters < `max_lora`). If both groups are
//! non-empty, return *affinity* with probability `threshold` (default 0.999,
//! `LORA_AFFINITY_THRESHOLD`) and *available* otherwise, so new adapters occasionally spread;
//! else return whichever group is non-empty (possibly none).

use crate::datastore::Candidate;
use crate::scheduling::framework::{Filter, SchedulingContext};

pub const TYPE: &str = "lora-affinity-filter";
pub const DEFAULT_THRESHOLD: f64 = 0.999;

#[derive(Debug, Clone)]
pub struct LoraAffinityFilter {
    pub threshold: f64,
}

impl Default for LoraAffinityFilter {
    fn default() -> Self {
        Self {
            threshold: DEFAULT_THRESHOLD,
        }
    }
}

impl Filter for LoraAffinityFilter {
    fn name(&self) -> &str {
        TYPE
    }

    fn filter<'a>(
        &self,
        ctx: &mut SchedulingContext<'_>,
        candidates: Vec<&'a Candidate>,
    ) -> Vec<&'a Candidate> {
        let model = ctx.request.target_model.as_str();
        let (mut affinity, mut available) = (Vec::new(), Vec::new());
        for c in candidates {
            let m = &c.metrics;
            let active = m.active_loras.iter().any(|a| a == model);
            let waiting = m.waiting_loras.iter().any(|a| a == model);
            if active || waiting {
                affinity.push(c);
            } else if ((m.active_loras.len() + m.waiting_loras.len()) as u32) < m.max_lora {
                available.push(c);
            }
        }
        if !affinity.is_empty() && !available.is_empty() {
            if ctx.rng.f64() < self.threshold {
                affinity
            } else {
                available
            }
        } else if !affinity.is_empty() {
            affinity
        } else {
            available
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::framework::SchedulingContext;
    use crate::scheduling::plugins::test_support::{candidates, ctx_with_model, lora};

    #[test]
    fn prefers_affinity_then_free_slots() {
        let cs = candidates(&[
            lora(&["a"], &[], 2),
            lora(&["b"], &[], 2),
            lora(&["b"], &[], 1),
        ]);
        let req = ctx_with_model("a");
        let mut ctx = SchedulingContext::new(&req, fastrand::Rng::with_seed(3));
        let f = LoraAffinityFilter::default();
        let kept = f.filter(&mut ctx, cs.iter().collect());
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].endpoint.id, cs[0].endpoint.id);
        let always_available = LoraAffinityFilter { threshold: 0.0 };
        let kept = always_available.filter(&mut ctx, cs.iter().collect());
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].endpoint.id, cs[1].endpoint.id);
        let req = ctx_with_model("zzz");
        let mut ctx = SchedulingContext::new(&req, fastrand::Rng::with_seed(3));
        let kept = f.filter(&mut ctx, cs[2..].iter().collect());
        assert!(kept.is_empty(), "no slot and no affinity");
    }
}
