//! Per-endpoint gauges read live at each `/metrics` scrape (a collector, so departed endpoints
//! leave no stale series): epp's own load accounting and each endpoint's scrape health.
//!
//! | metric | labels | value |
//! |---|---|---|
//! | `llm_d_epp_inflight_requests` | `endpoint_name` | requests routed there and not finished (llm-d's name) |
//! | `llm_d_epp_inflight_tokens` | `endpoint_name` | uncached prompt tokens still prefilling + estimated output tokens (llm-d's name) |
//! | `epp_inflight_prompt_tokens` | `endpoint_name` | prompt tokens of the in-flight requests |
//! | `epp_inflight_parked_requests` | `endpoint_name` | of those, requests whose end epp cannot see (the gateway sends no response bodies; [`crate::datastore::load`]) |
//! | `epp_endpoint_health` | `endpoint_name`, `state` | 1 for the endpoint's current state (fresh, degraded, unreachable) |
//! | `epp_endpoint_ejected` | `endpoint_name` | 1 while the endpoint is ejected for answering with server errors |
//! | `epp_endpoint_ejections_total` | `endpoint_name` | times it was ejected (counter) |
//! | `epp_endpoint_prompt_bytes_per_token` | `endpoint_name` | prompt bytes per token of its tokenizer, learned from its responses (once known) |
//! | `epp_endpoint_cache_capacity_scale` | `endpoint_name` | share of its configured cache capacity the prefix index keeps for it, learned from its responses' cached tokens ([`crate::datastore::cache_fit`]) |
//! | `epp_prefill_cost_weight` | `term` | the pool's learned first-token cost weights in prompt tokens, as fitted: `queued_token`, `inflight_request` (the scorer uses at least `decodeTokensPerRequest`), `waiting_request` (once known; [`crate::datastore::ttft_fit`]) |
//!
//! Endpoints that left the pool with requests still in flight are reported until they drain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::datastore::{Candidate, Datastore, Endpoint, Health};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TermLabel {
    term: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    endpoint_name: String,
    state: String,
}

/// Encodes the per-endpoint gauges from the datastore on every scrape.
#[derive(Debug)]
pub struct EndpointCollector {
    datastore: Arc<Datastore>,
    staleness: Duration,
}

impl EndpointCollector {
    pub fn new(datastore: Arc<Datastore>, staleness: Duration) -> Self {
        Self {
            datastore,
            staleness,
        }
    }
}

fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(String, u64)],
) -> Result<(), std::fmt::Error> {
    let gauge_type = ConstGauge::new(0i64).metric_type();
    let mut family = encoder.encode_descriptor(name, help, None, gauge_type)?;
    for (endpoint, value) in values {
        let labels = EndpointLabel {
            endpoint_name: endpoint.clone(),
        };
        let gauge = ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX));
        gauge.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn ejections_family(
    encoder: &mut DescriptorEncoder,
    endpoints: &[Arc<Endpoint>],
) -> Result<(), std::fmt::Error> {
    let counter_type = ConstCounter::new(0u64).metric_type();
    let mut family = encoder.encode_descriptor(
        "epp_endpoint_ejections",
        "Times the endpoint was ejected for answering with server errors",
        None,
        counter_type,
    )?;
    for e in endpoints {
        let labels = EndpointLabel {
            endpoint_name: e.name.clone(),
        };
        ConstCounter::new(e.outlier.total_ejections()).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One float gauge per endpoint that has a `value`.
fn float_family(
    encoder: &mut DescriptorEncoder,
    endpoints: &[Arc<Endpoint>],
    name: &str,
    help: &str,
    value: impl Fn(&Endpoint) -> Option<f64>,
) -> Result<(), std::fmt::Error> {
    let gauge_type = ConstGauge::new(0.0f64).metric_type();
    let mut family = encoder.encode_descriptor(name, help, None, gauge_type)?;
    for e in endpoints {
        if let Some(v) = value(e) {
            let labels = EndpointLabel {
                endpoint_name: e.name.clone(),
            };
            ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

fn learned_families(
    encoder: &mut DescriptorEncoder,
    endpoints: &[Arc<Endpoint>],
) -> Result<(), std::fmt::Error> {
    float_family(
        encoder,
        endpoints,
        "epp_endpoint_prompt_bytes_per_token",
        "Prompt bytes per token of the endpoint's tokenizer, learned from its responses' usage",
        |e| e.tokenization.bytes_per_token(),
    )?;
    float_family(
        encoder,
        endpoints,
        "epp_endpoint_cache_capacity_scale",
        "Share of its configured cache capacity the prefix index keeps for the endpoint, learned from the cached tokens its responses report",
        |e| Some(e.cache_fit.scale()),
    )
}

fn cost_weights_family(
    encoder: &mut DescriptorEncoder,
    datastore: &Datastore,
) -> Result<(), std::fmt::Error> {
    let Some(w) = datastore.ttft_fit().weights() else {
        return Ok(());
    };
    let gauge_type = ConstGauge::new(0.0f64).metric_type();
    let mut family = encoder.encode_descriptor(
        "epp_prefill_cost_weight",
        "First-token cost weights in prompt tokens, learned from the pool's streamed responses",
        None,
        gauge_type,
    )?;
    for (term, value) in [
        ("queued_token", w.queued),
        ("inflight_request", w.inflight_tokens),
        ("waiting_request", w.waiting_tokens),
    ] {
        ConstGauge::new(value).encode(family.encode_family(&TermLabel { term })?)?;
    }
    Ok(())
}

/// epp's own load accounting, per endpoint.
fn load_families(
    encoder: &mut DescriptorEncoder,
    endpoints: &[Arc<Endpoint>],
) -> Result<(), std::fmt::Error> {
    let loads: Vec<_> = endpoints
        .iter()
        .map(|e| (e.name.clone(), e.load.snapshot()))
        .collect();
    let column = |f: fn(&crate::datastore::LoadSnapshot) -> u64| -> Vec<(String, u64)> {
        loads.iter().map(|(n, l)| (n.clone(), f(l))).collect()
    };
    let parked: Vec<_> = endpoints
        .iter()
        .map(|e| (e.name.clone(), e.load.parked() as u64))
        .collect();
    gauge_family(
        encoder,
        "llm_d_epp_inflight_requests",
        "Requests epp routed to the endpoint that have not finished",
        &column(|l| l.requests),
    )?;
    gauge_family(
        encoder,
        "llm_d_epp_inflight_tokens",
        "Uncached prompt tokens still prefilling plus estimated output tokens, per endpoint",
        &column(|l| l.tokens()),
    )?;
    gauge_family(
        encoder,
        "epp_inflight_prompt_tokens",
        "Prompt tokens of the requests in flight, per endpoint",
        &column(|l| l.prompt_tokens),
    )?;
    gauge_family(
        encoder,
        "epp_inflight_parked_requests",
        "In-flight requests whose end epp cannot see (the gateway sends no response bodies), \
         counted until the endpoint's metrics show them done",
        &parked,
    )
}

impl Collector for EndpointCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.datastore.snapshot();
        let now = Instant::now();
        let mut endpoints: Vec<Arc<Endpoint>> = snapshot
            .candidates
            .iter()
            .map(|c| c.endpoint.clone())
            .collect();
        endpoints.extend(self.datastore.draining());
        load_families(&mut encoder, &endpoints)?;
        let ejected: Vec<_> = endpoints
            .iter()
            .map(|e| (e.name.clone(), u64::from(e.outlier.is_ejected(now))))
            .collect();
        gauge_family(
            &mut encoder,
            "epp_endpoint_ejected",
            "1 while the endpoint is ejected for answering with server errors",
            &ejected,
        )?;
        ejections_family(&mut encoder, &endpoints)?;
        learned_families(&mut encoder, &endpoints)?;
        cost_weights_family(&mut encoder, &self.datastore)?;
        let gauge_type = ConstGauge::new(0i64).metric_type();
        let mut family = encoder.encode_descriptor(
            "epp_endpoint_health",
            "1 for the endpoint's metrics state: fresh, degraded (stale, failing or never scraped) or unreachable",
            None,
            gauge_type,
        )?;
        for c in &snapshot.candidates {
            let mut c: Candidate = c.clone();
            c.assess(now, self.staleness);
            let labels = HealthLabels {
                endpoint_name: c.endpoint.name.clone(),
                state: c.health.as_str().to_owned(),
            };
            ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Health of every endpoint right now (for logs and tests).
pub fn health_of(datastore: &Datastore, staleness: Duration) -> Vec<(String, Health)> {
    let now = Instant::now();
    datastore
        .snapshot()
        .candidates
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c.assess(now, staleness);
            (c.endpoint.name.clone(), c.health)
        })
        .collect()
}
