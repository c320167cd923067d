//! The owner's custody policies, their attachments, the durable usage counts of their caps, and
//! the uses waiting for the owner's approval.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::{StorageError, StorageResult};

/// One use under usage caps, as taken at admission where counts are shared: each counter the use
/// counts against, with its cap.
pub type CappedUse = Vec<(UsageCounter, u64)>;

/// Increments gathered by the domain, taken by the engine at the moment it writes them.
pub type UsageTake = Box<dyn FnOnce() -> Vec<(UsageCounter, u64)> + Send>;

/// A queued usage write, resolving once durable. A plain channel, not a boxed future: one is
/// made per batch of uses on the credential path.
pub struct UsageCommit {
    rx: oneshot::Receiver<StorageResult<()>>,
}

/// The sending half of a [`UsageCommit`], for engines.
pub type UsageReply = oneshot::Sender<StorageResult<()>>;

impl UsageCommit {
    /// A commit and the sender its engine answers on.
    pub fn channel() -> (UsageReply, UsageCommit) {
        let (tx, rx) = oneshot::channel();
        (tx, UsageCommit { rx })
    }
}

impl Future for UsageCommit {
    type Output = StorageResult<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|received| {
            received.unwrap_or_else(|_| Err(StorageError::Unavailable("usage writer gone".into())))
        })
    }
}

/// A stored policy (rules as stored JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRow {
    /// Its name.
    pub name: String,
    /// Its rules (JSON text).
    pub rules: String,
    /// `cli` or `file`.
    pub source: String,
}

/// A stored attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentRow {
    /// The policy.
    pub policy: String,
    /// The target kind's stored spelling (`service`, `agent`, `proxy`).
    pub kind: String,
    /// The target.
    pub target: String,
    /// `cli` or `file`.
    pub source: String,
}

/// One usage counter: policy, target and period (as the domain spells them).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageCounter {
    /// The policy.
    pub policy: String,
    /// The target.
    pub target: String,
    /// The period.
    pub period: String,
}

/// Everything the policy engine loads, in one snapshot.
#[derive(Debug, Clone, Default)]
pub struct PolicySnapshot {
    /// Policies by name.
    pub policies: Vec<PolicyRow>,
    /// Attachments.
    pub attachments: Vec<AttachmentRow>,
    /// Durable counts.
    pub usage: Vec<(UsageCounter, u64)>,
}

/// A use waiting for the owner (also what `keyholder approvals --json` prints).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRow {
    /// One-time id (`apr_` and 16 hex digits).
    pub id: String,
    /// The policies asking for approval.
    pub policy: String,
    /// The service.
    pub service: String,
    /// The ticket's agent id (empty: none).
    pub agent: String,
    /// The client address (empty: unknown).
    pub client: String,
    /// The endpoint.
    pub endpoint: String,
    /// Unix seconds when it was asked.
    pub created_at: i64,
    /// Unix seconds when it is denied unless decided.
    pub expires_at: i64,
}

/// A stored decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalDecision {
    /// Approved by the owner.
    Approved,
    /// Denied by the owner.
    Denied,
    /// Nobody decided in time.
    TimedOut,
}

/// The policy repository. The owner's policy edits go through [`super::ChangeSet`].
#[async_trait]
pub trait PolicyStore: Send + Sync {
    /// Policies, attachments and counts (at start and on every owner change).
    async fn policy_snapshot(&self) -> StorageResult<PolicySnapshot>;

    /// Adds `n` to each counter, all or none, durable on return; returns each counter's count
    /// after the add, in order (so that an engine shared by replicas lets the caller see uses made
    /// elsewhere). Exact under concurrency: the engine adds in storage, never read-modify-write in
    /// memory. The domain coalesces the increments of concurrent uses into one call while one is
    /// in flight.
    async fn add_usage(&self, increments: Vec<(UsageCounter, u64)>) -> StorageResult<Vec<u64>>;

    /// Queues a write of usage increments and returns at once (no await, so it joins the group
    /// commit of whatever was queued just before, such as the request's replay marks). The engine
    /// calls `take` when it writes: increments gathered until then join the same write. All or
    /// none; exact like [`PolicyStore::add_usage`]. If the engine fails before writing, `take` is
    /// dropped uncalled and the commit resolves to the error.
    fn queue_usage(&self, take: UsageTake) -> UsageCommit;

    /// Whether other processes share these counts (several replicas on one database). Then the
    /// domain takes a capped use in storage at admission ([`PolicyStore::take_capped_uses`]):
    /// counts held in one process's memory would let each replica admit up to the cap.
    fn usage_shared(&self) -> bool {
        false
    }

    /// Takes the uses in order, each all or none: one from every counter of a use, only when each
    /// of them stays within its cap; durable on return. Per use: `None` when taken, else the index
    /// of its first counter at its cap (nothing taken for it). Exact across every process sharing
    /// the storage (the counts are read and written under the counters' row locks, taken in key
    /// order). The domain batches the uses of concurrent requests into one call.
    async fn take_capped_uses(&self, uses: Vec<CappedUse>) -> StorageResult<Vec<Option<usize>>>;

    /// Takes one use back from each counter (never below zero).
    async fn release_usage(&self, counters: Vec<UsageCounter>) -> StorageResult<()>;

    /// Durable counts of one policy: (target, period, count), ordered.
    async fn usage_of(&self, policy: &str) -> StorageResult<Vec<(String, String, u64)>>;

    /// Records a use waiting for approval with the hash of its link's token.
    async fn insert_approval(
        &self,
        approval: ApprovalRow,
        link_hash: [u8; 32],
    ) -> StorageResult<()>;

    /// Marks an undecided approval timed out; returns the decision in force afterwards.
    async fn time_out_approval(&self, id: &str, now: i64) -> StorageResult<ApprovalDecision>;

    /// The decisions of these approvals (undecided ones left out).
    async fn approval_decisions(
        &self,
        ids: &[String],
    ) -> StorageResult<Vec<(String, ApprovalDecision)>>;

    /// Undecided, unexpired approvals, oldest first.
    async fn pending_approvals(&self, now: i64) -> StorageResult<Vec<ApprovalRow>>;

    /// An undecided, unexpired approval with its link hash.
    async fn pending_approval(
        &self,
        id: &str,
        now: i64,
    ) -> StorageResult<Option<(ApprovalRow, [u8; 32])>>;

    /// Decides an undecided, unexpired approval (pruning rows expired over a day ago); false if
    /// nothing was decided. (The owner CLI decides through [`super::ChangeSet`] instead, with its
    /// audit entry and a generation bump that wakes the waiter on every replica.)
    async fn decide_approval(&self, id: &str, approve: bool, now: i64) -> StorageResult<bool>;
}

/// What [`PolicyStore::take_capped_uses`] decides, for engines: `counts` holds every named
/// counter's current count (read under its lock) and is advanced by the uses taken.
pub fn grant_capped_uses(
    uses: &[CappedUse],
    counts: &mut std::collections::HashMap<UsageCounter, u64>,
) -> Vec<Option<usize>> {
    uses.iter()
        .map(|counters| {
            // A counter named twice by one use takes two.
            let mut wanted: Vec<(&UsageCounter, u64, u64)> = Vec::with_capacity(counters.len());
            for (key, cap) in counters {
                match wanted.iter_mut().find(|(k, _, _)| *k == key) {
                    Some(w) => {
                        w.1 += 1;
                        w.2 = w.2.min(*cap);
                    }
                    None => wanted.push((key, 1, *cap)),
                }
            }
            let full = counters.iter().position(|(key, _)| {
                wanted.iter().any(|(k, n, cap)| {
                    *k == key && counts.get(key).copied().unwrap_or(0).saturating_add(*n) > *cap
                })
            });
            if full.is_none() {
                for (key, n, _) in wanted {
                    *counts.entry(key.clone()).or_default() += n;
                }
            }
            full
        })
        .collect()
}
