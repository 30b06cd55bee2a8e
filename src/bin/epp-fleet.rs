//! `epp-fleet`: the discrete-event fleet simulator. Runs workloads over N simulated vLLM pods
//! under every routing policy — epp's configurations (its scheduler in-process), peer routers'
//! policies and two oracles — on the same requests, prints a Markdown table, and writes the
//! table, the rows (JSONL) and the pictures into `--out`.
//!
//! ```text
//! epp-fleet --pods 4 --workload high,low --rates 8,12,16 --seeds 1,2,3
//! epp-fleet --workload burst,multiturn,docqa --rates 12
//! epp-fleet --workload trace:traffic.jsonl --policies round-robin,epp,sglang,oracle-hits
//! epp-fleet --policies epp,config:my-plugins.yaml        # judge your own EndpointPickerConfig
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use epp::sim::engine::EngineConfig;
use epp::sim::fleet::{FleetConfig, Policy, ScrapeModel, per_pod, prepare, simulate};
use epp::sim::report::{self, Row};
use epp::sim::workload::{self, Overrides, Workload};

#[derive(Debug, Parser)]
#[command(
    name = "epp-fleet",
    about = "Simulate routing policies over a fleet of vLLM-like pods"
)]
struct Cli {
    /// Number of pods.
    #[arg(long, default_value_t = 4)]
    pods: usize,
    /// Workloads, comma-separated: high, low, burst, multiturn, docqa, trace:<path.jsonl>.
    #[arg(long, default_value = "high,low")]
    workload: String,
    /// Request rates (req/s), comma-separated (traces keep their own timing).
    #[arg(long, default_value = "8,12,16")]
    rates: String,
    /// Policies, comma-separated (round-robin, random, least-loaded, v1, gie, llm-d, epp,
    /// sglang, dynamo, oracle-hits, oracle-balance, config:<path>) or `standard`.
    #[arg(long, default_value = "standard")]
    policies: String,
    /// Seeds, comma-separated: each runs the whole comparison with other requests and timing.
    #[arg(long, default_value = "1")]
    seeds: String,
    /// Requests per run (default: the workload's own, 1,024).
    #[arg(long)]
    requests: Option<usize>,
    /// Shared-prefix groups (high/low; default 64).
    #[arg(long)]
    groups: Option<usize>,
    /// Prompts per group (high/low; default 16).
    #[arg(long)]
    prompts_per_group: Option<usize>,
    /// KV blocks per pod (default 6,500: an H100 80 GB with Llama-2-7B).
    #[arg(long)]
    kv_blocks: Option<usize>,
    /// KV blocks the pods claim in their metrics (default: the truth).
    #[arg(long)]
    kv_blocks_reported: Option<usize>,
    /// Most sequences a pod runs at once (vLLM's `max_num_seqs`); more wait in its queue.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Pods compute every prompt whole, reusing no cached prefix (vLLM's flag of the same name).
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// Clients ask for whole responses (`"stream": false`): epp sees each response only at
    /// its end.
    #[arg(long)]
    no_stream: bool,
    /// Seconds between scrapes.
    #[arg(long, default_value_t = 0.05)]
    scrape_interval: f64,
    /// Seconds from a scrape's snapshot to epp seeing it.
    #[arg(long, default_value_t = 0.005)]
    scrape_latency: f64,
    /// Probability that a scrape fails.
    #[arg(long, default_value_t = 0.01)]
    scrape_failures: f64,
    /// Pods export their engine metrics from the start (default: only after a first request).
    #[arg(long)]
    early_metrics: bool,
    /// The last N pods compute at --slow-speed times the others' speed (a mixed fleet).
    #[arg(long, default_value_t = 0)]
    slow_pods: usize,
    #[arg(long, default_value_t = 0.25)]
    slow_speed: f64,
    /// Directory for results.md, results.jsonl and the pictures.
    #[arg(long, default_value = "bench-results/fleet")]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Prints to stdout; a closed pipe (e.g. `| head`) ends the program quietly.
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{text}").is_err() {
        std::process::exit(0);
    }
}

fn list<T>(s: &str, what: &str, f: impl Fn(&str) -> Result<T, String>) -> anyhow::Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            f(x).map_err(anyhow::Error::msg)
                .with_context(|| format!("{what} {x:?}"))
        })
        .collect()
}

fn fleet_config(cli: &Cli) -> anyhow::Result<FleetConfig> {
    if cli.pods == 0 {
        bail!("--pods must be at least 1");
    }
    if !(cli.slow_speed > 0.0 && cli.slow_speed.is_finite()) {
        bail!("--slow-speed must be a number greater than 0");
    }
    if !(cli.scrape_interval > 0.0 && cli.scrape_latency >= 0.0) {
        bail!("--scrape-interval must be > 0 and --scrape-latency ≥ 0");
    }
    let mut engine = EngineConfig::default();
    if let Some(b) = cli.kv_blocks {
        engine.num_blocks = b;
    }
    engine.reported_blocks = cli.kv_blocks_reported;
    if cli.max_num_seqs == 0 {
        bail!("--max-num-seqs must be at least 1");
    }
    engine.max_num_seqs = cli.max_num_seqs;
    engine.prefix_caching = !cli.no_enable_prefix_caching;
    Ok(FleetConfig {
        pods: cli.pods,
        engine,
        scrape: ScrapeModel {
            interval: cli.scrape_interval,
            latency: cli.scrape_latency,
            failure_prob: cli.scrape_failures.clamp(0.0, 1.0),
            late_families: !cli.early_metrics,
            ..Default::default()
        },
        slow_pods: cli.slow_pods.min(cli.pods),
        slow_speed: cli.slow_speed,
        unstreamed: cli.no_stream,
        ..Default::default()
    })
}

/// Every (seed, workload) to run.
fn workloads(cli: &Cli, seeds: &[u64]) -> anyhow::Result<Vec<(u64, Workload)>> {
    let rates = list(&cli.rates, "rate", |r| {
        r.parse::<f64>()
            .ok()
            .filter(|r| *r > 0.0)
            .ok_or_else(|| "not a positive number".to_owned())
    })?;
    let o = Overrides {
        groups: cli.groups,
        prompts_per_group: cli.prompts_per_group,
        output_tokens: None,
        requests: cli.requests,
    };
    let mut out = Vec::new();
    for &seed in seeds {
        for name in cli.workload.split(',').map(str::trim) {
            let rates: &[f64] = if name.starts_with("trace:") {
                &[0.0]
            } else {
                &rates
            };
            for &rate in rates {
                let w =
                    workload::named(name, rate, "model", seed, o).map_err(anyhow::Error::msg)?;
                out.push((seed, w));
            }
        }
    }
    Ok(out)
}

fn progress(total: usize, quiet: bool) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} simulated requests ({per_sec}, eta {eta}) {msg}",
        )
        .expect("static template"),
    );
    bar
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = fleet_config(&cli)?;
    let policies = if cli.policies == "standard" || cli.policies == "all" {
        Policy::standard()
    } else {
        list(&cli.policies, "policy", Policy::parse)?
    };
    let seeds = list(&cli.seeds, "seed", |s| {
        s.parse::<u64>().map_err(|e| e.to_string())
    })?;
    let runs = workloads(&cli, &seeds)?;
    let total: usize = runs.iter().map(|(_, w)| w.len()).sum::<usize>() * policies.len();
    let bar = progress(total, cli.quiet);
    let started = Instant::now();
    let mut rows = Vec::new();
    for (seed, w) in &runs {
        let prepared = prepare(w);
        let cfg = FleetConfig { seed: *seed, ..cfg };
        let name = if seeds.len() > 1 {
            format!("{} (seed {seed})", w.name)
        } else {
            w.name.clone()
        };
        for p in &policies {
            bar.set_message(format!("{name} @ {:?} req/s: {}", w.rate, p.name()));
            let base = bar.position();
            let result = simulate(p, w, &prepared, &cfg, |done| {
                if done % 64 == 0 {
                    bar.set_position(base + done as u64);
                }
            });
            bar.set_position(base + w.len() as u64);
            rows.push(Row {
                workload: name.clone(),
                rate: w.rate.unwrap_or(0.0),
                policy: result.policy.clone(),
                summary: result.summary(),
                per_pod: per_pod(&result.outcomes, result.pods),
                ttfts: result.ttfts(),
                failed: 0,
            });
        }
    }
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    let table = report::markdown(&rows);
    say(&table);
    say(&format!(
        "{} pods, {total} simulated requests in {wall:.1} s ({:.0} requests/s of wall time)",
        cli.pods,
        total as f64 / wall
    ));
    std::fs::create_dir_all(&cli.out)?;
    std::fs::write(cli.out.join("results.md"), &table)?;
    let jsonl: Vec<String> = rows
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    std::fs::write(cli.out.join("results.jsonl"), jsonl.join("\n") + "\n")?;
    let context = format!("{} simulated pods", cli.pods);
    for f in report::write_pictures(&rows, &cli.out, &context).map_err(anyhow::Error::msg)? {
        say(&format!("picture: {}", f.display()));
    }
    Ok(())
}
