//! `epp-bench`: load generator for the real stack (client → Envoy → model servers, with or
//! without epp). Sends a workload as streaming completions with Poisson arrivals, measures
//! TTFT (first token chunk), end-to-end latency, cached prompt tokens (from
//! `usage.prompt_tokens_details.cached_tokens`) and which server answered (`x-served-by`), and
//! appends one summary row per run to a JSONL file; `report` prints the table and a plot.
//!
//! ```text
//! epp-bench run --url http://127.0.0.1:8081 --label epp --rate 8 --results r.jsonl
//! epp-bench report --results r.jsonl --out bench-results/demo
//! ```
//! Every run is bounded: `--max-requests` requests, each with a timeout.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressStyle};

use epp::sim::fleet::{RequestOutcome, summarize};
use epp::sim::report::{self, Row};
use epp::sim::workload::{self, Arrival, SharedPrefix};

#[derive(Debug, Parser)]
#[command(
    name = "epp-bench",
    about = "Drive a workload through an OpenAI-compatible gateway"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a workload and append its summary to --results.
    Run(RunArgs),
    /// Print the table of --results and write a plot.
    Report {
        #[arg(long)]
        results: PathBuf,
        /// Output directory for results.md and ttft.svg.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        #[arg(long, default_value = "Mean and p90 TTFT through Envoy")]
        title: String,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    url: String,
    /// Name of this run in the table (e.g. epp, round-robin).
    #[arg(long)]
    label: String,
    /// high, low, or trace:<path.jsonl>.
    #[arg(long, default_value = "high")]
    workload: String,
    /// Poisson arrival rate (req/s).
    #[arg(long, default_value_t = 8.0)]
    rate: f64,
    /// Stop after this many requests.
    #[arg(long, default_value_t = 512)]
    max_requests: usize,
    #[arg(long)]
    groups: Option<usize>,
    #[arg(long)]
    prompts_per_group: Option<usize>,
    /// Output tokens per request (default: the workload's, 256).
    #[arg(long)]
    output_tokens: Option<usize>,
    /// Model name sent in requests.
    #[arg(long, default_value = "model")]
    model: String,
    /// Number of model servers behind the gateway (for the load-spread column).
    #[arg(long, default_value_t = 4)]
    pods: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Per-request timeout.
    #[arg(long, default_value = "120s", value_parser = epp::duration::parse)]
    timeout: Duration,
    #[arg(long)]
    results: PathBuf,
    #[arg(long)]
    quiet: bool,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Measured {
    outcome: RequestOutcome,
    server: String,
}

async fn one(
    client: &HttpClient,
    url: &str,
    a: &Arrival,
    timeout: Duration,
    t0: Instant,
) -> anyhow::Result<Measured> {
    let body = serde_json::json!({
        "model": a.model,
        "prompt": String::from_utf8_lossy(&a.prompt),
        "max_tokens": a.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let req = hyper::Request::post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let sent = t0.elapsed().as_secs_f64();
    let work = async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let server = resp
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned();
        let mut body = resp.into_body();
        if !status.is_success() {
            let text = body.collect().await?.to_bytes();
            bail!("status {status}: {}", String::from_utf8_lossy(&text));
        }
        let mut first = None;
        let mut usage = (0, 0, 0);
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let Some(json) = line.strip_prefix(b"data: ") else {
                    continue;
                };
                let json = json.trim_ascii_end();
                if json == b"[DONE]" {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_slice(json)?;
                if first.is_none() && v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                    first = Some(t0.elapsed().as_secs_f64());
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    let n = |p: &str| u.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0) as usize;
                    usage = (
                        n("/prompt_tokens"),
                        n("/prompt_tokens_details/cached_tokens"),
                        n("/completion_tokens"),
                    );
                }
            }
        }
        let done = t0.elapsed().as_secs_f64();
        Ok(Measured {
            outcome: RequestOutcome {
                arrival: sent,
                first_token: first.unwrap_or(done),
                finished: done,
                prompt_tokens: usage.0,
                cached_tokens: usage.1,
                output_tokens: usage.2,
                pod: 0,
            },
            server,
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .context("request timed out")?
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut arrivals = if let Some(path) = args.workload.strip_prefix("trace:") {
        workload::load_trace(path.as_ref(), &args.model)?
    } else {
        SharedPrefix::named(
            &args.workload,
            args.groups,
            args.prompts_per_group,
            args.output_tokens,
        )
        .map_err(anyhow::Error::msg)?
        .poisson(args.rate, &args.model, args.seed)
    };
    arrivals.truncate(args.max_requests);
    if arrivals.is_empty() {
        bail!("the workload has no requests (check --groups, --prompts-per-group, --max-requests)");
    }
    let arrivals = Arc::new(arrivals);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(HttpConnector::new());
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(arrivals.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests ({elapsed}) {msg}")
            .expect("static template"),
    );
    bar.set_message(args.label.clone());
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(arrivals.len());
    for i in 0..arrivals.len() {
        let at = Duration::from_secs_f64(arrivals[i].at);
        tokio::time::sleep_until((t0 + at).into()).await;
        let (client, arrivals, url, bar) = (
            client.clone(),
            arrivals.clone(),
            args.url.clone(),
            bar.clone(),
        );
        let timeout = args.timeout;
        tasks.push(tokio::spawn(async move {
            let r = one(&client, &url, &arrivals[i], timeout, t0).await;
            bar.inc(1);
            r
        }));
    }
    let mut outcomes = Vec::new();
    let mut servers: HashMap<String, usize> = HashMap::new();
    let mut errors = 0usize;
    let mut first_error = None;
    for t in tasks {
        match t.await? {
            Ok(mut m) => {
                let next = servers.len();
                m.outcome.pod = *servers.entry(m.server).or_insert(next);
                outcomes.push(m.outcome);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    bar.finish_and_clear();
    if let Some(e) = first_error {
        eprintln!(
            "{errors} of {} requests failed; first error: {e}",
            arrivals.len()
        );
    }
    if outcomes.is_empty() {
        bail!("no request succeeded");
    }
    let summary = summarize(&outcomes, args.pods.max(servers.len()));
    let row = Row {
        workload: args.workload.clone(),
        rate: args.rate,
        policy: args.label.clone(),
        summary,
    };
    println!("{}", report::markdown(std::slice::from_ref(&row)));
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.results)
        .with_context(|| format!("opening {}", args.results.display()))?;
    writeln!(f, "{}", serde_json::to_string(&row)?)?;
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

fn report_cmd(results: PathBuf, out: PathBuf, title: String) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&results)
        .with_context(|| format!("reading {}", results.display()))?;
    let rows: Vec<Row> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("parsing results")?;
    let table = report::markdown(&rows);
    println!("{table}");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.md"), &table)?;
    let svg = out.join("ttft.svg");
    report::plot_ttft_bars(&rows, &title, &svg).map_err(anyhow::Error::msg)?;
    println!(
        "table: {}\nplot:  {}",
        out.join("results.md").display(),
        svg.display()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(args) => run(args).await,
        Cmd::Report {
            results,
            out,
            title,
        } => report_cmd(results, out, title),
    }
}
