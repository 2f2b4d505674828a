//! Identifiers of the things a fleet is made of.
//!
//! Each id is its own type so that a worker id can never be passed where a node id is meant.
//! Nodes, GPUs, models and deployments are named by UUIDs (the control plane mints them; NVML
//! reports GPU UUIDs). Workers are named by a compact `u64`: worker ids appear in every KV event
//! and in every entry of a router's index, where 8 bytes matter more than global uniqueness.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The error returned when an id's text form does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} id {input:?}: {reason}")]
pub struct IdParseError {
    /// Which kind of id was being parsed (`node`, `worker`, ...).
    pub kind: &'static str,
    /// The rejected text.
    pub input: String,
    /// Why it was rejected.
    pub reason: String,
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// The id's kind as it appears in error messages and logs.
            pub const KIND: &'static str = $kind;

            /// Wraps an existing UUID.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The underlying UUID.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|e| IdParseError {
                    kind: $kind,
                    input: s.to_owned(),
                    reason: e.to_string(),
                })
            }
        }
    };
}

uuid_id!(
    /// A machine running `kvfleet-agent`.
    NodeId,
    "node"
);
uuid_id!(
    /// One accelerator, named by its NVML UUID (`GPU-` prefix stripped) or, for fake and CPU
    /// inventories, by a UUID the agent mints and persists.
    GpuId,
    "gpu"
);
uuid_id!(
    /// A model registered with the control plane (weights, format, block size).
    ModelId,
    "model"
);
uuid_id!(
    /// A deployment: a model served with a mode, SLA targets and worker bounds.
    DeploymentId,
    "deployment"
);

impl GpuId {
    /// Parses an NVML UUID such as `GPU-8d2b7a3e-...`; the `GPU-` (or `MIG-`) prefix is optional.
    pub fn from_nvml(text: &str) -> Result<Self, IdParseError> {
        let bare = text
            .strip_prefix("GPU-")
            .or_else(|| text.strip_prefix("MIG-"))
            .unwrap_or(text);
        bare.parse()
    }
}

/// One engine instance (a GPU or a CPU slot). Unique within a fleet: the control plane assigns
/// them; a standalone agent numbers its own workers from 1.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkerId({})", self.0)
    }
}

impl FromStr for WorkerId {
    type Err = IdParseError;

    /// Accepts `w17` (the display form) and plain `17`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix('w').unwrap_or(s);
        digits.parse().map(WorkerId).map_err(|e| IdParseError {
            kind: "worker",
            input: s.to_owned(),
            reason: format!("{e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_ids_round_trip_through_text_and_json() {
        let id = NodeId(Uuid::new_v4());
        assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", id.0));
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
    }

    #[test]
    fn bad_id_text_names_the_kind_and_input() {
        let err = "not-a-uuid".parse::<DeploymentId>().unwrap_err();
        assert_eq!(err.kind, "deployment");
        assert!(err.to_string().contains("not-a-uuid"), "{err}");
        let err = "wx".parse::<WorkerId>().unwrap_err();
        assert_eq!(err.kind, "worker");
    }

    #[test]
    fn worker_ids_accept_both_text_forms() {
        assert_eq!("w17".parse::<WorkerId>().unwrap(), WorkerId(17));
        assert_eq!("17".parse::<WorkerId>().unwrap(), WorkerId(17));
        assert_eq!(WorkerId(17).to_string(), "w17");
    }

    #[test]
    fn nvml_gpu_uuids_parse_with_or_without_prefix() {
        let text = "GPU-8d2b7a3e-1c4f-4b7e-9a0d-3f5e6a7b8c9d";
        let id = GpuId::from_nvml(text).unwrap();
        assert_eq!(id.to_string(), "8d2b7a3e-1c4f-4b7e-9a0d-3f5e6a7b8c9d");
        assert_eq!(GpuId::from_nvml(&id.to_string()).unwrap(), id);
        assert!(GpuId::from_nvml("GPU-nope").is_err());
    }
}
