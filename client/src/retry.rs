//! The retry policy: the platform's own (5xx and timeouts, twice, after 1 s then 3 s; never 4xx), with
//! configurable delays so that tests need not sleep.

use std::time::Duration;

/// How often and after which pauses a failed attempt is repeated.
///
/// Signed platform calls are retried on a 5xx answer, a timeout or a transport failure. Calls that carry a
/// single-use value (a ticket or a bind code) are retried only when the connection failed before anything
/// was sent: a second attempt after the webhook saw the first would only be refused as a replay.
///
/// ```
/// use std::time::Duration;
/// use keyholder_client::RetryPolicy;
/// assert_eq!(RetryPolicy::platform().delays(), [Duration::from_secs(1), Duration::from_secs(3)]);
/// assert!(RetryPolicy::none().delays().is_empty());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    delays: Vec<Duration>,
}

impl RetryPolicy {
    /// The platform's policy: two retries, after 1 s then 3 s.
    pub fn platform() -> Self {
        RetryPolicy {
            delays: vec![Duration::from_secs(1), Duration::from_secs(3)],
        }
    }

    /// No retries.
    pub fn none() -> Self {
        RetryPolicy { delays: Vec::new() }
    }

    /// One retry per delay, in order.
    pub fn with_delays(delays: impl IntoIterator<Item = Duration>) -> Self {
        RetryPolicy {
            delays: delays.into_iter().collect(),
        }
    }

    /// The pause before each retry.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::platform()
    }
}

/// What kind of call is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idempotence {
    /// Every attempt is new (fresh request id and timestamp): retry 5xx, timeouts and transport errors.
    FreshPerAttempt,
    /// The call carries a single-use value: retry only connection failures.
    SingleUse,
}
