//! The KV event pipeline through the control plane, over real HTTP and a real Postgres:
//! uploads → sequenced stream and snapshot; idempotent retries; rejected and counted bad input;
//! re-sync after falling out of the retained stream; the index rebuilt from Postgres by a
//! restarted (or second) replica; a lost node's blocks leaving the index; workers' live loads
//! passed from one agent's upload to every other agent's stream page.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use kvfleet_controlplane::auth::Role;
use kvfleet_controlplane::kv_index::{KvIndexConfig, KvIndexStats};
use kvfleet_controlplane::{AppState, Config};
use kvfleet_proto::hash::{BlockSize, block_hashes};
use kvfleet_proto::kv_stream::{
    KvEventBatch, KvEventBatchResult, KvSnapshot, KvStreamItem, KvStreamPage, KvWorkerBlocks,
    WorkerEpoch, WorkerLoadReport,
};
use kvfleet_proto::{KvEvent, KvEventData, SequenceHash, Tier, WorkerId};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// A replica started with KV index tuning (`common::start` uses the defaults).
struct Replica {
    addr: std::net::SocketAddr,
    state: AppState,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Replica {
    fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.addr)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("replica stops within 20 s")
            .unwrap()
            .unwrap();
    }
}

async fn start_replica(pool: &PgPool, config: Config, kv: KvIndexConfig) -> Replica {
    let own_pool = PgPoolOptions::new()
        .max_connections(config.database.max_connections)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    kvfleet_controlplane::store::migrate(&own_pool)
        .await
        .unwrap();
    let state = AppState::with_kv_config(own_pool, config, kv)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(kvfleet_controlplane::serve(
        state.clone(),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    Replica {
        addr,
        state,
        stop,
        task,
    }
}

fn kv_config() -> KvIndexConfig {
    KvIndexConfig {
        poll_interval: Duration::from_millis(50),
        sweep_interval: Duration::from_millis(100),
        ..KvIndexConfig::default()
    }
}

async fn send(
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let response = call(method, &url, Some(token), body).await;
    (response.status, response.body)
}

async fn upload(
    replica: &Replica,
    agent: &str,
    batch: &KvEventBatch,
) -> (StatusCode, KvEventBatchResult) {
    let body = serde_json::to_value(batch).unwrap();
    let (status, body) = send(
        reqwest::Method::POST,
        replica.url("/agent/kv-events"),
        agent,
        Some(&body),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (status, serde_json::from_value(body).unwrap())
}

async fn stream(replica: &Replica, agent: &str, after: u64, wait_s: u64) -> KvStreamPage {
    let (status, body) = send(
        reqwest::Method::GET,
        replica.url(&format!("/agent/kv-stream?after={after}&wait_s={wait_s}")),
        agent,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_value(body).unwrap()
}

async fn stream_loads(
    replica: &Replica,
    agent: &str,
    after: u64,
    loads_after: u64,
    wait_s: u64,
) -> KvStreamPage {
    let (status, body) = send(
        reqwest::Method::GET,
        replica.url(&format!(
            "/agent/kv-stream?after={after}&loads_after={loads_after}&wait_s={wait_s}"
        )),
        agent,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_value(body).unwrap()
}

fn load(worker: u64, decode_blocks: u64) -> WorkerLoadReport {
    WorkerLoadReport {
        worker: WorkerId(worker),
        prefill_tokens: 512,
        decode_blocks,
        queue_depth: 3,
        age_ms: 0,
    }
}

fn loads(loads: Vec<WorkerLoadReport>) -> KvEventBatch {
    KvEventBatch {
        epochs: vec![],
        events: vec![],
        loads,
    }
}

async fn snapshot(replica: &Replica, agent: &str) -> KvSnapshot {
    let (status, body) = send(
        reqwest::Method::GET,
        replica.url("/agent/kv-snapshot"),
        agent,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_value(body).unwrap()
}

async fn stats(replica: &Replica, viewer: &str) -> KvIndexStats {
    let (status, body) = send(reqwest::Method::GET, replica.url("/kv/stats"), viewer, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_value(body).unwrap()
}

/// A prompt's blocks stored by `worker` as event `event_id` (32 tokens from `first_token`:
/// two blocks).
fn stored(worker: u64, event_id: u64, first_token: u32) -> KvEvent {
    let tokens: Vec<u32> = (first_token..first_token + 32).collect();
    KvEvent {
        worker: WorkerId(worker),
        event_id,
        tier: Tier::G1,
        data: KvEventData::Stored {
            parent: None,
            blocks: block_hashes(&tokens, BlockSize::default()),
        },
    }
}

fn batch(events: Vec<KvEvent>) -> KvEventBatch {
    KvEventBatch {
        epochs: vec![],
        events,
        loads: vec![],
    }
}

/// Blocks per worker in a snapshot.
fn blocks_of(snapshot: &KvSnapshot) -> Vec<(u64, BTreeSet<SequenceHash>)> {
    snapshot
        .workers
        .iter()
        .map(|w| {
            (
                w.worker.0,
                w.tiers
                    .iter()
                    .flat_map(|t| t.blocks.iter().copied())
                    .collect(),
            )
        })
        .collect()
}

/// Applies a snapshot and then stream items to a plain model of the index (worker → blocks),
/// the way a router would.
fn replay(
    snapshot: Option<&KvSnapshot>,
    items: &[KvStreamItem],
) -> Vec<(u64, BTreeSet<SequenceHash>)> {
    let mut model: std::collections::BTreeMap<u64, BTreeSet<SequenceHash>> = Default::default();
    if let Some(snapshot) = snapshot {
        for (worker, blocks) in blocks_of(snapshot) {
            model.insert(worker, blocks);
        }
    }
    for item in items {
        match item {
            KvStreamItem::Event { event } => {
                let entry = model.entry(event.worker.0).or_default();
                match &event.data {
                    KvEventData::Stored { blocks, .. } => {
                        entry.extend(blocks.iter().map(|b| b.sequence));
                    }
                    KvEventData::Removed { blocks } => {
                        for b in blocks {
                            entry.remove(b);
                        }
                    }
                    KvEventData::Cleared => entry.clear(),
                }
            }
            KvStreamItem::WorkerReset { worker, .. } => {
                model.insert(worker.0, BTreeSet::new());
            }
            KvStreamItem::WorkerRemoved { worker } => {
                model.remove(&worker.0);
            }
        }
    }
    model.into_iter().collect()
}

/// Two nodes with one GPU each and a deployment with one worker on each; returns, per node,
/// (node id, agent credential, worker id), and an operator and a viewer token.
struct Fleet {
    nodes: Vec<(String, String, u64)>,
    viewer: String,
}

async fn fleet(replica: &Replica, pool: &PgPool) -> Fleet {
    let join = token(pool, Role::Join).await;
    let operator = token(pool, Role::Operator).await;
    let viewer = token(pool, Role::Viewer).await;
    let server_like = |path: &str| replica.url(path);
    let mut nodes = Vec::new();
    for host in ["kv-a", "kv-b"] {
        let (status, body) = send(
            reqwest::Method::POST,
            server_like("/agent/register"),
            &join,
            Some(&register_body(host, 1)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let node = body["node_id"].as_str().unwrap().to_owned();
        let agent = body["credential"].as_str().unwrap().to_owned();
        let (status, _) = send(
            reqwest::Method::POST,
            server_like("/agent/heartbeat"),
            &agent,
            Some(&json!({})),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        nodes.push((node, agent));
    }
    let (status, body) = send(
        reqwest::Method::POST,
        server_like("/models"),
        &operator,
        Some(&json!({ "name": "kv-model", "format": "mock", "path": "/models/mock" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = send(
        reqwest::Method::POST,
        server_like("/deployments"),
        &operator,
        Some(&json!({ "name": "kv", "model": "kv-model", "min_workers": 2, "max_workers": 2 })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut out = Vec::new();
    for (node, agent) in nodes {
        let url = server_like(&format!("/workers?node_id={node}"));
        let worker = eventually(Duration::from_secs(15), "a worker on each node", || {
            let url = url.clone();
            let operator = operator.clone();
            async move {
                let (_, body) = send(reqwest::Method::GET, url, &operator, None).await;
                body["items"]
                    .as_array()
                    .and_then(|items| items.first())
                    .and_then(|w| w["id"].as_u64())
            }
        })
        .await;
        out.push((node, agent, worker));
    }
    Fleet { nodes: out, viewer }
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn uploads_stream_in_order_and_retries_are_idempotent(pool: PgPool) {
    let cp = start_replica(&pool, test_config(), kv_config()).await;
    let fleet = fleet(&cp, &pool).await;
    let (_, agent_a, wa) = fleet.nodes[0].clone();
    let (_, agent_b, wb) = fleet.nodes[1].clone();

    // A stream follower parked at the head wakes when the first batch lands.
    let waiting = {
        let url = cp.url("/agent/kv-stream?after=0&wait_s=10");
        let agent = agent_b.clone();
        tokio::spawn(async move { send(reqwest::Method::GET, url, &agent, None).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first = batch(vec![
        stored(wa, 0, 0),
        stored(wa, 1, 100),
        stored(wa, 2, 200),
    ]);
    let (_, result) = upload(&cp, &agent_a, &first).await;
    assert_eq!(
        (result.applied, result.duplicate, result.head_seq),
        (3, 0, 3)
    );
    let (status, woke) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the long poll returns when events land")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let woke: KvStreamPage = serde_json::from_value(woke).unwrap();
    assert!(!woke.items.is_empty());
    assert_eq!(woke.items[0].seq, 1);

    let (_, result) = upload(&cp, &agent_b, &batch(vec![stored(wb, 0, 0)])).await;
    assert_eq!((result.applied, result.head_seq), (1, 4));

    // Every change, numbered 1.. without holes, in upload order.
    let page = stream(&cp, &agent_b, 0, 0).await;
    assert_eq!(
        page.items.iter().map(|i| i.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!((page.next_after, page.head_seq, page.resync), (4, 4, false));
    let ids: Vec<(u64, u64)> = page
        .items
        .iter()
        .map(|i| match &i.item {
            KvStreamItem::Event { event } => (event.worker.0, event.event_id),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(ids, vec![(wa, 0), (wa, 1), (wa, 2), (wb, 0)]);
    // Caught up: an empty page at once without `wait_s`.
    let empty = stream(&cp, &agent_a, 4, 0).await;
    assert!(empty.items.is_empty() && !empty.resync);

    // The answer was lost, the agent retries: nothing changes, the events are counted.
    let (_, retry) = upload(&cp, &agent_a, &first).await;
    assert_eq!(
        (
            retry.applied,
            retry.duplicate,
            retry.out_of_order,
            retry.head_seq
        ),
        (0, 1, 2, 4)
    );
    assert_eq!(stream(&cp, &agent_a, 0, 0).await.items.len(), 4);
    // A retry overlapping new events applies only the new ones.
    let (_, overlap) = upload(
        &cp,
        &agent_a,
        &batch(vec![stored(wa, 2, 200), stored(wa, 3, 300)]),
    )
    .await;
    assert_eq!(
        (overlap.applied, overlap.duplicate, overlap.head_seq),
        (1, 1, 5)
    );

    // The snapshot is the stream replayed, and says where to continue.
    let snap = snapshot(&cp, &agent_a).await;
    assert_eq!(snap.seq, 5);
    let all = stream(&cp, &agent_a, 0, 0).await;
    let items: Vec<KvStreamItem> = all.items.into_iter().map(|i| i.item).collect();
    assert_eq!(blocks_of(&snap), replay(None, &items));
    assert_eq!(snap.block_count(), 2 * 4 + 2);
    let next: Vec<(u64, u64)> = snap
        .workers
        .iter()
        .map(|w| (w.worker.0, w.next_event_id))
        .collect();
    let mut expected = vec![(wa, 4), (wb, 1)];
    expected.sort_unstable();
    assert_eq!(next, expected, "in worker-id order");

    // Persisted: one kv_log row per change.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM kv_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 5);
    let counters = stats(&cp, &fleet.viewer).await.counters;
    assert_eq!(
        (counters.applied, counters.duplicate, counters.out_of_order),
        (5, 2, 2)
    );
    cp.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn bad_input_is_rejected_and_counted(pool: PgPool) {
    let cp = start_replica(&pool, test_config(), kv_config()).await;
    let fleet = fleet(&cp, &pool).await;
    let (_, agent_a, wa) = fleet.nodes[0].clone();
    let (_, _, wb) = fleet.nodes[1].clone();

    let mut broken = stored(wa, 1, 500);
    if let KvEventData::Stored { blocks, .. } = &mut broken.data {
        blocks[1].sequence.0 ^= 1;
    }
    // Node A sends: its own worker's event, one for a worker that does not exist, one for node
    // B's worker, a broken chain, and one that skips ahead (events 2..4 were lost).
    let mixed = batch(vec![
        stored(wa, 0, 0),
        stored(999_999, 0, 0),
        stored(wb, 0, 0),
        broken,
        stored(wa, 5, 600),
    ]);
    let (_, result) = upload(&cp, &agent_a, &mixed).await;
    assert_eq!(
        (
            result.applied,
            result.unknown_worker,
            result.broken_chain,
            result.gaps
        ),
        (2, 2, 1, 1)
    );
    assert_eq!(
        result.unknown_workers,
        vec![WorkerId(wb), WorkerId(999_999)]
    );
    let counters = stats(&cp, &fleet.viewer).await.counters;
    assert_eq!(
        (
            counters.unknown_worker,
            counters.broken_chain,
            counters.gaps
        ),
        (2, 1, 1)
    );
    // Only node A's worker is in the index.
    let snap = snapshot(&cp, &agent_a).await;
    assert_eq!(snap.workers.len(), 1);
    assert_eq!(
        (snap.workers[0].worker.0, snap.workers[0].next_event_id),
        (wa, 6)
    );

    // An older engine incarnation is ignored; a newer one resets the worker.
    let restart = KvEventBatch {
        epochs: vec![WorkerEpoch {
            worker: WorkerId(wa),
            epoch: 2,
        }],
        events: vec![stored(wa, 0, 900)],
        loads: vec![],
    };
    let (_, result) = upload(&cp, &agent_a, &restart).await;
    assert_eq!(result.applied, 1);
    let stale = KvEventBatch {
        epochs: vec![WorkerEpoch {
            worker: WorkerId(wa),
            epoch: 1,
        }],
        events: vec![stored(wa, 1, 0)],
        loads: vec![],
    };
    let (_, result) = upload(&cp, &agent_a, &stale).await;
    assert_eq!((result.applied, result.stale_epoch), (0, 1));
    let snap = snapshot(&cp, &agent_a).await;
    assert_eq!(
        (snap.workers[0].epoch, snap.workers[0].next_event_id),
        (2, 1)
    );
    assert_eq!(snap.block_count(), 2, "only the restarted engine's blocks");

    // Malformed bodies and other roles never reach the index.
    let (status, body) = send(
        reqwest::Method::POST,
        cp.url("/agent/kv-events"),
        &agent_a,
        Some(&json!({ "events": [{ "worker": wa, "event_id": 0, "tier": "g9", "type": "cleared" }] })),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let too_many = batch((0..10_001).map(|i| stored(wa, 10 + i, 0)).collect());
    let (status, _) = send(
        reqwest::Method::POST,
        cp.url("/agent/kv-events"),
        &agent_a,
        Some(&serde_json::to_value(&too_many).unwrap()),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = send(
        reqwest::Method::POST,
        cp.url("/agent/kv-events"),
        &fleet.viewer,
        Some(&serde_json::to_value(batch(vec![])).unwrap()),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = send(
        reqwest::Method::GET,
        cp.url("/agent/kv-stream?after=x"),
        &agent_a,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    cp.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn a_follower_too_far_behind_resyncs_from_a_consistent_snapshot(pool: PgPool) {
    let kv = KvIndexConfig {
        stream_retention: 4,
        ..kv_config()
    };
    let cp = start_replica(&pool, test_config(), kv).await;
    let fleet = fleet(&cp, &pool).await;
    let (_, agent_a, wa) = fleet.nodes[0].clone();
    let (_, agent_b, wb) = fleet.nodes[1].clone();

    // A router reads the first two changes, then loses its connection for a while.
    upload(
        &cp,
        &agent_a,
        &batch(vec![stored(wa, 0, 0), stored(wa, 1, 100)]),
    )
    .await;
    let early = stream(&cp, &agent_b, 0, 0).await;
    assert_eq!(early.next_after, 2);
    upload(
        &cp,
        &agent_b,
        &batch((0..5).map(|i| stored(wb, i, 1000 * i as u32)).collect()),
    )
    .await;
    let removed = KvEvent {
        worker: WorkerId(wa),
        event_id: 2,
        tier: Tier::G1,
        data: KvEventData::Removed {
            blocks: block_hashes(&(0..32).collect::<Vec<u32>>(), BlockSize::default())
                .iter()
                .map(|b| b.sequence)
                .collect(),
        },
    };
    upload(&cp, &agent_a, &batch(vec![removed])).await;

    // Changes 3..4 are no longer retained: the router must re-sync.
    let late = stream(&cp, &agent_b, early.next_after, 0).await;
    assert!(late.resync, "{late:?}");
    assert!(late.items.is_empty());
    let snap = snapshot(&cp, &agent_b).await;
    assert_eq!(snap.seq, 8);
    // The snapshot equals what a router that never missed anything has.
    let full = {
        let mut items = early.items.clone();
        let page = stream(&cp, &agent_b, 4, 0).await;
        assert!(!page.resync);
        items.extend(page.items);
        items
    };
    assert_eq!(full.len(), 6, "1, 2 and the retained 5..8");
    // Rebuild what was missed (3, 4) from Postgres, which still has it: the persisted log.
    let missing: Vec<(i64, sqlx::types::Json<KvStreamItem>)> =
        sqlx::query_as("SELECT seq, item FROM kv_log WHERE seq IN (3, 4) ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(missing.len(), 2);
    let mut everything: Vec<KvStreamItem> = early.items.iter().map(|i| i.item.clone()).collect();
    everything.extend(missing.into_iter().map(|(_, item)| item.0));
    everything.extend(full[2..].iter().map(|i| i.item.clone()));
    assert_eq!(blocks_of(&snap), replay(None, &everything));
    // Worker A's first prompt was removed, its second is still there.
    assert_eq!(
        blocks_of(&snap)
            .iter()
            .find(|(w, _)| *w == wa)
            .unwrap()
            .1
            .len(),
        2
    );
    // And the stream continues from the snapshot without a resync.
    upload(&cp, &agent_b, &batch(vec![stored(wb, 5, 77)])).await;
    let after = stream(&cp, &agent_b, snap.seq, 0).await;
    assert_eq!(
        (after.items.len(), after.items[0].seq, after.resync),
        (1, 9, false)
    );
    // A position ahead of the control plane (a restored database) also re-syncs.
    assert!(stream(&cp, &agent_b, 1_000, 0).await.resync);

    // A checkpoint prunes the log behind the retained stream (4 changes)...
    let checkpoint = cp.state.kv.checkpoint(&cp.state.pool, None).await.unwrap();
    assert_eq!(checkpoint, Some(9));
    let kept: Vec<i64> = sqlx::query_scalar("SELECT seq FROM kv_log ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(kept, vec![6, 7, 8, 9]);
    // ...and a replica that never reads the log on its own (it would normally tail it) and so
    // falls behind the pruned part rebuilds from the checkpoint when it next writes.
    let lagging = start_replica(
        &pool,
        test_config(),
        KvIndexConfig {
            stream_retention: 4,
            poll_interval: Duration::from_secs(3600),
            ..kv_config()
        },
    )
    .await;
    assert_eq!(snapshot(&lagging, &agent_a).await.seq, 9);
    for i in 0..6 {
        upload(
            &cp,
            &agent_a,
            &batch(vec![stored(wa, 3 + i, 3000 + i as u32)]),
        )
        .await;
    }
    cp.state.kv.checkpoint(&cp.state.pool, None).await.unwrap();
    assert_eq!(snapshot(&lagging, &agent_a).await.seq, 9, "not tailing");
    let (_, result) = upload(&lagging, &agent_b, &batch(vec![stored(wb, 6, 4242)])).await;
    assert_eq!((result.applied, result.head_seq), (1, 16));
    let (a, b) = (
        snapshot(&lagging, &agent_a).await,
        snapshot(&cp, &agent_a).await,
    );
    assert_eq!(a.seq, 16);
    let b = if b.seq == 16 {
        b
    } else {
        eventually(
            Duration::from_secs(5),
            "the first replica to catch up",
            || async {
                let snap = snapshot(&cp, &agent_a).await;
                (snap.seq == 16).then_some(snap)
            },
        )
        .await
    };
    assert_eq!(a, b);
    lagging.stop().await;
    cp.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn a_restarted_or_second_replica_rebuilds_the_index_from_postgres(pool: PgPool) {
    let cp = start_replica(&pool, test_config(), kv_config()).await;
    let fleet = fleet(&cp, &pool).await;
    let (_, agent_a, wa) = fleet.nodes[0].clone();
    let (_, agent_b, wb) = fleet.nodes[1].clone();
    upload(
        &cp,
        &agent_a,
        &batch(vec![stored(wa, 0, 0), stored(wa, 1, 100)]),
    )
    .await;
    // A checkpoint in the middle: the rebuild then uses it plus the rows after it.
    let checkpoint = cp.state.kv.checkpoint(&cp.state.pool, None).await.unwrap();
    assert_eq!(checkpoint, Some(2));
    upload(&cp, &agent_b, &batch(vec![stored(wb, 0, 0)])).await;

    // A second replica over the same database agrees, and follows uploads made to the first.
    let second = start_replica(&pool, test_config(), kv_config()).await;
    assert_eq!(
        snapshot(&second, &agent_a).await,
        snapshot(&cp, &agent_a).await
    );
    upload(&cp, &agent_a, &batch(vec![stored(wa, 2, 200)])).await;
    let page = stream(&second, &agent_b, 3, 5).await;
    assert_eq!(page.items.len(), 1, "{page:?}");
    // Uploads to the second replica continue the same sequence.
    let (_, result) = upload(&second, &agent_b, &batch(vec![stored(wb, 1, 300)])).await;
    assert_eq!(result.head_seq, 5);
    second.stop().await;

    let before = eventually(
        Duration::from_secs(5),
        "the first replica to catch up",
        || async {
            let snap = snapshot(&cp, &agent_a).await;
            (snap.seq == 5).then_some(snap)
        },
    )
    .await;
    cp.stop().await;

    // A restart rebuilds the same index and continues the same sequence.
    let restarted = start_replica(&pool, test_config(), kv_config()).await;
    let after = snapshot(&restarted, &agent_a).await;
    assert_eq!(after, before);
    let (_, result) = upload(
        &restarted,
        &agent_a,
        &batch(vec![stored(wa, 2, 200), stored(wa, 3, 400)]),
    )
    .await;
    assert_eq!(
        (result.applied, result.duplicate, result.head_seq),
        (1, 1, 6)
    );
    // Routers that were following keep going; older positions than the checkpoint re-sync.
    let page = stream(&restarted, &agent_b, 5, 0).await;
    assert_eq!(page.items[0].seq, 6);
    assert!(stream(&restarted, &agent_b, 1, 0).await.resync);
    restarted.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn a_lost_nodes_blocks_leave_the_index(pool: PgPool) {
    let mut config = test_config();
    short_liveness(&mut config);
    let cp = start_replica(&pool, config, kv_config()).await;
    let fleet = fleet(&cp, &pool).await;
    let (_, agent_a, wa) = fleet.nodes[0].clone();
    let (node_b, agent_b, wb) = fleet.nodes[1].clone();
    // Node A keeps heartbeating; node B goes silent after uploading.
    let beating = {
        let url = cp.url("/agent/heartbeat");
        let agent = agent_a.clone();
        tokio::spawn(async move {
            loop {
                let _ = send(reqwest::Method::POST, url.clone(), &agent, Some(&json!({}))).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    upload(&cp, &agent_a, &batch(vec![stored(wa, 0, 0)])).await;
    upload(
        &cp,
        &agent_b,
        &batch(vec![stored(wb, 0, 0), stored(wb, 1, 100)]),
    )
    .await;
    let start = snapshot(&cp, &agent_a).await;
    assert_eq!(start.workers.len(), 2);

    let removal =
        eventually(
            Duration::from_secs(15),
            "node B's worker to leave the stream",
            || async {
                stream(&cp, &agent_a, start.seq, 1)
            .await
            .items
            .into_iter()
            .find(|i| matches!(i.item, KvStreamItem::WorkerRemoved { worker } if worker.0 == wb))
            },
        )
        .await;
    assert_eq!(removal.seq, start.seq + 1);
    let (_, node) = send(
        reqwest::Method::GET,
        cp.url(&format!("/nodes/{node_b}")),
        &fleet.viewer,
        None,
    )
    .await;
    assert_eq!(node["state"], "lost");
    let after = snapshot(&cp, &agent_a).await;
    assert_eq!(
        after.workers.iter().map(|w| w.worker.0).collect::<Vec<_>>(),
        vec![wa]
    );
    assert_eq!(after.block_count(), 2);
    assert_eq!(stats(&cp, &fleet.viewer).await.counters.removed, 1);
    // Its late events are rejected: the node is lost.
    let (_, result) = upload(&cp, &agent_b, &batch(vec![stored(wb, 2, 200)])).await;
    assert_eq!(result.unknown_worker, 1);
    beating.abort();
    cp.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn loads_from_one_agent_reach_the_others_stream_and_bad_ones_are_counted(pool: PgPool) {
    let cp = start_replica(&pool, test_config(), kv_config()).await;
    let fleet = fleet(&cp, &pool).await;
    let (_, agent_a, wa) = fleet.nodes[0].clone();
    let (_, agent_b, wb) = fleet.nodes[1].clone();
    upload(&cp, &agent_a, &batch(vec![stored(wa, 0, 0)])).await;
    let caught_up = stream_loads(&cp, &agent_b, 0, 0, 0).await;
    assert_eq!(caught_up.next_after, 1);
    assert!(caught_up.loads.is_empty());

    // Node B's router waits at the head of the stream; node A posts loads and no events: the
    // long poll returns with them (no sooner than the load page interval), well before its
    // 10 s are up.
    let waiting = {
        let url = cp.url(&format!(
            "/agent/kv-stream?after=1&loads_after={}&wait_s=10",
            caught_up.loads_version
        ));
        let agent = agent_b.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let answer = send(reqwest::Method::GET, url, &agent, None).await;
            (answer, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "nothing new yet: the poll waits");
    let (_, result) = upload(&cp, &agent_a, &loads(vec![load(wa, 40)])).await;
    assert_eq!(
        (result.applied, result.loads_applied, result.loads_rejected),
        (0, 1, 0)
    );
    assert_eq!(result.head_seq, 1);
    let ((status, body), took) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the long poll returns when loads arrive")
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let page: KvStreamPage = serde_json::from_value(body).unwrap();
    assert!(page.items.is_empty() && !page.resync);
    assert_eq!(page.next_after, 1);
    assert_eq!(page.loads.len(), 1, "{page:?}");
    let got = page.loads[0];
    assert_eq!(
        (
            got.worker,
            got.prefill_tokens,
            got.decode_blocks,
            got.queue_depth
        ),
        (WorkerId(wa), 512, 40, 3)
    );
    assert!(got.age_ms < 3_000, "dated by the control plane: {got:?}");

    // Seen: the next page has no loads until new ones come; a router that never saw any
    // (or asks another replica's version) gets every current one.
    let quiet = stream_loads(&cp, &agent_b, 1, page.loads_version, 0).await;
    assert!(quiet.loads.is_empty(), "{quiet:?}");
    let fresh = stream_loads(&cp, &agent_a, 1, 0, 0).await;
    assert_eq!(fresh.loads.len(), 1);
    let foreign = stream_loads(&cp, &agent_a, 1, page.loads_version + 1_000, 0).await;
    assert_eq!(foreign.loads.len(), 1);

    // Loads of a worker that does not exist or belongs to another node are rejected and
    // counted; the good one in the same upload is taken.
    let (_, result) = upload(
        &cp,
        &agent_a,
        &loads(vec![load(wa, 41), load(wb, 7), load(999_999, 1)]),
    )
    .await;
    assert_eq!((result.loads_applied, result.loads_rejected), (1, 2));
    assert_eq!(
        result.unknown_workers,
        vec![WorkerId(wb), WorkerId(999_999)]
    );
    let stats = stats(&cp, &fleet.viewer).await;
    assert_eq!(
        (
            stats.counters.loads_received,
            stats.counters.loads_rejected,
            stats.loads
        ),
        (2, 2, 1)
    );
    let newer = stream_loads(&cp, &agent_b, 1, page.loads_version, 0).await;
    assert_eq!(
        newer
            .loads
            .iter()
            .map(|l| (l.worker.0, l.decode_blocks))
            .collect::<Vec<_>>(),
        vec![(wa, 41)]
    );
    // Too many reports in one upload: refused whole.
    let flood = loads((0..4_097).map(|_| load(wa, 1)).collect());
    let (status, _) = send(
        reqwest::Method::POST,
        cp.url("/agent/kv-events"),
        &agent_a,
        Some(&serde_json::to_value(&flood).unwrap()),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // Loads are not changes: nothing was logged for them, and the sequence did not move.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM kv_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    assert_eq!(snapshot(&cp, &agent_b).await.seq, 1);
    cp.stop().await;
}

/// `stored` in another tier.
fn stored_in(tier: Tier, worker: u64, event_id: u64, first_token: u32) -> KvEvent {
    KvEvent {
        tier,
        ..stored(worker, event_id, first_token)
    }
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn each_workers_blocks_per_tier_are_listed_for_viewers(pool: PgPool) {
    let cp = start_replica(&pool, test_config(), kv_config()).await;
    let fleet = fleet(&cp, &pool).await;
    let (_, agent_a, wa) = fleet.nodes[0].clone();
    let (_, agent_b, wb) = fleet.nodes[1].clone();
    // A: two prompts in G1, one offloaded to host memory, one of those also on disk.
    upload(
        &cp,
        &agent_a,
        &batch(vec![
            stored(wa, 0, 0),
            stored(wa, 1, 100),
            stored_in(Tier::G2, wa, 2, 200),
            stored_in(Tier::G3, wa, 3, 200),
        ]),
    )
    .await;
    // B: one prompt on disk only (its G1 copy evicted).
    upload(
        &cp,
        &agent_b,
        &batch(vec![
            stored(wb, 0, 300),
            stored_in(Tier::G3, wb, 1, 300),
            KvEvent {
                worker: WorkerId(wb),
                event_id: 2,
                tier: Tier::G1,
                data: KvEventData::Cleared,
            },
        ]),
    )
    .await;
    let (status, body) = send(
        reqwest::Method::GET,
        cp.url("/kv/workers"),
        &fleet.viewer,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listed: Vec<KvWorkerBlocks> = serde_json::from_value(body).unwrap();
    let mut expected = vec![
        KvWorkerBlocks::from_counts(WorkerId(wa), [4, 2, 2, 0]),
        KvWorkerBlocks::from_counts(WorkerId(wb), [0, 0, 2, 0]),
    ];
    expected.sort_by_key(|w| w.worker);
    assert_eq!(listed, expected, "in worker-id order");
    // Not for anyone without a token.
    let anonymous = call(reqwest::Method::GET, &cp.url("/kv/workers"), None, None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    cp.stop().await;
}
