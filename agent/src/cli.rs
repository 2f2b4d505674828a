//! The command line: `run` (the default), `check-config`, `gpus`, and the internal `worker`
//! subcommand the agent uses to start its own worker processes; [`main`] is the whole binary
//! (`kvfleet-agent`, and the end-to-end tests' copy of it).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, FlagOverrides, Sources, check_model_files};
use crate::logging::{LogConfig, LogFormat};
use crate::{gpu, logging};

/// kvfleet-agent: the kvfleet node agent (OpenAI frontend, GPU inventory, supervised workers).
#[derive(Debug, Parser)]
#[command(name = "kvfleet-agent", version, about)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `run`, also accepted without the subcommand.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve: start the workers and the frontend; SIGTERM drains.
    Run(RunArgs),
    /// Validate a config file and print every problem with its location; exit 1 if any.
    CheckConfig {
        /// The file (default: --config, $KVFLEET_AGENT_CONFIG, then /etc/kvfleet/agent.toml).
        path: Option<PathBuf>,
    },
    /// Print the GPU inventory.
    Gpus {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Internal: run one worker process, talking to the agent over a Unix socket.
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// Options of `run`.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// Config file (default /etc/kvfleet/agent.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Frontend address, e.g. 0.0.0.0:8000 (overrides frontend.listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// Log format: text or json (overrides log.format).
    #[arg(long)]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or kvfleet_agent=debug (overrides log.level).
    #[arg(long)]
    pub log_level: Option<String>,
}

impl RunArgs {
    /// The flags that override config settings.
    pub fn overrides(&self) -> FlagOverrides {
        FlagOverrides {
            listen: self.listen.clone(),
            log_format: self.log_format.clone(),
            log_level: self.log_level.clone(),
        }
    }
}

/// Options of the internal `worker` subcommand.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// The agent's socket for this worker.
    #[arg(long)]
    pub socket: PathBuf,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: String,
    /// Log filter.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// The whole `kvfleet-agent` command: parses the command line and runs what it asks for.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => run(&cli.run),
        Some(Command::Run(args)) => run(&args),
        Some(Command::CheckConfig { path }) => check_config(path.or(cli.run.config)),
        Some(Command::Gpus { json }) => gpus(json),
        Some(Command::Worker(args)) => worker(&args),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn run(args: &RunArgs) -> ExitCode {
    let config = match Sources::from_process(args.config.as_deref(), args.overrides())
        .and_then(|sources| Config::from_sources(&sources))
    {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("kvfleet-agent: invalid configuration:\n{problems}");
            return ExitCode::from(2);
        }
    };
    logging::init(&config.log);
    let result = runtime()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(crate::run(config, shutdown_signal())));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("kvfleet-agent failed: {e:#}");
            eprintln!("kvfleet-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (systemctl stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers: stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn check_config(path: Option<std::path::PathBuf>) -> ExitCode {
    let sources = match Sources::from_process(path.as_deref(), FlagOverrides::default()) {
        Ok(sources) => sources,
        Err(problems) => {
            eprintln!("{problems}");
            return ExitCode::FAILURE;
        }
    };
    let name = sources.file.as_ref().map_or_else(
        || "defaults (no config file)".to_owned(),
        |f| f.path.display().to_string(),
    );
    match Config::from_sources(&sources)
        .and_then(|config| check_model_files(&sources, &config).map(|()| config))
    {
        Ok(config) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{name}: OK ({} models, {} workers configured, frontend on {})",
                config.models.len(),
                config.workers.len(),
                config.frontend.listen
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            eprintln!("{problems}");
            eprintln!("{name}: {} problem(s)", problems.0.len());
            ExitCode::FAILURE
        }
    }
}

fn gpus(json: bool) -> ExitCode {
    logging::init(&LogConfig {
        format: LogFormat::Text,
        level: "warn".into(),
    });
    let inventory = gpu::detect();
    let mut out = std::io::stdout().lock();
    match inventory.snapshot() {
        Ok(snapshot) => {
            let text = if json {
                serde_json::to_string_pretty(&snapshot).unwrap_or_default()
            } else {
                gpu::render(&snapshot)
            };
            let _ = writeln!(out, "{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kvfleet-agent gpus: {e}");
            ExitCode::FAILURE
        }
    }
}

fn worker(args: &WorkerArgs) -> ExitCode {
    let format = if args.log_format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    logging::init(&LogConfig {
        format,
        level: args.log_level.clone(),
    });
    // One engine per process: a current-thread runtime keeps the worker's footprint small.
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(crate::worker::process::run(&args.socket)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("worker failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_is_the_default_and_flags_work_without_it() {
        let cli = Cli::try_parse_from(["kvfleet-agent", "--listen", "127.0.0.1:1"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.overrides().listen.as_deref(), Some("127.0.0.1:1"));
        let cli = Cli::try_parse_from(["kvfleet-agent", "run", "--log-format", "json"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Run(ref a)) if a.log_format.as_deref() == Some("json"))
        );
        let cli = Cli::try_parse_from(["kvfleet-agent", "check-config", "x.toml"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::CheckConfig { path: Some(_) })
        ));
        let cli = Cli::try_parse_from(["kvfleet-agent", "worker", "--socket", "/tmp/s"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Worker(_))));
        assert!(Cli::try_parse_from(["kvfleet-agent", "frobnicate"]).is_err());
    }
}
