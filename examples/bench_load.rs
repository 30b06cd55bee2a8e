//! Bench fixture for `scripts/bench_extproc.sh`: a closed-loop HTTP/1.1 load generator (one
//! keep-alive connection per worker, like wrk) that posts OpenAI completion bodies of a given
//! size and reports one JSON line: requests/s, latency p50/p99, and the path time the upstream
//! reports (`x-path-ns`: first request byte sent → request head at the upstream) p50/p99.
//!
//! Bodies are built before the run (64 variants sharing 8 prefixes, so a cache-aware picker
//! sees reuse) and sent with a `x-sent-ns` header; `--sse N` asks the upstream for a streamed
//! response of N events and reads it to the end.
//!
//! `cargo run --release --example bench_load -- --url http://127.0.0.1:8080/v1/completions
//!  --body-bytes 1024 --connections 32 --seconds 10 [--sse 500] [--max-requests N] [--rate R]`
//!
//! With `--rate`, each connection sends at `rate / connections` per second (a request that
//! runs late delays only its own connection).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

struct Args {
    host: String,
    path: String,
    body_bytes: usize,
    connections: usize,
    seconds: f64,
    sse: usize,
    max_requests: u64,
    /// Requests per second over all connections (0: as fast as they go).
    rate: f64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        host: "127.0.0.1:8080".into(),
        path: "/v1/completions".into(),
        body_bytes: 1024,
        connections: 32,
        seconds: 10.0,
        sse: 0,
        max_requests: u64::MAX,
        rate: 0.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => {
                let rest = value
                    .strip_prefix("http://")
                    .context("--url must start with http://")?;
                let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
                args.host = host.to_owned();
                args.path = format!("/{path}");
            }
            "--body-bytes" => args.body_bytes = value.parse()?,
            "--connections" => args.connections = value.parse()?,
            "--seconds" => args.seconds = value.parse()?,
            "--sse" => args.sse = value.parse()?,
            "--max-requests" => args.max_requests = value.parse()?,
            "--rate" => args.rate = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

/// Completion bodies of about `size` bytes: 8 shared prefixes (3/4 of the prompt), a distinct
/// tail per variant.
fn bodies(size: usize, stream: bool) -> Vec<Bytes> {
    let words = [
        "route", "token", "cache", "prefix", "model", "server", "gateway", "prompt",
    ];
    let prompt_len = size.saturating_sub(80).max(16);
    (0..64)
        .map(|v| {
            let mut prompt = String::with_capacity(prompt_len + 16);
            let mut i = v % 8;
            while prompt.len() < prompt_len * 3 / 4 {
                prompt.push_str(words[i % words.len()]);
                prompt.push(' ');
                i = i * 7 + 3;
            }
            let mut j = v;
            while prompt.len() < prompt_len {
                prompt.push_str(words[j % words.len()]);
                prompt.push(' ');
                j = j * 5 + 1;
            }
            Bytes::from(format!(
                r#"{{"model":"m","prompt":"{prompt}","max_tokens":1,"stream":{stream}}}"#
            ))
        })
        .collect()
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[derive(Default)]
struct Samples {
    latency_us: Vec<u64>,
    path_us: Vec<u64>,
    errors: u64,
}

struct Plan {
    host: String,
    path: String,
    bodies: Vec<Bytes>,
    sse: usize,
    deadline: Instant,
    /// Time between this connection's requests (zero: back to back).
    interval: Duration,
    budget: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

async fn worker(plan: Plan) -> anyhow::Result<Samples> {
    let Plan {
        host,
        path,
        bodies,
        sse,
        deadline,
        interval,
        budget,
    } = plan;
    let stream = TcpStream::connect(&host).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut samples = Samples::default();
    let mut n = fastrand::usize(..bodies.len());
    let mut next = Instant::now() + interval.mul_f64(fastrand::f64());
    while Instant::now() < deadline && budget.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) > 0
    {
        if !interval.is_zero() {
            tokio::time::sleep_until(next.into()).await;
            next += interval;
        }
        n = (n + 1) % bodies.len();
        let req = Request::post(path.as_str())
            .header("host", host.as_str())
            .header("content-type", "application/json")
            .header("x-sse-chunks", sse)
            .header("x-sent-ns", now_ns().to_string())
            .body(Full::new(bodies[n].clone()))?;
        let start = Instant::now();
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let ok = resp.status().is_success();
        let path_ns: Option<u64> = resp
            .headers()
            .get("x-path-ns")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        resp.into_body().collect().await?;
        if ok {
            samples.latency_us.push(start.elapsed().as_micros() as u64);
            if let Some(ns) = path_ns {
                samples.path_us.push(ns / 1000);
            }
        } else {
            samples.errors += 1;
        }
    }
    Ok(samples)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let bodies = bodies(args.body_bytes, args.sse > 0);
    let budget = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(args.max_requests));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let interval = if args.rate > 0.0 {
        Duration::from_secs_f64(args.connections as f64 / args.rate)
    } else {
        Duration::ZERO
    };
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| {
            tokio::spawn(worker(Plan {
                host: args.host.clone(),
                path: args.path.clone(),
                bodies: bodies.clone(),
                sse: args.sse,
                deadline,
                interval,
                budget: budget.clone(),
            }))
        })
        .collect();
    let mut all = Samples::default();
    for t in tasks {
        match t.await? {
            Ok(s) => {
                all.latency_us.extend(s.latency_us);
                all.path_us.extend(s.path_us);
                all.errors += s.errors;
            }
            Err(e) => {
                eprintln!("bench_load: worker failed: {e:#}");
                all.errors += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.latency_us.sort_unstable();
    all.path_us.sort_unstable();
    println!(
        r#"{{"requests":{},"errors":{},"seconds":{elapsed:.3},"rps":{:.1},"lat_p50_us":{},"lat_p99_us":{},"path_p50_us":{},"path_p99_us":{}}}"#,
        all.latency_us.len(),
        all.errors,
        all.latency_us.len() as f64 / elapsed,
        percentile(&all.latency_us, 0.5),
        percentile(&all.latency_us, 0.99),
        percentile(&all.path_us, 0.5),
        percentile(&all.path_us, 0.99),
    );
    Ok(())
}
