//! `kvfleet decisions`, `kvfleet planner` and `kvfleet profiles`: what the SLA planner decided
//! and why, the fleet-wide GPU budget, and the performance profiles it plans with.

use std::path::PathBuf;

use clap::Args;
use kvfleet_proto::api::{
    PlannerDecision, PlannerSettings, PlannerSettingsPatch, ProfileInfo, RoleCountsView,
    StoredProfile,
};
use kvfleet_proto::profile::PerfProfile;
use reqwest::Method;

use super::client::Client;
use super::output::{self, Table, opt, print_fields, print_json, short_id};
use super::{ApiOpts, CliError, ExitCodeKind, config};

pub(crate) const DECISIONS_HELP: &str = "\
Every planner round records one decision per deployment whose planner is `advise` or `auto`:
the targets per role, a one-sentence reason, and (with --explain) the inputs, predictions,
corrections and the sizing arithmetic.

Examples:
  kvfleet decisions                       # newest first, changes and holds
  kvfleet decisions -d chat --changes     # only the rounds that changed something
  kvfleet decisions --explain 1234        # one decision in full
  kvfleet decisions -d chat --json | jq '.[0].detail.prediction'

Exit codes: 0 ok, 2 usage, 3 auth, 4 not found, 5 unreachable.";

pub(crate) const PLANNER_HELP: &str = "\
The fleet-wide GPU budget caps the workers all deployments hold together (GPUs and CPU slots);
when the deployments want more, the planner says which lost and why. It must cover what the
deployments' minimums add up to. A deployment's own SLA, bounds and planner mode are in its
file (`kvfleet deployments --help`).

Examples:
  kvfleet planner                   # budget, interval, last round
  kvfleet planner --gpu-budget 64
  kvfleet planner --gpu-budget none # no fleet-wide limit

Exit codes: 0 ok, 1 refused (the budget is below the minimums), 2 usage, 3 auth, 5 unreachable.";

pub(crate) const PROFILES_HELP: &str = "\
Performance profiles (docs/profiles.md) say how fast a model prefills and decodes on a device
kind; the planner sizes deployments with them. `kvfleet profile` measures and uploads one.

Examples:
  kvfleet profiles llama-3.1-8b                 # the model's profiles, one per device kind
  kvfleet profiles llama-3.1-8b --upload h100.toml
  kvfleet profiles --show 3f2a0c1e-...          # one profile with its tables (TOML)
  kvfleet profiles --rm 3f2a0c1e-...

Exit codes: 0 ok, 1 refused (the field at fault named), 2 usage or an unreadable file,
3 auth, 4 not found, 5 unreachable.";

#[derive(Debug, Args)]
pub(crate) struct DecisionsArgs {
    #[command(flatten)]
    api: ApiOpts,
    /// Only this deployment's (name or id).
    #[arg(short = 'd', long, value_name = "DEPLOYMENT")]
    deployment: Option<String>,
    /// Leave out rounds that changed nothing.
    #[arg(long)]
    changes: bool,
    /// At most this many (newest first).
    #[arg(long, default_value_t = 20, value_name = "N")]
    limit: usize,
    /// Show one decision in full: inputs, predictions, corrections, arithmetic.
    #[arg(long, value_name = "ID")]
    explain: Option<i64>,
}

fn counts(c: &RoleCountsView) -> String {
    let mut parts = Vec::new();
    for (name, n) in [
        ("agg", c.aggregated),
        ("prefill", c.prefill),
        ("decode", c.decode),
    ] {
        if n > 0 {
            parts.push(format!("{n} {name}"));
        }
    }
    if parts.is_empty() {
        "0".to_owned()
    } else {
        parts.join(" + ")
    }
}

pub(crate) async fn decisions(args: DecisionsArgs) -> Result<(), CliError> {
    let client = config::client(&args.api, false)?;
    let mut query = Vec::new();
    if let Some(d) = &args.deployment {
        query.push(("deployment", d.clone()));
    }
    if args.changes {
        query.push(("changes_only", "true".to_owned()));
    }
    if let Some(id) = args.explain {
        // Pages are newest first: walk until the id.
        let all: Vec<PlannerDecision> = client
            .list("/planner/decisions", &query, Some(10_000))
            .await?;
        let Some(d) = all.into_iter().find(|d| d.id == id) else {
            return Err(CliError::not_found(format!("no planner decision {id}")));
        };
        if args.api.json {
            return print_json(&d);
        }
        return explain(&d);
    }
    let items: Vec<PlannerDecision> = client
        .list("/planner/decisions", &query, Some(args.limit))
        .await?;
    if args.api.json {
        return print_json(&items);
    }
    let mut table = Table::new(&[
        "ID",
        "AT",
        "DEPLOYMENT",
        "MODE",
        "ACTION",
        "WORKERS",
        "APPLIED",
        "REASON",
    ]);
    for d in &items {
        table.row(vec![
            d.id.to_string(),
            output::timestamp(Some(d.at)),
            d.deployment.clone(),
            d.mode.to_string(),
            d.action.clone(),
            format!("{} → {}", counts(&d.current), counts(&d.targets)),
            if d.applied { "yes" } else { "-" }.to_owned(),
            d.reason.clone(),
        ]);
    }
    output::print_table(&table, "planner decisions")
}

fn explain(d: &PlannerDecision) -> Result<(), CliError> {
    let detail = &d.detail;
    let get = |path: &[&str]| {
        let mut v = detail;
        for key in path {
            v = v.get(*key).unwrap_or(&serde_json::Value::Null);
        }
        v.clone()
    };
    let number = |path: &[&str]| get(path).as_f64().map(|v| format!("{v:.2}"));
    print_fields(&[
        ("decision", d.id.to_string()),
        ("at", output::timestamp(Some(d.at))),
        (
            "deployment",
            format!("{} ({})", d.deployment, short_id(&d.deployment_id)),
        ),
        ("mode", d.mode.to_string()),
        ("decided by", d.decided_by.clone()),
        ("action", d.action.clone()),
        (
            "workers",
            format!("{} → {}", counts(&d.current), counts(&d.targets)),
        ),
        (
            "applied",
            if d.applied {
                "yes: placement was asked for the targets".to_owned()
            } else {
                "no".to_owned()
            },
        ),
        ("reason", d.reason.clone()),
        (
            "observed",
            format!(
                "{} req/s, TTFT {} ms, ITL {} ms (at the SLA percentile)",
                opt(number(&["inputs", "rate"])),
                opt(number(&["inputs", "ttft_ms"])),
                opt(number(&["inputs", "itl_ms"])),
            ),
        ),
        (
            "predicted",
            format!(
                "{} req/s by {}",
                opt(number(&["prediction", "rate"])),
                opt(get(&["prediction", "predictor"]).as_str()),
            ),
        ),
    ])?;
    let lines: Vec<String> = get(&["arithmetic"])
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    std::io::Write::write_all(&mut out, b"\narithmetic:\n")?;
    for line in lines {
        std::io::Write::write_all(&mut out, format!("  {line}\n").as_bytes())?;
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct PlannerArgs {
    #[command(flatten)]
    api: ApiOpts,
    /// Set the fleet-wide GPU budget (`none` removes it; operator role).
    #[arg(long, value_name = "N|none")]
    gpu_budget: Option<String>,
}

pub(crate) async fn planner(args: PlannerArgs) -> Result<(), CliError> {
    let client = config::client(&args.api, false)?;
    let settings: PlannerSettings = match &args.gpu_budget {
        None => client.get("/planner", &[]).await?,
        Some(text) => {
            let budget = match text.as_str() {
                "none" => None,
                n => Some(n.parse::<i32>().map_err(|_| {
                    CliError::usage(format!("--gpu-budget {n}: expected a number or `none`"))
                })?),
            };
            let patch = PlannerSettingsPatch {
                gpu_budget: Some(budget),
            };
            client
                .write(Method::PATCH, "/planner", Some(&patch))
                .await?
        }
    };
    if args.api.json {
        return print_json(&settings);
    }
    print_fields(&[
        (
            "gpu budget",
            settings
                .gpu_budget
                .map_or_else(|| "none".to_owned(), |b| b.to_string()),
        ),
        ("minimums", settings.minimums.to_string()),
        ("interval", format!("{} s", settings.interval_s)),
        ("last round", output::timestamp(settings.last_round_at)),
    ])
}

#[derive(Debug, Args)]
pub(crate) struct ProfilesArgs {
    #[command(flatten)]
    api: ApiOpts,
    /// The model (name or id) whose profiles to list or upload to.
    #[arg(value_name = "MODEL")]
    model: Option<String>,
    /// Upload this profile file (TOML) for MODEL (operator role).
    #[arg(long, value_name = "FILE.toml")]
    upload: Option<PathBuf>,
    /// Show one profile (TOML).
    #[arg(long, value_name = "ID")]
    show: Option<String>,
    /// Delete one profile (operator role).
    #[arg(long, value_name = "ID")]
    rm: Option<String>,
}

/// Reads a profile file, checking it locally first (the control plane checks again).
pub(crate) fn read_profile(path: &PathBuf) -> Result<PerfProfile, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("reading {}: {e}", path.display())))?;
    PerfProfile::from_toml_str(&text)
        .map_err(|e| CliError::usage(format!("{}: {e}", path.display())))
}

/// Uploads `profile` for `model`; returns what the control plane stored.
pub(crate) async fn upload(
    client: &Client,
    model: &str,
    profile: &PerfProfile,
) -> Result<StoredProfile, CliError> {
    Ok(client
        .write(
            Method::POST,
            &format!("/models/{model}/profiles"),
            Some(profile),
        )
        .await?)
}

pub(crate) async fn profiles(args: ProfilesArgs) -> Result<(), CliError> {
    let client = config::client(&args.api, false)?;
    if let Some(id) = &args.show {
        let stored: StoredProfile = client.get(&format!("/profiles/{id}"), &[]).await?;
        if args.api.json {
            return print_json(&stored);
        }
        let text = stored
            .profile
            .to_toml_string()
            .map_err(|e| CliError::new(ExitCodeKind::Api, e.to_string()))?;
        let mut out = std::io::stdout().lock();
        std::io::Write::write_all(&mut out, text.as_bytes())?;
        return Ok(());
    }
    if let Some(id) = &args.rm {
        client.delete(&format!("/profiles/{id}")).await?;
        eprintln!("profile {id} deleted");
        return Ok(());
    }
    let Some(model) = &args.model else {
        return Err(CliError::usage(
            "name a model: kvfleet profiles MODEL [--upload FILE.toml]",
        ));
    };
    if let Some(path) = &args.upload {
        let profile = read_profile(path)?;
        let stored = upload(&client, model, &profile).await?;
        if args.api.json {
            return print_json(&stored);
        }
        eprintln!(
            "profile for {} on {} stored ({})",
            stored.info.model, stored.info.device, stored.info.id
        );
        return Ok(());
    }
    let items: Vec<ProfileInfo> = client
        .get(&format!("/models/{model}/profiles"), &[])
        .await?;
    if args.api.json {
        return print_json(&items);
    }
    let mut table = Table::new(&["ID", "DEVICE", "ENGINE", "UPDATED", "SOURCE"]);
    for p in &items {
        table.row(vec![
            p.id.to_string(),
            p.device.clone(),
            p.engine.clone(),
            output::timestamp(Some(p.updated_at)),
            p.source.clone(),
        ]);
    }
    output::print_table(&table, "profiles")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_counts_read_as_text() {
        assert_eq!(
            counts(&RoleCountsView {
                aggregated: 3,
                prefill: 0,
                decode: 0
            }),
            "3 agg"
        );
        assert_eq!(
            counts(&RoleCountsView {
                aggregated: 0,
                prefill: 1,
                decode: 2
            }),
            "1 prefill + 2 decode"
        );
        assert_eq!(counts(&RoleCountsView::default()), "0");
    }
}
