//! `lora-affinity-scorer`: prefers endpoints that already serve the request's LoRA adapter.
//!
//! Algorithm, for the request's target model `m`: 1.0 if `m` is among the endpoint's running
//! adapters; 0.8 if the endpoint has a free adapter slot (running adapters < `max_lora`); 0.6 if
//! `m` is among its waiting adapters; 0 otherwise. No parameters.

use crate::datastore::{Candidate, EndpointMetrics};
use crate::scheduling::framework::{SchedulingContext, Scorer};

pub const TYPE: &str = "lora-affinity-scorer";

#[derive(Debug, Default)]
pub struct LoraAffinityScorer;

/// The affinity of one endpoint for `model` (shared with the LoRA filter).
pub fn affinity(m: &EndpointMetrics, model: &str) -> f64 {
    if m.active_loras.iter().any(|a| a == model) {
        1.0
    } else if (m.active_loras.len() as u32) < m.max_lora {
        0.8
    } else if m.waiting_loras.iter().any(|a| a == model) {
        0.6
    } else {
        0.0
    }
}

impl Scorer for LoraAffinityScorer {
    fn name(&self) -> &str {
        TYPE
    }

    fn score(&self, ctx: &SchedulingContext<'_>, candidates: &[&Candidate], scores: &mut [f64]) {
        let model = &ctx.request.target_model;
        for (c, s) in candidates.iter().zip(scores.iter_mut()) {
            *s = affinity(&c.metrics, model);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_support::{candidates, ctx_with_model, lora};

    #[test]
    fn active_beats_free_slot_beats_waiting() {
        let cs = candidates(&[
            lora(&["a"], &[], 1),
            lora(&["b"], &[], 2),
            lora(&["b"], &["a"], 1),
            lora(&["b"], &[], 1),
        ]);
        let refs: Vec<_> = cs.iter().collect();
        let mut s = vec![0.0; 4];
        let req = ctx_with_model("a");
        LoraAffinityScorer.score(
            &crate::scheduling::framework::SchedulingContext::new(
                &req,
                fastrand::Rng::with_seed(1),
            ),
            &refs,
            &mut s,
        );
        assert_eq!(s, vec![1.0, 0.8, 0.6, 0.0]);
    }
}
