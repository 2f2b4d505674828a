//! The Prometheus plumbing the agent and the control plane share: each process builds one
//! [`Registry`] (the `prometheus-client` crate) that every module registers into while the
//! process is built, and serves [`encode`]'s Prometheus text (0.0.4, what `promtool check
//! metrics` reads) on `/metrics` without knowing who registered what.
//!
//! A module that counts as it goes registers `prometheus-client` families (counters, gauges,
//! histograms) and keeps the handles; a module whose figures live in its own state (a worker
//! pool, a router, an index, a database pool) registers a [`collector`] that reads that state at
//! scrape time and writes whole families through [`Scrape`].
//!
//! Names: counters are registered without their `_total` suffix (the encoder adds it), and help
//! texts without their final full stop (the registry, and [`Scrape`], add it). Latency
//! histograms share the bounds of [`LATENCY_BUCKETS_SECONDS`], so any two of them (frontend,
//! worker, another node) add up bucket by bucket.

use std::collections::HashMap;
use std::fmt;

pub use kvfleet_proto::histogram::LATENCY_BUCKETS_SECONDS;
use kvfleet_proto::histogram::LatencyHistogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A latency histogram (seconds) over [`LATENCY_BUCKETS_SECONDS`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_SECONDS)
}

/// A family of latency histograms, one per label set.
pub type LatencyFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// An empty [`LatencyFamily`].
pub fn latency_family<L: Clone + std::hash::Hash + Eq>() -> LatencyFamily<L> {
    Family::new_with_constructor(latency_histogram)
}

/// The whole exposition of `registry`, Prometheus text format 0.0.4.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding the metrics failed part way");
    }
    out
}

/// A [`Collector`] that writes its families from `write` at every scrape.
pub fn collector<F>(what: &'static str, write: F) -> Box<dyn Collector>
where
    F: Fn(&mut Scrape<'_>) -> fmt::Result + Send + Sync + 'static,
{
    Box::new(FnCollector { what, write })
}

struct FnCollector<F> {
    what: &'static str,
    write: F,
}

impl<F> fmt::Debug for FnCollector<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collector")
            .field("what", &self.what)
            .finish()
    }
}

impl<F> Collector for FnCollector<F>
where
    F: Fn(&mut Scrape<'_>) -> fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
        (self.write)(&mut Scrape { encoder })
    }
}

/// `help` as the registry writes it: one sentence with its full stop.
fn sentence(help: &str) -> String {
    format!("{help}.")
}

/// What a [`collector`] writes into: whole families, each with its help text.
#[derive(Debug)]
pub struct Scrape<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl Scrape<'_> {
    /// One unlabelled gauge.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl EncodeGaugeValue) -> fmt::Result {
        self.encoder
            .encode_descriptor(name, &sentence(help), None, MetricType::Gauge)?
            .encode_gauge(&value)
    }

    /// One unlabelled counter (`name` without `_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let counter = ConstCounter::new(value);
        let encoder =
            self.encoder
                .encode_descriptor(name, &sentence(help), None, counter.metric_type())?;
        counter.encode(encoder)
    }

    /// One unlabelled counter of seconds (`name` without `_total`).
    pub fn counter_seconds(&mut self, name: &str, help: &str, value: f64) -> fmt::Result {
        let counter = ConstCounter::new(value);
        let encoder =
            self.encoder
                .encode_descriptor(name, &sentence(help), None, counter.metric_type())?;
        counter.encode(encoder)
    }

    /// A gauge family: one sample per `(labels, value)`.
    pub fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) -> fmt::Result {
        let mut family =
            self.encoder
                .encode_descriptor(name, &sentence(help), None, MetricType::Gauge)?;
        for (labels, value) in samples {
            family.encode_family(&labels)?.encode_gauge(&value)?;
        }
        Ok(())
    }

    /// A counter family (`name` without `_total`): one sample per `(labels, value)`.
    pub fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let mut family =
            self.encoder
                .encode_descriptor(name, &sentence(help), None, MetricType::Counter)?;
        for (labels, value) in samples {
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A histogram family from histograms counted elsewhere (worker processes): one sample
    /// per `(labels, histogram)`.
    pub fn histograms<'h, L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, &'h LatencyHistogram)>,
    ) -> fmt::Result {
        let mut family =
            self.encoder
                .encode_descriptor(name, &sentence(help), None, MetricType::Histogram)?;
        let bounds = LATENCY_BUCKETS_SECONDS
            .iter()
            .copied()
            .chain([f64::INFINITY]);
        for (labels, histogram) in samples {
            let buckets: Vec<(f64, u64)> = bounds
                .clone()
                .zip(histogram.counts().iter().copied())
                .collect();
            family.encode_family(&labels)?.encode_histogram(
                histogram.sum_seconds(),
                histogram.count(),
                &buckets,
                None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn families_and_collectors_encode_with_help_and_type() {
        let mut registry = Registry::default();
        let requests = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register("kvfleet_things", "Things done", requests.clone());
        requests.get_or_create(&[("kind", "a")]).inc_by(2);
        let latency = latency_histogram();
        registry.register("kvfleet_wait_seconds", "Waits", latency.clone());
        latency.observe(0.004);
        latency.observe(3.0);
        registry.register_collector(collector("test", |s| {
            s.gauge("kvfleet_level", "A level", 7u64)?;
            s.counters("kvfleet_events", "Events", [([("what", "x")], 3)])?;
            let mut remote = LatencyHistogram::default();
            remote.observe_seconds(0.0005);
            remote.observe_seconds(100.0);
            s.histograms(
                "kvfleet_remote_seconds",
                "Remote waits",
                [([("worker", "w1")], &remote)],
            )
        }));
        let text = encode(&registry);
        for line in [
            "# HELP kvfleet_things_total Things done.",
            "# TYPE kvfleet_things_total counter",
            "kvfleet_things_total{kind=\"a\"} 2",
            "# TYPE kvfleet_wait_seconds histogram",
            "kvfleet_wait_seconds_bucket{le=\"0.003\"} 0",
            "kvfleet_wait_seconds_bucket{le=\"0.004\"} 1",
            "kvfleet_wait_seconds_bucket{le=\"+Inf\"} 2",
            "kvfleet_wait_seconds_count 2",
            "# HELP kvfleet_level A level.",
            "kvfleet_level 7",
            "kvfleet_events_total{what=\"x\"} 3",
            "kvfleet_remote_seconds_bucket{worker=\"w1\",le=\"0.001\"} 1",
            "kvfleet_remote_seconds_bucket{worker=\"w1\",le=\"60\"} 1",
            "kvfleet_remote_seconds_bucket{worker=\"w1\",le=\"+Inf\"} 2",
            "kvfleet_remote_seconds_count{worker=\"w1\"} 2",
            "kvfleet_remote_seconds_sum{worker=\"w1\"} 100.0005",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
