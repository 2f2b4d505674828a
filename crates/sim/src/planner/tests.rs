//! Planner runs on small traces: the fleet follows a ramp up and down, drains without losing
//! a request, and the static and Dynamo baselines run the same way.

use std::time::Duration;

use kvfleet_planner::policy::{Bounds, DeploymentPolicy, FleetPolicy, RoleBounds, Sla};
use kvfleet_planner::{Algorithm, PlannerConfig, PredictorKind};
use kvfleet_proto::api::{DeploymentMode, PlannerMode};

use super::*;
use crate::shape::{RateCurve, shape};
use crate::trace::parse_trace;

/// A base trace of 2,000-token prompts (four shared prefixes) with 40-token outputs.
fn base() -> Vec<TraceRequest> {
    let text: String = (0..200)
        .map(|i| {
            format!(
                "{{\"timestamp\": {}, \"input_length\": 2000, \"output_length\": 40, \"hash_ids\": [{}, {}, {}, {}]}}\n",
                i * 50,
                i % 4,
                1000 + i,
                2000 + i,
                3000 + i
            )
        })
        .collect();
    parse_trace(text.as_bytes()).unwrap()
}

fn config(controller: Controller, algorithm: Algorithm, error: f64) -> PlannerSimConfig {
    let sim = SimConfig {
        workers: 1,
        ..SimConfig::default()
    };
    let profile = sim.profile.perf_profile(&sim.scheduler);
    PlannerSimConfig {
        sim,
        policy: FleetPolicy {
            config: PlannerConfig {
                algorithm,
                predictor: PredictorKind::Ewma,
                interval: Duration::from_secs(10),
                cooldown: Duration::from_secs(60),
                ..PlannerConfig::default()
            },
            gpu_budget: None,
            deployments: vec![DeploymentPolicy {
                name: "sim".into(),
                mode: DeploymentMode::Aggregated,
                planner: PlannerMode::Auto,
                sla: Sla {
                    ttft_ms: Some(500.0),
                    itl_ms: Some(15.0),
                    percentile: 90.0,
                },
                workers: Bounds { min: 1, max: 16 },
                roles: RoleBounds::default(),
            }],
        },
        controller,
        profile,
        startup: Duration::from_secs(20),
        speed_error: SpeedError {
            aggregated: error,
            prefill: error,
            decode: error,
        },
        label: "test".into(),
        warmup: Duration::ZERO,
        headroom: 1.0,
    }
}

/// Up from 2 to 24 req/s over 2 minutes, then back down for 2 minutes.
fn ramp_trace() -> Vec<TraceRequest> {
    let up: RateCurve = "ramp:from=2,to=24,over=2m".parse().unwrap();
    let mut trace = shape(&base(), &up, Duration::from_secs(120)).unwrap();
    let down: RateCurve = "ramp:from=24,to=2,over=2m".parse().unwrap();
    let offset = Duration::from_secs(120);
    let more = shape(&base(), &down, Duration::from_secs(120)).unwrap();
    let start = trace.len();
    trace.extend(more.into_iter().enumerate().map(|(i, mut r)| {
        r.arrival += offset;
        r.line = start + i + 1;
        // Distinct prefixes from the first half's.
        r.hash_ids.iter_mut().for_each(|h| *h += 1 << 40);
        r
    }));
    trace
}

#[test]
fn the_fleet_follows_a_ramp_and_drains_without_losing_requests() {
    let trace = ramp_trace();
    let planned = run_planned(
        &config(Controller::Planner, Algorithm::Kvfleet, 0.3),
        &trace,
    )
    .unwrap();
    // It grew, shrank, and every request finished (drains lose nothing).
    assert!(planned.peak_workers >= 3, "{planned:#?}");
    assert!(
        planned.scale_ups >= 1 && planned.scale_downs >= 1,
        "{planned:#?}"
    );
    assert!(planned.stopped >= 1);
    assert_eq!(planned.completed, planned.requests);
    let last = planned.timeline.last().unwrap();
    assert!(
        last.serving + last.starting < planned.peak_workers,
        "{:?}",
        last
    );
    // New workers serve only after their start-up time: the first scale-up's workers are
    // still starting one interval later.
    let first_up = planned
        .timeline
        .iter()
        .position(|i| i.action.as_deref() == Some("scale_up"))
        .unwrap();
    assert!(planned.timeline[first_up].starting > 0);
    assert!(planned.timeline[first_up + 1].starting > 0);
    // The 30%-slow workers taught the planner a prefill factor above 1.
    let learned = planned
        .timeline
        .iter()
        .rev()
        .find_map(|i| i.corrections)
        .unwrap();
    assert!(learned[0] > 1.05, "{learned:?}");
    // A static fleet as large as the planner's peak costs more GPU-hours.
    let fixed = run_planned(
        &config(
            Controller::Static(planned.peak_workers),
            Algorithm::Kvfleet,
            0.3,
        ),
        &trace,
    )
    .unwrap();
    assert_eq!(fixed.scale_ups + fixed.scale_downs, 0);
    assert!(
        planned.gpu_hours < fixed.gpu_hours,
        "{} vs {}",
        planned.gpu_hours,
        fixed.gpu_hours
    );
    assert!((fixed.gpu_hours - f64::from(planned.peak_workers) * fixed.span_hours).abs() < 1e-3);
    assert_eq!(fixed.completed, fixed.requests);
    // Dynamo's algorithm runs the same way.
    let dynamo = run_planned(&config(Controller::Planner, Algorithm::Dynamo, 0.3), &trace).unwrap();
    assert_eq!(dynamo.algorithm, "dynamo");
    assert!(dynamo.peak_workers >= 2);
    assert_eq!(dynamo.completed, dynamo.requests);
}

#[test]
fn headroom_tightens_what_the_planner_plans_for_but_not_what_is_measured() {
    let trace = ramp_trace();
    let given = run_planned(
        &config(Controller::Planner, Algorithm::Kvfleet, 0.0),
        &trace,
    )
    .unwrap();
    let tight = run_planned(
        &PlannerSimConfig {
            headroom: 0.5,
            ..config(Controller::Planner, Algorithm::Kvfleet, 0.0)
        },
        &trace,
    )
    .unwrap();
    assert_eq!(
        tight.ttft_target_ms,
        Some(500.0),
        "measured against the given target"
    );
    assert_eq!(tight.itl_target_ms, Some(15.0));
    assert!(
        tight.gpu_hours > given.gpu_hours && tight.attainment >= given.attainment,
        "half the targets: {} GPU-hours at {:.3} vs {} at {:.3}",
        tight.gpu_hours,
        tight.attainment,
        given.gpu_hours,
        given.attainment
    );
}

#[test]
fn slowed_profiles_scale_every_coefficient() {
    let p = MockProfile::default_8b_h100();
    let slow = slowed(&p, 0.3);
    assert!((slow.prefill_ms(1000) / p.prefill_ms(1000) - 1.3).abs() < 1e-9);
    assert!((slow.decode_ms(0.5, 8) / p.decode_ms(0.5, 8) - 1.3).abs() < 1e-9);
    assert_eq!(slowed(&p, 0.0), p);
}
