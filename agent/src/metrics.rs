//! The agent's Prometheus metrics, written in the text exposition format by hand: a few
//! histograms and counters do not need a metrics framework.
//!
//! Recording is lock-free (atomics) except for the per-status request counter (a small mutexed
//! map, touched once per request).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::backend::{WorkerState, WorkerStatus};
use crate::gpu::Snapshot;

/// A histogram with fixed bucket bounds, in seconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// Bounds for latencies from sub-millisecond to a minute.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Everything the frontend records.
#[derive(Debug)]
pub struct Metrics {
    /// Time to first token.
    pub ttft: Histogram,
    /// Time between streamed tokens.
    pub itl: Histogram,
    /// Request start to last byte.
    pub e2e: Histogram,
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Prompt tokens accepted.
    pub tokens_in: AtomicU64,
    /// Tokens generated.
    pub tokens_out: AtomicU64,
    /// Requests waiting for an in-flight slot.
    pub queue_depth: AtomicI64,
    /// Requests generating.
    pub in_flight: AtomicI64,
    /// Generations cancelled because the client went away.
    pub cancelled: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            ttft: Histogram::new(LATENCY_BUCKETS),
            itl: Histogram::new(LATENCY_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
            requests: Mutex::new(BTreeMap::new()),
            tokens_in: AtomicU64::new(0),
            tokens_out: AtomicU64::new(0),
            queue_depth: AtomicI64::new(0),
            in_flight: AtomicI64::new(0),
            cancelled: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts a finished request by endpoint and HTTP status.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry((endpoint, status)).or_insert(0) += 1;
        }
    }

    /// Requests counted for `endpoint` with `status`.
    pub fn requests_with(&self, endpoint: &'static str, status: u16) -> u64 {
        self.requests
            .lock()
            .map(|map| map.get(&(endpoint, status)).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The whole exposition.
    pub fn render(&self, workers: &[WorkerStatus], gpus: Option<&Snapshot>) -> String {
        let mut out = String::with_capacity(8192);
        self.ttft.render(
            &mut out,
            "kvfleet_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
        );
        self.itl.render(
            &mut out,
            "kvfleet_inter_token_latency_seconds",
            "Time between consecutive streamed tokens.",
        );
        self.e2e.render(
            &mut out,
            "kvfleet_request_duration_seconds",
            "Time from request arrival to the end of the response.",
        );
        let _ = writeln!(
            out,
            "# HELP kvfleet_requests_total Requests by endpoint and HTTP status.\n\
             # TYPE kvfleet_requests_total counter"
        );
        if let Ok(map) = self.requests.lock() {
            for ((endpoint, status), count) in map.iter() {
                let _ = writeln!(
                    out,
                    "kvfleet_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {count}"
                );
            }
        }
        let counters = [
            (
                "kvfleet_prompt_tokens_total",
                "Prompt tokens of accepted requests.",
                self.tokens_in.load(Ordering::Relaxed),
            ),
            (
                "kvfleet_generated_tokens_total",
                "Tokens generated.",
                self.tokens_out.load(Ordering::Relaxed),
            ),
            (
                "kvfleet_cancelled_requests_total",
                "Generations cancelled because the client disconnected.",
                self.cancelled.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            write_metric(&mut out, "counter", name, help, value);
        }
        let gauges = [
            (
                "kvfleet_queue_depth",
                "Requests waiting for an in-flight slot.",
                self.queue_depth.load(Ordering::Relaxed),
            ),
            (
                "kvfleet_requests_in_flight",
                "Requests generating.",
                self.in_flight.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            write_metric(&mut out, "gauge", name, help, value);
        }
        render_workers(&mut out, workers);
        if let Some(gpus) = gpus {
            render_gpus(&mut out, gpus);
        }
        out
    }
}

/// Writes one unlabelled sample with its family's `# HELP` and `# TYPE` (`counter`, `gauge`).
pub(crate) fn write_metric(
    out: &mut String,
    kind: &str,
    name: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

fn render_workers(out: &mut String, workers: &[WorkerStatus]) {
    type Field = fn(&WorkerStatus) -> f64;
    let families: [(&str, &str, Field); 9] = [
        (
            "kvfleet_worker_prefill_tokens_pending",
            "Prompt tokens admitted or waiting and not yet computed (the prefill queue), per worker.",
            |w| w.prefill_tokens as f64,
        ),
        (
            "kvfleet_worker_waiting_requests",
            "Requests waiting for admission into the worker's batch.",
            |w| f64::from(w.waiting),
        ),
        (
            "kvfleet_worker_prefix_query_tokens_total",
            "Prompt tokens looked up in the worker's prefix cache since its process started.",
            |w| w.prefix_query_tokens as f64,
        ),
        (
            "kvfleet_worker_prefix_hit_tokens_total",
            "Prompt tokens found in the worker's prefix cache (not recomputed) since its process started.",
            |w| w.prefix_hit_tokens as f64,
        ),
        (
            "kvfleet_worker_kv_blocks_used",
            "KV blocks in use, per worker.",
            |w| w.kv_blocks_used as f64,
        ),
        (
            "kvfleet_worker_kv_blocks_total",
            "KV blocks in the pool, per worker.",
            |w| w.kv_blocks_total as f64,
        ),
        (
            "kvfleet_worker_outstanding_requests",
            "Requests sent to the worker and not finished.",
            |w| w.outstanding as f64,
        ),
        (
            "kvfleet_worker_starts_total",
            "Times the worker process was started.",
            |w| w.starts as f64,
        ),
        ("kvfleet_worker_ready", "1 when the worker is ready.", |w| {
            f64::from(u8::from(w.state == WorkerState::Ready))
        }),
    ];
    for (name, help, field) in families {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for w in workers {
            let _ = writeln!(
                out,
                "{name}{{worker=\"{}\",model=\"{}\",device=\"{}\",role=\"{}\"}} {}",
                w.id,
                w.model,
                w.device,
                w.role,
                field(w)
            );
        }
    }
}

fn render_gpus(out: &mut String, snapshot: &Snapshot) {
    type Field = fn(&crate::gpu::GpuInfo) -> Option<f64>;
    let families: [(&str, &str, Field); 5] = [
        ("kvfleet_gpu_memory_used_bytes", "GPU memory in use.", |g| {
            Some(g.memory_used_bytes as f64)
        }),
        (
            "kvfleet_gpu_memory_total_bytes",
            "GPU memory installed.",
            |g| Some(g.memory_total_bytes as f64),
        ),
        (
            "kvfleet_gpu_utilization_ratio",
            "GPU busy fraction over the driver's last sample.",
            |g| g.utilization_percent.map(|u| f64::from(u) / 100.0),
        ),
        (
            "kvfleet_gpu_temperature_celsius",
            "GPU die temperature.",
            |g| g.temperature_c.map(f64::from),
        ),
        ("kvfleet_gpu_power_watts", "GPU power draw.", |g| {
            g.power_mw.map(|p| f64::from(p) / 1000.0)
        }),
    ];
    for (name, help, field) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for gpu in &snapshot.gpus {
            if let Some(value) = field(gpu) {
                let _ = writeln!(
                    out,
                    "{name}{{gpu=\"{}\",uuid=\"{}\"}} {value}",
                    gpu.index, gpu.uuid
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.01, 0.1]);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(3));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.01\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
        assert!(out.contains("x_sum 3.055\n"), "{out}");
    }

    #[test]
    fn exposition_has_requests_workers_and_gpus() {
        let m = Metrics::default();
        m.request("chat", 200);
        m.request("chat", 200);
        m.request("chat", 429);
        let gpus = crate::gpu::FakeInventory::gpus(1).snapshot;
        let out = m.render(&[], Some(&gpus));
        assert!(out.contains("kvfleet_requests_total{endpoint=\"chat\",status=\"200\"} 2"));
        assert!(out.contains("kvfleet_requests_total{endpoint=\"chat\",status=\"429\"} 1"));
        assert!(out.contains("kvfleet_gpu_power_watts{gpu=\"0\""), "{out}");
    }
}
