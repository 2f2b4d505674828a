//! The KV event pipeline end to end, with the agent's own state machines speaking to a real
//! control plane over HTTP and a real Postgres: node A's `Uploader` sends its worker's events,
//! node B's `Follower` keeps a `Router` in step with the stream; requests with A's prefix route
//! to A's worker; the control plane going away switches B's router to approximate mode and its
//! return re-syncs it; A's engine restarting is credited under its new epoch; node A going silent removes its worker from B's router within seconds.
//!
//! The HTTP driving here is a minimal stand-in for the agent's control-plane client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kvfleet_agent::kv_sync::{Follower, FollowerConfig, FollowerRequest, Uploader, UploaderConfig};
use kvfleet_controlplane::auth::Role;
use kvfleet_controlplane::kv_index::KvIndexConfig;
use kvfleet_controlplane::{AppState, Config};
use kvfleet_kv_router::{RequestId, RouteRequest, Router, RouterConfig, RoutingMode};
use kvfleet_proto::hash::{BlockSize, block_hashes};
use kvfleet_proto::kv_stream::{KvEventBatchResult, KvSnapshot, KvStreamPage};
use kvfleet_proto::{KvEvent, KvEventData, SequenceHash, Tier, WorkerId};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

struct ControlPlane {
    base: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(pool: &PgPool, port: u16) -> ControlPlane {
    let mut config = Config::new("postgres://unused");
    config.leader.retry_interval = Duration::from_millis(200);
    config.placement.interval = Duration::from_millis(200);
    // The two nodes below are placed on as they join (joins otherwise wait for an admin).
    config.join.auto_approve = true;
    config.liveness.heartbeat_interval = Duration::from_millis(200);
    // Longer than the control-plane outage below: liveness counts silence from the last
    // heartbeat received, so an outage longer than `lost_after` would make every node lost
    // when the control plane returns.
    config.liveness.unhealthy_after = Duration::from_millis(2000);
    config.liveness.lost_after = Duration::from_millis(5000);
    config.liveness.check_interval = Duration::from_millis(100);
    config.ca.key_file =
        std::env::temp_dir().join(format!("kvfleet-test-{}-ca.key", std::process::id()));
    let own = PgPoolOptions::new()
        .max_connections(16)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    kvfleet_controlplane::store::migrate(&own).await.unwrap();
    let kv = KvIndexConfig {
        poll_interval: Duration::from_millis(50),
        sweep_interval: Duration::from_millis(100),
        ..KvIndexConfig::default()
    };
    let state = AppState::with_kv_config(own, config, kv).await.unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(kvfleet_controlplane::serve(state, listener, async move {
        let _ = stopped.await;
    }));
    ControlPlane { base, stop, task }
}

impl ControlPlane {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn create_token(pool: &PgPool, role: Role) -> String {
    let mut tx = pool.begin().await.unwrap();
    let token = kvfleet_controlplane::create_token(&mut tx, "e2e", role, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    token
}

fn tokens(first: u32) -> Vec<u32> {
    (first..first + 128).collect()
}

fn hashes(first: u32) -> Vec<SequenceHash> {
    block_hashes(&tokens(first), BlockSize::default())
        .iter()
        .map(|b| b.sequence)
        .collect()
}

fn stored(worker: u64, event_id: u64, first: u32) -> KvEvent {
    KvEvent {
        worker: WorkerId(worker),
        event_id,
        tier: Tier::G1,
        data: KvEventData::Stored {
            parent: None,
            blocks: block_hashes(&tokens(first), BlockSize::default()),
        },
    }
}

/// Milliseconds since the test began: the agent's clock for the state machines.
fn now(epoch: Instant) -> Duration {
    epoch.elapsed()
}

/// Sends what the uploader has due until it holds nothing; returns the last answer.
async fn flush(
    client: &reqwest::Client,
    base: &str,
    credential: &str,
    uploader: &mut Uploader,
    epoch: Instant,
) -> KvEventBatchResult {
    let mut last = KvEventBatchResult::default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while uploader.buffered() > 0 || last.head_seq == 0 {
        assert!(Instant::now() < deadline, "uploads did not go through");
        let Some(batch) = uploader.poll(now(epoch)) else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        match client
            .post(format!("{base}/agent/kv-events"))
            .bearer_auth(credential)
            .json(&batch)
            .send()
            .await
        {
            Ok(response) if response.status().is_success() => {
                last = response.json().await.unwrap();
                uploader.on_sent(&last);
            }
            Ok(response) => {
                let retryable = response.status().is_server_error();
                uploader.on_failed(retryable, now(epoch));
            }
            Err(_) => uploader.on_failed(true, now(epoch)),
        }
    }
    last
}

/// One step of the follower: its next request, answered into the router. Returns whether
/// the control plane answered.
async fn follow_once(
    client: &reqwest::Client,
    base: &str,
    credential: &str,
    follower: &mut Follower,
    router: &mut Router,
    epoch: Instant,
) -> bool {
    let url = match follower.next_request() {
        FollowerRequest::Snapshot => format!("{base}/agent/kv-snapshot"),
        FollowerRequest::Stream { after, loads_after } => {
            format!("{base}/agent/kv-stream?after={after}&loads_after={loads_after}&wait_s=1")
        }
    };
    let response = client
        .get(&url)
        .bearer_auth(credential)
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    let body = match response {
        Ok(r) if r.status().is_success() => r.bytes().await.ok(),
        _ => None,
    };
    let Some(body) = body else {
        follower.on_unreachable(router, now(epoch));
        tokio::time::sleep(follower.retry_delay().min(Duration::from_millis(200))).await;
        return false;
    };
    match follower.next_request() {
        FollowerRequest::Snapshot => {
            let snapshot: KvSnapshot = serde_json::from_slice(&body).unwrap();
            follower.on_snapshot(router, &snapshot, now(epoch));
        }
        FollowerRequest::Stream { .. } => {
            let page: KvStreamPage = serde_json::from_slice(&body).unwrap();
            follower.on_page(router, &page, now(epoch));
        }
    }
    true
}

fn route(router: &mut Router, id: u128, first: u32, epoch: Instant) -> (WorkerId, u32) {
    let h = hashes(first);
    let decision = router
        .select(&RouteRequest::new(RequestId(id), &h, 128), now(epoch))
        .unwrap();
    router.finished(RequestId(id), now(epoch));
    (decision.worker, decision.overlap_blocks)
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn events_flow_from_one_agent_to_another_agents_router(pool: PgPool) {
    let epoch = Instant::now();
    // A fixed port, so the "restarted" control plane is reachable where the agents expect it.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let cp = start(&pool, port).await;
    let base = cp.base.clone();
    let client = reqwest::Client::new();
    let join = create_token(&pool, Role::Join).await;
    let operator = create_token(&pool, Role::Operator).await;

    // Two nodes, one GPU and one worker each.
    let mut credentials = Vec::new();
    for host in ["e2e-a", "e2e-b"] {
        let body = json!({"hostname": host, "gpus": [{"id": uuid::Uuid::new_v4(), "index": 0,
            "name": "NVIDIA H100", "memory_total_bytes": 80_i64 << 30}]});
        let registered: Value = client
            .post(format!("{base}/agent/register"))
            .bearer_auth(&join)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let credential = registered["credential"].as_str().unwrap().to_owned();
        client
            .post(format!("{base}/agent/heartbeat"))
            .bearer_auth(&credential)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        credentials.push(credential);
    }
    for (path, body) in [
        (
            "/models",
            json!({"name": "e2e", "format": "mock", "path": "/m"}),
        ),
        (
            "/deployments",
            json!({"name": "e2e", "model": "e2e", "min_workers": 2, "max_workers": 2}),
        ),
    ] {
        let status = client
            .post(format!("{base}{path}"))
            .bearer_auth(&operator)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "{path}: {status}");
    }
    let mut workers = Vec::new();
    for credential in &credentials {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let desired: Value = client
                .get(format!("{base}/agent/desired-state"))
                .bearer_auth(credential)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if let Some(id) = desired["workers"][0]["worker_id"].as_u64() {
                workers.push(WorkerId(id));
                break;
            }
            assert!(Instant::now() < deadline, "placement");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (wa, wb) = (workers[0], workers[1]);
    // Both nodes heartbeat (failures while the control plane is down are ignored).
    let heartbeat = |credential: String| {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            loop {
                let _ = client
                    .post(format!("{base}/agent/heartbeat"))
                    .bearer_auth(&credential)
                    .json(&json!({}))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let heartbeats_a = heartbeat(credentials[0].clone());
    let heartbeats_b = heartbeat(credentials[1].clone());

    // Node A's worker stores two prompts; its uploader sends them.
    let mut uploader = Uploader::new(UploaderConfig::default());
    uploader.set_epoch(wa, 1);
    uploader.push(stored(wa.0, 0, 0), now(epoch));
    uploader.push(stored(wa.0, 1, 10_000), now(epoch));
    let result = flush(&client, &base, &credentials[0], &mut uploader, epoch).await;
    assert_eq!(
        result.head_seq, 3,
        "a reset for the new epoch and two events"
    );

    // Node B's router, in kv mode, follows the stream. (The agent registers the workers it
    // knows of with their capacity; the stream registers the others.)
    let mut router = Router::new(RouterConfig::default());
    router
        .add_worker(
            wb,
            kvfleet_kv_router::WorkerCapacity {
                kv_blocks: 4096,
                max_queue_depth: None,
            },
        )
        .unwrap();
    let mut follower = Follower::new(FollowerConfig {
        fallback_after: Duration::from_millis(500),
        ..FollowerConfig::default()
    });
    while follower.position() != Some(3) {
        assert!(
            follow_once(
                &client,
                &base,
                &credentials[1],
                &mut follower,
                &mut router,
                epoch
            )
            .await
        );
    }
    assert_eq!(route(&mut router, 1, 0, epoch), (wa, 8));
    assert_eq!(route(&mut router, 2, 10_000, epoch), (wa, 8));
    // More events arrive through the long poll.
    uploader.push(stored(wa.0, 2, 20_000), now(epoch));
    let result = flush(&client, &base, &credentials[0], &mut uploader, epoch).await;
    assert_eq!(result.head_seq, 4);
    while follower.position() != Some(4) {
        assert!(
            follow_once(
                &client,
                &base,
                &credentials[1],
                &mut follower,
                &mut router,
                epoch
            )
            .await
        );
    }
    assert_eq!(route(&mut router, 3, 20_000, epoch).0, wa);

    // The control plane goes away: B's router falls back to approximate, keeping its index.
    cp.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !follower.is_fallen_back() {
        assert!(Instant::now() < deadline);
        assert!(
            !follow_once(
                &client,
                &base,
                &credentials[1],
                &mut follower,
                &mut router,
                epoch
            )
            .await
        );
    }
    assert_eq!(router.config().mode, RoutingMode::Approximate);
    assert_eq!(route(&mut router, 4, 0, epoch), (wa, 8), "index kept");
    // Meanwhile A's uploader buffers (and retries) instead of losing events.
    uploader.push(stored(wa.0, 3, 30_000), now(epoch));
    let batch = uploader.poll(now(epoch) + Duration::from_secs(1)).unwrap();
    assert!(
        client
            .post(format!("{base}/agent/kv-events"))
            .bearer_auth(&credentials[0])
            .json(&batch)
            .send()
            .await
            .is_err()
    );
    uploader.on_failed(true, now(epoch));
    assert_eq!(uploader.buffered(), 1);

    // It comes back (same database, same address): A's retry lands, B re-syncs to kv mode.
    let cp = start(&pool, port).await;
    let result = flush(&client, &base, &credentials[0], &mut uploader, epoch).await;
    assert_eq!(
        result.head_seq, 5,
        "rebuilt from Postgres, the sequence continues"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while follower.is_fallen_back() || follower.position() != Some(5) {
        assert!(Instant::now() < deadline, "re-sync");
        follow_once(
            &client,
            &base,
            &credentials[1],
            &mut follower,
            &mut router,
            epoch,
        )
        .await;
    }
    assert_eq!(router.config().mode, RoutingMode::Kv);
    assert_eq!(route(&mut router, 5, 30_000, epoch), (wa, 8));
    assert_eq!(follower.counters().fallbacks, 1);

    // Node A's engine restarts (kill -9, the supervisor starts it again). The agent sees the
    // restart (a new epoch) before it reads the old incarnation's last event (id 4); the new
    // incarnation numbers its events from 0. The late event keeps the old epoch, so it is
    // applied before the reset rather than after it, where it would leave the worker past the
    // new incarnation's ids and get those refused (its new blocks never credited).
    uploader.set_epoch(wa, 2);
    uploader.push(stored(wa.0, 4, 40_000), now(epoch));
    uploader.push(stored(wa.0, 0, 50_000), now(epoch));
    let result = flush(&client, &base, &credentials[0], &mut uploader, epoch).await;
    assert_eq!(
        (result.head_seq, result.out_of_order),
        (8, 0),
        "the late event, the reset, the new incarnation's event"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while follower.position() != Some(8) {
        assert!(Instant::now() < deadline, "the restart reached node B");
        follow_once(
            &client,
            &base,
            &credentials[1],
            &mut follower,
            &mut router,
            epoch,
        )
        .await;
    }
    assert_eq!(
        route(&mut router, 7, 50_000, epoch),
        (wa, 8),
        "the new incarnation's blocks are credited"
    );
    assert_eq!(
        route(&mut router, 8, 40_000, epoch).1,
        0,
        "the old incarnation's blocks are gone"
    );

    // Node A goes silent: its worker leaves B's router within seconds.
    heartbeats_a.abort();
    let silent = Instant::now();
    assert!(router.next_event_id(wa).is_some());
    let deadline = silent + Duration::from_secs(20);
    while router.next_event_id(wa).is_some() {
        assert!(
            Instant::now() < deadline,
            "node A's worker never left the index"
        );
        follow_once(
            &client,
            &base,
            &credentials[1],
            &mut follower,
            &mut router,
            epoch,
        )
        .await;
    }
    let (chosen, overlap) = route(&mut router, 6, 0, epoch);
    assert_eq!(
        (chosen, overlap),
        (wb, 0),
        "requests go to the remaining worker"
    );
    eprintln!(
        "node A's worker left node B's router {:.1} s after its heartbeats stopped (lost_after 5 s)",
        silent.elapsed().as_secs_f64()
    );
    heartbeats_b.abort();
    cp.stop().await;
}
