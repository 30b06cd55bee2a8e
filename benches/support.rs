//! Shared set-up for the scheduling benches: epp's default configuration behind a director
//! over N pods, and 32 KB prompts built as in the shared-prefix workload (a group system
//! prompt + a unique question).

use std::sync::Arc;
use std::time::{Duration, Instant};

use epp::config::picker_config::build_scheduler;
use epp::datastore::{Datastore, EndpointMetrics, EndpointSpec};
use epp::director::Director;
use epp::request::LlmRequest;
use epp::scheduling::Scheduler;

pub const PROMPT_BYTES: usize = 32 * 1024;
pub const GROUPS: usize = 64;
/// Shared part of each prompt (the group's system prompt); the rest is unique per request.
pub const SHARED_BYTES: usize = 8 * 1024;

const DEFAULT: &str = include_str!("../config/default-plugins.yaml");

/// epp's default scheduler, its prefix index sized `capacity` blocks per pod (autoTune off).
pub fn scheduler(capacity: usize) -> Scheduler {
    let text = DEFAULT
        .replace(
            "lruCapacityPerServer: 31250",
            &format!("lruCapacityPerServer: {capacity}"),
        )
        .replace("autoTune: true", "autoTune: false");
    build_scheduler(&text, None).expect("the shipped configuration builds")
}

/// A director over `n` pods with fresh, equal metrics, and `scheduler`.
pub fn director(n: usize, scheduler: Scheduler) -> Director {
    let ds = Arc::new(Datastore::new());
    ds.set_endpoints(
        (0..n)
            .map(|i| {
                EndpointSpec::new(
                    format!("pod-{i}"),
                    ([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8000).into(),
                )
            })
            .collect(),
    );
    for e in ds.endpoints() {
        ds.update_metrics(
            e.id,
            EndpointMetrics {
                waiting_queue: Some(1),
                running: Some(4),
                kv_cache_usage: Some(0.3),
                updated: Some(Instant::now() + Duration::from_secs(3600)),
                ..Default::default()
            },
        );
    }
    for o in scheduler.endpoint_observers() {
        ds.add_observer(o);
    }
    Director::new(ds, Arc::new(scheduler), Duration::from_secs(7200))
        .with_candidate_reuse(Duration::from_millis(5))
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

/// Routes every request once (load released at once), so that measured decisions match real
/// prefixes.
pub fn warm(d: &Director, requests: &[LlmRequest]) {
    for r in requests {
        d.route(r, None).unwrap();
    }
}
