//! The timeline SVG of planner runs: four stacked panels over time — load (arrivals and each
//! planner's prediction), workers allocated, TTFT and ITL at the SLA percentile per interval
//! against their targets — one colour per run. Series are downsampled to at most
//! [`MAX_POINTS`] points (rates averaged, workers and latencies by their maximum, so a spike
//! or a missed interval stays visible).

use std::fmt::Write as _;

use super::cli::PlannerComparison;
use crate::plot::{LogScale, Panel, escape, nice_ceiling, tick_label};

const WIDTH: f64 = 1100.0;
const PANEL_W: f64 = 900.0;
const PANEL_H: f64 = 170.0;
const LEFT: f64 = 80.0;
/// Points per series at most.
pub const MAX_POINTS: usize = 480;

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// `(x, y)` points downsampled to at most `MAX_POINTS` by `merge` over each bucket.
fn downsample(points: &[(f64, f64)], merge: fn(&[f64]) -> f64) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points.to_vec();
    }
    let per = points.len().div_ceil(MAX_POINTS);
    points
        .chunks(per)
        .map(|c| {
            let ys: Vec<f64> = c.iter().map(|p| p.1).collect();
            (c[c.len() - 1].0, merge(&ys))
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn polyline(
    out: &mut String,
    panel: &Panel,
    points: &[(f64, f64)],
    x_max: f64,
    y: impl Fn(f64) -> f64,
    color: &str,
    dashed: bool,
) {
    if points.is_empty() {
        return;
    }
    let mut d = String::new();
    for &(px, py) in points {
        let sx = panel.x + panel.w * (px / x_max.max(1e-9)).clamp(0.0, 1.0);
        let sy = panel.y + panel.h * (1.0 - y(py).clamp(0.0, 1.0));
        let _ = write!(d, "{sx:.1},{sy:.1} ");
    }
    let dash = if dashed {
        r#" stroke-dasharray="5,3""#
    } else {
        ""
    };
    let _ = writeln!(
        out,
        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.3"{dash}/>"#,
        d.trim_end()
    );
}

fn hline(out: &mut String, panel: &Panel, frac: f64, color: &str, label: &str) {
    let y = panel.y + panel.h * (1.0 - frac.clamp(0.0, 1.0));
    let _ = writeln!(
        out,
        r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-dasharray="8,4" stroke-width="1.5"/><text x="{:.1}" y="{:.1}" font-size="11" fill="{color}">{}</text>"#,
        panel.x,
        panel.x + panel.w,
        panel.x + panel.w + 4.0,
        y + 4.0,
        escape(label)
    );
}

/// Renders the runs' timelines.
pub fn render_timeline(c: &PlannerComparison) -> String {
    let runs = &c.runs;
    let x_max = runs
        .iter()
        .flat_map(|r| r.timeline.last().map(|i| i.end_s))
        .fold(1.0f64, f64::max);
    let hours = x_max > 2.0 * 3600.0;
    let x_unit = if hours { 3600.0 } else { 60.0 };
    let height = 70.0 + 4.0 * (PANEL_H + 55.0) + 20.0 * runs.len() as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" font-family="sans-serif">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="24" font-size="16" font-weight="bold">{}</text>"#,
        escape(&c.trace)
    );
    let panel = |i: usize| Panel {
        x: LEFT,
        y: 60.0 + i as f64 * (PANEL_H + 55.0),
        w: PANEL_W,
        h: PANEL_H,
    };
    let x_ticks = |out: &mut String, p: &Panel| {
        let step = if hours { 2.0 } else { 10.0 };
        let mut t = 0.0;
        while t * x_unit <= x_max {
            let x = p.w * (t * x_unit / x_max);
            p.x_label(out, x, &format!("{t:.0}{}", if hours { "h" } else { "m" }));
            t += step;
        }
    };
    // 1. Load.
    let p = panel(0);
    p.frame(
        &mut out,
        "load: arrivals per second (grey) and each planner's prediction (dashed)",
    );
    let observed: Vec<(f64, f64)> = runs
        .first()
        .map(|r| r.timeline.iter().map(|i| (i.end_s, i.rate)).collect())
        .unwrap_or_default();
    let predicted: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|r| {
            r.timeline
                .iter()
                .filter_map(|i| i.predicted_rate.map(|v| (i.end_s, v)))
                .collect()
        })
        .collect();
    let top = nice_ceiling(
        observed
            .iter()
            .map(|p| p.1)
            .chain(predicted.iter().flatten().map(|p| p.1))
            .fold(1.0, f64::max),
    );
    for k in 0..=4 {
        let v = top * f64::from(k) / 4.0;
        p.y_tick(&mut out, f64::from(k) / 4.0, &format!("{v:.0}"));
    }
    polyline(
        &mut out,
        &p,
        &downsample(&observed, mean),
        x_max,
        |v| v / top,
        "#999",
        false,
    );
    for (i, series) in predicted.iter().enumerate() {
        polyline(
            &mut out,
            &p,
            &downsample(series, mean),
            x_max,
            |v| v / top,
            COLORS[i % COLORS.len()],
            true,
        );
    }
    x_ticks(&mut out, &p);
    // 2. Workers.
    let p = panel(1);
    p.frame(
        &mut out,
        "workers allocated (serving + starting + draining)",
    );
    let workers: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|r| {
            r.timeline
                .iter()
                .map(|i| (i.end_s, f64::from(i.serving + i.starting + i.draining)))
                .collect()
        })
        .collect();
    let static_workers = c.static_peak.as_ref().map(|s| f64::from(s.workers));
    let top = nice_ceiling(
        workers
            .iter()
            .flatten()
            .map(|p| p.1)
            .chain(static_workers)
            .fold(1.0, f64::max),
    );
    for k in 0..=4 {
        let v = top * f64::from(k) / 4.0;
        p.y_tick(&mut out, f64::from(k) / 4.0, &format!("{v:.0}"));
    }
    for (i, series) in workers.iter().enumerate() {
        polyline(
            &mut out,
            &p,
            &downsample(series, max),
            x_max,
            |v| v / top,
            COLORS[i % COLORS.len()],
            false,
        );
    }
    if let Some(n) = static_workers {
        hline(
            &mut out,
            &p,
            n / top,
            "#555",
            &format!("static peak {n:.0}"),
        );
    }
    x_ticks(&mut out, &p);
    // 3, 4. Latencies against targets.
    let pct = runs.first().map_or(90.0, |r| r.percentile);
    for (slot, name, target, get) in [
        (
            2usize,
            "TTFT",
            runs.first().and_then(|r| r.ttft_target_ms),
            (|i: &super::IntervalReport| i.ttft_ms) as fn(&super::IntervalReport) -> Option<f64>,
        ),
        (
            3,
            "ITL",
            runs.first().and_then(|r| r.itl_target_ms),
            |i: &super::IntervalReport| i.itl_ms,
        ),
    ] {
        let p = panel(slot);
        p.frame(
            &mut out,
            &format!("{name} p{pct} per interval (log scale) against its target"),
        );
        let series: Vec<Vec<(f64, f64)>> = runs
            .iter()
            .map(|r| {
                r.timeline
                    .iter()
                    .filter_map(|i| get(i).map(|v| (i.end_s, v)))
                    .collect()
            })
            .collect();
        let scale = LogScale::covering(series.iter().flatten().map(|p| p.1).chain(target));
        for t in scale.ticks() {
            p.y_tick(&mut out, scale.frac(t), &tick_label(t));
        }
        for (i, s) in series.iter().enumerate() {
            polyline(
                &mut out,
                &p,
                &downsample(s, max),
                x_max,
                |v| scale.frac(v),
                COLORS[i % COLORS.len()],
                false,
            );
        }
        if let Some(t) = target {
            hline(
                &mut out,
                &p,
                scale.frac(t),
                "#000",
                &format!("target {}", tick_label(t)),
            );
        }
        x_ticks(&mut out, &p);
    }
    // Legend.
    let y0 = 60.0 + 4.0 * (PANEL_H + 55.0);
    for (i, r) in runs.iter().enumerate() {
        let y = y0 + 20.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{LEFT}" y="{:.1}" width="14" height="4" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="12">{} — SLA met {:.1}% of intervals, {:.1} GPU-hours, peak {} workers</text>"#,
            y - 6.0,
            COLORS[i % COLORS.len()],
            LEFT + 20.0,
            y,
            escape(&r.label),
            r.attainment * 100.0,
            r.gpu_hours,
            r.peak_workers
        );
    }
    out.push_str("</svg>\n");
    out
}
