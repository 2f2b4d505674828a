//! What the frontend measures, registered into the agent's registry: requests by endpoint and
//! status, tokens in and out, cancellations, the admission queue, and the latencies a client
//! sees — unlabelled (the original families) and per model and role (the planner's).
//!
//! `role` is the role of the worker that produced the request's first token (`aggregated`,
//! `prefill` for a disaggregated request whose prefill leg answered, `decode` otherwise).

use std::time::Duration;

use kvfleet_proto::api::WorkerRole;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics::{LatencyFamily, Registry, latency_family, latency_histogram};

/// `{endpoint, status}` of `kvfleet_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    status: u16,
}

/// `{reason}` of `kvfleet_frontend_headerless_cut_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CutReason {
    /// `header_timeout`, `per_ip` or `pressure`.
    pub reason: &'static str,
}

/// `{model, role}` of the per-model latency histograms.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ModelRole {
    /// The model's name.
    pub model: String,
    /// The role of the worker that produced the first token.
    pub role: &'static str,
}

impl ModelRole {
    /// The labels of a request for `model` whose first token came from a `role` worker.
    pub fn new(model: &str, role: WorkerRole) -> Self {
        Self {
            model: model.to_owned(),
            role: role.as_str(),
        }
    }
}

/// The frontend's families (clones share their values with the registry).
#[derive(Debug, Clone)]
pub struct FrontendMetrics {
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    requests: Family<RequestLabels, Counter>,
    /// Prompt tokens accepted.
    pub tokens_in: Counter,
    /// Tokens generated.
    pub tokens_out: Counter,
    /// Generations cancelled because the client went away.
    pub cancelled: Counter,
    /// Requests waiting for an in-flight slot.
    pub queue_depth: Gauge,
    /// Requests generating.
    pub in_flight: Gauge,
    /// Connections cut before their first request head arrived, by reason (`conn.rs`).
    pub headerless_cut: Family<CutReason, Counter>,
    request_ttft: LatencyFamily<ModelRole>,
    request_itl: LatencyFamily<ModelRole>,
    request_queue: LatencyFamily<ModelRole>,
    request_e2e: LatencyFamily<ModelRole>,
}

impl Default for FrontendMetrics {
    fn default() -> Self {
        Self {
            ttft: latency_histogram(),
            itl: latency_histogram(),
            e2e: latency_histogram(),
            requests: Family::default(),
            tokens_in: Counter::default(),
            tokens_out: Counter::default(),
            cancelled: Counter::default(),
            queue_depth: Gauge::default(),
            in_flight: Gauge::default(),
            headerless_cut: Family::default(),
            request_ttft: latency_family(),
            request_itl: latency_family(),
            request_queue: latency_family(),
            request_e2e: latency_family(),
        }
    }
}

impl FrontendMetrics {
    /// New families, registered into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "kvfleet_time_to_first_token_seconds",
            "Time from request arrival to the first generated token",
            m.ttft.clone(),
        );
        registry.register(
            "kvfleet_inter_token_latency_seconds",
            "Time between consecutive streamed tokens",
            m.itl.clone(),
        );
        registry.register(
            "kvfleet_request_duration_seconds",
            "Time from request arrival to the end of the response",
            m.e2e.clone(),
        );
        registry.register(
            "kvfleet_requests",
            "Requests by endpoint and HTTP status",
            m.requests.clone(),
        );
        registry.register(
            "kvfleet_prompt_tokens",
            "Prompt tokens of accepted requests",
            m.tokens_in.clone(),
        );
        registry.register(
            "kvfleet_generated_tokens",
            "Tokens generated",
            m.tokens_out.clone(),
        );
        registry.register(
            "kvfleet_cancelled_requests",
            "Generations cancelled because the client disconnected",
            m.cancelled.clone(),
        );
        registry.register(
            "kvfleet_queue_depth",
            "Requests waiting for an in-flight slot",
            m.queue_depth.clone(),
        );
        registry.register(
            "kvfleet_requests_in_flight",
            "Requests generating",
            m.in_flight.clone(),
        );
        registry.register(
            "kvfleet_frontend_headerless_cut",
            "Connections the frontend cut before their first request head arrived (slow loris), \
             by reason: header_timeout, per_ip (the client IP held too many), pressure (too many \
             headerless connections: the oldest went first)",
            m.headerless_cut.clone(),
        );
        registry.register(
            "kvfleet_request_ttft_seconds",
            "Time to first token as the client sees it, by model and the role of the worker \
             that produced the first token",
            m.request_ttft.clone(),
        );
        registry.register(
            "kvfleet_request_itl_seconds",
            "Time between consecutive tokens as the client sees them, by model and role",
            m.request_itl.clone(),
        );
        registry.register(
            "kvfleet_request_queue_seconds",
            "Time a request waited for admission before it was handed to a worker, by model \
             and role",
            m.request_queue.clone(),
        );
        registry.register(
            "kvfleet_request_e2e_seconds",
            "Time from request arrival to the end of the response, by model and role",
            m.request_e2e.clone(),
        );
        m
    }

    /// Counts a finished request by endpoint and HTTP status.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, status })
            .inc();
    }

    /// The histograms one request observes, once its first token named the role.
    pub fn for_request(&self, labels: &ModelRole) -> RequestLatencies {
        RequestLatencies {
            itl: (
                self.itl.clone(),
                self.request_itl.get_or_create_owned(labels),
            ),
            e2e: (
                self.e2e.clone(),
                self.request_e2e.get_or_create_owned(labels),
            ),
        }
    }

    /// Records a request's first token: its time to first token and its wait for admission.
    pub fn first_token(&self, labels: &ModelRole, ttft: Duration, queued: Duration) {
        self.ttft.observe(ttft.as_secs_f64());
        self.request_ttft
            .get_or_create(labels)
            .observe(ttft.as_secs_f64());
        self.request_queue
            .get_or_create(labels)
            .observe(queued.as_secs_f64());
    }
}

/// One request's inter-token and end-to-end histograms (unlabelled and by model and role),
/// looked up once.
#[derive(Debug, Clone)]
pub struct RequestLatencies {
    itl: (Histogram, Histogram),
    e2e: (Histogram, Histogram),
}

impl RequestLatencies {
    /// The time since the previous token.
    pub fn inter_token(&self, gap: Duration) {
        self.itl.0.observe(gap.as_secs_f64());
        self.itl.1.observe(gap.as_secs_f64());
    }

    /// The whole request, arrival to last byte.
    pub fn end_to_end(&self, total: Duration) {
        self.e2e.0.observe(total.as_secs_f64());
        self.e2e.1.observe(total.as_secs_f64());
    }
}
