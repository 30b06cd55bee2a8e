//! `max-score-picker`: picks the highest-scoring endpoints.
//!
//! Algorithm: shuffle the candidates, then stable-sort by score (descending) and keep the first
//! `maxNumOfEndpoints` (default 1). Shuffling first makes ties break uniformly at random.

use crate::scheduling::framework::{Picker, SchedulingContext, ScoredEndpoint};

pub const TYPE: &str = "max-score-picker";

#[derive(Debug, Clone)]
pub struct MaxScorePicker {
    pub max_endpoints: usize,
}

impl Default for MaxScorePicker {
    fn default() -> Self {
        Self { max_endpoints: 1 }
    }
}

impl Picker for MaxScorePicker {
    fn name(&self) -> &str {
        TYPE
    }

    fn pick<'a>(
        &self,
        ctx: &mut SchedulingContext<'_>,
        mut scored: Vec<ScoredEndpoint<'a>>,
    ) -> Vec<ScoredEndpoint<'a>> {
        ctx.rng.shuffle(&mut scored);
        scored.sort_by(|a, b| b.score.total_cmp(&a.score));
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
    fn highest_wins_and_ties_spread() {
        let cs = candidates(&vec![EndpointMetrics::default(); 3]);
        let picker = MaxScorePicker::default();
        let mut ctx = ctx_for();
        let scored = |s: [f64; 3]| {
            cs.iter()
                .zip(s)
                .map(|(candidate, score)| ScoredEndpoint { candidate, score })
                .collect::<Vec<_>>()
        };
        let p = picker.pick(&mut ctx, scored([0.1, 0.9, 0.5]));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].candidate.endpoint.id, cs[1].endpoint.id);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            seen.insert(
                picker.pick(&mut ctx, scored([1.0, 1.0, 0.0]))[0]
                    .candidate
                    .endpoint
                    .id,
            );
        }
        assert_eq!(seen.len(), 2, "ties broken randomly among the top two only");
        let two = MaxScorePicker { max_endpoints: 2 }.pick(&mut ctx, scored([0.1, 0.9, 0.5]));
        assert_eq!(
            two.iter().map(|s| s.score).collect::<Vec<_>>(),
            vec![0.9, 0.5]
        );
    }
}
