//! `inflight-load-producer` (also `in-flight-load-producer`): how a routed request counts
//! against its endpoint's load in epp's own accounting ([`crate::datastore::load`]).
//!
//! epp always keeps this accounting (it is what keeps decisions between two metric scrapes
//! apart); this plugin only sets how requests are counted, with llm-d's parameters:
//!
//! * prompt tokens = prompt bytes / 4 (rounded up; token-id prompts are 4 bytes per id, so
//!   they count exactly);
//! * uncached tokens = prompt tokens minus the bytes the prefix plugin expects the endpoint to
//!   hold, / 4. They are released at the first response byte (the prefill is done then), the
//!   rest when the response ends;
//! * with `addEstimatedOutputTokens` (default false), estimated output tokens
//!   `min(round(prompt × outputRatio), the request's max_tokens, maxEstimatedOutputTokens)` are
//!   added too and released at the end. `outputRatio` defaults to 1.5;
//!   `maxEstimatedOutputTokens` to no cap.
//!
//! In-flight tokens (`token-load-scorer`, the affinity filter's TTFT estimate) are the uncached
//! tokens still prefilling plus the estimated output tokens.

use crate::datastore::LoadAmount;
use crate::index::hash::CHARS_PER_TOKEN;
use crate::request::LlmRequest;

pub const TYPE: &str = "inflight-load-producer";
/// The spelling used in some llm-d documents.
pub const TYPE_ALIAS: &str = "in-flight-load-producer";
pub const DEFAULT_OUTPUT_RATIO: f64 = 1.5;

#[derive(Debug, Clone, PartialEq)]
pub struct InflightLoadProducer {
    pub add_estimated_output_tokens: bool,
    pub output_ratio: f64,
    pub max_estimated_output_tokens: Option<u64>,
}

impl Default for InflightLoadProducer {
    fn default() -> Self {
        Self {
            add_estimated_output_tokens: false,
            output_ratio: DEFAULT_OUTPUT_RATIO,
            max_estimated_output_tokens: None,
        }
    }
}

/// Tokens in `bytes` of prompt (rounded up).
pub fn tokens_of(bytes: usize) -> u64 {
    bytes.div_ceil(CHARS_PER_TOKEN) as u64
}

impl InflightLoadProducer {
    /// What `request` adds to an endpoint expected to hold `matched_bytes` of its prompt.
    pub fn amount(&self, request: &LlmRequest, matched_bytes: usize) -> LoadAmount {
        let prompt_tokens = tokens_of(request.prompt_len());
        let cached = (matched_bytes / CHARS_PER_TOKEN) as u64;
        let output_tokens = if self.add_estimated_output_tokens {
            let estimate = (prompt_tokens as f64 * self.output_ratio).round() as u64;
            [request.max_tokens, self.max_estimated_output_tokens]
                .into_iter()
                .flatten()
                .fold(estimate, u64::min)
        } else {
            0
        };
        LoadAmount {
            prompt_tokens,
            uncached_tokens: prompt_tokens.saturating_sub(cached),
            output_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(prompt_bytes: usize, max_tokens: Option<u64>) -> LlmRequest {
        LlmRequest {
            prompt: vec![b'x'; prompt_bytes],
            max_tokens,
            ..Default::default()
        }
    }

    #[test]
    fn uncached_tokens_subtract_the_expected_prefix() {
        let p = InflightLoadProducer::default();
        let a = p.amount(&req(4000, None), 3000);
        assert_eq!(
            a,
            LoadAmount {
                prompt_tokens: 1000,
                uncached_tokens: 250,
                output_tokens: 0
            }
        );
        assert_eq!(p.amount(&req(10, None), 64).uncached_tokens, 0);
        assert_eq!(tokens_of(5), 2);
    }

    #[test]
    fn output_estimate_is_capped_by_the_client_and_the_operator() {
        let mut p = InflightLoadProducer {
            add_estimated_output_tokens: true,
            ..Default::default()
        };
        assert_eq!(p.amount(&req(400, None), 0).output_tokens, 150);
        assert_eq!(p.amount(&req(400, Some(20)), 0).output_tokens, 20);
        p.max_estimated_output_tokens = Some(7);
        assert_eq!(p.amount(&req(400, Some(20)), 0).output_tokens, 7);
    }
}
