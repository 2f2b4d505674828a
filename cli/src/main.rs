//! `kvfleet`: the admin CLI. Fleet commands arrive with their issues; each one that is not there
//! yet says so and exits non-zero. The local model tools run the native engine in-process:
//! `kvfleet model init-tiny|inspect`, `kvfleet generate` and `kvfleet bench engine`.
//!
//! This file only parses arguments and maps errors to exit codes; each command lives in its
//! own module.

mod bench;
mod generate;
mod load;
mod model;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Run and manage a kvfleet fleet, and run models locally.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a one-node fleet on this machine (control plane, agent, default model) and print
    /// the OpenAI URL, the web UI URL and an admin token.
    Dev,
    /// Local model files: create a tiny test model, describe a model.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Generate text with a model on this machine, through the native engine, streaming the
    /// text to stdout and the prefill and decode speed to stderr.
    Generate(generate::GenerateArgs),
    /// Measure throughput on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Replay a request trace (Mooncake format) on simulated workers in virtual time and
    /// compare routing modes: prefix hit rate, TTFT/ITL percentiles, per-worker load.
    Sim(kvfleet_sim::SimArgs),
}

fn main() -> ExitCode {
    let result = match Args::parse().command {
        Command::Dev => {
            eprintln!(
                "kvfleet dev: not available yet: it needs the agent and the control plane, \
                 which later issues build. Nothing was started."
            );
            return ExitCode::from(2);
        }
        Command::Model(cmd) => model::run(cmd),
        Command::Generate(args) => generate::run(&args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Sim(args) => kvfleet_sim::cli_main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
