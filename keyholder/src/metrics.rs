//! Process-wide counters of refusals and traffic, read by the metrics endpoint and the benchmark.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters kept by the server.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests answered.
    pub requests: Counter,
    /// Responses with a 5xx status.
    pub server_errors: Counter,
    /// Platform signatures refused.
    pub signature_failures: Counter,
    /// Tickets refused (signature, expiry, scope).
    pub ticket_failures: Counter,
    /// Replayed request ids or nonces refused.
    pub replays: Counter,
    /// Outbound calls refused by the egress guard or policy.
    pub egress_denials: Counter,
    /// Proxied upstream calls that got an answer.
    pub upstream_calls: Counter,
}
