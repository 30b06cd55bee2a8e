//! How much of the prefix index's idea of an endpoint's cache the engine really keeps, learned
//! from the cached tokens its responses report.
//!
//! The prefix index evicts an endpoint's blocks past a capacity: the engine's own cache size
//! when its metrics report it (`cache_config_info`), otherwise `lruCapacityPerServer`. Engines
//! whose metrics say nothing of their cache (SGLang's exporter, many simulators), or whose
//! effective cache is smaller than their total (running sequences hold blocks too), keep less
//! than that. The index then holds prefixes the engine has long evicted, and every decision that
//! trusts such a "hit" sends the request where it is computed whole.
//!
//! Each response that reports `usage.prompt_tokens_details.cached_tokens` checks one of the
//! index's predictions. At the decision, the prefix plugin notes ([`CacheCheck`]) the share of
//! the prompt the index said the chosen endpoint held and how deep in that endpoint's recency
//! order the last of those blocks lay: the weight of the blocks recorded there since, as a share
//! of the configured capacity. The engine's answer then bounds its real capacity:
//!
//! * **A miss** (the engine reported less than half the predicted share): the engine had
//!   evicted blocks no deeper than that, so its capacity is below the depth. The scale moves
//!   [`SHRINK`] of the way down to it.
//! * **A hit** from the deepest tenth ([`DEEP`]) of the scaled capacity: the engine keeps at
//!   least that deep, so the index may be forgetting too early. The scale grows by [`GROW`].
//!
//! Misses at depths epp's own unfinished requests could explain are not checks (the plugin only
//! notes a check when the depth exceeds the prompt tokens still waiting for their prefill at the
//! endpoint): a burst's second request arrives before the first has been computed and misses
//! through no fault of the index. The depth is a lower bound (the index keeps recency by
//! generations, not by block), which errs toward a smaller index.
//!
//! The scale starts at 1 (trust the configured capacity) and stays within [[`MIN_SCALE`],
//! [`MAX_SCALE`]]. A response reporting no cached tokens at all (vLLM without
//! `--enable-prompt-tokens-details`) checks nothing. The bound keeps what clients can do by
//! choosing prompts to an index at most twice its configured size, or a sixty-fourth of it.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lowest scale: the index keeps at least this share of the configured capacity.
pub const MIN_SCALE: f64 = 1.0 / 64.0;
/// Highest scale: an engine may keep more than its metrics say, up to twice.
pub const MAX_SCALE: f64 = 2.0;
/// Share of the way from the scale to a miss's depth that one miss moves it.
pub const SHRINK: f64 = 0.5;
/// Factor one deep hit grows the scale by.
pub const GROW: f64 = 1.02;
/// Hits at least this deep (× the scale) grow it.
pub const DEEP: f64 = 0.9;
/// Predicted shares below this are not checked (too few blocks to tell).
pub const MIN_PREDICTED: f64 = 0.05;

/// What one decision predicted about the chosen endpoint's cache (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheCheck {
    /// Share of the prompt the index said the endpoint held.
    pub predicted: f64,
    /// Weight recorded at the endpoint since the last predicted block, over its configured
    /// capacity (unscaled).
    pub depth: f64,
}

/// The learned capacity scale of one endpoint (see the module docs).
#[derive(Debug)]
pub struct CacheFit {
    /// The scale as `f64` bits.
    scale: AtomicU64,
}

impl Default for CacheFit {
    fn default() -> Self {
        Self {
            scale: AtomicU64::new(1.0f64.to_bits()),
        }
    }
}

impl CacheFit {
    /// The share of its configured capacity the index should keep for this endpoint.
    pub fn scale(&self) -> f64 {
        f64::from_bits(self.scale.load(Ordering::Relaxed))
    }

    /// One finished response: `check` as noted at the decision, `cached` the share of its
    /// prompt tokens the engine reported cached.
    pub fn observe(&self, check: CacheCheck, cached: f64) {
        if !(check.predicted >= MIN_PREDICTED && check.depth.is_finite() && cached.is_finite()) {
            return;
        }
        let missed = cached < check.predicted / 2.0;
        let _ = self
            .scale
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let s = f64::from_bits(bits);
                let next = if missed {
                    (check.depth < s).then_some(s - SHRINK * (s - check.depth))
                } else {
                    (check.depth >= DEEP * s).then_some(s * GROW)
                }?;
                Some(next.clamp(MIN_SCALE, MAX_SCALE).to_bits())
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(predicted: f64, depth: f64) -> CacheCheck {
        CacheCheck { predicted, depth }
    }

    #[test]
    fn misses_pull_the_scale_down_toward_their_depth() {
        let f = CacheFit::default();
        f.observe(check(0.9, 0.2), 0.0);
        assert!(
            (f.scale() - (1.0 - SHRINK * 0.8)).abs() < 1e-9,
            "{}",
            f.scale()
        );
        for _ in 0..40 {
            f.observe(check(0.9, 0.2), 0.0);
        }
        assert!((0.2..0.21).contains(&f.scale()), "{}", f.scale());
        // A miss deeper than the scale says nothing new.
        f.observe(check(0.9, 0.5), 0.0);
        assert!((0.2..0.21).contains(&f.scale()), "{}", f.scale());
    }

    #[test]
    fn deep_hits_grow_it_and_shallow_ones_do_not() {
        let f = CacheFit::default();
        f.observe(check(0.9, 0.8), 0.9);
        assert_eq!(f.scale(), 1.0);
        f.observe(check(0.9, 0.95), 0.85);
        assert!((f.scale() - GROW).abs() < 1e-9);
        for _ in 0..100 {
            f.observe(check(0.9, 1.95), 0.9);
        }
        assert_eq!(f.scale(), MAX_SCALE);
    }

    #[test]
    fn small_predictions_and_nonsense_check_nothing_and_the_floor_holds() {
        let f = CacheFit::default();
        f.observe(check(0.01, 0.0), 0.0);
        f.observe(check(0.9, f64::NAN), 0.0);
        f.observe(check(0.9, 0.1), f64::INFINITY);
        assert_eq!(f.scale(), 1.0);
        for _ in 0..200 {
            f.observe(check(0.9, 0.0), 0.0);
        }
        assert_eq!(f.scale(), MIN_SCALE);
    }
}
