//! `kvfleet-controlplane`: parse arguments, then run one command.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// The kvfleet control plane: fleet inventory, deployments, placement and the REST API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the schema migrations this build carries to the database, then exit.
    Migrate {
        /// Postgres connection URL, e.g. postgres://kvfleet:secret@127.0.0.1/kvfleet
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Migrate { database_url } => {
            let pool = sqlx::PgPool::connect(&database_url)
                .await
                .context("connecting to Postgres (check --database-url / DATABASE_URL)")?;
            kvfleet_controlplane::store::migrate(&pool)
                .await
                .context("applying migrations")?;
            eprintln!("schema is up to date");
            Ok(())
        }
    }
}
