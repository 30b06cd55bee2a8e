//! `epp-fleet`: the discrete-event fleet simulator. Runs a workload over N simulated vLLM pods
//! under every routing policy (epp's own scheduler in-process for epp's policies) and prints a
//! Markdown table; writes the table and an SVG plot per workload into `--out`.
//!
//! ```text
//! epp-fleet --pods 4 --workload high --rates 2,4,8,12
//! epp-fleet --workload trace:traffic.jsonl --policies round-robin,epp,oracle
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use epp::sim::engine::EngineConfig;
use epp::sim::fleet::{FleetConfig, Policy, simulate};
use epp::sim::report::{self, Row};
use epp::sim::workload::{self, SharedPrefix};

#[derive(Debug, Parser)]
#[command(
    name = "epp-fleet",
    about = "Simulate routing policies over a fleet of vLLM-like pods"
)]
struct Cli {
    /// Number of pods.
    #[arg(long, default_value_t = 4)]
    pods: usize,
    /// Workloads, comma-separated: high, low, or trace:<path.jsonl>.
    #[arg(long, default_value = "high,low")]
    workload: String,
    /// Poisson request rates (req/s), comma-separated (ignored for traces).
    #[arg(long, default_value = "2,4,8,12")]
    rates: String,
    /// Policies, comma-separated (round-robin, random, least-queue, v1, v2, epp, oracle) or all.
    #[arg(long, default_value = "all")]
    policies: String,
    /// Shared-prefix groups (default: the workload's own, 64).
    #[arg(long)]
    groups: Option<usize>,
    /// Prompts per group (default 16).
    #[arg(long)]
    prompts_per_group: Option<usize>,
    /// KV blocks per pod (default: 6,500, an H100 80 GB with Llama-2-7B).
    #[arg(long)]
    kv_blocks: Option<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for results.md and the plots.
    #[arg(long, default_value = "bench-results")]
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

fn list<T>(s: &str, what: &str, f: impl Fn(&str) -> Option<T>) -> anyhow::Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| f(x).with_context(|| format!("unknown {what} {x:?}")))
        .collect()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.pods == 0 {
        bail!("--pods must be at least 1");
    }
    let policies = if cli.policies == "all" {
        Policy::ALL.to_vec()
    } else {
        list(&cli.policies, "policy", Policy::parse)?
    };
    let rates = list(&cli.rates, "rate", |r| {
        r.parse::<f64>().ok().filter(|r| *r > 0.0)
    })?;
    let mut engine = EngineConfig::default();
    if let Some(b) = cli.kv_blocks {
        engine.num_blocks = b;
    }
    let cfg = FleetConfig {
        pods: cli.pods,
        engine,
        seed: cli.seed,
        ..Default::default()
    };

    // (workload name, rate, arrivals)
    let mut runs = Vec::new();
    for w in cli.workload.split(',').map(str::trim) {
        if let Some(path) = w.strip_prefix("trace:") {
            let arrivals = workload::load_trace(path.as_ref(), "model")?;
            runs.push((format!("trace {path}"), 0.0, arrivals));
            continue;
        }
        let shape = SharedPrefix::named(w, cli.groups, cli.prompts_per_group, None)
            .map_err(anyhow::Error::msg)?;
        for &rate in &rates {
            let name = format!("{w} reuse");
            runs.push((name, rate, shape.poisson(rate, "model", cli.seed)));
        }
    }

    let total: usize = runs.iter().map(|r| r.2.len()).sum::<usize>() * policies.len();
    let bar = if cli.quiet {
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
    let started = Instant::now();
    let mut rows = Vec::new();
    for (name, rate, arrivals) in &runs {
        for &p in &policies {
            bar.set_message(format!("{name} @ {rate} req/s: {}", p.name()));
            let base = bar.position();
            let result = simulate(p, arrivals, &cfg, |done| {
                if done % 64 == 0 {
                    bar.set_position(base + done as u64);
                }
            });
            bar.set_position(base + arrivals.len() as u64);
            rows.push(Row {
                workload: name.clone(),
                rate: *rate,
                policy: p.name().to_owned(),
                summary: result.summary(),
            });
        }
    }
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    let table = report::markdown(&rows);
    say(&table);
    say(&format!(
        "{} pods, {} simulated requests in {:.1} s ({:.0} requests/s of wall time)",
        cli.pods,
        total,
        wall,
        total as f64 / wall
    ));

    std::fs::create_dir_all(&cli.out)?;
    std::fs::write(cli.out.join("results.md"), &table)?;
    let mut names: Vec<&String> = rows.iter().map(|r| &r.workload).collect();
    names.dedup();
    for name in names {
        let file = cli.out.join(format!(
            "ttft-{}.svg",
            name.replace([' ', '/', ':', '.'], "-")
        ));
        report::plot_ttft(&rows, name, &file).map_err(anyhow::Error::msg)?;
        say(&format!("plot: {}", file.display()));
    }
    Ok(())
}
