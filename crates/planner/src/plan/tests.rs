//! Table, property and scenario tests of a planning round.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::model::tests::h100;
use crate::policy::{Bounds, RoleBounds};

const INTERVAL: Duration = Duration::from_secs(30);

fn policy(name: &str, mode: DeploymentMode, min: u32, max: u32) -> DeploymentPolicy {
    DeploymentPolicy {
        name: name.into(),
        mode,
        planner: PlannerMode::Auto,
        sla: Sla {
            ttft_ms: Some(2000.0),
            itl_ms: Some(25.0),
            percentile: 90.0,
        },
        workers: Bounds { min, max },
        roles: RoleBounds::default(),
    }
}

fn fleet(deployments: Vec<DeploymentPolicy>, budget: Option<u32>) -> FleetPolicy {
    FleetPolicy {
        config: PlannerConfig::default(),
        gpu_budget: budget,
        deployments,
    }
}

/// An interval of `rate` req/s of 15k-token prompts (25% cached), 150-token outputs, with no
/// latency samples (so corrections stay as they are).
fn interval(end: Duration, rate: f64, workers: RoleCounts) -> Observation {
    let requests = (rate * INTERVAL.as_secs_f64()).round() as u64;
    Observation {
        end,
        length: INTERVAL,
        requests,
        prompt_tokens: requests * 15_000,
        cached_tokens: requests * 3_750,
        finished: requests,
        output_tokens: requests * 150,
        workers,
        ..Observation::default()
    }
}

fn profiles(names: &[&str]) -> BTreeMap<String, PerfProfile> {
    names.iter().map(|n| ((*n).to_owned(), h100())).collect()
}

fn agg(n: u32) -> RoleCounts {
    RoleCounts::default().with(WorkerRole::Aggregated, n)
}

/// Runs `rounds` rounds of one deployment whose rate at round `i` is `rate(i)`, with the
/// fleet doing whatever the planner decided (workers ready at once). Returns the decisions.
fn run(
    policy: &FleetPolicy,
    start: RoleCounts,
    rounds: usize,
    rate: impl Fn(usize) -> f64,
) -> Vec<DeploymentDecision> {
    let name = policy.deployments[0].name.clone();
    let profiles = profiles(&[&name]);
    let mut history = Vec::new();
    let mut running = start;
    let mut memory: Option<Memory> = None;
    let mut out = Vec::new();
    for i in 0..rounds {
        let now = INTERVAL * (i as u32 + 1);
        history.push(interval(now, rate(i), running));
        let obs = [DeploymentObservations {
            deployment: &name,
            history: &history,
            running,
            previous: memory.as_ref(),
        }];
        let d = plan(&obs, &profiles, policy, now).deployments.remove(0);
        running = d.targets;
        memory = Some(d.memory.clone());
        out.push(d);
    }
    out
}

#[test]
fn scales_up_at_once_and_down_after_a_quiet_period() {
    let policy = fleet(
        vec![policy("chat", DeploymentMode::Aggregated, 1, 64)],
        None,
    );
    // 20 rounds at 10 req/s, then a sharp drop to 2 req/s.
    let decisions = run(&policy, agg(1), 40, |i| if i < 20 { 10.0 } else { 2.0 });
    let first = &decisions[0];
    assert_eq!(first.action, Action::ScaleUp, "{}", first.reason);
    let high = decisions[19].targets.aggregated;
    assert!(high > 4, "{high}");
    // The end of a spike needs a fraction of the fleet: a short quiet period (at least two
    // rounds) is enough.
    assert_eq!(
        decisions[20].targets.aggregated, high,
        "{}",
        decisions[20].reason
    );
    assert!(
        decisions[20].reason.contains("cooldown"),
        "{}",
        decisions[20].reason
    );
    let down = decisions[21..]
        .iter()
        .position(|d| d.action == Action::ScaleDown)
        .expect("scales down");
    assert!(down <= 2, "{down}: {}", decisions[21 + down].reason);
    let reason = &decisions[21 + down].reason;
    assert!(
        reason.starts_with("Scaling down aggregated workers"),
        "{reason}"
    );
    assert!(
        reason.contains("for the last 60 s") || reason.contains("for the last 90 s"),
        "{reason}"
    );
    let low = decisions[39].targets.aggregated;
    assert!(low < high && low >= 1, "{low} vs {high}");

    // A small step down waits most of the cooldown: (m/n)² of it, counted from the first
    // round whose load (with the margin) needed fewer.
    for low_rate in [6.0, 7.0] {
        let decisions = run(
            &policy,
            agg(1),
            50,
            |i| if i < 20 { 10.0 } else { low_rate },
        );
        let high = decisions[19].targets.aggregated;
        let first_low = 20
            + decisions[20..]
                .iter()
                .position(|d| d.needs[0].with_margin < high)
                .expect("the load needs fewer");
        let down = first_low
            + decisions[first_low..]
                .iter()
                .position(|d| d.targets.aggregated < high)
                .expect("scales down");
        let after = decisions[down].targets.aggregated;
        let ratio = f64::from(after) / f64::from(high);
        let quiet_rounds = ((ratio * ratio * 10.0).ceil() as usize).clamp(2, 10);
        assert!(
            down - first_low + 1 >= quiet_rounds,
            "{low_rate}: {high} → {after} after {} quiet rounds",
            down - first_low + 1
        );
        for d in &decisions[20..down] {
            assert_eq!(d.targets.aggregated, high, "{}", d.reason);
        }
    }
}

#[test]
fn every_decision_explains_itself() {
    let policy = fleet(
        vec![policy("chat", DeploymentMode::Aggregated, 1, 64)],
        None,
    );
    for d in run(&policy, agg(1), 30, |i| 2.0 + i as f64 * 0.5) {
        assert!(
            d.reason.ends_with('.') && !d.reason.contains('\n'),
            "{}",
            d.reason
        );
        assert_eq!(
            d.reason.matches(". ").count(),
            0,
            "one sentence: {}",
            d.reason
        );
        assert!(d.arithmetic.len() >= 3, "{:?}", d.arithmetic);
        assert!(d.arithmetic[0].starts_with("load: "), "{:?}", d.arithmetic);
        assert!(d.inputs.rate > 0.0 && d.prediction.rate > 0.0);
        let json = serde_json::to_value(&d).unwrap();
        for key in [
            "inputs",
            "prediction",
            "corrections",
            "needs",
            "targets",
            "reason",
            "memory",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }
}

#[test]
fn a_restarted_planner_decides_the_same() {
    // A leader change: the new leader has the stored history and the last decision's memory
    // (round-tripped through JSON, as Postgres keeps it) and must decide exactly the same.
    let rate = |i: usize| if i < 15 { 12.0 } else { 3.0 };
    let policy = fleet(
        vec![policy("chat", DeploymentMode::Aggregated, 1, 64)],
        None,
    );
    let decisions = run(&policy, agg(1), 30, rate);
    let profiles = profiles(&["chat"]);
    let mut history = Vec::new();
    let mut running = agg(1);
    for (i, d) in decisions.iter().enumerate() {
        let now = INTERVAL * (i as u32 + 1);
        history.push(interval(now, rate(i), running));
        let stored: Option<Memory> = (i > 0).then(|| {
            serde_json::from_str(&serde_json::to_string(&decisions[i - 1].memory).unwrap()).unwrap()
        });
        let obs = [DeploymentObservations {
            deployment: "chat",
            history: &history,
            running,
            previous: stored.as_ref(),
        }];
        let again = plan(&obs, &profiles, &policy, now).deployments.remove(0);
        assert_eq!(&again, d, "round {i}");
        running = d.targets;
    }
}

#[test]
fn the_budget_names_the_deployment_that_lost() {
    let policy = fleet(
        vec![
            policy("big", DeploymentMode::Aggregated, 1, 64),
            policy("small", DeploymentMode::Aggregated, 2, 64),
        ],
        Some(8),
    );
    let profiles = profiles(&["big", "small"]);
    let big = [interval(INTERVAL, 20.0, agg(4))];
    let small = [interval(INTERVAL, 1.0, agg(2))];
    let obs = [
        DeploymentObservations {
            deployment: "big",
            history: &big,
            running: agg(4),
            previous: None,
        },
        DeploymentObservations {
            deployment: "small",
            history: &small,
            running: agg(2),
            previous: None,
        },
    ];
    let decision = plan(&obs, &profiles, &policy, INTERVAL);
    let total: u32 = decision.deployments.iter().map(|d| d.targets.total()).sum();
    assert_eq!(total, 8);
    let big = &decision.deployments[0];
    let small = &decision.deployments[1];
    assert!(small.targets.aggregated >= 2, "its minimum is kept");
    let Some(Limit::Budget {
        budget,
        wanted,
        granted,
        holders,
    }) = big
        .limits
        .iter()
        .find(|l| matches!(l, Limit::Budget { .. }))
    else {
        panic!("big lost to the budget: {:?}", big.limits);
    };
    assert_eq!(*budget, 8);
    assert!(wanted > granted);
    assert_eq!(holders[0].0, "small");
    assert!(big.reason.contains("GPU budget of 8"), "{}", big.reason);
    assert!(big.reason.contains("small holds"), "{}", big.reason);
    // Planner-off deployments hold their workers against the budget.
    let mut off = policy.clone();
    off.deployments[1].planner = PlannerMode::Off;
    let decision = plan(&obs, &profiles, &off, INTERVAL);
    assert_eq!(decision.deployments.len(), 1);
    assert_eq!(decision.deployments[0].targets.total(), 6);
}

#[test]
fn bounds_table() {
    // (min, max, rate, running, expected target, limit kind or "")
    let rows: [(u32, u32, f64, u32, u32, &str); 4] = [
        (3, 10, 0.0, 3, 3, "minimum"),
        (1, 2, 40.0, 1, 2, "maximum"),
        (1, 64, 0.0, 1, 1, "minimum"),
        (0, 64, 0.0, 0, 0, ""),
    ];
    for (min, max, rate, running, expected, limit) in rows {
        let policy = fleet(
            vec![policy("d", DeploymentMode::Aggregated, min, max)],
            None,
        );
        let history = [interval(INTERVAL, rate, agg(running))];
        let obs = [DeploymentObservations {
            deployment: "d",
            history: &history,
            running: agg(running),
            previous: None,
        }];
        let d = plan(&obs, &profiles(&["d"]), &policy, INTERVAL)
            .deployments
            .remove(0);
        assert_eq!(
            d.targets.aggregated, expected,
            "{min}..{max} at {rate}: {}",
            d.reason
        );
        let kinds: Vec<String> = d
            .limits
            .iter()
            .map(|l| {
                serde_json::to_value(l).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        if limit.is_empty() {
            assert!(kinds.is_empty(), "{kinds:?}");
        } else {
            assert!(kinds.iter().any(|k| k == limit), "{kinds:?}");
        }
    }
}

#[test]
fn disaggregated_deployments_size_both_roles() {
    let mut p = policy("split", DeploymentMode::Disaggregated, 2, 64);
    p.roles.prefill = Some(Bounds { min: 1, max: 32 });
    let policy = fleet(vec![p], None);
    let start = RoleCounts {
        aggregated: 0,
        prefill: 1,
        decode: 1,
    };
    let decisions = run(&policy, start, 5, |_| 10.0);
    let last = decisions.last().unwrap();
    assert!(last.targets.prefill >= 3, "{:?}", last.targets);
    assert!(last.targets.decode >= 2, "{:?}", last.targets);
    assert_eq!(last.targets.aggregated, 0);
    assert_eq!(last.needs.len(), 2);
    assert!(
        decisions[0].reason.contains("prefill workers 1 → ")
            && decisions[0].reason.contains("decode workers 1 → "),
        "{}",
        decisions[0].reason
    );
}

#[test]
fn no_profile_keeps_the_fleet_and_says_so() {
    let policy = fleet(vec![policy("d", DeploymentMode::Aggregated, 1, 8)], None);
    let history = [interval(INTERVAL, 30.0, agg(3))];
    let obs = [DeploymentObservations {
        deployment: "d",
        history: &history,
        running: agg(3),
        previous: None,
    }];
    let d = plan(&obs, &BTreeMap::new(), &policy, INTERVAL)
        .deployments
        .remove(0);
    assert_eq!(d.targets.aggregated, 3);
    assert!(d.reason.contains("kvfleet profile"), "{}", d.reason);
}

#[test]
fn the_dynamo_baseline_applies_its_numbers_directly() {
    let mut policy = fleet(
        vec![policy("chat", DeploymentMode::Aggregated, 1, 64)],
        None,
    );
    policy.config.algorithm = Algorithm::Dynamo;
    policy.config.predictor = PredictorKind::Last;
    let decisions = run(&policy, agg(1), 30, |i| if i < 15 { 10.0 } else { 2.0 });
    // No cooldown: the round after the drop already scales down.
    assert!(decisions[14].targets.aggregated > decisions[15].targets.aggregated);
    assert_eq!(decisions[15].algorithm, Algorithm::Dynamo);
}

fn arb_policy() -> impl Strategy<Value = DeploymentPolicy> {
    (
        prop_oneof![
            Just(DeploymentMode::Aggregated),
            Just(DeploymentMode::Disaggregated)
        ],
        0u32..6,
        1u32..40,
        proptest::option::of((0u32..4, 1u32..40)),
        proptest::option::of(500.0f64..20_000.0),
        proptest::option::of(8.0f64..60.0),
    )
        .prop_map(|(mode, min, span, prefill, ttft, itl)| {
            let mut p = policy("d", mode, min, min + span);
            p.sla.ttft_ms = ttft;
            p.sla.itl_ms = itl;
            if mode == DeploymentMode::Disaggregated
                && let Some((pmin, pspan)) = prefill
            {
                let max = (pmin + pspan).min(min + span);
                p.roles.prefill = Some(Bounds {
                    min: pmin.min(max),
                    max,
                });
            }
            p
        })
        .prop_filter("valid", |p| p.invalid_fields().is_empty())
}

fn counts_for(p: &DeploymentPolicy, n: u32) -> RoleCounts {
    match p.mode {
        DeploymentMode::Aggregated => agg(n),
        DeploymentMode::Disaggregated => RoleCounts {
            aggregated: 0,
            prefill: n / 2,
            decode: n - n / 2,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// More load never yields fewer workers, for any role and history length.
    #[test]
    fn monotone_in_load(
        policy in arb_policy(),
        rate in 0.0f64..60.0,
        more in 0.0f64..30.0,
        rounds in 1usize..6,
        running in 0u32..20,
    ) {
        let fleet_policy = fleet(vec![policy.clone()], None);
        let counts = counts_for(&policy, running);
        let decide = |r: f64| {
            let history: Vec<Observation> = (0..rounds)
                .map(|i| interval(INTERVAL * (i as u32 + 1), r, counts))
                .collect();
            let obs = [DeploymentObservations {
                deployment: "d",
                history: &history,
                running: counts,
                previous: None,
            }];
            plan(&obs, &profiles(&["d"]), &fleet_policy, INTERVAL * rounds as u32)
                .deployments
                .remove(0)
        };
        let low = decide(rate);
        let high = decide(rate + more);
        prop_assert!(high.targets.total() >= low.targets.total());
        // Per role too, unless the deployment's maximum or minimum made the roles share a
        // total (then more prefill load may take a worker from decode).
        let shared = |d: &DeploymentDecision| {
            d.limits.iter().any(|l| {
                matches!(l, Limit::Maximum { role: None, .. } | Limit::Minimum { role: None, .. })
            })
        };
        let capped = shared(&high) || shared(&low);
        for (role, n) in low.targets.iter() {
            prop_assert!(
                capped || high.targets.get(role) >= n,
                "{role}: {:?} vs {:?}", high.targets, low.targets
            );
        }
        for (a, b) in low.needs.iter().zip(&high.needs) {
            prop_assert!(b.workers >= a.workers);
        }
    }

    /// Targets always hold the role bounds, the deployment bounds and the budget.
    #[test]
    fn bounds_always_hold(
        a in arb_policy(),
        b in arb_policy(),
        rates in (0.0f64..80.0, 0.0f64..80.0),
        running in (0u32..50, 0u32..50),
        extra_budget in proptest::option::of(0u32..30),
    ) {
        let mut b = b;
        b.name = "e".into();
        let budget = extra_budget.map(|x| a.minimum() + b.minimum() + x);
        let policy = fleet(vec![a.clone(), b.clone()], budget);
        let (ca, cb) = (counts_for(&a, running.0), counts_for(&b, running.1));
        let ha = [interval(INTERVAL, rates.0, ca)];
        let hb = [interval(INTERVAL, rates.1, cb)];
        let obs = [
            DeploymentObservations { deployment: "d", history: &ha, running: ca, previous: None },
            DeploymentObservations { deployment: "e", history: &hb, running: cb, previous: None },
        ];
        let decision = plan(&obs, &profiles(&["d", "e"]), &policy, INTERVAL);
        let mut sum = 0;
        for (d, p) in decision.deployments.iter().zip([&a, &b]) {
            let t = d.targets;
            for (role, n) in t.iter() {
                let rb = p.role_bounds(role);
                prop_assert!(n >= rb.min && n <= rb.max, "{role} {n} outside {rb:?}");
            }
            prop_assert!(
                t.total() >= p.minimum() && t.total() <= p.workers.max,
                "{t:?} vs {:?}", p.workers
            );
            sum += t.total();
        }
        if let Some(budget) = budget {
            prop_assert!(sum <= budget, "{sum} > {budget}");
        }
    }

    /// A constant load with independent noise of up to ±15% per interval (far noisier than
    /// Poisson arrivals at these rates) does not flap: after ten minutes of settling, two hours
    /// of rounds never move the count one way and then back within ten minutes, and reverse
    /// its direction at most twice.
    /// (It may step up as new noise peaks arrive: scale-up is immediate by design.) The noise
    /// comes from a seeded generator rather than from proptest's values, which shrink towards
    /// hand-made spike patterns, not noise.
    #[test]
    fn no_flapping_under_noisy_constant_load(base in 2.0f64..40.0, seed in any::<u64>()) {
        let mut state = seed;
        let noise: Vec<f64> = (0..250)
            .map(|_| {
                // splitmix64 → uniform in [-0.15, 0.15)
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.3
            })
            .collect();
        let policy = fleet(vec![policy("chat", DeploymentMode::Aggregated, 1, 256)], None);
        let decisions = run(&policy, agg(1), noise.len(), |i| base * (1.0 + noise[i]));
        let counts: Vec<u32> = decisions.iter().map(|d| d.targets.aggregated).collect();
        // (round, up?) of every change
        // The first ten minutes settle (the noise estimate needs history).
        let moves: Vec<(usize, bool)> = counts
            .windows(2)
            .enumerate()
            .filter(|(i, w)| *i >= 20 && w[0] != w[1])
            .map(|(i, w)| (i + 1, w[1] > w[0]))
            .collect();
        let reversals: Vec<usize> = moves
            .windows(2)
            .filter(|m| m[0].1 != m[1].1)
            .map(|m| m[1].0 - m[0].0)
            .collect();
        prop_assert!(reversals.len() <= 2, "{counts:?}");
        prop_assert!(reversals.iter().all(|&gap| gap >= 20), "{counts:?}");
    }
}
