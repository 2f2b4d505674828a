//! The fleet's inventory as Prometheus gauges: nodes by state, workers by deployment, role and
//! observed state, each deployment's worker bounds and SLA targets (so alert rules compare
//! measured TTFT/ITL with the targets the operator set), and when each node's newest peer
//! certificate expires.
//!
//! Every replica reads them from Postgres every [`REFRESH_INTERVAL`] (four small `GROUP BY`
//! queries) into a snapshot that its registry's collector encodes at scrape time, so the
//! figures are the same whichever replica Prometheus asks and a deleted deployment's series
//! disappear with it. A failed read keeps the previous snapshot and counts a database error.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use kvfleet_proto::api::NodeState;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::AppState;
use crate::store::sleep_or_shutdown;
use crate::telemetry::{Registry, Scrape, collector};

/// How often each replica re-reads the inventory.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// What the gauges show, as of the last read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    /// Nodes per state (every state, zeros included).
    pub nodes: Vec<(NodeState, i64)>,
    /// Workers that should run (desired state not `stopped`), by deployment, model, role and
    /// observed state.
    pub workers: Vec<WorkerCount>,
    pub deployments: Vec<DeploymentTargets>,
    /// Per node (hostname), when its newest unrevoked certificate expires.
    pub certificates: Vec<(String, DateTime<Utc>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCount {
    pub deployment: String,
    pub model: String,
    pub role: String,
    pub state: String,
    pub count: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentTargets {
    pub deployment: String,
    pub model: String,
    pub min_workers: i32,
    pub max_workers: i32,
    pub ttft_ms: Option<i32>,
    pub itl_ms: Option<i32>,
}

/// The gauges' shared snapshot.
#[derive(Debug, Clone, Default)]
pub struct FleetGauges(Arc<Mutex<Inventory>>);

impl FleetGauges {
    /// Registers the collector of the `kvfleet_cp_nodes`, `kvfleet_cp_workers`,
    /// `kvfleet_cp_deployment_*` and `kvfleet_cp_node_certificate_expiry_timestamp_seconds`
    /// gauges.
    pub fn register(registry: &mut Registry) -> Self {
        let gauges = Self::default();
        let inventory = Arc::clone(&gauges.0);
        registry.register_collector(collector("fleet_gauges", move |s| {
            let inventory = inventory
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            encode_inventory(s, &inventory)
        }));
        gauges
    }

    /// Replaces the snapshot.
    pub fn set(&self, inventory: Inventory) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = inventory;
    }
}

/// Reads the inventory.
pub async fn read(pool: &PgPool) -> Result<Inventory, sqlx::Error> {
    let counted: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM nodes GROUP BY state")
            .fetch_all(pool)
            .await?;
    let nodes = NodeState::ALL
        .iter()
        .map(|state| {
            let n = counted
                .iter()
                .find(|(s, _)| s == state.as_str())
                .map_or(0, |(_, n)| *n);
            (*state, n)
        })
        .collect();
    let workers = sqlx::query_as::<_, (String, String, String, String, i64)>(
        "SELECT d.name, m.name, w.role, w.observed_state, count(*)
         FROM workers w
         JOIN deployments d ON d.id = w.deployment_id
         JOIN models m ON m.id = d.model_id
         WHERE w.desired_state <> 'stopped'
         GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(deployment, model, role, state, count)| WorkerCount {
        deployment,
        model,
        role,
        state,
        count,
    })
    .collect();
    let deployments = sqlx::query_as::<_, (String, String, i32, i32, Option<i32>, Option<i32>)>(
        "SELECT d.name, m.name, d.min_workers, d.max_workers, d.ttft_target_ms, d.itl_target_ms
         FROM deployments d JOIN models m ON m.id = d.model_id ORDER BY d.name",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(
        |(deployment, model, min_workers, max_workers, ttft_ms, itl_ms)| DeploymentTargets {
            deployment,
            model,
            min_workers,
            max_workers,
            ttft_ms,
            itl_ms,
        },
    )
    .collect();
    let certificates = sqlx::query_as(
        "SELECT n.hostname, max(c.not_after)
         FROM node_certificates c JOIN nodes n ON n.id = c.node_id
         WHERE c.revoked_at IS NULL AND n.state <> 'removed'
         GROUP BY n.hostname ORDER BY n.hostname",
    )
    .fetch_all(pool)
    .await?;
    Ok(Inventory {
        nodes,
        workers,
        deployments,
        certificates,
    })
}

/// Each replica: refresh the snapshot at once, then every [`REFRESH_INTERVAL`].
pub async fn run(state: AppState, mut shutdown: watch::Receiver<bool>) {
    loop {
        match read(&state.pool).await {
            Ok(inventory) => state.fleet_gauges.set(inventory),
            Err(error) => {
                tracing::warn!(%error, "reading the fleet inventory for /metrics failed");
                state.db.count("fleet_gauges");
            }
        }
        if sleep_or_shutdown(REFRESH_INTERVAL, &mut shutdown).await {
            return;
        }
    }
}

/// The snapshot as gauge families.
fn encode_inventory(s: &mut Scrape<'_>, inventory: &Inventory) -> std::fmt::Result {
    s.gauges(
        "kvfleet_cp_nodes",
        "Nodes by state (joining, healthy, unhealthy, lost, removed)",
        inventory
            .nodes
            .iter()
            .map(|(state, n)| ([("state", state.as_str())], *n)),
    )?;
    s.gauges(
        "kvfleet_cp_workers",
        "Workers placed to run (desired state not stopped), by deployment, model, role and \
         the state their agent last reported",
        inventory.workers.iter().map(|w| {
            (
                [
                    ("deployment", w.deployment.as_str()),
                    ("model", w.model.as_str()),
                    ("role", w.role.as_str()),
                    ("state", w.state.as_str()),
                ],
                w.count,
            )
        }),
    )?;
    let per_deployment = |d: &DeploymentTargets| {
        [
            ("deployment", d.deployment.clone()),
            ("model", d.model.clone()),
        ]
    };
    type Figure = fn(&DeploymentTargets) -> Option<f64>;
    let figures: [(&str, &str, Figure); 4] = [
        (
            "kvfleet_cp_deployment_min_workers",
            "A deployment's lower bound on workers",
            |d| Some(f64::from(d.min_workers)),
        ),
        (
            "kvfleet_cp_deployment_max_workers",
            "A deployment's upper bound on workers",
            |d| Some(f64::from(d.max_workers)),
        ),
        (
            "kvfleet_cp_deployment_ttft_target_seconds",
            "A deployment's time-to-first-token target (its SLA), for deployments that set one",
            |d| d.ttft_ms.map(|ms| f64::from(ms) / 1000.0),
        ),
        (
            "kvfleet_cp_deployment_itl_target_seconds",
            "A deployment's inter-token latency target (its SLA), for deployments that set one",
            |d| d.itl_ms.map(|ms| f64::from(ms) / 1000.0),
        ),
    ];
    for (name, help, figure) in figures {
        s.gauges(
            name,
            help,
            inventory
                .deployments
                .iter()
                .filter_map(|d| Some((per_deployment(d), figure(d)?))),
        )?;
    }
    s.gauges(
        "kvfleet_cp_node_certificate_expiry_timestamp_seconds",
        "When a node's newest unrevoked peer certificate expires (Unix time); agents renew \
         after two thirds of its lifetime",
        inventory
            .certificates
            .iter()
            .map(|(node, at)| ([("node", node.as_str())], at.timestamp())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_is_encoded_with_every_node_state_and_targets_in_seconds() {
        let mut registry = crate::telemetry::registry();
        let gauges = FleetGauges::register(&mut registry);
        gauges.set(Inventory {
            nodes: NodeState::ALL.iter().map(|s| (*s, 0)).collect(),
            workers: vec![WorkerCount {
                deployment: "chat".into(),
                model: "m".into(),
                role: "decode".into(),
                state: "ready".into(),
                count: 2,
            }],
            deployments: vec![DeploymentTargets {
                deployment: "chat".into(),
                model: "m".into(),
                min_workers: 1,
                max_workers: 4,
                ttft_ms: Some(250),
                itl_ms: None,
            }],
            certificates: vec![(
                "gpu-1".into(),
                DateTime::from_timestamp(1_900_000_000, 0).unwrap(),
            )],
        });
        let text = crate::telemetry::Telemetry::new(registry).encode();
        for line in [
            "kvfleet_cp_nodes{state=\"lost\"} 0",
            "kvfleet_cp_workers{deployment=\"chat\",model=\"m\",role=\"decode\",state=\"ready\"} 2",
            "kvfleet_cp_deployment_ttft_target_seconds{deployment=\"chat\",model=\"m\"} 0.25",
            "kvfleet_cp_node_certificate_expiry_timestamp_seconds{node=\"gpu-1\"} 1900000000",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("kvfleet_cp_deployment_itl_target_seconds{"),
            "no ITL target was set:\n{text}"
        );
    }
}
