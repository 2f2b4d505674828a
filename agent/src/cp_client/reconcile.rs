//! What to start, stop, drain or restart, given the control plane's desired state and what the
//! pool runs. Pure: no IO, no clock; the driver in [`super`] applies the steps.
//!
//! Two stages. [`targets`] turns the desired state into local worker definitions: the GPU the
//! control plane names (by UUID) becomes an NVML index from this node's inventory, the model
//! spec becomes a [`ModelConfig`] (a `[[models]]` entry of the same name in the local config
//! supplies the engine settings the control plane does not know, such as the mock's timings or
//! a native model's KV budget; the control plane's block size and context length win, because
//! every node must hash blocks the same way, and so do its deployment's output parsers unless
//! they are `auto`). A worker that cannot be resolved is a
//! [`Unrunnable`] with the reason, reported as `failed`. [`plan`] then compares the targets
//! with the pool.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use kvfleet_proto::api::{
    DesiredState, DesiredWorkerState, ModelFormat, ModelSpec, ReasoningParser, ToolParser,
};
use kvfleet_proto::{BlockSize, WorkerId};
use uuid::Uuid;

use crate::gpu::GpuInfo;
use crate::worker::supervisor::PoolWorker;
use crate::worker::{Device, ModelConfig, ReasoningParserKind, ToolParserKind, WorkerConfig};

/// One worker the control plane wants here, resolved to local terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The control plane's worker id.
    pub id: WorkerId,
    /// What to run.
    pub config: WorkerConfig,
    /// Its model.
    pub model: ModelConfig,
    /// Keep serving what it has, take nothing new (it is being moved away).
    pub draining: bool,
}

/// A desired worker this node cannot run, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrunnable {
    /// The control plane's worker id.
    pub id: WorkerId,
    /// Why, for the log.
    pub reason: String,
}

/// One change to the pool.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Start a worker that does not run.
    Start(Target),
    /// Stop a worker that is no longer wanted (gracefully: drain, then stop).
    Stop(WorkerId),
    /// Stop it now and start it again with another definition (role, model or device changed).
    Restart(Target),
    /// Stop routing new requests to it.
    Drain(WorkerId),
    /// Route to it again.
    Undrain(WorkerId),
}

/// The UUID the control plane knows a GPU by: its NVML UUID without the `GPU-` prefix.
pub fn gpu_uuid(gpu: &GpuInfo) -> Option<Uuid> {
    let text = gpu.uuid.strip_prefix("GPU-").unwrap_or(&gpu.uuid);
    Uuid::parse_str(text).ok()
}

/// The model a spec names, in local terms (see the module docs for the precedence).
pub fn model_config(spec: &ModelSpec, local: &[ModelConfig]) -> Result<ModelConfig, String> {
    let mut model = match local.iter().find(|m| m.name == spec.name) {
        Some(local) => local.clone(),
        None => match spec.format {
            ModelFormat::Mock => ModelConfig::mock(&spec.name),
            ModelFormat::Gguf | ModelFormat::Safetensors => {
                if spec.path.trim().is_empty() {
                    return Err(format!("model {:?} has no path", spec.name));
                }
                ModelConfig::native(&spec.name, PathBuf::from(&spec.path))
            }
        },
    };
    let block_size = u32::try_from(spec.block_size)
        .ok()
        .and_then(|n| BlockSize::new(n).ok())
        .ok_or_else(|| {
            format!(
                "model {:?}: block size {} is not usable",
                spec.name, spec.block_size
            )
        })?;
    model.block_size = block_size;
    if let Some(context) = spec.context_length {
        let context = u32::try_from(context)
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| format!("model {:?}: context length {context}", spec.name))?;
        model.context_length = context;
    }
    if let Some(kind) = tool_parser(spec.tool_parser) {
        model.tool_parser = Some(kind);
    }
    if let Some(kind) = reasoning_parser(spec.reasoning_parser) {
        model.reasoning_parser = Some(kind);
    }
    Ok(model)
}

/// The tool-call format a deployment names; `None` for `auto` (the local entry's, else the
/// template's).
fn tool_parser(setting: ToolParser) -> Option<ToolParserKind> {
    Some(match setting {
        ToolParser::Auto => return None,
        ToolParser::Hermes => ToolParserKind::Hermes,
        ToolParser::Llama3Json => ToolParserKind::Llama3Json,
        ToolParser::Mistral => ToolParserKind::Mistral,
        ToolParser::Pythonic => ToolParserKind::Pythonic,
    })
}

/// The reasoning format a deployment names; `None` for `auto`.
fn reasoning_parser(setting: ReasoningParser) -> Option<ReasoningParserKind> {
    Some(match setting {
        ReasoningParser::Auto => return None,
        ReasoningParser::Off => ReasoningParserKind::Off,
        ReasoningParser::Think => ReasoningParserKind::Think,
        ReasoningParser::DeepseekR1 => ReasoningParserKind::DeepSeekR1,
    })
}

/// Resolves the desired state against this node's GPUs and local model definitions. Workers
/// whose desired state is `stopped` are left out (the control plane does not send them, but a
/// stale or hand-made state might).
pub fn targets(
    desired: &DesiredState,
    gpus: &[GpuInfo],
    local_models: &[ModelConfig],
) -> (Vec<Target>, Vec<Unrunnable>) {
    let by_uuid: BTreeMap<Uuid, u32> = gpus
        .iter()
        .filter_map(|g| Some((gpu_uuid(g)?, g.index)))
        .collect();
    let mut targets = Vec::new();
    let mut unrunnable = Vec::new();
    for worker in &desired.workers {
        let id = match u64::try_from(worker.worker_id) {
            Ok(id) => WorkerId(id),
            Err(_) => continue,
        };
        if worker.desired_state == DesiredWorkerState::Stopped {
            continue;
        }
        let device = match worker.gpu_id {
            None => Device::Cpu,
            Some(gpu) => match by_uuid.get(&gpu) {
                Some(index) => Device::Gpu(*index),
                None => {
                    unrunnable.push(Unrunnable {
                        id,
                        reason: format!("GPU {gpu} is not in this node's inventory"),
                    });
                    continue;
                }
            },
        };
        let model = match model_config(&worker.model, local_models) {
            Ok(model) => model,
            Err(reason) => {
                unrunnable.push(Unrunnable { id, reason });
                continue;
            }
        };
        targets.push(Target {
            id,
            config: WorkerConfig {
                model: model.name.clone(),
                device,
                role: worker.role,
            },
            model,
            // Per worker only: a draining node's workers keep serving until the control plane
            // drains each one, after its replacement elsewhere is up (this node's frontend has
            // no other worker to send their requests to).
            draining: worker.desired_state == DesiredWorkerState::Draining,
        });
    }
    (targets, unrunnable)
}

/// The steps that take the pool from `running` to `targets`, stops first (they free the
/// devices that starts may need), then restarts, drains and starts.
pub fn plan(targets: &[Target], running: &[PoolWorker]) -> Vec<Step> {
    let wanted: BTreeMap<WorkerId, &Target> = targets.iter().map(|t| (t.id, t)).collect();
    let have: BTreeMap<WorkerId, &PoolWorker> = running.iter().map(|w| (w.id, w)).collect();
    let mut stops = Vec::new();
    let mut others = Vec::new();
    let mut starts = Vec::new();
    for worker in running {
        match wanted.get(&worker.id) {
            None => stops.push(Step::Stop(worker.id)),
            Some(target) if target.config != worker.config => {
                others.push(Step::Restart((*target).clone()));
            }
            Some(target) if target.draining && !worker.draining => {
                others.push(Step::Drain(worker.id));
            }
            Some(target) if !target.draining && worker.draining => {
                others.push(Step::Undrain(worker.id));
            }
            Some(_) => {}
        }
    }
    let mut seen = BTreeSet::new();
    for target in targets {
        // A draining worker this node does not run is on its way out: nothing to start.
        if !have.contains_key(&target.id) && !target.draining && seen.insert(target.id) {
            starts.push(Step::Start(target.clone()));
        }
    }
    stops.extend(others);
    stops.extend(starts);
    stops
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use kvfleet_proto::api::{DesiredWorker, NodeState};

    use crate::worker::EngineKind;

    use super::*;
    use kvfleet_proto::api::WorkerRole;

    fn spec(name: &str, format: ModelFormat) -> ModelSpec {
        ModelSpec {
            name: name.into(),
            format,
            path: "/models/x.gguf".into(),
            block_size: 16,
            context_length: Some(2048),
            tool_parser: ToolParser::Auto,
            reasoning_parser: ReasoningParser::Auto,
        }
    }

    fn desired_worker(id: i64, role: WorkerRole, gpu: Option<Uuid>) -> DesiredWorker {
        DesiredWorker {
            worker_id: id,
            deployment_id: Uuid::nil(),
            deployment: "d".into(),
            model: spec("m", ModelFormat::Mock),
            role,
            gpu_id: gpu,
            desired_state: DesiredWorkerState::Running,
        }
    }

    fn state(workers: Vec<DesiredWorker>) -> DesiredState {
        DesiredState {
            node_id: Uuid::nil(),
            generation: 1,
            node_state: NodeState::Healthy,
            draining: false,
            workers,
            fleet_hash_secret: None,
        }
    }

    fn gpu(index: u32, uuid: &str) -> GpuInfo {
        GpuInfo {
            index,
            uuid: uuid.into(),
            name: "Fake".into(),
            memory_total_bytes: 1 << 30,
            memory_used_bytes: 0,
            utilization_percent: None,
            temperature_c: None,
            power_mw: None,
            pci_bus_id: None,
        }
    }

    fn target(id: u64, role: WorkerRole, device: Device) -> Target {
        let mut model = ModelConfig::mock("m");
        model.context_length = 2048;
        Target {
            id: WorkerId(id),
            config: WorkerConfig {
                model: "m".into(),
                device,
                role,
            },
            model,
            draining: false,
        }
    }

    fn running(id: u64, role: WorkerRole, device: Device, draining: bool) -> PoolWorker {
        PoolWorker {
            id: WorkerId(id),
            config: WorkerConfig {
                model: "m".into(),
                device,
                role,
            },
            draining,
        }
    }

    #[test]
    fn plan_table() {
        use Device::{Cpu, Gpu};
        use WorkerRole::{Aggregated as Agg, Decode, Prefill};
        let drained = |mut t: Target| {
            t.draining = true;
            t
        };
        // (what, targets, running, expected steps)
        type Row = (&'static str, Vec<Target>, Vec<PoolWorker>, Vec<Step>);
        let rows: Vec<Row> = vec![
            ("nothing to do", vec![], vec![], vec![]),
            (
                "start what is missing",
                vec![target(1, Agg, Cpu), target(2, Agg, Gpu(0))],
                vec![],
                vec![
                    Step::Start(target(1, Agg, Cpu)),
                    Step::Start(target(2, Agg, Gpu(0))),
                ],
            ),
            (
                "stop what is no longer wanted",
                vec![],
                vec![running(7, Agg, Cpu, false)],
                vec![Step::Stop(WorkerId(7))],
            ),
            (
                "keep what matches",
                vec![target(1, Agg, Cpu)],
                vec![running(1, Agg, Cpu, false)],
                vec![],
            ),
            (
                "role change restarts",
                vec![target(1, Prefill, Gpu(0))],
                vec![running(1, Decode, Gpu(0), false)],
                vec![Step::Restart(target(1, Prefill, Gpu(0)))],
            ),
            (
                "device change restarts",
                vec![target(1, Agg, Gpu(1))],
                vec![running(1, Agg, Gpu(0), false)],
                vec![Step::Restart(target(1, Agg, Gpu(1)))],
            ),
            (
                "drain a running worker",
                vec![drained(target(1, Agg, Cpu))],
                vec![running(1, Agg, Cpu, false)],
                vec![Step::Drain(WorkerId(1))],
            ),
            (
                "undrain when wanted again",
                vec![target(1, Agg, Cpu)],
                vec![running(1, Agg, Cpu, true)],
                vec![Step::Undrain(WorkerId(1))],
            ),
            (
                "a draining worker that is not running is not started",
                vec![drained(target(3, Agg, Cpu))],
                vec![],
                vec![],
            ),
            (
                "stops come before starts (they free devices)",
                vec![target(2, Agg, Gpu(0))],
                vec![running(1, Agg, Gpu(0), false)],
                vec![Step::Stop(WorkerId(1)), Step::Start(target(2, Agg, Gpu(0)))],
            ),
        ];
        for (what, targets, running, expected) in rows {
            assert_eq!(plan(&targets, &running), expected, "{what}");
        }
    }

    #[test]
    fn plan_is_idempotent_once_applied() {
        let targets = vec![target(1, WorkerRole::Aggregated, Device::Cpu)];
        let after: Vec<PoolWorker> = targets
            .iter()
            .map(|t| PoolWorker {
                id: t.id,
                config: t.config.clone(),
                draining: t.draining,
            })
            .collect();
        assert!(plan(&targets, &after).is_empty());
    }

    #[test]
    fn targets_map_gpus_roles_and_models() {
        let g0 = Uuid::from_u128(0xa);
        let g1 = Uuid::from_u128(0xb);
        let gpus = vec![gpu(0, &format!("GPU-{g0}")), gpu(1, &format!("GPU-{g1}"))];
        let desired = state(vec![
            desired_worker(10, WorkerRole::Prefill, Some(g1)),
            desired_worker(11, WorkerRole::Decode, None),
            desired_worker(12, WorkerRole::Aggregated, Some(Uuid::from_u128(0xdead))),
        ]);
        let (targets, unrunnable) = targets(&desired, &gpus, &[]);
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].id, WorkerId(10));
        assert_eq!(targets[0].config.device, Device::Gpu(1));
        assert_eq!(targets[0].config.role, WorkerRole::Prefill);
        assert_eq!(targets[1].config.device, Device::Cpu);
        assert_eq!(targets[1].config.role, WorkerRole::Decode);
        assert_eq!(targets[1].model.context_length, 2048);
        assert_eq!(unrunnable.len(), 1);
        assert_eq!(unrunnable[0].id, WorkerId(12));
        assert!(
            unrunnable[0]
                .reason
                .contains("not in this node's inventory")
        );
    }

    #[test]
    fn node_drain_and_stopped_workers() {
        let mut desired = state(vec![desired_worker(1, WorkerRole::Aggregated, None)]);
        desired.draining = true;
        let (t, _) = targets(&desired, &[], &[]);
        assert!(
            !t[0].draining,
            "a draining node's workers drain one by one, when told"
        );
        desired.workers[0].desired_state = DesiredWorkerState::Draining;
        let (t, _) = targets(&desired, &[], &[]);
        assert!(t[0].draining);
        desired.draining = false;
        desired.workers[0].desired_state = DesiredWorkerState::Stopped;
        let (t, u) = targets(&desired, &[], &[]);
        assert!(t.is_empty() && u.is_empty());
    }

    #[test]
    fn model_resolution() {
        // No local entry: the format decides the engine.
        let mock = model_config(&spec("m", ModelFormat::Mock), &[]).unwrap();
        assert_eq!(mock.engine, EngineKind::Mock);
        let native = model_config(&spec("m", ModelFormat::Gguf), &[]).unwrap();
        assert_eq!(native.engine, EngineKind::Native);
        assert_eq!(native.path, Some(PathBuf::from("/models/x.gguf")));
        // A local entry supplies engine settings; the control plane's block size and context
        // length win.
        let mut local = ModelConfig::mock("m");
        local.mock_token_time = std::time::Duration::from_millis(3);
        local.block_size = BlockSize::new(32).unwrap();
        let mut s = spec("m", ModelFormat::Gguf);
        s.block_size = 8;
        let merged = model_config(&s, std::slice::from_ref(&local)).unwrap();
        assert_eq!(merged.engine, EngineKind::Mock);
        assert_eq!(merged.mock_token_time, std::time::Duration::from_millis(3));
        assert_eq!(merged.block_size.get(), 8);
        assert_eq!(merged.context_length, 2048);
        // The deployment's output parsers win over the local entry's unless they are `auto`.
        local.tool_parser = Some(ToolParserKind::Mistral);
        local.reasoning_parser = Some(ReasoningParserKind::Think);
        let kept = model_config(&s, std::slice::from_ref(&local)).unwrap();
        assert_eq!(kept.tool_parser, Some(ToolParserKind::Mistral));
        assert_eq!(kept.reasoning_parser, Some(ReasoningParserKind::Think));
        s.tool_parser = ToolParser::Pythonic;
        s.reasoning_parser = ReasoningParser::Off;
        let set = model_config(&s, std::slice::from_ref(&local)).unwrap();
        assert_eq!(set.tool_parser, Some(ToolParserKind::Pythonic));
        assert_eq!(set.reasoning_parser, Some(ReasoningParserKind::Off));
        let fresh = model_config(&s, &[]).unwrap();
        assert_eq!(fresh.tool_parser, Some(ToolParserKind::Pythonic));
        // Bad numbers are reasons, not panics.
        let mut bad = spec("m", ModelFormat::Mock);
        bad.block_size = 0;
        assert!(model_config(&bad, &[]).is_err());
        let mut bad = spec("m", ModelFormat::Gguf);
        bad.path = " ".into();
        assert!(model_config(&bad, &[]).is_err());
        let mut bad = spec("m", ModelFormat::Mock);
        bad.context_length = Some(-1);
        assert!(model_config(&bad, &[]).is_err());
    }

    #[test]
    fn gpu_uuids() {
        let u = Uuid::from_u128(7);
        assert_eq!(gpu_uuid(&gpu(0, &format!("GPU-{u}"))), Some(u));
        assert_eq!(gpu_uuid(&gpu(0, &u.to_string())), Some(u));
        assert_eq!(gpu_uuid(&gpu(0, "GPU-not-a-uuid")), None);
    }
}
