//! `epp-bench`: load generator for the real stack (client → gateway → model servers). Sends a
//! workload — open-loop requests at their arrival times and closed-loop chat sessions (each
//! turn sent a think time after the previous answer, with that answer in its history) — as
//! streaming completions / chat completions, measures TTFT (first content chunk), end-to-end
//! latency, cached prompt tokens (`usage.prompt_tokens_details.cached_tokens`) and which server
//! answered (`x-served-by`), and appends one row per run to a JSONL file; `report` prints the
//! table and writes the pictures.
//!
//! ```text
//! epp-bench run --url http://127.0.0.1:8081 --label epp --workload high --rate 8 --results r.jsonl
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

use epp::sim::fleet::{RequestOutcome, per_pod, sorted_ttfts, summarize};
use epp::sim::report::{self, Row};
use epp::sim::workload::{self, Overrides, Prompt, Session, Workload};

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
    /// Run a workload and append its row to --results.
    Run(RunArgs),
    /// Print the table of --results and write the pictures.
    Report {
        #[arg(long)]
        results: PathBuf,
        /// Output directory for results.md and the pictures.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// What the runs were (goes into the pictures' titles).
        #[arg(long, default_value = "through Envoy")]
        context: String,
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
    /// high, low, burst, multiturn, docqa, or trace:<path.jsonl>.
    #[arg(long, default_value = "high")]
    workload: String,
    /// Mean request rate (req/s).
    #[arg(long, default_value_t = 8.0)]
    rate: f64,
    /// Stop after this many requests.
    #[arg(long, default_value_t = 512)]
    max_requests: usize,
    #[arg(long)]
    groups: Option<usize>,
    #[arg(long)]
    prompts_per_group: Option<usize>,
    /// Output tokens per request (default: the workload's).
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
    /// Exit 0 even when requests failed (their count is in the table); for runs where some
    /// model servers are made to fail.
    #[arg(long)]
    tolerate_failures: bool,
    /// Ask for whole responses (`"stream": false`): the client sees no first token, so the
    /// table's TTFT columns are the end-to-end time.
    #[arg(long)]
    no_stream: bool,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One request's measurements.
struct Measured {
    outcome: RequestOutcome,
    server: String,
    /// The generated text (sessions send it back in the next turn).
    answer: String,
}

/// What the driver needs to send requests.
#[derive(Clone)]
struct Driver {
    client: HttpClient,
    url: Arc<str>,
    timeout: Duration,
    t0: Instant,
    bar: ProgressBar,
    stream: bool,
}

/// Reads a whole JSON response: usage and generated text.
async fn read_whole(
    body: hyper::body::Incoming,
) -> anyhow::Result<((usize, usize, usize), String)> {
    let bytes = body.collect().await?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
    let c = &v["choices"][0];
    let answer = c["message"]["content"].as_str().or(c["text"].as_str());
    Ok((usage_of(&v["usage"]), answer.unwrap_or_default().to_owned()))
}

/// (prompt, cached prompt, completion) tokens of an OpenAI `usage` object.
fn usage_of(u: &serde_json::Value) -> (usize, usize, usize) {
    let n = |p: &str| u.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0) as usize;
    (
        n("/prompt_tokens"),
        n("/prompt_tokens_details/cached_tokens"),
        n("/completion_tokens"),
    )
}

/// Reads an SSE body: first content time, usage, generated text.
async fn read_stream(
    mut body: hyper::body::Incoming,
    t0: Instant,
) -> anyhow::Result<(Option<f64>, (usize, usize, usize), String)> {
    let mut first = None;
    let mut usage = (0, 0, 0);
    let mut answer = String::new();
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
            if let Some(c) = v["choices"].as_array().and_then(|c| c.first()) {
                first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                let piece = c["delta"]["content"].as_str().or(c["text"].as_str());
                answer.push_str(piece.unwrap_or_default());
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                usage = usage_of(u);
            }
        }
    }
    Ok((first, usage, answer))
}

impl Driver {
    async fn one(
        &self,
        model: &str,
        prompt: &Prompt,
        max_tokens: usize,
    ) -> anyhow::Result<Measured> {
        let body = prompt.body(model, max_tokens, self.stream);
        let req = hyper::Request::post(format!("{}{}", self.url, prompt.path()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let t0 = self.t0;
        let sent = t0.elapsed().as_secs_f64();
        let work = async {
            let resp = self.client.request(req).await?;
            let status = resp.status();
            let server = resp
                .headers()
                .get("x-served-by")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            if !status.is_success() {
                let text = resp.into_body().collect().await?.to_bytes();
                bail!("status {status}: {}", String::from_utf8_lossy(&text));
            }
            let (first, usage, answer) = if self.stream {
                read_stream(resp.into_body(), t0).await?
            } else {
                let (usage, answer) = read_whole(resp.into_body()).await?;
                (None, usage, answer)
            };
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
                answer,
            })
        };
        let r = tokio::time::timeout(self.timeout, work)
            .await
            .context("request timed out")?;
        self.bar.inc(1);
        r
    }

    /// Runs a session's turns one after the other.
    async fn session(&self, s: &Session) -> Vec<anyhow::Result<Measured>> {
        tokio::time::sleep_until((self.t0 + Duration::from_secs_f64(s.start)).into()).await;
        let mut answers: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for k in 0..s.user_turns.len() {
            let r = self.one(&s.model, &s.turn(k, &answers), s.max_tokens).await;
            let failed = r.is_err();
            if let Ok(m) = &r {
                answers.push(m.answer.clone());
            }
            out.push(r);
            if failed {
                break;
            }
            tokio::time::sleep(Duration::from_secs_f64(s.think[k])).await;
        }
        out
    }
}

fn progress(n: usize, label: &str, quiet: bool) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(n as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests ({elapsed}) {msg}")
            .expect("static template"),
    );
    bar.set_message(label.to_owned());
    bar
}

/// Sends every request of `w`; returns the results in no particular order.
async fn drive(d: &Driver, w: Workload) -> Vec<anyhow::Result<Measured>> {
    let mut tasks = Vec::new();
    for s in w.sessions {
        let d = d.clone();
        tasks.push(tokio::spawn(async move { d.session(&s).await }));
    }
    for a in w.arrivals {
        tokio::time::sleep_until((d.t0 + Duration::from_secs_f64(a.at)).into()).await;
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            vec![d.one(&a.model, &a.prompt, a.max_tokens).await]
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        match t.await {
            Ok(v) => out.extend(v),
            Err(e) => out.push(Err(anyhow::anyhow!("request task failed: {e}"))),
        }
    }
    out
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        groups: args.groups,
        prompts_per_group: args.prompts_per_group,
        output_tokens: args.output_tokens,
        requests: Some(args.max_requests),
    };
    let w = workload::named(&args.workload, args.rate, &args.model, args.seed, overrides)
        .map_err(anyhow::Error::msg)?;
    if w.is_empty() {
        bail!("the workload has no requests (check --groups, --prompts-per-group, --max-requests)");
    }
    let driver = Driver {
        client: {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1024)
                .build(connector)
        },
        url: Arc::from(args.url.as_str()),
        timeout: args.timeout,
        t0: Instant::now(),
        bar: progress(w.len(), &args.label, args.quiet),
        stream: !args.no_stream,
    };
    let results = drive(&driver, w.clone()).await;
    driver.bar.finish_and_clear();
    let mut outcomes = Vec::new();
    let mut servers: HashMap<String, usize> = HashMap::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(mut m) => {
                let next = servers.len();
                m.outcome.pod = *servers.entry(m.server).or_insert(next);
                outcomes.push(m.outcome);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if let Some(e) = errors.first() {
        eprintln!(
            "{} of {} requests failed; first error: {e}",
            errors.len(),
            w.len()
        );
    }
    if outcomes.is_empty() {
        bail!("no request succeeded");
    }
    let pods = args.pods.max(servers.len());
    let row = Row {
        workload: w.name.clone(),
        rate: args.rate,
        policy: args.label.clone(),
        summary: summarize(&outcomes, pods),
        per_pod: per_pod(&outcomes, pods),
        ttfts: sorted_ttfts(&outcomes),
        failed: errors.len(),
    };
    println!("{}", report::markdown(std::slice::from_ref(&row)));
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.results)
        .with_context(|| format!("opening {}", args.results.display()))?;
    writeln!(f, "{}", serde_json::to_string(&row)?)?;
    if !errors.is_empty() && !args.tolerate_failures {
        bail!("{} requests failed", errors.len());
    }
    Ok(())
}

fn report_cmd(results: PathBuf, out: PathBuf, context: String) -> anyhow::Result<()> {
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
    println!("table: {}", out.join("results.md").display());
    for f in report::write_pictures(&rows, &out, &context).map_err(anyhow::Error::msg)? {
        println!("picture: {}", f.display());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(args) => run(args).await,
        Cmd::Report {
            results,
            out,
            context,
        } => report_cmd(results, out, context),
    }
}
