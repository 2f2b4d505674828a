//! The `kvfleet sim` command: flags → [`SimConfig`] → runs → table, JSON and plot.
//!
//! The CLI crate wires it as a subcommand with `Sim(kvfleet_sim::SimArgs)` and
//! `Command::Sim(args) => kvfleet_sim::cli_main(args)`; `examples/sim.rs` runs it standalone.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use kvfleet_engine::{Admission, MockProfile, PoolSizing, TierConfig, TierStorage};
use kvfleet_kv_router::{RouterConfig, RoutingMode};

use crate::report::{Comparison, SimReport};
use crate::sim::{SimConfig, run};
use crate::sweep::{self, SweepArgs};
use crate::trace::TraceRequest;
use crate::workload::WorkloadArgs;

/// Replay a request trace (Mooncake JSONL), or generated chat or agent traffic, on a fleet of
/// mock engines in virtual time.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// The trace: one `{"timestamp", "input_length", "output_length", "hash_ids"}` per line
    /// (needed with `--workload trace`, the default).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Generated workloads instead of a trace (boxed: the CLI's command enum stays small).
    #[command(flatten)]
    pub workload: Box<WorkloadArgs>,
    /// Several fleet sizes and request rates in one run.
    #[command(flatten)]
    pub sweep: Box<SweepArgs>,
    /// Workers in the fleet (one mock engine each).
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Routing mode: kv, round-robin, random, least-loaded, approximate, or all (each in turn).
    #[arg(long, default_value = "kv", value_name = "MODE|all")]
    pub mode: String,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG plot of the runs here.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Mock timing profile (TOML, or JSON by extension); default: Llama 3.1 8B on one H100.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Multiply trace timestamps by this (0.5 = twice the request rate).
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub time_scale: f64,
    /// Replay only the first N requests.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Delay of KV events and load reports on their way to the router, in ms.
    #[arg(long, default_value_t = 5.0, value_name = "MS")]
    pub event_delay_ms: f64,
    /// Interval between workers' load reports, in ms.
    #[arg(long, default_value_t = 100.0, value_name = "MS")]
    pub load_report_ms: f64,
    /// Longest prompt plus output a worker accepts (longer trace requests are refused).
    #[arg(long, default_value_t = 131_072, value_name = "TOKENS")]
    pub max_model_len: usize,
    /// KV blocks per worker, overriding the profile's memory (e.g. to see what a larger cache,
    /// such as host-memory offload, would buy).
    #[arg(long, value_name = "BLOCKS")]
    pub kv_blocks: Option<u32>,
    /// G2 (host memory) blocks per worker: what the device pool evicts is kept there and
    /// onboarded at the profile's `tiers` bandwidth instead of recomputed. 0 = off.
    #[arg(long, default_value_t = 0, value_name = "BLOCKS")]
    pub g2_blocks: u64,
    /// G3 (local disk) blocks per worker, below G2 (or below the device pool without G2).
    #[arg(long, default_value_t = 0, value_name = "BLOCKS")]
    pub g3_blocks: u64,
    /// Which evicted blocks enter G2/G3: `all`, or `reused` (only blocks a later prompt hit).
    #[arg(long, default_value = "all", value_name = "POLICY", value_parser = parse_admission)]
    pub tier_admission: Admission,
    /// Seed of the router's random choices (`random` mode, softmax).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sets one router setting, as `NAME=VALUE` with the names of `kvfleet_kv_router::RouterConfig`
    /// (e.g. `--router itl_weight=0.05 --router tie_fraction=0.05`); repeatable.
    #[arg(long = "router", value_name = "NAME=VALUE")]
    pub router_settings: Vec<String>,
    /// Serve disaggregated: this many of the workers prefill, the rest decode, and each
    /// request's prompt goes to a prefill worker when the agent's decision says so (the same
    /// function the agent runs; see --min-remote-prefill-tokens).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub prefill_workers: usize,
    /// With --prefill-workers: prompts whose part the decode worker does not cache is shorter
    /// than this are prefilled by the decode worker (the deployment's
    /// `min_remote_prefill_tokens`).
    #[arg(long, default_value_t = 256, value_name = "TOKENS")]
    pub min_remote_prefill_tokens: u32,
    /// Modes to simulate at once, each on its own thread (runs are independent, so the
    /// figures do not depend on it; only the wall times do).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub jobs: usize,
    /// Planner runs and shaped traces.
    #[command(flatten)]
    pub planner: crate::planner::cli::PlannerArgs,
}

fn parse_admission(text: &str) -> Result<Admission, String> {
    match text {
        "all" => Ok(Admission::All),
        "reused" => Ok(Admission::Reused),
        other => Err(format!("`{other}`: expected `all` or `reused`")),
    }
}

fn millis(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value / 1e3)
        .with_context(|| format!("--{flag} {value}: expected a non-negative number of ms"))
}

impl SimArgs {
    /// The modes to run, in order.
    pub fn modes(&self) -> anyhow::Result<Vec<RoutingMode>> {
        if self.mode == "all" {
            return Ok(RoutingMode::ALL.to_vec());
        }
        self.mode
            .split(',')
            .map(|m| m.trim().parse::<RoutingMode>().map_err(anyhow::Error::from))
            .collect()
    }

    /// The simulation config these flags describe (the mode is set per run).
    pub fn config(&self) -> anyhow::Result<SimConfig> {
        let mut config = SimConfig {
            workers: self.workers,
            time_scale: self.time_scale,
            event_delay: millis(self.event_delay_ms, "event-delay-ms")?,
            load_report_interval: millis(self.load_report_ms, "load-report-ms")?,
            ..SimConfig::default()
        };
        if config.load_report_interval.is_zero() {
            bail!("--load-report-ms must be positive");
        }
        config.scheduler.max_model_len = self.max_model_len;
        if let Some(blocks) = self.kv_blocks {
            config.pool_from_profile = false;
            config.scheduler.kv_memory = PoolSizing::Blocks(blocks);
        }
        if let Some(path) = &self.profile {
            config.profile = MockProfile::from_file(path)
                .with_context(|| format!("loading mock profile {}", path.display()))?;
        }
        let block_bytes = config.profile.layout.block_bytes() as u64;
        config.scheduler.tiers = TierConfig {
            host_bytes: self.g2_blocks.saturating_mul(block_bytes),
            disk_bytes: self.g3_blocks.saturating_mul(block_bytes),
            admission: self.tier_admission,
            storage: TierStorage::Modelled,
            ..TierConfig::default()
        };
        if let Some(seed) = self.seed {
            config.router.seed = seed;
        }
        config.router = apply_router_settings(&config.router, &self.router_settings)?;
        config.prefill_workers = self.prefill_workers;
        config.disaggregation.min_remote_prefill_tokens = self.min_remote_prefill_tokens;
        if self.prefill_workers >= self.workers {
            bail!(
                "--prefill-workers {} leaves none of the {} workers to decode",
                self.prefill_workers,
                self.workers
            );
        }
        Ok(config)
    }
}

/// `config` with each `NAME=VALUE` applied (the value as JSON, or else as a string), through the
/// config's own deserializer so every field is checked as in a config file.
fn apply_router_settings(
    config: &RouterConfig,
    settings: &[String],
) -> anyhow::Result<RouterConfig> {
    if settings.is_empty() {
        return Ok(config.clone());
    }
    let mut value = serde_json::to_value(config).context("serializing the router config")?;
    for setting in settings {
        let Some((name, text)) = setting.split_once('=') else {
            bail!("--router {setting}: expected NAME=VALUE");
        };
        let parsed = serde_json::from_str(text)
            .unwrap_or_else(|_| serde_json::Value::String(text.to_owned()));
        match value.as_object_mut() {
            Some(fields) if fields.contains_key(name.trim()) => {
                fields.insert(name.trim().to_owned(), parsed);
            }
            _ => bail!("--router {setting}: the router has no setting `{name}`"),
        }
    }
    serde_json::from_value(value).context("--router: a value does not fit its setting")
}

/// Runs `kvfleet sim`: every requested mode over the trace, then prints the table (or JSON)
/// and writes the plot.
pub fn cli_main(args: SimArgs) -> anyhow::Result<()> {
    cli_run(args, &mut std::io::stdout().lock())
}

/// [`cli_main`] writing its table or JSON to `out`.
pub fn cli_run(args: SimArgs, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    if args.sweep.is_sweep() {
        if args.planner.wanted() {
            bail!("--planner runs one fleet over time: leave out the sweep flags");
        }
        return sweep::run_sweep(&args, out);
    }
    let modes = args.modes()?;
    let config = args.config()?;
    let (name, trace) = sweep::workload(&args, 1.0)?;
    let p = &args.planner;
    if p.wanted() || p.predictor_errors {
        if config.prefill_workers > 0 {
            bail!("--planner sizes an aggregated fleet: leave out --prefill-workers");
        }
        let config = config.with_mode(modes[0]);
        return crate::planner::cli::run(&args, config, &name, trace, out);
    }
    if p.curve.is_some() && args.workload.write_trace.is_some() {
        // Shaping a trace to a curve is a tool of its own: the shaped trace is the product.
        return Ok(());
    }
    let runs = run_modes(&config, &trace, &modes, args.jobs)?;
    let comparison = Comparison { trace: name, runs };
    if let Some(path) = &args.plot {
        std::fs::write(path, crate::plot::render_svg(&comparison))
            .with_context(|| format!("writing plot {}", path.display()))?;
    }
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &comparison).context("writing JSON")?;
        writeln!(out)?;
    } else {
        write!(out, "{}", comparison.markdown_table())?;
    }
    Ok(())
}

/// Runs `config` once per mode over `trace`, `jobs` runs at a time, and logs each to stderr.
pub(crate) fn run_modes(
    config: &SimConfig,
    trace: &[TraceRequest],
    modes: &[RoutingMode],
    jobs: usize,
) -> anyhow::Result<Vec<SimReport>> {
    run_parallel(
        modes,
        jobs,
        |&mode| {
            run(&config.clone().with_mode(mode), trace)
                .with_context(|| format!("simulating mode {mode}"))
        },
        |report| {
            eprintln!(
                "{} workers, {}: {} of {} requests completed, hit rate {:.1} %, mean TTFT {:.0} ms \
                 (predicted within {:.1} % at the median), {:.1} s of virtual time in {:.1} s{}",
                report.workers,
                report.mode,
                report.completed,
                report.requests,
                report.prefix_hit_rate * 100.0,
                report.ttft_ms.mean,
                report.ttft_prediction.rel_p50 * 100.0,
                report.virtual_duration_s,
                report.wall_time_s,
                match report.prefill_workers {
                    0 => String::new(),
                    n => format!(", {n} prefill workers: {:?}", report.prefill_decisions),
                }
            );
        },
    )
}

/// Runs `run` on every item, `jobs` at a time on scoped threads, and calls `done` on each
/// result in item order as its chunk finishes. The first error (or a panicked thread) ends it.
pub(crate) fn run_parallel<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    run: impl Fn(&T) -> anyhow::Result<R> + Sync,
    mut done: impl FnMut(&R),
) -> anyhow::Result<Vec<R>> {
    let jobs = jobs.clamp(1, items.len().max(1));
    let mut results = Vec::with_capacity(items.len());
    let run = &run;
    for chunk in items.chunks(jobs) {
        let outcomes: Vec<anyhow::Result<R>> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|item| scope.spawn(move || run(item)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a simulation thread panicked")))
                })
                .collect()
        });
        for outcome in outcomes {
            let result = outcome?;
            done(&result);
            results.push(result);
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    fn parse(args: &[&str]) -> SimArgs {
        Cli::try_parse_from(std::iter::once("sim").chain(args.iter().copied()))
            .unwrap()
            .sim
    }

    #[test]
    fn flags_become_a_config() {
        let args = parse(&[
            "--trace",
            "t.jsonl",
            "--workers",
            "3",
            "--mode",
            "kv,random",
            "--time-scale",
            "0.5",
            "--event-delay-ms",
            "2.5",
            "--kv-blocks",
            "1000",
            "--g2-blocks",
            "4000",
            "--g3-blocks",
            "8000",
            "--tier-admission",
            "reused",
        ]);
        assert_eq!(
            args.modes().unwrap(),
            [RoutingMode::Kv, RoutingMode::Random]
        );
        let config = args.config().unwrap();
        assert_eq!(config.workers, 3);
        assert_eq!(config.time_scale, 0.5);
        assert_eq!(config.event_delay, Duration::from_micros(2500));
        assert_eq!(config.scheduler.max_model_len, 131_072);
        assert!(!config.pool_from_profile);
        assert_eq!(config.scheduler.kv_memory, PoolSizing::Blocks(1000));
        let block_bytes = config.profile.layout.block_bytes() as u64;
        let tiers = &config.scheduler.tiers;
        assert_eq!(tiers.host_bytes, 4000 * block_bytes);
        assert_eq!(tiers.disk_bytes, 8000 * block_bytes);
        assert_eq!(tiers.admission, Admission::Reused);
        assert_eq!(tiers.storage, TierStorage::Modelled);
        assert!(
            !parse(&["--trace", "t"])
                .config()
                .unwrap()
                .scheduler
                .tiers
                .enabled()
        );
        assert!(parse(&["--trace", "t"]).config().unwrap().pool_from_profile);
    }

    #[test]
    fn cli_main_runs_every_mode_in_parallel_and_writes_the_plot() {
        let dir = std::env::temp_dir().join(format!("kvfleet-sim-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let trace = dir.join("trace.jsonl");
        std::fs::write(
            &trace,
            "{\"timestamp\": 0, \"input_length\": 700, \"output_length\": 3, \"hash_ids\": [1, 2]}\n\
             {\"timestamp\": 50, \"input_length\": 600, \"output_length\": 2, \"hash_ids\": [1, 3]}\n",
        )
        .unwrap();
        let plot = dir.join("plot.svg");
        let (trace_arg, plot_arg) = (trace.display().to_string(), plot.display().to_string());
        let args = parse(&[
            "--trace",
            &trace_arg,
            "--workers",
            "2",
            "--mode",
            "all",
            "--jobs",
            "3",
            "--json",
            "--plot",
            &plot_arg,
        ]);
        let mut out = Vec::new();
        cli_run(args, &mut out).unwrap();
        let comparison: Comparison = serde_json::from_slice(&out).unwrap();
        let modes: Vec<RoutingMode> = comparison.runs.iter().map(|r| r.mode).collect();
        assert_eq!(modes, RoutingMode::ALL);
        assert!(comparison.runs.iter().all(|r| r.completed == 2));
        let svg = std::fs::read_to_string(&plot).unwrap();
        for mode in RoutingMode::ALL {
            assert!(svg.contains(&format!(">{mode}</text>")), "{mode}");
        }
        // A bad line fails the command with its line number.
        std::fs::write(&trace, "{\"timestamp\": 0}\n").unwrap();
        let err = cli_run(parse(&["--trace", &trace_arg]), &mut Vec::new()).unwrap_err();
        assert!(format!("{err:#}").contains("trace line 1"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn all_means_every_mode_and_unknown_modes_are_errors() {
        let all = parse(&["--trace", "t", "--mode", "all"]);
        assert_eq!(all.modes().unwrap(), RoutingMode::ALL);
        let bad = parse(&["--trace", "t", "--mode", "fastest"]);
        assert!(bad.modes().unwrap_err().to_string().contains("fastest"));
        let negative = parse(&["--trace", "t", "--event-delay-ms=-1"]);
        assert!(negative.config().is_err());
    }
}
