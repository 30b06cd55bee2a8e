//! Turns one `plugins[]` entry of an EndpointPickerConfig into a plugin instance: the plugin
//! types epp knows, their parameters (names and defaults as in GIE / llm-d) and their checks.
//! Each plugin's algorithm is documented in its file under `src/scheduling/plugins/`.

use std::sync::Arc;
use std::time::Duration;

use super::params::Params;
use super::picker_config::PickerConfigError;
use crate::index::hash::CHARS_PER_TOKEN;
use crate::scheduling::framework::{Filter, Picker, Scorer};
use crate::scheduling::plugins::{
    active_request::ActiveRequestScorer,
    inflight_load::{self, InflightLoadProducer},
    kv_cache::KvCacheScorer,
    least_kv_cache::LeastKvCacheFilter,
    least_queue::LeastQueueFilter,
    load_aware::{self, LoadAwareScorer},
    lora_affinity::LoraAffinityScorer,
    lora_affinity_filter::{self, LoraAffinityFilter},
    low_queue::{self, LowQueueFilter},
    max_score::MaxScorePicker,
    prefill_cost::{self, PrefillCostScorer},
    prefix::{PrefixCachePlugin, PrefixConfig, PrefixObserver},
    prefix_affinity_filter::PrefixAffinityFilter,
    queue::QueueScorer,
    random::RandomPicker,
    running_requests::RunningRequestsScorer,
    token_load::TokenLoadScorer,
    utilization::{self, UtilizationDetector},
    weighted_random::WeightedRandomPicker,
};

/// An instantiated plugin, by role.
#[derive(Clone)]
pub enum Built {
    /// The prefix plugin: produces the prefix match (and records decisions); `scores` when it
    /// was configured as `prefix-cache-scorer` rather than `approx-prefix-cache-producer`.
    Prefix {
        plugin: Arc<PrefixCachePlugin>,
        scores: bool,
    },
    Scorer(Arc<dyn Scorer>),
    Filter(Arc<dyn Filter>),
    Picker(Arc<dyn Picker>),
    /// Sets how routed requests count against their endpoint's load.
    LoadProducer(Arc<InflightLoadProducer>),
    /// Accepted; epp runs one profile per request.
    ProfileHandler,
    /// `metrics-data-source`.
    MetricsSource(super::datalayer::MetricsSource),
    /// `core-metrics-extractor`.
    MetricsExtractor(crate::scrape::mapping::Mappings),
    /// `utilization-detector`: a saturation detector, and a filter when a profile lists it.
    Utilization(Arc<UtilizationDetector>),
    /// `openai-parser` (epp's request parser; the only one).
    Parser,
}

impl Built {
    pub fn is_scorer(&self) -> bool {
        matches!(self, Built::Scorer(_) | Built::Prefix { scores: true, .. })
    }
}

/// Builds a plugin of type `kind` from its parameters; `None` for a type this factory does
/// not know (the caller reports it, or handles decision trees itself).
pub fn build(
    kind: &str,
    p: &mut Params<'_>,
    observer: Option<&Arc<dyn PrefixObserver>>,
) -> Result<Option<Built>, PickerConfigError> {
    let built = match kind {
        "prefix-cache-scorer" | "approx-prefix-cache-producer" => {
            let mut plugin = PrefixCachePlugin::new(prefix_config(p)?);
            if let Some(o) = observer {
                plugin = plugin.with_observer(o.clone());
            }
            Built::Prefix {
                plugin: Arc::new(plugin),
                scores: kind == "prefix-cache-scorer",
            }
        }
        "queue-scorer" => Built::Scorer(Arc::new(QueueScorer)),
        "kv-cache-utilization-scorer" | "kv-cache-scorer" => Built::Scorer(Arc::new(KvCacheScorer)),
        "lora-affinity-scorer" => Built::Scorer(Arc::new(LoraAffinityScorer)),
        "token-load-scorer" => Built::Scorer(Arc::new(token_load(p)?)),
        "active-request-scorer" => Built::Scorer(Arc::new(active_request(p)?)),
        "running-requests-size-scorer" => Built::Scorer(Arc::new(RunningRequestsScorer)),
        prefill_cost::TYPE => Built::Scorer(Arc::new(PrefillCostScorer {
            decode_tokens_per_request: p
                .number("decodeTokensPerRequest")?
                .unwrap_or(prefill_cost::DEFAULT_DECODE_TOKENS_PER_REQUEST),
            saturation_ratio: p
                .number("saturationRatio")?
                .unwrap_or(prefill_cost::DEFAULT_SATURATION_RATIO),
            saturation_margin: p
                .number("saturationMargin")?
                .unwrap_or(prefill_cost::DEFAULT_SATURATION_MARGIN),
            saturation_window: seconds(p, "saturationWindowSeconds")?
                .unwrap_or(prefill_cost::DEFAULT_SATURATION_WINDOW),
            learn_weights: p.boolean("learnWeights")?.unwrap_or(true),
            price_evictions: p.boolean("priceEvictions")?.unwrap_or(true),
        })),
        "load-aware-scorer" => Built::Scorer(Arc::new(LoadAwareScorer {
            threshold: p
                .positive("threshold")?
                .map_or(load_aware::DEFAULT_THRESHOLD, clamp_u32),
        })),
        inflight_load::TYPE | inflight_load::TYPE_ALIAS => {
            Built::LoadProducer(Arc::new(inflight_load_producer(p)?))
        }
        "prefix-cache-affinity-filter" => Built::Filter(Arc::new(prefix_affinity(p)?)),
        "low-queue-filter" => Built::Filter(Arc::new(LowQueueFilter {
            threshold: p
                .positive("threshold")?
                .map_or(low_queue::DEFAULT_THRESHOLD, clamp_u32),
        })),
        "lora-affinity-filter" => Built::Filter(Arc::new(LoraAffinityFilter {
            threshold: p
                .fraction("threshold")?
                .unwrap_or(lora_affinity_filter::DEFAULT_THRESHOLD),
        })),
        "least-queue-filter" => Built::Filter(Arc::new(LeastQueueFilter)),
        "least-kv-cache-filter" => Built::Filter(Arc::new(LeastKvCacheFilter)),
        "max-score-picker" => Built::Picker(Arc::new(MaxScorePicker {
            max_endpoints: max_endpoints(p)?,
        })),
        "random-picker" => Built::Picker(Arc::new(RandomPicker {
            max_endpoints: max_endpoints(p)?,
        })),
        "weighted-random-picker" => Built::Picker(Arc::new(WeightedRandomPicker {
            max_endpoints: max_endpoints(p)?,
        })),
        "single-profile-handler" => Built::ProfileHandler,
        "metrics-data-source" => Built::MetricsSource(super::datalayer::metrics_source(p)?),
        "core-metrics-extractor" => {
            Built::MetricsExtractor(super::datalayer::metrics_extractor(p)?)
        }
        utilization::TYPE => Built::Utilization(Arc::new(utilization_detector(p)?)),
        "openai-parser" => Built::Parser,
        _ => return Ok(None),
    };
    Ok(Some(built))
}

/// A positive number of seconds.
fn seconds<'a>(p: &mut Params<'a>, key: &'a str) -> Result<Option<Duration>, PickerConfigError> {
    match p.number(key)? {
        None => Ok(None),
        Some(s) => Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .map(Some)
            .ok_or_else(|| {
                p.error(
                    key,
                    format!("must be a positive number of seconds, got {s}"),
                )
            }),
    }
}

/// `utilization-detector` parameters.
fn utilization_detector(p: &mut Params<'_>) -> Result<UtilizationDetector, PickerConfigError> {
    let mut d = UtilizationDetector::default();
    if let Some(q) = p.positive("queueDepthThreshold")? {
        d.queue_threshold = clamp_u32(q);
    }
    if let Some(kv) = p.number("kvCacheUtilThreshold")? {
        if !(kv > 0.0 && kv <= 1.0) {
            return Err(p.error("kvCacheUtilThreshold", "must be in (0, 1]"));
        }
        d.kv_threshold = kv;
    }
    if let Some(s) = p.string("metricsStalenessThreshold")? {
        d.staleness = crate::duration::parse(&s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| p.error("metricsStalenessThreshold", "must be a positive duration"))?;
    }
    if let Some(h) = p.number("headroom")? {
        if !(h >= 0.0 && h.is_finite()) {
            return Err(p.error("headroom", "must be ≥ 0"));
        }
        d.headroom = h;
    }
    Ok(d)
}

fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn max_endpoints(p: &mut Params<'_>) -> Result<usize, PickerConfigError> {
    Ok(p.positive("maxNumOfEndpoints")?.unwrap_or(1))
}

/// `prefix-cache-scorer` / `approx-prefix-cache-producer` parameters.
fn prefix_config(p: &mut Params<'_>) -> Result<PrefixConfig, PickerConfigError> {
    let mut c = PrefixConfig::default();
    let bytes = p.positive("hashBlockSize")?.or(p.positive("blockSize")?);
    let tokens = p.positive("blockSizeTokens")?;
    c.hasher.block_size = match (bytes, tokens) {
        (Some(_), Some(_)) => {
            return Err(p.error(
                "blockSizeTokens",
                "give the block size in bytes (blockSize) or in tokens, not both",
            ));
        }
        (Some(b), None) => b,
        (None, Some(t)) => t * CHARS_PER_TOKEN,
        (None, None) => c.hasher.block_size,
    };
    if let Some(n) = p.positive("maxPrefixBlocksToMatch")? {
        c.hasher.max_blocks = n;
    }
    // Dense blocks cover the head; maxPrefixTokensToMatch is the whole coverage (0: the dense
    // head only, as in GIE), the coarse tail filling the rest (see index::hash).
    if let Some(t) = p.count("maxPrefixTokensToMatch")? {
        c.hasher.max_bytes = t.saturating_mul(CHARS_PER_TOKEN);
        if t > 0 {
            let dense = c.hasher.max_bytes.div_ceil(c.hasher.block_size);
            c.hasher.max_blocks = c.hasher.max_blocks.min(dense);
        }
    }
    if let Some(n) = p.positive("lruCapacityPerServer")? {
        c.lru_capacity_per_server = n;
    }
    if let Some(b) = p.boolean("autoTune")? {
        c.auto_tune = b;
    }
    if let Some(b) = p.boolean("respectEnablePrefixCaching")? {
        c.respect_enable_prefix_caching = b;
    }
    if let Some(b) = p.boolean("learnCapacity")? {
        c.learn_capacity = b;
    }
    // llm-d's producer reference: epp has one prefix match per profile.
    p.string("prefixMatchInfoProducerName")?;
    Ok(c)
}

fn prefix_affinity(p: &mut Params<'_>) -> Result<PrefixAffinityFilter, PickerConfigError> {
    let d = PrefixAffinityFilter::default();
    let f = PrefixAffinityFilter {
        affinity_threshold: p
            .fraction("affinityThreshold")?
            .unwrap_or(d.affinity_threshold),
        exploration_probability: p
            .fraction("explorationProbability")?
            .unwrap_or(d.exploration_probability),
        max_ttft_penalty_ms: p
            .number("maxTTFTPenaltyMs")?
            .unwrap_or(d.max_ttft_penalty_ms),
        peak_prefill_throughput: p
            .number("peakPrefillThroughput")?
            .unwrap_or(d.peak_prefill_throughput),
    };
    match p.string("ttftSource")?.as_deref() {
        None | Some("prefillThroughput") => {}
        Some("latencyPredictor") => {
            return Err(p.error(
                "ttftSource",
                "latencyPredictor needs llm-d's latency predictor, which epp does not run; use prefillThroughput",
            ));
        }
        Some(other) => {
            return Err(p.error(
                "ttftSource",
                format!("must be prefillThroughput or latencyPredictor, got {other:?}"),
            ));
        }
    }
    if f.max_ttft_penalty_ms > 0.0 && f.peak_prefill_throughput <= 0.0 {
        return Err(p.error(
            "peakPrefillThroughput",
            "must be > 0 when maxTTFTPenaltyMs is set",
        ));
    }
    for key in [
        "prefixMatchInfoProducerName",
        "latencyPredictionInfoProducerName",
        "inFlightLoadProducerName",
    ] {
        p.string(key)?;
    }
    Ok(f)
}

fn token_load(p: &mut Params<'_>) -> Result<TokenLoadScorer, PickerConfigError> {
    let d = TokenLoadScorer::default();
    p.string("inFlightLoadProducerName")?;
    Ok(TokenLoadScorer {
        queue_threshold_tokens: p
            .positive("queueThresholdTokens")?
            .map_or(d.queue_threshold_tokens, |n| n as u64),
    })
}

fn active_request(p: &mut Params<'_>) -> Result<ActiveRequestScorer, PickerConfigError> {
    let d = ActiveRequestScorer::default();
    if p.string("requestTimeout")?.is_some() {
        tracing::warn!(
            "active-request-scorer: requestTimeout is ignored (epp releases a request when its stream ends)"
        );
    }
    p.string("inFlightLoadProducerName")?;
    Ok(ActiveRequestScorer {
        idle_threshold: p
            .count("idleThreshold")?
            .map_or(d.idle_threshold, |n| n as u64),
        max_busy_score: p.fraction("maxBusyScore")?.unwrap_or(d.max_busy_score),
    })
}

fn inflight_load_producer(p: &mut Params<'_>) -> Result<InflightLoadProducer, PickerConfigError> {
    let d = InflightLoadProducer::default();
    Ok(InflightLoadProducer {
        add_estimated_output_tokens: p
            .boolean("addEstimatedOutputTokens")?
            .unwrap_or(d.add_estimated_output_tokens),
        output_ratio: p.number("outputRatio")?.unwrap_or(d.output_ratio),
        max_estimated_output_tokens: p.count("maxEstimatedOutputTokens")?.map(|n| n as u64),
    })
}
