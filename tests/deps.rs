//! Reads the workspace's dependency graph from `cargo metadata` and finds forbidden edges.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The resolved workspace graph: package id → (crate name, normal dependencies' package ids).
#[derive(Debug)]
pub struct Graph {
    nodes: BTreeMap<String, (String, Vec<String>)>,
}

impl Graph {
    /// Runs `cargo metadata` in `workspace` (with the cargo that runs the tests).
    pub fn load(workspace: &Path) -> Result<Self, String> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let output = Command::new(cargo)
            .args(["metadata", "--format-version", "1"])
            .current_dir(workspace)
            .output()
            .map_err(|e| format!("running cargo metadata: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "cargo metadata failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let json: Value = serde_json::from_slice(&output.stdout)
            .map_err(|e| format!("cargo metadata printed invalid JSON: {e}"))?;
        Self::from_metadata(&json)
    }

    /// Builds the graph from `cargo metadata` JSON. Only normal (not dev or build) dependency
    /// edges count: a test may use tokio, the library may not.
    pub fn from_metadata(json: &Value) -> Result<Self, String> {
        let names: BTreeMap<&str, &str> = json["packages"]
            .as_array()
            .ok_or("metadata has no packages")?
            .iter()
            .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
            .collect();
        let mut nodes = BTreeMap::new();
        for node in json["resolve"]["nodes"]
            .as_array()
            .ok_or("metadata has no resolve graph")?
        {
            let id = node["id"].as_str().ok_or("resolve node without id")?;
            let deps = node["deps"]
                .as_array()
                .map(|deps| {
                    deps.iter()
                        .filter(|dep| {
                            dep["dep_kinds"]
                                .as_array()
                                .is_some_and(|kinds| kinds.iter().any(|k| k["kind"].is_null()))
                        })
                        .filter_map(|dep| dep["pkg"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let name = names.get(id).copied().unwrap_or(id).to_owned();
            nodes.insert(id.to_owned(), (name, deps));
        }
        Ok(Self { nodes })
    }

    /// Every path (as crate names) from the crate `root` to a crate named in `forbidden`.
    pub fn forbidden_paths(&self, root: &str, forbidden: &[&str]) -> Vec<String> {
        let mut found = Vec::new();
        let starts = self.nodes.iter().filter(|(_, (name, _))| name == root);
        for (start, _) in starts {
            let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
            let mut queue = VecDeque::from([start.as_str()]);
            parent.insert(start, "");
            while let Some(id) = queue.pop_front() {
                let Some((dep_name, deps)) = self.nodes.get(id) else {
                    continue;
                };
                if forbidden.contains(&dep_name.as_str()) {
                    let mut path = vec![dep_name.clone()];
                    let mut at = parent[id];
                    while !at.is_empty() {
                        path.push(self.nodes[at].0.clone());
                        at = parent[at];
                    }
                    path.reverse();
                    found.push(path.join(" -> "));
                    continue;
                }
                for dep in deps {
                    if !parent.contains_key(dep.as_str()) {
                        parent.insert(dep, id);
                        queue.push_back(dep);
                    }
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dep(pkg: &str, kind: Value) -> Value {
        json!({"pkg": pkg, "dep_kinds": [{"kind": kind}]})
    }

    #[test]
    fn finds_transitive_normal_paths_and_ignores_dev_dependencies() {
        let metadata = json!({
            "packages": [
                {"id": "r", "name": "router"}, {"id": "m", "name": "middle"},
                {"id": "t", "name": "tokio"}, {"id": "p", "name": "proptest"},
                {"id": "s", "name": "sqlx"},
            ],
            "resolve": {"nodes": [
                {"id": "r", "deps": [dep("m", Value::Null), dep("s", json!("dev"))]},
                {"id": "m", "deps": [dep("t", Value::Null)]},
                {"id": "t", "deps": []}, {"id": "p", "deps": []}, {"id": "s", "deps": []},
            ]},
        });
        let graph = Graph::from_metadata(&metadata).unwrap();
        assert_eq!(
            graph.forbidden_paths("router", &["tokio", "sqlx"]),
            ["router -> middle -> tokio"]
        );
        assert!(graph.forbidden_paths("middle", &["sqlx"]).is_empty());
    }
}
