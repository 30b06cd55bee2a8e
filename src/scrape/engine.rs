//! Turning a model server's Prometheus text page into [`EndpointMetrics`], by the engine's
//! [`EngineMapping`] (see [`super::mapping`] for the names per engine).
//!
//! Gauges with several series (one per model name) are summed (queues) or averaged (KV use);
//! a spec with label matchers keeps only the series that carry those labels. LoRA state comes
//! from a `vllm:lora_requests_info`-style metric: the series with the largest value (its
//! timestamp) wins; labels `running_lora_adapters` and `waiting_lora_adapters` are comma lists,
//! `max_lora` the slot count. Every family is optional: one the page lacks (some engines export
//! a series only after their first request) leaves that value absent, which is not an error.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use prom_text_format_parser::{Metric, Sample, Scrape};

use super::mapping::{CacheInfo, EngineMapping, Mappings, MetricSpec};
use crate::datastore::EndpointMetrics;

/// Why a metrics page could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("invalid Prometheus text: {0}")]
    Parse(String),
}

fn label<'a>(s: &'a Sample, key: &str) -> Option<&'a str> {
    s.labels
        .iter()
        .find(|l| l.key == key)
        .map(|l| l.value.as_str())
}

/// The cache-config label saying whether the engine reuses cached prefixes (vLLM exports every
/// field of its `CacheConfig` as a label of `vllm:cache_config_info`).
const PREFIX_CACHING_LABEL: &str = "enable_prefix_caching";

/// A boolean as Python prints it (`True`/`False`), or in any case.
fn python_bool(v: &str) -> Option<bool> {
    if v.eq_ignore_ascii_case("true") {
        Some(true)
    } else if v.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

fn value(s: &Sample) -> Option<f64> {
    s.value.value.parse::<f64>().ok().filter(|v| v.is_finite())
}

fn list(s: Option<&str>) -> Vec<String> {
    s.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A parsed page, looked up by spec.
struct Page {
    scrape: Scrape,
}

impl Page {
    fn family(&self, name: &str) -> Option<&Metric> {
        self.scrape.metrics.iter().find(|m| m.name == name)
    }

    /// The samples of `spec` (its family's series carrying every label it names); `None`
    /// when the family is not on the page.
    fn samples<'a>(&'a self, spec: &'a MetricSpec) -> Option<impl Iterator<Item = &'a Sample>> {
        let family = self.family(&spec.name)?;
        Some(family.samples.iter().filter(move |s| {
            spec.labels
                .iter()
                .all(|(k, v)| label(s, k) == Some(v.as_str()))
        }))
    }

    /// The values of the first spec whose family is present.
    fn values(&self, specs: &[MetricSpec]) -> Option<Vec<f64>> {
        specs
            .iter()
            .find_map(|spec| self.samples(spec))
            .map(|samples| samples.filter_map(value).collect())
    }

    fn sum(&self, specs: &[MetricSpec]) -> Option<u32> {
        let v = self.values(specs)?;
        Some(v.iter().sum::<f64>().clamp(0.0, f64::from(u32::MAX)) as u32)
    }

    fn first(&self, spec: &Option<MetricSpec>) -> Option<f64> {
        self.samples(spec.as_ref()?)?.find_map(value)
    }
}

/// The load families (waiting, running, KV use) that a parsed page lacked.
pub fn absent_families<'a>(mapping: &'a EngineMapping, m: &EndpointMetrics) -> Vec<&'a str> {
    let mut out = Vec::new();
    let first = |specs: &'a [MetricSpec]| specs.first().map(|s| s.name.as_str());
    if m.waiting_queue.is_none() {
        out.extend(first(&mapping.queued));
    }
    if m.running.is_none() {
        out.extend(first(&mapping.running));
    }
    if m.kv_cache_usage.is_none() {
        out.extend(first(&mapping.kv_usage));
    }
    out
}

/// The metric name a line of the text format is about (`# HELP/TYPE name …` or a sample).
fn line_metric(line: &str) -> Option<&str> {
    let line = line.trim_start();
    if let Some(rest) = line.strip_prefix('#') {
        let mut words = rest.split_whitespace();
        return match words.next() {
            Some("HELP" | "TYPE") => words.next(),
            _ => None,
        };
    }
    let end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    (end > 0).then(|| &line[..end])
}

/// Keeps only the lines of the families epp reads. Engines expose hundreds of series, and a
/// family the parser rejects (e.g. a counter whose `# TYPE` omits `_total`) must not cost epp
/// the ones it needs.
fn relevant_lines(text: &str, wanted: &[&str]) -> String {
    let mut out = String::with_capacity(1024);
    for line in text.lines() {
        if line_metric(line).is_some_and(|m| wanted.contains(&m)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The engine whose load families a page shows, for an endpoint whose engine nobody named:
/// `None` while the page shows one of `current`'s (the default engine is right) or no
/// engine's at all (an engine before its first request), else the engine with the most load
/// families on the page (ties: the first by name). So an sglang or TensorRT-LLM fleet behind
/// a config that names no engine is read by its own metric names instead of going unseen.
pub fn recognize(
    mappings: &Mappings,
    current: &EngineMapping,
    text: &str,
) -> Option<Arc<EngineMapping>> {
    let on_page: HashSet<&str> = text.lines().filter_map(line_metric).collect();
    let shown = |m: &EngineMapping| m.load_names().filter(|n| on_page.contains(n)).count();
    if shown(current) > 0 {
        return None;
    }
    let mut best: Option<(usize, Arc<EngineMapping>)> = None;
    for m in mappings.all() {
        let n = shown(&m);
        if n > best.as_ref().map_or(0, |(b, _)| *b) {
            best = Some((n, m));
        }
    }
    best.map(|(_, m)| m)
}

/// Parses one scrape of a page by `mapping`.
pub fn parse_metrics(
    mapping: &EngineMapping,
    text: &str,
    now: Instant,
) -> Result<EndpointMetrics, MetricsError> {
    let page = relevant_lines(text, &mapping.metric_names());
    if page.is_empty() {
        // None of the families epp reads (yet): every value absent.
        return Ok(EndpointMetrics {
            updated: Some(now),
            ..Default::default()
        });
    }
    let page = Page {
        scrape: Scrape::parse(&page).map_err(|e| MetricsError::Parse(format!("{e:?}")))?,
    };
    let mut out = EndpointMetrics {
        waiting_queue: page.sum(&mapping.queued),
        running: page.sum(&mapping.running),
        kv_cache_usage: page
            .values(&mapping.kv_usage)
            .filter(|v| !v.is_empty())
            .map(|v| (v.iter().sum::<f64>() / v.len() as f64).clamp(0.0, 1.0)),
        updated: Some(now),
        ..Default::default()
    };
    read_cache_info(&page, &mapping.cache, &mut out);
    if let Some(spec) = &mapping.lora {
        read_lora(&page, spec, &mut out);
    }
    Ok(out)
}

fn read_cache_info(page: &Page, cache: &CacheInfo, out: &mut EndpointMetrics) {
    match cache {
        CacheInfo::None => {}
        CacheInfo::Labels {
            spec,
            block_size_label,
            blocks_label,
        } => {
            if let Some(s) = page.samples(spec).and_then(|mut it| it.next()) {
                out.block_size_tokens = label(s, block_size_label).and_then(|v| v.parse().ok());
                out.num_gpu_blocks = label(s, blocks_label).and_then(|v| v.parse().ok());
                out.prefix_caching = label(s, PREFIX_CACHING_LABEL).and_then(python_bool);
            }
        }
        CacheInfo::Gauges { block_size, blocks } => {
            out.block_size_tokens = page
                .first(block_size)
                .filter(|v| *v >= 1.0)
                .map(|v| v.min(f64::from(u32::MAX)) as u32);
            out.num_gpu_blocks = page.first(blocks).filter(|v| *v >= 1.0).map(|v| v as u64);
        }
    }
}

fn read_lora(page: &Page, spec: &MetricSpec, out: &mut EndpointMetrics) {
    let Some(samples) = page.samples(spec) else {
        return;
    };
    let latest = samples.max_by(|a, b| {
        let v = |s: &Sample| value(s).unwrap_or(f64::NEG_INFINITY);
        v(a).total_cmp(&v(b))
    });
    if let Some(s) = latest {
        out.active_loras = list(label(s, "running_lora_adapters"));
        out.waiting_loras = list(label(s, "waiting_lora_adapters"));
        out.max_lora = label(s, "max_lora")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::mapping::Mappings;

    fn engine(name: &str) -> std::sync::Arc<EngineMapping> {
        Mappings::default().get(name)
    }

    const VLLM: &str = r#"# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 3.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.25
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 1.6e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters="c"} 1.7e+09
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="1000",enable_prefix_caching="True"} 1.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 2.0
vllm:time_to_first_token_seconds_sum{model_name="m"} 0.3
vllm:time_to_first_token_seconds_count{model_name="m"} 2.0
"#;

    #[test]
    fn vllm_page() {
        let now = Instant::now();
        let m = parse_metrics(&engine("vllm"), VLLM, now).unwrap();
        assert_eq!(m.waiting_queue, Some(3));
        assert_eq!(m.running, Some(2));
        assert_eq!(m.kv_cache_usage, Some(0.25));
        assert_eq!(m.active_loras, vec!["a", "b"]);
        assert_eq!(m.waiting_loras, vec!["c"]);
        assert_eq!(m.max_lora, 2);
        assert_eq!(m.block_size_tokens, Some(16));
        assert_eq!(m.num_gpu_blocks, Some(1000));
        assert_eq!(m.prefix_caching, Some(true));
        assert_eq!(m.updated, Some(now));
    }

    #[test]
    fn the_cache_config_says_whether_prefixes_are_reused() {
        let page = |flag: &str| {
            format!(
                "vllm:cache_config_info{{block_size=\"16\",enable_prefix_caching=\"{flag}\",num_gpu_blocks=\"9\"}} 1.0\n"
            )
        };
        let read = |text: &str| {
            parse_metrics(&engine("vllm"), text, Instant::now())
                .unwrap()
                .prefix_caching
        };
        assert_eq!(read(&page("False")), Some(false));
        assert_eq!(read(&page("true")), Some(true));
        assert_eq!(
            read(&page("maybe")),
            None,
            "a value that is no boolean says nothing"
        );
        assert_eq!(
            read("vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"9\"} 1.0\n"),
            None,
            "without the label (the llm-d inference simulator) nothing is known"
        );
    }

    #[test]
    fn older_vllm_kv_name() {
        let text = "vllm:num_requests_waiting 1\nvllm:gpu_cache_usage_perc 0.5\n";
        let m = parse_metrics(&engine("vllm"), text, Instant::now()).unwrap();
        assert_eq!(m.kv_cache_usage, Some(0.5));
        assert_eq!(m.running, None);
    }

    #[test]
    fn sglang_and_trtllm_pages() {
        let text = "sglang:num_queue_reqs 4\nsglang:num_running_reqs 1\nsglang:token_usage 0.5\nsglang:cache_config_info{page_size=\"1\",num_pages=\"5000\"} 1\n";
        let m = parse_metrics(&engine("sglang"), text, Instant::now()).unwrap();
        assert_eq!((m.waiting_queue, m.running), (Some(4), Some(1)));
        assert_eq!(m.num_gpu_blocks, Some(5000));
        let text = "trtllm_num_requests_waiting 2\ntrtllm_kv_cache_utilization 0.1\ntrtllm_kv_cache_tokens_per_block 32\ntrtllm_kv_cache_max_blocks 900\n";
        let m = parse_metrics(&engine("trtllm-serve"), text, Instant::now()).unwrap();
        assert_eq!(m.waiting_queue, Some(2));
        assert_eq!(m.block_size_tokens, Some(32));
        assert_eq!(m.num_gpu_blocks, Some(900));
    }

    #[test]
    fn a_page_is_recognized_by_the_engine_whose_load_families_it_shows() {
        let all = Mappings::default();
        let vllm = engine("vllm");
        let name = |text: &str| recognize(&all, &vllm, text).map(|m| m.name.clone());
        let sglang = "# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs{model_name=\"m\"} 4\nsglang:token_usage 0.5\n";
        assert_eq!(name(sglang).as_deref(), Some("sglang"));
        let trtllm = "trtllm_num_requests_waiting 2\ntrtllm_kv_cache_utilization 0.1\n";
        assert_eq!(name(trtllm).as_deref(), Some("trtllm-serve"));
        assert_eq!(name(VLLM), None, "the default engine's page");
        assert_eq!(
            name(&format!("{VLLM}{sglang}")),
            None,
            "a page with the default engine's families keeps it"
        );
        assert_eq!(
            name("process_start_time_seconds 0\n"),
            None,
            "no engine's families yet (before a first request)"
        );
        assert_eq!(
            name("# HELP sglang:num_queue_reqs only described\n"),
            Some("sglang".into()),
            "a family's HELP line shows it"
        );
    }

    #[test]
    fn unrelated_families_the_parser_rejects_do_not_matter() {
        // Regression: prometheus-client writes counters as `# TYPE x counter` + `x_total`,
        // which the parser rejects; that used to fail the whole scrape.
        let text = format!(
            "# TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total 5\n{VLLM}"
        );
        let m = parse_metrics(&engine("vllm"), &text, Instant::now()).unwrap();
        assert_eq!(m.waiting_queue, Some(3));
        assert_eq!(line_metric("# HELP a:b text"), Some("a:b"));
        assert_eq!(line_metric("a{x=\"1\"} 2"), Some("a"));
        assert_eq!(line_metric("# just a comment"), None);
    }

    #[test]
    fn absent_families_are_absent_values_not_errors() {
        // Regression (issue 7): a page without the vllm:* families (an engine before its first
        // request) used to fail the scrape, so the endpoint went stale and lost all traffic.
        let m = parse_metrics(&engine("vllm"), "", Instant::now()).unwrap();
        assert_eq!(
            (m.waiting_queue, m.running, m.kv_cache_usage),
            (None, None, None)
        );
        assert!(m.updated.is_some());
        let m = parse_metrics(
            &engine("vllm"),
            "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3\nvllm:kv_cache_usage_perc 0.1\n",
            Instant::now(),
        )
        .unwrap();
        assert_eq!((m.waiting_queue, m.kv_cache_usage), (None, Some(0.1)));
    }

    #[test]
    fn garbage_in_a_wanted_family_is_an_error() {
        assert!(
            parse_metrics(
                &engine("vllm"),
                "vllm:num_requests_waiting{{{ not prometheus",
                Instant::now()
            )
            .is_err()
        );
    }

    #[test]
    fn label_matchers_select_series_triton_style() {
        let text = "nv_trt_llm_request_metrics{request_type=\"waiting\"} 7\n\
                    nv_trt_llm_request_metrics{request_type=\"scheduled\"} 3\n\
                    nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"} 0.4\n\
                    nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"tokens_per\"} 64\n\
                    nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\"} 1200\n";
        let m = parse_metrics(&engine("triton-tensorrt-llm"), text, Instant::now()).unwrap();
        assert_eq!((m.waiting_queue, m.running), (Some(7), Some(3)));
        assert_eq!(m.kv_cache_usage, Some(0.4));
        assert_eq!(
            (m.block_size_tokens, m.num_gpu_blocks),
            (Some(64), Some(1200))
        );
    }
}
