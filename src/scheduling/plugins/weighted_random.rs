//! `weighted-random-picker`: picks endpoints at random with probability proportional to score.
//!
//! Algorithm: weighted sampling without replacement (Efraimidis–Spirakis A-Res): each candidate
//! draws `key = u^(1/score)` with `u` uniform in (0, 1], and the `maxNumOfEndpoints` (default 1)
//! largest keys win. Zero-score candidates are picked only if every score is zero (then
//! uniformly).

use crate::scheduling::framework::{Picker, SchedulingContext, ScoredEndpoint};

pub const TYPE: &str = "weighted-random-picker";

#[derive(Debug, Clone)]
pub struct WeightedRandomPicker {
    pub max_endpoints: usize,
}

impl Default for WeightedRandomPicker {
    fn default() -> Self {
        Self { max_endpoints: 1 }
    }
}

impl Picker for WeightedRandomPicker {
    fn name(&self) -> &str {
        TYPE
    }

    fn pick<'a>(
        &self,
        ctx: &mut SchedulingContext<'_>,
        scored: Vec<ScoredEndpoint<'a>>,
    ) -> Vec<ScoredEndpoint<'a>> {
        let all_zero = scored.iter().all(|s| s.score <= 0.0);
        let mut keyed: Vec<(f64, ScoredEndpoint<'a>)> = scored
            .into_iter()
            .map(|s| {
                let u = 1.0 - ctx.rng.f64(); // (0, 1]
                let key = if all_zero {
                    u
                } else if s.score <= 0.0 {
                    -1.0
                } else {
                    u.powf(1.0 / s.score)
                };
                (key, s)
            })
            .collect();
        keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
        keyed
            .into_iter()
            .take(self.max_endpoints.max(1))
            .map(|(_, s)| s)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::EndpointMetrics;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for};

    #[test]
    fn frequency_follows_score() {
        let cs = candidates(&vec![EndpointMetrics::default(); 3]);
        let mut ctx = ctx_for();
        let mut counts = [0; 3];
        for _ in 0..3000 {
            let scored = cs
                .iter()
                .zip([3.0, 1.0, 0.0])
                .map(|(candidate, score)| ScoredEndpoint { candidate, score })
                .collect();
            let p = WeightedRandomPicker::default().pick(&mut ctx, scored);
            counts[p[0].candidate.endpoint.id as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!(counts[0] > 2 * counts[1], "{counts:?}");
        assert!(counts[1] > 400, "{counts:?}");
    }
}
