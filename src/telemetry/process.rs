//! Process-wide gauges read at each `/metrics` scrape.
//!
//! | metric | value |
//! |---|---|
//! | `epp_inflight_request_body_bytes` | request-body bytes epp holds right now (all requests) |
//! | `epp_request_body_budget_bytes` | `--max-inflight-body-bytes`: past it requests get 429 |
//! | `epp_allocated_bytes_total`, `epp_allocations_total` | allocation counters (only in builds with the `alloc-stats` feature) |

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use crate::extproc::body::BodyBudget;

/// Encodes the process gauges.
#[derive(Debug)]
pub struct ProcessCollector {
    budget: Arc<BodyBudget>,
}

impl ProcessCollector {
    pub fn new(budget: Arc<BodyBudget>) -> Self {
        Self { budget }
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: usize,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            "epp_inflight_request_body_bytes",
            "Request-body bytes held by epp right now, all requests together",
            self.budget.in_use(),
        )?;
        gauge(
            &mut encoder,
            "epp_request_body_budget_bytes",
            "Request-body bytes epp may hold at once (past it: 429)",
            self.budget.limit(),
        )?;
        #[cfg(feature = "alloc-stats")]
        for (name, help, value) in [
            (
                "epp_allocated_bytes",
                "Bytes allocated since start (alloc-stats builds)",
                super::alloc::allocated_bytes(),
            ),
            (
                "epp_allocations",
                "Allocations since start (alloc-stats builds)",
                super::alloc::allocations(),
            ),
        ] {
            use prometheus_client::metrics::counter::ConstCounter;
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}
