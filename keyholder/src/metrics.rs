//! Prometheus metrics of one server: traffic by route and status, refusals, egress and upstream,
//! and the store's group commit. Served as OpenMetrics text on a separate listener (see
//! [`crate::app`]) only when `--metrics-listen` is set; never labelled by raw path, query or secret.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::storage::sqlite::CommitObserver;

/// Labels of an answered request: the registered route pattern (never the raw path, so the set
/// is bounded; `unmatched` for anything else), a method from a small fixed set and the status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route pattern such as `/v1/store`, or `unmatched`.
    pub route: String,
    /// `GET`, `HEAD`, `POST`, `OPTIONS` or `other`.
    pub method: &'static str,
    /// HTTP status code.
    pub status: u16,
}

/// Labels of a latency histogram: the route only.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route pattern such as `/v1/store`, or `unmatched`.
    pub route: String,
}

/// A custody-policy decision: the rule (never a value) and the outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// `none` when allowed, else the refusing rule (`delivery`, `hours`, `client_ip`, `rate`, ...).
    pub rule: &'static str,
    /// `allowed` or `refused`.
    pub outcome: &'static str,
}

/// What was replayed.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplayLabels {
    /// `request_id` (signed platform call) or `nonce` (ticket).
    pub kind: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the server keeps, and the registry that encodes them.
///
/// The plain counters keep the names call sites used before Prometheus (`state.metrics.x.inc()`).
pub struct Metrics {
    registry: Registry,
    /// Requests answered (all routes).
    pub requests: Counter,
    /// Responses with a 5xx status.
    pub server_errors: Counter,
    /// Platform signatures refused.
    pub signature_failures: Counter,
    /// Tickets refused (signature, expiry, scope).
    pub ticket_failures: Counter,
    /// Replayed request ids or nonces refused (both kinds; see [`Metrics::replay_refused`]).
    pub replays: Counter,
    /// Replays by kind.
    pub replays_by_kind: Family<ReplayLabels, Counter>,
    /// Custody-policy decisions by rule and outcome.
    pub policy_decisions: Family<PolicyLabels, Counter>,
    /// Outbound calls refused by the egress policy.
    pub egress_denials: Counter,
    /// Proxied upstream calls that got an answer.
    pub upstream_calls: Counter,
    /// Injected credentials redacted from proxied answers (an upstream echoed them).
    pub credential_redactions: Counter,
    /// Outbound calls (proxied, OAuth refresh, token minting) that failed (connection, TLS,
    /// timeout, too large, a stream cut after its head) or were answered with a 5xx; counted by
    /// [`crate::upstream::Upstream`].
    pub upstream_errors: Counter,
    /// Outbound call latency until the answer (its head, for a streamed one) or the failure,
    /// seconds.
    pub upstream_duration: Histogram,
    /// Requests by route, method and status.
    pub http_requests: Family<RequestLabels, Counter>,
    /// Request latency by route, seconds.
    pub http_duration: Family<RouteLabels, Histogram>,
    /// Group-commit latency (transaction and fsync), seconds.
    pub db_commit_duration: Histogram,
    /// Jobs folded into one group commit.
    pub db_commit_batch_size: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("requests", &self.requests.get())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `keyholder_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keyholder");
        let m = Metrics {
            registry: Registry::default(),
            requests: Counter::default(),
            server_errors: Counter::default(),
            signature_failures: Counter::default(),
            ticket_failures: Counter::default(),
            replays: Counter::default(),
            replays_by_kind: Family::default(),
            policy_decisions: Family::default(),
            egress_denials: Counter::default(),
            upstream_calls: Counter::default(),
            credential_redactions: Counter::default(),
            upstream_errors: Counter::default(),
            upstream_duration: latency_histogram(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency_histogram),
            db_commit_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            db_commit_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
        };
        registry.register(
            "policy_decisions",
            "Custody-policy decisions, by refusing rule and outcome",
            m.policy_decisions.clone(),
        );
        registry.register(
            "http_requests",
            "Requests answered, by route, method and status",
            m.http_requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time to answer a request, by route",
            Unit::Seconds,
            m.http_duration.clone(),
        );
        registry.register(
            "http_server_errors",
            "Responses with a 5xx status",
            m.server_errors.clone(),
        );
        registry.register(
            "signature_failures",
            "Signed platform requests refused (headers, timestamp window, HMAC)",
            m.signature_failures.clone(),
        );
        registry.register(
            "ticket_failures",
            "Tickets refused (malformed, forged, expired, lifetime, scope)",
            m.ticket_failures.clone(),
        );
        registry.register(
            "replay_refusals",
            "Replayed platform request ids, request signatures and nonces refused, by kind",
            m.replays_by_kind.clone(),
        );
        registry.register(
            "egress_denials",
            "Upstream calls refused by the egress policy",
            m.egress_denials.clone(),
        );
        registry.register(
            "upstream_calls",
            "Proxied upstream calls that got an answer",
            m.upstream_calls.clone(),
        );
        registry.register(
            "credential_redactions",
            "Injected credentials redacted from proxied answers (the upstream echoed them)",
            m.credential_redactions.clone(),
        );
        registry.register(
            "upstream_errors",
            "Outbound calls that failed (timeout, connection, TLS, size) or answered 5xx",
            m.upstream_errors.clone(),
        );
        registry.register_with_unit(
            "upstream_duration",
            "Outbound call latency until the answer head or the failure",
            Unit::Seconds,
            m.upstream_duration.clone(),
        );
        registry.register_with_unit(
            "db_commit_duration",
            "Group-commit latency of the database writer (including fsync)",
            Unit::Seconds,
            m.db_commit_duration.clone(),
        );
        registry.register(
            "db_commit_batch_size",
            "Write jobs folded into one group commit",
            m.db_commit_batch_size.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a replay refusal of `kind` (`request_id`, `signature`, `nonce` or `envelope_nonce`).
    pub fn replay_refused(&self, kind: &'static str) {
        self.replays.inc();
        self.replays_by_kind
            .get_or_create(&ReplayLabels { kind })
            .inc();
    }

    /// Counts a custody-policy decision.
    pub fn policy_decision(&self, rule: &'static str, outcome: &'static str) {
        self.policy_decisions
            .get_or_create(&PolicyLabels { rule, outcome })
            .inc();
    }

    /// Records an upstream call's latency (successful or not).
    pub fn observe_upstream(&self, elapsed: Duration) {
        self.upstream_duration.observe(elapsed.as_secs_f64());
    }

    /// Records an answered request under a fixed route name.
    pub fn observe_request(
        &self,
        route: &str,
        method: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        self.requests.inc();
        if status >= 500 {
            self.server_errors.inc();
        }
        self.http_requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                method,
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %err, "metrics encoding failed");
        }
        text
    }

    /// A commit observer for the store's writer, feeding the `db_commit_*` metrics.
    pub fn commit_observer(self: &Arc<Self>) -> Arc<dyn CommitObserver> {
        Arc::new(StoreMetrics(Arc::clone(self)))
    }
}

struct StoreMetrics(Arc<Metrics>);

impl CommitObserver for StoreMetrics {
    fn observe_commit(&self, elapsed: Duration, jobs: usize) {
        self.0.db_commit_duration.observe(elapsed.as_secs_f64());
        self.0.db_commit_batch_size.observe(jobs as f64);
    }
}

/// The fixed label for an HTTP method (bounded cardinality).
pub fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
