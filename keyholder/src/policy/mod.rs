//! Custody policies: the owner's named rule sets, attached to services, agent ids (`aid`) and proxy
//! configs (`pid`), checked after a ticket is verified and before anything is decrypted, whatever
//! the ticket says. All rules of a policy, and all policies that apply, must hold (AND).
//!
//! The hot path reads one in-memory snapshot (rebuilt when the owner generation moves) and two
//! small maps (token buckets and usage counts); only a use under a usage cap writes, in the
//! store's group commit, and is durable before the credential leaves (the answer, or the upstream
//! call of `/v1/proxy`). A refused request reserves
//! nothing; a use that then fails gives its count back.

pub mod approvals;
pub mod file;
pub mod notify;
pub mod rules;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::storage::{
    AttachmentRow, CappedUse, ChangeSet, Check, PolicyRow, SharedStorage, Storage, StorageError,
    StorageResult, UsageCounter, UsageTake, Write,
};
use crate::vault::VaultError;
pub use rules::{Compiled, Delivery, Per, Rules};

/// What a policy attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// A service (credential key).
    Service,
    /// An agent id (a ticket's `aid`).
    Agent,
    /// A proxy config id (a ticket's `pid`).
    Proxy,
}

impl TargetKind {
    /// Stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Service => "service",
            TargetKind::Agent => "agent",
            TargetKind::Proxy => "proxy",
        }
    }

    fn parse(text: &str) -> Result<TargetKind, StorageError> {
        match text {
            "service" => Ok(TargetKind::Service),
            "agent" => Ok(TargetKind::Agent),
            "proxy" => Ok(TargetKind::Proxy),
            other => Err(StorageError::Corrupt(format!(
                "policy target kind '{other}'"
            ))),
        }
    }
}

/// The endpoint a use comes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/credential` (hands the credential out).
    Credential,
    /// `/v1/totp-code` (hands a code out).
    TotpCode,
    /// `/v1/proxy` (injects; the credential never leaves).
    Proxy,
    /// tv-refresh `get` (hands the refresh token out).
    RefreshGet,
}

impl Endpoint {
    fn hands_out(self) -> bool {
        !matches!(self, Endpoint::Proxy)
    }
}

/// One use asked for, as the verified request names it.
#[derive(Debug, Clone, Copy)]
pub struct UseRequest<'a> {
    /// Where it comes in.
    pub endpoint: Endpoint,
    /// The verified service.
    pub service: &'a str,
    /// The ticket's `aid`.
    pub agent: Option<&'a str>,
    /// The ticket's `pid`.
    pub proxy: Option<&'a str>,
    /// The client address (the agent's, or the platform's for `/v1/proxy`).
    pub client: Option<IpAddr>,
    /// The client address's country, looked up only when a policy has a `geo` rule.
    pub country: Option<&'a str>,
}

/// Why a use was refused. The message names the rule and the owner's setting, never a value the
/// caller sent beyond what it already knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `403 policy_denied`.
    Denied {
        /// Metric and audit label of the rule.
        rule: &'static str,
        /// The policy.
        policy: String,
        /// Message for the caller.
        message: String,
    },
    /// `429 rate_limited` with `Retry-After`.
    Limited {
        /// `rate` or `max_uses`.
        rule: &'static str,
        /// The policy.
        policy: String,
        /// Message for the caller.
        message: String,
        /// Seconds until a retry can succeed.
        retry_after_secs: u64,
    },
}

/// A use admitted by every policy that applies; counts under usage caps are reserved in memory
/// until [`PolicyEngine::queue_uses`] and [`PolicyEngine::confirm_uses`] make them durable (or [`PolicyEngine::release`] gives them back).
#[derive(Debug, Default)]
pub struct Admission {
    /// Names of the policies that applied (empty: no policy).
    pub policies: Vec<String>,
    /// The owner must approve this use first: the policies asking, and the seconds to wait.
    pub approval: Option<(String, u64)>,
    uses: Vec<UsageKey>,
    /// The commit the counts were queued for (see [`PolicyEngine::queue_uses`]).
    pending: Option<oneshot::Receiver<Result<(), String>>>,
    durable: bool,
    /// Where the counts are shared by replicas: the caps still to take in storage (see
    /// [`PolicyEngine::take_shared_uses`]).
    to_take: Vec<CapTake>,
}

/// A cap to take from in storage: the counter, its cap, and what a refusal says.
#[derive(Debug)]
struct CapTake {
    key: UsageKey,
    cap: u64,
    per: Per,
    retry_after_secs: u64,
}

/// A usage counter: policy, target and period.
type UsageKey = UsageCounter;

#[derive(Debug, Default, Clone, Copy)]
struct UsageCount {
    committed: u64,
    reserved: u64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A stored policy, compiled (or the reason it does not compile: then it refuses everything).
struct Entry {
    name: String,
    compiled: Result<Compiled, String>,
}

#[derive(Default)]
struct Snapshot {
    by_target: HashMap<(TargetKind, String), Vec<Arc<Entry>>>,
    /// Some attached policy has a `geo` rule (so the client's country is worth looking up).
    needs_geo: bool,
}

/// The policies in force and their counters.
#[derive(Default)]
pub struct PolicyEngine {
    snapshot: RwLock<Arc<Snapshot>>,
    buckets: Mutex<HashMap<(String, String), Bucket>>,
    usage: Arc<Mutex<HashMap<UsageKey, UsageCount>>>,
    /// Uses held for the owner's approval.
    pub approvals: approvals::Approvals,
    batch: Arc<Mutex<UsageBatch>>,
    /// The counts are shared with other replicas (PostgreSQL): caps are taken in storage.
    shared: AtomicBool,
    takes: Arc<Mutex<SharedTakes>>,
}

/// Answered with the take of one use: `None` taken, else the index of the cap that is full.
type TakeWaiter = oneshot::Sender<Result<Option<usize>, String>>;

/// Capped uses waiting to be taken in storage, and whether a take is in flight (the uses that
/// arrive meanwhile go together into the next one).
#[derive(Default)]
struct SharedTakes {
    queue: Vec<(CappedUse, TakeWaiter)>,
    running: bool,
}

/// Answered once the write of its uses is committed (or failed, with the reason).
type UsageWaiter = oneshot::Sender<Result<(), String>>;

/// Usage increments waiting for storage (see [`PolicyEngine::queue_uses`]).
#[derive(Default)]
struct UsageBatch {
    increments: HashMap<UsageKey, u64>,
    waiters: Vec<UsageWaiter>,
    /// A write is queued and the engine has not taken its increments yet.
    queued: bool,
    /// Batches taken by the engine so far.
    taken: u64,
}

fn target_label(kind: TargetKind, target: &str) -> String {
    format!("{}:{target}", kind.as_str())
}

impl PolicyEngine {
    fn snapshot(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Re-reads policies, attachments and durable counts (at start and on every owner change).
    pub async fn reload(&self, storage: &dyn Storage) -> Result<(), VaultError> {
        let (policies, attachments, usage) = load(storage).await?;
        self.shared.store(storage.usage_shared(), Ordering::Relaxed);
        let entries: BTreeMap<String, Arc<Entry>> = policies
            .into_iter()
            .map(|p| {
                let compiled = p.rules.compile().map_err(|e| e.to_string());
                if let Err(reason) = &compiled {
                    tracing::error!(policy = %p.name, %reason, "stored policy does not compile: it refuses every use");
                }
                (
                    p.name.clone(),
                    Arc::new(Entry {
                        name: p.name,
                        compiled,
                    }),
                )
            })
            .collect();
        let mut snapshot = Snapshot::default();
        for a in attachments {
            if let Some(entry) = entries.get(&a.policy) {
                snapshot.needs_geo |= entry
                    .compiled
                    .as_ref()
                    .is_ok_and(|c| !c.countries.is_empty());
                snapshot
                    .by_target
                    .entry((a.kind, a.target))
                    .or_default()
                    .push(Arc::clone(entry));
            }
        }
        self.merge_counts(usage, entries.keys());
        let next = Arc::new(snapshot);
        match self.snapshot.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        self.approvals.wake_decided(storage).await?;
        Ok(())
    }

    /// Merges the durable counts of a storage snapshot into memory. This process is the only
    /// writer of the counts, so what it holds is authoritative for a key it knows: the snapshot
    /// may be older than a commit already accounted here (the read runs before the lock is
    /// taken), or hold a commit not accounted yet (it adds itself when its commit resolves);
    /// taking the snapshot's figure would forget the one or count the other twice. A key the
    /// snapshot lacks is therefore kept while its policy exists (its first commits may have
    /// landed after the read); only the keys of deleted policies are dropped (their rows went
    /// with them), unless a use of them is in flight.
    fn merge_counts<'a>(
        &self,
        usage: Vec<(UsageKey, u64)>,
        policies: impl Iterator<Item = &'a String>,
    ) {
        let policies: std::collections::HashSet<&str> = policies.map(String::as_str).collect();
        let Ok(mut counts) = self.usage.lock() else {
            return;
        };
        let mut fresh: HashMap<UsageKey, UsageCount> = usage
            .into_iter()
            .map(|(key, committed)| {
                let count = counts.get(&key).copied().unwrap_or(UsageCount {
                    committed,
                    reserved: 0,
                });
                (key, count)
            })
            .collect();
        for (key, count) in counts.iter() {
            if fresh.contains_key(key) {
                continue;
            }
            if policies.contains(key.policy.as_str()) {
                fresh.insert(key.clone(), *count);
            } else if count.reserved > 0 {
                fresh.insert(
                    key.clone(),
                    UsageCount {
                        committed: 0,
                        reserved: count.reserved,
                    },
                );
            }
        }
        *counts = fresh;
    }

    /// Checks one use against every policy that applies: refusing rules first (delivery,
    /// agents, client address, hours), then rates, then usage caps (reserving a count). Nothing
    /// is reserved when it is refused.
    pub fn admit(&self, request: &UseRequest<'_>) -> Result<Admission, Refusal> {
        let snapshot = self.snapshot();
        if snapshot.by_target.is_empty() {
            return Ok(Admission::default());
        }
        let mut applied: Vec<(&Arc<Entry>, String)> = Vec::new();
        let mut collect = |kind: TargetKind, target: Option<&str>| {
            if let Some(target) = target {
                if let Some(entries) = snapshot.by_target.get(&(kind, target.to_string())) {
                    for entry in entries {
                        applied.push((entry, target_label(kind, target)));
                    }
                }
            }
        };
        collect(TargetKind::Service, Some(request.service));
        collect(TargetKind::Agent, request.agent);
        collect(TargetKind::Proxy, request.proxy);
        if applied.is_empty() {
            return Ok(Admission::default());
        }
        let now = jiff::Timestamp::now();
        let mut compiled = Vec::with_capacity(applied.len());
        for (entry, target) in &applied {
            let c = entry.compiled.as_ref().map_err(|_| Refusal::Denied {
                rule: "invalid",
                policy: entry.name.clone(),
                message: format!(
                    "refused by policy '{}' (it is invalid; see the server log)",
                    entry.name
                ),
            })?;
            check_fixed(&entry.name, c, request, now)?;
            compiled.push((entry.name.as_str(), c, target.as_str()));
        }
        self.take_rate_tokens(&compiled)?;
        let (uses, to_take) = if self.shared.load(Ordering::Relaxed) {
            (Vec::new(), caps_to_take(&compiled, now))
        } else {
            (self.reserve_uses(&compiled, now)?, Vec::new())
        };
        let mut policies: Vec<String> = applied.iter().map(|(e, _)| e.name.clone()).collect();
        policies.sort();
        policies.dedup();
        let mut asking: Vec<&str> = compiled
            .iter()
            .filter(|(_, c, _)| c.approval.is_some())
            .map(|(name, _, _)| *name)
            .collect();
        asking.sort_unstable();
        asking.dedup();
        let approval = compiled
            .iter()
            .filter_map(|(_, c, _)| c.approval)
            .min()
            .map(|secs| (asking.join(","), secs));
        Ok(Admission {
            policies,
            approval,
            uses,
            pending: None,
            durable: false,
            to_take,
        })
    }

    /// Where replicas share the counts: takes the admitted use's caps in storage, exact across
    /// every replica (one write for the uses of concurrent requests; durable on return, so the
    /// use then counts as committed). `Ok(Err(_))` when a cap is reached, refused as
    /// [`PolicyEngine::admit`] refuses it; nothing is taken then. Elsewhere a no-op (the caps
    /// were reserved in memory by `admit`).
    pub async fn take_shared_uses(
        &self,
        storage: &SharedStorage,
        mut admission: Admission,
    ) -> Result<Result<Admission, Refusal>, VaultError> {
        if admission.to_take.is_empty() {
            return Ok(Ok(admission));
        }
        let wanted: CappedUse = admission
            .to_take
            .iter()
            .map(|c| (c.key.clone(), c.cap))
            .collect();
        let (tx, rx) = oneshot::channel();
        let start = {
            let Ok(mut takes) = self.takes.lock() else {
                return Err(VaultError::Corrupt("usage take lock".into()));
            };
            takes.queue.push((wanted, tx));
            !std::mem::replace(&mut takes.running, true)
        };
        if start {
            tokio::spawn(drain_takes(Arc::clone(storage), Arc::clone(&self.takes)));
        }
        let taken = match rx.await {
            Ok(Ok(taken)) => taken,
            Ok(Err(text)) => return Err(VaultError::Store(StorageError::Unavailable(text))),
            Err(_) => {
                return Err(VaultError::Store(StorageError::Unavailable(
                    "usage counts not written".into(),
                )))
            }
        };
        let to_take = std::mem::take(&mut admission.to_take);
        if let Some(full) = taken {
            let Some(c) = to_take.get(full) else {
                return Err(VaultError::Corrupt("usage cap index".into()));
            };
            return Ok(Err(cap_refusal(
                &c.key.policy,
                c.cap,
                c.per,
                c.retry_after_secs,
            )));
        }
        admission.uses = to_take.into_iter().map(|c| c.key).collect();
        admission.durable = true;
        Ok(Ok(admission))
    }

    fn take_rate_tokens(&self, compiled: &[(&str, &Compiled, &str)]) -> Result<(), Refusal> {
        let rated: Vec<_> = compiled
            .iter()
            .filter_map(|(name, c, target)| c.rate.map(|r| (*name, r, *target)))
            .collect();
        if rated.is_empty() {
            return Ok(());
        }
        let Ok(mut buckets) = self.buckets.lock() else {
            return Err(poisoned_refusal());
        };
        let now = Instant::now();
        // Refill and check every bucket first, so a refusal by one takes no token from another.
        for (name, rate, target) in &rated {
            let bucket = buckets
                .entry((name.to_string(), target.to_string()))
                .or_insert(Bucket {
                    tokens: f64::from(rate.count),
                    at: now,
                });
            let per_token = rate.per_secs / f64::from(rate.count);
            let elapsed = now.duration_since(bucket.at).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed / per_token).min(f64::from(rate.count));
            bucket.at = now;
            if bucket.tokens < 1.0 {
                let wait = ((1.0 - bucket.tokens) * per_token).ceil().max(1.0) as u64;
                return Err(Refusal::Limited {
                    rule: "rate",
                    policy: name.to_string(),
                    message: format!(
                        "refused by policy '{name}': rate limit ({}) reached; retry after {wait} s",
                        compiled_rate_text(compiled, name)
                    ),
                    retry_after_secs: wait,
                });
            }
        }
        for (name, _, target) in &rated {
            if let Some(bucket) = buckets.get_mut(&(name.to_string(), target.to_string())) {
                bucket.tokens -= 1.0;
            }
        }
        Ok(())
    }

    fn reserve_uses(
        &self,
        compiled: &[(&str, &Compiled, &str)],
        now: jiff::Timestamp,
    ) -> Result<Vec<UsageKey>, Refusal> {
        let capped: Vec<_> = compiled
            .iter()
            .filter_map(|(name, c, target)| c.max_uses.map(|cap| (*name, *c, cap, *target)))
            .collect();
        if capped.is_empty() {
            return Ok(Vec::new());
        }
        let Ok(mut usage) = self.usage.lock() else {
            return Err(poisoned_refusal());
        };
        let mut keys = Vec::with_capacity(capped.len());
        for (name, c, (cap, per), target) in &capped {
            let (period, left) = c.period(now);
            let key = UsageKey {
                policy: name.to_string(),
                target: target.to_string(),
                period,
            };
            let count = usage.get(&key).copied().unwrap_or_default();
            if count.committed + count.reserved >= *cap {
                return Err(cap_refusal(name, *cap, *per, left));
            }
            keys.push(key);
        }
        for key in &keys {
            usage.entry(key.clone()).or_default().reserved += 1;
        }
        Ok(keys)
    }

    /// Hands the reserved counts to storage without waiting: they join the group commit that
    /// the request's replay marks go to (one upsert per counter per commit, not per use), so the
    /// request goes on (decrypts, shapes its answer) while the commit happens.
    /// [`PolicyEngine::confirm_uses`] then waits for that commit before the credential leaves the
    /// keyholder (the answer, or the upstream call on `/v1/proxy`): a crash never forgets a use
    /// that happened. Concurrent uses share one write: the first queues it, the others add their
    /// increments to it until the engine takes it, and each resolves once that commit is on disk.
    pub fn queue_uses(
        &self,
        storage: &dyn Storage,
        admission: &mut Admission,
    ) -> Result<(), VaultError> {
        if admission.uses.is_empty() || admission.pending.is_some() || admission.durable {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let queue = {
            let Ok(mut batch) = self.batch.lock() else {
                return Err(VaultError::Corrupt("usage batch lock".into()));
            };
            for key in &admission.uses {
                *batch.increments.entry(key.clone()).or_default() += 1;
            }
            batch.waiters.push(tx);
            (!std::mem::replace(&mut batch.queued, true)).then_some(batch.taken)
        };
        if let Some(taken_before) = queue {
            self.queue_batch(storage, taken_before);
        }
        admission.pending = Some(rx);
        Ok(())
    }

    /// Waits until the counts queued by [`PolicyEngine::queue_uses`] are committed (at once if
    /// they are, or if nothing was counted). On failure the use is not counted (its reservation
    /// is given back) and the error is returned: the credential must not leave.
    pub async fn confirm_uses(&self, admission: &mut Admission) -> Result<(), VaultError> {
        let Some(rx) = admission.pending.take() else {
            return Ok(());
        };
        let written = settle_uses(rx, &self.usage, &admission.uses).await;
        match written {
            Ok(()) => {
                admission.durable = true;
                Ok(())
            }
            Err(err) => {
                admission.uses.clear();
                Err(err)
            }
        }
    }

    /// [`PolicyEngine::confirm_uses`] for a use that succeeded, inside a request without waiting
    /// here: the request's durability barrier waits for the commit, with its replay marks, before
    /// any answer leaves (a count that could not be written turns the answer into the error).
    /// Outside a request it waits here.
    pub async fn confirm_uses_before_answer(
        &self,
        admission: &mut Admission,
    ) -> Result<(), VaultError> {
        let Some(rx) = admission.pending.take() else {
            return Ok(());
        };
        let uses = std::mem::take(&mut admission.uses);
        let usage = Arc::clone(&self.usage);
        let work: crate::vault::replay::DurableWork =
            Box::pin(async move { settle_uses(rx, &usage, &uses).await });
        match crate::vault::replay::defer_until_answer(work) {
            None => Ok(()),
            Some(work) => work.await,
        }
    }

    fn queue_batch(&self, storage: &dyn Storage, taken_before: u64) {
        let batch = Arc::clone(&self.batch);
        // The waiters of the increments the engine takes, answered once their commit resolves.
        let taken_waiters: Arc<Mutex<Vec<UsageWaiter>>> = Arc::default();
        let waiters_slot = Arc::clone(&taken_waiters);
        let take: UsageTake = Box::new(move || match batch.lock() {
            Ok(mut b) => {
                b.queued = false;
                b.taken += 1;
                if let Ok(mut slot) = waiters_slot.lock() {
                    *slot = std::mem::take(&mut b.waiters);
                }
                std::mem::take(&mut b.increments).into_iter().collect()
            }
            Err(_) => Vec::new(),
        });
        let commit = storage.queue_usage(take);
        let batch = Arc::clone(&self.batch);
        tokio::spawn(async move {
            let written = commit.await.map_err(|err| err.to_string());
            let waiters = taken_waiters
                .lock()
                .map(|mut w| std::mem::take(&mut *w))
                .unwrap_or_default();
            if written.is_err() {
                // The engine never took the batch: fail its waiters and let the next use queue
                // anew. (Taken and failed with its commit: its waiters see the error below.)
                if let Ok(mut b) = batch.lock() {
                    if b.taken == taken_before {
                        b.queued = false;
                        b.increments.clear();
                        b.waiters.clear();
                    }
                }
            }
            for waiter in waiters {
                let _ = waiter.send(written.clone());
            }
        });
    }

    /// Gives back the counts of a use that did not happen after all (it failed after admission).
    pub async fn release(&self, storage: &dyn Storage, mut admission: Admission) {
        if admission.uses.is_empty() {
            return;
        }
        // Queued for a commit: once it resolves the count is durable (then taken back below) or
        // was never written (then `confirm_uses` gave the reservation back).
        if admission.pending.is_some() && self.confirm_uses(&mut admission).await.is_err() {
            return;
        }
        if !admission.durable {
            if let Ok(mut usage) = self.usage.lock() {
                for key in &admission.uses {
                    let count = usage.entry(key.clone()).or_default();
                    count.reserved = count.reserved.saturating_sub(1);
                }
            }
            return;
        }
        let result = storage.release_usage(admission.uses.clone()).await;
        match result {
            // Shared counts live in storage only.
            Ok(()) if self.shared.load(Ordering::Relaxed) => {}
            Ok(()) => {
                if let Ok(mut usage) = self.usage.lock() {
                    for key in &admission.uses {
                        let count = usage.entry(key.clone()).or_default();
                        count.committed = count.committed.saturating_sub(1);
                    }
                }
            }
            // Kept as used: the cap errs on the owner's side.
            Err(err) => tracing::warn!(error = %err, "could not give back a usage count"),
        }
    }

    /// Whether any policy is attached anywhere (else every use is admitted as before).
    pub fn is_active(&self) -> bool {
        !self.snapshot().by_target.is_empty()
    }

    /// Whether some attached policy has a `geo` rule.
    pub fn needs_geo(&self) -> bool {
        self.snapshot().needs_geo
    }

    /// The names of the policies attached to a service itself (for `/v1/storage list` meta).
    pub fn service_policies(&self, service: &str) -> Vec<String> {
        self.snapshot()
            .by_target
            .get(&(TargetKind::Service, service.to_string()))
            .map(|entries| entries.iter().map(|e| e.name.clone()).collect())
            .unwrap_or_default()
    }
}

/// Waits for the commit of queued counts and accounts for it: the reservation becomes a committed
/// count, or is given back when the commit failed.
async fn settle_uses(
    rx: oneshot::Receiver<Result<(), String>>,
    usage: &Mutex<HashMap<UsageKey, UsageCount>>,
    uses: &[UsageKey],
) -> Result<(), VaultError> {
    let written = match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(text)) => Err(VaultError::Store(StorageError::Unavailable(text))),
        Err(_) => Err(VaultError::Store(StorageError::Unavailable(
            "usage counts not written".into(),
        ))),
    };
    if let Ok(mut usage) = usage.lock() {
        for key in uses {
            let count = usage.entry(key.clone()).or_default();
            count.reserved = count.reserved.saturating_sub(1);
            if written.is_ok() {
                count.committed += 1;
            }
        }
    }
    written
}

/// The caps of an admitted use, to take in storage.
fn caps_to_take(compiled: &[(&str, &Compiled, &str)], now: jiff::Timestamp) -> Vec<CapTake> {
    compiled
        .iter()
        .filter_map(|(name, c, target)| {
            let (cap, per) = c.max_uses?;
            let (period, left) = c.period(now);
            Some(CapTake {
                key: UsageKey {
                    policy: name.to_string(),
                    target: target.to_string(),
                    period,
                },
                cap,
                per,
                retry_after_secs: left,
            })
        })
        .collect()
}

/// Takes the queued uses in storage, one call per batch, until none wait.
async fn drain_takes(storage: SharedStorage, takes: Arc<Mutex<SharedTakes>>) {
    loop {
        let batch = {
            let Ok(mut t) = takes.lock() else {
                return;
            };
            if t.queue.is_empty() {
                t.running = false;
                return;
            }
            std::mem::take(&mut t.queue)
        };
        let (uses, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let result: StorageResult<Vec<Option<usize>>> = storage.take_capped_uses(uses).await;
        match result {
            Ok(taken) if taken.len() == waiters.len() => {
                for (waiter, taken) in waiters.into_iter().zip(taken) {
                    let _ = waiter.send(Ok(taken));
                }
            }
            Ok(_) => {
                for waiter in waiters {
                    let _ = waiter.send(Err("usage take answered the wrong uses".into()));
                }
            }
            Err(err) => {
                let text = err.to_string();
                for waiter in waiters {
                    let _ = waiter.send(Err(text.clone()));
                }
            }
        }
    }
}

/// `429 rate_limited`: a usage cap is reached.
fn cap_refusal(name: &str, cap: u64, per: Per, retry_after_secs: u64) -> Refusal {
    let per_text = match per {
        Per::Day => "per day",
        Per::Total => "in total",
    };
    Refusal::Limited {
        rule: "max_uses",
        policy: name.to_string(),
        message: format!("refused by policy '{name}': usage cap reached ({cap} uses {per_text})"),
        retry_after_secs,
    }
}

fn compiled_rate_text(compiled: &[(&str, &Compiled, &str)], name: &str) -> String {
    compiled
        .iter()
        .find(|(n, _, _)| *n == name)
        .and_then(|(_, c, _)| c.rules.rate.clone())
        .unwrap_or_default()
}

fn poisoned_refusal() -> Refusal {
    Refusal::Denied {
        rule: "internal",
        policy: String::new(),
        message: "refused: policy state unavailable".into(),
    }
}

/// The rules that need no counter: delivery, agents, client address, hours.
fn check_fixed(
    name: &str,
    c: &Compiled,
    request: &UseRequest<'_>,
    now: jiff::Timestamp,
) -> Result<(), Refusal> {
    let deny = |rule: &'static str, why: String| Refusal::Denied {
        rule,
        policy: name.to_string(),
        message: format!("refused by policy '{name}': {why}"),
    };
    if c.inject_only && request.endpoint.hands_out() {
        return Err(deny(
            "delivery",
            "this credential is inject-only (used through /v1/proxy, never handed out)".into(),
        ));
    }
    if !c.agents.is_empty() && !request.agent.is_some_and(|a| c.agents.contains(a)) {
        return Err(deny("agents", "this agent is not allowed".into()));
    }
    if !c.nets.is_empty()
        && !request
            .client
            .is_some_and(|ip| c.nets.iter().any(|n| n.contains(&ip)))
    {
        return Err(deny(
            "client_ip",
            format!(
                "client address not allowed ({})",
                c.rules.client_ip.join(",")
            ),
        ));
    }
    if !c.countries.is_empty() && !request.country.is_some_and(|cc| c.countries.contains(cc)) {
        return Err(deny(
            "geo",
            format!(
                "client country not allowed ({})",
                c.countries.iter().cloned().collect::<Vec<_>>().join(",")
            ),
        ));
    }
    if !c.within_hours(now) {
        return Err(deny(
            "hours",
            format!("outside allowed hours ({})", c.hours_text()),
        ));
    }
    Ok(())
}

/// A stored policy.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredPolicy {
    /// Its name.
    pub name: String,
    /// Its rules.
    pub rules: Rules,
    /// `cli` or `file` (declared by `serve --policy-file`).
    pub source: String,
}

/// An attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attachment {
    /// The policy.
    pub policy: String,
    /// What it attaches to.
    pub kind: TargetKind,
    /// The service, agent id or proxy config id.
    pub target: String,
    /// `cli` or `file`.
    pub source: String,
}

/// Policies (decoded), attachments and durable counts, from one storage snapshot.
async fn load(
    storage: &dyn Storage,
) -> Result<(Vec<StoredPolicy>, Vec<Attachment>, Vec<(UsageKey, u64)>), VaultError> {
    let snapshot = storage.policy_snapshot().await?;
    let policies = snapshot
        .policies
        .into_iter()
        .map(
            |PolicyRow {
                 name,
                 rules,
                 source,
             }| {
                let rules: Rules = serde_json::from_str(&rules)
                    .map_err(|e| StorageError::Corrupt(format!("policy '{name}': {e}")))?;
                Ok(StoredPolicy {
                    name,
                    rules,
                    source,
                })
            },
        )
        .collect::<Result<Vec<_>, StorageError>>()?;
    let attachments = snapshot
        .attachments
        .into_iter()
        .map(|a| {
            Ok(Attachment {
                policy: a.policy,
                kind: TargetKind::parse(&a.kind)?,
                target: a.target,
                source: a.source,
            })
        })
        .collect::<Result<Vec<_>, StorageError>>()?;
    Ok((policies, attachments, snapshot.usage))
}

/// Every stored policy, by name.
pub async fn load_policies(storage: &dyn Storage) -> Result<Vec<StoredPolicy>, VaultError> {
    Ok(load(storage).await?.0)
}

/// Every attachment.
pub async fn load_attachments(storage: &dyn Storage) -> Result<Vec<Attachment>, VaultError> {
    Ok(load(storage).await?.1)
}

/// Durable usage counts of a policy: (target, period, count).
pub async fn usage_of(
    storage: &dyn Storage,
    policy: &str,
) -> Result<Vec<(String, String, u64)>, VaultError> {
    Ok(storage.usage_of(policy).await?)
}

/// Validates a policy name: 1-64 characters of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), VaultError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(VaultError::Invalid(format!(
            "policy name '{name}': use 1-64 letters, digits, '.', '_' or '-'"
        )));
    }
    Ok(())
}

/// The change that creates (`create = true`: only if no policy has the name) or replaces a
/// policy's rules.
pub fn put_policy(
    name: &str,
    rules: &Rules,
    create: bool,
    source: &str,
) -> Result<ChangeSet, VaultError> {
    validate_name(name)?;
    rules.compile()?;
    let text = serde_json::to_string(rules).map_err(|e| VaultError::Corrupt(e.to_string()))?;
    let mut change = ChangeSet::owner();
    if create {
        change = change.check(Check::PolicyExists(name.to_string(), false));
    }
    Ok(change.write(Write::PutPolicy(
        PolicyRow {
            name: name.to_string(),
            rules: text,
            source: source.to_string(),
        },
        crate::clock::now_unix(),
    )))
}

/// The error of a create that found the name taken.
pub fn policy_exists(name: &str) -> VaultError {
    VaultError::Invalid(format!(
        "policy '{name}' exists already (use `keyholder policy update`)"
    ))
}

/// The change that deletes a policy with its attachments and counts (its write reports whether
/// there was one).
pub fn delete_policy(name: &str) -> ChangeSet {
    ChangeSet::owner().write(Write::DeletePolicy(name.to_string()))
}

/// The change that attaches (or detaches) a policy, only while it exists (its write reports
/// whether anything changed).
pub fn set_attachment(
    name: &str,
    kind: TargetKind,
    target: &str,
    attach: bool,
) -> Result<ChangeSet, VaultError> {
    if target.is_empty() || target.len() > 256 {
        return Err(VaultError::Invalid(format!(
            "{} '{target}': expected 1-256 characters",
            kind.as_str()
        )));
    }
    let write = if attach {
        Write::Attach(AttachmentRow {
            policy: name.to_string(),
            kind: kind.as_str().to_string(),
            target: target.to_string(),
            source: "cli".to_string(),
        })
    } else {
        Write::Detach(
            name.to_string(),
            kind.as_str().to_string(),
            target.to_string(),
        )
    };
    Ok(ChangeSet::owner()
        .check(Check::PolicyExists(name.to_string(), true))
        .write(write))
}

/// The error of an attachment change for a policy that does not exist.
pub fn no_policy(name: &str) -> VaultError {
    VaultError::Invalid(format!("no policy '{name}'"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::storage::changes::ChangeSets;
    use crate::storage::sqlite::SqliteStorage;
    use crate::storage::PolicyStore;

    fn use_of(service: &str) -> UseRequest<'_> {
        UseRequest {
            endpoint: Endpoint::Credential,
            service,
            agent: None,
            proxy: None,
            client: None,
            country: None,
        }
    }

    /// A reload reads the durable counts before it takes the counts' lock. Uses committed and
    /// accounted in between (here: the first uses of a counter, so the read saw no row for it)
    /// were dropped from memory before the fix: the cap then let those uses through again.
    #[tokio::test]
    async fn a_reload_racing_the_first_commits_of_a_counter_forgets_no_use() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(dir.path()).unwrap();
        let rules = Rules {
            max_uses: Some(2),
            per: Some(Per::Total),
            ..Rules::default()
        };
        storage
            .apply(put_policy("cap", &rules, true, "cli").unwrap())
            .await
            .unwrap();
        storage
            .apply(set_attachment("cap", TargetKind::Service, "github", true).unwrap())
            .await
            .unwrap();
        let engine = PolicyEngine::default();
        engine.reload(&storage).await.unwrap();

        // The reload's read, before any use was counted.
        let (policies, _, stale) = load(&storage).await.unwrap();
        assert!(stale.is_empty());
        for _ in 0..2 {
            let mut admission = engine.admit(&use_of("github")).unwrap();
            engine.queue_uses(&storage, &mut admission).unwrap();
            engine.confirm_uses(&mut admission).await.unwrap();
        }
        // The reload's merge, after both uses were committed and accounted.
        let names: Vec<String> = policies.into_iter().map(|p| p.name).collect();
        engine.merge_counts(stale, names.iter());
        assert!(
            matches!(
                engine.admit(&use_of("github")),
                Err(Refusal::Limited { .. })
            ),
            "a third use under a cap of 2"
        );
        // And a fresh reload agrees with storage.
        engine.reload(&storage).await.unwrap();
        assert!(engine.admit(&use_of("github")).is_err());
        assert_eq!(
            storage.usage_of("cap").await.unwrap(),
            vec![("service:github".to_string(), "total".to_string(), 2)]
        );

        // A deleted policy's counts go with it once nothing of it is in flight.
        storage.apply(delete_policy("cap")).await.unwrap();
        engine.reload(&storage).await.unwrap();
        assert!(engine.usage.lock().unwrap().is_empty());
    }
}
