//! `max-score-picker`: picks the highest-scoring endpoints.
//!
//! Algorithm: keep the `maxNumOfEndpoints` (default 1) highest scores; ties break uniformly at
//! random. For one endpoint this is a single pass (reservoir sampling among the tied best);
//! for more, the candidates are shuffled, then stable-sorted by score.

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
        if self.max_endpoints <= 1 {
            let mut best: Option<ScoredEndpoint<'a>> = None;
            let mut ties = 0u32;
            for s in scored {
                match &best {
                    Some(b) if s.score < b.score => {}
                    Some(b) if s.score == b.score => {
                        ties += 1;
                        if ctx.rng.u32(..ties) == 0 {
                            best = Some(s);
                        }
                    }
                    _ => {
                        best = Some(s);
                        ties = 1;
                    }
                }
            }
            return best.into_iter().collect();
        }
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
