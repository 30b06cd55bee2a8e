//! Discrete-event fleet simulator: N [`Engine`] pods in virtual time, a workload, and a routing
//! policy. epp's policies call epp's own [`Scheduler`] in-process, over metrics "scraped" from
//! the pods every `scrape_interval` (so the router sees what a real epp would: slightly stale
//! queue and KV figures). Deterministic for a given seed.

use std::sync::Arc;

use crate::config::env::SchedulerEnv;
use crate::datastore::{Candidate, Endpoint, EndpointMetrics, EndpointSpec};
use crate::request::LlmRequest;
use crate::scheduling::Scheduler;

use super::engine::{Engine, EngineConfig, EngineEvent, EngineRequest};
use super::tokens;
use super::workload::Arrival;

/// How requests are assigned to pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// What Envoy does alone.
    RoundRobin,
    Random,
    /// Fewest outstanding requests as counted by the router (Envoy's LEAST_REQUEST).
    LeastQueue,
    /// epp's V1 decision tree.
    V1Tree,
    /// epp V2: queue (2) + kv-cache (2) scorers, max-score picker.
    V2NoPrefix,
    /// epp V2 with the prefix-cache scorer (3): the seed's scheduler.
    V2Prefix,
    /// Reads every pod's true cache and queue: least (pending prefill + uncached tokens).
    Oracle,
}

impl Policy {
    pub const ALL: [Policy; 7] = [
        Policy::RoundRobin,
        Policy::Random,
        Policy::LeastQueue,
        Policy::V1Tree,
        Policy::V2NoPrefix,
        Policy::V2Prefix,
        Policy::Oracle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::Random => "random",
            Policy::LeastQueue => "least-queue",
            Policy::V1Tree => "v1-tree",
            Policy::V2NoPrefix => "v2-no-prefix",
            Policy::V2Prefix => "epp (v2+prefix)",
            Policy::Oracle => "oracle",
        }
    }

    /// Parses a CLI name (`round-robin`, `random`, `least-queue`, `v1`, `v2`, `epp`, `oracle`).
    pub fn parse(s: &str) -> Option<Policy> {
        Some(match s {
            "round-robin" | "rr" => Policy::RoundRobin,
            "random" => Policy::Random,
            "least-queue" => Policy::LeastQueue,
            "v1" | "v1-tree" => Policy::V1Tree,
            "v2" | "v2-no-prefix" => Policy::V2NoPrefix,
            "epp" | "v2-prefix" => Policy::V2Prefix,
            "oracle" => Policy::Oracle,
            _ => return None,
        })
    }

    /// epp's scheduler for this policy, if it is one of epp's.
    fn scheduler(self) -> Option<Scheduler> {
        let env = SchedulerEnv {
            queue_weight: 2.0,
            kv_cache_weight: 2.0,
            prefix_weight: 3.0,
            ..Default::default()
        };
        match self {
            Policy::V1Tree => Some(env.build()),
            Policy::V2NoPrefix => Some(
                SchedulerEnv {
                    use_v2: true,
                    ..env
                }
                .build(),
            ),
            Policy::V2Prefix => Some(
                SchedulerEnv {
                    use_v2: true,
                    enable_prefix: true,
                    ..env
                }
                .build(),
            ),
            _ => None,
        }
    }
}

/// Fleet settings.
#[derive(Debug, Clone, Copy)]
pub struct FleetConfig {
    pub pods: usize,
    pub engine: EngineConfig,
    /// Seconds between metric scrapes (epp's default 50 ms).
    pub scrape_interval: f64,
    pub seed: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            pods: 4,
            engine: EngineConfig::default(),
            scrape_interval: 0.05,
            seed: 1,
        }
    }
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestOutcome {
    pub arrival: f64,
    pub first_token: f64,
    pub finished: f64,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub output_tokens: usize,
    pub pod: usize,
}

/// All outcomes of one policy over one workload.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub policy: Policy,
    pub outcomes: Vec<RequestOutcome>,
    pub pods: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Summary figures of a run.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub ttft_mean: f64,
    pub ttft_p50: f64,
    pub ttft_p90: f64,
    pub e2e_mean: f64,
    pub e2e_p50: f64,
    pub output_tokens_per_s: f64,
    /// Cached prompt tokens / prompt tokens.
    pub hit_rate: f64,
    /// Most-loaded pod's request count over the mean.
    pub load_max_over_mean: f64,
    pub requests: usize,
}

impl RunResult {
    pub fn summary(&self) -> Summary {
        summarize(&self.outcomes, self.pods)
    }
}

/// Summary figures of any set of outcomes over `pods` pods (also used for runs through the
/// real stack).
pub fn summarize(o: &[RequestOutcome], pods: usize) -> Summary {
    {
        let mut ttft: Vec<f64> = o.iter().map(|r| r.first_token - r.arrival).collect();
        let mut e2e: Vec<f64> = o.iter().map(|r| r.finished - r.arrival).collect();
        ttft.sort_by(f64::total_cmp);
        e2e.sort_by(f64::total_cmp);
        let n = o.len().max(1) as f64;
        let start = o.iter().map(|r| r.arrival).fold(f64::INFINITY, f64::min);
        let end = o.iter().map(|r| r.finished).fold(0.0, f64::max);
        let out_tokens: usize = o.iter().map(|r| r.output_tokens).sum();
        let prompt: usize = o.iter().map(|r| r.prompt_tokens).sum();
        let cached: usize = o.iter().map(|r| r.cached_tokens).sum();
        let mut per_pod = vec![0usize; pods.max(1)];
        for r in o {
            per_pod[r.pod.min(pods.max(1) - 1)] += 1;
        }
        let mean_load = n / pods.max(1) as f64;
        Summary {
            ttft_mean: ttft.iter().sum::<f64>() / n,
            ttft_p50: percentile(&ttft, 0.5),
            ttft_p90: percentile(&ttft, 0.9),
            e2e_mean: e2e.iter().sum::<f64>() / n,
            e2e_p50: percentile(&e2e, 0.5),
            output_tokens_per_s: out_tokens as f64 / (end - start).max(1e-9),
            hit_rate: cached as f64 / prompt.max(1) as f64,
            load_max_over_mean: *per_pod.iter().max().unwrap_or(&0) as f64 / mean_load,
            requests: o.len(),
        }
    }
}

struct Pod {
    engine: Engine,
    busy_until: Option<f64>,
    pending: Vec<EngineEvent>,
    outstanding: usize,
}

/// Runs `arrivals` through a fleet routed by `policy`. `on_progress(done)` is called as
/// requests finish.
pub fn simulate(
    policy: Policy,
    arrivals: &[Arrival],
    cfg: &FleetConfig,
    mut on_progress: impl FnMut(usize),
) -> RunResult {
    let mut rng = fastrand::Rng::with_seed(cfg.seed ^ 0xf1ee7);
    let scheduler = policy.scheduler();
    let endpoints: Vec<Arc<Endpoint>> = (0..cfg.pods)
        .map(|i| {
            let ip = [10, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            Arc::new(Endpoint::new(
                i as u32,
                EndpointSpec::new(format!("sim-{i}"), (ip, 8000).into()),
            ))
        })
        .collect();
    let mut pods: Vec<Pod> = (0..cfg.pods)
        .map(|_| Pod {
            engine: Engine::new(cfg.engine),
            busy_until: None,
            pending: Vec::new(),
            outstanding: 0,
        })
        .collect();
    let scrape = |pods: &[Pod]| -> Vec<Candidate> {
        pods.iter()
            .zip(&endpoints)
            .map(|(p, e)| {
                let m = p.engine.metrics();
                Candidate::new(
                    e.clone(),
                    Arc::new(EndpointMetrics {
                        waiting_queue: Some(m.waiting as u32),
                        running: Some(m.running as u32),
                        kv_cache_usage: Some(m.kv_usage),
                        num_gpu_blocks: Some(m.num_blocks as u64),
                        block_size_tokens: Some(m.block_tokens as u32),
                        updated: Some(std::time::Instant::now()),
                        ..Default::default()
                    }),
                )
            })
            .collect()
    };
    let mut candidates = scrape(&pods);
    let mut next_scrape = cfg.scrape_interval;
    let mut outcomes: Vec<RequestOutcome> = vec![RequestOutcome::default(); arrivals.len()];
    let mut next_arrival = 0;
    let mut finished = 0;
    let mut rr = 0usize;
    let block_tokens = cfg.engine.block_tokens;

    while finished < arrivals.len() {
        let t_arrival = arrivals.get(next_arrival).map_or(f64::INFINITY, |a| a.at);
        let (step_pod, t_step) = pods
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.busy_until.map(|t| (i, t)))
            .fold((usize::MAX, f64::INFINITY), |best, x| {
                if x.1 < best.1 { x } else { best }
            });
        let now = t_arrival.min(t_step);
        if now.is_infinite() {
            break; // nothing left that can happen (should not occur)
        }
        if next_scrape <= now {
            candidates = scrape(&pods);
            while next_scrape <= now {
                next_scrape += cfg.scrape_interval;
            }
        }

        if t_step <= t_arrival {
            // A step ends: deliver its events, start the next step.
            let pod = &mut pods[step_pod];
            for ev in std::mem::take(&mut pod.pending) {
                match ev {
                    EngineEvent::FirstToken { id } => outcomes[id as usize].first_token = now,
                    EngineEvent::Token { .. } => {}
                    EngineEvent::Finished {
                        id,
                        prompt_tokens,
                        cached_tokens,
                        output_tokens,
                    } => {
                        let o = &mut outcomes[id as usize];
                        o.finished = now;
                        o.prompt_tokens = prompt_tokens;
                        o.cached_tokens = cached_tokens;
                        o.output_tokens = output_tokens;
                        pod.outstanding -= 1;
                        finished += 1;
                        on_progress(finished);
                    }
                }
            }
            start_step(pod, now);
            continue;
        }

        // An arrival: route it.
        let a = &arrivals[next_arrival];
        let id = next_arrival;
        next_arrival += 1;
        let hashes = tokens::block_hashes(&a.model, &a.prompt, block_tokens);
        let prompt_tokens = tokens::count(&a.prompt);
        let pod = match policy {
            Policy::RoundRobin => {
                rr += 1;
                (rr - 1) % cfg.pods
            }
            Policy::Random => rng.usize(..cfg.pods),
            Policy::LeastQueue => {
                let min = pods.iter().map(|p| p.outstanding).min().unwrap_or(0);
                let ties: Vec<usize> = (0..cfg.pods)
                    .filter(|&i| pods[i].outstanding == min)
                    .collect();
                ties[rng.usize(..ties.len())]
            }
            Policy::Oracle => {
                let cost = |p: &Pod| {
                    let cached = p.engine.cached_prefix_blocks(&hashes) * block_tokens;
                    p.engine.pending_prefill_tokens() + prompt_tokens.saturating_sub(cached)
                };
                (0..cfg.pods)
                    .min_by_key(|&i| (cost(&pods[i]), pods[i].outstanding))
                    .unwrap_or(0)
            }
            Policy::V1Tree | Policy::V2NoPrefix | Policy::V2Prefix => {
                let req = LlmRequest {
                    model: a.model.clone(),
                    target_model: a.model.clone(),
                    prompt: a.prompt.to_vec(),
                    ..Default::default()
                };
                let s = scheduler.as_ref().expect("epp policies have a scheduler");
                match s.schedule_with_rng(&req, &candidates, rng.fork()) {
                    Ok(r) => r.primary().endpoint.id as usize,
                    // Everything filtered (V1 only sheds sheddable traffic; none here).
                    Err(_) => rng.usize(..cfg.pods),
                }
            }
        };
        outcomes[id] = RequestOutcome {
            arrival: a.at,
            pod,
            ..Default::default()
        };
        let p = &mut pods[pod];
        p.outstanding += 1;
        p.engine.add_request(EngineRequest {
            id: id as u64,
            prompt_tokens,
            block_hashes: hashes,
            max_tokens: a.max_tokens,
        });
        if p.busy_until.is_none() {
            start_step(p, now);
        }
    }
    RunResult {
        policy,
        outcomes,
        pods: cfg.pods,
    }
}

fn start_step(pod: &mut Pod, now: f64) {
    let step = pod.engine.step();
    if step.duration > 0.0 {
        pod.busy_until = Some(now + step.duration);
        pod.pending = step.events;
    } else {
        pod.busy_until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::workload::SharedPrefix;

    fn small() -> (Vec<Arrival>, FleetConfig) {
        let w = SharedPrefix {
            groups: 8,
            prompts_per_group: 8,
            system_tokens: 1000,
            question_tokens: 32,
            output_tokens: 16,
        };
        let cfg = FleetConfig {
            pods: 4,
            engine: EngineConfig {
                num_blocks: 1200,
                ..Default::default()
            },
            ..Default::default()
        };
        (w.poisson(20.0, "m", 3), cfg)
    }

    #[test]
    fn every_policy_finishes_every_request() {
        let (arrivals, cfg) = small();
        for p in Policy::ALL {
            let r = simulate(p, &arrivals, &cfg, |_| {});
            assert_eq!(r.outcomes.len(), arrivals.len());
            assert!(
                r.outcomes
                    .iter()
                    .all(|o| o.finished >= o.first_token && o.first_token > o.arrival),
                "{}",
                p.name()
            );
            assert!(r.outcomes.iter().all(|o| o.output_tokens == 16));
        }
    }

    #[test]
    fn prefix_routing_beats_round_robin_on_shared_prefixes() {
        let (arrivals, cfg) = small();
        let rr = simulate(Policy::RoundRobin, &arrivals, &cfg, |_| {}).summary();
        let epp = simulate(Policy::V2Prefix, &arrivals, &cfg, |_| {}).summary();
        assert!(
            epp.hit_rate > rr.hit_rate + 0.1,
            "epp {} vs rr {}",
            epp.hit_rate,
            rr.hit_rate
        );
        assert!(epp.ttft_mean < rr.ttft_mean);
    }

    #[test]
    fn deterministic_for_a_seed() {
        let (arrivals, cfg) = small();
        let a = simulate(Policy::V2Prefix, &arrivals, &cfg, |_| {}).summary();
        let b = simulate(Policy::V2Prefix, &arrivals, &cfg, |_| {}).summary();
        assert_eq!(a.ttft_mean, b.ttft_mean);
        assert_eq!(a.hit_rate, b.hit_rate);
    }
}
