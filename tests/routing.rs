//! Routing behaviour of epp's shipped default configuration, through the public scheduler and
//! director API: cold bursts spread, same-prefix bursts stay until the holder saturates then
//! spill, a holder loaded far above the mean for long gets a replica, endpoints without metrics
//! still get traffic, and the load accounting balances.

use std::sync::Arc;
use std::time::{Duration, Instant};

use epp::config::picker_config::build_scheduler;
use epp::datastore::{Datastore, EndpointMetrics, EndpointSpec, ScrapeFailure};
use epp::director::Director;
use epp::request::LlmRequest;

const DEFAULT: &str = include_str!("../config/default-plugins.yaml");

fn director(pods: u8) -> Director {
    director_with(pods, DEFAULT)
}

fn director_with(pods: u8, config: &str) -> Director {
    let ds = Arc::new(Datastore::new());
    ds.set_endpoints(
        (0..pods)
            .map(|i| EndpointSpec::new(format!("p{i}"), ([10, 0, 0, i + 1], 8000).into()))
            .collect(),
    );
    let scheduler = build_scheduler(config, None).unwrap();
    for o in scheduler.endpoint_observers() {
        ds.add_observer(o);
    }
    Director::new(ds, Arc::new(scheduler), Duration::from_secs(2))
}

fn request(prompt: String) -> LlmRequest {
    LlmRequest {
        model: "m".into(),
        target_model: "m".into(),
        prompt: prompt.into_bytes(),
        ..Default::default()
    }
}

fn counts(d: &Director, results: &[epp::scheduling::ScheduleResult]) -> Vec<usize> {
    let eps = d.datastore.endpoints();
    eps.iter()
        .map(|e| {
            results
                .iter()
                .filter(|r| r.primary().endpoint.id == e.id)
                .count()
        })
        .collect()
}

#[test]
fn a_cold_burst_spreads_evenly() {
    // 100 requests with distinct prompts inside one scrape window (no metrics at all).
    let d = director(4);
    let held: Vec<_> = (0..100)
        .map(|i| {
            d.route(
                &request(format!("{i} {}", "fresh words ".repeat(200))),
                None,
            )
            .unwrap()
        })
        .collect();
    let per = counts(&d, &held);
    assert!(per.iter().all(|n| (24..=26).contains(n)), "{per:?}");
}

#[test]
fn a_same_prefix_burst_sticks_then_spills_when_the_holder_saturates() {
    let d = director(4);
    let system = "shared system prompt words ".repeat(600); // ~16 KB ≈ 4,000 tokens
    // The prefix is established: one request went to the holder and completed.
    let first = d
        .route(&request(format!("{system} question 0")), None)
        .unwrap();
    let holder = first.primary().endpoint.id;
    drop(first);
    // A burst: every request stays in flight (no first token yet); each brings ~500 new
    // tokens of its own.
    let held: Vec<_> = (1..60)
        .map(|i| {
            let question = format!("question {i} ").repeat(170);
            d.route(&request(format!("{system}{question}")), None)
                .unwrap()
        })
        .collect();
    let per = counts(&d, &held);
    let stay = held
        .iter()
        .take_while(|r| r.primary().endpoint.id == holder)
        .count();
    assert!(
        stay >= 5,
        "the burst stays on its holder at first ({stay}): {per:?}"
    );
    assert!(
        per.iter().filter(|n| **n > 0).count() >= 2,
        "then spills once the holder's queue outweighs recomputing the prefix: {per:?}"
    );
    assert_eq!(
        per[holder as usize],
        *per.iter().max().unwrap(),
        "the holder keeps the largest share: {per:?}"
    );
}

#[test]
fn a_shared_prefix_returns_to_its_holder_once_load_drains() {
    let d = director(3);
    let system = "support bot instructions ".repeat(400);
    let mut holders = std::collections::HashSet::new();
    for i in 0..30 {
        // Sequential traffic: each response completes before the next request.
        let r = d
            .route(&request(format!("{system} question {i}")), None)
            .unwrap();
        holders.insert(r.primary().endpoint.id);
    }
    assert_eq!(holders.len(), 1, "{holders:?}");
}

#[test]
fn a_holder_loaded_far_above_the_mean_for_long_gets_its_prefix_replicated() {
    // The shipped configuration with a 1-second saturation window instead of 10 seconds.
    let config = DEFAULT.replace("saturationWindowSeconds: 10", "saturationWindowSeconds: 1");
    assert_ne!(config, DEFAULT);
    let d = director_with(4, &config);
    let system = "agent instructions and tool descriptions ".repeat(300); // ~12 KB
    let ask = |i: usize| request(format!("{system} short question {i}"));
    let first = d.route(&ask(0), None).unwrap();
    let holder = first.primary().endpoint.id;
    drop(first);
    // Eight requests in flight on the holder (mean 2, limit 4): a passing peak, it keeps them.
    let mut held: Vec<_> = (1..=8).map(|i| d.route(&ask(i), None).unwrap()).collect();
    assert!(
        held.iter().all(|r| r.primary().endpoint.id == holder),
        "{:?}",
        counts(&d, &held)
    );
    // The peak lasts 3 windows: the next request seeds a replica on another endpoint …
    std::thread::sleep(Duration::from_secs(3));
    let mut replica = d.route(&ask(9), None).unwrap();
    let replica_id = replica.primary().endpoint.id;
    assert_ne!(replica_id, holder);
    // … which, once it has computed the prefix (first token) …
    replica.reservation.as_mut().unwrap().prefill_done();
    held.push(replica);
    // … holds it too and takes the following requests.
    let next = d.route(&ask(10), None).unwrap();
    assert_eq!(next.primary().endpoint.id, replica_id);
    held.push(next);
    // Once the holder's load drains, the prefix is served from both, not recomputed elsewhere.
    held.retain(|r| r.primary().endpoint.id != holder);
    std::thread::sleep(Duration::from_secs(3));
    let back: Vec<_> = (11..15).map(|i| d.route(&ask(i), None).unwrap()).collect();
    assert!(
        back.iter()
            .all(|r| [holder, replica_id].contains(&r.primary().endpoint.id)),
        "{:?}",
        counts(&d, &back)
    );
}

#[test]
fn endpoints_without_metrics_families_still_get_traffic() {
    // Regression (issue 7): one endpoint with fresh metrics and three whose pages lack the
    // engine families (or failed) used to take all traffic.
    let d = director(4);
    let eps = d.datastore.endpoints();
    d.datastore.update_metrics(
        eps[0].id,
        EndpointMetrics {
            waiting_queue: Some(0),
            running: Some(0),
            kv_cache_usage: Some(0.0),
            updated: Some(Instant::now()),
            ..Default::default()
        },
    );
    d.datastore.update_metrics(
        eps[1].id,
        EndpointMetrics {
            updated: Some(Instant::now()),
            ..Default::default()
        },
    );
    d.datastore
        .scrape_failed(eps[2].id, ScrapeFailure::BadStatus);
    let held: Vec<_> = (0..200)
        .map(|i| {
            d.route(&request(format!("prompt {i} {}", "x".repeat(400))), None)
                .unwrap()
        })
        .collect();
    let per = counts(&d, &held);
    assert!(per.iter().all(|n| *n >= 30), "{per:?}");
}

#[test]
fn load_counters_return_to_zero_after_thousands_of_requests() {
    let d = director(4);
    let mut rng = fastrand::Rng::with_seed(7);
    let mut live = Vec::new();
    for i in 0..5000 {
        let prompt = format!("group {} {}", i % 37, "y".repeat(rng.usize(10..3000)));
        let mut r = d.route(&request(prompt), None).unwrap();
        // Some finish at once, some stream a first byte first, some linger and are dropped
        // later (a client reset, a failed upstream): every path releases exactly once.
        match rng.u8(..4) {
            0 => drop(r),
            1 => {
                if let Some(res) = r.reservation.as_mut() {
                    res.prefill_done();
                    res.prefill_done();
                    res.release();
                }
            }
            _ => live.push(r),
        }
        if live.len() > 200 {
            let k = rng.usize(..live.len());
            live.swap_remove(k);
        }
    }
    drop(live);
    for e in d.datastore.endpoints() {
        assert!(e.load.is_idle(), "{}: {:?}", e.name, e.load.snapshot());
        assert!(e.load.dispatched() > 0);
    }
}

/// How many requests of a same-prefix burst stay on the prefix's holder, with the shipped
/// configuration on two endpoints whose caches hold 600 blocks (~38 KB of prompt), after
/// twelve ~8 KB documents went through them four times (so evicted documents came back).
fn burst_stay_on_small_caches(price_evictions: bool) -> (usize, Vec<usize>) {
    let config = DEFAULT
        .replace("lruCapacityPerServer: 31250", "lruCapacityPerServer: 600")
        .replace(
            "priceEvictions: true",
            &format!("priceEvictions: {price_evictions}"),
        );
    assert_ne!(config, DEFAULT);
    let d = director_with(2, &config);
    let document = |i: usize| format!("document {i:03} ").repeat(600);
    for _ in 0..4 {
        for i in 0..12 {
            drop(d.route(&request(format!("{} summary", document(i))), None));
        }
    }
    let hot = document(99);
    let first = d.route(&request(format!("{hot} q0")), None).unwrap();
    let holder = first.primary().endpoint.id;
    drop(first);
    let held: Vec<_> = (1..40)
        .map(|i| {
            let question = format!("question {i} ").repeat(60);
            d.route(&request(format!("{hot}{question}")), None).unwrap()
        })
        .collect();
    let stay = held
        .iter()
        .take_while(|r| r.primary().endpoint.id == holder)
        .count();
    (stay, counts(&d, &held))
}

#[test]
fn where_full_caches_evict_prefixes_that_return_a_burst_keeps_its_holder_longer() {
    let (priced, per_priced) = burst_stay_on_small_caches(true);
    let (unpriced, per_unpriced) = burst_stay_on_small_caches(false);
    assert!(
        priced > unpriced,
        "a replica costs the evictions it causes: {priced} ({per_priced:?}) vs {unpriced} ({per_unpriced:?})"
    );
    assert!(
        per_priced.iter().all(|n| *n > 0),
        "and still spills once the holder's queue is worth both: {per_priced:?}"
    );
}
