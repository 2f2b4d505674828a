//! A hand-written SVG of a [`Comparison`]: four panels (prefix hit rate, TTFT percentiles,
//! TTFT CDF, requests per worker), one colour per routing mode. No plotting dependency: the
//! output is plain SVG 1.1 that browsers and GitHub render.

use std::fmt::Write as _;

use kvfleet_kv_router::RoutingMode;

use crate::report::{Comparison, ms};

const WIDTH: f64 = 1100.0;
const HEIGHT: f64 = 830.0;
const PANEL_W: f64 = 440.0;
const PANEL_H: f64 = 270.0;

fn color(mode: RoutingMode) -> &'static str {
    match mode {
        RoutingMode::Kv => "#1f77b4",
        RoutingMode::KvBlocks => "#17becf",
        RoutingMode::RoundRobin => "#ff7f0e",
        RoutingMode::Random => "#2ca02c",
        RoutingMode::LeastLoaded => "#d62728",
        RoutingMode::Approximate => "#9467bd",
    }
}

/// Escapes text for an SVG text node or attribute.
pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A plot area: data coordinates map into the rectangle `(x, y, w, h)` (SVG y grows down).
pub(crate) struct Panel {
    pub(crate) x: f64,
    pub(crate) y: f64,
    pub(crate) w: f64,
    pub(crate) h: f64,
}

impl Panel {
    pub(crate) fn frame(&self, out: &mut String, title: &str) {
        let _ = writeln!(
            out,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#888"/>"##,
            self.x, self.y, self.w, self.h
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="15" font-weight="bold">{}</text>"#,
            self.x,
            self.y - 10.0,
            escape(title)
        );
    }

    /// A horizontal grid line with its label at data height `frac` (0 bottom, 1 top).
    pub(crate) fn y_tick(&self, out: &mut String, frac: f64, label: &str) {
        let y = self.y + self.h * (1.0 - frac);
        let _ = writeln!(
            out,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            self.x,
            self.x + self.w,
            self.x - 5.0,
            y + 4.0,
            escape(label)
        );
    }

    fn bar(&self, out: &mut String, x: f64, w: f64, frac: f64, fill: &str, label: Option<&str>) {
        let frac = frac.clamp(0.0, 1.0);
        let top = self.y + self.h * (1.0 - frac);
        let _ = writeln!(
            out,
            r#"<rect x="{:.1}" y="{top:.1}" width="{w:.1}" height="{:.1}" fill="{fill}"/>"#,
            self.x + x,
            self.y + self.h - top
        );
        if let Some(label) = label {
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
                self.x + x + w / 2.0,
                top - 4.0,
                escape(label)
            );
        }
    }

    pub(crate) fn x_label(&self, out: &mut String, x: f64, text: &str) {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
            self.x + x,
            self.y + self.h + 16.0,
            escape(text)
        );
    }
}

/// A log scale over `[lo, hi]` ms with decade ticks (1-2-5 within each decade).
pub(crate) struct LogScale {
    pub(crate) lo: f64,
    pub(crate) hi: f64,
}

impl LogScale {
    pub(crate) fn covering(values: impl Iterator<Item = f64>) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
        for v in values.filter(|v| *v > 0.0 && v.is_finite()) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            return Self { lo: 1.0, hi: 10.0 };
        }
        let lo = 10f64.powf(lo.log10().floor());
        let hi = 10f64.powf(hi.log10().ceil()).max(lo * 10.0);
        Self { lo, hi }
    }

    pub(crate) fn frac(&self, v: f64) -> f64 {
        if v <= self.lo {
            return 0.0;
        }
        (v / self.lo).log10() / (self.hi / self.lo).log10()
    }

    pub(crate) fn ticks(&self) -> Vec<f64> {
        let mut ticks = Vec::new();
        let mut decade = self.lo;
        let dense = (self.hi / self.lo).log10() <= 3.0;
        while decade <= self.hi * 1.0001 {
            ticks.push(decade);
            if dense {
                for m in [2.0, 5.0] {
                    if decade * m < self.hi {
                        ticks.push(decade * m);
                    }
                }
            }
            decade *= 10.0;
        }
        ticks
    }
}

/// Renders the comparison as an SVG document.
pub fn render_svg(comparison: &Comparison) -> String {
    let runs = &comparison.runs;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let subtitle = match runs.first() {
        Some(r) => format!(
            "{} requests on {} mock workers ({}, {} KV blocks of {} tokens each)",
            r.requests, r.workers, r.profile, r.kv_blocks_per_worker, r.block_size
        ),
        None => "no runs".to_owned(),
    };
    let _ = writeln!(
        out,
        r#"<text x="30" y="28" font-size="18" font-weight="bold">kvfleet sim: {}</text><text x="30" y="48" font-size="13">{}</text>"#,
        escape(&comparison.trace),
        escape(&subtitle)
    );
    // Legend.
    for (i, r) in runs.iter().enumerate() {
        let x = 30.0 + i as f64 * 150.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x:.1}" y="60" width="14" height="14" fill="{}"/><text x="{:.1}" y="72" font-size="13">{}</text>"#,
            color(r.mode),
            x + 20.0,
            r.mode
        );
    }
    if runs.is_empty() {
        out.push_str("</svg>\n");
        return out;
    }
    let n = runs.len() as f64;
    let left = Panel {
        x: 80.0,
        y: 120.0,
        w: PANEL_W,
        h: PANEL_H,
    };
    let right_x = 80.0 + PANEL_W + 100.0;

    // 1. Prefix hit rate.
    left.frame(&mut out, "Prefix hit rate (cached / prompt tokens)");
    for pct in [0.0, 0.25, 0.5, 0.75, 1.0] {
        left.y_tick(&mut out, pct, &format!("{:.0} %", pct * 100.0));
    }
    let slot = left.w / n;
    for (i, r) in runs.iter().enumerate() {
        let x = slot * i as f64 + slot * 0.2;
        let label = format!("{:.1} %", r.prefix_hit_rate * 100.0);
        left.bar(
            &mut out,
            x,
            slot * 0.6,
            r.prefix_hit_rate,
            color(r.mode),
            Some(&label),
        );
        left.x_label(&mut out, slot * (i as f64 + 0.5), r.mode.as_str());
    }

    // 2. TTFT percentiles (log scale).
    let ttft = Panel { x: right_x, ..left };
    ttft.frame(&mut out, "TTFT p50 / p90 / p99 (log scale)");
    let scale = LogScale::covering(
        runs.iter()
            .flat_map(|r| [r.ttft_ms.p50, r.ttft_ms.p90, r.ttft_ms.p99]),
    );
    for t in scale.ticks() {
        ttft.y_tick(&mut out, scale.frac(t), &tick_label(t));
    }
    let slot = ttft.w / n;
    for (i, r) in runs.iter().enumerate() {
        let bar_w = slot * 0.8 / 3.0;
        for (k, (v, opacity)) in [
            (r.ttft_ms.p50, 1.0),
            (r.ttft_ms.p90, 0.7),
            (r.ttft_ms.p99, 0.45),
        ]
        .into_iter()
        .enumerate()
        {
            let x = slot * i as f64 + slot * 0.1 + bar_w * k as f64;
            let top = ttft.y + ttft.h * (1.0 - scale.frac(v));
            let _ = writeln!(
                out,
                r#"<rect x="{:.1}" y="{top:.1}" width="{bar_w:.1}" height="{:.1}" fill="{}" fill-opacity="{opacity}"><title>{} {}: {}</title></rect>"#,
                ttft.x + x,
                ttft.y + ttft.h - top,
                color(r.mode),
                r.mode,
                ["p50", "p90", "p99"][k],
                ms(v)
            );
        }
        ttft.x_label(&mut out, slot * (i as f64 + 0.5), r.mode.as_str());
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">three bars per mode: p50 (solid), p90, p99 (lightest)</text>"#,
        ttft.x + ttft.w / 2.0,
        ttft.y + ttft.h + 34.0
    );

    // 3. TTFT CDF (log x).
    let lower = 120.0 + PANEL_H + 110.0;
    let cdf = Panel {
        x: 80.0,
        y: lower,
        w: PANEL_W,
        h: PANEL_H,
    };
    cdf.frame(&mut out, "TTFT CDF (log scale)");
    let scale = LogScale::covering(runs.iter().flat_map(|r| r.ttft_cdf_ms.iter().copied()));
    for pct in [0.0, 0.25, 0.5, 0.75, 0.9, 1.0] {
        cdf.y_tick(&mut out, pct, &format!("{:.0} %", pct * 100.0));
    }
    // Decades only on this axis: 1-2-5 labels would collide.
    let decades = scale
        .ticks()
        .into_iter()
        .filter(|t| (t.log10() - t.log10().round()).abs() < 1e-9);
    for t in decades {
        let x = cdf.w * scale.frac(t);
        let _ = writeln!(
            out,
            r##"<line x1="{x0:.1}" y1="{:.1}" x2="{x0:.1}" y2="{:.1}" stroke="#eee"/>"##,
            cdf.y,
            cdf.y + cdf.h,
            x0 = cdf.x + x
        );
        cdf.x_label(&mut out, x, &tick_label(t));
    }
    for r in runs {
        let points: Vec<String> = r
            .ttft_cdf_ms
            .iter()
            .enumerate()
            .map(|(p, &v)| {
                let x = cdf.x + cdf.w * scale.frac(v);
                let y = cdf.y + cdf.h * (1.0 - p as f64 / 100.0);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            color(r.mode),
            points.join(" ")
        );
    }

    // 4. Requests per worker.
    let load = Panel {
        x: right_x,
        y: lower,
        w: PANEL_W,
        h: PANEL_H,
    };
    load.frame(&mut out, "Requests per worker (each bar one worker)");
    let most = runs
        .iter()
        .flat_map(|r| r.per_worker.iter().map(|w| w.requests))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let top = nice_ceiling(most);
    for k in 0..=4 {
        let v = top * f64::from(k) / 4.0;
        load.y_tick(&mut out, v / top, &format!("{v:.0}"));
    }
    let slot = load.w / n;
    for (i, r) in runs.iter().enumerate() {
        let workers = r.per_worker.len().max(1) as f64;
        let bar_w = slot * 0.8 / workers;
        for (k, w) in r.per_worker.iter().enumerate() {
            let x = slot * i as f64 + slot * 0.1 + bar_w * k as f64;
            load.bar(
                &mut out,
                x,
                bar_w * 0.85,
                w.requests as f64 / top,
                color(r.mode),
                None,
            );
        }
        load.x_label(&mut out, slot * (i as f64 + 0.5), r.mode.as_str());
    }
    out.push_str("</svg>\n");
    out
}

/// The SVG of a sweep: for each fleet size a column with mean TTFT (top) and ITL p99 (bottom)
/// against the request rate, one line per mode.
pub fn render_sweep_svg(sweep: &crate::sweep::Sweep) -> String {
    let mut fleets: Vec<usize> = sweep.cells.iter().map(|c| c.workers).collect();
    fleets.dedup();
    let mut modes: Vec<RoutingMode> = Vec::new();
    for run in sweep.cells.iter().flat_map(|c| &c.runs) {
        if !modes.contains(&run.mode) {
            modes.push(run.mode);
        }
    }
    let (panel_w, panel_h) = (420.0, 240.0);
    let width = 80.0 + fleets.len().max(1) as f64 * (panel_w + 90.0);
    let height = 130.0 + 2.0 * (panel_h + 100.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="30" y="28" font-size="18" font-weight="bold">kvfleet sim: {} — routing modes across load</text><text x="30" y="48" font-size="13">x: multiple of the base rate (which grows with the fleet, so each worker sees the same load)</text>"#,
        escape(&sweep.workload)
    );
    for (i, mode) in modes.iter().enumerate() {
        let x = 30.0 + i as f64 * 150.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x:.1}" y="60" width="14" height="14" fill="{}"/><text x="{:.1}" y="72" font-size="13">{mode}</text>"#,
            color(*mode),
            x + 20.0,
        );
    }
    type Metric = fn(&crate::report::SimReport) -> f64;
    let metrics: [(&str, Metric); 2] = [
        ("mean TTFT", |r| r.ttft_ms.mean),
        ("ITL p99", |r| r.itl_ms.p99),
    ];
    for (col, &workers) in fleets.iter().enumerate() {
        let cells: Vec<&crate::sweep::Cell> = sweep
            .cells
            .iter()
            .filter(|c| c.workers == workers)
            .collect();
        for (row, (name, metric)) in metrics.iter().enumerate() {
            let panel = Panel {
                x: 80.0 + col as f64 * (panel_w + 90.0),
                y: 120.0 + row as f64 * (panel_h + 100.0),
                w: panel_w,
                h: panel_h,
            };
            panel.frame(&mut out, &format!("{name}, {workers} workers"));
            let top = nice_ceiling(
                cells
                    .iter()
                    .flat_map(|c| c.runs.iter().map(metric))
                    .fold(1.0, f64::max),
            );
            for k in 0..=4 {
                let v = top * f64::from(k) / 4.0;
                panel.y_tick(&mut out, v / top, &tick_label(v));
            }
            let n = cells.len().max(1) as f64;
            let x_of = |i: usize| panel.w * (i as f64 + 0.5) / n;
            for (i, cell) in cells.iter().enumerate() {
                panel.x_label(&mut out, x_of(i), &format!("{}×", cell.rate));
            }
            for mode in &modes {
                let points: Vec<(f64, f64, f64)> = cells
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| {
                        let r = c.runs.iter().find(|r| r.mode == *mode)?;
                        let v = metric(r);
                        Some((
                            panel.x + x_of(i),
                            panel.y + panel.h * (1.0 - (v / top).clamp(0.0, 1.0)),
                            v,
                        ))
                    })
                    .collect();
                let stroke = if *mode == RoutingMode::Kv { 3.5 } else { 1.8 };
                let line: Vec<String> = points
                    .iter()
                    .map(|(x, y, _)| format!("{x:.1},{y:.1}"))
                    .collect();
                let _ = writeln!(
                    out,
                    r#"<polyline fill="none" stroke="{}" stroke-width="{stroke}" points="{}"/>"#,
                    color(*mode),
                    line.join(" ")
                );
                for (x, y, v) in points {
                    let _ = writeln!(
                        out,
                        r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{}"><title>{mode}: {}</title></circle>"#,
                        color(*mode),
                        ms(v)
                    );
                }
            }
        }
    }
    out.push_str("</svg>\n");
    out
}

/// An axis label for a round number of ms: "20 ms", "5 s".
pub(crate) fn tick_label(v: f64) -> String {
    if v >= 1000.0 {
        format!("{} s", v / 1000.0)
    } else if v >= 1.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v} ms")
    }
}

/// The smallest 1, 2 or 5 × 10^k at or above `v`.
pub(crate) fn nice_ceiling(v: f64) -> f64 {
    let decade = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * decade)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * decade)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        for (v, c) in [
            (1.0, 1.0),
            (3.0, 5.0),
            (530.0, 1000.0),
            (120.0, 200.0),
            (0.7, 1.0),
        ] {
            assert_eq!(nice_ceiling(v), c, "{v}");
        }
    }

    #[test]
    fn log_scale_spans_whole_decades() {
        let s = LogScale::covering([35.0, 4200.0].into_iter());
        assert_eq!((s.lo, s.hi), (10.0, 10_000.0));
        assert_eq!(s.frac(10.0), 0.0);
        assert!((s.frac(100.0) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(
            s.ticks(),
            [
                10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10_000.0
            ]
        );
    }

    #[test]
    fn a_comparison_renders_every_mode() {
        let trace = crate::trace::parse_trace(
            "{\"timestamp\": 0, \"input_length\": 700, \"output_length\": 3, \"hash_ids\": [1, 2]}\n"
                .as_bytes(),
        )
        .unwrap();
        let runs = [RoutingMode::Kv, RoutingMode::RoundRobin]
            .into_iter()
            .map(|mode| {
                let config = crate::SimConfig {
                    workers: 2,
                    ..crate::SimConfig::default()
                };
                crate::run(&config.with_mode(mode), &trace).unwrap()
            })
            .collect();
        let svg = render_svg(&Comparison {
            trace: "a <trace>".into(),
            runs,
        });
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt;trace&gt;"));
        for mode in ["kv", "round-robin"] {
            assert!(svg.contains(&format!(">{mode}</text>")), "{mode}");
        }
        // One CDF line per mode, and no NaN coordinates from empty or zero data.
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn tick_labels() {
        for (v, text) in [
            (0.5, "0.5 ms"),
            (20.0, "20 ms"),
            (1000.0, "1 s"),
            (5000.0, "5 s"),
        ] {
            assert_eq!(tick_label(v), text);
        }
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b>&\"c\""), "a&lt;b&gt;&amp;&quot;c&quot;");
    }
}
