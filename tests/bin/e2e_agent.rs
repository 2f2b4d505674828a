//! The worker program of the end-to-end tests: `kvfleet-agent`'s `worker` subcommand, built in
//! this package so that its tests can name it (`CARGO_BIN_EXE_kvfleet-e2e-agent`). The tests
//! run the agent itself in-process through `kvfleet_agent::serve_with`.

use std::process::ExitCode;

use clap::Parser as _;
use kvfleet_agent::cli::{Cli, Command};
use kvfleet_agent::config::{LogConfig, LogFormat};

fn main() -> ExitCode {
    let Some(Command::Worker(args)) = Cli::parse().command else {
        eprintln!("kvfleet-e2e-agent: only the `worker` subcommand is available");
        return ExitCode::from(2);
    };
    kvfleet_agent::logging::init(&LogConfig {
        format: if args.log_format == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        },
        level: args.log_level.clone(),
    });
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(std::io::Error::other)
        .and_then(|rt| {
            rt.block_on(kvfleet_agent::worker::process::run(&args.socket))
                .map_err(|e| std::io::Error::other(format!("{e:#}")))
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvfleet-e2e-agent worker: {e}");
            ExitCode::FAILURE
        }
    }
}
