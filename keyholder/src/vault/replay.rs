//! Replay memory for platform request ids, ticket nonces and envelope nonces: checked in memory
//! (atomic check-and-insert), made durable before the request is answered, reloaded at start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rusqlite::params;
use sha2::{Digest, Sha256};

use super::VaultError;
use crate::store::{PendingWrite, Store};

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
    pending: Mutex<Vec<(ReplayKind, String, PendingWrite<()>)>>,
}

impl DurabilityBarrier {
    /// Runs `fut` (a request's handling) with this barrier in force.
    pub async fn scope<F: std::future::Future>(self: &Arc<Self>, fut: F) -> F::Output {
        DURABILITY.scope(Arc::clone(self), fut).await
    }

    fn defer(&self, kind: ReplayKind, id: String, write: PendingWrite<()>) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.push((kind, id, write));
        }
    }

    /// Waits until every mark made in the scope is committed. On failure the failed marks are
    /// forgotten (the request is answered 503 and may be retried) and the error is returned.
    pub async fn settle(&self, guard: &ReplayGuard) -> Result<(), VaultError> {
        let pending = match self.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return Err(VaultError::Corrupt("durability barrier lock".into())),
        };
        let mut failure = None;
        for (kind, id, write) in pending {
            if let Err(err) = write.await {
                guard.forget(kind, &id);
                failure.get_or_insert(err);
            }
        }
        match failure {
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }
}

/// In memory a mark is kept as the first 8 bytes of the SHA-256 of its id: fixed size (a fifth of a
/// `String` entry) whatever the id's length. A collision could only refuse a fresh id as a replay
/// (never accept a replay), ids and nonces are chosen by the signer, and with millions of live marks
/// the chance that a fresh id collides is about one in 10^12.
type MarkKey = u64;

fn mark_key(id: &str) -> MarkKey {
    let digest = Sha256::digest(id.as_bytes());
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(key)
}

/// Shards per mark set: a shard's rehash (as it grows) or purge holds only its own lock, so no
/// request waits on a rehash of millions of marks.
const SHARDS: usize = 64;

/// Marks of one kind, spread over independently locked shards by key.
struct MarkSet {
    shards: Vec<Mutex<HashMap<MarkKey, i64>>>,
}

impl Default for MarkSet {
    fn default() -> Self {
        MarkSet {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl MarkSet {
    fn shard(&self, key: MarkKey) -> &Mutex<HashMap<MarkKey, i64>> {
        // The key is already a hash: its low bits spread evenly.
        &self.shards[(key as usize) % SHARDS]
    }

    fn remember_max(&self, key: MarkKey, until: i64) {
        if let Ok(mut shard) = self.shard(key).lock() {
            let entry = shard.entry(key).or_insert(until);
            *entry = (*entry).max(until);
        }
    }

    fn retain_unexpired(&self, now: i64) {
        for shard in &self.shards {
            if let Ok(mut shard) = shard.lock() {
                shard.retain(|_, until| *until >= now);
            }
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.len()).unwrap_or(0))
            .sum()
    }
}

/// What is remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayKind {
    /// `X-TokenVault-Request-Id` values (600 s).
    RequestId,
    /// Ticket nonces (until the ticket's expiry plus the clock-skew allowance).
    Nonce,
    /// Ed25519 request-envelope nonces (until the envelope's timestamp plus the clock-skew allowance).
    EnvelopeNonce,
}

impl ReplayKind {
    /// Name in the legacy `replay_log` table.
    fn legacy_name(self) -> &'static str {
        match self {
            ReplayKind::RequestId => "request",
            ReplayKind::Nonce => "nonce",
            ReplayKind::EnvelopeNonce => "envelope",
        }
    }

    /// Stored code in `replay_marks`.
    fn code(self) -> i64 {
        match self {
            ReplayKind::RequestId => 1,
            ReplayKind::Nonce => 2,
            ReplayKind::EnvelopeNonce => 3,
        }
    }

    fn from_code(code: i64) -> Option<ReplayKind> {
        [
            ReplayKind::RequestId,
            ReplayKind::Nonce,
            ReplayKind::EnvelopeNonce,
        ]
        .into_iter()
        .find(|kind| kind.code() == code)
    }
}

/// Moves marks of the text-id `replay_log` (schema 5) into `replay_marks`, then drops it.
fn convert_legacy_marks(conn: &rusqlite::Connection) -> Result<(), crate::store::StoreError> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'replay_log')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(());
    }
    let rows = {
        let mut stmt = conn.prepare("SELECT kind, id, expires_at FROM replay_log")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows
    };
    let mut insert =
        conn.prepare("INSERT INTO replay_marks(kind, key, expires_at) VALUES (?1, ?2, ?3)")?;
    for (name, id, expires_at) in rows {
        let kind = [ReplayKind::RequestId, ReplayKind::EnvelopeNonce]
            .into_iter()
            .find(|k| k.legacy_name() == name)
            .unwrap_or(ReplayKind::Nonce);
        insert.execute(params![kind.code(), mark_key(&id) as i64, expires_at])?;
    }
    conn.execute_batch("DROP TABLE replay_log")?;
    Ok(())
}

/// Outcome of [`ReplayGuard::remember`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First use: now remembered durably.
    Fresh,
    /// Already used and not yet expired.
    Replayed,
}

/// In-memory sets backed by the `replay_marks` table.
pub struct ReplayGuard {
    store: Store,
    request_ids: MarkSet,
    nonces: MarkSet,
    envelope_nonces: MarkSet,
}

impl ReplayGuard {
    /// Loads every unexpired entry from the database (converting marks an older keyholder kept
    /// as text ids first).
    pub async fn load(store: Store) -> Result<ReplayGuard, VaultError> {
        store.write(convert_legacy_marks).await?;
        let now = crate::clock::now_unix();
        let rows = store
            .read(move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT kind, key, expires_at FROM replay_marks WHERE expires_at >= ?1",
                )?;
                let rows = stmt
                    .query_map([now], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        let guard = ReplayGuard {
            store,
            request_ids: MarkSet::default(),
            nonces: MarkSet::default(),
            envelope_nonces: MarkSet::default(),
        };
        for (kind, key, expires_at) in rows {
            // An unknown kind (a newer keyholder's) is kept as a nonce: refusing too much is safe.
            let kind = ReplayKind::from_code(kind).unwrap_or(ReplayKind::Nonce);
            guard.set(kind).remember_max(key as MarkKey, expires_at);
        }
        Ok(guard)
    }

    fn set(&self, kind: ReplayKind) -> &MarkSet {
        match kind {
            ReplayKind::RequestId => &self.request_ids,
            ReplayKind::Nonce => &self.nonces,
            ReplayKind::EnvelopeNonce => &self.envelope_nonces,
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
        let now = crate::clock::now_unix();
        {
            let key = mark_key(id);
            let mut shard = self
                .set(kind)
                .shard(key)
                .lock()
                .map_err(|_| VaultError::Corrupt("replay lock".into()))?;
            if let Some(&until) = shard.get(&key) {
                if until >= now {
                    return Ok(Seen::Replayed);
                }
            }
            shard.insert(key, expires_at);
        }
        let key = mark_key(id);
        let submitted = self.store.submit_statement(move |conn| {
            conn.prepare_cached(
                "INSERT INTO replay_marks(kind, key, expires_at) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![kind.code(), key as i64, expires_at])?;
            Ok(())
        });
        let result = match submitted {
            Ok(pending) => match DURABILITY.try_with(Arc::clone) {
                // Inside a request: the commit runs while the request is handled, and the HTTP
                // layer awaits it before the answer leaves.
                Ok(barrier) => {
                    barrier.defer(kind, id.to_string(), pending);
                    return Ok(Seen::Fresh);
                }
                Err(_) => pending.await,
            },
            Err(err) => Err(err),
        };
        if let Err(err) = result {
            // Not served, so not used: let the platform's retry through.
            self.forget(kind, id);
            return Err(err.into());
        }
        Ok(Seen::Fresh)
    }

    /// Drops a mark whose durable write failed (the request was not served).
    pub fn forget(&self, kind: ReplayKind, id: &str) {
        let key = mark_key(id);
        if let Ok(mut shard) = self.set(kind).shard(key).lock() {
            shard.remove(&key);
        }
    }

    /// Forgets expired entries in memory and on disk; returns how many were removed from disk.
    pub async fn purge_expired(&self) -> Result<usize, VaultError> {
        let now = crate::clock::now_unix();
        for kind in [
            ReplayKind::RequestId,
            ReplayKind::Nonce,
            ReplayKind::EnvelopeNonce,
        ] {
            self.set(kind).retain_unexpired(now);
        }
        let removed = self
            .store
            .write(move |conn| {
                Ok(conn.execute("DELETE FROM replay_marks WHERE expires_at < ?1", [now])?)
            })
            .await?;
        Ok(removed)
    }

    /// Entries held in memory (every kind), for metrics.
    pub fn len(&self) -> usize {
        self.request_ids.len() + self.nonces.len() + self.envelope_nonces.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn marks_survive_a_restart_and_legacy_marks_are_converted() {
        let dir = tempfile::tempdir().unwrap();
        let later = crate::clock::now_unix() + 300;
        {
            let store = Store::open(dir.path()).unwrap();
            // Rows as a schema-5 keyholder wrote them (one already expired).
            store
                .write(move |conn| {
                    conn.execute(
                        "INSERT INTO replay_log(kind, id, expires_at) VALUES
                         ('request', 'req-old', ?1), ('nonce', 'nonce-old', ?1),
                         ('envelope', 'env-old', ?1), ('nonce', 'gone', 1)",
                        [later],
                    )?;
                    Ok(())
                })
                .await
                .unwrap();
            let guard = ReplayGuard::load(store.clone()).await.unwrap();
            assert_eq!(guard.len(), 3, "the expired legacy mark is not loaded");
            let fresh = guard
                .remember(ReplayKind::Nonce, "nonce-new", later)
                .await
                .unwrap();
            assert_eq!(fresh, Seen::Fresh);
            store.close();
        }
        let store = Store::open(dir.path()).unwrap();
        let guard = ReplayGuard::load(store).await.unwrap();
        for (kind, id) in [
            (ReplayKind::RequestId, "req-old"),
            (ReplayKind::Nonce, "nonce-old"),
            (ReplayKind::EnvelopeNonce, "env-old"),
            (ReplayKind::Nonce, "nonce-new"),
        ] {
            let seen = guard.remember(kind, id, later).await.unwrap();
            assert_eq!(seen, Seen::Replayed, "{id} must be refused after a restart");
        }
        // Kinds are separate sets, and an expired mark is usable again.
        assert_eq!(
            guard
                .remember(ReplayKind::RequestId, "nonce-old", later)
                .await
                .unwrap(),
            Seen::Fresh
        );
        assert_eq!(
            guard
                .remember(ReplayKind::Nonce, "gone", later)
                .await
                .unwrap(),
            Seen::Fresh
        );
    }
}
