//! `kvfleet models` and `kvfleet deployments`: what the fleet serves, from TOML files.
//!
//! `apply -f FILE.toml` only checks TOML syntax locally; the fields are the API's request body
//! (`NewModel`, `NewDeployment` in `kvfleet_proto::api`) and the control plane validates them,
//! so the CLI never disagrees with the server about what is valid. When it refuses, each field
//! is printed with its line in the file.

use clap::{Args, Subcommand};
use kvfleet_proto::api::{Deployment, DeploymentMode, Model, ObservedWorkerState, Worker};
use reqwest::Method;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use uuid::Uuid;

use super::client::{ApiError, Client};
use super::output::{self, Table, opt, print_fields, print_json, short_id};
use super::{ApiOpts, CliError, ExitCodeKind, config, resolve};

pub(crate) const MODELS_HELP: &str = r#"A MODEL is its id, an id prefix or its name. A model file is the body of POST /api/v1/models
in TOML:

  # smollm2.toml
  name = "smollm2-135m"
  format = "gguf"          # gguf | safetensors | mock
  path = "/var/lib/kvfleet/models/SmolLM2-135M-Instruct.Q4_1.gguf"   # the same on every node
  block_size = 16          # optional: tokens per KV block (1..=1024, default 16)
  # context_length = 8192  # optional
  # memory_bytes = 2000000000   # optional: GPU memory one worker needs

Examples:
  kvfleet models
  kvfleet models apply -f smollm2.toml   # create; an identical model is left unchanged
  kvfleet models get smollm2-135m --json
  kvfleet models rm smollm2-135m         # refused while a deployment uses it

Exit codes: 0 ok, 1 refused (fields named), 2 usage or bad TOML, 3 auth, 4 not found,
5 unreachable."#;

pub(crate) const DEPLOYMENTS_HELP: &str = r#"A DEPLOYMENT is its id, an id prefix or its name. A deployment file is the body of
POST /api/v1/deployments in TOML:

  # chat.toml
  name = "chat"                 # [a-z0-9-], the key `apply` matches on
  model = "smollm2-135m"        # a model's name or id
  mode = "aggregated"           # aggregated | disaggregated
  min_workers = 1
  max_workers = 4
  planner = "auto"              # off (run min_workers) | advise (record decisions) | auto (act)
  migration_limit = 3           # 0..=20; times a request whose worker dies mid-stream resumes
                                # on another worker before it fails (0: never)
  tool_parser = "auto"          # auto (the node's [[models]] setting, else the chat template's)
                                # | hermes | llama3_json | mistral | pythonic
  reasoning_parser = "auto"     # auto | none | think | deepseek_r1 (into reasoning_content)
  [sla]
  ttft_ms = 500                 # time to first token target
  itl_ms = 50                   # inter-token latency target
  percentile = 90               # the targets hold at this percentile (default p90)
  # [roles.prefill]             # disaggregated only: per-role bounds
  # min = 1
  # max = 8
  [placement]
  allow_cpu = true              # may run in CPU slots (default: GPUs only)
  # gpu_name = "H100"
  # node_labels = { zone = "a" }
  [disaggregation]              # optional; used when mode = "disaggregated"
  min_remote_prefill_tokens = 256   # prefill on a prefill worker only when at least this many
                                    # prompt tokens are not cached on the decode worker (0: always)
  max_prefill_queue_tokens = 16384  # ...and the prefill worker's queue stays below this
  prefill_timeout_ms = 30000        # 100..=600000; the decode worker prefills itself after this

`apply` creates the deployment, or updates the one with the same name (the fields given;
a `[disaggregation]` table given replaces the whole policy, its absent keys taking their
defaults; the model of a deployment cannot change). Only TOML syntax is checked here: the control
plane validates the fields and every refused field is printed with its line.

Examples:
  kvfleet deployments
  kvfleet deployments apply -f chat.toml
  kvfleet deployments get chat
  kvfleet deployments rm chat
  kvfleet deployments apply -f chat.toml --json | jq .generation

Exit codes: 0 ok, 1 refused (fields named), 2 usage or bad TOML, 3 auth, 4 not found,
5 unreachable."#;

#[derive(Debug, Args)]
pub(crate) struct ModelsArgs {
    #[command(flatten)]
    api: ApiOpts,
    #[command(subcommand)]
    command: Option<ModelsCommand>,
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// List models (the default).
    #[command(visible_alias = "ls")]
    List,
    /// Show one model.
    Get { model: String },
    /// Register the model in a TOML file (operator role).
    Apply {
        /// The file; `-` reads stdin.
        #[arg(short = 'f', long = "file", value_name = "FILE.toml")]
        file: PathBuf,
    },
    /// Remove a model no deployment uses (operator role).
    #[command(visible_alias = "remove")]
    Rm { model: String },
}

pub(crate) async fn models(args: ModelsArgs) -> Result<(), CliError> {
    let client = config::client(&args.api, false)?;
    let json = args.api.json;
    match args.command.unwrap_or(ModelsCommand::List) {
        ModelsCommand::List => {
            let models: Vec<Model> = client.list("/models", &[], None).await?;
            if json {
                return print_json(&models);
            }
            let mut table = Table::new(&["ID", "NAME", "FORMAT", "BLOCK", "CONTEXT", "PATH"]);
            for m in &models {
                table.row(vec![
                    short_id(&m.id),
                    m.name.clone(),
                    m.format.to_string(),
                    m.block_size.to_string(),
                    opt(m.context_length),
                    m.path.clone(),
                ]);
            }
            output::print_table(&table, "models")
        }
        ModelsCommand::Get { model } => {
            let m = find_model(&client, &model).await?;
            if json {
                return print_json(&m);
            }
            print_fields(&[
                ("id", m.id.to_string()),
                ("name", m.name.clone()),
                ("format", m.format.to_string()),
                ("path", m.path.clone()),
                ("block size", m.block_size.to_string()),
                ("context length", opt(m.context_length)),
                ("memory", output::gib(m.memory_bytes)),
                ("created", output::timestamp(Some(m.created_at))),
            ])
        }
        ModelsCommand::Apply { file } => {
            let (text, body) = read_toml(&file)?;
            let name = body.get("name").and_then(Value::as_str).map(str::to_owned);
            let existing = match &name {
                Some(name) => {
                    let models: Vec<Model> = client.list("/models", &[], None).await?;
                    models.into_iter().find(|m| &m.name == name)
                }
                None => None,
            };
            if let Some(existing) = existing {
                // The API has no way to change a model: identical is fine, different is not.
                let current = serde_json::to_value(&existing).unwrap_or(Value::Null);
                let differing: Vec<&String> = body
                    .iter()
                    .filter(|(k, v)| current.get(k.as_str()) != Some(v))
                    .map(|(k, _)| k)
                    .collect();
                if !differing.is_empty() {
                    return Err(CliError::new(
                        ExitCodeKind::Api,
                        format!(
                            "{}: model {:?} exists with a different {}; a model cannot be \
                             changed: `kvfleet models rm {}` (no deployment may use it) and \
                             apply again, or use another name",
                            file.display(),
                            existing.name,
                            differing
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                            existing.name
                        ),
                    ));
                }
                if json {
                    return print_json(&existing);
                }
                eprintln!("model {} unchanged", existing.name);
                return Ok(());
            }
            let created: Model = client
                .write(Method::POST, "/models", Some(&body))
                .await
                .map_err(|e| field_errors(&file, &text, "model", e))?;
            if json {
                return print_json(&created);
            }
            eprintln!("model {} created ({})", created.name, created.id);
            Ok(())
        }
        ModelsCommand::Rm { model } => {
            let m = find_model(&client, &model).await?;
            client.delete(&format!("/models/{}", m.id)).await?;
            if json {
                return print_json(&m);
            }
            eprintln!("model {} removed", m.name);
            Ok(())
        }
    }
}

async fn find_model(client: &Client, query: &str) -> Result<Model, CliError> {
    if let Ok(id) = query.parse::<Uuid>() {
        return Ok(client.get(&format!("/models/{id}"), &[]).await?);
    }
    let models: Vec<Model> = client.list("/models", &[], None).await?;
    resolve(
        &models,
        query,
        "model",
        |m| m.id.to_string(),
        |m| vec![m.name.clone()],
    )
    .cloned()
}

#[derive(Debug, Args)]
pub(crate) struct DeploymentsArgs {
    #[command(flatten)]
    api: ApiOpts,
    #[command(subcommand)]
    command: Option<DeploymentsCommand>,
}

#[derive(Debug, Subcommand)]
enum DeploymentsCommand {
    /// List deployments with their ready workers (the default).
    #[command(visible_alias = "ls")]
    List,
    /// Show one deployment and its workers.
    Get { deployment: String },
    /// Create or update the deployment in a TOML file (operator role).
    Apply {
        /// The file; `-` reads stdin.
        #[arg(short = 'f', long = "file", value_name = "FILE.toml")]
        file: PathBuf,
    },
    /// Remove a deployment; its workers stop (operator role).
    #[command(visible_alias = "remove")]
    Rm { deployment: String },
}

pub(crate) async fn deployments(args: DeploymentsArgs) -> Result<(), CliError> {
    let client = config::client(&args.api, false)?;
    let json = args.api.json;
    match args.command.unwrap_or(DeploymentsCommand::List) {
        DeploymentsCommand::List => {
            let deployments: Vec<Deployment> = client.list("/deployments", &[], None).await?;
            if json {
                return print_json(&deployments);
            }
            let workers: Vec<Worker> = client.list("/workers", &[], None).await?;
            let mut table = Table::new(&[
                "ID", "NAME", "MODEL", "MODE", "WORKERS", "READY", "TTFT", "ITL", "PLANNER",
            ]);
            for d in &deployments {
                let (ready, live) = ready_count(&workers, d.id);
                table.row(vec![
                    short_id(&d.id),
                    d.name.clone(),
                    d.model.clone(),
                    d.mode.to_string(),
                    format!("{}..{}", d.min_workers, d.max_workers),
                    format!("{ready}/{live}"),
                    opt(d.sla.ttft_ms.map(|v| format!("{v}ms"))),
                    opt(d.sla.itl_ms.map(|v| format!("{v}ms"))),
                    d.planner.to_string(),
                ]);
            }
            output::print_table(&table, "deployments")
        }
        DeploymentsCommand::Get { deployment } => {
            let d = find_deployment(&client, &deployment).await?;
            if json {
                return print_json(&d);
            }
            let workers: Vec<Worker> = client
                .list("/workers", &[("deployment_id", d.id.to_string())], None)
                .await?;
            let (ready, live) = ready_count(&workers, d.id);
            let placement = serde_json::to_string(&d.placement).unwrap_or_default();
            let policy = d.disaggregation;
            // The policy only matters when the deployment is disaggregated; shown always, so a
            // mode switch holds no surprise.
            let disaggregation = format!(
                "remote prefill from {} uncached tokens, prefill queue below {} tokens, \
                 prefill timeout {} ms{}",
                policy.min_remote_prefill_tokens,
                policy.max_prefill_queue_tokens,
                policy.prefill_timeout_ms,
                if d.mode == DeploymentMode::Aggregated {
                    " (unused: aggregated)"
                } else {
                    ""
                }
            );
            print_fields(&[
                ("id", d.id.to_string()),
                ("name", d.name.clone()),
                ("model", format!("{} ({})", d.model, d.model_id)),
                ("mode", d.mode.to_string()),
                (
                    "workers",
                    format!("min {}, max {}", d.min_workers, d.max_workers),
                ),
                ("ready", format!("{ready} of {live}")),
                ("sla ttft", opt(d.sla.ttft_ms.map(|v| format!("{v} ms")))),
                ("sla itl", opt(d.sla.itl_ms.map(|v| format!("{v} ms")))),
                (
                    "sla percentile",
                    format!("p{}", d.sla.percentile_or_default()),
                ),
                ("planner", d.planner.to_string()),
                ("role bounds", role_bounds(&d)),
                ("placement", placement),
                ("disaggregation", disaggregation),
                ("migration limit", d.migration_limit.to_string()),
                (
                    "output parsers",
                    format!("tools {}, reasoning {}", d.tool_parser, d.reasoning_parser),
                ),
                ("generation", d.generation.to_string()),
                ("updated", output::timestamp(Some(d.updated_at))),
            ])?;
            if !workers.is_empty() {
                let mut out = std::io::stdout().lock();
                std::io::Write::write_all(&mut out, b"\n")?;
                let mut table = Table::new(&["WORKER", "NODE", "ROLE", "DESIRED", "OBSERVED"]);
                for w in &workers {
                    table.row(vec![
                        w.id.to_string(),
                        short_id(&w.node_id),
                        w.role.to_string(),
                        w.desired_state.to_string(),
                        w.observed_state.to_string(),
                    ]);
                }
                table.write(&mut out)?;
            }
            Ok(())
        }
        DeploymentsCommand::Apply { file } => apply_deployment(&client, &file, json).await,
        DeploymentsCommand::Rm { deployment } => {
            let d = find_deployment(&client, &deployment).await?;
            client.delete(&format!("/deployments/{}", d.id)).await?;
            if json {
                return print_json(&d);
            }
            eprintln!("deployment {} removed; its workers stop", d.name);
            Ok(())
        }
    }
}

fn role_bounds(d: &Deployment) -> String {
    let mut parts = Vec::new();
    for (name, b) in [("prefill", d.roles.prefill), ("decode", d.roles.decode)] {
        if let Some(b) = b {
            parts.push(format!("{name} {}..{}", b.min, b.max));
        }
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// (ready workers, workers meant to run) of one deployment.
fn ready_count(workers: &[Worker], deployment: Uuid) -> (usize, usize) {
    let mine = workers.iter().filter(|w| w.deployment_id == deployment);
    let live = mine
        .clone()
        .filter(|w| w.desired_state != kvfleet_proto::api::DesiredWorkerState::Stopped)
        .count();
    let ready = mine
        .filter(|w| w.observed_state == ObservedWorkerState::Ready)
        .count();
    (ready, live)
}

pub(crate) async fn find_deployment(client: &Client, query: &str) -> Result<Deployment, CliError> {
    if let Ok(id) = query.parse::<Uuid>() {
        return Ok(client.get(&format!("/deployments/{id}"), &[]).await?);
    }
    let deployments: Vec<Deployment> = client.list("/deployments", &[], None).await?;
    resolve(
        &deployments,
        query,
        "deployment",
        |d| d.id.to_string(),
        |d| vec![d.name.clone()],
    )
    .cloned()
}

async fn apply_deployment(client: &Client, file: &Path, json: bool) -> Result<(), CliError> {
    let (text, mut body) = read_toml(file)?;
    let name = body.get("name").and_then(Value::as_str).map(str::to_owned);
    let existing = match &name {
        Some(name) => {
            let all: Vec<Deployment> = client.list("/deployments", &[], None).await?;
            all.into_iter().find(|d| &d.name == name)
        }
        None => None,
    };
    let Some(before) = existing else {
        let created: Deployment = client
            .write(Method::POST, "/deployments", Some(&body))
            .await
            .map_err(|e| field_errors(file, &text, "deployment", e))?;
        if json {
            return print_json(&created);
        }
        eprintln!(
            "deployment {} created ({}); workers are being placed: `kvfleet workers -d {}`",
            created.name, created.id, created.name
        );
        return Ok(());
    };
    // Update: the patch is the file minus what identifies the deployment.
    body.remove("name");
    if let Some(model) = body.remove("model") {
        let same = model
            .as_str()
            .is_some_and(|m| m == before.model || m == before.model_id.to_string());
        if !same {
            return Err(CliError::new(
                ExitCodeKind::Api,
                format!(
                    "{}: deployment {:?} serves model {:?}; a deployment's model cannot change: \
                     `kvfleet deployments rm {}` and apply again, or use another name",
                    file.display(),
                    before.name,
                    before.model,
                    before.name
                ),
            ));
        }
    }
    let after: Deployment = client
        .write(
            Method::PATCH,
            &format!("/deployments/{}", before.id),
            Some(&body),
        )
        .await
        .map_err(|e| field_errors(file, &text, "deployment", e))?;
    if json {
        return print_json(&after);
    }
    let changed = (
        after.mode,
        after.sla,
        after.min_workers,
        after.max_workers,
        after.roles,
        after.planner,
        &after.placement,
        after.disaggregation,
        after.migration_limit,
        (after.tool_parser, after.reasoning_parser),
    ) != (
        before.mode,
        before.sla,
        before.min_workers,
        before.max_workers,
        before.roles,
        before.planner,
        &before.placement,
        before.disaggregation,
        before.migration_limit,
        (before.tool_parser, before.reasoning_parser),
    );
    if changed {
        eprintln!("deployment {} configured", after.name);
    } else {
        eprintln!("deployment {} unchanged", after.name);
    }
    Ok(())
}

/// Reads a TOML file (or stdin for `-`) into the JSON object the API takes. Only syntax is
/// checked: a malformed file is a usage error (exit 2) with the position toml reports.
fn read_toml(file: &Path) -> Result<(String, Map<String, Value>), CliError> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| CliError::usage(format!("reading stdin: {e}")))?
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| CliError::usage(format!("reading {}: {e}", file.display())))?
    };
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| CliError::usage(format!("{} is not valid TOML: {e}", file.display())))?;
    match serde_json::to_value(table) {
        Ok(Value::Object(map)) => Ok((text, map)),
        Ok(_) | Err(_) => Err(CliError::usage(format!(
            "{}: cannot express this TOML as JSON (dates are not supported)",
            file.display()
        ))),
    }
}

/// A refusal from the server, with each invalid field located in the file.
fn field_errors(file: &Path, text: &str, what: &str, error: ApiError) -> CliError {
    let Some(problem) = error.problem().filter(|p| !p.invalid_params.is_empty()) else {
        let kind = error.exit_code();
        return CliError::new(kind, format!("{}: {error}", file.display()));
    };
    let mut message = format!(
        "{}: the control plane refused the {what} ({}):",
        file.display(),
        problem.title
    );
    for param in &problem.invalid_params {
        let place = match locate(text, &param.name) {
            Some(line) => format!("{}:{line}", file.display()),
            None => file.display().to_string(),
        };
        message.push_str(&format!("\n  {place}: {}: {}", param.name, param.reason));
    }
    CliError::new(error.exit_code(), message)
}

/// The 1-based line of a dotted field path (`sla.ttft_ms`, `placement.nodes[1]`) in TOML text.
fn locate(text: &str, path: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut span = None;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let key = part.split('[').next().unwrap_or(part);
        let (_, value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == key)?;
        span = Some(value.span());
        match value.get_ref() {
            DeValue::Table(inner) if parts.peek().is_some() => table = inner,
            _ => break,
        }
    }
    let start = span?.start;
    Some(text.get(..start)?.matches('\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_located_in_the_file() {
        let text = "name = \"chat\"\nmodel = \"m\"\n\n[sla]\nttft_ms = -1\n\n[placement]\nnodes = [\"x\", \"y\"]\n";
        assert_eq!(locate(text, "name"), Some(1));
        assert_eq!(locate(text, "sla.ttft_ms"), Some(5));
        assert_eq!(locate(text, "placement.nodes[1]"), Some(8));
        assert_eq!(locate(text, "min_workers"), None);
        let inline = "name = \"chat\"\nsla = { ttft_ms = 0 }\n";
        assert_eq!(locate(inline, "sla.ttft_ms"), Some(2));
        let policy = "name = \"chat\"\n[disaggregation]\nmin_remote_prefill_tokens = 0\nprefill_timeout_ms = 5\n";
        assert_eq!(locate(policy, "disaggregation.prefill_timeout_ms"), Some(4));
    }
}
