//! The control plane's Prometheus metrics: one registry per replica (`kvfleet-metrics`, the
//! same plumbing as the agent's).
//!
//! At start each module registers what it measures into the registry (the HTTP API its
//! request counts and latencies, the agent protocol its heartbeats and registrations, the KV
//! index its ingest counters and sizes, the store its database errors and pool, the leader its
//! role and loop passes, [`fleet_gauges`](crate::fleet_gauges) the inventory and SLA targets),
//! then the registry is frozen into a [`Telemetry`] that `GET /metrics` encodes in the
//! Prometheus text format (version 0.0.4, what `promtool check metrics` reads) without knowing
//! who registered what. Every name starts with `kvfleet_cp_`; every metric has HELP text.
//!
//! Figures that already live elsewhere (the KV index's counters, the pool's connections, the
//! inventory) are read at scrape time by a [`collector`] instead of being copied into a second
//! set of counters.

use std::sync::Arc;

pub use kvfleet_metrics::{
    CONTENT_TYPE, LatencyFamily, Registry, Scrape, collector, latency_family,
};
use prometheus_client::metrics::info::Info;

/// A fresh registry with what belongs to no module (the build).
pub fn registry() -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "kvfleet_cp_build",
        "The running control plane's version (the value is always 1)",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    registry
}

/// The frozen registry every module registered into; cheap to clone.
#[derive(Debug, Clone)]
pub struct Telemetry(Arc<Registry>);

impl Telemetry {
    /// Freezes `registry`: nothing registers after this.
    pub fn new(registry: Registry) -> Self {
        Self(Arc::new(registry))
    }

    /// Every registered metric in the Prometheus text format.
    pub fn encode(&self) -> String {
        kvfleet_metrics::encode(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    use super::*;

    #[test]
    fn registered_and_collected_metrics_come_out_as_prometheus_text_with_help() {
        let mut registry = registry();
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "kvfleet_cp_test_requests",
            "Requests by route",
            requests.clone(),
        );
        registry.register_collector(collector("test", |s| {
            s.counters(
                "kvfleet_cp_test_events",
                "Events by outcome",
                [([("outcome", "applied")], 3), ([("outcome", "gap")], 1)],
            )?;
            s.gauge("kvfleet_cp_test_head", "The head", 7u64)
        }));
        requests
            .get_or_create(&vec![("route".into(), "/x".into())])
            .inc();
        let text = Telemetry::new(registry).encode();
        for line in [
            "# HELP kvfleet_cp_test_requests_total Requests by route.",
            "# TYPE kvfleet_cp_test_requests_total counter",
            "kvfleet_cp_test_requests_total{route=\"/x\"} 1",
            "# HELP kvfleet_cp_test_events_total Events by outcome.",
            "kvfleet_cp_test_events_total{outcome=\"applied\"} 3",
            "kvfleet_cp_test_events_total{outcome=\"gap\"} 1",
            "# TYPE kvfleet_cp_test_head gauge",
            "kvfleet_cp_test_head 7",
            "kvfleet_cp_build_info{version=\"",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"), "0.0.4 text, not OpenMetrics");
    }
}
