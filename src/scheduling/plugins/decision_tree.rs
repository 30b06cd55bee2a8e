//! `decision-tree-filter`: composes filters into a tree (how the V1 scheduler is built).
//!
//! Algorithm: run `current`. If it kept some candidates, continue with `nextOnSuccessOrFailure`
//! (else `nextOnSuccess`) on what it kept; if it kept none, continue with
//! `nextOnSuccessOrFailure` (else `nextOnFailure`) on the *original* candidates. With no next
//! node, return what `current` returned.

use std::sync::Arc;

use crate::datastore::Candidate;
use crate::scheduling::framework::{Filter, SchedulingContext};

pub const TYPE: &str = "decision-tree-filter";

#[derive(Clone)]
pub struct DecisionTreeFilter {
    pub name: String,
    pub current: Arc<dyn Filter>,
    pub next_on_success: Option<Arc<dyn Filter>>,
    pub next_on_failure: Option<Arc<dyn Filter>>,
    pub next_on_success_or_failure: Option<Arc<dyn Filter>>,
}

impl std::fmt::Debug for DecisionTreeFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionTreeFilter")
            .field("current", &self.current.name())
            .finish()
    }
}

impl DecisionTreeFilter {
    pub fn leaf(current: Arc<dyn Filter>) -> Self {
        Self {
            name: TYPE.to_owned(),
            current,
            next_on_success: None,
            next_on_failure: None,
            next_on_success_or_failure: None,
        }
    }

    /// `current`, then `next` whatever happened.
    pub fn then(current: Arc<dyn Filter>, next: Arc<dyn Filter>) -> Self {
        Self {
            next_on_success_or_failure: Some(next),
            ..Self::leaf(current)
        }
    }
}

impl Filter for DecisionTreeFilter {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter<'a>(
        &self,
        ctx: &mut SchedulingContext<'_>,
        candidates: Vec<&'a Candidate>,
    ) -> Vec<&'a Candidate> {
        let filtered = self.current.filter(ctx, candidates.clone());
        let both = self.next_on_success_or_failure.as_ref();
        if filtered.is_empty() {
            match both.or(self.next_on_failure.as_ref()) {
                Some(next) => next.filter(ctx, candidates),
                None => filtered,
            }
        } else {
            match both.or(self.next_on_success.as_ref()) {
                Some(next) => next.filter(ctx, filtered),
                None => filtered,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::least_queue::LeastQueueFilter;
    use crate::scheduling::plugins::low_queue::LowQueueFilter;
    use crate::scheduling::plugins::test_support::{candidates, ctx_for, metrics_q};

    #[test]
    fn failure_branch_sees_original_candidates() {
        let cs = candidates(&[metrics_q(10), metrics_q(20), metrics_q(40)]);
        let tree = DecisionTreeFilter {
            next_on_failure: Some(Arc::new(LeastQueueFilter)),
            ..DecisionTreeFilter::leaf(Arc::new(LowQueueFilter { threshold: 5 }))
        };
        let kept = tree.filter(&mut ctx_for(), cs.iter().collect());
        assert_eq!(
            kept.len(),
            2,
            "least-queue over all three: limit 10 + 30/3 = 20"
        );
    }

    #[test]
    fn success_branch_sees_filtered_candidates() {
        let cs = candidates(&[metrics_q(1), metrics_q(2), metrics_q(100)]);
        let tree = DecisionTreeFilter {
            next_on_success: Some(Arc::new(LeastQueueFilter)),
            ..DecisionTreeFilter::leaf(Arc::new(LowQueueFilter { threshold: 50 }))
        };
        let kept = tree.filter(&mut ctx_for(), cs.iter().collect());
        // least-queue over [1, 2]: limit = 1 + 1/2 = 1
        assert_eq!(kept.len(), 1);
        let leaf = DecisionTreeFilter::leaf(Arc::new(LowQueueFilter { threshold: 0 }));
        assert!(leaf.filter(&mut ctx_for(), cs.iter().collect()).is_empty());
    }
}
