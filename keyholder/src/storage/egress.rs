//! The owner's egress policies per service, the pins calls make under them, and the refusals the
//! owner may allow.

use async_trait::async_trait;

use super::StorageResult;

/// A service's stored policy row (pins apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRow {
    /// The service.
    pub service: String,
    /// The mode's stored spelling (`known`, `pinned`, `allowlist`, `any`).
    pub mode: String,
    /// The owner's entries.
    pub allowlist: Vec<String>,
    /// The pinned OAuth token URL.
    pub token_url: Option<String>,
}

/// One pin: the origin a credential's first call went to (pinned mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinRow {
    /// The origin.
    pub origin: String,
    /// Unix time it was pinned.
    pub pinned_at: i64,
    /// Keyed fingerprint of the credential it belongs to.
    pub credential: String,
}

/// One recorded refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalRow {
    /// The service.
    pub service: String,
    /// The refused origin.
    pub origin: String,
    /// Refusals counted.
    pub count: i64,
    /// Unix time of the last one.
    pub last_at: i64,
}

/// The egress repository. The owner's policy edits go through [`super::ChangeSet`].
#[async_trait]
pub trait EgressStore: Send + Sync {
    /// A service's policy row (`None`: the default) and its pins, newest first, in one snapshot.
    async fn egress_policy(&self, service: &str)
        -> StorageResult<(Option<EgressRow>, Vec<PinRow>)>;

    /// Every service with a stored policy, by name.
    async fn egress_services(&self) -> StorageResult<Vec<String>>;

    /// Pins `origin` for `credential` if the service is in pinned mode, a credential is stored,
    /// and fewer than `max_pins` exist; true when `origin` is now that credential's pin.
    async fn claim_pin(
        &self,
        service: &str,
        credential: &str,
        origin: &str,
        now: i64,
        max_pins: i64,
    ) -> StorageResult<bool>;

    /// Removes one pin if it is still `origin` (a call that failed without an answer).
    async fn release_pin(&self, service: &str, credential: &str, origin: &str)
        -> StorageResult<()>;

    /// Pins the service's token URL if none is pinned; returns (claimed now, the pinned URL).
    async fn claim_token_url(
        &self,
        service: &str,
        token_url: &str,
        now: i64,
    ) -> StorageResult<(bool, Option<String>)>;

    /// Unpins the token URL if it is still `token_url`.
    async fn release_token_url(&self, service: &str, token_url: &str) -> StorageResult<()>;

    /// Counts a refusal (a new origin only while fewer than `max_pending` are recorded).
    async fn record_refusal(
        &self,
        service: &str,
        origin: &str,
        now: i64,
        max_pending: i64,
    ) -> StorageResult<()>;

    /// Every recorded refusal, most recent first.
    async fn refusals(&self) -> StorageResult<Vec<RefusalRow>>;
}
