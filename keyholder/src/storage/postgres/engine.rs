//! The PostgreSQL engine: every repository of [`crate::storage::Storage`] over one database shared
//! by several replicas.
//!
//! Concurrency: SQLite's single writer makes every compound write serial; here several replicas
//! write at once, so each compound write states its own exclusion. Owner change sets and bind-code
//! exchanges take the owner advisory lock exclusively (they serialise like SQLite's writer); writes
//! that must not cross a key rotation (a sealed credential, a document swap under a data key
//! version) take it shared (they never wait on each other). Single-use and exact counts come from
//! row-level atomic statements (`UPDATE ... WHERE used_at IS NULL`, `INSERT ... ON CONFLICT DO
//! UPDATE SET count = count + n RETURNING count`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Pool};
use ed25519_dalek::VerifyingKey;
use keyholder_protocol::wire::Collection;
use tokio::sync::{broadcast, watch};

use super::notify::{self, OwnerSignal};
use super::replay::{self as marks, PgReplayMarks};
use super::{audit, PgError, PgTarget};
use crate::audit::{AuditEntry, AuditEvent, AuditFilter, AuditVerification, PruneBoundary};
use crate::storage::{
    grant_capped_uses, CappedUse, DocumentSwap, KeyRingSnapshot, UsageCommit, UsageTake,
};
use crate::storage::{
    Applied, ApprovalDecision, ApprovalRow, AttachmentRow, AuditLog, BindCode, Binding, ChangeSet,
    ChangeSets, Check, CredentialDocument, CredentialWrite, DocumentChange, Documents, EgressRow,
    EgressStore, Exchange, ExchangeInstall, ExchangeOutcome, ImportedField, KeyRingStore,
    LoadedMark, Mark, MarkCommit, OAuthClientRow, OAuthClients, PinRow, PolicyRow, PolicySnapshot,
    PolicyStore, RefusalRow, ReplayMarks, ScannedDocument, Setting, Settings, SharedSigner,
    Storage, StorageError, StorageResult, StoredDocument, StoredPlatformKey, SwapOutcome,
    UsageCounter, WrappedKey, Write,
};

/// Serialises owner change sets and exchanges (exclusive) against writes that must not cross a
/// key rotation (shared).
pub(super) const OWNER_LOCK: i64 = 0x4b48_0010;
/// Cross-references between audit chains are appended at most this often per replica.
const XREF_INTERVAL: Duration = Duration::from_secs(60);

impl From<PgError> for StorageError {
    fn from(err: PgError) -> Self {
        match err {
            PgError::Unavailable(text) => StorageError::Unavailable(text),
            PgError::Corrupt(text) => StorageError::Corrupt(text),
            PgError::Db(text) | PgError::Config(text) => StorageError::Engine(text),
        }
    }
}

fn pg(err: tokio_postgres::Error) -> StorageError {
    PgError::from(err).into()
}

/// `?` over a driver error.
trait PgResult<T> {
    fn db(self) -> StorageResult<T>;
}

impl<T> PgResult<T> for Result<T, tokio_postgres::Error> {
    fn db(self) -> StorageResult<T> {
        self.map_err(pg)
    }
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn version(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// The PostgreSQL engine of one replica.
pub struct PostgresStorage {
    target: PgTarget,
    pool: Pool,
    node: String,
    marks: PgReplayMarks,
    stores: super::stores::PgStores,
    signal: Arc<OwnerSignal>,
    generation: watch::Receiver<u64>,
    /// The connection holding the housekeeping lock, while this replica holds it.
    leader: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    last_xref: Mutex<Option<Instant>>,
    closed: AtomicBool,
}

impl PostgresStorage {
    /// Connects, migrates (under the migration lock) and starts the replay writer and the
    /// listener. `node` names this replica's audit chain.
    pub async fn open(target: PgTarget, node: &str) -> StorageResult<PostgresStorage> {
        super::schema::migrate(&target).await?;
        let pool = target.pool()?;
        {
            let client = super::client(&pool).await?;
            let now = crate::clock::now_unix();
            let current = marks::bucket_of(now);
            marks::ensure_partitions(
                &client,
                current - marks::KEEP_PAST_BUCKETS,
                current + marks::AHEAD_BUCKETS,
            )
            .await?;
        }
        let signal = notify::listen(target.clone(), node.to_string());
        let generation = read_generation(&super::client(&pool).await?).await?;
        let (tx, rx) = watch::channel(generation);
        // Follows the owner generation: at once on a notification, by polling otherwise.
        let (follow_pool, follow_signal) = (pool.clone(), Arc::clone(&signal));
        tokio::spawn(async move {
            loop {
                follow_signal.wait().await;
                if tx.is_closed() {
                    break;
                }
                let Ok(client) = super::client(&follow_pool).await else {
                    continue;
                };
                if let Ok(g) = read_generation(&client).await {
                    tx.send_if_modified(|seen| {
                        let moved = *seen != g;
                        *seen = g;
                        moved
                    });
                }
            }
        });
        Ok(PostgresStorage {
            marks: PgReplayMarks::start(pool.clone()),
            stores: super::stores::PgStores::start(pool.clone(), node.to_string()),
            target,
            pool,
            node: node.to_string(),
            signal,
            generation: rx,
            leader: tokio::sync::Mutex::new(None),
            last_xref: Mutex::new(None),
            closed: AtomicBool::new(false),
        })
    }

    /// This replica's node id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The database (without its password).
    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Every audit chain verified (one per replica).
    pub async fn verify_chains(
        &self,
        key: &VerifyingKey,
    ) -> StorageResult<Vec<audit::ChainVerification>> {
        let mut client = self.client().await?;
        Ok(audit::verify_all(&mut client, key).await?)
    }

    /// Prunes every chain's entries older than `before_ms` (see [`audit::prune_before`]).
    pub async fn prune_chains(
        &self,
        signer: &SharedSigner,
        before_ms: i64,
        source: &str,
    ) -> StorageResult<u64> {
        let mut client = self.client().await?;
        Ok(audit::prune_before(&mut client, signer.as_ref(), before_ms, source).await?)
    }

    async fn client(&self) -> StorageResult<deadpool_postgres::Object> {
        self.ensure_open()?;
        Ok(super::client(&self.pool).await?)
    }

    fn ensure_open(&self) -> StorageResult<()> {
        match self.closed.load(Ordering::Acquire) {
            true => Err(StorageError::Unavailable("storage closed".into())),
            false => Ok(()),
        }
    }
}

impl Storage for PostgresStorage {
    fn engine(&self) -> &'static str {
        "postgres"
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

async fn read_generation(client: &impl GenericClient) -> Result<u64, PgError> {
    let row = client
        .query_opt(
            "SELECT value FROM settings WHERE name = $1",
            &[&Setting::OwnerGeneration.name()],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, String>(0).parse().ok())
        .unwrap_or(0))
}

async fn get_setting(client: &impl GenericClient, s: Setting) -> StorageResult<Option<String>> {
    Ok(client
        .query_opt("SELECT value FROM settings WHERE name = $1", &[&s.name()])
        .await
        .db()?
        .map(|r| r.get(0)))
}

async fn put_setting(client: &impl GenericClient, s: Setting, value: &str) -> StorageResult<()> {
    client
        .execute(
            "INSERT INTO settings (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            &[&s.name(), &value],
        )
        .await
        .db()?;
    Ok(())
}

/// Bumps the owner generation in the caller's transaction and announces it (at commit).
async fn bump_generation(client: &impl GenericClient) -> StorageResult<u64> {
    let row = client
        .query_one(
            "INSERT INTO settings (name, value) VALUES ($1, '1')
             ON CONFLICT (name) DO UPDATE SET value = (CAST(settings.value AS BIGINT) + 1)::text
             RETURNING value",
            &[&Setting::OwnerGeneration.name()],
        )
        .await
        .db()?;
    let value: String = row.get(0);
    notify::announce(client, &value).await?;
    Ok(value.parse().unwrap_or(0))
}

async fn owner_lock(client: &impl GenericClient, shared: bool) -> StorageResult<()> {
    let sql = if shared {
        "SELECT pg_advisory_xact_lock_shared($1)"
    } else {
        "SELECT pg_advisory_xact_lock($1)"
    };
    client.execute(sql, &[&OWNER_LOCK]).await.db()?;
    Ok(())
}

async fn announce_document(
    client: &impl GenericClient,
    node: &str,
    collection: Collection,
    key: &str,
) -> StorageResult<()> {
    let payload = notify::document_payload(node, collection, key);
    client
        .execute(
            "SELECT pg_notify($1, $2)",
            &[&notify::DOCS_CHANNEL, &payload],
        )
        .await
        .db()?;
    Ok(())
}

async fn get_document(
    client: &impl GenericClient,
    collection: Collection,
    key: &str,
) -> StorageResult<Option<String>> {
    let stmt = client
        .prepare_cached("SELECT doc FROM documents WHERE collection = $1 AND key = $2")
        .await
        .db()?;
    Ok(client
        .query_opt(&stmt, &[&collection.as_str(), &key])
        .await
        .db()?
        .map(|r| r.get(0)))
}

async fn put_document(
    client: &impl GenericClient,
    collection: Collection,
    key: &str,
    doc: &str,
    now: i64,
) -> StorageResult<()> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO documents (collection, key, doc, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (collection, key) DO UPDATE SET doc = excluded.doc,
                updated_at = excluded.updated_at",
        )
        .await
        .db()?;
    client
        .execute(&stmt, &[&collection.as_str(), &key, &doc, &now])
        .await
        .db()?;
    Ok(())
}

fn stored_documents(rows: Vec<tokio_postgres::Row>) -> Vec<StoredDocument> {
    rows.iter()
        .map(|r| StoredDocument {
            key: r.get(0),
            doc: r.get(1),
        })
        .collect()
}

#[async_trait]
impl Settings for PostgresStorage {
    async fn setting(&self, setting: Setting) -> StorageResult<Option<String>> {
        get_setting(&self.client().await?, setting).await
    }

    async fn settings(&self, which: &[Setting]) -> StorageResult<Vec<Option<String>>> {
        let names: Vec<&str> = which.iter().map(|s| s.name()).collect();
        let rows = self
            .client()
            .await?
            .query(
                "SELECT name, value FROM settings WHERE name = ANY($1)",
                &[&names],
            )
            .await
            .db()?;
        let found: std::collections::HashMap<String, String> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(names.iter().map(|n| found.get(*n).cloned()).collect())
    }

    async fn put_setting(&self, setting: Setting, value: &str) -> StorageResult<()> {
        put_setting(&self.client().await?, setting, value).await
    }

    async fn owner_generation(&self) -> StorageResult<u64> {
        Ok(read_generation(&self.client().await?).await?)
    }

    async fn bump_owner_generation(&self) -> StorageResult<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        let g = bump_generation(&tx).await?;
        tx.commit().await.db()?;
        Ok(g)
    }

    fn watch_owner_generation(&self) -> Option<watch::Receiver<u64>> {
        Some(self.generation.clone())
    }

    async fn housekeeping_turn(&self, _job: &str) -> StorageResult<bool> {
        let mut leader = self.leader.lock().await;
        if let Some(client) = leader.as_ref() {
            if !client.is_closed() && client.simple_query("SELECT 1").await.is_ok() {
                return Ok(true);
            }
        }
        *leader = None;
        let client = self.target.connect().await?;
        let got: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1)",
                &[&super::schema::HOUSEKEEPING_LOCK],
            )
            .await
            .db()?
            .get(0);
        if got {
            *leader = Some(client);
        }
        Ok(got)
    }
}

#[async_trait]
impl Documents for PostgresStorage {
    async fn document(&self, collection: Collection, key: &str) -> StorageResult<Option<String>> {
        get_document(&self.client().await?, collection, key).await
    }

    async fn documents(&self, collection: Collection) -> StorageResult<Vec<StoredDocument>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT key, doc FROM documents WHERE collection = $1 ORDER BY key",
                &[&collection.as_str()],
            )
            .await
            .db()?;
        Ok(stored_documents(rows))
    }

    async fn documents_after(
        &self,
        collection: Collection,
        after: &str,
        limit: usize,
    ) -> StorageResult<Vec<StoredDocument>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .client()
            .await?
            .query(
                "SELECT key, doc FROM documents WHERE collection = $1 AND key > $2
                 ORDER BY key LIMIT $3",
                &[&collection.as_str(), &after, &limit],
            )
            .await
            .db()?;
        Ok(stored_documents(rows))
    }

    async fn scan_documents(&self, needle: &str) -> StorageResult<Vec<ScannedDocument>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT collection, key, doc FROM documents WHERE strpos(doc, $1) > 0
                 ORDER BY collection, key",
                &[&needle],
            )
            .await
            .db()?;
        rows.iter()
            .map(|r| {
                let name: String = r.get(0);
                let collection = Collection::parse(&name)
                    .ok_or_else(|| StorageError::Corrupt(format!("unknown collection {name}")))?;
                Ok(ScannedDocument {
                    collection,
                    key: r.get(1),
                    doc: r.get(2),
                })
            })
            .collect()
    }

    async fn count_documents(&self, collection: Option<Collection>) -> StorageResult<u64> {
        let name = collection.map(|c| c.as_str());
        let n: i64 = self
            .client()
            .await?
            .query_one(
                "SELECT COUNT(*) FROM documents WHERE $1::text IS NULL OR collection = $1",
                &[&name],
            )
            .await
            .db()?
            .get(0);
        Ok(unsigned(n))
    }

    async fn put_document(
        &self,
        collection: Collection,
        key: &str,
        doc: &str,
        now: i64,
    ) -> StorageResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        put_document(&tx, collection, key, doc, now).await?;
        announce_document(&tx, &self.node, collection, key).await?;
        tx.commit().await.db()
    }

    async fn delete_document(&self, collection: Collection, key: &str) -> StorageResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        tx.execute(
            "DELETE FROM documents WHERE collection = $1 AND key = $2",
            &[&collection.as_str(), &key],
        )
        .await
        .db()?;
        announce_document(&tx, &self.node, collection, key).await?;
        tx.commit().await.db()
    }

    async fn swap_document(&self, swap: DocumentSwap) -> StorageResult<SwapOutcome> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        if let Some(version) = swap.data_version {
            owner_lock(&tx, true).await?;
            let current = get_setting(&tx, Setting::DataVersion).await?;
            if current.as_deref() != Some(version.to_string().as_str()) {
                return Ok(SwapOutcome::KeyRingChanged);
            }
        }
        let n = tx
            .execute(
                "UPDATE documents SET doc = $4, updated_at = $5
                 WHERE collection = $1 AND key = $2 AND doc = $3",
                &[
                    &swap.collection.as_str(),
                    &swap.key,
                    &swap.expected,
                    &swap.doc,
                    &swap.now,
                ],
            )
            .await
            .db()?;
        if n > 0 {
            announce_document(&tx, &self.node, swap.collection, &swap.key).await?;
        }
        tx.commit().await.db()?;
        Ok(if n > 0 {
            SwapOutcome::Swapped
        } else {
            SwapOutcome::Changed
        })
    }

    async fn store_credential(&self, write: CredentialDocument) -> StorageResult<CredentialWrite> {
        self.ensure_open()?;
        // Group-committed with the stores of concurrent requests (see `stores`).
        self.stores.store(write).await
    }

    async fn is_legacy_minting(&self, service: &str) -> StorageResult<bool> {
        Ok(self
            .client()
            .await?
            .query_opt(
                "SELECT 1 FROM legacy_minting WHERE service = $1",
                &[&service],
            )
            .await
            .db()?
            .is_some())
    }

    fn watch_documents(&self) -> Option<broadcast::Receiver<DocumentChange>> {
        Some(self.signal.documents())
    }
}

fn code_of(r: &tokio_postgres::Row) -> BindCode {
    BindCode {
        code_hash: r.get(0),
        created_at: r.get(1),
        expires_at: r.get(2),
        used_at: r.get(3),
        rebind: r.get::<_, i64>(4) != 0,
        hmac_hash: r.get(5),
        pending_secret: r.get(6),
        platform_key: r.get(7),
    }
}

async fn latest_version(client: &impl GenericClient, kind: &str) -> StorageResult<u32> {
    let v: i64 = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM keyring WHERE kind = $1",
            &[&kind],
        )
        .await
        .db()?
        .get(0);
    Ok(version(v))
}

async fn put_key(client: &impl GenericClient, key: &WrappedKey) -> StorageResult<()> {
    client
        .execute(
            "INSERT INTO keyring (kind, version, wrapped, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (kind, version) DO UPDATE SET wrapped = excluded.wrapped",
            &[
                &key.kind,
                &i64::from(key.version),
                &key.wrapped,
                &key.created_at,
            ],
        )
        .await
        .db()?;
    Ok(())
}

async fn install_hmac(
    client: &impl GenericClient,
    key: &WrappedKey,
    hash: &str,
) -> StorageResult<()> {
    put_key(client, key).await?;
    client
        .execute(
            "DELETE FROM keyring WHERE kind = $1 AND version < $2",
            &[&key.kind, &i64::from(key.version)],
        )
        .await
        .db()?;
    put_setting(client, Setting::HmacVersion, &key.version.to_string()).await?;
    put_setting(client, Setting::HmacHash, hash).await
}

async fn insert_platform_key(
    client: &impl GenericClient,
    key: &StoredPlatformKey,
) -> StorageResult<()> {
    client
        .execute(
            "INSERT INTO platform_keys (key_id, public_key, added_at) VALUES ($1, $2, $3)",
            &[&key.key_id, &key.public_key, &key.added_at],
        )
        .await
        .db()?;
    Ok(())
}

async fn exchange_in(
    tx: &deadpool_postgres::Transaction<'_>,
    ex: &Exchange,
) -> StorageResult<ExchangeOutcome> {
    let Some(row) = tx
        .query_opt(
            "SELECT code_hash, created_at, expires_at, used_at, rebind, hmac_hash, pending_secret,
                    platform_key FROM bind_codes WHERE code_hash = $1 FOR UPDATE",
            &[&ex.code_hash],
        )
        .await
        .db()?
    else {
        return Ok(ExchangeOutcome::Expired);
    };
    let code = code_of(&row);
    if code.used_at.is_some() {
        return Ok(ExchangeOutcome::Used);
    }
    if code.expires_at < ex.now {
        return Ok(ExchangeOutcome::Expired);
    }
    let used = tx
        .execute(
            "UPDATE bind_codes SET used_at = $1 WHERE code_hash = $2 AND used_at IS NULL",
            &[&ex.now, &ex.code_hash],
        )
        .await
        .db()?;
    if used == 0 {
        return Ok(ExchangeOutcome::Used);
    }
    let bound = get_setting(tx, Setting::Bound).await?.as_deref() == Some("true");
    if (bound || ex.bound_in_memory) && !code.rebind {
        return Ok(ExchangeOutcome::AlreadyBound);
    }
    if get_setting(tx, Setting::MasterCheck).await?.as_deref() != Some(ex.master_check.as_str()) {
        return Err(rollback(ExchangeOutcome::MasterKeyChanged));
    }
    match &ex.install {
        ExchangeInstall::KeepHmac => {
            tx.execute("DELETE FROM platform_keys", &[]).await.db()?;
            put_setting(tx, Setting::PlatformScheme, "hmac").await?;
        }
        ExchangeInstall::NewHmac { key, hash } => {
            if latest_version(tx, &key.kind).await? + 1 != key.version {
                return Err(rollback(ExchangeOutcome::KeyRingChanged));
            }
            tx.execute("DELETE FROM platform_keys", &[]).await.db()?;
            put_setting(tx, Setting::PlatformScheme, "hmac").await?;
            install_hmac(tx, key, hash).await?;
            tx.execute(
                "UPDATE bind_codes SET pending_secret = NULL WHERE code_hash = $1",
                &[&ex.code_hash],
            )
            .await
            .db()?;
        }
        ExchangeInstall::Ed25519 {
            platform_key,
            key,
            hash,
        } => {
            if latest_version(tx, &key.kind).await? + 1 != key.version {
                return Err(rollback(ExchangeOutcome::KeyRingChanged));
            }
            install_hmac(tx, key, hash).await?;
            tx.execute("DELETE FROM platform_keys", &[]).await.db()?;
            insert_platform_key(tx, platform_key).await?;
            put_setting(tx, Setting::PlatformScheme, "ed25519").await?;
        }
    }
    put_setting(tx, Setting::Bound, "true").await?;
    put_setting(tx, Setting::BoundAt, &ex.now.to_string()).await?;
    bump_generation(tx).await?;
    Ok(ExchangeOutcome::Exchanged)
}

/// An outcome that must leave nothing written (the code stays unused): carried as an error so
/// that the transaction is rolled back, then turned back into the outcome.
fn rollback(outcome: ExchangeOutcome) -> StorageError {
    StorageError::Engine(format!("rollback:{outcome:?}"))
}

fn rolled_back(err: &StorageError) -> Option<ExchangeOutcome> {
    match err {
        StorageError::Engine(text) => match text.strip_prefix("rollback:")? {
            "MasterKeyChanged" => Some(ExchangeOutcome::MasterKeyChanged),
            "KeyRingChanged" => Some(ExchangeOutcome::KeyRingChanged),
            _ => None,
        },
        _ => None,
    }
}

#[async_trait]
impl Binding for PostgresStorage {
    async fn insert_bind_code(
        &self,
        code: BindCode,
        forget_before: i64,
        public_url: &str,
        frontend_url: &str,
    ) -> StorageResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        tx.execute(
            "INSERT INTO bind_codes (code_hash, created_at, expires_at, used_at, rebind, hmac_hash,
                                     pending_secret, platform_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &code.code_hash,
                &code.created_at,
                &code.expires_at,
                &code.used_at,
                &i64::from(code.rebind),
                &code.hmac_hash,
                &code.pending_secret,
                &code.platform_key,
            ],
        )
        .await
        .db()?;
        tx.execute(
            "DELETE FROM bind_codes WHERE expires_at < $1",
            &[&forget_before],
        )
        .await
        .db()?;
        put_setting(&tx, Setting::PublicUrl, public_url).await?;
        put_setting(&tx, Setting::FrontendUrl, frontend_url).await?;
        tx.commit().await.db()
    }

    async fn bind_code(&self, code_hash: &str) -> StorageResult<Option<BindCode>> {
        Ok(self
            .client()
            .await?
            .query_opt(
                "SELECT code_hash, created_at, expires_at, used_at, rebind, hmac_hash,
                        pending_secret, platform_key FROM bind_codes WHERE code_hash = $1",
                &[&code_hash],
            )
            .await
            .db()?
            .map(|r| code_of(&r)))
    }

    async fn exchange(&self, ex: Exchange) -> StorageResult<ExchangeOutcome> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        owner_lock(&tx, false).await?;
        match exchange_in(&tx, &ex).await {
            Ok(outcome) => {
                tx.commit().await.db()?;
                Ok(outcome)
            }
            Err(err) => {
                let _ = tx.rollback().await;
                rolled_back(&err).map(Ok).unwrap_or(Err(err))
            }
        }
    }

    async fn pending_secrets(&self) -> StorageResult<Vec<(String, Vec<u8>)>> {
        Ok(self
            .client()
            .await?
            .query(
                "SELECT code_hash, pending_secret FROM bind_codes WHERE pending_secret IS NOT NULL",
                &[],
            )
            .await
            .db()?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    async fn platform_keys(&self) -> StorageResult<Vec<StoredPlatformKey>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT key_id, public_key, added_at FROM platform_keys ORDER BY added_at, key_id",
                &[],
            )
            .await
            .db()?;
        Ok(rows
            .iter()
            .map(|r| StoredPlatformKey {
                key_id: r.get(0),
                public_key: r.get(1),
                added_at: r.get(2),
            })
            .collect())
    }
}

fn imported_of(rows: Vec<tokio_postgres::Row>) -> StorageResult<Vec<ImportedField>> {
    rows.iter()
        .map(|r| {
            let digest: &[u8] = r.get(0);
            Ok(ImportedField {
                digest: digest.try_into().map_err(|_| {
                    StorageError::Corrupt("imported_v1_fields digest length".into())
                })?,
                service: r.get(1),
                field: r.get(2),
            })
        })
        .collect()
}

fn platform_keys_of(rows: Vec<tokio_postgres::Row>) -> Vec<StoredPlatformKey> {
    rows.iter()
        .map(|r| StoredPlatformKey {
            key_id: r.get(0),
            public_key: r.get(1),
            added_at: r.get(2),
        })
        .collect()
}

fn key_of(r: &tokio_postgres::Row) -> WrappedKey {
    WrappedKey {
        kind: r.get(0),
        version: version(r.get(1)),
        wrapped: r.get(2),
        created_at: r.get(3),
    }
}

#[async_trait]
impl KeyRingStore for PostgresStorage {
    async fn key_ring_snapshot(&self) -> StorageResult<KeyRingSnapshot> {
        let mut client = self.client().await?;
        let tx = super::snapshot(&mut client).await.db()?;
        let stored: std::collections::HashMap<String, String> = tx
            .query("SELECT name, value FROM settings", &[])
            .await
            .db()?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let settings = Setting::ALL
            .into_iter()
            .filter_map(|s| stored.get(s.name()).map(|v| (s, v.clone())))
            .collect();
        let keys = tx
            .query(
                "SELECT kind, version, wrapped, created_at FROM keyring ORDER BY kind, version",
                &[],
            )
            .await
            .db()?
            .iter()
            .map(key_of)
            .collect();
        let imported = imported_of(
            tx.query("SELECT digest, service, field FROM imported_v1_fields", &[])
                .await
                .db()?,
        )?;
        let platform_keys = platform_keys_of(
            tx.query(
                "SELECT key_id, public_key, added_at FROM platform_keys ORDER BY added_at, key_id",
                &[],
            )
            .await
            .db()?,
        );
        tx.commit().await.db()?;
        Ok(KeyRingSnapshot {
            settings,
            keys,
            imported,
            platform_keys,
        })
    }

    async fn wrapped_keys(&self) -> StorageResult<Vec<WrappedKey>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT kind, version, wrapped, created_at FROM keyring ORDER BY kind, version",
                &[],
            )
            .await
            .db()?;
        Ok(rows.iter().map(key_of).collect())
    }

    async fn wrapped_key(&self, kind: &str, version: u32) -> StorageResult<Option<WrappedKey>> {
        Ok(self
            .client()
            .await?
            .query_opt(
                "SELECT kind, version, wrapped, created_at FROM keyring
                 WHERE kind = $1 AND version = $2",
                &[&kind, &i64::from(version)],
            )
            .await
            .db()?
            .map(|r| key_of(&r)))
    }

    async fn latest_key_version(&self, kind: &str) -> StorageResult<u32> {
        latest_version(&self.client().await?, kind).await
    }

    async fn imported_fields(&self) -> StorageResult<Vec<ImportedField>> {
        let rows = self
            .client()
            .await?
            .query("SELECT digest, service, field FROM imported_v1_fields", &[])
            .await
            .db()?;
        imported_of(rows)
    }
}

/// Serialises writes about one service's egress state across replicas (pin counts, refusals).
async fn service_lock(client: &impl GenericClient, service: &str) -> StorageResult<()> {
    client
        .execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('egress:' || $1, 0))",
            &[&service],
        )
        .await
        .db()?;
    Ok(())
}

async fn put_egress_policy(
    client: &impl GenericClient,
    row: &EgressRow,
    now: i64,
) -> StorageResult<()> {
    let allowlist =
        serde_json::to_string(&row.allowlist).map_err(|e| StorageError::Corrupt(e.to_string()))?;
    client
        .execute(
            "INSERT INTO egress_policies (service, mode, allowlist, token_url, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (service) DO UPDATE SET mode = excluded.mode,
                allowlist = excluded.allowlist, token_url = excluded.token_url,
                updated_at = excluded.updated_at",
            &[&row.service, &row.mode, &allowlist, &row.token_url, &now],
        )
        .await
        .db()?;
    Ok(())
}

#[async_trait]
impl EgressStore for PostgresStorage {
    async fn egress_policy(
        &self,
        service: &str,
    ) -> StorageResult<(Option<EgressRow>, Vec<PinRow>)> {
        let mut client = self.client().await?;
        let tx = super::snapshot(&mut client).await.db()?;
        let row = tx
            .query_opt(
                "SELECT mode, allowlist, token_url FROM egress_policies WHERE service = $1",
                &[&service],
            )
            .await
            .db()?;
        let Some(row) = row else {
            tx.commit().await.db()?;
            return Ok((None, Vec::new()));
        };
        let allowlist: String = row.get(1);
        let allowlist: Vec<String> = serde_json::from_str(&allowlist)
            .map_err(|e| StorageError::Corrupt(format!("egress allowlist of {service}: {e}")))?;
        let pins = tx
            .query(
                "SELECT origin, pinned_at, credential FROM egress_pins WHERE service = $1
                 ORDER BY pinned_at DESC, origin",
                &[&service],
            )
            .await
            .db()?
            .iter()
            .map(|r| PinRow {
                origin: r.get(0),
                pinned_at: r.get(1),
                credential: r.get(2),
            })
            .collect();
        tx.commit().await.db()?;
        Ok((
            Some(EgressRow {
                service: service.to_string(),
                mode: row.get(0),
                allowlist,
                token_url: row.get(2),
            }),
            pins,
        ))
    }

    async fn egress_services(&self) -> StorageResult<Vec<String>> {
        Ok(self
            .client()
            .await?
            .query("SELECT service FROM egress_policies ORDER BY service", &[])
            .await
            .db()?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn claim_pin(
        &self,
        service: &str,
        credential: &str,
        origin: &str,
        now: i64,
        max_pins: i64,
    ) -> StorageResult<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        service_lock(&tx, service).await?;
        tx.execute(
            "INSERT INTO egress_pins (service, credential, origin, pinned_at)
             SELECT $1, $2, $3, $4
             WHERE EXISTS (SELECT 1 FROM egress_policies WHERE service = $1 AND mode = 'pinned')
               AND EXISTS (SELECT 1 FROM documents WHERE collection = 'tokens' AND key = $1)
               AND (SELECT COUNT(*) FROM egress_pins WHERE service = $1) < $5
             ON CONFLICT (service, credential) DO NOTHING",
            &[&service, &credential, &origin, &now, &max_pins],
        )
        .await
        .db()?;
        let pinned: Option<String> = tx
            .query_opt(
                "SELECT origin FROM egress_pins WHERE service = $1 AND credential = $2",
                &[&service, &credential],
            )
            .await
            .db()?
            .map(|r| r.get(0));
        tx.commit().await.db()?;
        Ok(pinned.as_deref() == Some(origin))
    }

    async fn release_pin(
        &self,
        service: &str,
        credential: &str,
        origin: &str,
    ) -> StorageResult<()> {
        self.client()
            .await?
            .execute(
                "DELETE FROM egress_pins WHERE service = $1 AND credential = $2 AND origin = $3",
                &[&service, &credential, &origin],
            )
            .await
            .db()?;
        Ok(())
    }

    async fn claim_token_url(
        &self,
        service: &str,
        token_url: &str,
        now: i64,
    ) -> StorageResult<(bool, Option<String>)> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        tx.execute(
            "INSERT INTO egress_policies (service, mode, updated_at) VALUES ($1, 'known', $2)
             ON CONFLICT (service) DO NOTHING",
            &[&service, &now],
        )
        .await
        .db()?;
        let claimed = tx
            .execute(
                "UPDATE egress_policies SET token_url = $2, updated_at = $3
                 WHERE service = $1 AND token_url IS NULL",
                &[&service, &token_url, &now],
            )
            .await
            .db()?
            > 0;
        let pinned: Option<String> = tx
            .query_one(
                "SELECT token_url FROM egress_policies WHERE service = $1",
                &[&service],
            )
            .await
            .db()?
            .get(0);
        tx.commit().await.db()?;
        Ok((claimed, pinned))
    }

    async fn release_token_url(&self, service: &str, token_url: &str) -> StorageResult<()> {
        self.client()
            .await?
            .execute(
                "UPDATE egress_policies SET token_url = NULL WHERE service = $1 AND token_url = $2",
                &[&service, &token_url],
            )
            .await
            .db()?;
        Ok(())
    }

    async fn record_refusal(
        &self,
        service: &str,
        origin: &str,
        now: i64,
        max_pending: i64,
    ) -> StorageResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        service_lock(&tx, "refusals").await?;
        let updated = tx
            .execute(
                "UPDATE egress_refusals SET count = count + 1, last_at = $3
                 WHERE service = $1 AND origin = $2",
                &[&service, &origin, &now],
            )
            .await
            .db()?;
        if updated == 0 {
            tx.execute(
                "INSERT INTO egress_refusals (service, origin, count, last_at)
                 SELECT $1, $2, 1, $3 WHERE (SELECT COUNT(*) FROM egress_refusals) < $4",
                &[&service, &origin, &now, &max_pending],
            )
            .await
            .db()?;
        }
        tx.commit().await.db()
    }

    async fn refusals(&self) -> StorageResult<Vec<RefusalRow>> {
        Ok(self
            .client()
            .await?
            .query(
                "SELECT service, origin, count, last_at FROM egress_refusals
                 ORDER BY last_at DESC, service, origin",
                &[],
            )
            .await
            .db()?
            .iter()
            .map(|r| RefusalRow {
                service: r.get(0),
                origin: r.get(1),
                count: r.get(2),
                last_at: r.get(3),
            })
            .collect())
    }
}

/// Adds the increments in one statement; each counter's count after the add, in order.
/// A `(policy, target, period, count)` row of `policy_usage`.
fn usage_row(r: &tokio_postgres::Row) -> (UsageCounter, u64) {
    (
        UsageCounter {
            policy: r.get(0),
            target: r.get(1),
            period: r.get(2),
        },
        unsigned(r.get(3)),
    )
}

async fn add_usage_on(
    client: &impl GenericClient,
    increments: Vec<(UsageCounter, u64)>,
) -> StorageResult<Vec<u64>> {
    if increments.is_empty() {
        return Ok(Vec::new());
    }
    // One statement, rows in key order (replicas adding to the same counters lock them in
    // the same order: no deadlock); duplicates folded first.
    let mut folded: std::collections::BTreeMap<&UsageCounter, i64> = Default::default();
    for (key, n) in &increments {
        *folded.entry(key).or_default() += signed(*n);
    }
    let (mut p, mut t, mut d, mut n) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (key, add) in &folded {
        p.push(key.policy.as_str());
        t.push(key.target.as_str());
        d.push(key.period.as_str());
        n.push(*add);
    }
    let rows = client
        .query(
            "INSERT INTO policy_usage (policy, target, period, count)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) ORDER BY 1, 2, 3
             ON CONFLICT (policy, target, period) DO UPDATE
                SET count = policy_usage.count + excluded.count
             RETURNING policy, target, period, count",
            &[&p, &t, &d, &n],
        )
        .await
        .db()?;
    let after: std::collections::HashMap<(String, String, String), i64> = rows
        .iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3)))
        .collect();
    // A counter named twice in one call: each reports its own share of the total, in order.
    let mut taken: std::collections::HashMap<&UsageCounter, i64> = Default::default();
    increments
        .iter()
        .map(|(key, add)| {
            let total = *after
                .get(&(key.policy.clone(), key.target.clone(), key.period.clone()))
                .ok_or_else(|| StorageError::Corrupt("usage counter not returned".into()))?;
            let folded_add = folded.get(key).copied().unwrap_or(0);
            let before_this = taken.entry(key).or_default();
            *before_this += signed(*add);
            Ok(unsigned(total - folded_add + *before_this))
        })
        .collect()
}

fn decision(text: &str) -> ApprovalDecision {
    match text {
        "approved" => ApprovalDecision::Approved,
        "denied" => ApprovalDecision::Denied,
        _ => ApprovalDecision::TimedOut,
    }
}

const APPROVAL_COLUMNS: &str =
    "id, policy, service, agent, client, endpoint, created_at, expires_at";

fn approval_at(r: &tokio_postgres::Row, at: usize) -> ApprovalRow {
    ApprovalRow {
        id: r.get(at),
        policy: r.get(at + 1),
        service: r.get(at + 2),
        agent: r.get(at + 3),
        client: r.get(at + 4),
        endpoint: r.get(at + 5),
        created_at: r.get(at + 6),
        expires_at: r.get(at + 7),
    }
}

async fn decide(
    client: &impl GenericClient,
    id: &str,
    approve: bool,
    now: i64,
) -> StorageResult<bool> {
    let verdict = if approve { "approved" } else { "denied" };
    let changed = client
        .execute(
            "UPDATE policy_approvals SET decision = $2, decided_at = $3
             WHERE id = $1 AND decision IS NULL AND expires_at > $3",
            &[&id, &verdict, &now],
        )
        .await
        .db()?;
    client
        .execute(
            "DELETE FROM policy_approvals WHERE expires_at < $1",
            &[&(now - 86_400)],
        )
        .await
        .db()?;
    Ok(changed > 0)
}

#[async_trait]
impl PolicyStore for PostgresStorage {
    async fn policy_snapshot(&self) -> StorageResult<PolicySnapshot> {
        let mut client = self.client().await?;
        let tx = super::snapshot(&mut client).await.db()?;
        let policies = tx
            .query(
                "SELECT name, rules, source FROM policies ORDER BY name",
                &[],
            )
            .await
            .db()?
            .iter()
            .map(|r| PolicyRow {
                name: r.get(0),
                rules: r.get(1),
                source: r.get(2),
            })
            .collect();
        let attachments = tx
            .query(
                "SELECT policy, kind, target, source FROM policy_attachments
                 ORDER BY policy, kind, target",
                &[],
            )
            .await
            .db()?
            .iter()
            .map(|r| AttachmentRow {
                policy: r.get(0),
                kind: r.get(1),
                target: r.get(2),
                source: r.get(3),
            })
            .collect();
        let usage = tx
            .query(
                "SELECT policy, target, period, count FROM policy_usage",
                &[],
            )
            .await
            .db()?
            .iter()
            .map(usage_row)
            .collect();
        tx.commit().await.db()?;
        Ok(PolicySnapshot {
            policies,
            attachments,
            usage,
        })
    }

    async fn add_usage(&self, increments: Vec<(UsageCounter, u64)>) -> StorageResult<Vec<u64>> {
        add_usage_on(&self.client().await?, increments).await
    }

    fn queue_usage(&self, take: UsageTake) -> UsageCommit {
        let (reply, commit) = UsageCommit::channel();
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let written = async {
                let client = super::client(&pool).await?;
                // Taken only now that a connection is in hand: uses counted meanwhile join it.
                let increments = take();
                add_usage_on(&client, increments).await.map(|_| ())
            }
            .await;
            let _ = reply.send(written);
        });
        commit
    }

    fn usage_shared(&self) -> bool {
        true
    }

    async fn take_capped_uses(&self, uses: Vec<CappedUse>) -> StorageResult<Vec<Option<usize>>> {
        let keys: std::collections::BTreeSet<&UsageCounter> =
            uses.iter().flatten().map(|(key, _)| key).collect();
        if keys.is_empty() {
            return Ok(vec![None; uses.len()]);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        // Every counter of the batch locked in key order (replicas taking from the same counters
        // cannot deadlock), created at zero where new, its count read under the lock.
        let (mut p, mut t, mut d) = (Vec::new(), Vec::new(), Vec::new());
        for key in &keys {
            p.push(key.policy.as_str());
            t.push(key.target.as_str());
            d.push(key.period.as_str());
        }
        let rows = tx
            .query(
                "INSERT INTO policy_usage (policy, target, period, count)
                 SELECT k.*, 0 FROM unnest($1::text[], $2::text[], $3::text[]) AS k ORDER BY 1, 2, 3
                 ON CONFLICT (policy, target, period) DO UPDATE SET count = policy_usage.count
                 RETURNING policy, target, period, count",
                &[&p, &t, &d],
            )
            .await
            .db()?;
        let mut counts: std::collections::HashMap<UsageCounter, u64> =
            rows.iter().map(usage_row).collect();
        if counts.len() != keys.len() {
            return Err(StorageError::Corrupt("usage counter not returned".into()));
        }
        let before = counts.clone();
        let taken = grant_capped_uses(&uses, &mut counts);
        let (mut p, mut t, mut d, mut n) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (key, count) in &counts {
            if before.get(key) != Some(count) {
                p.push(key.policy.as_str());
                t.push(key.target.as_str());
                d.push(key.period.as_str());
                n.push(signed(*count));
            }
        }
        if !n.is_empty() {
            tx.execute(
                "UPDATE policy_usage u SET count = v.count
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[])
                    AS v(policy, target, period, count)
                 WHERE u.policy = v.policy AND u.target = v.target AND u.period = v.period",
                &[&p, &t, &d, &n],
            )
            .await
            .db()?;
        }
        tx.commit().await.db()?;
        Ok(taken)
    }

    async fn release_usage(&self, counters: Vec<UsageCounter>) -> StorageResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        let mut sorted = counters;
        sorted.sort();
        for key in &sorted {
            tx.execute(
                "UPDATE policy_usage SET count = GREATEST(count - 1, 0)
                 WHERE policy = $1 AND target = $2 AND period = $3",
                &[&key.policy, &key.target, &key.period],
            )
            .await
            .db()?;
        }
        tx.commit().await.db()
    }

    async fn usage_of(&self, policy: &str) -> StorageResult<Vec<(String, String, u64)>> {
        Ok(self
            .client()
            .await?
            .query(
                "SELECT target, period, count FROM policy_usage WHERE policy = $1
                 ORDER BY target, period",
                &[&policy],
            )
            .await
            .db()?
            .iter()
            .map(|r| (r.get(0), r.get(1), unsigned(r.get(2))))
            .collect())
    }

    async fn insert_approval(&self, row: ApprovalRow, link_hash: [u8; 32]) -> StorageResult<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO policy_approvals (id, policy, service, agent, client, endpoint,
                                               created_at, expires_at, link_hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &row.id,
                    &row.policy,
                    &row.service,
                    &row.agent,
                    &row.client,
                    &row.endpoint,
                    &row.created_at,
                    &row.expires_at,
                    &link_hash.as_slice(),
                ],
            )
            .await
            .db()?;
        Ok(())
    }

    async fn time_out_approval(&self, id: &str, now: i64) -> StorageResult<ApprovalDecision> {
        let client = self.client().await?;
        let changed = client
            .execute(
                "UPDATE policy_approvals SET decision = 'timeout', decided_at = $2
                 WHERE id = $1 AND decision IS NULL",
                &[&id, &now],
            )
            .await
            .db()?;
        if changed > 0 {
            return Ok(ApprovalDecision::TimedOut);
        }
        let text: Option<Option<String>> = client
            .query_opt(
                "SELECT decision FROM policy_approvals WHERE id = $1",
                &[&id],
            )
            .await
            .db()?
            .map(|r| r.get(0));
        Ok(text
            .flatten()
            .map(|t| decision(&t))
            .unwrap_or(ApprovalDecision::TimedOut))
    }

    async fn approval_decisions(
        &self,
        ids: &[String],
    ) -> StorageResult<Vec<(String, ApprovalDecision)>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, decision FROM policy_approvals WHERE id = ANY($1) AND decision IS NOT NULL",
                &[&ids],
            )
            .await
            .db()?;
        let found: std::collections::HashMap<String, String> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(ids
            .iter()
            .filter_map(|id| found.get(id).map(|d| (id.clone(), decision(d))))
            .collect())
    }

    async fn pending_approvals(&self, now: i64) -> StorageResult<Vec<ApprovalRow>> {
        Ok(self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {APPROVAL_COLUMNS} FROM policy_approvals
                     WHERE decision IS NULL AND expires_at > $1 ORDER BY created_at, id"
                ),
                &[&now],
            )
            .await
            .db()?
            .iter()
            .map(|r| approval_at(r, 0))
            .collect())
    }

    async fn pending_approval(
        &self,
        id: &str,
        now: i64,
    ) -> StorageResult<Option<(ApprovalRow, [u8; 32])>> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT link_hash, {APPROVAL_COLUMNS} FROM policy_approvals
                     WHERE id = $1 AND decision IS NULL AND expires_at > $2"
                ),
                &[&id, &now],
            )
            .await
            .db()?;
        Ok(row.and_then(|r| {
            let hash: &[u8] = r.get(0);
            Some((approval_at(&r, 1), hash.try_into().ok()?))
        }))
    }

    async fn decide_approval(&self, id: &str, approve: bool, now: i64) -> StorageResult<bool> {
        decide(&self.client().await?, id, approve, now).await
    }
}

fn oauth_of(r: &tokio_postgres::Row) -> OAuthClientRow {
    OAuthClientRow {
        name: r.get(0),
        token_url: r.get(1),
        client_id: r.get(2),
        wrapped_secret: r.get(3),
        updated_at: r.get(4),
    }
}

const OAUTH_SELECT: &str =
    "SELECT name, token_url, client_id, wrapped_secret, updated_at FROM oauth_providers";

#[async_trait]
impl OAuthClients for PostgresStorage {
    async fn oauth_client(&self, name: &str) -> StorageResult<Option<OAuthClientRow>> {
        Ok(self
            .client()
            .await?
            .query_opt(&format!("{OAUTH_SELECT} WHERE name = $1"), &[&name])
            .await
            .db()?
            .map(|r| oauth_of(&r)))
    }

    async fn oauth_clients(&self) -> StorageResult<Vec<OAuthClientRow>> {
        Ok(self
            .client()
            .await?
            .query(&format!("{OAUTH_SELECT} ORDER BY name"), &[])
            .await
            .db()?
            .iter()
            .map(oauth_of)
            .collect())
    }
}

#[async_trait]
impl crate::storage::SignConfigs for PostgresStorage {
    async fn sign_config(&self, service: &str) -> StorageResult<Option<String>> {
        Ok(self
            .client()
            .await?
            .query_opt(
                "SELECT config FROM sign_configs WHERE service = $1",
                &[&service],
            )
            .await
            .db()?
            .map(|r| r.get(0)))
    }

    async fn sign_configs(&self) -> StorageResult<Vec<(String, String)>> {
        Ok(self
            .client()
            .await?
            .query(
                "SELECT service, config FROM sign_configs ORDER BY service",
                &[],
            )
            .await
            .db()?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }
}

#[async_trait]
impl ReplayMarks for PostgresStorage {
    fn verdict_is_local(&self) -> bool {
        false
    }

    async fn load_marks(&self, now: i64) -> StorageResult<Vec<LoadedMark>> {
        // The database decides every mark (see `append_marks`); the live ones, for the domain's
        // memory: every live mark has a row in the current hour.
        let rows = self
            .client()
            .await?
            .query(
                "SELECT kind, key, MAX(expires_at) FROM replay_marks
                 WHERE bucket = $1 AND expires_at >= $2 GROUP BY kind, key",
                &[&marks::bucket_of(now), &now],
            )
            .await
            .db()?;
        Ok(rows
            .iter()
            .map(|r| LoadedMark {
                kind: crate::storage::ReplayKind::from_code(i64::from(r.get::<_, i16>(0))),
                key: u64::from_le_bytes(r.get::<_, i64>(1).to_le_bytes()),
                until: r.get(2),
            })
            .collect())
    }

    fn append_marks(&self, marks: Vec<Mark>) -> MarkCommit {
        let (reply, commit) = MarkCommit::channel();
        let rows: Vec<marks::Mark> = marks
            .iter()
            .map(|m| marks::Mark {
                kind: i16::try_from(m.kind.code()).unwrap_or(i16::MAX),
                key: i64::from_le_bytes(m.key.to_le_bytes()),
                expires_at: m.expires_at,
            })
            .collect();
        self.marks.submit(rows, crate::clock::now_unix(), reply);
        commit
    }

    async fn drop_expired_marks(&self, now: i64) -> StorageResult<usize> {
        // Once for all replicas: on the one holding the housekeeping lock.
        if !self.housekeeping_turn("replay-purge").await? {
            return Ok(0);
        }
        let client = self.client().await?;
        Ok(marks::drop_expired_partitions(&client, now).await?)
    }
}

fn entry_matches(filter: &AuditFilter, entry: &AuditEntry) -> bool {
    filter.through_seq.is_none_or(|s| entry.seq <= s)
}

#[async_trait]
impl AuditLog for PostgresStorage {
    async fn append_audit(
        &self,
        events: Vec<AuditEvent>,
        signer: SharedSigner,
    ) -> StorageResult<u64> {
        self.ensure_open()?;
        let xref_due = self
            .last_xref
            .lock()
            .map(|t| t.is_none_or(|t| t.elapsed() >= XREF_INTERVAL))
            .unwrap_or(false);
        // Under the group commits' timeout: a database gone silent would otherwise hold the
        // appending task, and every event queued behind it, until TCP gives up. The recorder
        // counts a failed batch as dropped, and the trail says so.
        let head = super::timed_batch(&self.pool, "audit append", async |client| {
            let tx = client.transaction().await.db()?;
            let mut head = audit::append_events(&tx, &self.node, signer.as_ref(), events).await?;
            if xref_due {
                head = audit::append_xref(&tx, &self.node, signer.as_ref()).await?;
            }
            tx.commit().await.db()?;
            Ok::<_, StorageError>(head)
        })
        .await?;
        if xref_due {
            if let Ok(mut t) = self.last_xref.lock() {
                *t = Some(Instant::now());
            }
        }
        Ok(head)
    }

    async fn audit_entries(&self, filter: AuditFilter) -> StorageResult<Vec<AuditEntry>> {
        let client = self.client().await?;
        let limit = filter.limit.map(signed);
        let entries = audit::list_entries(
            &client,
            filter.service.as_deref(),
            filter.since_ms,
            if filter.through_seq.is_some() {
                None
            } else {
                limit
            },
        )
        .await?;
        let mut out: Vec<AuditEntry> = entries
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| entry_matches(&filter, e))
            .collect();
        if let (Some(limit), Some(_)) = (filter.limit, filter.through_seq) {
            let keep = usize::try_from(limit).unwrap_or(usize::MAX);
            if out.len() > keep {
                out.drain(..out.len() - keep);
            }
        }
        Ok(out)
    }

    async fn audit_count(&self) -> StorageResult<u64> {
        let n: i64 = self
            .client()
            .await?
            .query_one("SELECT COUNT(*) FROM audit_log", &[])
            .await
            .db()?
            .get(0);
        Ok(unsigned(n))
    }

    async fn last_credential_use(&self) -> StorageResult<Option<i64>> {
        Ok(self
            .client()
            .await?
            .query_one(
                "SELECT MAX(at_ms) FROM audit_log WHERE (result = 'ok' OR result LIKE 'ok %')
                   AND endpoint NOT LIKE 'owner:%' AND endpoint NOT LIKE 'audit:%'
                   AND endpoint <> '/v1/store'",
                &[],
            )
            .await
            .db()?
            .get(0))
    }

    async fn verify_audit(&self, key: VerifyingKey) -> StorageResult<AuditVerification> {
        let chains = self.verify_chains(&key).await?;
        Ok(combine(&self.node, chains))
    }

    async fn verify_audit_chains(
        &self,
        key: VerifyingKey,
    ) -> StorageResult<Vec<(String, AuditVerification)>> {
        Ok(self
            .verify_chains(&key)
            .await?
            .into_iter()
            .map(|c| (c.node, c.verification))
            .collect())
    }

    async fn prune_audit(
        &self,
        before_ms: i64,
        signer: SharedSigner,
        source: &str,
    ) -> StorageResult<u64> {
        // Retention runs on whichever replica holds the housekeeping lock, for every chain; the
        // owner's `audit prune` always runs.
        if source == "retention" && !self.housekeeping_turn("audit-retention").await? {
            return Ok(0);
        }
        self.prune_chains(&signer, before_ms, source).await
    }

    async fn prune_boundary(&self, before_ms: i64) -> StorageResult<Option<PruneBoundary>> {
        // This replica's chain (the prune entry of `delete_pruned`'s caller is appended to it).
        let client = self.client().await?;
        let first_kept: Option<i64> = client
            .query_one(
                "SELECT MIN(seq) FROM audit_log WHERE node = $1 AND at_ms >= $2",
                &[&self.node, &before_ms],
            )
            .await
            .db()?
            .get(0);
        let row = client
            .query_opt(
                "SELECT seq, hash FROM audit_log WHERE node = $1 AND seq < $2
                 ORDER BY seq DESC LIMIT 1",
                &[&self.node, &first_kept.unwrap_or(i64::MAX)],
            )
            .await
            .db()?;
        let own = row.and_then(|r| {
            let hash: &[u8] = r.get(1);
            Some(PruneBoundary {
                through_seq: u64::try_from(r.get::<_, i64>(0)).ok()?,
                hash: hash.try_into().ok()?,
            })
        });
        if own.is_some() {
            return Ok(own);
        }
        // Nothing old in this chain, but perhaps in another replica's: `prune_audit` prunes
        // every chain, so say there is something (an empty boundary of this chain).
        let elsewhere: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM audit_log WHERE at_ms < $1)",
                &[&before_ms],
            )
            .await
            .db()?
            .get(0);
        Ok(elsewhere.then_some(PruneBoundary {
            through_seq: 0,
            hash: [0u8; 32],
        }))
    }

    async fn delete_pruned(&self, boundary: PruneBoundary) -> StorageResult<u64> {
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM audit_log WHERE node = $1 AND seq IN (SELECT seq FROM audit_log
                 WHERE node = $1 AND seq <= $2 ORDER BY seq LIMIT $3)",
                &[
                    &self.node,
                    &signed(boundary.through_seq),
                    &signed(crate::audit::PRUNE_CHUNK),
                ],
            )
            .await
            .db()?;
        Ok(n)
    }
}

/// Every chain's verification as one: the first problem of any chain (its node named), the
/// entries of all, the head of `node`'s chain.
pub fn combine(node: &str, chains: Vec<audit::ChainVerification>) -> AuditVerification {
    let entries = chains.iter().map(|c| c.verification.entries).sum();
    let problem = chains.iter().find_map(|c| {
        c.verification.problem.clone().map(|mut p| {
            p.reason = format!("chain of replica {:?}: {}", c.node, p.reason);
            p
        })
    });
    let own = chains
        .iter()
        .find(|c| c.node == node)
        .or(chains.first())
        .map(|c| c.verification.clone());
    match own {
        Some(mut v) => {
            v.entries = entries;
            v.problem = problem;
            v
        }
        None => AuditVerification {
            entries: 0,
            first_seq: 1,
            head_seq: 0,
            head_hash: hex::encode([0u8; 32]),
            problem: None,
        },
    }
}

async fn check(tx: &deadpool_postgres::Transaction<'_>, check: &Check) -> StorageResult<bool> {
    Ok(match check {
        Check::SettingIs(setting, expected) => {
            let row = tx
                .query_opt(
                    "SELECT value FROM settings WHERE name = $1 FOR UPDATE",
                    &[&setting.name()],
                )
                .await
                .db()?;
            row.map(|r| r.get::<_, String>(0)) == *expected
        }
        Check::DocumentAbsent(collection, key) => tx
            .query_opt(
                "SELECT 1 FROM documents WHERE collection = $1 AND key = $2 FOR UPDATE",
                &[&collection.as_str(), key],
            )
            .await
            .db()?
            .is_none(),
        Check::DocumentIs(collection, key, doc) => {
            let row = tx
                .query_opt(
                    "SELECT doc FROM documents WHERE collection = $1 AND key = $2 FOR UPDATE",
                    &[&collection.as_str(), key],
                )
                .await
                .db()?;
            row.map(|r| r.get::<_, String>(0)).as_deref() == Some(doc.as_str())
        }
        Check::LatestKeyVersion(kind, expected) => latest_version(tx, kind).await? == *expected,
        Check::PolicyExists(name, exists) => {
            tx.query_opt("SELECT 1 FROM policies WHERE name = $1", &[name])
                .await
                .db()?
                .is_some()
                == *exists
        }
        Check::AttachmentIs(policy, kind, target, exists) => {
            tx.query_opt(
                "SELECT 1 FROM policy_attachments WHERE policy = $1 AND kind = $2 AND target = $3",
                &[policy, kind, target],
            )
            .await
            .db()?
            .is_some()
                == *exists
        }
        Check::PlatformKeysAre(ids) => {
            let mut stored: Vec<String> = tx
                .query("SELECT key_id FROM platform_keys", &[])
                .await
                .db()?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut wanted = ids.clone();
            stored.sort();
            wanted.sort();
            stored == wanted
        }
        Check::ApprovalPending(id, now) => tx
            .query_opt(
                "SELECT 1 FROM policy_approvals WHERE id = $1 AND decision IS NULL
                 AND expires_at > $2 FOR UPDATE",
                &[id, now],
            )
            .await
            .db()?
            .is_some(),
    })
}

async fn apply_write(
    tx: &deadpool_postgres::Transaction<'_>,
    node: &str,
    write: &Write,
) -> StorageResult<bool> {
    let n: u64 = match write {
        Write::PutSetting(s, v) => {
            put_setting(tx, *s, v).await?;
            1
        }
        Write::DeleteSetting(s) => tx
            .execute("DELETE FROM settings WHERE name = $1", &[&s.name()])
            .await
            .db()?,
        Write::PutDocument {
            collection,
            key,
            doc,
            now,
        } => {
            put_document(tx, *collection, key, doc, *now).await?;
            announce_document(tx, node, *collection, key).await?;
            1
        }
        Write::RewriteDocument(collection, key, doc) => {
            let n = tx
                .execute(
                    "UPDATE documents SET doc = $3 WHERE collection = $1 AND key = $2",
                    &[&collection.as_str(), key, doc],
                )
                .await
                .db()?;
            announce_document(tx, node, *collection, key).await?;
            n
        }
        Write::DeleteDocument(collection, key) => {
            let n = tx
                .execute(
                    "DELETE FROM documents WHERE collection = $1 AND key = $2",
                    &[&collection.as_str(), key],
                )
                .await
                .db()?;
            announce_document(tx, node, *collection, key).await?;
            n
        }
        Write::MarkLegacyMinting(service) => tx
            .execute(
                "INSERT INTO legacy_minting (service) VALUES ($1) ON CONFLICT DO NOTHING",
                &[service],
            )
            .await
            .db()?,
        Write::ClearLegacyMinting(service) => tx
            .execute("DELETE FROM legacy_minting WHERE service = $1", &[service])
            .await
            .db()?,
        Write::PutKey(key) => {
            put_key(tx, key).await?;
            1
        }
        Write::DeleteKey(kind, v) => tx
            .execute(
                "DELETE FROM keyring WHERE kind = $1 AND version = $2",
                &[kind, &i64::from(*v)],
            )
            .await
            .db()?,
        Write::DeleteKeysBelow(kind, v) => tx
            .execute(
                "DELETE FROM keyring WHERE kind = $1 AND version < $2",
                &[kind, &i64::from(*v)],
            )
            .await
            .db()?,
        Write::DeleteKeysOfKind(kind) => tx
            .execute("DELETE FROM keyring WHERE kind = $1", &[kind])
            .await
            .db()?,
        Write::RecordImportedField(f) => tx
            .execute(
                "INSERT INTO imported_v1_fields (digest, service, field) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&f.digest.as_slice(), &f.service, &f.field],
            )
            .await
            .db()?,
        Write::ClearImportedFields => tx
            .execute("DELETE FROM imported_v1_fields", &[])
            .await
            .db()?,
        Write::PutPendingSecret(code_hash, wrapped) => tx
            .execute(
                "UPDATE bind_codes SET pending_secret = $2 WHERE code_hash = $1",
                &[code_hash, wrapped],
            )
            .await
            .db()?,
        Write::DeleteBindCodes => tx.execute("DELETE FROM bind_codes", &[]).await.db()?,
        Write::AddPlatformKey(key) => {
            insert_platform_key(tx, key).await?;
            1
        }
        Write::RemovePlatformKey(id) => tx
            .execute("DELETE FROM platform_keys WHERE key_id = $1", &[id])
            .await
            .db()?,
        Write::PutOAuthClient(c) => tx
            .execute(
                "INSERT INTO oauth_providers (name, token_url, client_id, wrapped_secret, updated_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO UPDATE SET token_url = excluded.token_url,
                    client_id = excluded.client_id, wrapped_secret = excluded.wrapped_secret,
                    updated_at = excluded.updated_at",
                &[
                    &c.name,
                    &c.token_url,
                    &c.client_id,
                    &c.wrapped_secret,
                    &c.updated_at,
                ],
            )
            .await
            .db()?,
        Write::RemoveOAuthClient(name) => tx
            .execute("DELETE FROM oauth_providers WHERE name = $1", &[name])
            .await
            .db()?,
        Write::PutEgressPolicy(row, now) => {
            put_egress_policy(tx, row, *now).await?;
            1
        }
        Write::DeleteEgressPolicy(service) => tx
            .execute("DELETE FROM egress_policies WHERE service = $1", &[service])
            .await
            .db()?,
        Write::DeleteEgressPins(service) => tx
            .execute("DELETE FROM egress_pins WHERE service = $1", &[service])
            .await
            .db()?,
        Write::DeleteRefusal(service, origin) => tx
            .execute(
                "DELETE FROM egress_refusals WHERE service = $1 AND origin = $2",
                &[service, origin],
            )
            .await
            .db()?,
        Write::PutPolicy(row, now) => tx
            .execute(
                "INSERT INTO policies (name, rules, source, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET rules = excluded.rules, source = excluded.source,
                    updated_at = excluded.updated_at",
                &[&row.name, &row.rules, &row.source, now],
            )
            .await
            .db()?,
        Write::DeletePolicy(name) => {
            tx.execute("DELETE FROM policy_attachments WHERE policy = $1", &[name])
                .await
                .db()?;
            tx.execute("DELETE FROM policy_usage WHERE policy = $1", &[name])
                .await
                .db()?;
            tx.execute("DELETE FROM policies WHERE name = $1", &[name])
                .await
                .db()?
        }
        Write::Attach(a) => tx
            .execute(
                "INSERT INTO policy_attachments (policy, kind, target, source) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&a.policy, &a.kind, &a.target, &a.source],
            )
            .await
            .db()?,
        Write::ReplaceAttachment(a) => tx
            .execute(
                "INSERT INTO policy_attachments (policy, kind, target, source) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (policy, kind, target) DO UPDATE SET source = excluded.source",
                &[&a.policy, &a.kind, &a.target, &a.source],
            )
            .await
            .db()?,
        Write::Detach(policy, kind, target) => tx
            .execute(
                "DELETE FROM policy_attachments WHERE policy = $1 AND kind = $2 AND target = $3",
                &[policy, kind, target],
            )
            .await
            .db()?,
        Write::DeleteAttachmentsOf(source) => tx
            .execute("DELETE FROM policy_attachments WHERE source = $1", &[source])
            .await
            .db()?,
        Write::PutSignConfig(service, config, now) => tx
            .execute(
                "INSERT INTO sign_configs (service, config, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (service) DO UPDATE SET config = excluded.config,
                    updated_at = excluded.updated_at",
                &[service, config, now],
            )
            .await
            .db()?,
        Write::DeleteSignConfig(service) => tx
            .execute("DELETE FROM sign_configs WHERE service = $1", &[service])
            .await
            .db()?,
        Write::DecideApproval { id, approve, now } => u64::from(decide(tx, id, *approve, *now).await?),
    };
    Ok(n > 0)
}

#[async_trait]
impl ChangeSets for PostgresStorage {
    async fn apply(&self, changes: ChangeSet) -> StorageResult<Applied> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        owner_lock(&tx, false).await?;
        for (i, c) in changes.checks.iter().enumerate() {
            if !check(&tx, c).await? {
                let _ = tx.rollback().await;
                return Ok(Applied::CheckFailed(i));
            }
        }
        let mut changed = Vec::with_capacity(changes.writes.len());
        for w in &changes.writes {
            changed.push(apply_write(&tx, &self.node, w).await?);
        }
        if let Some((events, signer)) = changes.audit {
            audit::append_events(&tx, &self.node, signer.as_ref(), events).await?;
        }
        if changes.bump_generation {
            bump_generation(&tx).await?;
        }
        tx.commit().await.db()?;
        Ok(Applied::Done { changed })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::TestDatabase;
    use super::*;
    use crate::storage::{MarkVerdict, ReplayKind};

    async fn two() -> Option<(TestDatabase, Arc<PostgresStorage>, Arc<PostgresStorage>)> {
        let db = TestDatabase::create().await?;
        // Both open together: the migration lock keeps them apart.
        let (a, b) = tokio::join!(
            PostgresStorage::open(db.target().clone(), "a"),
            PostgresStorage::open(db.target().clone(), "b")
        );
        Some((db, Arc::new(a.unwrap()), Arc::new(b.unwrap())))
    }

    fn code(hash: &str, rebind: bool) -> BindCode {
        BindCode {
            code_hash: hash.into(),
            created_at: 1,
            expires_at: i64::MAX,
            used_at: None,
            rebind,
            hmac_hash: String::new(),
            pending_secret: None,
            platform_key: None,
        }
    }

    #[tokio::test]
    async fn a_bind_code_is_used_once_across_replicas() {
        let Some((_db, a, b)) = two().await else {
            return;
        };
        a.put_setting(Setting::MasterCheck, "mc").await.unwrap();
        a.insert_bind_code(code("h", false), 0, "https://p", "https://f")
            .await
            .unwrap();
        let ex = |s: Arc<PostgresStorage>| async move {
            s.exchange(Exchange {
                code_hash: "h".into(),
                now: 10,
                bound_in_memory: false,
                master_check: "mc".into(),
                install: ExchangeInstall::KeepHmac,
            })
            .await
            .unwrap()
        };
        let (x, y) = tokio::join!(ex(Arc::clone(&a)), ex(Arc::clone(&b)));
        let mut outcomes = [x, y];
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(
            outcomes,
            [ExchangeOutcome::Exchanged, ExchangeOutcome::Used]
        );
        assert!(b.is_bound().await.unwrap());
        // A wrong master check leaves the code unused.
        a.insert_bind_code(code("r", true), 0, "https://p", "https://f")
            .await
            .unwrap();
        let out = b
            .exchange(Exchange {
                code_hash: "r".into(),
                now: 10,
                bound_in_memory: true,
                master_check: "other".into(),
                install: ExchangeInstall::KeepHmac,
            })
            .await
            .unwrap();
        assert_eq!(out, ExchangeOutcome::MasterKeyChanged);
        assert_eq!(a.bind_code("r").await.unwrap().unwrap().used_at, None);
    }

    #[tokio::test]
    async fn usage_counts_are_exact_across_replicas() {
        let Some((_db, a, b)) = two().await else {
            return;
        };
        let counter = UsageCounter {
            policy: "p".into(),
            target: "svc".into(),
            period: "d1".into(),
        };
        let mut tasks = Vec::new();
        for i in 0..100 {
            let s = if i % 2 == 0 {
                Arc::clone(&a)
            } else {
                Arc::clone(&b)
            };
            let c = counter.clone();
            tasks.push(tokio::spawn(async move {
                s.add_usage(vec![(c, 1)]).await.unwrap()[0]
            }));
        }
        let mut seen: Vec<u64> = Vec::new();
        for t in tasks {
            seen.push(t.await.unwrap());
        }
        seen.sort_unstable();
        assert_eq!(
            seen,
            (1..=100).collect::<Vec<_>>(),
            "each use saw its own count"
        );
        b.release_usage(vec![counter.clone()]).await.unwrap();
        assert_eq!(a.usage_of("p").await.unwrap()[0].2, 99);
    }

    #[tokio::test]
    async fn writes_on_one_replica_reach_the_other() {
        let Some((_db, a, b)) = two().await else {
            return;
        };
        let mut docs = b.watch_documents().unwrap();
        let mut generation = b.watch_owner_generation().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        while docs.try_recv().is_ok() {}
        a.put_setting(Setting::DataVersion, "1").await.unwrap();
        let stored = a
            .store_credential(CredentialDocument {
                service: "svc".into(),
                doc: "{\"fields\":{}}".into(),
                data_version: 1,
                create_only: true,
                now: 5,
            })
            .await
            .unwrap();
        assert_eq!(stored, CredentialWrite::Stored);
        assert_eq!(
            b.document(Collection::Tokens, "svc")
                .await
                .unwrap()
                .as_deref(),
            Some("{\"fields\":{}}")
        );
        let change = tokio::time::timeout(Duration::from_secs(1), docs.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            change,
            DocumentChange::One(Collection::Tokens, "svc".into())
        );
        let again = b
            .store_credential(CredentialDocument {
                service: "svc".into(),
                doc: "{}".into(),
                data_version: 1,
                create_only: true,
                now: 6,
            })
            .await
            .unwrap();
        assert_eq!(again, CredentialWrite::AlreadyExists);
        // An owner change set on A (the seal) reaches B's generation watch within a second.
        let before = *generation.borrow_and_update();
        let started = Instant::now();
        let applied = a
            .apply(ChangeSet::owner().write(Write::PutSetting(Setting::Sealed, "true".into())))
            .await
            .unwrap();
        assert!(matches!(applied, Applied::Done { .. }));
        tokio::time::timeout(Duration::from_secs(1), generation.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(*generation.borrow() > before);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            b.setting(Setting::Sealed).await.unwrap().as_deref(),
            Some("true")
        );
        // A failed check writes nothing.
        let failed = b
            .apply(
                ChangeSet::owner()
                    .check(Check::SettingIs(Setting::Sealed, Some("false".into())))
                    .write(Write::PutSetting(Setting::Sealed, "false".into())),
            )
            .await
            .unwrap();
        assert_eq!(failed, Applied::CheckFailed(0));
        assert_eq!(
            a.setting(Setting::Sealed).await.unwrap().as_deref(),
            Some("true")
        );
    }

    #[tokio::test]
    async fn replay_marks_are_decided_by_the_database() {
        let Some((_db, a, b)) = two().await else {
            return;
        };
        assert!(!a.verdict_is_local());
        let now = crate::clock::now_unix();
        let mark = |key| Mark {
            kind: ReplayKind::Nonce,
            key,
            expires_at: now + 60,
        };
        assert_eq!(
            a.append_marks(vec![mark(1), mark(2)]).await.unwrap(),
            MarkVerdict::Fresh
        );
        assert_eq!(
            b.append_marks(vec![mark(3), mark(2)]).await.unwrap(),
            MarkVerdict::Replayed(1)
        );
        assert_eq!(
            b.append_marks(vec![mark(3)]).await.unwrap(),
            MarkVerdict::Fresh
        );
        // Housekeeping runs on one replica at a time.
        let (x, y) = (
            a.housekeeping_turn("replay").await.unwrap(),
            b.housekeeping_turn("replay").await.unwrap(),
        );
        assert!(x && !y);
        assert!(a.housekeeping_turn("replay").await.unwrap(), "kept");
        // Expired hours are dropped by the lock holder only.
        let later = now + 4 * 3600;
        assert_eq!(b.drop_expired_marks(later).await.unwrap(), 0);
        assert!(a.drop_expired_marks(later).await.unwrap() >= 1);
    }

    struct Signer(keyholder_protocol::IdentityKey);
    impl crate::storage::AuditSigner for Signer {
        fn sign_audit(&self, bytes: &[u8]) -> [u8; 64] {
            self.0.sign(bytes)
        }
    }

    #[tokio::test]
    async fn retention_on_the_lock_holder_prunes_every_chain() {
        let Some((_db, a, b)) = two().await else {
            return;
        };
        let identity = keyholder_protocol::IdentityKey::generate();
        let key = identity.verifying_key();
        let signer: SharedSigner = Arc::new(Signer(identity));
        let old = |at_ms| AuditEvent {
            at_ms,
            endpoint: "/v1/credential".into(),
            result: "ok".into(),
            ..AuditEvent::default()
        };
        for at in [10, 20, 30] {
            a.append_audit(vec![old(at)], Arc::clone(&signer))
                .await
                .unwrap();
            b.append_audit(vec![old(at)], Arc::clone(&signer))
                .await
                .unwrap();
        }
        assert!(a.housekeeping_turn("audit").await.unwrap());
        assert_eq!(
            b.prune_audit(25, Arc::clone(&signer), "retention")
                .await
                .unwrap(),
            0,
            "not b's turn"
        );
        let removed = a
            .prune_audit(25, Arc::clone(&signer), "retention")
            .await
            .unwrap();
        // a: #1 (10) and #2 (20); b: #1 (10) only, its #2 being the cross-reference to a (now).
        assert_eq!(removed, 3);
        let chains = a.verify_chains(&key).await.unwrap();
        for chain in &chains {
            assert!(chain.verification.problem.is_none(), "{chain:?}");
            assert!(chain.verification.first_seq > 1, "{chain:?} not pruned");
        }
        assert_eq!(chains.len(), 2);
    }

    #[tokio::test]
    async fn an_unreachable_database_is_unavailable_not_an_error() {
        let target =
            PgTarget::parse("postgres://nobody@127.0.0.1:1/none?sslmode=disable", None).unwrap();
        let pool = target.pool().unwrap();
        let err = super::super::client(&pool).await.err().unwrap();
        assert!(matches!(
            StorageError::from(err),
            StorageError::Unavailable(_)
        ));
    }
}

/// The storage conformance suite on PostgreSQL, each case on a database of its own.
#[cfg(test)]
mod conformance {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::TestDatabase;
    use super::*;
    use crate::storage::conformance::{self as suite, Engine};
    use crate::storage::SharedStorage;

    #[derive(Default)]
    struct Postgres {
        databases: tokio::sync::Mutex<Vec<TestDatabase>>,
    }

    #[async_trait]
    impl Engine for Postgres {
        async fn fresh(&self) -> (SharedStorage, String) {
            let db = TestDatabase::create().await.expect("PostgreSQL reachable");
            let storage = PostgresStorage::open(db.target().clone(), "conformance")
                .await
                .unwrap();
            let name = db.name().to_string();
            self.databases.lock().await.push(db);
            (Arc::new(storage), name)
        }

        async fn reopen(&self, name: &str) -> SharedStorage {
            let databases = self.databases.lock().await;
            let db = databases.iter().find(|d| d.name() == name).unwrap();
            Arc::new(
                PostgresStorage::open(db.target().clone(), "conformance")
                    .await
                    .unwrap(),
            )
        }
    }

    /// `None` (skipping, with the reason printed) when no PostgreSQL is reachable.
    async fn engine() -> Option<Postgres> {
        TestDatabase::create().await?;
        Some(Postgres::default())
    }

    macro_rules! cases {
        ($($case:ident),* $(,)?) => {$(
            #[tokio::test]
            async fn $case() {
                let Some(engine) = engine().await else {
                    return;
                };
                suite::$case(&engine).await;
            }
        )*};
    }

    cases!(
        settings,
        documents,
        credentials,
        concurrent_stores_keep_their_own_outcomes,
        replay_marks,
        replay_accept_once,
        bind_codes,
        key_ring,
        egress,
        policies,
        usage_counts_are_exact_under_concurrency,
        capped_uses_are_exact_under_concurrency,
        approvals,
        oauth_clients,
        audit,
        change_sets,
        sign_configs,
    );
}
