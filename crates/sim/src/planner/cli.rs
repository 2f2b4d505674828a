//! The flags `kvfleet sim` gains for planner runs and shaped traces, and the command itself.
//!
//! ```text
//! kvfleet sim --trace mooncake.jsonl --curve diurnal:mean=4,peak-ratio=2.5 --duration 24h \
//!     --planner kvfleet,dynamo/all,static-peak --speed-error +30% --timeline day.svg
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use kvfleet_engine::MockProfile;
use kvfleet_planner::policy::{Bounds, DeploymentPolicy, FleetPolicy, RoleBounds, Sla};
use kvfleet_planner::{Algorithm, PlannerConfig, PredictorKind};
use kvfleet_proto::api::{DeploymentMode, PlannerMode};
use kvfleet_proto::profile::PerfProfile;
use serde::{Deserialize, Serialize};

use super::{Controller, PlannerReport, PlannerSimConfig, SpeedError, planner_label, run_planned};
use crate::shape::{RateCurve, format_duration, parse_duration, shape};
use crate::sim::SimConfig;
use crate::trace::TraceRequest;

/// Planner runs and shaped traces (`kvfleet sim --planner ...`).
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Planner and shaped traces")]
pub struct PlannerArgs {
    /// Size the fleet with controllers instead of a fixed --workers, compared side by side:
    /// `kvfleet` (the SLA planner) or `dynamo` (Dynamo's algorithm), each with an optional
    /// `/PREDICTOR` (last, ewma, holt, seasonal; `dynamo/all` runs every predictor),
    /// `static:N`, or `static-peak` (the fewest static workers that hold the SLA through the
    /// busiest hour). E.g. `kvfleet,dynamo/all,static-peak`. A planner may end in `@F`
    /// (`dynamo@0.6`): it plans for the SLA targets times F while attainment is measured
    /// against the targets as given, so controllers compare at equal attainment.
    #[arg(long, value_name = "CONTROLLERS")]
    pub planner: Option<String>,
    /// Replay the trace at a rate that follows this curve: `constant:rate=R`,
    /// `ramp:from=R,to=R,over=D`, `diurnal:mean=R,peak-ratio=2.5[,period=24h,peak-at=12h]`,
    /// `spike:rate=R,factor=4,at=D,for=2m` (R in requests/s, D like 30m).
    #[arg(long, value_name = "SPEC")]
    pub curve: Option<String>,
    /// How long the shaped trace lasts (with --curve).
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    pub duration: String,
    /// TTFT target, ms.
    #[arg(long, default_value_t = 2000.0, value_name = "MS")]
    pub ttft_ms: f64,
    /// ITL target, ms.
    #[arg(long, default_value_t = 25.0, value_name = "MS")]
    pub itl_ms: f64,
    /// The percentile the targets hold at.
    #[arg(long, default_value_t = 90.0, value_name = "P")]
    pub percentile: f64,
    /// Fewest workers.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub min_workers: u32,
    /// Most workers.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_workers: u32,
    /// GPU budget (most workers at once).
    #[arg(long, value_name = "N")]
    pub gpu_budget: Option<u32>,
    /// How long a new worker takes to start serving.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub startup: String,
    /// The planner's interval.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub interval: String,
    /// Scale-down cooldown (default: the planner's, 5m).
    #[arg(long, value_name = "DURATION")]
    pub cooldown: Option<String>,
    /// How the workers' real speed differs from the profile the planner gets, per worker
    /// class: `+30%` (all 30% slower), `-30%`, or `aggregated=+30%,decode=-10%`.
    #[arg(
        long,
        default_value = "0%",
        value_name = "SPEC",
        allow_hyphen_values = true
    )]
    pub speed_error: String,
    /// Predictor of runs given without one (default: the planner's, ewma).
    #[arg(long, value_name = "NAME")]
    pub predictor: Option<String>,
    /// Planner lookahead in intervals (default: the planner's).
    #[arg(long, value_name = "N")]
    pub lookahead: Option<u32>,
    /// Leave the first DURATION out of SLA attainment and GPU-hours (every run starts from
    /// --min-workers, or its static size, whatever the load).
    #[arg(long, default_value = "0s", value_name = "DURATION")]
    pub warmup: String,
    /// Write the runs' timelines (load, workers, TTFT and ITL against targets) as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub timeline: Option<PathBuf>,
    /// Print each predictor's one-step error on the trace's per-interval request rate and stop.
    #[arg(long)]
    pub predictor_errors: bool,
}

/// One controller to run.
#[derive(Debug, Clone, PartialEq)]
enum Spec {
    /// The algorithm, its predictor, and the headroom it plans with.
    Planner(Algorithm, PredictorKind, f64),
    Static(u32),
    StaticPeak,
}

/// Parses `kvfleet`, `kvfleet/holt`, `dynamo/all`, `dynamo@0.6`, `static:8`, `static-peak`.
fn controllers(text: &str, default_predictor: PredictorKind) -> anyhow::Result<Vec<Spec>> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (item, headroom) = match item.split_once('@') {
            None => (item, 1.0),
            Some((name, factor)) => {
                let f: f64 = factor
                    .parse()
                    .ok()
                    .filter(|f: &f64| f.is_finite() && *f > 0.0 && *f <= 2.0)
                    .with_context(|| {
                        format!("--planner {item}: expected NAME@F with F above 0 and at most 2")
                    })?;
                if name.starts_with("static") {
                    bail!(
                        "--planner {item}: only a planner takes @F (a static fleet does not plan)"
                    );
                }
                (name, f)
            }
        };
        if item == "static-peak" {
            out.push(Spec::StaticPeak);
            continue;
        }
        if let Some(n) = item.strip_prefix("static:") {
            let n: u32 = n
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .with_context(|| format!("--planner {item}: expected static:N with N ≥ 1"))?;
            out.push(Spec::Static(n));
            continue;
        }
        let (algo, predictor) = item.split_once('/').unwrap_or((item, ""));
        let algorithm = match algo {
            "kvfleet" => Algorithm::Kvfleet,
            "dynamo" => Algorithm::Dynamo,
            other => bail!(
                "--planner: unknown controller `{other}` (expected kvfleet, dynamo, static:N or static-peak)"
            ),
        };
        match predictor {
            "" => out.push(Spec::Planner(algorithm, default_predictor, headroom)),
            "all" => out.extend(
                PredictorKind::ALL
                    .into_iter()
                    .map(|p| Spec::Planner(algorithm, p, headroom)),
            ),
            p => out.push(Spec::Planner(
                algorithm,
                p.parse().with_context(|| format!("--planner {item}"))?,
                headroom,
            )),
        }
    }
    if out.is_empty() {
        bail!("--planner needs at least one controller");
    }
    Ok(out)
}

/// Parses `+30%`, `-0.3`, `aggregated=+30%,decode=-10%`.
pub fn parse_speed_error(text: &str) -> anyhow::Result<SpeedError> {
    let value = |v: &str| -> anyhow::Result<f64> {
        let v = v.trim();
        let (num, scale) = match v.strip_suffix('%') {
            Some(n) => (n, 0.01),
            None => (v, 1.0),
        };
        let x: f64 = num
            .trim_start_matches('+')
            .parse()
            .with_context(|| format!("--speed-error: `{v}` is not a number or percentage"))?;
        let x = x * scale;
        if !(x.is_finite() && x > -0.9 && x < 10.0) {
            bail!("--speed-error {v}: must be above -90% and below +1000%");
        }
        Ok(x)
    };
    let mut error = SpeedError::default();
    for part in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match part.split_once('=') {
            None => {
                let x = value(part)?;
                error = SpeedError {
                    aggregated: x,
                    prefill: x,
                    decode: x,
                };
            }
            Some((class, v)) => {
                let x = value(v)?;
                match class.trim() {
                    "aggregated" => error.aggregated = x,
                    "prefill" => error.prefill = x,
                    "decode" => error.decode = x,
                    other => bail!(
                        "--speed-error: unknown worker class `{other}` (aggregated, prefill, decode)"
                    ),
                }
            }
        }
    }
    Ok(error)
}

fn duration_flag(text: &str, flag: &str) -> anyhow::Result<Duration> {
    parse_duration(text)
        .with_context(|| format!("--{flag} {text}: expected a duration like 30s, 5m or 1h"))
}

impl PlannerArgs {
    /// Whether any planner flag asks for a planner run.
    pub fn wanted(&self) -> bool {
        self.planner.is_some()
    }

    /// The trace to replay: `base` shaped by `--curve` if given.
    pub fn shape_trace(&self, base: Vec<TraceRequest>) -> anyhow::Result<Vec<TraceRequest>> {
        let Some(spec) = &self.curve else {
            return Ok(base);
        };
        let curve: RateCurve = spec.parse()?;
        let duration = duration_flag(&self.duration, "duration")?;
        let shaped = shape(&base, &curve, duration)?;
        eprintln!(
            "shaped {} base requests into {} over {} ({curve})",
            base.len(),
            shaped.len(),
            format_duration(duration)
        );
        Ok(shaped)
    }

    /// The policy a run uses.
    fn policy(
        &self,
        algorithm: Algorithm,
        predictor: PredictorKind,
    ) -> anyhow::Result<FleetPolicy> {
        let mut config = PlannerConfig {
            algorithm,
            predictor,
            interval: duration_flag(&self.interval, "interval")?,
            ..PlannerConfig::default()
        };
        if let Some(c) = &self.cooldown {
            config.cooldown = duration_flag(c, "cooldown")?;
        }
        if let Some(l) = self.lookahead {
            config.lookahead = l.max(1);
        }
        let deployment = DeploymentPolicy {
            name: "sim".into(),
            mode: DeploymentMode::Aggregated,
            planner: PlannerMode::Auto,
            sla: Sla {
                ttft_ms: Some(self.ttft_ms),
                itl_ms: Some(self.itl_ms),
                percentile: self.percentile,
            },
            workers: Bounds {
                min: self.min_workers,
                max: self.max_workers,
            },
            roles: RoleBounds::default(),
        };
        if let Some((field, reason)) = deployment.invalid_fields().into_iter().next() {
            bail!("{field}: {reason}");
        }
        Ok(FleetPolicy {
            config,
            gpu_budget: self.gpu_budget,
            deployments: vec![deployment],
        })
    }
}

/// A row of the comparison table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannerComparison {
    /// The trace (and curve).
    pub trace: String,
    /// Every run.
    pub runs: Vec<PlannerReport>,
    /// GPU-hours of the static fleet sized for the peak, when `static-peak` ran.
    pub static_peak: Option<StaticPeak>,
}

/// The static fleet sized for the busiest hour.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StaticPeak {
    /// Workers.
    pub workers: u32,
    /// `workers` × the trace's span after the warm-up.
    pub gpu_hours: f64,
    /// Its attainment over the busiest hour.
    pub peak_attainment: f64,
    /// The busiest hour's start, s.
    pub window_start_s: f64,
}

/// Runs `kvfleet sim --planner ...` (or `--predictor-errors`).
pub fn run(
    args: &crate::cli::SimArgs,
    base_config: SimConfig,
    trace_name: &str,
    trace: Vec<TraceRequest>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let p = &args.planner;
    let interval = duration_flag(&p.interval, "interval")?;
    if p.predictor_errors {
        return predictor_errors(&trace, interval, out);
    }
    let Some(text) = &p.planner else {
        bail!("--planner is required with --timeline, --speed-error and the other planner flags");
    };
    let default_predictor: PredictorKind = match &p.predictor {
        Some(name) => name.parse()?,
        None => PlannerConfig::default().predictor,
    };
    let specs = controllers(text, default_predictor)?;
    let speed_error = parse_speed_error(&p.speed_error)?;
    let startup = duration_flag(&p.startup, "startup")?;
    let warmup = duration_flag(&p.warmup, "warmup")?;
    let perf = perf_profile(&base_config.profile, &base_config)?;
    let mut static_peak = None;
    let mut configs = Vec::new();
    for spec in &specs {
        let (controller, policy, label, headroom) = match *spec {
            Spec::Planner(algorithm, predictor, headroom) => (
                Controller::Planner,
                p.policy(algorithm, predictor)?,
                match headroom {
                    1.0 => planner_label(algorithm, predictor),
                    f => format!("{}@{f}", planner_label(algorithm, predictor)),
                },
                headroom,
            ),
            Spec::Static(n) => (
                Controller::Static(n),
                p.policy(Algorithm::Kvfleet, default_predictor)?,
                format!("static/{n}"),
                1.0,
            ),
            Spec::StaticPeak => {
                let found = search_static_peak(
                    p,
                    &base_config,
                    &perf,
                    &trace,
                    startup,
                    speed_error,
                    warmup,
                )?;
                static_peak = Some(found);
                continue;
            }
        };
        let initial = match controller {
            Controller::Static(n) => n,
            Controller::Planner => p.min_workers.max(1),
        };
        configs.push(PlannerSimConfig {
            sim: SimConfig {
                workers: initial as usize,
                ..base_config.clone()
            },
            policy,
            controller,
            profile: perf.clone(),
            startup,
            speed_error,
            label,
            warmup,
            headroom,
        });
    }
    let runs = run_all(&configs, &trace, args.jobs)?;
    let comparison = PlannerComparison {
        trace: match &p.curve {
            Some(c) => format!("{trace_name} shaped by {c} over {}", p.duration),
            None => trace_name.to_owned(),
        },
        runs,
        static_peak,
    };
    if let Some(path) = &p.timeline {
        std::fs::write(path, super::plot::render_timeline(&comparison))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &comparison).context("writing JSON")?;
        writeln!(out)?;
    } else {
        write!(out, "{}", markdown(&comparison))?;
    }
    Ok(())
}

/// The performance profile the planner is given: the nominal mock profile's, computed for
/// the simulated scheduler limits.
fn perf_profile(profile: &MockProfile, config: &SimConfig) -> anyhow::Result<PerfProfile> {
    let perf = profile.perf_profile(&config.scheduler);
    perf.validate()
        .context("the mock profile implies an unusable performance profile")?;
    Ok(perf)
}

fn run_all(
    configs: &[PlannerSimConfig],
    trace: &[TraceRequest],
    jobs: usize,
) -> anyhow::Result<Vec<PlannerReport>> {
    crate::cli::run_parallel(
        configs,
        jobs,
        |config| run_planned(config, trace).with_context(|| format!("simulating {}", config.label)),
        |r| {
            eprintln!(
                "{}: SLA met in {:.1}% of {} intervals, {:.1} GPU-hours, peak {} workers, {:.0} s wall",
                r.label,
                r.attainment * 100.0,
                r.intervals,
                r.gpu_hours,
                r.peak_workers,
                r.wall_time_s
            );
        },
    )
}

/// The busiest hour of `trace` (by arrivals), shifted to start at 0.
fn busiest_hour(trace: &[TraceRequest]) -> (Duration, Vec<TraceRequest>) {
    let hour = Duration::from_secs(3600);
    let span = trace.last().map_or(Duration::ZERO, |r| r.arrival);
    if span <= hour {
        return (Duration::ZERO, trace.to_vec());
    }
    // Arrivals per minute, then the best 60-minute window.
    let minutes = span.as_secs() as usize / 60 + 1;
    let mut per_minute = vec![0u64; minutes];
    for r in trace {
        per_minute[(r.arrival.as_secs() / 60) as usize] += 1;
    }
    let mut best = (0u64, 0usize);
    let mut sum: u64 = per_minute.iter().take(60).sum();
    for start in 0..minutes.saturating_sub(60) {
        if sum > best.0 {
            best = (sum, start);
        }
        sum = sum + per_minute[start + 60] - per_minute[start];
    }
    let from = Duration::from_secs(best.1 as u64 * 60);
    let window: Vec<TraceRequest> = trace
        .iter()
        .filter(|r| r.arrival >= from && r.arrival < from + hour)
        .enumerate()
        .map(|(i, r)| TraceRequest {
            line: i + 1,
            arrival: r.arrival - from,
            ..r.clone()
        })
        .collect();
    (from, window)
}

/// The fewest static workers whose SLA attainment over the busiest hour is ≥ 95%.
#[allow(clippy::too_many_arguments)]
fn search_static_peak(
    p: &PlannerArgs,
    base: &SimConfig,
    perf: &PerfProfile,
    trace: &[TraceRequest],
    startup: Duration,
    speed_error: SpeedError,
    warmup: Duration,
) -> anyhow::Result<StaticPeak> {
    let (from, window) = busiest_hour(trace);
    let attainment = |n: u32| -> anyhow::Result<f64> {
        let config = PlannerSimConfig {
            sim: SimConfig {
                workers: n as usize,
                ..base.clone()
            },
            policy: p.policy(Algorithm::Kvfleet, PredictorKind::Holt)?,
            controller: Controller::Static(n),
            profile: perf.clone(),
            startup,
            speed_error,
            label: format!("static/{n}"),
            warmup: Duration::ZERO,
            headroom: 1.0,
        };
        let r = run_planned(&config, &window)?;
        eprintln!(
            "static-peak: {n} workers meet the SLA in {:.1}% of the busiest hour's intervals",
            r.attainment * 100.0
        );
        Ok(r.attainment)
    };
    // Exponential search for a size that holds, then bisection.
    let mut hi = 1u32;
    let mut hi_attainment = attainment(hi)?;
    while hi_attainment < 0.95 {
        if hi >= p.max_workers {
            bail!("static-peak: even {hi} workers miss the SLA in the busiest hour");
        }
        hi = (hi * 2).min(p.max_workers);
        hi_attainment = attainment(hi)?;
    }
    let mut lo = hi / 2;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let a = attainment(mid)?;
        if a >= 0.95 {
            hi = mid;
            hi_attainment = a;
        } else {
            lo = mid;
        }
    }
    // Over the same span as the other runs' GPU-hours (after the warm-up).
    let span = trace
        .last()
        .map_or(0.0, |r| r.arrival.saturating_sub(warmup).as_secs_f64());
    Ok(StaticPeak {
        workers: hi,
        gpu_hours: f64::from(hi) * span / 3600.0,
        peak_attainment: hi_attainment,
        window_start_s: from.as_secs_f64(),
    })
}

/// Each predictor's one-step error on the per-interval arrival rate of `trace`.
fn predictor_errors(
    trace: &[TraceRequest],
    interval: Duration,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let series = rate_series(trace, interval);
    let season = (86_400.0 / interval.as_secs_f64()).round() as usize;
    writeln!(
        out,
        "| predictor | relative MAE | relative RMSE | bias | intervals under-predicted by >10% |"
    )?;
    writeln!(out, "| --- | ---: | ---: | ---: | ---: |")?;
    for kind in PredictorKind::ALL {
        let e = kvfleet_planner::predict::evaluate(kind, season, &series);
        writeln!(
            out,
            "| {kind} | {:.1}% | {:.1}% | {:+.1}% | {:.1}% |",
            e.relative_mae * 100.0,
            e.relative_rmse * 100.0,
            e.relative_bias * 100.0,
            e.under_10pct * 100.0
        )?;
    }
    writeln!(
        out,
        "\n{} intervals of {}, season {season} intervals",
        series.len(),
        format_duration(interval)
    )?;
    Ok(())
}

/// Arrivals per second in each interval of `trace`.
pub fn rate_series(trace: &[TraceRequest], interval: Duration) -> Vec<f64> {
    let step = interval.as_secs_f64().max(1e-3);
    let span = trace.last().map_or(0.0, |r| r.arrival.as_secs_f64());
    let mut counts = vec![0u64; (span / step) as usize + 1];
    for r in trace {
        counts[(r.arrival.as_secs_f64() / step) as usize] += 1;
    }
    counts.into_iter().map(|c| c as f64 / step).collect()
}

/// The comparison as a Markdown table.
pub fn markdown(c: &PlannerComparison) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let static_hours = c.static_peak.as_ref().map(|sp| sp.gpu_hours);
    let _ = writeln!(
        s,
        "| controller | SLA met (intervals) | GPU-hours | vs static peak | peak workers | scale-ups / downs | TTFT p90 | ITL p90 | completed | wall |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in &c.runs {
        let ratio = static_hours.filter(|h| *h > 0.0).map_or_else(
            || "–".to_owned(),
            |h| format!("{:.0}%", r.gpu_hours / h * 100.0),
        );
        let _ = writeln!(
            s,
            "| {} | {:.1}% of {} | {:.1} | {ratio} | {} | {} / {} | {:.0} ms | {:.1} ms | {} of {} | {:.0} s |",
            r.label,
            r.attainment * 100.0,
            r.intervals,
            r.gpu_hours,
            r.peak_workers,
            r.scale_ups,
            r.scale_downs,
            r.ttft_ms.p90,
            r.itl_ms.p90,
            r.completed,
            r.requests,
            r.wall_time_s
        );
    }
    if let Some(sp) = &c.static_peak {
        let _ = writeln!(
            s,
            "| static-peak ({} workers) | {:.1}% of the busiest hour | {:.1} | 100% | {} | – | – | – | – | – |",
            sp.workers,
            sp.peak_attainment * 100.0,
            sp.gpu_hours,
            sp.workers
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_lists_expand() {
        let specs = controllers(
            "kvfleet,dynamo/all,static:8,static-peak",
            PredictorKind::Holt,
        )
        .unwrap();
        assert_eq!(specs.len(), 7);
        assert_eq!(
            specs[0],
            Spec::Planner(Algorithm::Kvfleet, PredictorKind::Holt, 1.0)
        );
        assert_eq!(
            specs[1],
            Spec::Planner(Algorithm::Dynamo, PredictorKind::Last, 1.0)
        );
        assert_eq!(specs[5], Spec::Static(8));
        assert_eq!(specs[6], Spec::StaticPeak);
        assert_eq!(
            controllers("dynamo/holt@0.6", PredictorKind::Ewma).unwrap(),
            [Spec::Planner(Algorithm::Dynamo, PredictorKind::Holt, 0.6)]
        );
        for bad in [
            "hpa",
            "static:0",
            "kvfleet/arima",
            "",
            "dynamo@0",
            "dynamo@x",
            "static:4@0.5",
        ] {
            assert!(controllers(bad, PredictorKind::Holt).is_err(), "{bad}");
        }
    }

    #[test]
    fn speed_errors_parse_per_class() {
        let all = parse_speed_error("+30%").unwrap();
        assert!((all.aggregated - 0.3).abs() < 1e-12 && (all.decode - 0.3).abs() < 1e-12);
        let split = parse_speed_error("aggregated=-30%,decode=0.1").unwrap();
        assert!((split.aggregated + 0.3).abs() < 1e-12);
        assert!((split.decode - 0.1).abs() < 1e-12);
        assert_eq!(split.prefill, 0.0);
        for bad in ["fast", "gpu=+1%", "-95%"] {
            assert!(parse_speed_error(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_series_counts_per_interval() {
        let trace: Vec<TraceRequest> = (0..90)
            .map(|i| TraceRequest {
                line: i + 1,
                arrival: Duration::from_secs(i as u64),
                input_length: 10,
                output_length: 1,
                hash_ids: vec![],
            })
            .collect();
        let series = rate_series(&trace, Duration::from_secs(30));
        assert_eq!(series, vec![1.0, 1.0, 1.0]);
        let (from, hour) = busiest_hour(&trace);
        assert_eq!((from, hour.len()), (Duration::ZERO, 90));
    }
}
