//! The fault suite: a real Postgres, a control plane and three agents on loopback (each with
//! one mock worker of a three-worker deployment), clients streaming chat completions through
//! every agent throughout, and one part of the fleet killed under that load. Every case asserts
//! that no client request failed and that every streamed text is complete and correct (equal
//! to the same prompt's text served before the fault), and prints what it killed, when, how
//! many requests were in flight and how many were migrated.
//!
//! Needs `DATABASE_URL` (`source scripts/lib/common.sh && ensure_test_postgres`); without it
//! each case prints why and skips.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    unreachable_pub
)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::load::*;
use common::*;
use kvfleet_agent::serving::PrefillOutcome;
use kvfleet_proto::api::WorkerRole;
use serde_json::{Value, json};
use sqlx::Connection as _;

/// A stopped agent's node is lost (and leaves the routers) within seconds.
const LOST_AFTER: Duration = Duration::from_secs(2);

/// Tokens take 15 ms: a request of [`MAX_TOKENS`] streams for about a second, so a kill lands
/// in the middle of many of them.
const SETUP: AgentSetup = AgentSetup {
    mock_token_time_us: 15_000,
    peer_on_loopback: true,
};

const MAX_TOKENS: u32 = 60;

/// The prompts clients cycle through (distinct, so the router spreads them over the nodes).
fn requests() -> Requests {
    Requests {
        prompts: (0..9)
            .map(|i| {
                format!(
                    "fault suite prompt number {i}: tell me about node {}",
                    i % 3
                )
                .into()
            })
            .collect(),
        max_tokens: MAX_TOKENS,
        timeout: Duration::from_secs(60),
    }
}

/// Each prompt's text and token count, served once before any fault.
async fn baseline(agent: SocketAddr) -> BTreeMap<Arc<str>, (String, u64)> {
    let client = reqwest::Client::new();
    let requests = requests();
    let mut expected = BTreeMap::new();
    for prompt in requests.prompts.iter() {
        match stream(&client, agent, prompt, MAX_TOKENS, requests.timeout).await {
            Outcome::Done(text, tokens) => {
                assert_eq!(tokens, u64::from(MAX_TOKENS), "{prompt}");
                expected.insert(prompt.clone(), (text, tokens));
            }
            Outcome::Failed { kind, detail } => panic!("the baseline failed: {kind}: {detail}"),
        }
    }
    expected
}

/// Asserts 0 failed requests and complete, correct text; prints the case's figures.
fn check(
    case: &str,
    killed: &str,
    at: Duration,
    in_flight: usize,
    migrated: f64,
    outcomes: &[Record],
    expected: &BTreeMap<Arc<str>, (String, u64)>,
) {
    let failed: Vec<_> = outcomes
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Failed { kind, detail } => Some(format!("{}: {kind}: {detail}", r.prompt)),
            Outcome::Done(..) => None,
        })
        .collect();
    println!(
        "fault case {case}: killed {killed} at {:.2} s into the load; {in_flight} requests in \
         flight; {migrated} migrated; {} requests, {} failed",
        at.as_secs_f64(),
        outcomes.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{case}: failed requests:\n{}",
        failed.join("\n")
    );
    for Record {
        prompt, outcome, ..
    } in outcomes
    {
        if let Outcome::Done(text, tokens) = outcome {
            let (want, want_tokens) = &expected[prompt];
            assert_eq!(tokens, want_tokens, "{case}: usage of {prompt:?}");
            assert_eq!(text, want, "{case}: text of {prompt:?}");
        }
    }
}

/// The pid of `agent`'s (only) worker process, once it runs.
fn worker_pid(agent: &Agent) -> u32 {
    use kvfleet_agent::backend::Backend as _;
    agent
        .running
        .pool
        .workers()
        .iter()
        .find_map(|w| w.pid)
        .expect("a running worker")
}

fn kill_9(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -9 {pid}");
}

/// Requests `agent`'s worker is generating.
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

/// Three nodes serving, their routers knowing each other, and each prompt's unbroken text.
async fn three_nodes(names: [&str; 3]) -> Option<(ThreeNodes, BTreeMap<Arc<str>, (String, u64)>)> {
    let nodes = ThreeNodes::start(names, LOST_AFTER, SETUP, |_, toml| toml).await?;
    wait_routers_know_everyone(&nodes.agents).await;
    let expected = baseline(nodes.agents[0].addr).await;
    Some((nodes, expected))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_a_worker_in_decode_loses_no_request() {
    let Some((nodes, expected)) = three_nodes(["fault-dec-a", "fault-dec-b", "fault-dec-c"]).await
    else {
        return;
    };
    let addrs: Vec<SocketAddr> = nodes.agents.iter().map(|a| a.addr).collect();
    let before = migrations(&addrs).await;
    let load = Load::start(&addrs, 2, &requests());
    let started = Instant::now();
    // Once node b's worker is decoding requests (its own and forwarded ones), kill it.
    wait_for("node b's worker busy", Duration::from_secs(10), || async {
        outstanding(&nodes.agents[1]) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let at = started.elapsed();
    let in_flight = load.in_flight();
    kill_9(worker_pid(&nodes.agents[1]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcomes = load.finish().await;
    let migrated = migrations(&addrs).await - before;
    check(
        "worker in decode",
        "node b's worker (kill -9)",
        at,
        in_flight,
        migrated,
        &outcomes,
        &expected,
    );
    assert!(
        migrated >= 1.0,
        "the kill hit requests, which were migrated"
    );
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_a_worker_in_prefill_loses_no_request() {
    let Some((nodes, expected)) = three_nodes(["fault-pre-a", "fault-pre-b", "fault-pre-c"]).await
    else {
        return;
    };
    let addrs: Vec<SocketAddr> = nodes.agents.iter().map(|a| a.addr).collect();
    let before = migrations(&addrs).await;
    // A burst of new requests on node b, its worker killed as they arrive: before their first
    // token (their prefill), while other clients stream throughout.
    let load = Load::start(&addrs, 1, &requests());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let burst = Load::start(&[addrs[1]], 4, &requests());
    let started = Instant::now();
    // Node b's router may send a prompt to the worker holding its prefix on another node, so
    // how many of the burst reach b's own worker at once varies: wait for any (the kill must
    // hit at least one request, asserted below through the migration count).
    wait_for(
        "the burst at node b's worker",
        Duration::from_secs(20),
        || async { outstanding(&nodes.agents[1]) >= 1 },
    )
    .await;
    let at = started.elapsed();
    let in_flight = load.in_flight() + burst.in_flight();
    kill_9(worker_pid(&nodes.agents[1]));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut outcomes = burst.finish().await;
    outcomes.extend(load.finish().await);
    let migrated = migrations(&addrs).await - before;
    check(
        "worker in prefill",
        "node b's worker (kill -9) as a burst of requests reached it",
        at,
        in_flight,
        migrated,
        &outcomes,
        &expected,
    );
    assert!(
        migrated >= 1.0,
        "the kill hit requests, which were migrated"
    );
    nodes.stop().await;
}

/// How fast a silent peer connection is declared dead in this suite (`[peer] dead_after_ms`).
const DEAD_AFTER_MS: u64 = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_an_agent_serving_forwarded_requests_loses_no_request() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let names = ["fault-agent-a", "fault-agent-b", "fault-agent-c"];
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap(), LOST_AFTER).await;
    let admin = token(&db, kvfleet_controlplane::auth::Role::Admin).await;
    let join = token(&db, kvfleet_controlplane::auth::Role::Join).await;
    let dirs: Vec<_> = names.iter().map(|n| temp_dir(n)).collect();
    let config = |k: usize| {
        Agent::config(names[k], &cp, &join, &dirs[k], SETUP).replace(
            "[peer]\n",
            &format!("[peer]\ndead_after_ms = {DEAD_AFTER_MS}\n"),
        )
    };
    // Node b runs as a process of its own (the agent binary), so that it can be killed -9.
    std::fs::create_dir_all(&dirs[1]).unwrap();
    let b_config = dirs[1].join("agent.toml");
    std::fs::write(&b_config, config(1)).unwrap();
    let mut b = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvfleet-e2e-agent"))
        .arg("run")
        .arg("--config")
        .arg(&b_config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let a = Agent::launch(names[0], config(0)).await;
    let c = Agent::launch(names[2], config(2)).await;
    wait_nodes_healthy(&cp, &admin, &names).await;
    deploy(&cp, &admin, 3).await;
    let clients = [a, c];
    wait_for(
        "every node's worker ready, known to nodes a and c",
        Duration::from_secs(60),
        || async {
            clients.iter().all(|n| {
                let remote = fleet(n).remote_workers();
                n.ready_workers() == 1
                    && remote.len() == 2
                    && remote.values().all(|w| w.ready && w.peer_addr.is_some())
            })
        },
    )
    .await;
    let addrs: Vec<SocketAddr> = clients.iter().map(|n| n.addr).collect();
    let expected = baseline(addrs[0]).await;
    let before = migrations(&addrs).await;
    // Clients on nodes a and c only (a client of node b dies with it: nothing can save a
    // connection to a dead frontend); node b serves what their routers forward to it.
    let load = Load::start(&addrs, 3, &requests());
    let started = Instant::now();
    wait_for(
        "requests forwarded to node b",
        Duration::from_secs(10),
        || async {
            clients
                .iter()
                .map(|n| fleet(n).pick_counts().1)
                .sum::<u64>()
                >= 4
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at = started.elapsed();
    let in_flight = load.in_flight();
    kill_9(b.id().unwrap());
    let _ = b.wait().await;
    // Long enough for the dead peer to be noticed and its requests resumed elsewhere.
    tokio::time::sleep(Duration::from_millis(DEAD_AFTER_MS + 1500)).await;
    let outcomes = load.finish().await;
    let migrated = migrations(&addrs).await - before;
    check(
        "agent serving forwarded requests",
        "node b's agent process (kill -9)",
        at,
        in_flight,
        migrated,
        &outcomes,
        &expected,
    );
    assert!(
        migrated >= 1.0,
        "the kill hit forwarded requests, which were migrated"
    );
    for agent in clients {
        agent.stop().await;
    }
    cp.stop().await;
    db.drop_now().await;
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Forwarded generate requests node `agent`'s peer endpoint has taken so far.
fn generate_served(agent: &Agent) -> u64 {
    agent
        .running
        .fleet()
        .and_then(|f| f.peer.endpoint())
        .map_or(0, |e| e.metrics().snapshot().generate_served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioning_a_nodes_peer_traffic_loses_no_request() {
    use common::partition::{Relay, Switch};
    // Each node's peer endpoint behind a UDP relay it advertises, so that the switch can cut
    // node b off from its peers (both ways) while its control-plane link stays up: to the
    // control plane, b is healthy throughout.
    let switch = Switch::new();
    let mut relays = Vec::new();
    for _ in 0..3 {
        relays.push(Relay::start(switch.clone()).await);
    }
    let relay_addrs: Vec<SocketAddr> = relays.iter().map(|r| r.addr).collect();
    let names = ["fault-part-a", "fault-part-b", "fault-part-c"];
    let Some(nodes) = ThreeNodes::start(names, LOST_AFTER, SETUP, |k, toml| {
        toml.replace(
            "[peer]\n",
            &format!(
                "[peer]\nadvertise = \"{}\"\ndead_after_ms = {DEAD_AFTER_MS}\n",
                relay_addrs[k]
            ),
        )
    })
    .await
    else {
        return;
    };
    let mut peers = Vec::new();
    for (relay, agent) in relays.iter().zip(&nodes.agents) {
        let handle = &agent.running.fleet().unwrap().peer;
        wait_for(
            "the peer endpoint bound",
            Duration::from_secs(20),
            || async { handle.local_addr().is_some() },
        )
        .await;
        let peer = handle.local_addr().unwrap();
        relay.forward_to(peer);
        peers.push(peer);
    }
    wait_routers_know_everyone(&nodes.agents).await;
    for agent in &nodes.agents {
        for worker in fleet(agent).remote_workers().values() {
            let addr = worker.peer_addr.unwrap();
            assert!(
                relay_addrs.contains(&addr),
                "{}: a peer reached at {addr}, not through its relay",
                agent.name
            );
        }
    }
    let (a, b) = (&nodes.agents[0], &nodes.agents[1]);
    let expected = baseline(a.addr).await;
    let addrs: Vec<SocketAddr> = nodes.agents.iter().map(|n| n.addr).collect();
    let before = migrations(&addrs).await;
    let fallbacks_before = fleet(a).pick_counts().2;
    // Clients on node a only: whatever node b's worker generates was forwarded to it by a.
    let load = Load::start(&[a.addr], 4, &requests());
    let started = Instant::now();
    wait_for(
        "node b streaming requests forwarded to it",
        Duration::from_secs(10),
        || async { outstanding(b) >= 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let at = started.elapsed();
    let in_flight = load.in_flight();
    let at_b = outstanding(b);
    switch.partition(&relays[1], peers[1]);
    // Long enough for a's connection to b to be declared dead (its streams migrated) and for
    // requests routed to b meanwhile to fall back.
    tokio::time::sleep(Duration::from_millis(DEAD_AFTER_MS + 2000)).await;
    let dropped = switch.dropped();
    switch.heal();
    let healed = started.elapsed();
    // Node b is still healthy and ready to the control plane, so a's router never dropped it:
    // once its peer traffic flows, a dials it anew and forwards to it again.
    let served = generate_served(b);
    wait_for(
        "node b serving forwarded requests again after the heal",
        Duration::from_secs(15),
        || async { generate_served(b) >= served + 2 },
    )
    .await;
    let back_after = started.elapsed() - healed;
    load.wait_ended("requests after the heal", 4, Duration::from_secs(15))
        .await;
    let outcomes = load.finish().await;
    let migrated = migrations(&addrs).await - before;
    let fell_back = fleet(a).pick_counts().2 - fallbacks_before;
    println!(
        "fault case partition: node b ({}, behind relay {}) cut off from its peers for {:.2} s \
         ({dropped} datagrams dropped), {at_b} requests streaming on b when cut; {fell_back} \
         forwards fell back to node a; b took {} forwarded requests {:.2} s after the heal",
        peers[1],
        relay_addrs[1],
        (healed - at).as_secs_f64(),
        generate_served(b) - served,
        back_after.as_secs_f64(),
    );
    check(
        "partition a node's peer traffic",
        "nothing: node b's peer traffic partitioned (UDP relays dropping it both ways)",
        at,
        in_flight,
        migrated,
        &outcomes,
        &expected,
    );
    assert!(dropped > 0, "the partition dropped b's peer traffic");
    assert!(
        migrated >= 1.0,
        "the partition caught requests streaming from node b, which were migrated"
    );
    nodes.stop().await;
    drop(relays);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_a_node_loses_no_request() {
    // Node a has a spare CPU slot: the drained node's worker is replaced there, then drained
    // (its requests finish or, at the grace deadline, are migrated).
    let names = ["fault-drain-a", "fault-drain-b", "fault-drain-c"];
    let Some(nodes) = ThreeNodes::start(names, LOST_AFTER, SETUP, |k, toml| match k {
        0 => toml.replace("cpu_slots = 1", "cpu_slots = 2"),
        _ => toml,
    })
    .await
    else {
        return;
    };
    wait_routers_know_everyone(&nodes.agents).await;
    let expected = baseline(nodes.agents[0].addr).await;
    let addrs: Vec<SocketAddr> = nodes.agents.iter().map(|a| a.addr).collect();
    let before = migrations(&addrs).await;
    let load = Load::start(&addrs, 2, &requests());
    let started = Instant::now();
    wait_for("node b's worker busy", Duration::from_secs(10), || async {
        outstanding(&nodes.agents[1]) >= 2
    })
    .await;
    let (_, listed) = api(
        reqwest::Method::GET,
        &nodes.cp.url("/nodes"),
        &nodes.admin,
        None,
    )
    .await;
    let b = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["hostname"] == names[1])
        .and_then(|n| n["id"].as_str())
        .unwrap()
        .to_owned();
    let at = started.elapsed();
    let in_flight = load.in_flight();
    let (status, body) = api(
        reqwest::Method::POST,
        &nodes.cp.url(&format!("/nodes/{b}/drain")),
        &nodes.admin,
        None,
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    wait_for(
        "node b's worker drained away, its replacement on node a ready",
        Duration::from_secs(30),
        || async { nodes.agents[1].ready_workers() == 0 && nodes.agents[0].ready_workers() == 2 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outcomes = load.finish().await;
    let migrated = migrations(&addrs).await - before;
    check(
        "drain a node",
        "nothing: node b drained through the API",
        at,
        in_flight,
        migrated,
        &outcomes,
        &expected,
    );
    nodes.stop().await;
}

/// Requests rescued from a lost worker so far, summed over `agents`: legs migrated, and
/// disaggregated requests whose prefill leg failed (before or after its first token) and were
/// prefilled again by their decode worker.
fn rescued(agents: &[Agent]) -> Rescued {
    let mut total = Rescued::default();
    for serving in agents.iter().filter_map(|a| a.running.fleet()) {
        let serving = &serving.serving;
        total.migrated += serving.migrations();
        total.before_first_token += serving.outcome_count(PrefillOutcome::FallbackBeforeFirstToken);
        total.after_first_token += serving.outcome_count(PrefillOutcome::FallbackAfterFirstToken);
    }
    total
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Rescued {
    migrated: u64,
    /// Prefill legs that failed before their first token.
    before_first_token: u64,
    /// Prefill legs that failed after their first token, while their blocks were moving.
    after_first_token: u64,
}

impl Rescued {
    fn since(self, before: Rescued) -> Rescued {
        Rescued {
            migrated: self.migrated - before.migrated,
            before_first_token: self.before_first_token - before.before_first_token,
            after_first_token: self.after_first_token - before.after_first_token,
        }
    }
}

/// A disaggregated deployment of the mock model: one prefill and two decode workers, one per
/// node, every prompt prefilled remotely.
fn split_deployment() -> Value {
    json!({"name": "split", "model": MODEL, "mode": "disaggregated",
        "min_workers": 3, "max_workers": 3, "placement": {"allow_cpu": true},
        "disaggregation": {"min_remote_prefill_tokens": 0, "prefill_timeout_ms": 60000}})
}

/// Three nodes serving [`split_deployment`] with prefills taking `prefill_us` per prompt
/// token and KV blocks of `64 × kv_head_dim` bytes, their routers knowing each other: the nodes, the prefill node's index, and each
/// prompt's unbroken text.
async fn split_nodes(
    names: [&str; 3],
    prefill_us: u32,
    kv_head_dim: u32,
) -> Option<(ThreeNodes, usize, BTreeMap<Arc<str>, (String, u64)>)> {
    let nodes = ThreeNodes::start_deployed(
        names,
        LOST_AFTER,
        SETUP,
        |_, toml| {
            toml.replace(
                "[control_plane]\n",
                &format!(
                    "mock_prefill_time_per_token_us = {prefill_us}\n\
                     mock_kv_head_dim = {kv_head_dim}\n[control_plane]\n"
                ),
            )
        },
        split_deployment(),
    )
    .await?;
    wait_routers_know_everyone(&nodes.agents).await;
    let roles: Vec<WorkerRole> = nodes.agents.iter().map(role).collect();
    let prefill = roles
        .iter()
        .position(|r| *r == WorkerRole::Prefill)
        .unwrap_or_else(|| panic!("a prefill worker among {roles:?}"));
    let expected = baseline(nodes.agents[0].addr).await;
    Some((nodes, prefill, expected))
}

/// The role of `agent`'s (only) worker.
fn role(agent: &Agent) -> WorkerRole {
    use kvfleet_agent::backend::Backend as _;
    agent.running.pool.workers()[0].role
}

/// Polls `check` every millisecond for up to `limit`; whether it held.
async fn poll(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

/// What [`kill_until_hit`] did: when its last kill was (into the load), how many requests were
/// in flight then, and how many kills it took.
struct Kills {
    at: Duration,
    in_flight: usize,
    count: u32,
}

/// Kills node `victim`'s worker (`kill -9`) as soon as `armed` holds, waits for the supervisor
/// to restart it, and again, until a kill has hit a request the way `hit` says (by what was
/// rescued since the kill).
/// A kill can land between two requests (their legs are short here): waiting on the counters
/// rather than on luck keeps the case robust.
async fn kill_until_hit(
    nodes: &ThreeNodes,
    victim: usize,
    load: &Load,
    started: Instant,
    mut armed: impl FnMut() -> bool,
    hit: impl Fn(Rescued) -> bool,
) -> Kills {
    let agent = &nodes.agents[victim];
    for count in 1..=10 {
        let before = rescued(&nodes.agents);
        assert!(
            poll(Duration::from_secs(20), &mut armed).await,
            "the kill's condition on node {victim} never held"
        );
        let (at, in_flight) = (started.elapsed(), load.in_flight());
        let pid = worker_pid(agent);
        kill_9(pid);
        // The requests it held are rescued as soon as their legs break; the worker comes back
        // after the supervisor's backoff.
        wait_for(
            "the killed worker restarted and ready",
            Duration::from_secs(20),
            || async {
                use kvfleet_agent::backend::Backend as _;
                agent
                    .running
                    .pool
                    .workers()
                    .iter()
                    .any(|w| w.pid.is_some_and(|p| p != pid))
                    && agent.ready_workers() == 1
            },
        )
        .await;
        if hit(rescued(&nodes.agents).since(before)) {
            return Kills {
                at,
                in_flight,
                count,
            };
        }
        println!("kill {count} of node {victim}'s worker hit no request; again");
    }
    panic!("ten kills of node {victim}'s worker hit no request");
}

/// One disaggregated case: clients on every node, node `victim`'s worker killed whenever
/// `armed` holds until a kill hits requests; then 0 failed requests and complete, correct text.
async fn split_case(
    case: &str,
    nodes: &ThreeNodes,
    victim: usize,
    expected: &BTreeMap<Arc<str>, (String, u64)>,
    armed: impl FnMut() -> bool,
    hit: impl Fn(Rescued) -> bool,
) {
    let addrs: Vec<SocketAddr> = nodes.agents.iter().map(|a| a.addr).collect();
    let before = rescued(&nodes.agents);
    let load = Load::start(&addrs, 2, &requests());
    let started = Instant::now();
    let kills = kill_until_hit(nodes, victim, &load, started, armed, hit).await;
    // A moment of serving after the kill: the restarted worker back in the routers' plans.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let outcomes = load.finish().await;
    let rescued = rescued(&nodes.agents).since(before);
    let role = format!("{:?}", role(&nodes.agents[victim])).to_lowercase();
    check(
        case,
        &format!(
            "node {victim}'s {role} worker (kill -9, {} kills until one hit; prefill legs that \
             fell back to their decode worker: {} before their first token, {} after it)",
            kills.count, rescued.before_first_token, rescued.after_first_token
        ),
        kills.at,
        kills.in_flight,
        rescued.migrated as f64,
        &outcomes,
        expected,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_the_prefill_worker_in_its_prefill_loses_no_request() {
    // Prefills of a few hundred ms: a kill while the prefill worker holds a request lands in
    // that request's prefill leg, before its first token.
    let Some((nodes, prefill, expected)) =
        split_nodes(["fault-spre-a", "fault-spre-b", "fault-spre-c"], 4000, 1).await
    else {
        return;
    };
    let agent = &nodes.agents[prefill];
    split_case(
        "disaggregated prefill leg",
        &nodes,
        prefill,
        &expected,
        || outstanding(agent) >= 1,
        |r| r.before_first_token > 0,
    )
    .await;
    nodes.stop().await;
}

/// Once flaky (about one run in 13 of the decode-leg case: a new request forwarded to the
/// just-killed decode worker fell back to its entry node, which had only the prefill worker,
/// and was refused); a fallback is now planned again without the lost worker. Both decode-kill
/// cases then passed 40 consecutive runs in a row (see the commit that un-ignored them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_a_decode_worker_during_kv_transfer_loses_no_request() {
    // Blocks of 256 KiB (a mock's are 64 bytes by default and arrive in microseconds); the
    // kill comes the moment blocks are seen arriving at a decode node (its peer endpoint's
    // counter moves), while the rest of that request's blocks are on their way into the
    // worker. The prefill worker is not the one killed here: once it has sent its last block
    // to its agent (at once, for the mock), the transfer no longer needs it, and 20 kills of
    // it as blocks moved hit no request.
    let Some((nodes, prefill, expected)) =
        split_nodes(["fault-sxfer-a", "fault-sxfer-b", "fault-sxfer-c"], 0, 4096).await
    else {
        return;
    };
    let decode = (prefill + 1) % 3;
    let peer = nodes.agents[decode].running.fleet().unwrap().peer.clone();
    let received = move || {
        peer.endpoint()
            .map_or(0, |e| e.metrics().snapshot().kv_blocks_received)
    };
    let mut last = received();
    split_case(
        "disaggregated KV transfer",
        &nodes,
        decode,
        &expected,
        || {
            let now = received();
            let arriving = now > last;
            last = now;
            arriving
        },
        |r| r.migrated > 0,
    )
    .await;
    nodes.stop().await;
}

/// See [`kill_9_a_decode_worker_during_kv_transfer_loses_no_request`] for its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_a_decode_worker_in_its_decode_loses_no_request() {
    let Some((nodes, prefill, expected)) =
        split_nodes(["fault-sdec-a", "fault-sdec-b", "fault-sdec-c"], 0, 1).await
    else {
        return;
    };
    let decode = (prefill + 1) % 3;
    let agent = &nodes.agents[decode];
    // Requests generate for about a second: 300 ms into the load, the first ones are decoding.
    let started = Instant::now();
    split_case(
        "disaggregated decode leg",
        &nodes,
        decode,
        &expected,
        || started.elapsed() > Duration::from_millis(300) && outstanding(agent) >= 2,
        |r| r.migrated > 0,
    )
    .await;
    nodes.stop().await;
}

/// A PostgreSQL cluster of the test's own (not the shared `DATABASE_URL` server, which other
/// tests use): `initdb` into a temporary directory, run as the `postgres` user (PostgreSQL
/// refuses root), trust authentication on loopback, crashed and restarted by the test.
struct PrivatePostgres {
    bin: std::path::PathBuf,
    dir: std::path::PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// A running cluster, or `None` (and why) where the machine has no PostgreSQL server or the
    /// test is not root (it runs the server as `postgres`).
    async fn start() -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .find(|b| b.join("pg_ctl").is_file());
        let Some(bin) = bin else {
            println!("SKIPPED: no PostgreSQL server under /usr/lib/postgresql");
            return None;
        };
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        if !root {
            println!("SKIPPED: a private PostgreSQL cluster needs root (to run it as postgres)");
            return None;
        }
        let dir = temp_dir("pg");
        std::fs::create_dir_all(&dir).unwrap();
        run("chown", &["postgres:postgres", dir.to_str().unwrap()]).await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Self { bin, dir, port };
        let data = pg.dir.join("data");
        pg.as_postgres(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "--auth=trust",
                "-U",
                "postgres",
            ],
        )
        .await;
        pg.server_start().await;
        Some(pg)
    }

    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn as_postgres(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let mut all = vec!["-u", "postgres", "--", program.to_str().unwrap()];
        all.extend(args);
        run("runuser", &all).await;
    }

    async fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.join("data");
        let mut all = vec!["-D", data.to_str().unwrap(), "-w", "-t", "60"];
        all.extend(args);
        self.as_postgres("pg_ctl", &all).await;
    }

    async fn server_start(&self) {
        let log = self.dir.join("server.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        self.pg_ctl(&["-l", log.to_str().unwrap(), "-o", &options, "start"])
            .await;
    }

    /// Stops the server as a crash would (`immediate`: no checkpoint, connections cut).
    async fn crash(&self) {
        self.pg_ctl(&["-m", "immediate", "stop"]).await;
    }
}

/// The server stops with its test, failed or not (a panicking test must not leave a
/// PostgreSQL running).
impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args([
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "stop",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `program` to its end; panics with its output if it fails.
async fn run(program: &str, args: &[&str]) {
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The last KV event id each worker's engine sent to its agent, seen from subscriptions to
/// every agent's pool taken before the load.
struct KvEventsSeen {
    last: Arc<std::sync::Mutex<BTreeMap<u64, u64>>>,
    count: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl KvEventsSeen {
    fn watch(agents: &[Agent]) -> Self {
        let last = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tasks = agents
            .iter()
            .map(|a| {
                let mut events = a.running.pool.subscribe_kv_events();
                let (last, count) = (last.clone(), count.clone());
                tokio::spawn(async move {
                    use tokio::sync::broadcast::error::RecvError;
                    loop {
                        match events.recv().await {
                            Ok(e) => {
                                last.lock().unwrap().insert(e.worker.0, e.event_id);
                                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(RecvError::Lagged(_)) => {}
                            Err(RecvError::Closed) => break,
                        }
                    }
                })
            })
            .collect();
        Self { last, count, tasks }
    }

    fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn last(&self) -> BTreeMap<u64, u64> {
        self.last.lock().unwrap().clone()
    }
}

impl Drop for KvEventsSeen {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The engine events in `kv_log`, in order: per worker, its event ids since its last reset.
/// Panics if one was applied twice or is missing (ids go up by one from 0 after each reset).
async fn kv_log_events(db: &TestDb) -> BTreeMap<u64, Vec<u64>> {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let rows: Vec<(i64, Value)> = sqlx::query_as("SELECT worker, item FROM kv_log ORDER BY seq")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let mut ids: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (worker, item) in rows {
        let worker = worker as u64;
        let text = item.to_string();
        if text.contains("worker_reset") || text.contains("WorkerReset") {
            ids.insert(worker, Vec::new());
        } else if let Some(id) = item
            .pointer("/event/event_id")
            .or_else(|| item.pointer("/Event/event/event_id"))
            .and_then(Value::as_u64)
        {
            let seen = ids.entry(worker).or_default();
            assert_eq!(
                id,
                seen.len() as u64,
                "worker {worker}'s events in kv_log: {seen:?} then {id} (applied twice or \
                 missing)"
            );
            seen.push(id);
        }
    }
    ids
}

/// The requests and finished requests in every stored heartbeat window.
async fn window_requests(db: &TestDb) -> (u64, u64) {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let wins: Vec<Value> = sqlx::query_scalar("SELECT win FROM worker_windows")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let n = |w: &Value, f: &str| w[f].as_u64().unwrap_or(0);
    wins.iter().fold((0, 0), |(r, f), w| {
        (r + n(w, "requests"), f + n(w, "finished"))
    })
}

/// After a control-plane-side fault: every KV event the engines sent reaches `kv_log`, none
/// twice, and the heartbeat windows hold every request served (the baseline's and the load's),
/// exactly once. Prints what it saw.
async fn assert_delivered_once(case: &str, db: &TestDb, seen: &KvEventsSeen, requests_served: u64) {
    let last = seen.last();
    let catching_up = Instant::now();
    // A bound on catching up after the fault, not a latency claim: uploads resume with their
    // retry backoff, and on a loaded 2-core CI box 20 s was once not enough.
    wait_for(
        "every KV event the engines sent in kv_log",
        Duration::from_secs(45),
        || async {
            let log = kv_log_events(db).await;
            last.iter()
                .all(|(w, id)| log.get(w).is_some_and(|ids| ids.len() as u64 > *id))
        },
    )
    .await;
    let caught_up = catching_up.elapsed();
    let expected = (requests_served, requests_served);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = window_requests(db).await;
        if stored == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{case}: the heartbeat windows hold (requests, finished) {stored:?}, not \
             {expected:?}, after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more heartbeats and uploads: nothing arrives twice.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        window_requests(db).await,
        expected,
        "{case}: heartbeat windows"
    );
    let log = kv_log_events(db).await;
    let events: usize = log.values().map(Vec::len).sum();
    println!(
        "{case}: {} KV events seen from the engines during the case, all {events} in kv_log \
         once each ({:.1} s after the load ended); the heartbeat windows hold the \
         {requests_served} requests served, once each",
        seen.count(),
        caught_up.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_postgres_loses_no_request_and_no_event() {
    let Some(pg) = PrivatePostgres::start().await else {
        return;
    };
    let db = TestDb::create_on(pg.admin_url()).await;
    let names = ["fault-pg-a", "fault-pg-b", "fault-pg-c"];
    let deployment = json!({"name": "tiny", "model": MODEL, "min_workers": 3,
        "max_workers": 3, "placement": {"allow_cpu": true}});
    let nodes = ThreeNodes::start_on(db, names, LOST_AFTER, SETUP, |_, t| t, deployment).await;
    wait_routers_know_everyone(&nodes.agents).await;
    let seen = KvEventsSeen::watch(&nodes.agents);
    let expected = baseline(nodes.agents[0].addr).await;
    let addrs: Vec<SocketAddr> = nodes.agents.iter().map(|a| a.addr).collect();
    let load = Load::start(&addrs, 2, &requests());
    let started = Instant::now();
    load.wait_ended("requests before the crash", 6, Duration::from_secs(20))
        .await;
    let (at, in_flight) = (started.elapsed(), load.in_flight());
    let events_before = seen.count();
    pg.crash().await;
    // The outage lasts while clients get a dozen answers (about two requests each).
    load.wait_ended("requests during the outage", 12, Duration::from_secs(30))
        .await;
    let during = seen.count() - events_before;
    let outage = started.elapsed() - at;
    pg.server_start().await;
    load.wait_ended("requests after the restart", 6, Duration::from_secs(20))
        .await;
    let outcomes = load.finish().await;
    check(
        "Postgres restart",
        &format!(
            "the control plane's Postgres (stop -m immediate, down {:.1} s, {during} KV events \
             sent meanwhile)",
            outage.as_secs_f64()
        ),
        at,
        in_flight,
        0.0,
        &outcomes,
        &expected,
    );
    assert!(during > 0, "the engines sent KV events during the outage");
    let served = (expected.len() + outcomes.len()) as u64;
    assert_delivered_once("Postgres restart", &nodes.db, &seen, served).await;
    drop(seen);
    nodes.stop().await;
    drop(pg);
}

/// When the control plane calls a silent node lost in the leader-kill case. The agents know only
/// the killed replica's address, so they are cut off from the control plane until it restarts
/// (while clients get six answers, and the other replica takes over). Under load that ran past
/// [`LOST_AFTER`]'s 2 s: the new leader called every node lost and moved their workers away,
/// and the agents, reconnected, stopped them (requests failed with 404 until the workers came
/// back). The case is about a replica's crash, not a node's: the nodes stay live through it.
const LEADER_KILL_LOST_AFTER: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_control_plane_leader_loses_no_request_and_no_event() {
    let names = ["fault-lead-a", "fault-lead-b", "fault-lead-c"];
    let lost_after = LEADER_KILL_LOST_AFTER;
    // The agents talk to the first replica, which leads.
    let Some(mut nodes) = ThreeNodes::start(names, lost_after, SETUP, |_, t| t).await else {
        return;
    };
    wait_for("the first replica to lead", Duration::from_secs(10), || {
        leads(&nodes.cp)
    })
    .await;
    let second = ControlPlane::start(&nodes.db, "127.0.0.1:0".parse().unwrap(), lost_after).await;
    assert!(!leads(&second).await, "one leader at a time");
    wait_routers_know_everyone(&nodes.agents).await;
    let seen = KvEventsSeen::watch(&nodes.agents);
    let expected = baseline(nodes.agents[0].addr).await;
    let addrs: Vec<SocketAddr> = nodes.agents.iter().map(|a| a.addr).collect();
    let load = Load::start(&addrs, 2, &requests());
    let started = Instant::now();
    load.wait_ended("requests before the kill", 6, Duration::from_secs(20))
        .await;
    let (at, in_flight) = (started.elapsed(), load.in_flight());
    let first = std::mem::replace(&mut nodes.cp, second);
    let first_addr = first.addr;
    first.kill().await;
    wait_for(
        "the second replica to lead",
        Duration::from_secs(15),
        || leads(&nodes.cp),
    )
    .await;
    let took_over = started.elapsed() - at;
    // The agents' replica is gone: clients go on meanwhile; then it comes back (a restart on
    // its address, now a follower) and the agents deliver what they queued.
    load.wait_ended(
        "requests while the agents' replica is down",
        6,
        Duration::from_secs(30),
    )
    .await;
    let restarted = ControlPlane::start(&nodes.db, first_addr, lost_after).await;
    wait_for(
        "the agents connected again",
        Duration::from_secs(20),
        || async { nodes.agents.iter().all(Agent::connected) },
    )
    .await;
    load.wait_ended("requests after the restart", 6, Duration::from_secs(20))
        .await;
    let outcomes = load.finish().await;
    check(
        "control-plane leader",
        &format!(
            "the leading replica, the one the agents talk to (task aborted as a crash; the \
             other led {:.2} s later; restarted as a follower)",
            took_over.as_secs_f64()
        ),
        at,
        in_flight,
        0.0,
        &outcomes,
        &expected,
    );
    let served = (expected.len() + outcomes.len()) as u64;
    assert_delivered_once("control-plane leader", &nodes.db, &seen, served).await;
    drop(seen);
    restarted.stop().await;
    nodes.stop().await;
}

/// Whether the replica at `cp` says it leads.
async fn leads(cp: &ControlPlane) -> bool {
    let (_, body) = api(reqwest::Method::GET, &cp.url("/status"), "", None).await;
    body["leader"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_resuming_one_request_twice_is_refused_and_counted() {
    use kvfleet_peer::{GenerateEvent, PeerConfig, PeerEndpoint, PeerIdentity};
    use kvfleet_proto::peer::{ErrorCode, GenerateRequest};
    let names = ["fault-twice-a", "fault-twice-b", "fault-twice-c"];
    let Some(nodes) = ThreeNodes::start(names, LOST_AFTER, SETUP, |_, t| t).await else {
        return;
    };
    wait_routers_know_everyone(&nodes.agents).await;
    // A client with node a's own certificate: to node b, a fleet peer like any other.
    let state = &nodes.dirs[0];
    let identity = PeerIdentity {
        ca_pem: std::fs::read_to_string(state.join("ca.crt")).unwrap(),
        cert_pem: std::fs::read_to_string(state.join("node.crt")).unwrap(),
        key_pem: std::fs::read_to_string(state.join("node.key")).unwrap(),
    };
    let client =
        PeerEndpoint::bind(PeerConfig::new("127.0.0.1:0".parse().unwrap(), identity)).unwrap();
    let b = nodes.agents[1]
        .running
        .fleet()
        .unwrap()
        .peer
        .endpoint()
        .unwrap();
    let connection = client
        .connection(b.local_addr().unwrap(), b.node_id())
        .await
        .unwrap();
    // A resumed request: its prompt ends with 5 tokens an earlier leg generated.
    let mut sampling = kvfleet_proto::SamplingParams::greedy(MAX_TOKENS);
    sampling.generated_in_prompt = 5;
    let request = GenerateRequest {
        request_id: "chatcmpl-resumed-twice".into(),
        model: MODEL.into(),
        worker: Some(nodes.ids[1]),
        prompt: (1..=25).collect(),
        block_hashes: Vec::new(),
        sampling,
        prefill: None,
        kv_push: None,
    };
    let metrics = |agent: SocketAddr| async move {
        metric_sum(&[agent], "kvfleet_request_legs_refused_total").await
    };
    let before = metrics(nodes.agents[1].addr).await;
    let mut first = connection.generate(&request).await.unwrap();
    assert!(
        matches!(first.next().await, Ok(Some(GenerateEvent::Tokens(_)))),
        "the first resume runs"
    );
    // The same resume again while the first runs: refused, counted, never run twice.
    let mut second = connection.generate(&request).await.unwrap();
    let refused = second.next().await.unwrap_err();
    assert_eq!(
        refused.remote_code(),
        Some(ErrorCode::Unavailable),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("already being resumed"),
        "{refused}"
    );
    assert_eq!(metrics(nodes.agents[1].addr).await - before, 1.0);
    // The first goes on to its end, untouched.
    let mut finished = false;
    while let Some(event) = first.next().await.unwrap() {
        finished |= matches!(event, GenerateEvent::Finished(_));
    }
    assert!(finished, "the first resume finished");
    println!(
        "bad input: a second resume of one request while the first ran was refused ({refused}); \
         kvfleet_request_legs_refused_total on node b went up by 1"
    );
    client.close().await;
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_gone_during_a_migration_leaves_nothing_held() {
    let names = ["fault-gone-a", "fault-gone-b", "fault-gone-c"];
    let Some(nodes) = ThreeNodes::start(names, LOST_AFTER, SETUP, |_, t| t).await else {
        return;
    };
    wait_routers_know_everyone(&nodes.agents).await;
    let addrs: Vec<SocketAddr> = nodes.agents.iter().map(|a| a.addr).collect();
    let before = migrations(&addrs).await;
    // One long streamed request (180 tokens of 15 ms: about 2.7 s), read until tokens flow.
    let max_tokens = 180;
    let mut response = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", addrs[0]))
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "a client that leaves mid-migration"}],
            "max_tokens": max_tokens,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let mut seen = String::new();
    let asked = Instant::now();
    // Until a token's text has arrived: the stream's first event is the role's delta, whose
    // `"content":""` comes before any token. (Waiting for that alone let the kill land before
    // the first token whenever the request was slow to start, on a loaded box: the forward
    // then fell back to a local run, which is no migration, and the wait below timed out.)
    while !streamed_a_token(&seen) {
        let chunk = response
            .chunk()
            .await
            .unwrap()
            .expect("tokens before the end");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    // The worker serving it is the only one holding a request; it dies, the frontend resumes
    // the request elsewhere, and the client leaves as soon as the migration has begun.
    // (Worker states come with their status reports, a moment behind the tokens.)
    wait_for(
        "a worker serving the request",
        Duration::from_secs(10),
        || async { nodes.agents.iter().any(|a| outstanding(a) == 1) },
    )
    .await;
    let serving = nodes
        .agents
        .iter()
        .position(|a| outstanding(a) == 1)
        .expect("one worker serving the request");
    let started = Instant::now();
    println!(
        "client gone: tokens flowing on node {serving}'s worker {:.2} s after the request",
        asked.elapsed().as_secs_f64()
    );
    kill_9(worker_pid(&nodes.agents[serving]));
    wait_for(
        "the migration to begin",
        Duration::from_secs(10),
        || async { migrations(&addrs).await > before },
    )
    .await;
    drop(response);
    let gone = started.elapsed();
    // Everything the request held goes, well before its remaining ~2.5 s of tokens would have
    // ended it.
    let left = Instant::now();
    let mut freed_now = nothing_held(&nodes.agents).await;
    while !freed_now && left.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        freed_now = nothing_held(&nodes.agents).await;
    }
    assert!(
        freed_now,
        "1.5 s after the client left mid-migration, something is still held"
    );
    println!(
        "client gone: killed node {serving}'s worker mid-stream, the client left {:.2} s later \
         with the migration begun; everything freed {:.2} s after it left",
        gone.as_secs_f64(),
        left.elapsed().as_secs_f64()
    );
    nodes.stop().await;
}

/// Whether the SSE text `sse` has a complete event carrying a token's text.
fn streamed_a_token(sse: &str) -> bool {
    sse.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .any(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
}

/// Whether no request holds anything on `agents`: every frontend's in-flight count, every
/// router's decisions, every worker's requests and KV blocks (cached prefixes may stay).
async fn nothing_held(agents: &[Agent]) -> bool {
    use kvfleet_agent::backend::Backend as _;
    for agent in agents {
        let in_flight = metric_sum(&[agent.addr], "kvfleet_requests_in_flight").await;
        let decisions = fleet(agent).with_router(|r| r.inflight());
        let workers = agent.running.pool.workers();
        if in_flight != 0.0
            || decisions != 0
            || workers
                .iter()
                .any(|w| w.outstanding != 0 || w.kv_blocks_used != 0)
        {
            return false;
        }
    }
    true
}
