//! Deployments as the planner sees them, and the fleet-wide GPU budget.
//!
//! A deployment's REST fields (`ttft_target_ms`, `itl_target_ms`, `sla_percentile`,
//! `min_workers`, `max_workers`, per-role bounds, `planner`) become a
//! [`kvfleet_planner::DeploymentPolicy`] here, in one place, for both the loop and the API's
//! budget checks (the REST API turns a too-small budget into problem JSON). The budget lives in `planner_settings` (one row); every change that could
//! push the deployments' minimums past it — a new or patched deployment, a new budget — is
//! checked under a lock on that row, so two concurrent changes cannot together exceed it.

use kvfleet_planner::DeploymentPolicy;
use kvfleet_planner::policy::{Bounds, RoleBounds, Sla};
use sqlx::PgConnection;
use uuid::Uuid;

use kvfleet_proto::api::{
    Deployment, DeploymentMode, PlannerMode, RoleWorkerBounds, SlaTargets, WorkerBounds,
};

/// A non-negative count from the store (negative values, which validation refuses, read as 0).
pub(crate) fn count(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

fn bounds(b: Option<WorkerBounds>) -> Option<Bounds> {
    b.map(|b| Bounds {
        min: count(b.min),
        max: count(b.max),
    })
}

/// A deployment's fields as the planner's policy.
pub fn deployment_policy(
    name: &str,
    mode: DeploymentMode,
    planner: PlannerMode,
    sla: &SlaTargets,
    min_workers: i32,
    max_workers: i32,
    roles: &RoleWorkerBounds,
) -> DeploymentPolicy {
    DeploymentPolicy {
        name: name.to_owned(),
        mode,
        planner,
        sla: Sla {
            ttft_ms: sla.ttft_ms.map(f64::from),
            itl_ms: sla.itl_ms.map(f64::from),
            percentile: sla.percentile_or_default(),
        },
        workers: Bounds {
            min: count(min_workers),
            max: count(max_workers),
        },
        roles: RoleBounds {
            prefill: bounds(roles.prefill),
            decode: bounds(roles.decode),
        },
    }
}

/// A stored deployment as the planner's policy.
pub fn of(d: &Deployment) -> DeploymentPolicy {
    deployment_policy(
        &d.name,
        d.mode,
        d.planner,
        &d.sla,
        d.min_workers,
        d.max_workers,
        &d.roles,
    )
}

/// The fleet's GPU budget (`None`: none set), locking its row when `lock` so that checks
/// against it serialise.
pub async fn budget(conn: &mut PgConnection, lock: bool) -> Result<Option<i32>, sqlx::Error> {
    let sql = if lock {
        "SELECT gpu_budget FROM planner_settings WHERE id = 1 FOR UPDATE"
    } else {
        "SELECT gpu_budget FROM planner_settings WHERE id = 1"
    };
    Ok(sqlx::query_scalar::<_, Option<i32>>(sql)
        .fetch_optional(conn)
        .await?
        .flatten())
}

/// Every deployment's policy, in id order.
pub async fn all(conn: &mut PgConnection) -> Result<Vec<(Uuid, DeploymentPolicy)>, sqlx::Error> {
    let rows: Vec<Deployment> = sqlx::query(crate::rows::sql_select_deployments())
        .try_map(crate::rows::deployment)
        .fetch_all(conn)
        .await?;
    Ok(rows.iter().map(|d| (d.id, of(d))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_fields_become_a_policy() {
        let p = deployment_policy(
            "chat",
            DeploymentMode::Disaggregated,
            PlannerMode::Auto,
            &SlaTargets {
                ttft_ms: Some(500),
                itl_ms: None,
                percentile: None,
            },
            2,
            10,
            &RoleWorkerBounds {
                prefill: Some(WorkerBounds { min: 1, max: 4 }),
                decode: None,
            },
        );
        assert_eq!(p.sla.ttft_ms, Some(500.0));
        assert_eq!(p.sla.itl_ms, None);
        assert_eq!(p.sla.percentile, 90.0);
        assert_eq!(p.workers, Bounds { min: 2, max: 10 });
        assert_eq!(p.roles.prefill, Some(Bounds { min: 1, max: 4 }));
        assert_eq!(p.minimum(), 2);
        assert!(p.invalid_fields().is_empty());
    }
}
