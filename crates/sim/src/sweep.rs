//! Comparisons across load: every routing mode on several fleet sizes at several multiples of a
//! workload's base rate, in one command, as one table and one plot.
//!
//! The base rate grows with the fleet so that each worker sees the same load: with
//! `--workers 8 --fleets 8,32 --rates 1,2,4`, the 32-worker fleet runs at 4×, 8× and 16× the
//! rate the 8-worker fleet runs at 1×, 2× and 4×. A trace's rate changes by compressing its
//! timestamps (`--time-scale` divided by the factor); a generated workload's by starting
//! sessions that much faster, with that many more sessions, so every run spans the same time.

use anyhow::{Context, bail};
use clap::Args;
use kvfleet_kv_router::RoutingMode;
use serde::{Deserialize, Serialize};

use crate::cli::{SimArgs, run_modes};
use crate::report::{Comparison, SimReport, ms};
use crate::trace::{TraceRequest, load_trace};
use crate::workload::{WorkloadKind, WorkloadStats, write_trace};

/// The sweep's flags.
#[derive(Debug, Clone, Default, Args)]
pub struct SweepArgs {
    /// Run at these multiples of the workload's base rate (e.g. `1,2,4`).
    #[arg(long, value_delimiter = ',', value_name = "X,...")]
    pub rates: Vec<f64>,
    /// Run on fleets of these sizes (e.g. `8,32`); the base rate is the workload's for
    /// `--workers` workers, scaled with the fleet.
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub fleets: Vec<usize>,
}

impl SweepArgs {
    /// Whether any sweep flag was given.
    pub fn is_sweep(&self) -> bool {
        !self.rates.is_empty() || !self.fleets.is_empty()
    }
}

/// One fleet size at one rate: a run per mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Workers.
    pub workers: usize,
    /// Multiple of the base rate.
    pub rate: f64,
    /// The workload as replayed.
    pub workload: WorkloadStats,
    /// One report per mode.
    pub runs: Vec<SimReport>,
}

/// A whole sweep (the `--json` output of a sweep).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    /// The workload: the trace file or the generator.
    pub workload: String,
    /// Cells by fleet size, then rate.
    pub cells: Vec<Cell>,
}

/// The requests of `args`' workload at `factor` times its base rate, and its name. A trace's
/// rate is changed by the caller through the time scale, so it is returned as read.
pub(crate) fn workload(args: &SimArgs, factor: f64) -> anyhow::Result<(String, Vec<TraceRequest>)> {
    let w = &args.workload;
    let (name, mut requests) = match w.workload {
        WorkloadKind::Trace => {
            let Some(path) = &args.trace else {
                bail!("--trace FILE is needed (or --workload chat|agent to generate traffic)");
            };
            (path.display().to_string(), load_trace(path)?)
        }
        WorkloadKind::Chat => (
            "generated multi-turn chat".to_owned(),
            w.chat().scaled(factor).generate()?,
        ),
        WorkloadKind::Agent => (
            "generated agent bursts".to_owned(),
            w.agent().scaled(factor).generate()?,
        ),
    };
    if let Some(limit) = args.limit {
        requests.truncate(limit);
    }
    let requests = args.planner.shape_trace(requests)?;
    if let Some(path) = &w.write_trace {
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("creating trace {}", path.display()))?,
        );
        write_trace(&requests, &mut file)
            .and_then(|()| std::io::Write::flush(&mut file))
            .with_context(|| format!("writing trace {}", path.display()))?;
    }
    Ok((name, requests))
}

/// Runs the sweep `args` describes and writes its table (or JSON) to `out`, and its plot.
pub(crate) fn run_sweep(args: &SimArgs, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let modes = args.modes()?;
    let base = args.config()?;
    let rates = if args.sweep.rates.is_empty() {
        vec![1.0]
    } else {
        args.sweep.rates.clone()
    };
    let fleets = if args.sweep.fleets.is_empty() {
        vec![args.workers]
    } else {
        args.sweep.fleets.clone()
    };
    if let Some(bad) = rates.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        bail!("--rates: {bad} is not a positive multiple");
    }
    if fleets.contains(&0) || args.workers == 0 {
        bail!("--fleets and --workers need at least one worker");
    }
    let trace_name;
    let trace = if args.workload.workload == WorkloadKind::Trace {
        let (name, requests) = workload(args, 1.0)?;
        trace_name = name;
        Some(requests)
    } else {
        trace_name = String::new();
        None
    };
    let mut sweep = Sweep {
        workload: String::new(),
        cells: Vec::new(),
    };
    for &workers in &fleets {
        for &rate in &rates {
            let factor = rate * workers as f64 / args.workers as f64;
            let mut config = base.clone();
            config.workers = workers;
            let generated;
            let requests: &[TraceRequest] = match &trace {
                Some(requests) => {
                    config.time_scale = base.time_scale / factor;
                    sweep.workload = trace_name.clone();
                    requests
                }
                None => {
                    let (name, requests) = workload(args, factor)?;
                    sweep.workload = name;
                    generated = requests;
                    &generated
                }
            };
            eprintln!(
                "{workers} workers at {rate}× the base rate ({} requests)",
                requests.len()
            );
            let mut stats = WorkloadStats::of(requests);
            stats.duration_s *= config.time_scale;
            let runs = run_modes(&config, requests, &modes, args.jobs)?;
            sweep.cells.push(Cell {
                workers,
                rate,
                workload: stats,
                runs,
            });
        }
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, crate::plot::render_sweep_svg(&sweep))
            .with_context(|| format!("writing plot {}", path.display()))?;
    }
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &sweep).context("writing JSON")?;
        writeln!(out)?;
    } else {
        write!(out, "{}", sweep.markdown())?;
    }
    Ok(())
}

impl Sweep {
    /// Markdown: per cell the table of every mode ([`Comparison::markdown_table`]), then one
    /// table of how `kv` compares with the other modes in each cell.
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for cell in &self.cells {
            let _ = writeln!(
                out,
                "{} workers, {}× the base rate ({} requests):\n",
                cell.workers, cell.rate, cell.workload.requests
            );
            let comparison = Comparison {
                trace: self.workload.clone(),
                runs: cell.runs.clone(),
            };
            out.push_str(&comparison.markdown_table());
            out.push('\n');
        }
        out.push_str(
            "| workers | rate | requests | kv mean TTFT | best other mode | kv vs kv-blocks (mean TTFT) | \
             ITL p99 kv / kv-blocks |\n",
        );
        out.push_str("| ---: | ---: | ---: | ---: | --- | ---: | ---: |\n");
        for cell in &self.cells {
            let Some(verdict) = cell.verdict() else {
                continue;
            };
            let _ = writeln!(
                out,
                "| {} | {}× | {} | {} | {} {} | {:+.1} % | {} / {} |",
                cell.workers,
                cell.rate,
                cell.workload.requests,
                ms(verdict.kv_mean),
                verdict.best_other.0,
                ms(verdict.best_other.1),
                verdict.vs_blocks * 100.0,
                ms(verdict.itl_p99.0),
                ms(verdict.itl_p99.1),
            );
        }
        out
    }
}

/// How `kv` did in one cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// `kv`'s mean TTFT, ms.
    pub kv_mean: f64,
    /// The best other mode and its mean TTFT.
    pub best_other: (RoutingMode, f64),
    /// `kv`'s mean TTFT relative to `kv-blocks`' (−0.1 is 10 % better).
    pub vs_blocks: f64,
    /// ITL p99 of `kv` and `kv-blocks`, ms.
    pub itl_p99: (f64, f64),
}

impl Cell {
    /// `kv` against the rest; `None` unless both `kv` and `kv-blocks` ran.
    pub fn verdict(&self) -> Option<Verdict> {
        let find = |mode| self.runs.iter().find(|r| r.mode == mode);
        let kv = find(RoutingMode::Kv)?;
        let blocks = find(RoutingMode::KvBlocks)?;
        let best_other = self
            .runs
            .iter()
            .filter(|r| r.mode != RoutingMode::Kv)
            .map(|r| (r.mode, r.ttft_ms.mean))
            .min_by(|a, b| a.1.total_cmp(&b.1))?;
        Some(Verdict {
            kv_mean: kv.ttft_ms.mean,
            best_other,
            vs_blocks: kv.ttft_ms.mean / blocks.ttft_ms.mean - 1.0,
            itl_p99: (kv.itl_ms.p99, blocks.itl_ms.p99),
        })
    }
}
