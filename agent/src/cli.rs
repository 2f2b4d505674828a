//! The command line: `run` (the default), `check-config`, `gpus`, and the internal `worker`
//! subcommand the agent uses to start its own worker processes.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::FlagOverrides;

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
