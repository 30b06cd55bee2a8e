//! Model-server metric names per engine, and turning a Prometheus text page into
//! [`EndpointMetrics`].
//!
//! | engine | waiting | running | KV use (0–1) | cache config |
//! |---|---|---|---|---|
//! | vllm | `vllm:num_requests_waiting` | `vllm:num_requests_running` | `vllm:kv_cache_usage_perc` (older: `vllm:gpu_cache_usage_perc`) | `vllm:cache_config_info{block_size,num_gpu_blocks}` |
//! | sglang | `sglang:num_queue_reqs` | `sglang:num_running_reqs` | `sglang:token_usage` | `sglang:cache_config_info{page_size,num_pages}` |
//! | trtllm-serve | `trtllm_num_requests_waiting` | `trtllm_num_requests_running` | `trtllm_kv_cache_utilization` | `trtllm_kv_cache_tokens_per_block`, `trtllm_kv_cache_max_blocks` |
//!
//! Gauges with several series (one per model name) are summed (queues) or averaged (KV use).
//! LoRA state comes from `vllm:lora_requests_info`: the series with the largest value (its
//! timestamp) wins; labels `running_lora_adapters` and `waiting_lora_adapters` are comma lists,
//! `max_lora` the slot count. Every family is optional: one the page lacks (some engines export
//! a series only after their first request) leaves that value absent, which is not an error.

use std::time::Instant;

use prom_text_format_parser::{Metric, Scrape};

use crate::datastore::{EndpointMetrics, EngineType};

/// Why a metrics page could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("invalid Prometheus text: {0}")]
    Parse(String),
}

struct Names {
    waiting: &'static str,
    running: &'static str,
    kv: &'static [&'static str],
}

fn names(engine: EngineType) -> Names {
    match engine {
        EngineType::Vllm => Names {
            waiting: "vllm:num_requests_waiting",
            running: "vllm:num_requests_running",
            kv: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        },
        EngineType::Sglang => Names {
            waiting: "sglang:num_queue_reqs",
            running: "sglang:num_running_reqs",
            kv: &["sglang:token_usage"],
        },
        EngineType::TrtllmServe => Names {
            waiting: "trtllm_num_requests_waiting",
            running: "trtllm_num_requests_running",
            kv: &["trtllm_kv_cache_utilization"],
        },
    }
}

fn values<'a>(m: &'a Metric) -> impl Iterator<Item = f64> + 'a {
    m.samples
        .iter()
        .filter_map(|s| s.value.value.parse::<f64>().ok())
        .filter(|v| v.is_finite())
}

fn label<'a>(s: &'a prom_text_format_parser::Sample, key: &str) -> Option<&'a str> {
    s.labels
        .iter()
        .find(|l| l.key == key)
        .map(|l| l.value.as_str())
}

fn list(s: Option<&str>) -> Vec<String> {
    s.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The load families (waiting, running, KV use) that a parsed page lacked.
pub fn absent_families(engine: EngineType, m: &EndpointMetrics) -> Vec<&'static str> {
    let n = names(engine);
    let mut out = Vec::new();
    if m.waiting_queue.is_none() {
        out.push(n.waiting);
    }
    if m.running.is_none() {
        out.push(n.running);
    }
    if m.kv_cache_usage.is_none() {
        out.push(n.kv[0]);
    }
    out
}

/// Every metric family read for `engine`.
fn wanted(engine: EngineType) -> Vec<&'static str> {
    let n = names(engine);
    let mut v = vec![n.waiting, n.running, "vllm:lora_requests_info"];
    v.extend_from_slice(n.kv);
    v.extend_from_slice(match engine {
        EngineType::Vllm => &["vllm:cache_config_info"],
        EngineType::Sglang => &["sglang:cache_config_info"],
        EngineType::TrtllmServe => &[
            "trtllm_kv_cache_tokens_per_block",
            "trtllm_kv_cache_max_blocks",
        ],
    });
    v
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

/// Parses one scrape of `engine`'s `/metrics`.
pub fn parse_metrics(
    engine: EngineType,
    text: &str,
    now: Instant,
) -> Result<EndpointMetrics, MetricsError> {
    let page = relevant_lines(text, &wanted(engine));
    if page.is_empty() {
        // None of the families epp reads (yet): every value absent.
        return Ok(EndpointMetrics {
            updated: Some(now),
            ..Default::default()
        });
    }
    let scrape = Scrape::parse(&page).map_err(|e| MetricsError::Parse(format!("{e:?}")))?;
    let find = |name: &str| scrape.metrics.iter().find(|m| m.name == name);
    let n = names(engine);

    let sum = |name: &str| find(name).map(|m| values(m).sum::<f64>().max(0.0));
    let kv_values: Option<Vec<f64>> =
        n.kv.iter()
            .find_map(|name| find(name))
            .map(|m| values(m).collect());
    let mut out = EndpointMetrics {
        waiting_queue: sum(n.waiting).map(|v| v.min(f64::from(u32::MAX)) as u32),
        running: sum(n.running).map(|v| v.min(f64::from(u32::MAX)) as u32),
        kv_cache_usage: kv_values
            .filter(|v| !v.is_empty())
            .map(|v| (v.iter().sum::<f64>() / v.len() as f64).clamp(0.0, 1.0)),
        updated: Some(now),
        ..Default::default()
    };

    match engine {
        EngineType::Vllm => {
            if let Some(s) = find("vllm:cache_config_info").and_then(|m| m.samples.first()) {
                out.block_size_tokens = label(s, "block_size").and_then(|v| v.parse().ok());
                out.num_gpu_blocks = label(s, "num_gpu_blocks").and_then(|v| v.parse().ok());
            }
        }
        EngineType::Sglang => {
            if let Some(s) = find("sglang:cache_config_info").and_then(|m| m.samples.first()) {
                out.block_size_tokens = label(s, "page_size").and_then(|v| v.parse().ok());
                out.num_gpu_blocks = label(s, "num_pages").and_then(|v| v.parse().ok());
            }
        }
        EngineType::TrtllmServe => {
            out.block_size_tokens = find("trtllm_kv_cache_tokens_per_block")
                .and_then(|m| values(m).next())
                .map(|v| v as u32);
            out.num_gpu_blocks = find("trtllm_kv_cache_max_blocks")
                .and_then(|m| values(m).next())
                .map(|v| v as u64);
        }
    }

    if let Some(lora) = find("vllm:lora_requests_info") {
        let latest = lora.samples.iter().max_by(|a, b| {
            let v = |s: &prom_text_format_parser::Sample| {
                s.value.value.parse::<f64>().unwrap_or(f64::NEG_INFINITY)
            };
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
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let m = parse_metrics(EngineType::Vllm, VLLM, now).unwrap();
        assert_eq!(m.waiting_queue, Some(3));
        assert_eq!(m.running, Some(2));
        assert_eq!(m.kv_cache_usage, Some(0.25));
        assert_eq!(m.active_loras, vec!["a", "b"]);
        assert_eq!(m.waiting_loras, vec!["c"]);
        assert_eq!(m.max_lora, 2);
        assert_eq!(m.block_size_tokens, Some(16));
        assert_eq!(m.num_gpu_blocks, Some(1000));
        assert_eq!(m.updated, Some(now));
    }

    #[test]
    fn older_vllm_kv_name() {
        let text = "vllm:num_requests_waiting 1\nvllm:gpu_cache_usage_perc 0.5\n";
        let m = parse_metrics(EngineType::Vllm, text, Instant::now()).unwrap();
        assert_eq!(m.kv_cache_usage, Some(0.5));
        assert_eq!(m.running, None);
    }

    #[test]
    fn sglang_and_trtllm_pages() {
        let text = "sglang:num_queue_reqs 4\nsglang:num_running_reqs 1\nsglang:token_usage 0.5\nsglang:cache_config_info{page_size=\"1\",num_pages=\"5000\"} 1\n";
        let m = parse_metrics(EngineType::Sglang, text, Instant::now()).unwrap();
        assert_eq!((m.waiting_queue, m.running), (Some(4), Some(1)));
        assert_eq!(m.num_gpu_blocks, Some(5000));
        let text = "trtllm_num_requests_waiting 2\ntrtllm_kv_cache_utilization 0.1\ntrtllm_kv_cache_tokens_per_block 32\ntrtllm_kv_cache_max_blocks 900\n";
        let m = parse_metrics(EngineType::TrtllmServe, text, Instant::now()).unwrap();
        assert_eq!(m.waiting_queue, Some(2));
        assert_eq!(m.block_size_tokens, Some(32));
        assert_eq!(m.num_gpu_blocks, Some(900));
    }

    #[test]
    fn unrelated_families_the_parser_rejects_do_not_matter() {
        // Regression: prometheus-client writes counters as `# TYPE x counter` + `x_total`,
        // which the parser rejects; that used to fail the whole scrape.
        let text = format!(
            "# TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total 5\n{VLLM}"
        );
        let m = parse_metrics(EngineType::Vllm, &text, Instant::now()).unwrap();
        assert_eq!(m.waiting_queue, Some(3));
        assert_eq!(line_metric("# HELP a:b text"), Some("a:b"));
        assert_eq!(line_metric("a{x=\"1\"} 2"), Some("a"));
        assert_eq!(line_metric("# just a comment"), None);
    }

    #[test]
    fn absent_families_are_absent_values_not_errors() {
        // Regression (issue 7): a page without the vllm:* families (an engine before its first
        // request) used to fail the scrape, so the endpoint went stale and lost all traffic.
        let m = parse_metrics(EngineType::Vllm, "", Instant::now()).unwrap();
        assert_eq!(
            (m.waiting_queue, m.running, m.kv_cache_usage),
            (None, None, None)
        );
        assert!(m.updated.is_some());
        let m = parse_metrics(
            EngineType::Vllm,
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
                EngineType::Vllm,
                "vllm:num_requests_waiting{{{ not prometheus",
                Instant::now()
            )
            .is_err()
        );
    }
}
