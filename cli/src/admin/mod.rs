//! The admin commands: the fleet over the control plane's REST API (`/api/v1`).
//!
//! `kvfleet login` saves a URL and a token; `nodes`, `gpus`, `workers`, `models`,
//! `deployments`, `tokens`, `audit` and `status` use them. Every command prints a table for
//! people and, with `--json`, the API's own JSON for scripts. Failures map to the exit codes in
//! [`EXIT_CODES_HELP`] in one place ([`client::ApiError::exit_code`]), so scripts can branch on
//! them. The wire types are `kvfleet_proto::api`'s; this module owns only presentation.
//!
//! - [`client`]: HTTP, problem JSON, paging.
//! - [`config`]: where the URL and token come from (flags, `KVFLEET_URL`/`KVFLEET_TOKEN`,
//!   `~/.config/kvfleet/cli.toml`).
//! - [`output`]: tables, JSON, durations and sizes for people.
//! - [`fleet`]: nodes, GPUs, workers. [`catalog`]: models and deployments (`apply -f`).
//!   [`access`]: login, tokens, the audit log, status. [`planner`]: the SLA planner's
//!   decisions, the GPU budget, performance profiles.

pub(crate) mod access;
pub(crate) mod catalog;
pub(crate) mod client;
pub(crate) mod config;
pub(crate) mod fleet;
pub(crate) mod output;
pub(crate) mod planner;

use std::fmt;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use client::ApiError;

/// Shown under every admin command's `--help`.
pub(crate) const EXIT_CODES_HELP: &str = "\
Exit codes (for scripts):
  0  success
  1  the control plane refused the request (invalid input: each field is named; a conflict;
     a server error) or answered something unreadable
  2  usage: bad flags or arguments, an unreadable or malformed file, an ambiguous name
  3  authentication or authorization: no token, a bad or revoked token, a role without the
     permission
  4  not found: no such node, model, deployment, token, ...
  5  the control plane is unreachable (connection refused, timeout, DNS)";

/// The exit statuses of the admin commands; see [`EXIT_CODES_HELP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitCodeKind {
    Api = 1,
    Usage = 2,
    Auth = 3,
    NotFound = 4,
    Unreachable = 5,
}

impl From<ExitCodeKind> for ExitCode {
    fn from(kind: ExitCodeKind) -> ExitCode {
        ExitCode::from(kind as u8)
    }
}

/// A failed admin command: what to print and how to exit.
#[derive(Debug)]
pub(crate) struct CliError {
    pub(crate) kind: ExitCodeKind,
    pub(crate) message: String,
}

impl CliError {
    pub(crate) fn new(kind: ExitCodeKind, message: impl Into<String>) -> Self {
        CliError {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn usage(message: impl Into<String>) -> Self {
        CliError::new(ExitCodeKind::Usage, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        CliError::new(ExitCodeKind::NotFound, message)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ApiError> for CliError {
    fn from(error: ApiError) -> Self {
        CliError::new(error.exit_code(), error.to_string())
    }
}

impl From<std::io::Error> for CliError {
    // Writing to stdout failed (a closed pipe): nothing useful to print, but not success.
    fn from(error: std::io::Error) -> Self {
        CliError::new(ExitCodeKind::Api, format!("writing output: {error}"))
    }
}

/// Where the control plane is and who we are; every admin command takes these.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct ApiOpts {
    /// Control-plane URL, e.g. http://cp.example:8080 (default: the one `kvfleet login` saved).
    #[arg(long, env = "KVFLEET_URL", global = true, value_name = "URL")]
    pub(crate) url: Option<String>,
    /// Bearer token (default: the one `kvfleet login` saved). Prefer KVFLEET_TOKEN: flags are
    /// visible to other users in `ps`.
    #[arg(
        long,
        env = "KVFLEET_TOKEN",
        global = true,
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub(crate) token: Option<String>,
    /// The fleet CA's certificate (PEM) an https control plane is trusted through (default: the
    /// one `kvfleet login` saved). Get it from the control-plane host (GET /api/v1/ca).
    #[arg(long, env = "KVFLEET_CA_FILE", global = true, value_name = "PEM")]
    pub(crate) ca_file: Option<std::path::PathBuf>,
    /// Print the API's JSON instead of a table (lists: a JSON array of every item).
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

/// The admin commands, flattened into `kvfleet`'s top level.
#[derive(Debug, Subcommand)]
pub(crate) enum AdminCommand {
    /// Save a control-plane URL and token for the other commands (checked first).
    #[command(after_help = access::LOGIN_HELP)]
    Login(access::LoginArgs),
    /// Forget the saved URL and token.
    Logout,
    /// The control plane's version, schema and leadership, and who the token is.
    #[command(after_help = EXIT_CODES_HELP)]
    Status(access::StatusArgs),
    /// Nodes: list, get, approve, reject, label, cordon, uncordon, drain, remove.
    #[command(after_help = fleet::NODES_HELP)]
    Nodes(fleet::NodesArgs),
    /// GPUs of every node, with memory and utilization from the last heartbeat.
    #[command(after_help = EXIT_CODES_HELP)]
    Gpus(fleet::GpusArgs),
    /// Workers: which deployment runs where, in which role, desired vs observed state.
    #[command(after_help = EXIT_CODES_HELP)]
    Workers(fleet::WorkersArgs),
    /// Models: list, get, apply -f FILE.toml, rm.
    #[command(after_help = catalog::MODELS_HELP)]
    Models(catalog::ModelsArgs),
    /// Deployments: list, get, apply -f FILE.toml, rm.
    #[command(after_help = catalog::DEPLOYMENTS_HELP, visible_alias = "deploy")]
    Deployments(catalog::DeploymentsArgs),
    /// API tokens: list, create, revoke (admin role).
    #[command(after_help = access::TOKENS_HELP)]
    Tokens(access::TokensArgs),
    /// The audit log, newest first: who changed what, when (admin role).
    #[command(after_help = EXIT_CODES_HELP)]
    Audit(access::AuditArgs),
    /// The SLA planner's decisions, newest first, each with its reason (--explain: the
    /// arithmetic).
    #[command(after_help = planner::DECISIONS_HELP)]
    Decisions(planner::DecisionsArgs),
    /// The planner's fleet-wide settings: the GPU budget.
    #[command(after_help = planner::PLANNER_HELP)]
    Planner(planner::PlannerArgs),
    /// Performance profiles: list a model's, upload, show, delete.
    #[command(after_help = planner::PROFILES_HELP)]
    Profiles(planner::ProfilesArgs),
    /// GET any path of the control plane and print the body (`kvfleet api /api/v1/status`,
    /// `/ui/`, `/metrics`): for scripts and checks, through the same URL, token and CA as the
    /// other commands.
    #[command(after_help = EXIT_CODES_HELP)]
    Api(access::RawArgs),
}

/// Runs one admin command on a small runtime of its own.
pub(crate) fn run(command: AdminCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            error.kind.into()
        }
    }
}

async fn dispatch(command: AdminCommand) -> Result<(), CliError> {
    match command {
        AdminCommand::Login(args) => access::login(args).await,
        AdminCommand::Logout => access::logout(),
        AdminCommand::Status(args) => access::status(args).await,
        AdminCommand::Nodes(args) => fleet::nodes(args).await,
        AdminCommand::Gpus(args) => fleet::gpus(args).await,
        AdminCommand::Workers(args) => fleet::workers(args).await,
        AdminCommand::Models(args) => catalog::models(args).await,
        AdminCommand::Deployments(args) => catalog::deployments(args).await,
        AdminCommand::Tokens(args) => access::tokens(args).await,
        AdminCommand::Audit(args) => access::audit(args).await,
        AdminCommand::Decisions(args) => planner::decisions(args).await,
        AdminCommand::Planner(args) => planner::planner(args).await,
        AdminCommand::Profiles(args) => planner::profiles(args).await,
        AdminCommand::Api(args) => access::raw(args).await,
    }
}

/// Finds the one item a user means by `query`: its full id, a unique id prefix of at least 4
/// characters (tables show 8), or a unique name. Ambiguity is a usage error (exit 2) listing
/// the candidates; nothing matching is not-found (exit 4).
pub(crate) fn resolve<'a, T>(
    items: &'a [T],
    query: &str,
    kind: &str,
    id: impl Fn(&T) -> String,
    names: impl Fn(&T) -> Vec<String>,
) -> Result<&'a T, CliError> {
    let wanted = query.trim();
    let simple = |s: &str| s.replace('-', "").to_ascii_lowercase();
    if let Some(item) = items
        .iter()
        .find(|item| simple(&id(item)) == simple(wanted))
    {
        return Ok(item);
    }
    let by_name: Vec<&T> = items
        .iter()
        .filter(|item| names(item).iter().any(|n| n == wanted))
        .collect();
    let candidates = if by_name.is_empty() && wanted.len() >= 4 {
        items
            .iter()
            .filter(|item| simple(&id(item)).starts_with(&simple(wanted)))
            .collect()
    } else {
        by_name
    };
    match candidates.as_slice() {
        [one] => Ok(one),
        [] => Err(CliError::not_found(format!(
            "no {kind} {wanted:?} (give an id, an id prefix or a name)"
        ))),
        many => Err(CliError::usage(format!(
            "{wanted:?} matches {} {kind}s; give the id: {}",
            many.len(),
            many.iter().map(|i| id(i)).collect::<Vec<_>>().join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_by_id_prefix_and_name() {
        let items = [
            ("3f2a0c1e-0000-4000-8000-000000000001", "alpha"),
            ("3f2b0c1e-0000-4000-8000-000000000002", "beta"),
            ("9a000000-0000-4000-8000-000000000003", "beta"),
        ];
        let find = |q: &str| {
            resolve(
                &items,
                q,
                "node",
                |i| i.0.to_owned(),
                |i| vec![i.1.to_owned()],
            )
            .map(|i| i.1)
            .map_err(|e| e.kind)
        };
        assert_eq!(find("alpha"), Ok("alpha"));
        assert_eq!(find("3f2a0c1e"), Ok("alpha"));
        assert_eq!(find("3F2A0C1E-0000-4000-8000-000000000001"), Ok("alpha"));
        assert_eq!(find("3f2"), Err(ExitCodeKind::NotFound)); // too short to be a prefix
        assert_eq!(find("3f2a"), Ok("alpha"));
        assert_eq!(find("3f2b"), Ok("beta"));
        assert_eq!(find("beta"), Err(ExitCodeKind::Usage)); // two nodes named beta
        assert_eq!(find("gamma"), Err(ExitCodeKind::NotFound));
    }
}
