//! `max-score-picker`: picks the highest-scoring endpoints.
//!
//! Algorithm: scores within [`TIE_TOLERANCE`] of the best (1% of the most a candidate can
//! score, i.e. of the weight sum) are ties — differences that small are noise in metrics that
//! are tens of milliseconds old, and treating them as real sends every request of a burst to
//! the same endpoint. Ties break by the healthier metrics ([`crate::datastore::Health`]), then
//! by the fewest requests epp has in flight there (which changes with every decision, so a cold
//! burst spreads), then uniformly at random. `maxNumOfEndpoints` (default 1) endpoints are
//! picked one after the other that way.

use crate::scheduling::framework::{Picker, SchedulingContext, ScoredEndpoint};

pub const TYPE: &str = "max-score-picker";
/// Scores this close to the best, as a fraction of the score scale, are ties.
pub const TIE_TOLERANCE: f64 = 0.01;

#[derive(Debug, Clone)]
pub struct MaxScorePicker {
    pub max_endpoints: usize,
}

impl Default for MaxScorePicker {
    fn default() -> Self {
        Self { max_endpoints: 1 }
    }
}

/// Index of the endpoint to pick from `scored` (not empty).
fn pick_one(ctx: &mut SchedulingContext<'_>, scored: &[ScoredEndpoint<'_>]) -> usize {
    let best = scored
        .iter()
        .map(|s| s.score)
        .fold(f64::NEG_INFINITY, f64::max);
    let floor = best - TIE_TOLERANCE * ctx.score_scale;
    // In-flight counts change under other threads' decisions: each is read once, so the
    // comparison is between one consistent set of keys.
    let mut chosen = None;
    let mut ties = 0u32;
    for (i, s) in scored.iter().enumerate() {
        if s.score < floor {
            continue;
        }
        let key = (s.candidate.health, s.candidate.inflight_requests());
        match chosen {
            Some((_, best)) if key > best => {}
            Some((_, best)) if key == best => {
                ties += 1;
                if ctx.rng.u32(..ties) == 0 {
                    chosen = Some((i, key));
                }
            }
            _ => {
                chosen = Some((i, key));
                ties = 1;
            }
        }
    }
    chosen.map_or(usize::MAX, |(i, _)| i)
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
        let mut out = Vec::with_capacity(self.max_endpoints.max(1));
        while out.len() < self.max_endpoints.max(1) && !scored.is_empty() {
            let i = pick_one(ctx, &scored);
            out.push(scored.swap_remove(i));
        }
        out
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

    #[test]
    fn near_ties_go_to_the_endpoint_with_fewest_inflight() {
        use crate::datastore::{LoadAmount, Reservation};
        let cs = candidates(&vec![EndpointMetrics::default(); 3]);
        let picker = MaxScorePicker::default();
        let mut ctx = ctx_for();
        let _busy = Reservation::new(cs[0].endpoint.clone(), LoadAmount::default());
        let scored = cs
            .iter()
            .zip([0.995, 1.0, 0.5])
            .map(|(candidate, score)| ScoredEndpoint { candidate, score })
            .collect::<Vec<_>>();
        // 0.995 and 1.0 tie (within 1% of a scale of 1); endpoint 0 has a request in flight.
        for _ in 0..20 {
            let p = picker.pick(&mut ctx, scored.clone());
            assert_eq!(p[0].candidate.endpoint.id, cs[1].endpoint.id);
        }
    }
}
