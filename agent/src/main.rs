//! `kvfleet-agent`: parse → build → run → drain. Everything else is in the library.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use kvfleet_agent::cli::{Cli, Command, RunArgs};
use kvfleet_agent::config::{
    Config, FlagOverrides, LogConfig, LogFormat, Sources, check_model_files,
};
use kvfleet_agent::{gpu, logging};

fn main() -> ExitCode {
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
        .and_then(|rt| rt.block_on(kvfleet_agent::run(config, shutdown_signal())));
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

fn worker(args: &kvfleet_agent::cli::WorkerArgs) -> ExitCode {
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
        .and_then(|rt| rt.block_on(kvfleet_agent::worker::process::run(&args.socket)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("worker failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
