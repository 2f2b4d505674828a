//! `kvfleet`: the admin CLI. The fleet commands (`login`, `nodes`, `gpus`, `workers`,
//! `models`, `deployments`, `tokens`, `audit`, `status`, `decisions`, `planner`, `profiles`)
//! talk to the control plane's REST API ([`admin`]); `kvfleet dev` runs a one-node fleet on
//! this machine ([`dev`]); the local model tools run the native engine in-process: `kvfleet
//! model init-tiny|inspect`, `kvfleet generate`, `kvfleet bench engine` and `kvfleet profile`
//! (which also runs the mock); `kvfleet sim` is the fleet simulator.
//!
//! This file only parses arguments and maps errors to exit codes; each command lives in its
//! own module.

mod admin;
mod bench;
mod dev;
mod generate;
mod load;
mod model;
mod profile;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Run and manage a kvfleet fleet, and run models locally.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    propagate_version = true,
    after_help = TOP_HELP,
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

const TOP_HELP: &str = "\
Getting started:
  kvfleet dev                                   # a one-node fleet here; prints URLs and a token
  kvfleet login http://127.0.0.1:8080           # then: kvfleet nodes, kvfleet workers, ...
  kvfleet deployments apply -f chat.toml        # `kvfleet deployments --help` shows the file

Fleet commands print tables; add --json for scripts. Their exit codes:
  0 ok, 1 the control plane refused (fields named), 2 usage or a bad file, 3 authentication
  or permission, 4 not found, 5 control plane unreachable.";

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Admin(admin::AdminCommand),
    /// Start a one-node fleet on this machine (Postgres, control plane, agent, the default
    /// SmolLM2 model) and print the OpenAI URL, the web UI URL and an admin token.
    #[command(after_help = dev::DEV_HELP)]
    Dev(dev::DevArgs),
    /// Local model files: create a tiny test model, describe a model.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Generate text with a model on this machine, through the native engine, streaming the
    /// text to stdout and the prefill and decode speed to stderr.
    Generate(generate::GenerateArgs),
    /// Measure throughput on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Measure a worker's performance profile (prefill TTFT by prompt length, decode ITL by
    /// batch × context) on the native engine or the mock, write it as TOML, and --upload it
    /// to the control plane for the SLA planner.
    Profile(Box<profile::ProfileArgs>),
    /// Replay a request trace (Mooncake format) on simulated workers in virtual time and
    /// compare routing modes: prefix hit rate, TTFT/ITL percentiles, per-worker load; with
    /// --planner, size the fleet with the SLA planner over a shaped trace.
    Sim(Box<kvfleet_sim::SimArgs>),
}

fn main() -> ExitCode {
    let result = match Args::parse().command {
        Command::Admin(command) => return admin::run(command),
        Command::Dev(args) => return dev::run(args),
        Command::Model(cmd) => model::run(cmd),
        Command::Generate(args) => generate::run(&args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Sim(args) => kvfleet_sim::cli_main(*args),
        Command::Profile(args) => profile::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks (duplicate argument names, ...), which otherwise only
    /// fire when a command is used.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Args::command().debug_assert();
    }
}
