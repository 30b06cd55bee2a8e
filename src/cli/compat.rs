//! The Go EPP's argument forms, and its flags that epp accepts without the feature.
//!
//! Helm charts pass some values with their quotes (`--total-queued-requests-metric="sglang:num_queue_reqs"`
//! reaches the program with the quote characters in it), sizes the Go way (`10MiB`) and port
//! lists as one comma-separated value.

use super::Cli;

/// A string value with one pair of surrounding quotes (`"…"` or `'…'`) removed.
pub fn go_string(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    if b.len() >= 2 && (b[0] == b'"' || b[0] == b'\'') && b[b.len() - 1] == b[0] {
        return Ok(s[1..s.len() - 1].to_owned());
    }
    Ok(s.to_owned())
}

/// A byte size: a number with an optional unit, decimal (`kB`, `MB`, `GB`) or binary (`KiB`,
/// `MiB`, `GiB`; also `Ki`, `Mi`, `Gi`); quotes allowed.
pub fn size(s: &str) -> Result<usize, String> {
    let s = go_string(s)?;
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. 4194304, 10MiB, 25MB)"))?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "k" | "K" | "kB" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "Ki" | "KiB" => 1024.0,
        "Mi" | "MiB" => 1024.0 * 1024.0,
        "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > usize::MAX as f64 {
        return Err(format!("size {s:?} is out of range"));
    }
    Ok(bytes as usize)
}

/// Ports as one value: `8000,8001`, `[8000 8001]` or `"8000"`.
pub fn port_list(s: &str) -> Result<Vec<u16>, String> {
    let s = go_string(s)?;
    let inner = s.trim().trim_start_matches('[').trim_end_matches(']');
    inner
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .map_err(|_| format!("invalid port {p:?} in {s:?}"))
        })
        .collect()
}

/// Go EPP flags given on the command line whose feature epp does not have, each with what
/// epp does instead (logged once at start-up). Flags left at their default are not listed.
pub fn unsupported(cli: &Cli) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    let on = |v: Option<bool>| v == Some(true);
    if on(cli.tracing) {
        out.push(("--tracing", "OpenTelemetry tracing is not built into epp"));
    }
    if on(cli.enable_pprof) {
        out.push((
            "--enable-pprof",
            "Go's pprof has no equivalent; use perf on epp",
        ));
    }
    if on(cli.emit_endpoint_scores) {
        out.push((
            "--emit-endpoint-scores",
            "scores are logged at debug level instead",
        ));
    }
    if on(cli.enable_grpc_stream_metrics) {
        out.push((
            "--enable-grpc-stream-metrics",
            "epp exports no per-stream gRPC metrics",
        ));
    }
    if cli.allow_experimental_plugins.is_some() {
        out.push((
            "--allow-experimental-plugins",
            "epp has no experimental plugin gate; every plugin it knows is available",
        ));
    }
    if cli.tls_cipher_suites.is_some() {
        out.push((
            "--tls-cipher-suites",
            "epp uses rustls' default cipher suites",
        ));
    }
    if cli.metrics_client_ca_file.is_some() || cli.metrics_cert_dir.is_some() {
        out.push((
            "--metrics-cert-dir/--metrics-client-ca-file",
            "the metrics port serves plaintext HTTP",
        ));
    }
    if cli.zap_stacktrace_level.is_some() {
        out.push(("--zap-stacktrace-level", "epp logs no stack traces"));
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn quotes_sizes_and_port_lists() {
        assert_eq!(
            go_string("\"sglang:num_queue_reqs\"").unwrap(),
            "sglang:num_queue_reqs"
        );
        assert_eq!(go_string("''").unwrap(), "");
        assert_eq!(go_string("\"unbalanced").unwrap(), "\"unbalanced");
        assert_eq!(size("10MiB").unwrap(), 10 << 20);
        assert_eq!(size("25MB").unwrap(), 25_000_000);
        assert_eq!(size("\"4194304\"").unwrap(), 4_194_304);
        assert!(size("10 parsecs").is_err());
        assert!(size("0").is_err());
        assert_eq!(port_list("8000,8001").unwrap(), vec![8000, 8001]);
        assert_eq!(port_list("\"[8000 8002]\"").unwrap(), vec![8000, 8002]);
        assert!(port_list("80000").is_err());
    }

    /// The args GIE v1.5.0's chart renders for an sglang pool with two replicas.
    #[test]
    fn gie_chart_arguments_parse() {
        let args = [
            "epp",
            "--pool-name",
            "vllm-pool",
            "--pool-namespace",
            "ns",
            "--pool-group",
            "inference.networking.k8s.io",
            "--total-queued-requests-metric=\"sglang:num_queue_reqs\"",
            "--total-running-requests-metric=\"sglang:num_running_reqs\"",
            "--kv-cache-usage-percentage-metric=\"sglang:token_usage\"",
            "--cache-info-metric=\"sglang:cache_config_info\"",
            "--lora-info-metric",
            "",
            "--zap-encoder",
            "json",
            "--config-file",
            "/config/default-plugins.yaml",
            "--ha-enable-leader-election",
            "--v",
            "1",
            "--tracing=false",
            "--metrics-endpoint-auth=false",
            "--model-server-metrics-path=\"/prometheus/metrics\"",
            "--endpoint-target-ports",
            "8000,8001",
            "--drain-timeout=30s",
            "--grpc-max-recv-msg-size=10MiB",
            "--zap-devel",
            "-v=3",
        ];
        let cli = Cli::try_parse_from(args).unwrap();
        assert_eq!(
            cli.total_queued_requests_metric.as_deref(),
            Some("sglang:num_queue_reqs")
        );
        assert_eq!(cli.lora_info_metric.as_deref(), Some(""));
        assert_eq!(cli.zap_encoder.as_deref(), Some("json"));
        assert!(cli.ha_enable_leader_election);
        assert_eq!(cli.tracing, Some(false));
        assert_eq!(cli.verbosity, 3);
        assert_eq!(
            cli.model_server_metrics_path.as_deref(),
            Some("/prometheus/metrics")
        );
        assert_eq!(cli.target_ports(), vec![8000, 8001]);
        assert_eq!(cli.grpc_max_recv_msg_size, Some(10 << 20));
        assert_eq!(cli.zap_devel, Some(true));
        assert!(!cli.metrics_endpoint_auth);
        assert!(unsupported(&cli).is_empty());
        assert!(cli.validate().is_ok());
    }

    #[test]
    fn flag_combinations_are_checked_by_name() {
        let parse = |args: &[&str]| {
            let mut all = vec!["epp"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap().validate().unwrap_err()
        };
        assert!(
            parse(&["--pool-name", "p", "--endpoint-selector", "app=x"]).contains("--pool-name")
        );
        assert!(parse(&["--endpoint-selector", "app=x"]).contains("--endpoint-target-ports"));
        assert!(parse(&["--model-server-metrics-scheme", "ftp"]).contains("http or https"));
        assert!(parse(&["--refresh-metrics-interval", "0"]).contains("greater than 0"));
        let cli = Cli::try_parse_from(["epp", "--tracing", "--enable-pprof=true"]).unwrap();
        let flags: Vec<&str> = unsupported(&cli).iter().map(|(f, _)| *f).collect();
        assert_eq!(flags, ["--tracing", "--enable-pprof"]);
    }
}
