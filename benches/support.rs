//! Shared set-up for the scheduling benches: a V2 + prefix scheduler over N pods and 32 KB
//! prompts built as in the shared-prefix workload (a group system prompt + a unique question).

use std::sync::Arc;

use epp::config::env::SchedulerEnv;
use epp::datastore::{Candidate, Endpoint, EndpointMetrics, EndpointSpec};
use epp::request::LlmRequest;
use epp::scheduling::Scheduler;

pub const PROMPT_BYTES: usize = 32 * 1024;
pub const GROUPS: usize = 64;
/// Shared part of each prompt (the group's system prompt); the rest is unique per request.
pub const SHARED_BYTES: usize = 8 * 1024;

pub fn scheduler() -> Scheduler {
    SchedulerEnv {
        use_v2: true,
        enable_prefix: true,
        ..Default::default()
    }
    .build()
}

pub fn pods(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| {
            let spec = EndpointSpec::new(
                format!("pod-{i}"),
                ([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8000).into(),
            );
            // Equal load everywhere: with fixed unequal figures every new prefix group would
            // pick the same least-loaded pods (nothing updates the figures between decisions
            // here), leaving "100 pods" really two.
            let metrics = EndpointMetrics {
                waiting_queue: Some(1),
                running: Some(4),
                kv_cache_usage: Some(0.3),
                updated: Some(std::time::Instant::now()),
                ..Default::default()
            };
            Candidate::new(Arc::new(Endpoint::new(i as u32, spec)), Arc::new(metrics))
        })
        .collect()
}

/// Request `i`: group `i % GROUPS`'s system prompt, then a unique question.
pub fn request(i: usize) -> LlmRequest {
    let group = i % GROUPS;
    let mut prompt = format!("system prompt of group {group}: ")
        .repeat(SHARED_BYTES / 30)
        .into_bytes();
    prompt.truncate(SHARED_BYTES);
    let question = format!("question {i} ");
    while prompt.len() < PROMPT_BYTES {
        prompt.extend_from_slice(question.as_bytes());
    }
    prompt.truncate(PROMPT_BYTES);
    LlmRequest {
        model: "llama".into(),
        target_model: "llama".into(),
        prompt,
        ..Default::default()
    }
}

/// The bench workload: 4,096 requests (see [`request`]).
pub fn requests() -> Vec<LlmRequest> {
    (0..4096).map(request).collect()
}

/// A scheduler whose index already holds `requests` (each scheduled once over `pods`), so
/// that measured decisions match real prefixes.
pub fn warmed_scheduler(pods: &[Candidate], requests: &[LlmRequest]) -> Scheduler {
    let s = scheduler();
    for r in requests {
        s.schedule(r, pods).unwrap();
    }
    s
}
