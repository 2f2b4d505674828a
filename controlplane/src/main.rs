//! `kvfleet-controlplane`: parse arguments and configuration, then run one command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kvfleet_controlplane::auth::Role;
use kvfleet_controlplane::config::{self, Config, FileSource, Source};

/// The kvfleet control plane: fleet inventory, deployments, placement and the REST API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (default /etc/kvfleet/controlplane.toml, skipped when absent).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Postgres URL; overrides the file and DATABASE_URL.
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Listen address for the REST API, e.g. 0.0.0.0:8080.
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Any setting, as section.key=value (e.g. --set liveness.lost_after=2m). Repeatable.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Migrate the database, then serve the REST API and run the background loops.
    Serve,
    /// Apply the schema migrations this build carries to the database, then exit.
    Migrate,
    /// Check the configuration and print every problem with where it came from.
    CheckConfig,
    /// Print the fleet CA's certificate (PEM, on stdout) and, on stderr, the
    /// `ca_fingerprint = "sha256:…"` line agents pin: what the CLI's --ca-file and every agent
    /// need to trust an https control plane. Reads the database; the CA exists once the control
    /// plane has started.
    Ca,
    /// Manage API tokens directly in the database (for the first admin, or a lost one).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print it once (only its hash is stored).
    Create {
        /// admin, operator, viewer or join.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        #[arg(long)]
        name: String,
    },
    /// Print a fresh random token without touching the database (for auth.bootstrap_admin_token).
    Generate,
}

fn parse_role(text: &str) -> Result<Role, String> {
    match Role::parse(text) {
        Some(Role::Agent) => Err("agent credentials come from registration".into()),
        Some(role) => Ok(role),
        None => Err(format!(
            "unknown role {text:?} (admin, operator, viewer, join)"
        )),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Command::Token {
        command: TokenCommand::Generate,
    } = &args.command
    {
        return print_line(&kvfleet_controlplane::auth::generate_token());
    }
    let source = match source(&args) {
        Ok(source) => source,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let config = match Config::load(&source) {
        Ok(config) => config,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::CheckConfig = args.command {
        eprintln!("configuration is valid");
        return ExitCode::SUCCESS;
    }
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
    match runtime.block_on(run(args.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes a secret to stdout (the one place this binary prints to stdout, so scripts can
/// capture it).
fn print_line(text: &str) -> ExitCode {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Gathers the configuration layers from the process: file, environment, flags.
fn source(args: &Args) -> anyhow::Result<Source> {
    let file = match &args.config {
        Some(path) => Some(FileSource {
            text: std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
            path: path.clone(),
        }),
        None => {
            let path = PathBuf::from(config::DEFAULT_CONFIG_PATH);
            match std::fs::read_to_string(&path) {
                Ok(text) => Some(FileSource { path, text }),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
                Err(error) => {
                    return Err(error).with_context(|| format!("reading {}", path.display()));
                }
            }
        }
    };
    let env = std::env::vars()
        .filter(|(k, _)| k == "DATABASE_URL" || k.starts_with("KVFLEET_"))
        .collect();
    let mut flags = Vec::new();
    if let Some(url) = &args.database_url {
        flags.push(("database.url".to_owned(), url.clone()));
    }
    if let Some(listen) = &args.listen {
        flags.push(("listen".to_owned(), listen.clone()));
    }
    for pair in &args.set {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--set {pair:?}: expected section.key=value"))?;
        flags.push((key.trim().to_owned(), value.trim().to_owned()));
    }
    Ok(Source { file, env, flags })
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            let notifier = kvfleet_controlplane::systemd::Notifier::from_env(
                |name| std::env::var(name).ok(),
                std::process::id(),
            );
            kvfleet_controlplane::run_notifying(config, listener, shutdown_signal(), notifier).await
        }
        Command::Migrate => {
            let pool = connect(&config).await?;
            kvfleet_controlplane::store::migrate(&pool).await?;
            eprintln!("schema is up to date");
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Create { role, name },
        } => {
            let pool = connect(&config).await?;
            kvfleet_controlplane::store::migrate(&pool).await?;
            let mut tx = pool.begin().await?;
            let token = kvfleet_controlplane::create_token(&mut tx, &name, role, None).await?;
            tx.commit().await?;
            // As `POST /tokens` does: a join token for an API served from the fleet CA carries
            // the CA's fingerprint, so the new node's agent needs no ca_fingerprint line.
            let token = match (&config.tls, role) {
                (kvfleet_controlplane::config::TlsConfig::FleetCa { .. }, Role::Join) => {
                    let cert: Option<String> =
                        sqlx::query_scalar("SELECT cert_pem FROM node_ca WHERE id = 1")
                            .fetch_optional(&pool)
                            .await?;
                    match cert
                        .as_deref()
                        .and_then(kvfleet_proto::CaFingerprint::of_pem)
                    {
                        Some(ca) => kvfleet_proto::JoinTokenText::compose(&ca, &token),
                        None => token,
                    }
                }
                _ => token,
            };
            eprintln!("created {role} token {name:?}; it is shown only now:");
            match print_line(&token) {
                ExitCode::SUCCESS => Ok(()),
                _ => anyhow::bail!("could not write the token to stdout"),
            }
        }
        Command::Ca => {
            let pool = connect(&config).await?;
            let cert: Option<String> =
                sqlx::query_scalar("SELECT cert_pem FROM node_ca WHERE id = 1")
                    .fetch_optional(&pool)
                    .await
                    .context("reading the fleet CA (is the schema migrated?)")?;
            let cert = cert.context(
                "this fleet has no CA yet: start the control plane once (systemctl start \
                 kvfleet-controlplane), then ask again",
            )?;
            let fingerprint = kvfleet_proto::CaFingerprint::of_pem(&cert)
                .context("the stored CA certificate is not PEM")?;
            eprintln!("# the fleet CA; agents pin it with this line in [control_plane]:");
            eprintln!("ca_fingerprint = \"{fingerprint}\"");
            match print_line(cert.trim_end()) {
                ExitCode::SUCCESS => Ok(()),
                _ => anyhow::bail!("could not write the certificate to stdout"),
            }
        }
        Command::Token {
            command: TokenCommand::Generate,
        }
        | Command::CheckConfig => Ok(()),
    }
}

async fn connect(config: &Config) -> anyhow::Result<sqlx::PgPool> {
    kvfleet_controlplane::store::connect(&config.database)
        .await
        .with_context(|| format!("connecting to {}", config::redact_url(&config.database.url)))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
