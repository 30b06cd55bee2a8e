//! Results as a Markdown table and an SVG plot (TTFT against request rate, one line per
//! policy).

use std::path::Path;

use plotters::prelude::*;

use super::fleet::Summary;

/// One table row: a policy at a rate.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub workload: String,
    pub rate: f64,
    pub policy: String,
    pub summary: Summary,
}

/// The Markdown table of `rows`.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| workload | rate (req/s) | policy | TTFT mean (s) | TTFT p50 | TTFT p90 | E2E mean (s) | output tok/s | prefix hit rate | max/mean pod load |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let m = &r.summary;
        s.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.2} | {:.0} | {:.1}% | {:.2} |\n",
            r.workload,
            r.rate,
            r.policy,
            m.ttft_mean,
            m.ttft_p50,
            m.ttft_p90,
            m.e2e_mean,
            m.output_tokens_per_s,
            100.0 * m.hit_rate,
            m.load_max_over_mean
        ));
    }
    s
}

const COLORS: [RGBColor; 8] = [
    RGBColor(228, 26, 28),
    RGBColor(55, 126, 184),
    RGBColor(77, 175, 74),
    RGBColor(152, 78, 163),
    RGBColor(255, 127, 0),
    RGBColor(20, 20, 20),
    RGBColor(166, 86, 40),
    RGBColor(247, 129, 191),
];

/// Plots mean TTFT against rate for each policy of one workload into an SVG file.
pub fn plot_ttft(rows: &[Row], workload: &str, path: &Path) -> Result<(), String> {
    let rows: Vec<&Row> = rows.iter().filter(|r| r.workload == workload).collect();
    let mut policies: Vec<&str> = Vec::new();
    for r in &rows {
        if !policies.contains(&r.policy.as_str()) {
            policies.push(&r.policy);
        }
    }
    let max_rate = rows.iter().map(|r| r.rate).fold(0.0, f64::max).max(1.0);
    let max_ttft = rows
        .iter()
        .map(|r| r.summary.ttft_mean)
        .filter(|t| t.is_finite())
        .fold(0.0, f64::max)
        .max(0.01);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Mean TTFT vs request rate ({workload})"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_rate * 1.05, 0.0..max_ttft * 1.1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("request rate (req/s)")
        .y_desc("mean TTFT (s)")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, p) in policies.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.policy == *p)
            .map(|r| (r.rate, r.summary.ttft_mean))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(*p)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|pt| Circle::new(pt, 3, color.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Bar chart of mean and p90 TTFT per row (one bar pair per row), for runs at one rate.
pub fn plot_ttft_bars(rows: &[Row], title: &str, path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let max = rows
        .iter()
        .map(|r| r.summary.ttft_p90.max(r.summary.ttft_mean))
        .filter(|t| t.is_finite())
        .fold(0.0, f64::max)
        .max(0.001);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = rows.len().max(1) as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0..n * 3, 0.0..max * 1.15)
        .map_err(|e| err(&e))?;
    let labels: Vec<String> = rows.iter().map(|r| r.policy.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len() * 3)
        .x_label_formatter(&|x| {
            if x % 3 == 1 {
                labels.get((x / 3) as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("TTFT (s)")
        .draw()
        .map_err(|e| err(&e))?;
    for (k, (name, color)) in [("mean", COLORS[1]), ("p90", COLORS[0])]
        .into_iter()
        .enumerate()
    {
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                let v = if k == 0 {
                    r.summary.ttft_mean
                } else {
                    r.summary.ttft_p90
                };
                let x = i as i32 * 3 + k as i32;
                Rectangle::new([(x, 0.0), (x + 1, v)], color.filled())
            }))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
