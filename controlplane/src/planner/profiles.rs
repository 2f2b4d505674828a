//! Which performance profile the planner uses for a deployment.
//!
//! Profiles are stored per model × device kind (`perf_profiles`, uploaded by `kvfleet profile`
//! or `POST /api/v1/models/{id}/profiles`). For a deployment the planner takes, among its
//! model's profiles:
//!
//! 1. the one whose device kind matches the GPUs its workers run on (names compared as
//!    lower-case words: `nvidia-h100-80gb-hbm3` matches a GPU named `NVIDIA H100 80GB HBM3`;
//!    either may contain the other), the most common GPU first;
//! 2. else its only profile, or the newest;
//! 3. else, for a `mock` model, the default mock's profile (Llama 3.1 8B on one H100,
//!    `kvfleet_engine::DEFAULT_PERF_PROFILE_TOML`, the timing model mock workers run), renamed
//!    to the model — so a mock fleet plans out of the box.
//!
//! Without any, the planner keeps the deployment as it is and its decision says to upload one.

use std::collections::BTreeMap;

use kvfleet_proto::profile::PerfProfile;
use sqlx::PgConnection;
use uuid::Uuid;

use kvfleet_proto::api::ModelFormat;

/// `NVIDIA H100 80GB HBM3` → `nvidia-h100-80gb-hbm3`.
pub fn device_kind(name: &str) -> String {
    name.to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// Whether a profile measured on `device` fits a GPU named `gpu`.
pub fn matches(device: &str, gpu: &str) -> bool {
    let (d, g) = (device_kind(device), device_kind(gpu));
    !d.is_empty() && !g.is_empty() && (d.contains(&g) || g.contains(&d))
}

/// The default mock's profile, for a mock model named `model`.
pub fn default_mock(model: &str) -> Option<PerfProfile> {
    let mut p = PerfProfile::from_toml_str(kvfleet_engine::DEFAULT_PERF_PROFILE_TOML).ok()?;
    p.model = model.to_owned();
    p.source = format!(
        "built in: the default mock profile ({}), used for mock models without an uploaded profile",
        p.device
    );
    Some(p)
}

/// Picks a profile among `stored` (newest first) for workers on `gpus` (GPU names, most
/// common first); see the module docs.
pub fn choose(stored: &[PerfProfile], gpus: &[String]) -> Option<PerfProfile> {
    for gpu in gpus {
        if let Some(p) = stored.iter().find(|p| matches(&p.device, gpu)) {
            return Some(p.clone());
        }
    }
    stored.first().cloned()
}

/// The profile of every deployment in `deployments` (id, name, model id, model name, model
/// format) that has one, by deployment name.
pub async fn for_deployments(
    conn: &mut PgConnection,
    deployments: &[(Uuid, String, Uuid, String, ModelFormat)],
) -> Result<BTreeMap<String, PerfProfile>, sqlx::Error> {
    let mut out = BTreeMap::new();
    for (id, name, model_id, model, format) in deployments {
        let rows: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT profile FROM perf_profiles WHERE model_id = $1 ORDER BY updated_at DESC",
        )
        .bind(model_id)
        .fetch_all(&mut *conn)
        .await?;
        let stored: Vec<PerfProfile> = rows
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        let gpus: Vec<String> = sqlx::query_scalar(
            "SELECT g.name FROM workers w JOIN gpus g ON g.id = w.gpu_id
             WHERE w.deployment_id = $1 AND w.desired_state <> 'stopped'
             GROUP BY g.name ORDER BY count(*) DESC, g.name",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        let chosen = choose(&stored, &gpus).or_else(|| {
            (*format == ModelFormat::Mock)
                .then(|| default_mock(model))
                .flatten()
        });
        if let Some(p) = chosen {
            out.insert(name.clone(), p);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_kinds_match_gpu_names() {
        assert_eq!(
            device_kind("NVIDIA H100 80GB HBM3"),
            "nvidia-h100-80gb-hbm3"
        );
        assert!(matches("nvidia-h100-80gb-hbm3", "NVIDIA H100 80GB HBM3"));
        assert!(matches("h100", "NVIDIA H100 80GB HBM3"));
        assert!(!matches("a100", "NVIDIA H100 80GB HBM3"));
        assert!(!matches("", "anything"));
        let mock = default_mock("tiny").unwrap();
        assert_eq!(mock.model, "tiny");
        assert!(mock.validate().is_ok());
        let mut a100 = mock.clone();
        a100.device = "nvidia-a100".into();
        let mut h100 = mock.clone();
        h100.device = "nvidia-h100".into();
        let stored = [a100.clone(), h100.clone()];
        assert_eq!(
            choose(&stored, &["NVIDIA H100 PCIe".into()])
                .unwrap()
                .device,
            "nvidia-h100"
        );
        assert_eq!(
            choose(&stored, &["Fake GPU".into()]).unwrap().device,
            "nvidia-a100"
        );
        assert_eq!(choose(&[], &["x".into()]), None);
    }
}
