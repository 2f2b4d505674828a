//! `kvfleet`: the admin CLI. Commands arrive with their issues; each one that is not there yet
//! says so and exits non-zero.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Run and manage a kvfleet fleet.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a one-node fleet on this machine (control plane, agent, default model) and print
    /// the OpenAI URL, the web UI URL and an admin token.
    Dev,
}

fn main() -> ExitCode {
    match Args::parse().command {
        Command::Dev => {
            eprintln!(
                "kvfleet dev: not available yet: it needs the agent and the control plane, \
                 which later issues build. Nothing was started."
            );
            ExitCode::from(2)
        }
    }
}
