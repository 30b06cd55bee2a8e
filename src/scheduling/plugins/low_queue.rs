//! `low-queue-filter`: keeps endpoints whose waiting queue is at most `threshold`.
//!
//! Algorithm: keep `q ≤ threshold`. Default threshold 128 (`QUEUING_THRESHOLD_LORA`), the
//! point past which the V1 tree stops trying to preserve LoRA affinity.

use crate::datastore::Candidate;
use crate::scheduling::framework::{Filter, SchedulingContext};

pub const TYPE: &str = "low-queue-filter";
pub const DEFAULT_THRESHOLD: u32 = 128;

#[derive(Debug, Clone)]
pub struct LowQueueFilter {
    pub threshold: u32,
}

impl Default for LowQueueFilter {
    fn default() -> Self {
        Self {
            threshold: DEFAULT_THRESHOLD,
        }
    }
}

impl Filter for LowQueueFilter {
    fn name(&self) -> &str {
        TYPE
    }

    fn filter<'a>(
        &self,
        _: &mut SchedulingContext<'_>,
        mut candidates: Vec<&'a Candidate>,
    ) -> Vec<&'a Candidate> {
        candidates.retain(|c| c.waiting() <= self.threshold);
        candidates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for, metrics_q};

    #[test]
    fn keeps_short_queues() {
        let cs = candidates(&[metrics_q(1), metrics_q(128), metrics_q(129)]);
        let kept = LowQueueFilter::default().filter(&mut ctx_for(), cs.iter().collect());
        assert_eq!(kept.len(), 2);
    }
}
