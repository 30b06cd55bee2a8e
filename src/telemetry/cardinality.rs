//! Bounded label values. Model names come from request bodies and headers, which any client
//! writes; a metric family never forgets a label set, so every new name would be a new series
//! for the life of the process. [`BoundedLabel`] admits the first `max` distinct values and
//! folds the rest into [`OVERFLOW`]. A value once admitted stays admitted, so paired updates
//! (a running-requests gauge raised and lowered) always meet the same series. Pinned values
//! (names the operator configured) are always themselves and take no room.

use std::collections::HashSet;

use parking_lot::RwLock;

/// The label value every value past the cap becomes.
pub const OVERFLOW: &str = "other";

/// Default cap on distinct model-name label values (llm-d's).
pub const DEFAULT_MAX_VALUES: usize = 1000;

/// A label whose distinct values are capped.
#[derive(Debug)]
pub struct BoundedLabel {
    max: usize,
    state: RwLock<Admitted>,
}

#[derive(Debug, Default)]
struct Admitted {
    seen: HashSet<Box<str>>,
    pinned: HashSet<Box<str>>,
}

impl BoundedLabel {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            state: RwLock::new(Admitted::default()),
        }
    }

    /// `value` itself if it is pinned, admitted, or there is room to admit it; else
    /// [`OVERFLOW`]. The empty value is always itself.
    pub fn bound(&self, value: &str) -> String {
        if value.is_empty() {
            return String::new();
        }
        {
            let state = self.state.read();
            if state.pinned.contains(value) || state.seen.contains(value) {
                return value.to_owned();
            }
            if state.seen.len() >= self.max {
                return OVERFLOW.to_owned();
            }
        }
        let mut state = self.state.write();
        if state.seen.contains(value) {
            return value.to_owned();
        }
        if state.seen.len() >= self.max {
            return OVERFLOW.to_owned();
        }
        state.seen.insert(value.into());
        value.to_owned()
    }

    /// Always lets `value` through, without taking one of the `max` places.
    pub fn pin(&self, value: &str) {
        if !value.is_empty() {
            self.state.write().pinned.insert(value.into());
        }
    }

    /// Distinct values admitted (pinned ones not counted).
    pub fn admitted(&self) -> usize {
        self.state.read().seen.len()
    }
}

impl Default for BoundedLabel {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_VALUES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_past_the_cap_fold_into_other_and_admitted_ones_stay() {
        let label = BoundedLabel::new(2);
        assert_eq!(label.bound("a"), "a");
        assert_eq!(label.bound("b"), "b");
        assert_eq!(label.bound("c"), OVERFLOW);
        assert_eq!(label.bound("a"), "a");
        assert_eq!(label.bound(""), "");
        assert_eq!(label.admitted(), 2);
    }

    #[test]
    fn pinned_values_pass_without_taking_room() {
        let label = BoundedLabel::new(1);
        label.pin("served");
        assert_eq!(label.bound("x"), "x");
        assert_eq!(label.bound("served"), "served");
        assert_eq!(label.bound("y"), OVERFLOW);
        assert_eq!(label.admitted(), 1);
    }
}
