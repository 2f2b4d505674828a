//! `kvfleet nodes`, `gpus`, `workers`: what the fleet is and what it is doing.

use std::collections::HashMap;

use clap::{Args, Subcommand};
use std::collections::BTreeMap;

use kvfleet_proto::api::{
    Deployment, Gpu, Node, NodeApproval, NodeLabelsChange, NodeState, Worker, valid_label_key,
};
use kvfleet_proto::kv_stream::KvWorkerBlocks;
use reqwest::Method;
use uuid::Uuid;

use super::output::{self, Table, age, gib, opt, percent, print_fields, print_json, short_id};
use super::{ApiOpts, CliError, config, resolve};
use crate::admin::client::Client;

pub(crate) const NODES_HELP: &str = "\
A NODE is its id, an id prefix (the 8 characters tables show) or its hostname.

Examples:
  kvfleet nodes                          # every node: state, approval, GPUs, last heartbeat
  kvfleet nodes list --state healthy --json | jq -r '.[].hostname'
  kvfleet nodes list --pending           # joins waiting for an admin
  kvfleet nodes approve gpu-01           # let a pending node in: workers, peer certificate
  kvfleet nodes reject gpu-01            # turn it away: it cannot come back without a new token
  kvfleet nodes label gpu-01 zone=a rack-  # set zone, remove rack (admin labels)
  kvfleet nodes get gpu-01               # one node in full
  kvfleet nodes cordon gpu-01            # no new workers there
  kvfleet nodes drain gpu-01             # cordon and move its workers elsewhere
  kvfleet nodes uncordon gpu-01          # schedulable again (ends a drain)
  kvfleet nodes rm gpu-01                # remove: revokes its credential and certificates

Exit codes: 0 ok, 1 refused, 2 usage, 3 auth, 4 not found, 5 unreachable
(`kvfleet --help` explains each).";

#[derive(Debug, Args)]
pub(crate) struct NodesArgs {
    #[command(flatten)]
    api: ApiOpts,
    #[command(subcommand)]
    command: Option<NodesCommand>,
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// List nodes (the default).
    #[command(visible_alias = "ls")]
    List {
        /// Only nodes in this state: joining, healthy, unhealthy, lost, removed.
        #[arg(long)]
        state: Option<NodeState>,
        /// Only nodes waiting for an admin's approval.
        #[arg(long)]
        pending: bool,
    },
    /// Show one node in full.
    Get { node: String },
    /// Place no new workers on the node; running ones stay (operator role).
    Cordon { node: String },
    /// Make the node schedulable again; ends a drain (operator role).
    Uncordon { node: String },
    /// Cordon the node and move its workers elsewhere: replacement first, then the old worker
    /// stops (operator role).
    Drain { node: String },
    /// Remove the node: its workers are replaced, its agent credential and certificates are
    /// revoked (admin role). The agent must `register` with a join token to come back.
    #[command(visible_alias = "remove")]
    Rm { node: String },
    /// Let a pending node in: placement may give it workers and its agent gets a peer
    /// certificate at its next heartbeat (admin role).
    Approve { node: String },
    /// Turn a pending node away: it is removed and its credential revoked, so its agent cannot
    /// come back without a new join token (admin role).
    Reject { node: String },
    /// Set (`key=value`) or remove (`key-`) admin labels (admin role). They sit beside the
    /// labels the node's agent reports; placement matches both, and an admin label wins on a
    /// shared key. The agent cannot change them.
    Label {
        node: String,
        /// `key=value` to set, `key-` to remove.
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        labels: Vec<String>,
    },
}

/// `key=value` and `key-` arguments as a labels change.
fn parse_label_args(args: &[String]) -> Result<NodeLabelsChange, CliError> {
    let mut change = NodeLabelsChange::default();
    for arg in args {
        if let Some((key, value)) = arg.split_once('=') {
            if !valid_label_key(key) {
                return Err(CliError::usage(format!(
                    "{arg:?}: a label key is 1 to 63 of A-Za-z0-9._/- and starts with a letter \
                     or digit"
                )));
            }
            change.set.insert(key.to_owned(), value.to_owned());
        } else if let Some(key) = arg.strip_suffix('-').filter(|k| valid_label_key(k)) {
            change.remove.push(key.to_owned());
        } else {
            return Err(CliError::usage(format!(
                "{arg:?}: write key=value to set a label or key- to remove one"
            )));
        }
    }
    Ok(change)
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        "-".to_owned()
    } else {
        labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub(crate) async fn nodes(args: NodesArgs) -> Result<(), CliError> {
    let client = config::client(&args.api, false)?;
    let json = args.api.json;
    let list_all = NodesCommand::List {
        state: None,
        pending: false,
    };
    match args.command.unwrap_or(list_all) {
        NodesCommand::List { state, pending } => {
            let mut query: Vec<(&str, String)> = state
                .map(|s| ("state", s.as_str().to_owned()))
                .into_iter()
                .collect();
            if pending {
                query.push(("approval", NodeApproval::Pending.as_str().to_owned()));
            }
            let nodes: Vec<Node> = client.list("/nodes", &query, None).await?;
            if json {
                return print_json(&nodes);
            }
            let now = chrono::Utc::now();
            let mut table = Table::new(&[
                "ID",
                "HOSTNAME",
                "STATE",
                "APPROVAL",
                "SCHEDULING",
                "GPUS",
                "CPU SLOTS",
                "FRONTEND",
                "HEARTBEAT",
                "VERSION",
            ]);
            for n in &nodes {
                table.row(vec![
                    short_id(&n.id),
                    n.hostname.clone(),
                    n.state.to_string(),
                    n.approval.to_string(),
                    scheduling(n).to_owned(),
                    n.gpu_count.to_string(),
                    n.cpu_slots.to_string(),
                    opt(n.frontend_addr.as_deref()),
                    age(n.last_heartbeat_at, now),
                    opt(n.agent_version.as_deref()),
                ]);
            }
            output::print_table(&table, "nodes")?;
            let waiting = nodes
                .iter()
                .filter(|n| n.approval == NodeApproval::Pending)
                .count();
            if waiting > 0 {
                eprintln!(
                    "{waiting} node(s) wait for approval: `kvfleet nodes approve NODE` lets one \
                     in, `kvfleet nodes reject NODE` turns it away"
                );
            }
            Ok(())
        }
        NodesCommand::Get { node } => {
            let node = find_node(&client, &node).await?;
            if json {
                return print_json(&node);
            }
            print_node(&node)
        }
        NodesCommand::Cordon { node } => change(&client, &node, "cordon", json).await,
        NodesCommand::Uncordon { node } => change(&client, &node, "uncordon", json).await,
        NodesCommand::Drain { node } => change(&client, &node, "drain", json).await,
        NodesCommand::Rm { node } => {
            let found = find_node(&client, &node).await?;
            let removed: Node = client
                .write::<(), _>(Method::DELETE, &format!("/nodes/{}", found.id), None)
                .await?;
            if json {
                return print_json(&removed);
            }
            eprintln!(
                "node {} ({}) removed: its workers will be placed elsewhere and its credential \
                 and certificates are revoked",
                removed.hostname, removed.id
            );
            Ok(())
        }
        NodesCommand::Approve { node } => {
            let node = post_node::<()>(&client, &node, "approve", None).await?;
            if json {
                return print_json(&node);
            }
            eprintln!(
                "node {} ({}) approved: it may get workers, and its agent gets its peer \
                 certificate at its next heartbeat",
                node.hostname, node.id
            );
            Ok(())
        }
        NodesCommand::Reject { node } => {
            let node = post_node::<()>(&client, &node, "reject", None).await?;
            if json {
                return print_json(&node);
            }
            eprintln!(
                "node {} ({}) rejected: its credential is revoked; it needs a new join token to \
                 ask again",
                node.hostname, node.id
            );
            Ok(())
        }
        NodesCommand::Label { node, labels } => {
            let change = parse_label_args(&labels)?;
            let node = post_node(&client, &node, "labels", Some(&change)).await?;
            if json {
                return print_json(&node);
            }
            eprintln!(
                "node {} ({}): admin labels {}; placement matches {}",
                node.hostname,
                short_id(&node.id),
                labels_text(&node.admin_labels),
                labels_text(&node.labels)
            );
            Ok(())
        }
    }
}

async fn post_node<B: serde::Serialize>(
    client: &Client,
    query: &str,
    verb: &str,
    body: Option<&B>,
) -> Result<Node, CliError> {
    let found = find_node(client, query).await?;
    Ok(client
        .write(Method::POST, &format!("/nodes/{}/{verb}", found.id), body)
        .await?)
}

fn scheduling(node: &Node) -> &'static str {
    if node.draining {
        "draining"
    } else if node.cordoned {
        "cordoned"
    } else {
        "schedulable"
    }
}

async fn change(client: &Client, query: &str, verb: &str, json: bool) -> Result<(), CliError> {
    let found = find_node(client, query).await?;
    let node: Node = client
        .write::<(), _>(Method::POST, &format!("/nodes/{}/{verb}", found.id), None)
        .await?;
    if json {
        return print_json(&node);
    }
    eprintln!(
        "node {} ({}): {}",
        node.hostname,
        short_id(&node.id),
        scheduling(&node)
    );
    Ok(())
}

/// A node by id (one GET) or by id prefix / hostname (a listing).
pub(crate) async fn find_node(client: &Client, query: &str) -> Result<Node, CliError> {
    if let Ok(id) = query.parse::<Uuid>() {
        return Ok(client.get(&format!("/nodes/{id}"), &[]).await?);
    }
    let nodes: Vec<Node> = client.list("/nodes", &[], None).await?;
    resolve(
        &nodes,
        query,
        "node",
        |n| n.id.to_string(),
        |n| vec![n.hostname.clone()],
    )
    .cloned()
}

fn print_node(n: &Node) -> Result<(), CliError> {
    let now = chrono::Utc::now();
    print_fields(&[
        ("id", n.id.to_string()),
        ("hostname", n.hostname.clone()),
        (
            "state",
            format!("{} (since {})", n.state, age(Some(n.state_changed_at), now)),
        ),
        ("approval", n.approval.to_string()),
        ("scheduling", scheduling(n).to_owned()),
        ("labels", labels_text(&n.labels)),
        ("reported labels", labels_text(&n.reported_labels)),
        ("admin labels", labels_text(&n.admin_labels)),
        ("addresses", n.addresses.join(", ")),
        ("frontend", opt(n.frontend_addr.as_deref())),
        ("peer", opt(n.peer_addr.as_deref())),
        ("gpus", n.gpu_count.to_string()),
        ("cpu slots", n.cpu_slots.to_string()),
        ("agent version", opt(n.agent_version.as_deref())),
        ("last heartbeat", age(n.last_heartbeat_at, now)),
        ("desired generation", n.desired_generation.to_string()),
        ("created", output::timestamp(Some(n.created_at))),
    ])
}

/// Node hostnames by id, for tables that show where things run.
async fn hostnames(client: &Client) -> Result<HashMap<Uuid, String>, CliError> {
    let nodes: Vec<Node> = client.list("/nodes", &[], None).await?;
    Ok(nodes.into_iter().map(|n| (n.id, n.hostname)).collect())
}

#[derive(Debug, Args)]
pub(crate) struct GpusArgs {
    #[command(flatten)]
    api: ApiOpts,
    /// Only this node's GPUs (id, id prefix or hostname).
    #[arg(long)]
    node: Option<String>,
}

pub(crate) async fn gpus(args: GpusArgs) -> Result<(), CliError> {
    let client = config::client(&args.api, false)?;
    let mut query = Vec::new();
    if let Some(node) = &args.node {
        query.push(("node_id", find_node(&client, node).await?.id.to_string()));
    }
    let gpus: Vec<Gpu> = client.list("/gpus", &query, None).await?;
    if args.api.json {
        return print_json(&gpus);
    }
    let hosts = hostnames(&client).await?;
    let mut table = Table::new(&[
        "ID", "NODE", "INDEX", "NAME", "MEMORY", "USED", "UTIL", "PCI",
    ]);
    for g in &gpus {
        table.row(vec![
            short_id(&g.id),
            hosts
                .get(&g.node_id)
                .cloned()
                .unwrap_or_else(|| short_id(&g.node_id)),
            g.device_index.to_string(),
            g.name.clone(),
            gib(Some(g.memory_total_bytes)),
            gib(g.memory_used_bytes),
            percent(g.utilization),
            opt(g.pci_bus_id.as_deref()),
        ]);
    }
    output::print_table(&table, "GPUs")
}

#[derive(Debug, Args)]
pub(crate) struct WorkersArgs {
    #[command(flatten)]
    api: ApiOpts,
    /// Only this deployment's workers (id, id prefix or name).
    #[arg(long, short)]
    deployment: Option<String>,
    /// Only workers on this node (id, id prefix or hostname).
    #[arg(long)]
    node: Option<String>,
    /// Include stopped workers.
    #[arg(long, short)]
    all: bool,
}

pub(crate) async fn workers(args: WorkersArgs) -> Result<(), CliError> {
    let client = config::client(&args.api, false)?;
    let deployments: Vec<Deployment> = client.list("/deployments", &[], None).await?;
    let mut query = Vec::new();
    if let Some(d) = &args.deployment {
        let found = resolve(
            &deployments,
            d,
            "deployment",
            |d| d.id.to_string(),
            |d| vec![d.name.clone()],
        )?;
        query.push(("deployment_id", found.id.to_string()));
    }
    if let Some(node) = &args.node {
        query.push(("node_id", find_node(&client, node).await?.id.to_string()));
    }
    if args.all {
        query.push(("include_stopped", "true".to_owned()));
    }
    let workers: Vec<Worker> = client.list("/workers", &query, None).await?;
    if args.api.json {
        return print_json(&workers);
    }
    let hosts = hostnames(&client).await?;
    let gpus: Vec<Gpu> = client.list("/gpus", &[], None).await?;
    let gpu_index: HashMap<Uuid, i32> = gpus.iter().map(|g| (g.id, g.device_index)).collect();
    let names: HashMap<Uuid, &str> = deployments
        .iter()
        .map(|d| (d.id, d.name.as_str()))
        .collect();
    // Blocks per tier from the fleet KV index; a control plane without the route (older) or a
    // token it refuses leaves the column blank rather than failing the listing.
    let kv: HashMap<u64, KvWorkerBlocks> = client
        .get::<Vec<KvWorkerBlocks>>("/kv/workers", &[])
        .await
        .map(|all| all.into_iter().map(|b| (b.worker.0, b)).collect())
        .unwrap_or_default();
    let now = chrono::Utc::now();
    let mut table = Table::new(&[
        "ID",
        "DEPLOYMENT",
        "NODE",
        "DEVICE",
        "ROLE",
        "DESIRED",
        "OBSERVED",
        "KV G1/G2/G3",
        "REPORTED",
        "ENGINE",
        "ERROR",
    ]);
    for w in &workers {
        let device = match w.gpu_id {
            None => "cpu".to_owned(),
            Some(id) => gpu_index
                .get(&id)
                .map_or_else(|| format!("gpu {}", short_id(&id)), |i| format!("gpu:{i}")),
        };
        table.row(vec![
            w.id.to_string(),
            names
                .get(&w.deployment_id)
                .map_or_else(|| short_id(&w.deployment_id), |n| (*n).to_owned()),
            hosts
                .get(&w.node_id)
                .cloned()
                .unwrap_or_else(|| short_id(&w.node_id)),
            device,
            w.role.to_string(),
            w.desired_state.to_string(),
            w.observed_state.to_string(),
            u64::try_from(w.id)
                .ok()
                .and_then(|id| kv.get(&id))
                .map_or_else(|| "-".to_owned(), |b| format!("{}/{}/{}", b.g1, b.g2, b.g3)),
            age(w.observed_at, now),
            w.observed_engine.clone().unwrap_or_else(|| "-".to_owned()),
            // The agent's reason for a failed (or restarting) worker, on one line.
            w.observed_error.as_deref().map_or_else(
                || "-".to_owned(),
                |e| e.chars().take(120).collect::<String>().replace('\n', " "),
            ),
        ]);
    }
    output::print_table(&table, "workers")
}
