//! Fleet-wide KV routing end to end: a real Postgres, a control plane and three agents on
//! loopback, each with one mock worker.
//!
//! Every agent follows the control plane's KV stream into its fleet router: a prompt served on
//! one node shows up, as that worker's blocks, in every node's router (and its `/metrics`); an
//! agent that goes away has its worker's blocks leave the other routers within seconds.
//!
//! Needs `DATABASE_URL` (`source scripts/lib/common.sh && ensure_test_postgres`); without it
//! the test prints why and skips.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    unreachable_pub
)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use kvfleet_agent::fleet::Target;
use kvfleet_controlplane::auth::Role;
use kvfleet_peer::{GenerateEvent, PeerConfig, PeerEndpoint, PeerIdentity};
use kvfleet_proto::{NodeId, SamplingParams, Tier, WorkerId};
use reqwest::StatusCode;
use serde_json::json;

/// Short, so a stopped agent's node is lost (and its worker leaves the index) within seconds.
const LOST_AFTER: Duration = Duration::from_secs(2);

/// Tokens take 10 ms, so requests overlap and a cancelled stream is still generating.
const SETUP: AgentSetup = AgentSetup {
    mock_token_time_us: 10_000,
    peer_on_loopback: true,
};

async fn metrics(agent: &Agent) -> String {
    reqwest::get(format!("http://{}/metrics", agent.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Node `agent`'s peer endpoint address and node id, once it is up.
async fn wait_peer(agent: &Agent) -> (SocketAddr, NodeId) {
    let mut found = None;
    wait_for(
        "the peer endpoint and node id",
        Duration::from_secs(20),
        || {
            let addr = agent.running.fleet().and_then(|f| f.peer.local_addr());
            let node = agent
                .running
                .fleet()
                .and_then(|f| f.control_plane.status().node_id);
            if let (Some(addr), Some(node)) = (addr, node) {
                found = Some((addr, NodeId(node)));
            }
            let ok = found.is_some();
            async move { ok }
        },
    )
    .await;
    found.unwrap()
}

fn outstanding(agent: &Agent) -> usize {
    use kvfleet_agent::backend::Backend as _;
    agent
        .running
        .pool
        .workers()
        .iter()
        .map(|w| w.outstanding)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_agent_follows_the_fleet_kv_index_and_a_lost_node_leaves_it() {
    let names = ["kvr-node-a", "kvr-node-b", "kvr-node-c"];
    let Some(nodes) = ThreeNodes::start(names, LOST_AFTER, SETUP, |_, toml| toml).await else {
        return;
    };
    let ThreeNodes {
        db,
        cp,
        admin,
        mut agents,
        dirs,
        ids,
    } = nodes;

    // A long prompt served on node a: its worker's blocks reach every node's router.
    let long = "a prompt long enough to fill a few KV blocks of sixteen tokens each ".repeat(2);
    assert_completion("node a", &complete(agents[0].addr, &long).await);
    wait_for(
        "node a's blocks in every fleet router",
        Duration::from_secs(20),
        || async {
            agents
                .iter()
                .all(|a| fleet(a).worker_blocks(ids[0]).is_some_and(|b| b > 0))
        },
    )
    .await;
    // Every router knows all three workers (local ones from the pool, remote ones from the
    // stream once they have events: serve one prompt on each of the others).
    for (k, agent) in agents.iter().enumerate().skip(1) {
        let prompt = format!("node {k} says: {long}");
        assert_completion(&agent.name, &complete(agent.addr, &prompt).await);
    }
    wait_for(
        "every worker in every fleet router",
        Duration::from_secs(20),
        || async {
            agents.iter().all(|a| {
                ids.iter()
                    .all(|id| fleet(a).worker_blocks(*id).is_some_and(|b| b > 0))
            })
        },
    )
    .await;
    for agent in &agents {
        let text = metrics(agent).await;
        assert!(
            text.contains("kvfleet_fleet_router_workers 3"),
            "{}: {text}",
            agent.name
        );
        assert!(
            text.contains(&format!(
                "kvfleet_fleet_router_worker_blocks{{worker=\"{}\"}}",
                ids[0]
            )),
            "{}: {text}",
            agent.name
        );
        assert!(fleet(agent).follower_counters().snapshots >= 1);
    }

    // Node b forwards a request to node a's peer endpoint with its own node certificate: node
    // a's worker generates it, the tokens come back over QUIC.
    let (a_peer, a_node) = wait_peer(&agents[0]).await;
    let b_identity = PeerIdentity {
        ca_pem: std::fs::read_to_string(dirs[1].join("ca.crt")).unwrap(),
        cert_pem: std::fs::read_to_string(dirs[1].join("node.crt")).unwrap(),
        key_pem: std::fs::read_to_string(dirs[1].join("node.key")).unwrap(),
    };
    // Keyed with the fleet's hash secret, as every node of the fleet hashes them.
    let forwarded_hashes = fleet_sequence_hashes(&(1..60).collect::<Vec<u32>>());
    let client =
        PeerEndpoint::bind(PeerConfig::new("127.0.0.1:0".parse().unwrap(), b_identity)).unwrap();
    let connection = client.connection(a_peer, a_node).await.unwrap();
    let request = kvfleet_peer::GenerateRequest {
        request_id: "fwd-1".into(),
        model: MODEL.into(),
        worker: None,
        prompt: (1..60).collect(),
        block_hashes: forwarded_hashes.clone(),
        sampling: SamplingParams::greedy(8),
        prefill: None,
        kv_push: None,
    };
    let mut stream = connection.generate(&request).await.unwrap();
    let mut tokens = 0;
    let finish = loop {
        match stream.next().await.unwrap() {
            Some(GenerateEvent::Tokens(chunk)) => tokens += chunk.tokens.len(),
            Some(GenerateEvent::Finished(finish)) => break finish,
            None => panic!("the stream ended without a finish"),
        }
    };
    assert_eq!(tokens, 8);
    assert_eq!(finish.usage.completion_tokens, 8);
    assert_eq!(finish.usage.prompt_tokens, 59);
    wait_for(
        "the forwarded prompt's blocks on node a's worker, in node b's router",
        Duration::from_secs(10),
        || async {
            fleet(&agents[1]).with_router(|r| {
                forwarded_hashes
                    .iter()
                    .all(|h| r.holds(ids[0], *h, Tier::G1))
            })
        },
    )
    .await;
    // Node c's router, fed by the directory (peer addresses from heartbeats) and the stream,
    // sends that prefix to node a's worker, over the peer endpoint.
    wait_for(
        "peer addresses in the directory",
        Duration::from_secs(10),
        || async {
            agents.iter().all(|a| {
                let remote = fleet(a).remote_workers();
                remote.len() == 2 && remote.values().all(|w| w.ready && w.peer_addr.is_some())
            })
        },
    )
    .await;
    let (decision, target) = fleet(&agents[2])
        .select(MODEL, &forwarded_hashes, 59)
        .expect("a worker for the model");
    fleet(&agents[2]).finished(decision.request);
    assert_eq!(decision.worker, ids[0]);
    assert_eq!(decision.overlap_blocks, 3);
    assert_eq!(
        target,
        Target::Remote {
            node: a_node,
            addr: a_peer
        }
    );

    // A forwarded request cancelled mid-way frees node a's worker.
    let mut long = request.clone();
    long.request_id = "fwd-2".into();
    // 190 tokens at 10 ms each: about 2 s if it ran to the end.
    long.sampling = SamplingParams::greedy(190);
    let mut stream = connection.generate(&long).await.unwrap();
    let _ = stream.next().await.unwrap();
    assert_eq!(outstanding(&agents[0]), 1, "generating on node a");
    stream.cancel("client went away").await;
    wait_for(
        "node a's worker to drop the cancelled request",
        Duration::from_millis(1000),
        || async { outstanding(&agents[0]) == 0 },
    )
    .await;
    client.close().await;

    // Node a goes away: its worker leaves the other routers within seconds (node lost after
    // 2 s here, the control plane's sweep, the stream).
    let a = agents.remove(0);
    let gone = ids[0];
    a.stop().await;
    let started = std::time::Instant::now();
    wait_for(
        "node a's worker to leave the other routers",
        Duration::from_secs(15),
        || async {
            agents
                .iter()
                .all(|a| fleet(a).worker_blocks(gone).is_none())
        },
    )
    .await;
    println!(
        "node a's worker left the other routers {:.1} s after it stopped",
        started.elapsed().as_secs_f64()
    );
    // The others keep serving.
    for agent in &agents {
        assert_completion(&agent.name, &complete(agent.addr, "still serving").await);
    }

    ThreeNodes {
        db,
        cp,
        admin,
        agents,
        dirs,
        ids,
    }
    .stop()
    .await;
}

/// Waits until every router sees `worker` idle: its published load and the router's own
/// decisions since both at zero. Requests sent back to back otherwise meet a load report
/// taken while the previous one ran (reports lag up to about a second), and the router
/// rightly weighs that running request against the prefix it holds.
async fn wait_idle_everywhere(agents: &[Agent], worker: WorkerId) {
    wait_for(
        "every router to see the worker idle",
        Duration::from_secs(5),
        || async {
            agents.iter().all(|a| {
                fleet(a)
                    .with_router(|r| r.worker_load(worker))
                    .is_none_or(|l| {
                        l.prefill_tokens + l.decode_blocks + u64::from(l.queue_depth) == 0
                    })
            })
        },
    )
    .await;
}

/// `name{label}` counters summed from one `/metrics` text, keyed by the label's value.
fn counters(text: &str, name: &str, label: &str) -> std::collections::BTreeMap<String, u64> {
    let prefix = format!("{name}{{{label}=\"");
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&prefix)
            && let Some((key, value)) = rest.split_once("\"} ")
        {
            *out.entry(key.to_owned()).or_default() += value.trim().parse::<u64>().unwrap();
        }
    }
    out
}

/// The prefix-cache hit tokens of an agent's workers, summed, from its `/metrics`.
async fn prefix_hit_tokens(agent: &Agent) -> u64 {
    let text = metrics(agent).await;
    counters(&text, "kvfleet_worker_prefix_hit_tokens_total", "worker")
        .values()
        .sum()
}

async fn route_counts(agents: &[Agent]) -> (Vec<BTreeMap<String, u64>>, BTreeMap<String, u64>) {
    let mut per_agent = Vec::new();
    let mut per_worker = BTreeMap::new();
    for agent in agents {
        let text = metrics(agent).await;
        per_agent.push(counters(&text, "kvfleet_fleet_route_total", "target"));
        for (worker, n) in counters(&text, "kvfleet_fleet_route_worker_total", "worker") {
            *per_worker.entry(worker).or_default() += n;
        }
    }
    (per_agent, per_worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_go_to_the_prefix_holder_from_any_frontend_and_spread_otherwise() {
    let names = ["kvf-node-a", "kvf-node-b", "kvf-node-c"];
    let Some(nodes) = ThreeNodes::start(names, LOST_AFTER, SETUP, |_, toml| toml).await else {
        return;
    };
    let ThreeNodes {
        db,
        cp,
        admin,
        mut agents,
        dirs,
        ids,
    } = nodes;
    wait_routers_know_everyone(&agents).await;

    // A long prefix, first served wherever node a's router sends it; every router learns
    // which worker holds it.
    let prefix = "You are a careful assistant for the kvfleet project. Answer briefly. ".repeat(2);
    assert_completion("node a", &complete(agents[0].addr, &prefix).await);
    let holds = |a: &Agent| -> Option<usize> {
        ids.iter()
            .position(|id| fleet(a).worker_blocks(*id).is_some_and(|b| b >= 5))
    };
    wait_for(
        "the prefix blocks in every router",
        Duration::from_secs(20),
        || async {
            let seen: Vec<Option<usize>> = agents.iter().map(&holds).collect();
            seen[0].is_some() && seen.iter().all(|s| *s == seen[0])
        },
    )
    .await;
    let h = holds(&agents[0]).unwrap();
    println!("the prefix is held by {}'s worker", agents[h].name);
    let (before, _) = route_counts(&agents).await;
    let mut hits_before = Vec::new();
    for agent in &agents {
        hits_before.push(prefix_hit_tokens(agent).await);
    }
    // The same prefix with different questions, entering every frontend one after the other:
    // with the holder idle, all go to its worker (the other nodes forward them), and all
    // succeed.
    for round in 0..2 {
        for (k, agent) in agents.iter().enumerate() {
            wait_idle_everywhere(&agents, ids[h]).await;
            let prompt = format!("{prefix}Question {round}-{k}?");
            assert_completion(&agent.name, &complete(agent.addr, &prompt).await);
        }
    }
    let (after, _) = route_counts(&agents).await;
    let delta = |k: usize, target: &str| {
        after[k].get(target).copied().unwrap_or(0) - before[k].get(target).copied().unwrap_or(0)
    };
    println!("prefix picks: {after:?} (before {before:?})");
    for (k, agent) in agents.iter().enumerate() {
        if k == h {
            assert_eq!(delta(k, "local"), 2, "the holder's node serves its own");
            assert_eq!(delta(k, "remote"), 0);
        } else {
            assert_eq!(
                delta(k, "remote"),
                2,
                "{} forwards to the holder",
                agent.name
            );
            assert_eq!(delta(k, "local"), 0);
        }
        assert_eq!(delta(k, "fallback_local"), 0);
    }
    // The workers' own prefix-cache counters agree: the holder's worker found the prefix in
    // its cache for all six requests (at least 4 blocks of 16 tokens each); the others were
    // asked nothing.
    wait_for(
        "the holder's worker to report its prefix-cache hits",
        Duration::from_secs(10),
        || async { prefix_hit_tokens(&agents[h]).await >= hits_before[h] + 6 * 4 * 16 },
    )
    .await;
    for (k, agent) in agents.iter().enumerate() {
        if k != h {
            assert_eq!(
                prefix_hit_tokens(agent).await,
                hits_before[k],
                "{}'s worker served none of the prefix requests",
                agent.name
            );
        }
    }

    // A streamed request with the prefix enters a non-holder's frontend and is forwarded; the
    // client goes away after the first chunk: the holder's worker stops generating at once
    // (80 tokens at 10 ms would take 0.8 s).
    let entry = &agents[(h + 1) % 3];
    wait_idle_everywhere(&agents, ids[h]).await;
    let mut response = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", entry.addr))
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": format!("{prefix}Stream?")}],
            "max_tokens": 80,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let first = response.chunk().await.unwrap();
    assert!(first.is_some_and(|c| !c.is_empty()));
    // The first chunk may be the frontend's role chunk, sent before the peer answers.
    wait_for(
        "the forwarded request generating on the holder",
        Duration::from_millis(500),
        || async { outstanding(&agents[h]) == 1 },
    )
    .await;
    assert_eq!(outstanding(entry), 0, "not on the entry node");
    let dropped = std::time::Instant::now();
    drop(response);
    wait_for(
        "the holder's worker to drop the abandoned request",
        Duration::from_millis(600),
        || async { outstanding(&agents[h]) == 0 },
    )
    .await;
    println!(
        "remote generation cancelled {:.0} ms after the client left",
        dropped.elapsed().as_secs_f64() * 1000.0
    );

    // Unrelated prompts (no shared prefix), 10 at once into each frontend: no worker gets
    // more than 1.5x its fair share.
    let (_, workers_before) = route_counts(&agents).await;
    let mut tasks = Vec::new();
    for (k, agent) in agents.iter().enumerate() {
        for i in 0..10 {
            let addr = agent.addr;
            let prompt = format!(
                "{} unrelated request {k}-{i} with enough text to fill a block or two",
                uuid::Uuid::new_v4()
            );
            tasks.push(tokio::spawn(async move { complete(addr, &prompt).await }));
        }
    }
    for task in tasks {
        assert_completion("unrelated", &task.await.unwrap());
    }
    let (_, workers_after) = route_counts(&agents).await;
    let spread: Vec<u64> = ids
        .iter()
        .map(|id| {
            let key = id.to_string();
            workers_after.get(&key).copied().unwrap_or(0)
                - workers_before.get(&key).copied().unwrap_or(0)
        })
        .collect();
    println!("unrelated requests per worker: {spread:?}");
    assert_eq!(
        spread.iter().sum::<u64>(),
        30,
        "every request was routed by the fleet router"
    );
    assert!(
        spread.iter().all(|&n| n <= 15),
        "no worker over 1.5x its fair share of 10: {spread:?}"
    );

    // The holder's node goes away: requests with its prefix keep succeeding from the others
    // (a local retry while their routers still name it, then the directory and the stream
    // drop it). Every router sees it idle first: a load report from the burst above could
    // otherwise still keep them away from it, and there would be nothing to retry.
    wait_idle_everywhere(&agents, ids[h]).await;
    let a = agents.remove(h);
    let gone = ids[h];
    a.stop().await;
    for round in 0..3 {
        for agent in &agents {
            let prompt = format!("{prefix}After the loss {round}?");
            assert_completion(&agent.name, &complete(agent.addr, &prompt).await);
        }
    }
    // The first of those picked the lost holder (its routers had not heard yet) and was
    // retried locally.
    let (counts, _) = route_counts(&agents).await;
    let fallbacks: u64 = counts
        .iter()
        .map(|c| c.get("fallback_local").copied().unwrap_or(0))
        .sum();
    println!("after the loss: {counts:?}");
    assert!(
        fallbacks >= 1,
        "a failed forward was retried locally: {counts:?}"
    );
    wait_for(
        "the holder's worker to leave the other routers",
        Duration::from_secs(15),
        || async {
            agents
                .iter()
                .all(|a| fleet(a).worker_blocks(gone).is_none())
        },
    )
    .await;

    ThreeNodes {
        db,
        cp,
        admin,
        agents,
        dirs,
        ids,
    }
    .stop()
    .await;
}

/// A completion of `prompt` (token ids, so the test knows exactly what is hashed) from
/// `agent`'s frontend, asserted served.
async fn complete_tokens(agent: &Agent, prompt: &[u32]) {
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", agent.addr))
        .json(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 4}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "{}: {body}", agent.name);
    assert_eq!(
        body["usage"]["completion_tokens"], 4,
        "{}: {body}",
        agent.name
    );
}

/// Every integer in `value`, recursively (block hashes are JSON numbers in `kv_log`).
fn numbers(value: &serde_json::Value, out: &mut std::collections::BTreeSet<u64>) {
    match value {
        serde_json::Value::Number(n) => out.extend(n.as_u64()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| numbers(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| numbers(v, out)),
        _ => {}
    }
}

/// The fleet hash key: every block hash in the control plane's `kv_log` (and so in every
/// router) is keyed with the secret the control plane derives from its sealing key and hands
/// the agents, so a reader of the database cannot tell which prompts share a prefix by hashing
/// candidate prompts; and routing, keyed on every node alike, still sends a repeated prompt
/// to the worker holding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_kv_index_holds_fleet_keyed_hashes_and_prefixes_still_route_home() {
    use kvfleet_proto::hash::{BlockHasher, BlockSize};
    use sqlx::Connection as _;
    let names = ["kvf-key-a", "kvf-key-b", "kvf-key-c"];
    let Some(nodes) = ThreeNodes::start(names, LOST_AFTER, SETUP, |_, toml| toml).await else {
        return;
    };
    wait_routers_know_everyone(&nodes.agents).await;
    let agents = &nodes.agents;
    // Four full blocks of 16 tokens.
    let prompt: Vec<u32> = (0..64).map(|i| 3 + (i * 37) % 200).collect();
    let keyed = fleet_hasher().block_hashes(&prompt, BlockSize::new(16).unwrap());
    let unkeyed = BlockHasher::UNKEYED.block_hashes(&prompt, BlockSize::new(16).unwrap());
    assert_eq!(keyed.len(), 4);
    complete_tokens(&agents[0], &prompt).await;

    // Which worker holds it, as every router learns from the control plane's stream: under
    // the keyed hashes, never under the plain ones.
    let holder = |a: &Agent| {
        fleet(a).with_router(|r| {
            nodes
                .ids
                .iter()
                .position(|w| keyed.iter().all(|b| r.holds(*w, b.sequence, Tier::G1)))
        })
    };
    wait_for(
        "the prompt's keyed blocks in every router",
        Duration::from_secs(20),
        || async { agents.iter().all(|a| holder(a).is_some()) },
    )
    .await;
    let h = holder(&agents[0]).unwrap();
    for a in agents {
        assert_eq!(holder(a), Some(h), "{}", a.name);
        fleet(a).with_router(|r| {
            for w in &nodes.ids {
                assert!(
                    unkeyed.iter().all(|b| !r.holds(*w, b.sequence, Tier::G1)),
                    "{}: an unkeyed hash in the router",
                    a.name
                );
            }
        });
    }
    // In `kv_log`: every keyed hash of the prompt (local and sequence), none of the plain ones.
    let mut conn = sqlx::PgConnection::connect(&nodes.db.url).await.unwrap();
    let items: Vec<serde_json::Value> = sqlx::query_scalar("SELECT item FROM kv_log")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let mut logged = std::collections::BTreeSet::new();
    items.iter().for_each(|item| numbers(item, &mut logged));
    for (k, u) in keyed.iter().zip(&unkeyed) {
        assert!(logged.contains(&k.sequence.0) && logged.contains(&k.local.0));
        assert!(!logged.contains(&u.sequence.0) && !logged.contains(&u.local.0));
    }

    // The same prompt again, entering the two other frontends: both go to the holder's worker,
    // which finds the prompt's blocks in its cache (at least three: the last token is always
    // computed).
    let hits_before = prefix_hit_tokens(&agents[h]).await;
    let (_, before) = route_counts(agents).await;
    for k in (0..3).filter(|k| *k != h) {
        wait_idle_everywhere(agents, nodes.ids[h]).await;
        complete_tokens(&agents[k], &prompt).await;
    }
    let (_, after) = route_counts(agents).await;
    let key = nodes.ids[h].to_string();
    let routed = after.get(&key).copied().unwrap_or(0) - before.get(&key).copied().unwrap_or(0);
    assert_eq!(routed, 2, "both repeats routed to the holder: {after:?}");
    wait_for(
        "the holder's worker to report its prefix-cache hits",
        Duration::from_secs(10),
        || async { prefix_hit_tokens(&agents[h]).await >= hits_before + 2 * 48 },
    )
    .await;
    nodes.stop().await;
}

/// A chat completion of `max_tokens` from `agent_addr`'s frontend, allowed `timeout`.
async fn chat(
    agent_addr: SocketAddr,
    content: &str,
    max_tokens: u32,
    timeout: Duration,
) -> (StatusCode, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{agent_addr}/v1/chat/completions"))
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        }))
        .timeout(timeout)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or_default())
}

/// `name{worker="W",kind="K"} value` gauges from one `/metrics` text.
fn worker_gauge(text: &str, name: &str, worker: WorkerId, kind: &str) -> Option<u64> {
    let prefix = format!("{name}{{worker=\"{worker}\",kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workers_published_load_steers_other_frontends_away_from_it() {
    // Tokens take 40 ms: the busy requests below run for about 5 s.
    let setup = AgentSetup {
        mock_token_time_us: 40_000,
        peer_on_loopback: true,
    };
    let names = ["kvl-node-a", "kvl-node-b", "kvl-node-c"];
    let started = ThreeNodes::start(names, LOST_AFTER, setup, |k, toml| {
        if k == 0 {
            // Node a's frontend serves on its own worker only: its clients keep that worker
            // busy where the other nodes' routers cannot see it except through its load.
            toml.replace("[peer]\n", "[peer]\nforward = false\n")
        } else {
            toml
        }
    })
    .await;
    let Some(nodes) = started else {
        return;
    };
    let ThreeNodes {
        db,
        cp,
        admin,
        agents,
        dirs,
        ids,
    } = nodes;
    let busy_worker = ids[0];
    wait_routers_know_everyone(&agents).await;

    // Six long, slow requests from node a's clients keep its worker busy.
    const BUSY: usize = 6;
    const BUSY_TOKENS: u32 = 120;
    let mut busy = Vec::new();
    for i in 0..BUSY {
        let addr = agents[0].addr;
        busy.push(tokio::spawn(async move {
            let prompt = format!(
                "busy request {i}: {}",
                "tell a story about the fleet. ".repeat(3)
            );
            chat(addr, &prompt, BUSY_TOKENS, Duration::from_secs(30)).await
        }));
    }
    wait_for(
        "node a's worker to run the busy requests",
        Duration::from_secs(5),
        || async { outstanding(&agents[0]) == BUSY || busy.iter().any(|t| t.is_finished()) },
    )
    .await;
    if let Some(done) = busy.iter_mut().find(|t| t.is_finished()) {
        panic!("a busy request ended early: {:?}", done.await.unwrap());
    }
    // Nodes b and c routed none of them, yet their routers learn the worker's load from the
    // KV stream within about a second (500 ms reports, pages at most every 250 ms).
    let published = std::time::Instant::now();
    for agent in &agents[1..] {
        wait_for(
            "the busy worker's published load in the other routers",
            Duration::from_secs(5),
            || async {
                fleet(agent)
                    .with_router(|r| r.worker_load(busy_worker))
                    .is_some_and(|load| load.decode_blocks >= 2 * BUSY as u64)
            },
        )
        .await;
    }
    println!(
        "the busy worker's load reached nodes b and c {:.0} ms after the busy requests ran",
        published.elapsed().as_secs_f64() * 1000.0
    );
    let text = metrics(&agents[1]).await;
    let gauge = worker_gauge(
        &text,
        "kvfleet_fleet_router_worker_load",
        busy_worker,
        "decode_blocks",
    );
    assert!(
        gauge.is_some_and(|blocks| blocks >= 2 * BUSY as u64),
        "node b's /metrics shows the busy worker's load: {gauge:?}"
    );
    let applied = counters(&text, "kvfleet_fleet_router_load_reports_total", "what");
    assert!(
        applied.get("applied").is_some_and(|n| *n > 0),
        "{applied:?}"
    );

    println!(
        "the busy worker's load in node b's router: {:?}",
        fleet(&agents[1]).with_router(|r| r.worker_load(busy_worker))
    );
    // Unrelated requests, 8 at once into each of nodes b and c: they avoid the busy worker.
    let (_, before) = route_counts(&agents).await;
    let mut tasks = Vec::new();
    for (k, agent) in agents.iter().enumerate().skip(1) {
        for i in 0..8 {
            let addr = agent.addr;
            let prompt = format!(
                "{} unrelated request {k}-{i} with enough text to fill a block or two",
                uuid::Uuid::new_v4()
            );
            tasks.push(tokio::spawn(async move { complete(addr, &prompt).await }));
        }
    }
    for task in tasks {
        assert_completion("unrelated", &task.await.unwrap());
    }
    let (_, after) = route_counts(&agents).await;
    let spread: Vec<u64> = ids
        .iter()
        .map(|id| {
            let key = id.to_string();
            after.get(&key).copied().unwrap_or(0) - before.get(&key).copied().unwrap_or(0)
        })
        .collect();
    println!("unrelated requests per worker (node a's first): {spread:?}");
    assert_eq!(
        spread.iter().sum::<u64>(),
        16,
        "all routed by b's and c's routers"
    );
    // Its fair share would be 16 / 3, about 5; blind to its load, b and c would each send
    // it about a third of theirs.
    assert!(
        spread[0] <= 1,
        "the busy worker got {} of 16 unrelated requests: {spread:?}",
        spread[0]
    );
    assert!(
        outstanding(&agents[0]) >= BUSY,
        "the busy requests were still running while the others were routed"
    );
    for task in busy {
        let answer = task.await.unwrap();
        println!("busy request usage: {}", answer.1["usage"]);
        assert_completion_of("busy", &answer, u64::from(BUSY_TOKENS));
    }
    let stats = api(reqwest::Method::GET, &cp.url("/kv/stats"), &admin, None).await;
    assert!(
        stats.1["counters"]["loads_received"].as_u64().unwrap_or(0) > 0,
        "{}",
        stats.1
    );
    assert_eq!(stats.1["counters"]["loads_rejected"], 0, "{}", stats.1);

    ThreeNodes {
        db,
        cp,
        admin,
        agents,
        dirs,
        ids,
    }
    .stop()
    .await;
}

fn assert_completion_of(who: &str, (status, body): &(StatusCode, serde_json::Value), n: u64) {
    assert_eq!(*status, StatusCode::OK, "{who}: {body}");
    assert_eq!(body["usage"]["completion_tokens"], n, "{who}: {body}");
}

/// Runs `tokens` on `agent`'s worker `worker` (straight into its pool, so no router chooses
/// another node) to its end.
async fn run_on(agent: &Agent, worker: WorkerId, tokens: &[u32]) {
    use kvfleet_agent::backend::{Backend as _, GenEvent, GenerateRequest};
    let request = GenerateRequest {
        request_id: format!("chatcmpl-restart-{}", tokens[0]),
        model: MODEL.into(),
        prompt: tokens.to_vec(),
        block_hashes: fleet_sequence_hashes(tokens),
        sampling: SamplingParams::greedy(4),
        worker: Some(worker),
    };
    let mut generation = agent.running.pool.submit(request).unwrap();
    assert_eq!(generation.worker, worker, "the named worker runs it");
    loop {
        match generation.next().await {
            Some(GenEvent::Tokens(_)) => {}
            Some(GenEvent::Finished(_)) => return,
            other => panic!("the request on {worker} did not finish: {other:?}"),
        }
    }
}

/// Blocks per tier (G1..G4) of `worker` in the control plane's KV index
/// (`GET /api/v1/kv/workers`); `None` when the index does not list it.
async fn cp_blocks(nodes: &ThreeNodes, worker: WorkerId) -> Option<[u64; 4]> {
    let (status, body) = api(
        reqwest::Method::GET,
        &nodes.cp.url("/kv/workers"),
        &nodes.admin,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body.as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker"].as_u64() == Some(worker.0))
        .map(|w| ["g1", "g2", "g3", "g4"].map(|t| w[t].as_u64().unwrap()))
}

/// The control plane's count of engine restarts (new epochs) applied to its KV index.
async fn cp_resets(nodes: &ThreeNodes) -> u64 {
    let (status, body) = api(
        reqwest::Method::GET,
        &nodes.cp.url("/kv/stats"),
        &nodes.admin,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["counters"]["resets"].as_u64().unwrap()
}

/// A worker process killed with `kill -9` is restarted by its agent's supervisor under the same
/// worker id and a new engine epoch: every router and the control plane's index drop the blocks
/// of its old incarnation and credit what the new one announces, the blocks it finds in its
/// disk tier (G3) and the ones it computes. It once vanished instead: the control plane, told
/// by a heartbeat that the worker was `failed` during its restart backoff, stopped and replaced
/// it (about 6 runs in 10 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_restarted_after_kill_9_is_credited_again_by_every_router() {
    use kvfleet_agent::backend::Backend as _;
    let names = ["kvr-restart-a", "kvr-restart-b", "kvr-restart-c"];
    let disk = temp_dir("kvr-restart-g3");
    // Node a: a 32-block pool over 16 blocks of host memory and a disk tier, so sixteen
    // prompts push blocks down to disk.
    let Some(nodes) = ThreeNodes::start(names, LOST_AFTER, SETUP, |k, toml| {
        if k != 0 {
            return toml;
        }
        toml.replace(
            "[[models]]\n",
            &format!(
                "[kv_tiers]\nhost_memory = \"1KiB\"\ndisk = \"64KiB\"\ndisk_dir = {disk:?}\n\
                 [[models]]\n"
            ),
        )
        .replace("kv_blocks = 256", "kv_blocks = 32")
    })
    .await
    else {
        return;
    };
    wait_routers_know_everyone(&nodes.agents).await;
    let (a, worker) = (&nodes.agents[0], nodes.ids[0]);
    let prompt = |first: u32| (first..first + 64).collect::<Vec<u32>>();
    let held = |agent: &Agent, tokens: &[u32]| {
        let hashes = fleet_sequence_hashes(tokens);
        fleet(agent).with_router(|r| hashes.iter().all(|h| r.holds(worker, *h, Tier::G1)))
    };
    let g3 = |agent: &Agent| fleet(agent).with_router(|r| r.worker_blocks(worker).unwrap()[2]);
    let others = || nodes.agents.iter().skip(1);

    for k in 0..16 {
        run_on(a, worker, &prompt(1000 + 100 * k)).await;
    }
    // The last prompt is still in G1; earlier ones went down to disk.
    let before = prompt(1000 + 100 * 15);
    wait_for(
        "the first incarnation's G1 and G3 blocks in every other router and the control plane",
        Duration::from_secs(20),
        || async {
            others().all(|b| held(b, &before) && g3(b) > 0)
                && cp_blocks(&nodes, worker)
                    .await
                    .is_some_and(|t| t[0] >= 4 && t[2] > 0)
        },
    )
    .await;
    let resets = cp_resets(&nodes).await;

    let pid = a.running.pool.workers()[0].pid.unwrap();
    let kill = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success(), "kill -9 {pid}");
    wait_for(
        "the killed worker restarted and ready",
        Duration::from_secs(20),
        || async {
            a.running
                .pool
                .workers()
                .iter()
                .any(|w| w.pid.is_some_and(|p| p != pid))
                && a.ready_workers() == 1
        },
    )
    .await;
    // A few heartbeats and placement rounds: the restarted worker stays the node's worker.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        worker_ids(a),
        vec![worker],
        "the supervisor restarted worker {worker}; it was not replaced"
    );
    wait_for(
        "the new epoch in the control plane's index",
        Duration::from_secs(10),
        || async { cp_resets(&nodes).await > resets },
    )
    .await;

    let after = prompt(5000);
    run_on(a, worker, &after).await;
    let started = std::time::Instant::now();
    wait_for(
        "the restarted worker's disk blocks and new blocks in every other router and the \
         control plane",
        Duration::from_secs(20),
        || async {
            // Not `before` in G1: the reset of the old incarnation was applied.
            others().all(|b| held(b, &after) && !held(b, &before) && g3(b) > 0)
                && cp_blocks(&nodes, worker)
                    .await
                    .is_some_and(|t| t[0] >= 4 && t[2] > 0)
        },
    )
    .await;
    println!(
        "worker {worker} restarted after kill -9: its disk blocks ({} in G3) and new blocks \
         reached every router {:.2} s after its first request ended",
        g3(&nodes.agents[1]),
        started.elapsed().as_secs_f64()
    );
    nodes.stop().await;
    let _ = std::fs::remove_dir_all(disk);
}

// ----- external engines: llama.cpp's llama-server as kvfleet workers ------------------------

/// `llamacpp:NAME` from a llama-server's `/metrics`.
async fn llama_metric(endpoint: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{endpoint}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("llamacpp:{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no llamacpp:{name} in {endpoint}/metrics:\n{text}"))
}

/// The ready workers' ids and server URLs.
fn llama_endpoints(agent: &Agent) -> Vec<(WorkerId, String)> {
    use kvfleet_agent::backend::{Backend as _, WorkerState};
    agent
        .running
        .pool
        .workers()
        .into_iter()
        .filter(|w| w.state == WorkerState::Ready)
        .filter_map(|w| Some((w.id, w.endpoint?)))
        .collect()
}

/// The pid of the process whose command line holds `--port PORT` and `llama-server`.
fn llama_pid(port: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_server = args.first().is_some_and(|a| a.ends_with(b"llama-server"));
            let on_port = args
                .windows(2)
                .any(|w| w[0] == b"--port" && w[1] == port.as_bytes());
            (is_server && on_port).then_some(pid)
        })
}

/// Acceptance of the `llamacpp` engine (issue 24): a one-node dev fleet whose deployment runs
/// two `llamacpp` workers, each a real `llama-server` serving SmolLM2. The official SDK streams
/// through the frontend; repeated-prefix requests go back to the worker whose server cached the
/// prefix (its own `llamacpp:prompt_tokens_cached_total` grows, the other's does not); a
/// `kill -9` of one server is noticed, no request goes to that worker while it is down, and it
/// comes back. Skipped without `KVFLEET_LLAMA_SERVER` (`ensure_llama_server`), the model or
/// `DATABASE_URL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_llamacpp_workers_serve_route_prefixes_home_and_survive_a_killed_server() {
    let (Some(server), Some(gguf)) = (
        std::env::var_os("KVFLEET_LLAMA_SERVER"),
        std::env::var_os("KVFLEET_SMOLLM2_GGUF"),
    ) else {
        println!(
            "SKIPPED: KVFLEET_LLAMA_SERVER or KVFLEET_SMOLLM2_GGUF is not set (source \
             scripts/lib/common.sh && ensure_llama_server && ensure_default_model)"
        );
        return;
    };
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start(
        &db,
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_secs(120),
    )
    .await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let state = temp_dir("state-llama");
    let setup = AgentSetup {
        mock_token_time_us: 0,
        peer_on_loopback: true,
    };
    let toml = Agent::config("llama-node", &cp, &join, &state, setup);
    // The local model entry: what the control plane's `gguf` model runs on this node.
    let start = toml.find("[[models]]").unwrap();
    let end = toml.find("[control_plane]").unwrap();
    let local = format!(
        "[[models]]\nname = \"{MODEL}\"\nengine = \"llamacpp\"\npath = {gguf:?}\n\
         command = {server:?}\nslots = 2\ncontext_length = 1024\nblock_size = 16\n\
         args = [\"--threads\", \"1\"]\n"
    );
    let toml = format!("{}{local}{}", &toml[..start], &toml[end..])
        .replace("cpu_slots = 1", "cpu_slots = 2")
        // A killed server's worker stays down a while: requests meanwhile go elsewhere.
        .replace(
            "restart_backoff_initial_ms = 100",
            "restart_backoff_initial_ms = 2000",
        )
        .replace("[supervisor]\n", "[supervisor]\nstart_timeout_secs = 120\n");
    let agent = Agent::launch("llama-node", toml).await;
    wait_nodes_healthy(&cp, &admin, &["llama-node"]).await;
    register_and_deploy(
        &cp,
        &admin,
        json!({"name": MODEL, "format": "gguf", "path": gguf.to_str().unwrap(),
               "block_size": 16, "context_length": 1024}),
        json!({"name": "llama", "model": MODEL, "min_workers": 2, "max_workers": 2,
               "placement": {"allow_cpu": true}}),
    )
    .await;
    wait_for(
        "two ready llamacpp workers",
        Duration::from_secs(120),
        || async { llama_endpoints(&agent).len() == 2 },
    )
    .await;

    // The control plane (so `kvfleet workers` and the web UI) shows each one's engine and
    // version, from llama-server's own /props.
    wait_for(
        "the workers' engine and version at the control plane",
        Duration::from_secs(30),
        || async {
            let (_, body) = api(reqwest::Method::GET, &cp.url("/workers"), &admin, None).await;
            body["items"].as_array().is_some_and(|workers| {
                workers
                    .iter()
                    .filter(|w| {
                        w["observed_state"] == "ready"
                            && w["observed_engine"]
                                .as_str()
                                .is_some_and(|e| e.starts_with("llamacpp b"))
                    })
                    .count()
                    == 2
            })
        },
    )
    .await;

    // The official SDK, streaming included, through kvfleet's frontend.
    let probe = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    if probe.is_ok_and(|o| o.status.success()) {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../agent/tests/sdk/openai_sdk_native.py"
        );
        let output = tokio::process::Command::new("python3")
            .args([script, &format!("http://{}", agent.addr), MODEL])
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "openai SDK through llamacpp workers:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    } else {
        println!("SKIPPED (SDK part): python3 with the `openai` package is not installed");
    }

    // Structured output passed through to llama-server (its `json_schema` and a GBNF grammar
    // for a choice): the small model's answers parse and validate. A regex it cannot take is
    // refused before any worker is asked, naming the engine.
    let structured = |extra: serde_json::Value| async move {
        let mut body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Describe a city in JSON."}],
            "max_tokens": 64,
            "temperature": 0,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let response = reqwest::Client::new()
            .post(format!("http://{}/v1/chat/completions", agent.addr))
            .json(&body)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .unwrap();
        let status = response.status();
        (
            status,
            response
                .json::<serde_json::Value>()
                .await
                .unwrap_or_default(),
        )
    };
    let schema = json!({"type": "object", "additionalProperties": false,
        "required": ["name", "population"],
        "properties": {"name": {"type": "string", "maxLength": 20},
                       "population": {"type": "integer", "minimum": 0}}});
    let (status, body) = structured(json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "city", "strict": true, "schema": schema}}}))
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let city: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| {
        panic!("llama-server's constrained answer is not JSON ({e}): {text:?}")
    });
    assert!(
        city["name"].is_string() && city["population"].is_u64(),
        "{city}"
    );
    assert_eq!(city.as_object().unwrap().len(), 2, "{city}");
    let (status, body) =
        structured(json!({"guided_choice": ["red \"rose\"", "green", "blue"]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(
        ["red \"rose\"", "green", "blue"].contains(&text),
        "{text:?}"
    );
    let (status, body) = structured(json!({"guided_regex": "[0-9]{3}"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("llamacpp"),
        "{body}"
    );

    // Repeated prefixes: the first request's blocks reach the router (approximate KV events),
    // then every request sharing its prefix goes to the same worker, whose server reuses it.
    let endpoints = llama_endpoints(&agent);
    let prefix = "You are the fleet's archivist. Remember these facts about the fleet: it has \
                  many nodes, each node has workers, each worker has a cache of prompt blocks, \
                  and the router sends a prompt to the worker that already holds its blocks. "
        .repeat(2);
    let mut before = Vec::new();
    for (_, endpoint) in &endpoints {
        before.push(llama_metric(endpoint, "prompt_tokens_cached_total").await);
    }
    // The SDK's prompts are in the router already: wait for this prompt's own blocks.
    let blocks = |agent: &Agent| -> Vec<u64> {
        endpoints
            .iter()
            .map(|(id, _)| fleet(agent).worker_blocks(*id).unwrap_or(0))
            .collect()
    };
    let blocks_before = blocks(&agent);
    let first = chat(
        agent.addr,
        &format!("{prefix} Question 0?"),
        4,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(first.0, StatusCode::OK, "{}", first.1);
    wait_for(
        "the first prompt's blocks in the fleet router",
        Duration::from_secs(20),
        || async {
            blocks(&agent)
                .iter()
                .zip(&blocks_before)
                .any(|(now, before)| now > before)
        },
    )
    .await;
    const REPEATS: usize = 4;
    for i in 1..=REPEATS {
        // Idle workers when each repeat is routed (loads are published every 500 ms): the
        // prefix alone decides.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let answer = chat(
            agent.addr,
            &format!("{prefix} Question {i}?"),
            4,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
    }
    let mut gained = Vec::new();
    for ((_, endpoint), before) in endpoints.iter().zip(&before) {
        gained.push(llama_metric(endpoint, "prompt_tokens_cached_total").await - before);
    }
    println!("prompt tokens cached per server over {REPEATS} repeats: {gained:?}");
    let (home, other) = if gained[0] >= gained[1] {
        (0, 1)
    } else {
        (1, 0)
    };
    // Each repeat reuses the shared prefix (well over 60 tokens) on the same server.
    assert!(
        gained[home] >= (REPEATS * 60) as f64 && gained[other] == 0.0,
        "repeated prefixes did not go home: cached tokens gained per server {gained:?}"
    );

    // kill -9 one server: noticed, nothing routed to its worker while it is down, restarted.
    let (victim, victim_url) = endpoints[home].clone();
    let port = victim_url.rsplit(':').next().unwrap().to_owned();
    let pid = llama_pid(&port).expect("the llama-server process of the victim worker");
    let requests_of = |id: WorkerId| {
        agent
            .running
            .pool
            .counters()
            .into_iter()
            .find(|c| c.id == id)
            .map(|c| c.requests)
    };
    let kill_time = std::time::Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_for(
        "the killed server's worker out of service",
        Duration::from_secs(10),
        || async { !llama_endpoints(&agent).iter().any(|(id, _)| *id == victim) },
    )
    .await;
    let noticed = kill_time.elapsed();
    // From here until its worker is ready again (the pool restarts it), nothing may be sent to
    // it; the control plane may instead stop it (it saw it failed) and start another worker.
    let back = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        use kvfleet_agent::backend::{Backend as _, WorkerState};
        let (pool, back) = (agent.running.pool.clone(), back.clone());
        tokio::spawn(async move {
            loop {
                let state = pool
                    .workers()
                    .into_iter()
                    .find(|w| w.id == victim)
                    .map(|w| w.state);
                if state == Some(WorkerState::Ready) {
                    back.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let sent_before = requests_of(victim);
    let mut while_down = 0;
    for i in 0..3 {
        let answer = chat(
            agent.addr,
            &format!("{prefix} While down {i}?"),
            4,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
        if back.load(std::sync::atomic::Ordering::SeqCst) {
            break; // Back (or replaced): later requests may go to it.
        }
        let sent = requests_of(victim);
        assert!(
            sent.is_none() || sent == sent_before,
            "a request went to the downed worker ({sent:?}, {sent_before:?} before)"
        );
        while_down += 1;
    }
    poller.abort();
    assert!(
        while_down >= 1,
        "the killed server's worker was back at once"
    );
    wait_for(
        "two ready llamacpp workers again",
        Duration::from_secs(120),
        || async { llama_endpoints(&agent).len() == 2 },
    )
    .await;
    let recovered = kill_time.elapsed();
    let restarted = {
        use kvfleet_agent::backend::Backend as _;
        let status = agent.running.pool.workers();
        assert!(status.iter().all(|w| w.engine == "llamacpp"), "{status:?}");
        status
            .iter()
            .find(|w| w.id == victim)
            .is_some_and(|w| w.starts >= 2)
    };
    assert!(
        llama_endpoints(&agent)
            .iter()
            .all(|(_, url)| *url != victim_url),
        "the killed server's URL is still served"
    );
    println!(
        "killed llama-server: out of routing after {noticed:?}, two ready workers again after \
         {recovered:?}, {while_down} requests served meanwhile; its worker {}",
        if restarted {
            "restarted by the pool"
        } else {
            "replaced by the control plane"
        }
    );
    let answer = chat(
        agent.addr,
        &format!("{prefix} After?"),
        4,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);

    agent.stop().await;
    cp.stop().await;
    db.drop_now().await;
    let _ = std::fs::remove_dir_all(state);
}

/// One streamed chat completion: (time to the first token, the gaps between later tokens,
/// tokens received).
async fn stream_chat(
    agent_addr: SocketAddr,
    content: &str,
    max_tokens: u32,
) -> (Duration, Vec<Duration>, usize) {
    let start = std::time::Instant::now();
    let mut response = reqwest::Client::new()
        .post(format!("http://{agent_addr}/v1/chat/completions"))
        .json(
            &json!({"model": MODEL, "stream": true, "max_tokens": max_tokens,
            "temperature": 0, "messages": [{"role": "user", "content": content}]}),
        )
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (mut first, mut last, mut gaps, mut tokens) = (None, start, Vec::new(), 0);
    let mut buf = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else {
                continue;
            };
            let Ok(event) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            if event["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                let now = std::time::Instant::now();
                match first {
                    None => first = Some(now - start),
                    Some(_) => gaps.push(now - last),
                }
                last = now;
                tokens += 1;
            }
        }
    }
    (first.unwrap_or_default(), gaps, tokens)
}

fn percentile_ms(values: &mut [Duration], p: f64) -> f64 {
    values.sort_unstable();
    values
        .get(((values.len().saturating_sub(1)) as f64 * p).round() as usize)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Issue #24 on a real GPU (not run by CI: `scripts/gpu-e2e.sh` runs it where vLLM and a GPU
/// are). A fleet whose deployment runs one `vllm` worker on a GPU from NVML's inventory, with
/// vLLM's KV event stream on: requests are served, the prompt's blocks reach the fleet router
/// from vLLM's own events (exact credit, counted in `kvfleet_engine_events_*`), a JSON schema
/// and a regex constrain the output through vLLM's `structured_outputs`, and 16 concurrent
/// streams give the TTFT / ITL / throughput figures docs/engines.md records. Skipped (with the
/// reason) without `KVFLEET_VLLM_MODEL` (a Hugging Face model directory), without NVML, or
/// without `DATABASE_URL`. Ignored by default, so CI lists it as skipped rather than passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs an NVIDIA GPU and vLLM: scripts/gpu-e2e.sh runs it"]
async fn a_vllm_worker_on_a_gpu_serves_routes_from_its_events_and_constrains() {
    let Some(model_dir) = std::env::var_os("KVFLEET_VLLM_MODEL") else {
        println!(
            "SKIPPED: KVFLEET_VLLM_MODEL is not set (a machine with a GPU and vLLM: \
             scripts/gpu-e2e.sh)"
        );
        return;
    };
    let inventory = match kvfleet_agent::gpu::NvmlInventory::init() {
        Ok(inventory) => inventory,
        Err(e) => {
            println!("SKIPPED: no NVIDIA driver: {e}");
            return;
        }
    };
    let command = std::env::var("KVFLEET_VLLM_COMMAND").unwrap_or_else(|_| "vllm".into());
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start(
        &db,
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_secs(120),
    )
    .await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let state = temp_dir("state-vllm");
    let toml = Agent::config("gpu-node", &cp, &join, &state, SETUP);
    let start = toml.find("[[models]]").unwrap();
    let end = toml.find("[control_plane]").unwrap();
    // The deployment config docs/engines.md gives, verbatim but for the paths.
    let events = r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:{kv_port}", "replay_endpoint": "tcp://*:{kv_replay_port}", "topic": "kv"}"#;
    let local = format!(
        "[[models]]\nname = \"{MODEL}\"\nengine = \"vllm\"\npath = {model_dir:?}\n\
         command = {command:?}\n\
         args = [\"serve\", \"{{model}}\", \"--host\", \"127.0.0.1\", \"--port\", \"{{port}}\", \
         \"--block-size\", \"16\", \"--max-model-len\", \"4096\", \"--kv-events-config\", {events:?}]\n\
         kv_events = \"tcp://127.0.0.1:{{kv_port}}\"\n\
         kv_events_replay = \"tcp://127.0.0.1:{{kv_replay_port}}\"\n\
         slots = 64\ncontext_length = 4096\nblock_size = 16\n"
    );
    let toml = format!("{}{local}{}", &toml[..start], &toml[end..])
        // vLLM loads weights and captures CUDA graphs before /health answers.
        .replace(
            "[supervisor]\n",
            "[supervisor]\nstart_timeout_secs = 1200\n",
        );
    let agent = Agent::launch_with_gpus("gpu-node", toml, std::sync::Arc::new(inventory)).await;
    wait_nodes_healthy(&cp, &admin, &["gpu-node"]).await;
    register_and_deploy(
        &cp,
        &admin,
        json!({"name": MODEL, "format": "safetensors", "path": model_dir.to_str().unwrap(),
               "block_size": 16, "context_length": 4096}),
        json!({"name": "vllm", "model": MODEL, "min_workers": 1, "max_workers": 1,
               "placement": {"allow_cpu": false}}),
    )
    .await;
    let started = std::time::Instant::now();
    wait_for("a ready vllm worker", Duration::from_secs(1200), || async {
        !llama_endpoints(&agent).is_empty()
    })
    .await;
    println!(
        "vllm worker ready after {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let (worker, _) = llama_endpoints(&agent)[0].clone();

    // Served, and the prompt's blocks credited from vLLM's own events.
    let before = fleet(&agent).worker_blocks(worker).unwrap_or(0);
    let prompt =
        "The fleet's archivist keeps a record of every node, worker and cached block. ".repeat(24);
    let (status, body) = chat(agent.addr, &prompt, 16, Duration::from_secs(300)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for(
        "the prompt's blocks from vLLM's KV events",
        Duration::from_secs(30),
        || async { fleet(&agent).worker_blocks(worker).unwrap_or(0) >= before + 16 },
    )
    .await;
    let metrics = reqwest::get(format!("http://{}/metrics", agent.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let batches: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("kvfleet_engine_events_batches_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(batches > 0, "no vLLM event batches applied:\n{metrics}");

    // Structured output through vLLM's `structured_outputs`.
    let schema = json!({"type": "object", "additionalProperties": false,
        "required": ["city", "population"],
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}}});
    for (extra, check) in [
        (
            json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "c", "strict": true, "schema": schema}}}),
            "json",
        ),
        (json!({"guided_regex": "[0-9]{3}-[0-9]{4}"}), "regex"),
    ] {
        let mut body = json!({"model": MODEL, "max_tokens": 64, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a city and its population."}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let response = reqwest::Client::new()
            .post(format!("http://{}/v1/chat/completions", agent.addr))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let answer: serde_json::Value = response.json().await.unwrap();
        let text = answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        if check == "json" {
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(
                value["city"].is_string() && value["population"].is_i64(),
                "{text}"
            );
        } else {
            let digits: Vec<usize> = text.split('-').map(str::len).collect();
            assert_eq!(digits, [3, 4], "{text:?}");
        }
    }

    // The figures: 1 and 16 concurrent streams of ~512-token prompts, 64 tokens each.
    println!("| streams | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | output tokens/s |");
    println!("| ---: | ---: | ---: | ---: |");
    for streams in [1usize, 16] {
        let started = std::time::Instant::now();
        let addr = agent.addr;
        let runs = futures_util::future::join_all((0..streams).map(|i| async move {
            let content = format!("Request {i}. {}", "Tell me about the fleet. ".repeat(90));
            stream_chat(addr, &content, 64).await
        }))
        .await;
        let wall = started.elapsed().as_secs_f64();
        let mut ttft: Vec<Duration> = runs.iter().map(|r| r.0).collect();
        let mut itl: Vec<Duration> = runs.iter().flat_map(|r| r.1.clone()).collect();
        let tokens: usize = runs.iter().map(|r| r.2).sum();
        println!(
            "| {streams} | {:.0} / {:.0} | {:.1} / {:.1} | {:.0} |",
            percentile_ms(&mut ttft, 0.5),
            percentile_ms(&mut ttft, 0.99),
            percentile_ms(&mut itl, 0.5),
            percentile_ms(&mut itl, 0.99),
            tokens as f64 / wall
        );
    }
    agent.stop().await;
    cp.stop().await;
    db.drop_now().await;
    let _ = std::fs::remove_dir_all(state);
}
