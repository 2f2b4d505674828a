//! `kvfleet login`, `logout`, `status`, `tokens`, `audit`: who may do what, and what was done.

use std::io::{BufRead as _, IsTerminal as _};

use clap::{Args, Subcommand};
use kvfleet_proto::api::{AuditEntry, CreatedToken, NewToken, Role, Status, Token};
use reqwest::{Method, StatusCode};

use super::client::{ApiError, Client, normalize_url};
use super::output::{self, Table, age, opt, print_fields, print_json, short_id};
use super::{ApiOpts, CliError, ExitCodeKind, config, resolve};

pub(crate) const LOGIN_HELP: &str = "\
The token is checked against the control plane before it is saved, to
~/.config/kvfleet/cli.toml (mode 0600; $XDG_CONFIG_HOME and $KVFLEET_CLI_CONFIG move it).
KVFLEET_URL / KVFLEET_TOKEN and --url / --token override the saved values in every command.

Examples:
  kvfleet login http://cp.example:8080                 # prompts for the token
  echo \"$TOKEN\" | kvfleet login http://cp.example:8080 --token-stdin
  KVFLEET_TOKEN=kvf_... kvfleet login http://127.0.0.1:8080

Where tokens come from: `kvfleet dev` prints one; on a server,
`kvfleet-controlplane token create --role admin --name ops`; an admin can
`kvfleet tokens create --role operator --name ci`.

Exit codes: 0 saved, 2 usage, 3 the token was refused (nothing saved), 5 unreachable.";

pub(crate) const TOKENS_HELP: &str = "\
A TOKEN is its id, an id prefix, its name, or its public prefix (kvf_ + 12 characters, which
the token itself starts with). Roles: admin (everything), operator (deployments, models, node
cordon/drain), viewer (read only), join (lets a new node's agent register, nothing else).

Examples:
  kvfleet tokens
  kvfleet tokens create --name ci --role operator --expires-in 30d
  TOKEN=$(kvfleet tokens create --name gpu-07 --role join)   # single-use, 1 h; secret on stdout
  kvfleet tokens create --name rack-3 --role join --uses 8 --ttl 4h
  kvfleet tokens revoke ci

The secret is shown once, at creation; the control plane stores only its hash.

Exit codes: 0 ok, 1 refused, 2 usage, 3 auth (tokens need the admin role), 4 not found,
5 unreachable.";

#[derive(Debug, Args)]
pub(crate) struct LoginArgs {
    /// The control plane, e.g. http://cp.example:8080 (or --url / KVFLEET_URL).
    #[arg(value_name = "URL")]
    server: Option<String>,
    /// Read the token from the first line of stdin (for scripts).
    #[arg(long)]
    token_stdin: bool,
    #[command(flatten)]
    api: ApiOpts,
}

pub(crate) async fn login(args: LoginArgs) -> Result<(), CliError> {
    let url = args.server.or(args.api.url).ok_or_else(|| {
        CliError::usage("give the control plane's URL: kvfleet login http://HOST:8080")
    })?;
    let url = normalize_url(&url).map_err(CliError::usage)?;
    let token = match (args.token_stdin, args.api.token) {
        (true, _) => read_token_line(false)?,
        (false, Some(token)) => token,
        (false, None) if std::io::stdin().is_terminal() => read_token_line(true)?,
        (false, None) => {
            return Err(CliError::usage(
                "no token: pass --token-stdin, set KVFLEET_TOKEN, or run in a terminal",
            ));
        }
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(CliError::usage("the token is empty"));
    }
    let ca_file = args
        .api
        .ca_file
        .map(|p| std::path::absolute(&p).unwrap_or(p));
    let ca_pem = config::read_ca_file(ca_file.as_deref())?;
    let client = Client::new(url.clone(), Some(token.clone()), ca_pem.as_deref())?;
    let status: Status = client.get("/status", &[]).await?;
    let role = probe_role(&client).await?;
    let path = config::save(&config::CliFile {
        url: Some(url.clone()),
        token: Some(token),
        ca_file,
    })?;
    eprintln!(
        "logged in to {url} (control plane {}, {role}); saved to {}",
        status.version,
        path.display()
    );
    Ok(())
}

fn read_token_line(prompt: bool) -> Result<String, CliError> {
    if prompt {
        // No terminal echo control without another dependency: say so rather than pretend.
        eprint!("token (input is visible; paste and press Enter): ");
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::usage(format!("reading the token: {e}")))?;
    Ok(line)
}

/// Who the token is (`GET /whoami`: its role and name). A token that cannot read the fleet
/// (join, agent) is refused with exit 3, an invalid one too.
async fn probe_role(client: &Client) -> Result<String, CliError> {
    // `WhoAmI` belongs to the control plane; two fields are read, the rest ignored.
    match client.get::<serde_json::Value>("/whoami", &[]).await {
        Ok(who) => Ok(format!(
            "role {}, token {}",
            who["role"].as_str().unwrap_or("?"),
            who["actor"].as_str().unwrap_or("?")
        )),
        Err(ApiError::Status {
            status: StatusCode::FORBIDDEN,
            ..
        }) => Err(CliError::new(
            ExitCodeKind::Auth,
            "this token cannot read the fleet (a join token or an agent credential?): \
             use an admin, operator or viewer token",
        )),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn logout() -> Result<(), CliError> {
    let path = config::path()?;
    if config::remove()? {
        eprintln!("removed {}", path.display());
    } else {
        eprintln!("not logged in ({} does not exist)", path.display());
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct RawArgs {
    /// A path from the server's root, starting with `/`.
    path: String,
    #[command(flatten)]
    api: ApiOpts,
}

pub(crate) async fn raw(args: RawArgs) -> Result<(), CliError> {
    if !args.path.starts_with('/') {
        return Err(CliError::usage(format!(
            "{:?}: give a path from the server's root, such as /api/v1/status",
            args.path
        )));
    }
    let client = config::client(&args.api, true)?;
    let body = client.get_raw(&args.path).await?;
    output::print_text(&body)
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    api: ApiOpts,
}

pub(crate) async fn status(args: StatusArgs) -> Result<(), CliError> {
    let client = config::client(&args.api, true)?;
    let status: Status = client.get("/status", &[]).await?;
    let access = if args.api.token.is_some() || config::load()?.token.is_some() {
        probe_role(&client).await.map_err(|e| e.to_string())
    } else {
        Err("no token".to_owned())
    };
    if args.api.json {
        return print_json(&serde_json::json!({
            "url": client.base(),
            "status": status,
            "access": access.as_ref().map_or_else(|e| e.clone(), Clone::clone),
        }));
    }
    print_fields(&[
        ("control plane", client.base().to_owned()),
        ("version", status.version.clone()),
        ("schema", status.schema_version.to_string()),
        (
            "this replica",
            if status.leader { "leader" } else { "follower" }.to_owned(),
        ),
        (
            "token",
            access.map_or_else(|e| e, |r| format!("valid, {r}")),
        ),
    ])
}

#[derive(Debug, Args)]
pub(crate) struct TokensArgs {
    #[command(flatten)]
    api: ApiOpts,
    #[command(subcommand)]
    command: Option<TokensCommand>,
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// List tokens (the default); secrets are never shown again.
    #[command(visible_alias = "ls")]
    List,
    /// Create a token and print its secret once, alone on stdout.
    Create {
        /// A name that says who or what uses it.
        #[arg(long)]
        name: String,
        /// admin, operator, viewer or join.
        #[arg(long)]
        role: Role,
        /// Lifetime: 3600, 3600s, 90m, 12h, 30d (default: no expiry; join tokens: 1h).
        #[arg(long, visible_alias = "ttl", value_parser = parse_lifetime, value_name = "DURATION")]
        expires_in: Option<i64>,
        /// Join tokens: how many nodes may register with it (default 1).
        #[arg(long, value_name = "N")]
        uses: Option<i32>,
    },
    /// Revoke a token at once (requests with it get 401).
    Revoke {
        // Not named `token`: that is the global --token (the caller's credential).
        #[arg(value_name = "TOKEN")]
        target: String,
    },
}

fn parse_lifetime(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: i64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with s, m, h or d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (s, m, h, d)")),
    };
    n.checked_mul(scale)
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("{text:?}: must be above zero"))
}

pub(crate) async fn tokens(args: TokensArgs) -> Result<(), CliError> {
    let client = config::client(&args.api, false)?;
    let json = args.api.json;
    match args.command.unwrap_or(TokensCommand::List) {
        TokensCommand::List => {
            let tokens: Vec<Token> = client.list("/tokens", &[], None).await?;
            if json {
                return print_json(&tokens);
            }
            let now = chrono::Utc::now();
            let mut table = Table::new(&[
                "ID",
                "NAME",
                "ROLE",
                "PREFIX",
                "STATE",
                "CREATED",
                "EXPIRES",
                "LAST USED",
            ]);
            for t in &tokens {
                let state = if t.revoked_at.is_some() {
                    "revoked"
                } else if t.expires_at.is_some_and(|e| e <= now) {
                    "expired"
                } else if t.uses_left == Some(0) {
                    "used up"
                } else {
                    "active"
                };
                table.row(vec![
                    short_id(&t.id),
                    t.name.clone(),
                    t.role.to_string(),
                    t.prefix.clone(),
                    state.to_owned(),
                    age(Some(t.created_at), now),
                    age(t.expires_at, now),
                    age(t.last_used_at, now),
                ]);
            }
            output::print_table(&table, "tokens")
        }
        TokensCommand::Create {
            name,
            role,
            expires_in,
            uses,
        } => {
            let created: CreatedToken = client
                .write(
                    Method::POST,
                    "/tokens",
                    Some(&NewToken {
                        name,
                        role,
                        expires_in_s: expires_in,
                        uses,
                    }),
                )
                .await?;
            if json {
                return print_json(&created);
            }
            eprintln!(
                "created {} token {:?} ({}){}; the secret is shown only now:",
                created.token.role,
                created.token.name,
                created.token.id,
                created
                    .token
                    .expires_at
                    .map(|e| format!(", expires {}", output::timestamp(Some(e))))
                    .unwrap_or_default()
            );
            let mut paste = created.secret.as_str();
            if let Some(join_token) = &created.join_token {
                // One string for the new node: the token carries the fleet CA's fingerprint.
                if let Ok(text) = kvfleet_proto::JoinTokenText::parse(join_token)
                    && let Some(pin) = text.ca
                {
                    eprintln!(
                        "the token carries this fleet's CA fingerprint ({pin}): an agent given it \
                         as [control_plane] join_token (or join_token_file) needs no \
                         ca_fingerprint line"
                    );
                }
                paste = join_token;
            } else if created.token.role == Role::Join && client.base().starts_with("https://") {
                // A control plane with the operator's own certificate (or an older one): what
                // the new node's agent pins the control plane with, beside the token.
                let ca: kvfleet_proto::api::CaInfo = client.get("/ca", &[]).await?;
                if let Some(pin) = kvfleet_proto::CaFingerprint::of_pem(&ca.cert_pem) {
                    eprintln!(
                        "the agent pins this fleet's CA with, in [control_plane]: \
                         ca_fingerprint = \"{pin}\""
                    );
                }
            }
            let mut out = std::io::stdout().lock();
            std::io::Write::write_all(&mut out, format!("{paste}\n").as_bytes())?;
            Ok(())
        }
        TokensCommand::Revoke { target: token } => {
            let tokens: Vec<Token> = client.list("/tokens", &[], None).await?;
            // A whole token works too: its first 16 characters are the public prefix.
            let query = if token.starts_with("kvf_") {
                token.chars().take(16).collect()
            } else {
                token
            };
            let found = resolve(
                &tokens,
                &query,
                "token",
                |t| t.id.to_string(),
                |t| vec![t.name.clone(), t.prefix.clone()],
            )?;
            let revoked: Token = client
                .write::<(), _>(Method::DELETE, &format!("/tokens/{}", found.id), None)
                .await?;
            if json {
                return print_json(&revoked);
            }
            eprintln!(
                "token {:?} ({}, {}) revoked",
                revoked.name, revoked.prefix, revoked.role
            );
            Ok(())
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    #[command(flatten)]
    api: ApiOpts,
    /// How many entries, newest first.
    #[arg(long, short = 'n', default_value_t = 20)]
    limit: usize,
    /// Only this kind of target: node, deployment, model, token, worker.
    #[arg(long)]
    target_type: Option<String>,
    /// Only this target id (full id).
    #[arg(long)]
    target: Option<String>,
    /// Only this action, e.g. deployment.create, node.drain.
    #[arg(long)]
    action: Option<String>,
}

pub(crate) async fn audit(args: AuditArgs) -> Result<(), CliError> {
    let client = config::client(&args.api, false)?;
    let mut query = Vec::new();
    if let Some(t) = args.target_type {
        query.push(("target_type", t));
    }
    if let Some(t) = args.target {
        query.push(("target_id", t));
    }
    if let Some(a) = args.action {
        query.push(("action", a));
    }
    let entries: Vec<AuditEntry> = client.list("/audit", &query, Some(args.limit)).await?;
    if args.api.json {
        return print_json(&entries);
    }
    let mut table = Table::new(&["ID", "AT", "ACTOR", "ACTION", "TARGET"]);
    for e in &entries {
        table.row(vec![
            e.id.to_string(),
            output::timestamp(Some(e.at)),
            e.actor.clone(),
            e.action.clone(),
            format!("{} {}", e.target_type, opt(e.target_id.as_deref())),
        ]);
    }
    output::print_table(&table, "audit entries")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse_with_units() {
        assert_eq!(parse_lifetime("3600"), Ok(3600));
        assert_eq!(parse_lifetime("90m"), Ok(5400));
        assert_eq!(parse_lifetime("12h"), Ok(43_200));
        assert_eq!(parse_lifetime("30d"), Ok(2_592_000));
        assert!(parse_lifetime("0").is_err());
        assert!(parse_lifetime("5w").is_err());
        assert!(parse_lifetime("h").is_err());
    }
}
