//! The control plane's Prometheus metrics: one `prometheus-client` [`Registry`] per replica.
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
//! inventory) are read at scrape time by a [`Collector`](prometheus_client::collector::Collector)
//! instead of being copied into a second set of counters; [`encode_counters`] and
//! [`encode_gauges`] write such a family.

use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The `Content-Type` of what [`Telemetry::encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Bucket bounds for request and pass latencies: 1 ms to about 33 s, doubling.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16)
}

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
        let mut out = String::with_capacity(16 << 10);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.0);
        out
    }
}

/// Writes one counter family read at scrape time: `name` (`_total` is appended), `help`
/// (a full sentence), one sample per label set.
pub fn encode_counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    encode_family(
        encoder,
        name,
        help,
        MetricType::Counter,
        samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v))),
    )
}

/// Writes one gauge family read at scrape time (see [`encode_counters`]).
pub fn encode_gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, f64)>,
) -> Result<(), std::fmt::Error> {
    encode_family(
        encoder,
        name,
        help,
        MetricType::Gauge,
        samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v))),
    )
}

fn encode_family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl Iterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// An unlabelled sample's label set, for [`encode_counters`] and [`encode_gauges`].
pub type NoLabels = [(&'static str, &'static str); 0];

#[cfg(test)]
mod tests {
    use prometheus_client::collector::Collector;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            encode_counters(
                &mut encoder,
                "kvfleet_cp_test_events",
                "Events by outcome.",
                [([("outcome", "applied")], 3), ([("outcome", "gap")], 1)],
            )?;
            encode_gauges(
                &mut encoder,
                "kvfleet_cp_test_head",
                "The head.",
                [(NoLabels::default(), 7.0)],
            )
        }
    }

    #[test]
    fn registered_and_collected_metrics_come_out_as_prometheus_text_with_help() {
        let mut registry = registry();
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "kvfleet_cp_test_requests",
            "Requests by route",
            requests.clone(),
        );
        registry.register_collector(Box::new(Fixed));
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
            "kvfleet_cp_test_head 7.0",
            "kvfleet_cp_build_info{version=",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"), "0.0.4 text, not OpenMetrics");
    }
}
