//! How many prompt bytes one of an endpoint's tokens stands for, learned from its responses.
//!
//! epp hashes and measures prompts in bytes; model servers count their KV cache in tokens of
//! their own tokenizer (and chat template). The prefix index converts an engine's reported
//! cache size into bytes of prompt text, and a fixed 4 bytes per token gets that wrong by the
//! tokenizer's difference: at 4.9 bytes per token the engine keeps a fifth more text than epp
//! assumed, so epp forgets prefixes the engine still holds and sends their requests elsewhere
//! to be computed again.
//!
//! Algorithm: each finished response that reports `usage.prompt_tokens` adds its prompt's
//! bytes (as epp parsed them, template excluded) and its token count to two running sums; when
//! the token sum passes [`WINDOW_TOKENS`] both are halved, so the estimate is a token-weighted
//! mean over the last one to two million tokens. The estimate is `bytes / tokens`, clamped to
//! [[`MIN_BYTES_PER_TOKEN`], [`MAX_BYTES_PER_TOKEN`]], and only given once
//! [`MIN_TOKENS`] tokens were seen. A response whose own ratio lies outside [`PLAUSIBLE`]
//! (e.g. an image prompt: few bytes here, many tokens there) is ignored. The clamp bounds what
//! clients can do to it by choosing their prompts: at most a factor of two either way from the
//! default 4, and so at most twice the index memory a fixed 4 gives.

use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Token sum above which both sums are halved (the estimate's memory).
pub const WINDOW_TOKENS: u64 = 1 << 20;
/// Tokens to see before the estimate is given.
pub const MIN_TOKENS: u64 = 4096;
pub const MIN_BYTES_PER_TOKEN: f64 = 2.0;
pub const MAX_BYTES_PER_TOKEN: f64 = 8.0;
/// Ratios of one response that are taken into account.
pub const PLAUSIBLE: RangeInclusive<f64> = 0.5..=32.0;

/// The learned bytes per token of one endpoint (see the module docs).
#[derive(Debug, Default)]
pub struct Tokenization {
    /// (prompt bytes, prompt tokens), decayed; taken once per finished response.
    sums: Mutex<(u64, u64)>,
    /// The estimate as `f64` bits, 0 while there is none: read by every decision without a
    /// lock.
    estimate: AtomicU64,
}

impl Tokenization {
    /// One finished request: `bytes` of prompt as epp parsed it, `tokens` as the engine counted.
    pub fn observe(&self, bytes: u64, tokens: u64) {
        if bytes == 0 || tokens == 0 || !PLAUSIBLE.contains(&(bytes as f64 / tokens as f64)) {
            return;
        }
        // A panic elsewhere while holding this lock left two numbers behind: still usable.
        let mut s = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = s.0.saturating_add(bytes);
        s.1 = s.1.saturating_add(tokens);
        while s.1 > WINDOW_TOKENS {
            s.0 /= 2;
            s.1 /= 2;
        }
        if s.1 >= MIN_TOKENS {
            let ratio = (s.0 as f64 / s.1 as f64).clamp(MIN_BYTES_PER_TOKEN, MAX_BYTES_PER_TOKEN);
            self.estimate.store(ratio.to_bits(), Ordering::Relaxed);
        }
    }

    /// Bytes per token, once [`MIN_TOKENS`] were seen.
    pub fn bytes_per_token(&self) -> Option<f64> {
        match self.estimate.load(Ordering::Relaxed) {
            0 => None,
            bits => Some(f64::from_bits(bits)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_until_enough_tokens_then_the_weighted_mean() {
        let t = Tokenization::default();
        t.observe(4000, 1000);
        assert_eq!(t.bytes_per_token(), None);
        t.observe(20_000, 4000);
        // 24,000 bytes over 5,000 tokens: weighted by tokens, not the mean of 4 and 5.
        assert_eq!(t.bytes_per_token(), Some(4.8));
    }

    #[test]
    fn implausible_responses_are_ignored_and_the_estimate_is_clamped() {
        let t = Tokenization::default();
        t.observe(10, 5000); // an image prompt: 0.002 bytes per token
        t.observe(0, 100);
        t.observe(100, 0);
        assert_eq!(t.bytes_per_token(), None);
        t.observe(100_000, 5000); // 20 bytes per token: plausible for one, clamped overall
        assert_eq!(t.bytes_per_token(), Some(MAX_BYTES_PER_TOKEN));
    }

    #[test]
    fn old_traffic_fades() {
        let t = Tokenization::default();
        t.observe(8 * WINDOW_TOKENS, WINDOW_TOKENS); // 8 bytes per token
        for _ in 0..8 {
            t.observe(3 * WINDOW_TOKENS / 2, WINDOW_TOKENS / 2); // then 3
        }
        let r = t.bytes_per_token().unwrap();
        assert!((3.0..3.1).contains(&r), "{r}");
    }
}
