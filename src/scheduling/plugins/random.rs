//! `random-picker`: picks endpoints uniformly at random, ignoring scores.
//!
//! Algorithm: shuffle and keep the first `maxNumOfEndpoints` (default 1). The V1 scheduler ends
//! with this picker.

use crate::scheduling::framework::{Picker, SchedulingContext, ScoredEndpoint};

pub const TYPE: &str = "random-picker";

#[derive(Debug, Clone)]
pub struct RandomPicker {
    pub max_endpoints: usize,
}

impl Default for RandomPicker {
    fn default() -> Self {
        Self { max_endpoints: 1 }
    }
}

impl Picker for RandomPicker {
    fn name(&self) -> &str {
        TYPE
    }

    fn pick<'a>(
        &self,
        ctx: &mut SchedulingContext<'_>,
        mut scored: Vec<ScoredEndpoint<'a>>,
    ) -> Vec<ScoredEndpoint<'a>> {
        ctx.rng.shuffle(&mut scored);
        scored.truncate(self.max_endpoints.max(1));
        scored
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::EndpointMetrics;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for};

    #[test]
    fn every_candidate_gets_picked_sometimes() {
        let cs = candidates(&vec![EndpointMetrics::default(); 3]);
        let mut ctx = ctx_for();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let scored = cs
                .iter()
                .map(|candidate| ScoredEndpoint {
                    candidate,
                    score: 0.0,
                })
                .collect();
            seen.insert(
                RandomPicker::default().pick(&mut ctx, scored)[0]
                    .candidate
                    .endpoint
                    .id,
            );
        }
        assert_eq!(seen.len(), 3);
    }
}
