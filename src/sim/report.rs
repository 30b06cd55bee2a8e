//! Results as a Markdown table and SVG pictures that answer "which router, and why":
//!
//! * TTFT distribution (CDF, log time axis) per policy — one picture per workload and rate;
//! * prefix hit rate and requests per pod per policy — the *why*: hits versus balance;
//! * TTFT (mean and p90) against request rate, when a workload ran at several rates.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::coord::ranged1d::SegmentedCoord;
use plotters::coord::types::RangedCoordi32;
use plotters::prelude::*;

use super::fleet::Summary;

/// One table row: a policy on a workload at a rate.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub workload: String,
    /// Nominal rate (req/s); 0 for traces (see `summary.rate` for the real one).
    pub rate: f64,
    pub policy: String,
    pub summary: Summary,
    /// Requests per pod.
    #[serde(default)]
    pub per_pod: Vec<usize>,
    /// Sorted TTFTs (seconds), for the CDF.
    #[serde(default)]
    pub ttfts: Vec<f64>,
    /// Requests that got no answer (an error status or a broken stream); the summary covers
    /// the others.
    #[serde(default)]
    pub failed: usize,
}

/// The Markdown table of `rows`; with a "failed" column when any request failed.
pub fn markdown(rows: &[Row]) -> String {
    let failures = rows.iter().any(|r| r.failed > 0);
    let mut s = String::from(
        "| workload | rate (req/s) | policy | TTFT mean (s) | p50 | p90 | p99 | E2E mean (s) | output tok/s | prefix hit rate | busiest pod / mean |",
    );
    s.push_str(if failures { " failed |\n" } else { "\n" });
    s.push_str("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    s.push_str(if failures { "---:|\n" } else { "\n" });
    for r in rows {
        let m = &r.summary;
        s.push_str(&format!(
            "| {} | {:.1} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.0} | {:.1}% | {:.2} |",
            r.workload,
            if r.rate > 0.0 { r.rate } else { m.rate },
            r.policy,
            m.ttft_mean,
            m.ttft_p50,
            m.ttft_p90,
            m.ttft_p99,
            m.e2e_mean,
            m.output_tokens_per_s,
            100.0 * m.hit_rate,
            m.load_max_over_mean
        ));
        if failures {
            s.push_str(&format!(" {} |", r.failed));
        }
        s.push('\n');
    }
    s
}

const COLORS: [RGBColor; 10] = [
    RGBColor(228, 26, 28),
    RGBColor(55, 126, 184),
    RGBColor(77, 175, 74),
    RGBColor(152, 78, 163),
    RGBColor(255, 127, 0),
    RGBColor(20, 20, 20),
    RGBColor(166, 86, 40),
    RGBColor(247, 129, 191),
    RGBColor(120, 120, 120),
    RGBColor(0, 160, 160),
];

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

fn policies(rows: &[&Row]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in rows {
        if !out.contains(&r.policy) {
            out.push(r.policy.clone());
        }
    }
    out
}

/// TTFT CDFs of `rows` (one line per policy; same workload and rate).
pub fn plot_cdf(rows: &[&Row], title: &str, path: &Path) -> Result<(), String> {
    let all = rows.iter().flat_map(|r| r.ttfts.iter().copied());
    let (lo, hi) = all
        .filter(|t| *t > 0.0 && t.is_finite())
        .fold((f64::INFINITY, 0.0f64), |(l, h), t| (l.min(t), h.max(t)));
    if !lo.is_finite() {
        return Err("no TTFTs to plot".into());
    }
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0.0..1.0)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("time to first token (s, log scale)")
        .y_desc("fraction of requests")
        .draw()
        .map_err(e)?;
    for (i, r) in rows.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let n = r.ttfts.len().max(1) as f64;
        let points: Vec<(f64, f64)> = r
            .ttfts
            .iter()
            .enumerate()
            .map(|(k, t)| (t.max(lo), (k + 1) as f64 / n))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(e)?
            .label(format!(
                "{} (mean {:.0} ms, p90 {:.0} ms)",
                r.policy,
                r.summary.ttft_mean * 1e3,
                r.summary.ttft_p90 * 1e3
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

/// Left: prefix hit rate per policy. Right: how the requests were spread — each pod's share
/// as one segment of a stacked bar per policy (for more than 10 pods, the idlest and the
/// busiest pod's load over the mean).
pub fn plot_hits_and_load(rows: &[&Row], title: &str, path: &Path) -> Result<(), String> {
    let height = 140 + 34 * rows.len() as u32;
    let root = SVGBackend::new(path, (1100, height.max(360))).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(title, ("sans-serif", 18)).map_err(e)?;
    let (left, right) = root.split_horizontally(520);
    hit_bars(rows, &left)?;
    if rows.iter().map(|r| r.per_pod.len()).max().unwrap_or(0) <= 10 {
        share_bars(rows, &right)
    } else {
        extreme_bars(rows, &right)
    }?;
    root.present().map_err(e)
}

type RowChart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, SegmentedCoord<RangedCoordi32>>,
>;

/// One policy's row, `from..to` along x, with a small gap to the next row.
fn bar(
    from: f64,
    to: f64,
    y: i32,
    style: impl Into<ShapeStyle>,
) -> Rectangle<(f64, SegmentValue<i32>)> {
    let mut r = Rectangle::new(
        [
            (from, SegmentValue::Exact(y)),
            (to, SegmentValue::Exact(y + 1)),
        ],
        style,
    );
    r.set_margin(3, 3, 0, 0);
    r
}

/// A horizontal bar chart frame with one row per policy (top to bottom), x in `0..x_max`.
fn policy_rows<'a, 'b>(
    rows: &[&Row],
    area: &'a DrawingArea<SVGBackend<'b>, Shift>,
    caption: &str,
    x_max: f64,
    x_desc: &str,
    labels: bool,
) -> Result<RowChart<'a, 'b>, String> {
    let n = rows.len() as i32;
    let names: Vec<String> = rows.iter().map(|r| r.policy.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(if labels { 190 } else { 10 })
        .caption(caption, ("sans-serif", 14))
        .build_cartesian_2d(0.0..x_max, (0..n).into_segmented())
        .map_err(e)?;
    let label = move |y: &SegmentValue<i32>| match y {
        SegmentValue::CenterOf(y) if labels => {
            names.get((n - 1 - y) as usize).cloned().unwrap_or_default()
        }
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len() + 1)
        .y_label_formatter(&label)
        .x_desc(x_desc)
        .draw()
        .map_err(e)?;
    Ok(chart)
}

fn hit_bars(rows: &[&Row], area: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), String> {
    let n = rows.len() as i32;
    let mut chart = policy_rows(
        rows,
        area,
        "prefix-cache hit rate",
        1.0,
        "cached prompt tokens / prompt tokens",
        true,
    )?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = n - 1 - i as i32;
            bar(
                0.0,
                r.summary.hit_rate,
                y,
                COLORS[i % COLORS.len()].mix(0.85).filled(),
            )
        }))
        .map_err(e)?;
    Ok(())
}

fn share_bars(rows: &[&Row], area: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), String> {
    let n = rows.len() as i32;
    let mut chart = policy_rows(
        rows,
        area,
        "share of requests per pod (one colour per pod; equal segments = even spread)",
        1.0,
        "fraction of requests",
        false,
    )?;
    for (i, r) in rows.iter().enumerate() {
        let y = n - 1 - i as i32;
        let total = r.per_pod.iter().sum::<usize>().max(1) as f64;
        let mut x = 0.0;
        let segments: Vec<_> = r
            .per_pod
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let w = *c as f64 / total;
                let rect = bar(x, x + w, y, COLORS[k % COLORS.len()].mix(0.75).filled());
                x += w;
                rect
            })
            .collect();
        chart.draw_series(segments).map_err(e)?;
    }
    Ok(())
}

fn extreme_bars(rows: &[&Row], area: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), String> {
    let n = rows.len() as i32;
    let ratio = |r: &Row| {
        let mean = r.per_pod.iter().sum::<usize>() as f64 / r.per_pod.len().max(1) as f64;
        let max = *r.per_pod.iter().max().unwrap_or(&0) as f64;
        let min = *r.per_pod.iter().min().unwrap_or(&0) as f64;
        (min / mean.max(1e-9), max / mean.max(1e-9))
    };
    let top = rows.iter().map(|r| ratio(r).1).fold(1.0, f64::max) * 1.1;
    let mut chart = policy_rows(
        rows,
        area,
        "idlest (light) and busiest (dark) pod's load / mean",
        top,
        "requests / mean per pod",
        false,
    )?;
    for (i, r) in rows.iter().enumerate() {
        let y = n - 1 - i as i32;
        let (lo, hi) = ratio(r);
        chart
            .draw_series([
                bar(0.0, hi, y, COLORS[1].mix(0.85).filled()),
                bar(0.0, lo, y, COLORS[1].mix(0.35).filled()),
            ])
            .map_err(e)?;
    }
    Ok(())
}

/// Mean (solid) and p90 (dashed-looking thin) TTFT against rate, one colour per policy.
pub fn plot_ttft_vs_rate(rows: &[&Row], title: &str, path: &Path) -> Result<(), String> {
    let names = policies(rows);
    let max_rate = rows.iter().map(|r| r.rate).fold(0.0, f64::max).max(1.0);
    let max_ttft = rows
        .iter()
        .map(|r| r.summary.ttft_p90)
        .filter(|t| t.is_finite())
        .fold(0.0, f64::max)
        .max(0.01);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_rate * 1.05, 0.0..max_ttft * 1.1)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("request rate (req/s)")
        .y_desc("TTFT (s): mean thick, p90 thin")
        .draw()
        .map_err(e)?;
    for (i, p) in names.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mine: Vec<&&Row> = rows.iter().filter(|r| r.policy == *p).collect();
        let mean: Vec<(f64, f64)> = mine.iter().map(|r| (r.rate, r.summary.ttft_mean)).collect();
        let p90: Vec<(f64, f64)> = mine.iter().map(|r| (r.rate, r.summary.ttft_p90)).collect();
        chart
            .draw_series(LineSeries::new(mean.clone(), color.stroke_width(3)))
            .map_err(e)?
            .label(p.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart
            .draw_series(LineSeries::new(p90, color.stroke_width(1)))
            .map_err(e)?;
        chart
            .draw_series(
                mean.into_iter()
                    .map(|pt| Circle::new(pt, 3, color.filled())),
            )
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .to_owned()
}

/// Writes every picture for `rows` into `dir`: per workload and rate a CDF and a hits/load
/// picture, per workload run at several rates a TTFT-vs-rate picture. `context` (e.g. "4 pods")
/// goes into the titles. Returns the files written.
pub fn write_pictures(rows: &[Row], dir: &Path, context: &str) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let mut groups: Vec<(String, f64)> = Vec::new();
    for r in rows {
        if !groups.iter().any(|(w, x)| *w == r.workload && *x == r.rate) {
            groups.push((r.workload.clone(), r.rate));
        }
    }
    for (workload, rate) in &groups {
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| r.workload == *workload && r.rate == *rate)
            .collect();
        let shown_rate = if *rate > 0.0 {
            *rate
        } else {
            mine.first().map_or(0.0, |r| r.summary.rate)
        };
        let what = format!("{workload} at {shown_rate:.1} req/s, {context}");
        let base = format!("{}-{}", slug(workload), slug(&format!("{shown_rate:.1}")));
        let cdf = dir.join(format!("ttft-cdf-{base}.svg"));
        plot_cdf(&mine, &format!("TTFT distribution: {what}"), &cdf)?;
        let bars = dir.join(format!("hits-load-{base}.svg"));
        plot_hits_and_load(
            &mine,
            &format!("Why: cache hits and load spread ({what})"),
            &bars,
        )?;
        files.extend([cdf, bars]);
    }
    let mut workloads: Vec<&String> = groups.iter().map(|(w, _)| w).collect();
    workloads.dedup();
    for w in workloads {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.workload == *w).collect();
        let rates = groups.iter().filter(|(x, _)| x == w).count();
        if rates > 1 {
            let path = dir.join(format!("ttft-vs-rate-{}.svg", slug(w)));
            plot_ttft_vs_rate(
                &mine,
                &format!("TTFT vs request rate: {w}, {context}"),
                &path,
            )?;
            files.push(path);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(policy: &str, rate: f64) -> Row {
        let ttfts = vec![0.01, 0.02, 0.05, 0.2];
        Row {
            workload: "high".into(),
            rate,
            policy: policy.into(),
            summary: Summary {
                ttft_mean: 0.07,
                ttft_p50: 0.02,
                ttft_p90: 0.2,
                ttft_p99: 0.2,
                e2e_mean: 1.0,
                e2e_p50: 1.0,
                output_tokens_per_s: 100.0,
                hit_rate: 0.5,
                load_max_over_mean: 1.2,
                requests: 4,
                rate,
            },
            per_pod: vec![1, 2, 1],
            ttfts,
            failed: 0,
        }
    }

    #[test]
    fn pictures_for_each_workload_and_rate() {
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![row("a", 4.0), row("b", 4.0), row("a", 8.0), row("b", 8.0)];
        let files = write_pictures(&rows, dir.path(), "3 pods").unwrap();
        assert_eq!(files.len(), 5, "{files:?}");
        for f in files {
            let svg = std::fs::read_to_string(&f).unwrap();
            assert!(svg.contains("<svg"), "{}", f.display());
        }
        assert!(markdown(&rows).contains("| high | 4.0 | a |"));
        assert!(!markdown(&rows).contains("failed"));
    }

    #[test]
    fn failed_requests_get_a_column_when_there_are_any() {
        let mut rows = vec![row("a", 4.0), row("b", 4.0)];
        rows[1].failed = 7;
        let table = markdown(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].ends_with("| failed |"), "{table}");
        assert!(lines[1].ends_with("---:|---:|"), "{table}");
        assert!(lines[2].ends_with("| 0 |"), "{table}");
        assert!(lines[3].ends_with("| 7 |"), "{table}");
    }
}
