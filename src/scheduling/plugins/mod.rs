//! Scheduling plugins, one per file; each file's doc states its algorithm and defaults.

pub mod active_request;
pub mod decision_tree;
pub mod has_capacity;
pub mod inflight_load;
pub mod kv_cache;
pub mod least_kv_cache;
pub mod least_queue;
pub mod load_aware;
pub mod lora_affinity;
pub mod lora_affinity_filter;
pub mod low_queue;
pub mod max_score;
pub mod prefill_cost;
pub mod prefix;
pub mod prefix_affinity_filter;
pub mod queue;
pub mod random;
pub mod running_requests;
pub mod token_load;
pub mod utilization;
pub mod weighted_random;

#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use crate::datastore::{Candidate, Endpoint, EndpointMetrics, EndpointSpec};
    use crate::request::LlmRequest;
    use crate::scheduling::framework::SchedulingContext;

    /// One candidate per metrics value, ids 0.., ports 8000...
    pub fn candidates(metrics: &[EndpointMetrics]) -> Vec<Candidate> {
        metrics
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let spec =
                    EndpointSpec::new(format!("pod-{i}"), ([10, 0, 0, i as u8 + 1], 8000).into());
                Candidate::new(Arc::new(Endpoint::new(i as u32, spec)), Arc::new(m.clone()))
            })
            .collect()
    }

    pub fn metrics_q(q: u32) -> EndpointMetrics {
        EndpointMetrics {
            waiting_queue: Some(q),
            updated: Some(std::time::Instant::now()),
            ..Default::default()
        }
    }

    pub fn metrics_kv(kv: f64) -> EndpointMetrics {
        EndpointMetrics {
            kv_cache_usage: Some(kv),
            updated: Some(std::time::Instant::now()),
            ..Default::default()
        }
    }

    pub fn lora(active: &[&str], waiting: &[&str], max: u32) -> EndpointMetrics {
        EndpointMetrics {
            active_loras: active.iter().map(|s| s.to_string()).collect(),
            waiting_loras: waiting.iter().map(|s| s.to_string()).collect(),
            max_lora: max,
            ..Default::default()
        }
    }

    /// Runs `check` `rounds` times while another thread keeps reserving and releasing load
    /// on every candidate (as concurrent decisions do), so live in-flight counts change under
    /// the plugin being checked. Candidates without metrics: their queue is that count.
    pub fn under_churn(n: usize, rounds: usize, mut check: impl FnMut(&[Candidate])) {
        use crate::datastore::{LoadAmount, Reservation};
        use std::sync::atomic::{AtomicBool, Ordering};
        let cs = candidates(&vec![EndpointMetrics::default(); n]);
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut held = Vec::new();
                let mut rng = fastrand::Rng::with_seed(7);
                while !stop.load(Ordering::Relaxed) {
                    if held.len() > 64 || rng.bool() {
                        held.clear();
                    }
                    let c = &cs[rng.usize(..cs.len())];
                    held.push(Reservation::new(c.endpoint.clone(), LoadAmount::default()));
                }
            });
            // Stops the churn even when `check` panics (else the scope would wait forever).
            struct Stop<'a>(&'a AtomicBool);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _stop = Stop(&stop);
            for _ in 0..rounds {
                check(&cs);
            }
        });
    }

    static EMPTY: std::sync::LazyLock<LlmRequest> = std::sync::LazyLock::new(LlmRequest::default);

    pub fn ctx_for() -> SchedulingContext<'static> {
        SchedulingContext::new(&EMPTY, fastrand::Rng::with_seed(42))
    }

    pub fn ctx_with_model(model: &str) -> LlmRequest {
        LlmRequest {
            model: model.into(),
            target_model: model.into(),
            ..Default::default()
        }
    }
}
