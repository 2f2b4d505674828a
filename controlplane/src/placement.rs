//! Placement: turns deployments into worker assignments on GPUs (or CPU slots). Pure: it reads
//! a snapshot of the fleet and returns actions; [`crate::leader`] loads the snapshot, applies
//! the actions in one transaction and tells the agents.
//!
//! Rules, in order:
//! - A worker on a lost, removed or vanished node is stopped (and replaced elsewhere).
//! - A running worker on a draining node is set to draining; a draining worker the agent
//!   reports stopped (or failed, or lost) is stopped. Draining workers do not count toward the
//!   deployment's size, so their replacements start at once.
//! - A running worker whose slot no longer satisfies its deployment (constraints changed, or
//!   its GPU left the node's inventory) is drained and replaced, like a drain.
//! - A running worker the agent has reported `failed` for `replace_failed_after` (10 s by
//!   default) is stopped and replaced. A shorter failure is the agent's supervisor restarting
//!   the process in place (its backoff starts at half a second): the worker keeps its id, its
//!   slot, its KV disk tier and its place in every router's index, where a replacement would
//!   start cold under a new id while the restarted one is stopped. A crash loop's backoff
//!   grows past the grace within a few restarts, and then it is replaced.
//! - Each deployment runs the SLA planner's targets per role when its planner is `auto` and has
//!   decided (`planner_targets`, clamped into `min_workers..=max_workers`), otherwise
//!   `min_workers`, which disaggregated deployments split into prefill (half, rounded down, at
//!   least one when there are two or more) and decode workers.
//! - Extras go not-ready first (stopped at once: they serve nothing), then ready ones from the
//!   most crowded node, newest first, which are *drained*: they finish what they serve and are
//!   stopped only once their agent reports them stopped, so a scale-down fails no request. A
//!   role that shrinks while another grows is a role flip: the surplus worker drains and the
//!   new role starts on the first free GPU — the drained one when the fleet has no other.
//! - New workers go on healthy, uncordoned, undraining nodes that satisfy the deployment's
//!   constraints, on a free GPU whose memory fits the model (the smallest that fits), or in a
//!   free CPU slot when the deployment allows it and no GPU fits. Nodes already running fewer
//!   of the deployment's workers go first (spread); ties go to the node with more free GPUs,
//!   then by id, so the plan is deterministic.
//! - A GPU stays occupied until its worker is stopped (not merely asked to stop), so a new
//!   worker never lands on a GPU whose old worker may still hold its memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use uuid::Uuid;

use kvfleet_proto::api::{
    DeploymentMode, DesiredWorkerState, NodeState, ObservedWorkerState, PlacementConstraints,
    WorkerRole,
};

#[derive(Debug, Clone, PartialEq)]
pub struct GpuView {
    pub id: Uuid,
    pub name: String,
    pub memory_total_bytes: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub id: Uuid,
    pub state: NodeState,
    pub cordoned: bool,
    pub draining: bool,
    pub labels: BTreeMap<String, String>,
    pub cpu_slots: i32,
    pub gpus: Vec<GpuView>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentView {
    pub id: Uuid,
    pub mode: DeploymentMode,
    pub min_workers: i32,
    pub max_workers: i32,
    /// GPU memory one worker needs; `None` fits any GPU.
    pub memory_bytes: Option<i64>,
    pub constraints: PlacementConstraints,
    /// The planner's workers per role (`auto` mode); `None`: `min_workers`.
    pub targets: Option<Vec<(WorkerRole, u32)>>,
}

impl DeploymentView {
    /// Workers per role this deployment should run (see the module docs).
    pub fn wanted(&self) -> Vec<(WorkerRole, u32)> {
        let min = u32::try_from(self.min_workers.clamp(0, self.max_workers.max(0))).unwrap_or(0);
        let max = u32::try_from(self.max_workers.max(0)).unwrap_or(0);
        match &self.targets {
            Some(t) => {
                let total: u32 = t.iter().map(|(_, n)| *n).sum();
                if total > max {
                    role_targets(self.mode, max)
                } else if total < min {
                    role_targets(self.mode, min)
                } else {
                    t.clone()
                }
            }
            None => role_targets(self.mode, min),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    pub id: i64,
    pub deployment_id: Uuid,
    pub node_id: Uuid,
    pub gpu_id: Option<Uuid>,
    pub role: WorkerRole,
    pub desired: DesiredWorkerState,
    pub observed: ObservedWorkerState,
    /// How long the agent has reported `observed` (since the heartbeat that changed it).
    pub observed_for: Duration,
}

/// What placement decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start {
        deployment: Uuid,
        node: Uuid,
        gpu: Option<Uuid>,
        role: WorkerRole,
    },
    Drain {
        worker: i64,
        node: Uuid,
        reason: &'static str,
    },
    Stop {
        worker: i64,
        node: Uuid,
        reason: &'static str,
    },
    /// Not enough eligible capacity: `missing` workers of `role` could not be placed.
    Unplaceable {
        deployment: Uuid,
        role: WorkerRole,
        missing: u32,
    },
}

/// How many workers of each role a deployment wants.
pub fn role_targets(mode: DeploymentMode, workers: u32) -> Vec<(WorkerRole, u32)> {
    match mode {
        DeploymentMode::Aggregated => vec![(WorkerRole::Aggregated, workers)],
        DeploymentMode::Disaggregated => {
            let prefill = if workers >= 2 {
                (workers / 2).max(1)
            } else {
                0
            };
            vec![
                (WorkerRole::Prefill, prefill),
                (WorkerRole::Decode, workers - prefill),
            ]
        }
    }
}

fn node_fits(node: &NodeView, constraints: &PlacementConstraints) -> bool {
    node.state == NodeState::Healthy
        && !node.cordoned
        && !node.draining
        && node_allowed(node, constraints)
}

/// The deployment's constraints alone, whatever the node's health.
fn node_allowed(node: &NodeView, constraints: &PlacementConstraints) -> bool {
    (constraints.nodes.is_empty() || constraints.nodes.contains(&node.id))
        && constraints
            .node_labels
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v))
}

/// Whether a running worker's slot still satisfies its deployment (constraints can change
/// after placement, and a GPU can disappear from a node's inventory).
fn slot_allowed(node: &NodeView, gpu: Option<Uuid>, deployment: &DeploymentView) -> bool {
    node_allowed(node, &deployment.constraints)
        && match gpu {
            Some(gpu) => node
                .gpus
                .iter()
                .find(|g| g.id == gpu)
                .is_some_and(|g| gpu_fits(g, deployment)),
            None => deployment.constraints.allow_cpu,
        }
}

fn gpu_fits(gpu: &GpuView, deployment: &DeploymentView) -> bool {
    deployment
        .memory_bytes
        .is_none_or(|need| gpu.memory_total_bytes >= need)
        && deployment
            .constraints
            .gpu_name
            .as_deref()
            .is_none_or(|want| gpu.name.to_lowercase().contains(&want.to_lowercase()))
}

/// Computes the actions that bring the fleet toward its deployments.
pub fn plan(
    nodes: &[NodeView],
    deployments: &[DeploymentView],
    workers: &[WorkerView],
    replace_failed_after: Duration,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let nodes_by_id: HashMap<Uuid, &NodeView> = nodes.iter().map(|n| (n.id, n)).collect();
    let deployments_by_id: HashMap<Uuid, &DeploymentView> =
        deployments.iter().map(|d| (d.id, d)).collect();

    // Capacity in use: every worker not yet stopped holds its GPU or CPU slot.
    let mut busy_gpus: HashSet<Uuid> = HashSet::new();
    let mut busy_cpu: HashMap<Uuid, i32> = HashMap::new();
    for w in workers
        .iter()
        .filter(|w| w.desired != DesiredWorkerState::Stopped)
    {
        match w.gpu_id {
            Some(gpu) => {
                busy_gpus.insert(gpu);
            }
            None => *busy_cpu.entry(w.node_id).or_default() += 1,
        }
    }

    // Per deployment and role: workers that count toward its size.
    let mut counting: HashMap<(Uuid, WorkerRole), Vec<&WorkerView>> = HashMap::new();
    let mut per_node: HashMap<(Uuid, Uuid), u32> = HashMap::new();
    let mut sorted: Vec<&WorkerView> = workers.iter().collect();
    sorted.sort_by_key(|w| w.id);
    for w in sorted {
        if w.desired == DesiredWorkerState::Stopped {
            continue;
        }
        let node = nodes_by_id.get(&w.node_id);
        let node_gone =
            node.is_none_or(|n| matches!(n.state, NodeState::Lost | NodeState::Removed));
        if node_gone {
            actions.push(Action::Stop {
                worker: w.id,
                node: w.node_id,
                reason: "node lost or removed",
            });
            continue;
        }
        let draining_node = node.is_some_and(|n| n.draining);
        let finished = matches!(
            w.observed,
            ObservedWorkerState::Stopped | ObservedWorkerState::Failed | ObservedWorkerState::Lost
        );
        match w.desired {
            DesiredWorkerState::Draining if finished => {
                actions.push(Action::Stop {
                    worker: w.id,
                    node: w.node_id,
                    reason: "drained",
                });
                continue;
            }
            DesiredWorkerState::Draining => continue,
            DesiredWorkerState::Running if draining_node => {
                actions.push(Action::Drain {
                    worker: w.id,
                    node: w.node_id,
                    reason: "node draining",
                });
                continue;
            }
            DesiredWorkerState::Running
                if node
                    .zip(deployments_by_id.get(&w.deployment_id))
                    .is_some_and(|(n, d)| !slot_allowed(n, w.gpu_id, d)) =>
            {
                actions.push(Action::Drain {
                    worker: w.id,
                    node: w.node_id,
                    reason: "placement constraints changed",
                });
                continue;
            }
            DesiredWorkerState::Running
                if w.observed == ObservedWorkerState::Failed
                    && w.observed_for >= replace_failed_after =>
            {
                actions.push(Action::Stop {
                    worker: w.id,
                    node: w.node_id,
                    reason: "worker failed",
                });
                continue;
            }
            _ => {}
        }
        counting
            .entry((w.deployment_id, w.role))
            .or_default()
            .push(w);
        *per_node.entry((w.deployment_id, w.node_id)).or_default() += 1;
    }

    let mut deployments: Vec<&DeploymentView> = deployments.iter().collect();
    deployments.sort_by_key(|d| d.id);
    for d in deployments {
        let wanted: HashMap<WorkerRole, u32> = d.wanted().into_iter().collect();
        // Roles the mode no longer uses (a mode change) want zero.
        let mut roles: Vec<WorkerRole> = WorkerRole::ALL.to_vec();
        roles.sort_by_key(|r| r.as_str());
        for role in roles {
            let want = wanted.get(&role).copied().unwrap_or(0);
            let mut have = counting.remove(&(d.id, role)).unwrap_or_default();
            let have_n = u32::try_from(have.len()).unwrap_or(u32::MAX);
            if have_n > want {
                // Stop extras: not-ready first, then from the most crowded node, newest first.
                have.sort_by_key(|w| {
                    (
                        w.observed == ObservedWorkerState::Ready,
                        std::cmp::Reverse(per_node.get(&(d.id, w.node_id)).copied().unwrap_or(0)),
                        std::cmp::Reverse(w.id),
                    )
                });
                for w in have.iter().take((have_n - want) as usize) {
                    // A ready worker may be serving: it drains first.
                    actions.push(if w.observed == ObservedWorkerState::Ready {
                        Action::Drain {
                            worker: w.id,
                            node: w.node_id,
                            reason: "scale down",
                        }
                    } else {
                        Action::Stop {
                            worker: w.id,
                            node: w.node_id,
                            reason: "scale down",
                        }
                    });
                    if let Some(n) = per_node.get_mut(&(d.id, w.node_id)) {
                        *n = n.saturating_sub(1);
                    }
                }
                continue;
            }
            let mut missing = want - have_n;
            while missing > 0 {
                let Some((node, gpu)) = pick(nodes, d, &busy_gpus, &busy_cpu, &per_node) else {
                    break;
                };
                match gpu {
                    Some(gpu) => {
                        busy_gpus.insert(gpu);
                    }
                    None => *busy_cpu.entry(node).or_default() += 1,
                }
                *per_node.entry((d.id, node)).or_default() += 1;
                actions.push(Action::Start {
                    deployment: d.id,
                    node,
                    gpu,
                    role,
                });
                missing -= 1;
            }
            if missing > 0 {
                actions.push(Action::Unplaceable {
                    deployment: d.id,
                    role,
                    missing,
                });
            }
        }
    }
    actions
}

/// A node and the GPU on it (`None`: a CPU slot).
type Slot = (Uuid, Option<Uuid>);

/// The best free slot for one more worker of `d`, or `None`.
fn pick(
    nodes: &[NodeView],
    d: &DeploymentView,
    busy_gpus: &HashSet<Uuid>,
    busy_cpu: &HashMap<Uuid, i32>,
    per_node: &HashMap<(Uuid, Uuid), u32>,
) -> Option<Slot> {
    // (spread, on a CPU slot, fewer free GPUs, node id): lowest wins.
    type Rank = (u32, bool, std::cmp::Reverse<usize>, Uuid);
    let mut best: Option<(Rank, Slot)> = None;
    for node in nodes.iter().filter(|n| node_fits(n, &d.constraints)) {
        let free: Vec<&GpuView> = node
            .gpus
            .iter()
            .filter(|g| !busy_gpus.contains(&g.id) && gpu_fits(g, d))
            .collect();
        let gpu = free
            .iter()
            .min_by_key(|g| (g.memory_total_bytes, g.id))
            .map(|g| g.id);
        let slot = match gpu {
            Some(gpu) => Some(Some(gpu)),
            None if d.constraints.allow_cpu
                && busy_cpu.get(&node.id).copied().unwrap_or(0) < node.cpu_slots =>
            {
                Some(None)
            }
            None => None,
        };
        let Some(slot) = slot else { continue };
        let key = (
            per_node.get(&(d.id, node.id)).copied().unwrap_or(0),
            slot.is_none(), // a GPU beats a CPU slot
            std::cmp::Reverse(free.len()),
            node.id,
        );
        if best.as_ref().is_none_or(|(k, _)| key < *k) {
            best = Some((key, (node.id, slot)));
        }
    }
    best.map(|(_, choice)| choice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The default `placement.replace_failed_after`.
    const GRACE: Duration = Duration::from_secs(10);

    fn plan(
        nodes: &[NodeView],
        deployments: &[DeploymentView],
        workers: &[WorkerView],
    ) -> Vec<Action> {
        super::plan(nodes, deployments, workers, GRACE)
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn node(n: u128, gpus: &[(u128, i64)]) -> NodeView {
        NodeView {
            id: id(n),
            state: NodeState::Healthy,
            cordoned: false,
            draining: false,
            labels: BTreeMap::new(),
            cpu_slots: 0,
            gpus: gpus
                .iter()
                .map(|&(g, mem)| GpuView {
                    id: id(g),
                    name: "NVIDIA H100".into(),
                    memory_total_bytes: mem,
                })
                .collect(),
        }
    }

    fn deployment(n: u128, workers: i32) -> DeploymentView {
        DeploymentView {
            id: id(n),
            mode: DeploymentMode::Aggregated,
            min_workers: workers,
            max_workers: workers.max(1),
            memory_bytes: None,
            constraints: PlacementConstraints::default(),
            targets: None,
        }
    }

    fn worker(w: i64, d: u128, n: u128, g: Option<u128>) -> WorkerView {
        WorkerView {
            id: w,
            deployment_id: id(d),
            node_id: id(n),
            gpu_id: g.map(id),
            role: WorkerRole::Aggregated,
            desired: DesiredWorkerState::Running,
            observed: ObservedWorkerState::Ready,
            observed_for: Duration::ZERO,
        }
    }

    fn starts(actions: &[Action]) -> Vec<Slot> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { node, gpu, .. } => Some((*node, *gpu)),
                _ => None,
            })
            .collect()
    }

    const GB: i64 = 1 << 30;

    #[test]
    fn spreads_across_nodes_before_doubling_up() {
        let nodes = [
            node(1, &[(11, 80 * GB), (12, 80 * GB)]),
            node(2, &[(21, 80 * GB), (22, 80 * GB)]),
        ];
        let actions = plan(&nodes, &[deployment(100, 3)], &[]);
        let placed = starts(&actions);
        assert_eq!(placed.len(), 3);
        let on_1 = placed.iter().filter(|(n, _)| *n == id(1)).count();
        let on_2 = placed.iter().filter(|(n, _)| *n == id(2)).count();
        assert_eq!((on_1.max(on_2), on_1.min(on_2)), (2, 1));
    }

    /// Table: one scenario per row, with the nodes a new worker may land on.
    #[test]
    fn eligibility_table() {
        let mut cordoned = node(2, &[(21, 80 * GB)]);
        cordoned.cordoned = true;
        let mut draining = node(3, &[(31, 80 * GB)]);
        draining.draining = true;
        let mut unhealthy = node(4, &[(41, 80 * GB)]);
        unhealthy.state = NodeState::Unhealthy;
        let small = node(5, &[(51, 16 * GB)]);
        let mut labelled = node(6, &[(61, 80 * GB)]);
        labelled.labels.insert("zone".into(), "a".into());
        let mut cpu_only = node(7, &[]);
        cpu_only.cpu_slots = 2;
        let all = vec![cordoned, draining, unhealthy, small, labelled, cpu_only];

        let mut big = deployment(100, 1);
        big.memory_bytes = Some(40 * GB);
        let mut zone = deployment(100, 1);
        zone.constraints
            .node_labels
            .insert("zone".into(), "a".into());
        let mut cpu = deployment(100, 1);
        cpu.constraints.allow_cpu = true;
        cpu.constraints.nodes = vec![id(7)];
        let mut named = deployment(100, 1);
        named.constraints.gpu_name = Some("a100".into());
        let mut pinned = deployment(100, 1);
        pinned.constraints.nodes = vec![id(5)];

        let cases: Vec<(&str, DeploymentView, Vec<Slot>)> = vec![
            (
                "any: smallest node first by key order, skips cordoned/draining/unhealthy",
                deployment(100, 1),
                vec![(id(5), Some(id(51)))],
            ),
            (
                "memory excludes the 16 GB GPU",
                big,
                vec![(id(6), Some(id(61)))],
            ),
            ("label constraint", zone, vec![(id(6), Some(id(61)))]),
            ("cpu slot when allowed", cpu, vec![(id(7), None)]),
            ("gpu name matches nothing", named, vec![]),
            ("pinned node", pinned, vec![(id(5), Some(id(51)))]),
        ];
        for (name, d, want) in cases {
            let actions = plan(&all, &[d], &[]);
            assert_eq!(starts(&actions), want, "{name}");
            let unplaceable = actions
                .iter()
                .any(|a| matches!(a, Action::Unplaceable { .. }));
            assert_eq!(unplaceable, want.is_empty(), "{name}");
        }
    }

    #[test]
    fn lost_node_workers_are_stopped_and_replaced() {
        let mut lost = node(1, &[(11, 80 * GB)]);
        lost.state = NodeState::Lost;
        let nodes = [lost, node(2, &[(21, 80 * GB)])];
        let actions = plan(
            &nodes,
            &[deployment(100, 1)],
            &[worker(7, 100, 1, Some(11))],
        );
        assert_eq!(
            actions,
            vec![
                Action::Stop {
                    worker: 7,
                    node: id(1),
                    reason: "node lost or removed"
                },
                Action::Start {
                    deployment: id(100),
                    node: id(2),
                    gpu: Some(id(21)),
                    role: WorkerRole::Aggregated
                },
            ]
        );
    }

    #[test]
    fn draining_moves_workers_and_keeps_the_gpu_busy_until_stopped() {
        let mut draining = node(1, &[(11, 80 * GB), (12, 80 * GB)]);
        draining.draining = true;
        let nodes = [draining, node(2, &[(21, 80 * GB)])];
        let actions = plan(
            &nodes,
            &[deployment(100, 1)],
            &[worker(7, 100, 1, Some(11))],
        );
        assert_eq!(
            actions,
            vec![
                Action::Drain {
                    worker: 7,
                    node: id(1),
                    reason: "node draining"
                },
                Action::Start {
                    deployment: id(100),
                    node: id(2),
                    gpu: Some(id(21)),
                    role: WorkerRole::Aggregated
                },
            ]
        );
        // Once the agent reports it stopped, it is stopped for good.
        let mut w = worker(7, 100, 1, Some(11));
        w.desired = DesiredWorkerState::Draining;
        w.observed = ObservedWorkerState::Stopped;
        let mut replacement = worker(8, 100, 2, Some(21));
        replacement.observed = ObservedWorkerState::Starting;
        let actions = plan(&nodes, &[deployment(100, 1)], &[w, replacement]);
        assert_eq!(
            actions,
            vec![Action::Stop {
                worker: 7,
                node: id(1),
                reason: "drained"
            }]
        );
    }

    /// A worker killed and restarted by its agent's supervisor is reported `failed` for its
    /// backoff: it keeps its slot and id (replacing it stopped the restarted worker and dropped
    /// it from the KV index). Failed for the whole grace (a crash loop, an unrunnable model), it
    /// is stopped and replaced.
    #[test]
    fn a_failed_worker_is_replaced_only_after_the_grace() {
        let nodes = [node(1, &[(11, 80 * GB)]), node(2, &[(21, 80 * GB)])];
        let d = [deployment(100, 1)];
        let failed = |for_: Duration| WorkerView {
            observed: ObservedWorkerState::Failed,
            observed_for: for_,
            ..worker(7, 100, 1, Some(11))
        };
        for for_ in [
            Duration::ZERO,
            Duration::from_millis(500),
            GRACE - Duration::from_millis(1),
        ] {
            assert_eq!(
                plan(&nodes, &d, &[failed(for_)]),
                vec![],
                "failed for {for_:?}"
            );
        }
        assert_eq!(
            plan(&nodes, &d, &[failed(GRACE)]),
            vec![
                Action::Stop {
                    worker: 7,
                    node: id(1),
                    reason: "worker failed"
                },
                Action::Start {
                    deployment: id(100),
                    node: id(2),
                    gpu: Some(id(21)),
                    role: WorkerRole::Aggregated
                },
            ]
        );
        // The grace is the caller's: none replaces at the first report.
        assert_eq!(
            super::plan(&nodes, &d, &[failed(Duration::ZERO)], Duration::ZERO).len(),
            2
        );
    }

    #[test]
    fn workers_outside_changed_constraints_are_moved() {
        let mut a = node(1, &[(11, 80 * GB)]);
        a.labels.insert("zone".into(), "a".into());
        let mut b = node(2, &[(21, 80 * GB)]);
        b.labels.insert("zone".into(), "b".into());
        let mut d = deployment(100, 1);
        d.constraints.node_labels.insert("zone".into(), "b".into());
        let actions = plan(&[a, b], &[d], &[worker(7, 100, 1, Some(11))]);
        assert_eq!(
            actions,
            vec![
                Action::Drain {
                    worker: 7,
                    node: id(1),
                    reason: "placement constraints changed"
                },
                Action::Start {
                    deployment: id(100),
                    node: id(2),
                    gpu: Some(id(21)),
                    role: WorkerRole::Aggregated
                },
            ]
        );
        // A worker whose GPU left the inventory is moved too.
        let nodes = [node(1, &[]), node(2, &[(21, 80 * GB)])];
        let actions = plan(&nodes, &[deployment(100, 1)], &[worker(7, 100, 1, None)]);
        assert_eq!(
            actions[0],
            Action::Drain {
                worker: 7,
                node: id(1),
                reason: "placement constraints changed"
            }
        );
    }

    #[test]
    fn scale_down_stops_not_ready_workers_first_and_at_once() {
        let nodes = [node(1, &[(11, 80 * GB), (12, 80 * GB)])];
        let mut starting = worker(2, 100, 1, Some(12));
        starting.observed = ObservedWorkerState::Starting;
        let actions = plan(
            &nodes,
            &[deployment(100, 1)],
            &[worker(1, 100, 1, Some(11)), starting],
        );
        assert_eq!(
            actions,
            vec![Action::Stop {
                worker: 2,
                node: id(1),
                reason: "scale down"
            }]
        );
    }

    #[test]
    fn scale_down_drains_ready_workers_instead_of_stopping_them() {
        let nodes = [node(1, &[(11, 80 * GB), (12, 80 * GB)])];
        let actions = plan(
            &nodes,
            &[deployment(100, 1)],
            &[worker(1, 100, 1, Some(11)), worker(2, 100, 1, Some(12))],
        );
        assert_eq!(
            actions,
            vec![Action::Drain {
                worker: 2,
                node: id(1),
                reason: "scale down"
            }]
        );
        // Once drained (the agent reports it stopped) it is stopped, and nothing replaces it.
        let mut drained = worker(2, 100, 1, Some(12));
        drained.desired = DesiredWorkerState::Draining;
        drained.observed = ObservedWorkerState::Stopped;
        let actions = plan(
            &nodes,
            &[deployment(100, 1)],
            &[worker(1, 100, 1, Some(11)), drained],
        );
        assert_eq!(
            actions,
            vec![Action::Stop {
                worker: 2,
                node: id(1),
                reason: "drained"
            }]
        );
    }

    #[test]
    fn planner_targets_replace_min_workers_within_the_bounds() {
        let nodes = [node(1, &[(11, 80 * GB), (12, 80 * GB), (13, 80 * GB)])];
        let mut d = deployment(100, 1);
        d.max_workers = 3;
        d.mode = DeploymentMode::Disaggregated;
        d.targets = Some(vec![(WorkerRole::Prefill, 2), (WorkerRole::Decode, 1)]);
        let mut roles: Vec<WorkerRole> = plan(&nodes, &[d.clone()], &[])
            .iter()
            .filter_map(|a| match a {
                Action::Start { role, .. } => Some(*role),
                _ => None,
            })
            .collect();
        roles.sort_by_key(|r| r.as_str());
        assert_eq!(
            roles,
            [WorkerRole::Decode, WorkerRole::Prefill, WorkerRole::Prefill]
        );
        // Targets above max_workers (the bounds changed since) fall back to the bounds.
        d.max_workers = 2;
        assert_eq!(d.wanted(), role_targets(DeploymentMode::Disaggregated, 2));
        d.targets = Some(vec![]);
        assert_eq!(d.wanted(), role_targets(DeploymentMode::Disaggregated, 1));
    }

    #[test]
    fn a_role_flip_drains_one_role_and_starts_the_other_on_the_freed_gpu() {
        let nodes = [node(1, &[(11, 80 * GB), (12, 80 * GB)])];
        let mut d = deployment(100, 2);
        d.max_workers = 2;
        d.mode = DeploymentMode::Disaggregated;
        d.targets = Some(vec![(WorkerRole::Prefill, 0), (WorkerRole::Decode, 2)]);
        let mut prefill = worker(1, 100, 1, Some(11));
        prefill.role = WorkerRole::Prefill;
        let mut decode = worker(2, 100, 1, Some(12));
        decode.role = WorkerRole::Decode;
        let actions = plan(&nodes, &[d.clone()], &[prefill.clone(), decode.clone()]);
        assert!(actions.contains(&Action::Drain {
            worker: 1,
            node: id(1),
            reason: "scale down"
        }));
        // No GPU is free while it drains: the decode worker waits for it.
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::Unplaceable {
                role: WorkerRole::Decode,
                missing: 1,
                ..
            }
        )));
        prefill.desired = DesiredWorkerState::Stopped;
        let actions = plan(&nodes, &[d], &[prefill, decode]);
        assert_eq!(
            starts(&actions),
            vec![(id(1), Some(id(11)))],
            "the freed GPU takes the new role"
        );
    }

    #[test]
    fn disaggregated_splits_roles() {
        for (workers, prefill, decode) in [
            (0, 0, 0),
            (1, 0, 1),
            (2, 1, 1),
            (3, 1, 2),
            (4, 2, 2),
            (5, 2, 3),
        ] {
            assert_eq!(
                role_targets(DeploymentMode::Disaggregated, workers),
                vec![(WorkerRole::Prefill, prefill), (WorkerRole::Decode, decode)]
            );
        }
    }

    #[test]
    fn a_satisfied_fleet_needs_no_actions() {
        let nodes = [node(1, &[(11, 80 * GB)])];
        assert!(
            plan(
                &nodes,
                &[deployment(100, 1)],
                &[worker(1, 100, 1, Some(11))]
            )
            .is_empty()
        );
    }

    fn arb_fleet() -> impl Strategy<Value = (Vec<NodeView>, Vec<DeploymentView>)> {
        let node_strategy = (
            0u8..4,
            any::<bool>(),
            any::<bool>(),
            0i32..3,
            prop::collection::vec(1i64..=80, 0..4),
        );
        let deployment_strategy = (
            0i32..6,
            0i32..4,
            prop::option::of(1i64..=80),
            any::<bool>(),
            any::<bool>(),
        );
        (
            prop::collection::vec(node_strategy, 0..6),
            prop::collection::vec(deployment_strategy, 0..4),
        )
            .prop_map(|(ns, ds)| {
                let nodes = ns
                    .into_iter()
                    .enumerate()
                    .map(|(i, (state, cordoned, draining, cpu_slots, gpus))| {
                        let mut n = node(i as u128 + 1, &[]);
                        n.state = [
                            NodeState::Healthy,
                            NodeState::Healthy,
                            NodeState::Unhealthy,
                            NodeState::Lost,
                        ][state as usize];
                        n.cordoned = cordoned;
                        n.draining = draining;
                        n.cpu_slots = cpu_slots;
                        n.gpus = gpus
                            .into_iter()
                            .enumerate()
                            .map(|(g, mem)| GpuView {
                                id: id((i as u128 + 1) * 100 + g as u128),
                                name: "gpu".into(),
                                memory_total_bytes: mem * GB,
                            })
                            .collect();
                        n
                    })
                    .collect();
                let deployments = ds
                    .into_iter()
                    .enumerate()
                    .map(|(i, (min, extra, mem, disagg, cpu))| {
                        let mut d = deployment(10_000 + i as u128, min);
                        d.max_workers = min + extra;
                        d.memory_bytes = mem.map(|m| m * GB);
                        d.constraints.allow_cpu = cpu;
                        if disagg {
                            d.mode = DeploymentMode::Disaggregated;
                        }
                        d
                    })
                    .collect();
                (nodes, deployments)
            })
    }

    /// Applies actions the way the store does (new workers get the next ids).
    fn apply(workers: &mut Vec<WorkerView>, actions: &[Action]) {
        let mut next = workers.iter().map(|w| w.id).max().unwrap_or(0) + 1;
        for a in actions {
            match a {
                Action::Start {
                    deployment,
                    node,
                    gpu,
                    role,
                } => {
                    workers.push(WorkerView {
                        id: next,
                        deployment_id: *deployment,
                        node_id: *node,
                        gpu_id: *gpu,
                        role: *role,
                        desired: DesiredWorkerState::Running,
                        observed: ObservedWorkerState::Ready,
                        observed_for: Duration::ZERO,
                    });
                    next += 1;
                }
                Action::Stop { worker, .. } => {
                    if let Some(w) = workers.iter_mut().find(|w| w.id == *worker) {
                        w.desired = DesiredWorkerState::Stopped;
                    }
                }
                Action::Drain { worker, .. } => {
                    if let Some(w) = workers.iter_mut().find(|w| w.id == *worker) {
                        w.desired = DesiredWorkerState::Draining;
                        w.observed = ObservedWorkerState::Stopped;
                    }
                }
                Action::Unplaceable { .. } => {}
            }
        }
    }

    proptest! {
        #[test]
        fn placement_invariants((nodes, deployments) in arb_fleet()) {
            let mut workers = Vec::new();
            for _round in 0..3 {
                let actions = plan(&nodes, &deployments, &workers);
                let by_id: HashMap<Uuid, &NodeView> = nodes.iter().map(|n| (n.id, n)).collect();
                for a in &actions {
                    if let Action::Start { deployment, node, gpu, .. } = a {
                        let n = by_id[node];
                        let d = deployments.iter().find(|d| d.id == *deployment).unwrap();
                        // Never on a node that may not take work.
                        prop_assert!(n.state == NodeState::Healthy && !n.cordoned && !n.draining);
                        match gpu {
                            Some(g) => {
                                let g = n.gpus.iter().find(|x| x.id == *g).unwrap();
                                prop_assert!(d.memory_bytes.is_none_or(|m| g.memory_total_bytes >= m));
                            }
                            None => prop_assert!(d.constraints.allow_cpu),
                        }
                    }
                }
                apply(&mut workers, &actions);
                // At most one live worker per GPU, CPU slots not oversubscribed.
                let mut seen = HashSet::new();
                let mut cpu: HashMap<Uuid, i32> = HashMap::new();
                for w in workers.iter().filter(|w| w.desired != DesiredWorkerState::Stopped) {
                    match w.gpu_id {
                        Some(g) => prop_assert!(seen.insert(g), "gpu {g} twice"),
                        None => *cpu.entry(w.node_id).or_default() += 1,
                    }
                }
                for (n, used) in cpu {
                    prop_assert!(used <= by_id[&n].cpu_slots);
                }
                // Never more running workers than the deployment's maximum.
                for d in &deployments {
                    let running = workers.iter().filter(|w| w.deployment_id == d.id && w.desired == DesiredWorkerState::Running).count();
                    prop_assert!(running as i32 <= d.max_workers.max(0));
                }
            }
            // After three rounds the plan is stable: nothing left but what cannot be placed.
            let last = plan(&nodes, &deployments, &workers);
            prop_assert!(last.iter().all(|a| matches!(a, Action::Unplaceable { .. } | Action::Stop { reason: "drained", .. })), "{last:?}");
        }
    }
}
