//! The first schema applies to an empty database and its constraints refuse bad rows.
//!
//! Each `#[sqlx::test]` gets a fresh database with every migration applied (`DATABASE_URL` points
//! at the test cluster that `scripts/test.sh` starts).

// Setup helpers outside #[test] functions panic on failure too.
#![allow(clippy::unwrap_used)]

use sqlx::PgPool;

/// Seeds one valid row per table and returns (node, model, deployment, gpu) ids.
async fn seed(pool: &PgPool) -> (uuid::Uuid, uuid::Uuid, uuid::Uuid, uuid::Uuid) {
    let node = uuid::Uuid::new_v4();
    let gpu = uuid::Uuid::new_v4();
    let model = uuid::Uuid::new_v4();
    let deployment = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO nodes (id, hostname) VALUES ($1, 'gpu-node-01')")
        .bind(node)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO gpus (id, node_id, device_index, name, memory_total_bytes)
         VALUES ($1, $2, 0, 'NVIDIA H100 80GB HBM3', 85899345920)",
    )
    .bind(gpu)
    .bind(node)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO models (id, name, format, path) VALUES ($1, 'smollm2-135m', 'gguf', '/models/s.gguf')",
    )
    .bind(model)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO deployments (id, name, model_id, min_workers, max_workers) VALUES ($1, 'chat', $2, 1, 4)",
    )
    .bind(deployment)
    .bind(model)
    .execute(pool)
    .await
    .unwrap();
    (node, model, deployment, gpu)
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn migrations_create_every_table(pool: PgPool) {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_sqlx%' ORDER BY table_name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "api_tokens",
            "audit_log",
            "deployments",
            "gpus",
            "kv_checkpoints",
            "kv_log",
            "leader_epoch",
            "metrics_rollup_state",
            "models",
            "node_ca",
            "node_certificates",
            "nodes",
            "perf_profiles",
            "planner_decisions",
            "planner_observations",
            "planner_settings",
            "stored_responses",
            "worker_metrics",
            "worker_metrics_rollup",
            "worker_windows",
            "workers"
        ]
    );
    // Valid rows go in, and a worker gets a compact integer id.
    let (node, _, deployment, gpu) = seed(&pool).await;
    let worker: i64 = sqlx::query_scalar(
        "INSERT INTO workers (deployment_id, node_id, gpu_id) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(deployment)
    .bind(node)
    .bind(gpu)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(worker >= 1);
}

/// One row per constraint: a statement that must fail, and the constraint that must say so.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn constraints_reject_bad_rows(pool: PgPool) {
    let (node, model, deployment, gpu) = seed(&pool).await;
    sqlx::query("INSERT INTO workers (deployment_id, node_id, gpu_id) VALUES ($1, $2, $3)")
        .bind(deployment)
        .bind(node)
        .bind(gpu)
        .execute(&pool)
        .await
        .unwrap();
    let hash = vec![0u8; 32];
    let cases: &[(&str, String, &str)] = &[
        ("hostname with a space", format!("INSERT INTO nodes (id, hostname) VALUES ('{}', 'bad host')", uuid::Uuid::new_v4()), "nodes_hostname_check"),
        ("duplicate live hostname", format!("INSERT INTO nodes (id, hostname) VALUES ('{}', 'gpu-node-01')", uuid::Uuid::new_v4()), "nodes_live_hostname"),
        ("unknown node state", format!("UPDATE nodes SET state = 'sleeping' WHERE id = '{node}'"), "nodes_state_check"),
        ("labels not an object", format!("UPDATE nodes SET labels = '[1]' WHERE id = '{node}'"), "nodes_labels_check"),
        ("gpu on a missing node", format!("INSERT INTO gpus (id, node_id, device_index, name, memory_total_bytes) VALUES ('{}', '{}', 1, 'x', 1)", uuid::Uuid::new_v4(), uuid::Uuid::new_v4()), "gpus_node_id_fkey"),
        ("two gpus at one index", format!("INSERT INTO gpus (id, node_id, device_index, name, memory_total_bytes) VALUES ('{}', '{node}', 0, 'x', 1)", uuid::Uuid::new_v4()), "gpus_node_id_device_index_key"),
        ("gpu with no memory", format!("INSERT INTO gpus (id, node_id, device_index, name, memory_total_bytes) VALUES ('{}', '{node}', 3, 'x', 0)", uuid::Uuid::new_v4()), "gpus_memory_total_bytes_check"),
        ("unknown model format", format!("INSERT INTO models (id, name, format, path) VALUES ('{}', 'm2', 'onnx', '/m')", uuid::Uuid::new_v4()), "models_format_check"),
        ("block size zero", format!("INSERT INTO models (id, name, format, path, block_size) VALUES ('{}', 'm3', 'gguf', '/m', 0)", uuid::Uuid::new_v4()), "models_block_size_check"),
        ("duplicate model name", format!("INSERT INTO models (id, name, format, path) VALUES ('{}', 'smollm2-135m', 'gguf', '/m')", uuid::Uuid::new_v4()), "models_name_key"),
        ("min workers above max", format!("INSERT INTO deployments (id, name, model_id, min_workers, max_workers) VALUES ('{}', 'd2', '{model}', 5, 2)", uuid::Uuid::new_v4()), "deployments_min_le_max"),
        ("negative TTFT target", format!("INSERT INTO deployments (id, name, model_id, ttft_target_ms) VALUES ('{}', 'd3', '{model}', -1)", uuid::Uuid::new_v4()), "deployments_ttft_target_ms_check"),
        ("unknown deployment mode", format!("INSERT INTO deployments (id, name, model_id, mode) VALUES ('{}', 'd4', '{model}', 'sharded')", uuid::Uuid::new_v4()), "deployments_mode_check"),
        ("upper-case deployment name", format!("INSERT INTO deployments (id, name, model_id) VALUES ('{}', 'Chat', '{model}')", uuid::Uuid::new_v4()), "deployments_name_check"),
        ("model deleted under a deployment", format!("DELETE FROM models WHERE id = '{model}'"), "deployments_model_id_fkey"),
        ("second live worker on a gpu", format!("INSERT INTO workers (deployment_id, node_id, gpu_id) VALUES ('{deployment}', '{node}', '{gpu}')"), "workers_one_live_per_gpu"),
        ("unknown worker role", format!("INSERT INTO workers (deployment_id, node_id, role) VALUES ('{deployment}', '{node}', 'verify')"), "workers_role_check"),
        ("unknown observed state", format!("INSERT INTO workers (deployment_id, node_id, observed_state) VALUES ('{deployment}', '{node}', 'zombie')"), "workers_observed_state_check"),
        ("unknown token role", format!("INSERT INTO api_tokens (id, name, role, prefix, secret_hash) VALUES ('{}', 't', 'root', 'kvf_abcdefgh', '\\x{}')", uuid::Uuid::new_v4(), hex(&hash)), "api_tokens_role_check"),
        ("short secret hash", format!("INSERT INTO api_tokens (id, name, role, prefix, secret_hash) VALUES ('{}', 't', 'admin', 'kvf_abcdefgh', '\\x00')", uuid::Uuid::new_v4()), "api_tokens_secret_hash_check"),
        ("agent token without node", format!("INSERT INTO api_tokens (id, name, role, prefix, secret_hash) VALUES ('{}', 't', 'agent', 'kvf_abcdefgh', '\\x{}')", uuid::Uuid::new_v4(), hex(&hash)), "api_tokens_agent_has_node"),
        ("expiry before creation", format!("INSERT INTO api_tokens (id, name, role, prefix, secret_hash, expires_at) VALUES ('{}', 't', 'admin', 'kvf_abcdefgh', '\\x{}', now() - interval '1 day')", uuid::Uuid::new_v4(), hex(&hash)), "api_tokens_expiry_after_creation"),
        ("audit action not dotted", "INSERT INTO audit_log (actor, action, target_type) VALUES ('admin', 'DeleteEverything', 'node')".to_owned(), "audit_log_action_check"),
    ];
    for (name, statement, constraint) in cases {
        let error = sqlx::query(sqlx::AssertSqlSafe(statement.as_str()))
            .execute(&pool)
            .await
            .expect_err(&format!("case {name:?} was accepted: {statement}"));
        let found = error
            .as_database_error()
            .and_then(|e| e.constraint().map(str::to_owned));
        assert_eq!(
            found.as_deref(),
            Some(*constraint),
            "case {name:?}: {error}"
        );
    }
    // Nothing above changed the seeded rows.
    let workers: i64 = sqlx::query_scalar("SELECT count(*) FROM workers")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(workers, 1);
}

/// A removed node's hostname can join again; the partial unique index allows it.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn removed_hostnames_can_rejoin(pool: PgPool) {
    let (node, ..) = seed(&pool).await;
    sqlx::query("UPDATE nodes SET state = 'removed' WHERE id = $1")
        .bind(node)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO nodes (id, hostname) VALUES ($1, 'gpu-node-01')")
        .bind(uuid::Uuid::new_v4())
        .execute(&pool)
        .await
        .unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
