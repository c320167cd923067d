//! Replay memory for platform request ids, request signatures, ticket nonces and envelope nonces:
//! checked in memory (atomic check-and-insert), made durable before the request is answered,
//! reloaded at start.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use super::VaultError;
pub use crate::storage::ReplayKind;
use crate::storage::{replay::mark_key, Mark, MarkCommit, MarkVerdict, SharedStorage};

tokio::task_local! {
    /// Set by the HTTP layer around each request (see [`DurabilityBarrier`]).
    static DURABILITY: Arc<DurabilityBarrier>;
}

/// The durable-before-answer barrier of one request: replay marks made while handling it are
/// committed in the background (overlapping the request's own work), and the HTTP layer awaits
/// [`DurabilityBarrier::settle`] before any answer leaves. Outside a request, marks are awaited
/// where they are made.
#[derive(Default)]
pub struct DurabilityBarrier {
    pending: Mutex<Vec<DeferredMarks>>,
    /// Marks already taken in memory whose records go to the writer with the request's next
    /// marks (see [`ReplayGuard::remember_all_with_next`]), or at [`DurabilityBarrier::settle`].
    parked: Mutex<ParkedMarks>,
    /// See [`defer_until_answer`].
    works: Mutex<Vec<DurableWork>>,
}

#[derive(Default)]
struct ParkedMarks {
    taken: Vec<(ReplayKind, MarkKey)>,
    records: Vec<Mark>,
}

/// Marks made together (one batch for the engine) and their pending commit.
type DeferredMarks = (Vec<(ReplayKind, MarkKey)>, MarkCommit);

/// Other durable work of a request (a policy's usage counts) that its answer waits for.
pub type DurableWork =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), VaultError>> + Send>>;

/// Inside a request: `work` is awaited by the request's [`DurabilityBarrier::settle`], before
/// any answer leaves (`None`). Outside a request it is handed back, for the caller to await.
pub fn defer_until_answer(work: DurableWork) -> Option<DurableWork> {
    match DURABILITY.try_with(Arc::clone) {
        Ok(barrier) => match barrier.works.lock() {
            Ok(mut works) => {
                works.push(work);
                None
            }
            Err(_) => Some(work),
        },
        Err(_) => Some(work),
    }
}

/// Inside a request: waits until every replay mark and other durable work made in it so far is
/// committed (the request's answer then waits only for what follows). `/v1/proxy` calls this
/// before its first outbound action, so that a call the upstream (or a token endpoint) receives
/// is one whose request id, signature and ticket nonce survive a crash. Outside a request the
/// marks were awaited where they were made: nothing to wait for.
pub async fn durable_now(guard: &ReplayGuard) -> Result<(), VaultError> {
    match DURABILITY.try_with(Arc::clone) {
        Ok(barrier) => barrier.settle(guard).await,
        Err(_) => Ok(()),
    }
}

impl DurabilityBarrier {
    /// Runs `fut` (a request's handling) with this barrier in force.
    pub async fn scope<F: std::future::Future>(self: &Arc<Self>, fut: F) -> F::Output {
        DURABILITY.scope(Arc::clone(self), fut).await
    }

    fn defer(&self, marks: Vec<(ReplayKind, MarkKey)>, write: MarkCommit) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.push((marks, write));
        }
    }

    /// Waits until every mark made in the scope is committed. On failure the failed marks are
    /// forgotten (the request is answered 503 and may be retried) and the error is returned.
    pub async fn settle(&self, guard: &ReplayGuard) -> Result<(), VaultError> {
        let parked = match self.parked.lock() {
            Ok(mut parked) => std::mem::take(&mut *parked),
            Err(_) => return Err(VaultError::Corrupt("durability barrier lock".into())),
        };
        if !parked.records.is_empty() {
            self.defer(parked.taken, guard.storage.append_marks(parked.records));
        }
        let pending = match self.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return Err(VaultError::Corrupt("durability barrier lock".into())),
        };
        let mut failure = None;
        for (marks, write) in pending {
            // Deferred only where the verdict is local: a durable batch is always fresh.
            if let Err(err) = write.await {
                for (kind, key) in marks {
                    guard.set(kind).forget(key);
                }
                failure.get_or_insert(err);
            }
        }
        let works = match self.works.lock() {
            Ok(mut works) => std::mem::take(&mut *works),
            Err(_) => return Err(VaultError::Corrupt("durability barrier lock".into())),
        };
        let mut work_failure = None;
        for work in works {
            if let Err(err) = work.await {
                work_failure.get_or_insert(err);
            }
        }
        match (failure, work_failure) {
            (Some(err), _) => Err(err.into()),
            (None, Some(err)) => Err(err),
            (None, None) => Ok(()),
        }
    }
}

/// In memory a mark is kept as its 8-byte key (see [`mark_key`]).
type MarkKey = u64;

/// Shards per mark set: a check holds one shard's lock, so concurrent requests rarely wait.
const SHARDS: usize = 64;

fn poisoned<T>(_: T) -> VaultError {
    VaultError::Corrupt("replay lock".into())
}

fn shard_of(key: MarkKey) -> usize {
    // The key is already a hash: its high bits spread evenly (the set hashes the whole key).
    ((key >> 58) as usize) % SHARDS
}

/// Marks that arrived during one period (between two calls of [`MarkSet::rotate`], a minute),
/// kept until the latest expiry among them and then dropped as a whole. Holding only keys (8 bytes
/// a slot, compacted once closed) instead of a key-to-expiry map takes about a third of the memory,
/// and expiring a generation frees it at once instead of scanning millions of marks.
struct Generation {
    /// No mark in the generation is needed after this unix second.
    until: i64,
    shards: Vec<Mutex<HashSet<MarkKey>>>,
}

/// The generation receiving marks, one shard: its keys and their latest expiry.
#[derive(Default)]
struct OpenShard {
    keys: HashSet<MarkKey>,
    until: i64,
}

/// Marks of one kind. A mark is refused while any generation holding it is unexpired: a mark may
/// thus be refused somewhat past its own window (until its generation's latest expiry, at most
/// [`LONG_MARK_SECS`] plus a period after it arrived), never less. Marks needed longer are kept
/// with their own expiry.
struct MarkSet {
    open: Vec<Mutex<OpenShard>>,
    /// Closed generations, oldest first.
    closed: RwLock<Vec<Generation>>,
    /// Marks needed much longer than the usual windows (tickets with long lifetimes), with their own
    /// expiry: in a generation, one of them would keep a minute of short-lived marks alive with it.
    long: Vec<Mutex<HashMap<MarkKey, i64>>>,
}

/// A mark needed this much longer than now is kept in [`MarkSet::long`] (request ids need 600 s).
const LONG_MARK_SECS: i64 = 900;

impl Default for MarkSet {
    fn default() -> Self {
        MarkSet {
            open: (0..SHARDS).map(|_| Mutex::default()).collect(),
            closed: RwLock::new(Vec::new()),
            long: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl MarkSet {
    /// Atomic check-and-insert (under the key's open shard lock): `Seen::Replayed` if `key` is held
    /// by an unexpired generation or long mark. Lock order everywhere: open shard, then the closed
    /// list, then a closed shard; a long shard is only taken with no closed lock held.
    fn check_and_insert(&self, key: MarkKey, until: i64, now: i64) -> Result<Seen, VaultError> {
        let i = shard_of(key);
        let mut open = self.open[i].lock().map_err(poisoned)?;
        // Marks in the open generation arrived within the last period and expire later than now.
        if open.keys.contains(&key) {
            return Ok(Seen::Replayed);
        }
        {
            let closed = self.closed.read().map_err(poisoned)?;
            for generation in closed.iter().rev().filter(|g| g.until >= now) {
                if generation.shards[i]
                    .lock()
                    .map_err(poisoned)?
                    .contains(&key)
                {
                    return Ok(Seen::Replayed);
                }
            }
        }
        {
            let mut long = self.long[i].lock().map_err(poisoned)?;
            if long.get(&key).is_some_and(|&u| u >= now) {
                return Ok(Seen::Replayed);
            }
            if until.saturating_sub(now) > LONG_MARK_SECS {
                long.insert(key, until);
                return Ok(Seen::Fresh);
            }
        }
        open.keys.insert(key);
        open.until = open.until.max(until);
        Ok(Seen::Fresh)
    }

    /// Adds a mark loaded from disk (at start, before any check).
    fn insert_loaded(&self, key: MarkKey, until: i64, now: i64) {
        if until.saturating_sub(now) > LONG_MARK_SECS {
            if let Ok(mut long) = self.long[shard_of(key)].lock() {
                let entry = long.entry(key).or_insert(until);
                *entry = (*entry).max(until);
            }
            return;
        }
        if let Ok(mut open) = self.open[shard_of(key)].lock() {
            open.keys.insert(key);
            open.until = open.until.max(until);
        }
    }

    fn forget(&self, key: MarkKey) {
        let i = shard_of(key);
        let Ok(mut open) = self.open[i].lock() else {
            return;
        };
        if open.keys.remove(&key) {
            return;
        }
        if let Ok(mut long) = self.long[i].lock() {
            if long.remove(&key).is_some() {
                return;
            }
        }
        // Closed meanwhile (a rotation between the mark and the failed write).
        if let Ok(closed) = self.closed.read() {
            for generation in closed.iter() {
                if let Ok(mut shard) = generation.shards[i].lock() {
                    shard.remove(&key);
                }
            }
        }
    }

    /// Closes the open generation, drops expired ones, and compacts the one just closed.
    fn rotate(&self, now: i64) {
        {
            let mut open: Vec<_> = self.open.iter().filter_map(|s| s.lock().ok()).collect();
            let Ok(mut closed) = self.closed.write() else {
                return;
            };
            closed.retain(|g| g.until >= now);
            if open.len() == SHARDS && open.iter().any(|s| !s.keys.is_empty()) {
                let until = open.iter().map(|s| s.until).max().unwrap_or(now);
                let shards = open
                    .iter_mut()
                    .map(|s| Mutex::new(std::mem::take(&mut **s).keys))
                    .collect();
                closed.push(Generation { until, shards });
            }
        }
        for shard in &self.long {
            if let Ok(mut shard) = shard.lock() {
                shard.retain(|_, until| *until >= now);
            }
        }
        // Outside the open shards' locks: a check waits at most for one shard's rehash.
        if let Ok(closed) = self.closed.read() {
            if let Some(newest) = closed.last() {
                for shard in &newest.shards {
                    if let Ok(mut shard) = shard.lock() {
                        shard.shrink_to_fit();
                    }
                }
            }
        }
    }

    fn len(&self) -> usize {
        let open: usize = self
            .open
            .iter()
            .map(|s| s.lock().map(|s| s.keys.len()).unwrap_or(0))
            .sum();
        let closed: usize = self
            .closed
            .read()
            .map(|c| {
                c.iter()
                    .flat_map(|g| g.shards.iter())
                    .map(|s| s.lock().map(|s| s.len()).unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0);
        let long: usize = self
            .long
            .iter()
            .map(|s| s.lock().map(|s| s.len()).unwrap_or(0))
            .sum();
        open + closed + long
    }
}

/// Outcome of [`ReplayGuard::remember`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First use: now remembered durably.
    Fresh,
    /// Already used and not yet expired.
    Replayed,
}

/// In-memory sets backed by the storage's replay marks.
pub struct ReplayGuard {
    storage: SharedStorage,
    /// The in-memory check is the authority (one process on the storage): commits may be awaited
    /// just before the answer leaves. Otherwise the storage's verdict is awaited at once.
    local: bool,
    request_ids: MarkSet,
    nonces: MarkSet,
    envelope_nonces: MarkSet,
    signatures: MarkSet,
}

impl ReplayGuard {
    /// Loads every unexpired mark from storage (which converts marks an older keyholder kept
    /// in another layout first).
    pub async fn load(storage: SharedStorage) -> Result<ReplayGuard, VaultError> {
        let now = crate::clock::now_unix();
        let marks = storage.load_marks(now).await?;
        let guard = ReplayGuard {
            local: storage.verdict_is_local(),
            storage,
            request_ids: MarkSet::default(),
            nonces: MarkSet::default(),
            envelope_nonces: MarkSet::default(),
            signatures: MarkSet::default(),
        };
        for mark in marks {
            guard
                .set(mark.kind)
                .insert_loaded(mark.key, mark.until, now);
        }
        Ok(guard)
    }

    fn set(&self, kind: ReplayKind) -> &MarkSet {
        match kind {
            ReplayKind::RequestId => &self.request_ids,
            ReplayKind::Nonce => &self.nonces,
            ReplayKind::EnvelopeNonce => &self.envelope_nonces,
            ReplayKind::Signature => &self.signatures,
        }
    }

    /// Marks `id` used until `expires_at`. Returns [`Seen::Replayed`] if it was already used; else
    /// returns [`Seen::Fresh`] once the mark is committed to disk.
    pub async fn remember(
        &self,
        kind: ReplayKind,
        id: &str,
        expires_at: i64,
    ) -> Result<Seen, VaultError> {
        Ok(match self.remember_all(&[(kind, id, expires_at)]).await? {
            None => Seen::Fresh,
            Some(_) => Seen::Replayed,
        })
    }

    /// Marks every `(kind, id, expires_at)` used, all or none: returns the kind of the first mark
    /// that was already used (and remembers none of them), else `None` once all are committed to
    /// disk. The marks go to the writer as one job, so they share one group commit (and fsync).
    pub async fn remember_all(
        &self,
        marks: &[(ReplayKind, &str, i64)],
    ) -> Result<Option<ReplayKind>, VaultError> {
        self.remember_marks(marks, false).await
    }

    /// As [`ReplayGuard::remember_all`], checked and taken in memory at once, but inside a
    /// request the records wait for the request's next marks and go to the writer with them as
    /// one job (or at the request's settle, if none follow): a `/v1/proxy` call's request id,
    /// signature and ticket nonce share one commit instead of two in a row.
    pub async fn remember_all_with_next(
        &self,
        marks: &[(ReplayKind, &str, i64)],
    ) -> Result<Option<ReplayKind>, VaultError> {
        self.remember_marks(marks, true).await
    }

    async fn remember_marks(
        &self,
        marks: &[(ReplayKind, &str, i64)],
        park: bool,
    ) -> Result<Option<ReplayKind>, VaultError> {
        let now = crate::clock::now_unix();
        let mut taken: Vec<(ReplayKind, MarkKey)> = Vec::with_capacity(marks.len());
        let mut records = Vec::with_capacity(marks.len());
        for &(kind, id, expires_at) in marks {
            // Claims meet the clock here: a negative expiry would name no valid table (and is
            // expired anyway); every use of it below saturates.
            let expires_at = expires_at.max(0);
            let key = mark_key(id);
            let seen = self.set(kind).check_and_insert(key, expires_at, now);
            if seen.as_ref().map_or(true, |s| *s == Seen::Replayed) {
                for (kind, key) in taken {
                    self.set(kind).forget(key);
                }
                return seen.map(|_| Some(kind));
            }
            taken.push((kind, key));
            records.push(Mark {
                kind,
                key,
                expires_at,
            });
        }
        // Inside a request on an engine whose verdict is local: the commit runs while the
        // request is handled, and the HTTP layer awaits it before the answer leaves.
        let barrier = if self.local {
            DURABILITY.try_with(Arc::clone).ok()
        } else {
            None
        };
        if let Some(barrier) = &barrier {
            let Ok(mut parked) = barrier.parked.lock() else {
                for (kind, key) in taken {
                    self.set(kind).forget(key);
                }
                return Err(VaultError::Corrupt("durability barrier lock".into()));
            };
            if park {
                parked.taken.append(&mut taken);
                parked.records.append(&mut records);
                return Ok(None);
            }
            if !parked.records.is_empty() {
                let mut earlier = std::mem::take(&mut *parked);
                earlier.taken.append(&mut taken);
                earlier.records.append(&mut records);
                taken = earlier.taken;
                records = earlier.records;
            }
        }
        let pending = self.storage.append_marks(records);
        if let Some(barrier) = barrier {
            barrier.defer(taken, pending);
            return Ok(None);
        }
        match pending.await {
            Ok(MarkVerdict::Fresh) => Ok(None),
            Ok(MarkVerdict::Replayed(i)) => {
                // Another process sharing the storage had one of them: none is used here.
                let kind = taken.get(i).map_or(ReplayKind::Nonce, |(kind, _)| *kind);
                for (kind, key) in taken {
                    self.set(kind).forget(key);
                }
                Ok(Some(kind))
            }
            Err(err) => {
                // Not served, so not used: let the platform's retry through.
                for (kind, key) in taken {
                    self.set(kind).forget(key);
                }
                Err(err.into())
            }
        }
    }

    /// Forgets expired marks in memory and in storage; returns how many mark groups (tables) were
    /// dropped.
    pub async fn purge_expired(&self) -> Result<usize, VaultError> {
        let now = crate::clock::now_unix();
        for kind in ReplayKind::ALL {
            self.set(kind).rotate(now);
        }
        Ok(self.storage.drop_expired_marks(now).await?)
    }

    /// Entries held in memory (every kind), for metrics.
    pub fn len(&self) -> usize {
        ReplayKind::ALL.iter().map(|k| self.set(*k).len()).sum()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod extreme_expiry_tests {
    use super::*;

    fn sqlite(dir: &std::path::Path) -> SharedStorage {
        Arc::new(crate::storage::sqlite::SqliteStorage::open(dir).unwrap())
    }

    /// Expiries at the ends of `i64` (from claims a hostile platform chose) are stored, purged and
    /// reloaded without overflow, in a table with a valid name, next to ordinary marks.
    #[tokio::test]
    async fn extreme_expiries_neither_overflow_nor_break_the_batch_or_the_purge() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(dir.path());
        let guard = ReplayGuard::load(Arc::clone(&store)).await.unwrap();
        let later = crate::clock::now_unix() + 300;
        let marks = [
            (ReplayKind::Nonce, "max", i64::MAX),
            (ReplayKind::Nonce, "min", i64::MIN),
            (ReplayKind::Signature, "negative", -1),
            (ReplayKind::RequestId, "ordinary", later),
        ];
        assert_eq!(guard.remember_all(&marks).await.unwrap(), None);
        assert_eq!(
            guard
                .remember(ReplayKind::Nonce, "max", later)
                .await
                .unwrap(),
            Seen::Replayed
        );
        guard.purge_expired().await.unwrap();
        guard.purge_expired().await.unwrap();
        store.close();
        let store = sqlite(dir.path());
        let guard = ReplayGuard::load(store).await.unwrap();
        for (kind, id) in [
            (ReplayKind::Nonce, "max"),
            (ReplayKind::RequestId, "ordinary"),
        ] {
            assert_eq!(
                guard.remember(kind, id, later).await.unwrap(),
                Seen::Replayed,
                "{id}"
            );
        }
        guard.purge_expired().await.unwrap();
    }

    #[tokio::test]
    async fn parked_marks_go_with_the_next_ones_or_at_settle_and_other_work_is_awaited() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Arc::new(crate::storage::sqlite::SqliteStorage::open(dir.path()).unwrap());
        let store: SharedStorage = sqlite.clone();
        let guard = Arc::new(ReplayGuard::load(Arc::clone(&store)).await.unwrap());
        let later = crate::clock::now_unix() + 300;
        // A proxy call: request id and signature parked, the ticket nonce takes them along.
        let before = sqlite.commit_stats().jobs;
        let barrier = Arc::new(DurabilityBarrier::default());
        let g = Arc::clone(&guard);
        barrier
            .scope(async move {
                let parked = [
                    (ReplayKind::RequestId, "req-1", later),
                    (ReplayKind::Signature, "sig-1", later),
                ];
                assert_eq!(g.remember_all_with_next(&parked).await.unwrap(), None);
                assert_eq!(
                    g.remember(ReplayKind::Nonce, "nonce-1", later)
                        .await
                        .unwrap(),
                    Seen::Fresh
                );
            })
            .await;
        barrier.settle(&guard).await.unwrap();
        assert_eq!(
            sqlite.commit_stats().jobs - before,
            1,
            "one job for the three marks"
        );
        // Parked with nothing after them (a call refused before its ticket): written at settle.
        let barrier = Arc::new(DurabilityBarrier::default());
        let g = Arc::clone(&guard);
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        barrier
            .scope(async move {
                let parked = [(ReplayKind::RequestId, "req-2", later)];
                assert_eq!(g.remember_all_with_next(&parked).await.unwrap(), None);
                let work: DurableWork = Box::pin(async move {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                });
                assert!(
                    defer_until_answer(work).is_none(),
                    "deferred inside a request"
                );
            })
            .await;
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        barrier.settle(&guard).await.unwrap();
        assert!(
            ran.load(std::sync::atomic::Ordering::SeqCst),
            "awaited at settle"
        );
        drop(guard);
        // Durable: a fresh load from the database knows all four marks.
        let reloaded = ReplayGuard::load(store).await.unwrap();
        for (kind, id) in [
            (ReplayKind::RequestId, "req-1"),
            (ReplayKind::Signature, "sig-1"),
            (ReplayKind::Nonce, "nonce-1"),
            (ReplayKind::RequestId, "req-2"),
        ] {
            assert_eq!(
                reloaded.remember(kind, id, later).await.unwrap(),
                Seen::Replayed,
                "{id}"
            );
        }
        // Outside a request, other work is handed back to be awaited by the caller.
        let work: DurableWork = Box::pin(async { Ok(()) });
        assert!(defer_until_answer(work).is_some());
    }

    #[tokio::test]
    async fn a_replayed_mark_leaves_the_others_of_its_call_unused() {
        let dir = tempfile::tempdir().unwrap();
        let guard = ReplayGuard::load(sqlite(dir.path())).await.unwrap();
        let later = crate::clock::now_unix() + 300;
        guard
            .remember(ReplayKind::Signature, "sig", later)
            .await
            .unwrap();
        let marks = [
            (ReplayKind::RequestId, "fresh-id", later),
            (ReplayKind::Signature, "sig", later),
        ];
        assert_eq!(
            guard.remember_all(&marks).await.unwrap(),
            Some(ReplayKind::Signature)
        );
        assert_eq!(
            guard
                .remember(ReplayKind::RequestId, "fresh-id", later)
                .await
                .unwrap(),
            Seen::Fresh,
            "not used up by the refused call"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod generation_tests {
    use super::*;

    #[test]
    fn marks_live_across_rotations_until_their_generation_expires() {
        let set = MarkSet::default();
        let (a, b) = (mark_key("a"), mark_key("b"));
        assert_eq!(set.check_and_insert(a, 1_100, 1_000).unwrap(), Seen::Fresh);
        assert_eq!(
            set.check_and_insert(a, 1_100, 1_000).unwrap(),
            Seen::Replayed
        );
        set.rotate(1_010);
        // Closed and compacted: still refused; a new mark goes to the new open generation.
        assert_eq!(
            set.check_and_insert(a, 1_100, 1_020).unwrap(),
            Seen::Replayed
        );
        assert_eq!(set.check_and_insert(b, 1_500, 1_020).unwrap(), Seen::Fresh);
        set.rotate(1_070);
        assert_eq!(set.len(), 2);
        // Past the first generation's expiry it is no longer consulted, and dropped at rotation.
        assert_eq!(
            set.check_and_insert(b, 1_500, 1_101).unwrap(),
            Seen::Replayed
        );
        set.rotate(1_101);
        assert_eq!(set.len(), 1);
        assert_eq!(set.check_and_insert(a, 1_700, 1_101).unwrap(), Seen::Fresh);
        // A forgotten mark (its durable write failed) is usable again, also once closed.
        set.rotate(1_110);
        set.forget(a);
        assert_eq!(set.check_and_insert(a, 1_700, 1_110).unwrap(), Seen::Fresh);
    }

    #[test]
    fn a_long_lived_mark_does_not_keep_its_generation_alive() {
        let set = MarkSet::default();
        let (short, long) = (mark_key("short"), mark_key("long"));
        assert_eq!(
            set.check_and_insert(short, 1_300, 1_000).unwrap(),
            Seen::Fresh
        );
        assert_eq!(
            set.check_and_insert(long, 4_900, 1_000).unwrap(),
            Seen::Fresh
        );
        set.rotate(1_060);
        assert_eq!(
            set.check_and_insert(long, 4_900, 1_100).unwrap(),
            Seen::Replayed
        );
        // The short mark's generation ends at its own expiry, not the long one's.
        set.rotate(1_301);
        assert_eq!(set.len(), 1);
        assert_eq!(
            set.check_and_insert(long, 4_900, 4_000).unwrap(),
            Seen::Replayed
        );
        set.rotate(4_901);
        assert_eq!(set.len(), 0);
        // Forgetting works for long marks too.
        assert_eq!(
            set.check_and_insert(long, 9_000, 5_000).unwrap(),
            Seen::Fresh
        );
        set.forget(long);
        assert_eq!(
            set.check_and_insert(long, 9_000, 5_000).unwrap(),
            Seen::Fresh
        );
    }

    #[test]
    fn concurrent_checks_of_one_key_let_exactly_one_through() {
        let set = Arc::new(MarkSet::default());
        let fresh = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..8 {
                let (set, fresh) = (Arc::clone(&set), &fresh);
                scope.spawn(move || {
                    for n in 0..2_000u64 {
                        if t == 0 && n % 500 == 0 {
                            set.rotate(1_000);
                        }
                        if set.check_and_insert(n, 2_000, 1_000).unwrap() == Seen::Fresh {
                            fresh.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(fresh.into_inner(), 2_000);
    }
}
