//! The PostgreSQL schema: the SQLite schema's tables (see `store::schema`) with PostgreSQL types,
//! plus what several replicas need (per-replica audit chains, partitioned replay marks). Versioned
//! migrations, each in its own transaction, applied at start while holding an advisory lock, so
//! replicas starting together apply each one exactly once.

use super::PgError;

/// Advisory lock keys (one namespace for the keyholder's locks: `0x4b48` = "KH").
pub const MIGRATION_LOCK: i64 = 0x4b48_0001;
/// Held while a replica does housekeeping (see [`super::housekeeping`]).
pub const HOUSEKEEPING_LOCK: i64 = 0x4b48_0002;

/// Current schema version.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Migration `i + 1` is `MIGRATIONS[i]`. Integers are BIGINT (the SQLite code reads them as i64),
/// flags too (`rebind`), so that both engines hold the same values.
const MIGRATIONS: &[&str] = &[
    // 1: the SQLite schema as of its migration 9.
    "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE keyring (
        kind TEXT NOT NULL, version BIGINT NOT NULL, wrapped BYTEA NOT NULL, created_at BIGINT NOT NULL,
        PRIMARY KEY (kind, version));
     CREATE TABLE documents (
        collection TEXT NOT NULL, key TEXT NOT NULL, doc TEXT NOT NULL, updated_at BIGINT NOT NULL,
        PRIMARY KEY (collection, key));
     CREATE TABLE bind_codes (
        code_hash TEXT PRIMARY KEY, created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL,
        used_at BIGINT, rebind BIGINT NOT NULL, hmac_hash TEXT NOT NULL, pending_secret BYTEA,
        platform_key BYTEA);
     CREATE TABLE egress_policies (
        service TEXT PRIMARY KEY, mode TEXT NOT NULL DEFAULT 'known', allowlist TEXT NOT NULL DEFAULT '[]',
        pinned_origin TEXT, token_url TEXT, updated_at BIGINT NOT NULL);
     CREATE TABLE oauth_providers (
        name TEXT PRIMARY KEY, token_url TEXT NOT NULL, client_id TEXT NOT NULL,
        wrapped_secret BYTEA NOT NULL, updated_at BIGINT NOT NULL);
     CREATE TABLE platform_keys (
        key_id TEXT PRIMARY KEY, public_key BYTEA NOT NULL, added_at BIGINT NOT NULL);
     CREATE TABLE imported_v1_fields (
        digest BYTEA NOT NULL, service TEXT NOT NULL, field TEXT NOT NULL,
        PRIMARY KEY (digest, service, field));
     CREATE TABLE egress_refusals (
        service TEXT NOT NULL, origin TEXT NOT NULL, count BIGINT NOT NULL, last_at BIGINT NOT NULL,
        PRIMARY KEY (service, origin));
     CREATE TABLE egress_pins (
        service TEXT NOT NULL, credential TEXT NOT NULL, origin TEXT NOT NULL, pinned_at BIGINT NOT NULL,
        PRIMARY KEY (service, credential));
     CREATE TABLE legacy_minting (service TEXT PRIMARY KEY);
     CREATE TABLE policies (
        name TEXT PRIMARY KEY, rules TEXT NOT NULL, source TEXT NOT NULL DEFAULT 'cli',
        updated_at BIGINT NOT NULL);
     CREATE TABLE policy_attachments (
        policy TEXT NOT NULL, kind TEXT NOT NULL, target TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT 'cli', PRIMARY KEY (policy, kind, target));
     CREATE TABLE policy_usage (
        policy TEXT NOT NULL, target TEXT NOT NULL, period TEXT NOT NULL, count BIGINT NOT NULL,
        PRIMARY KEY (policy, target, period));
     CREATE TABLE policy_approvals (
        id TEXT PRIMARY KEY, policy TEXT NOT NULL, service TEXT NOT NULL, agent TEXT NOT NULL,
        client TEXT NOT NULL, endpoint TEXT NOT NULL, created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL, decision TEXT, decided_at BIGINT, link_hash BYTEA NOT NULL);",
    // 2: one audit chain per replica (`node`), each with its own sequence and recorded head, so
    //    that replicas never wait on one another's chain head. The chain the SQLite trail is moved
    //    into (`migrate-storage`) is node '' (its entries keep their canonical bytes).
    "CREATE TABLE audit_log (
        node TEXT NOT NULL, seq BIGINT NOT NULL, at_ms BIGINT NOT NULL, endpoint TEXT NOT NULL,
        service TEXT NOT NULL, purpose TEXT NOT NULL, agent_id TEXT NOT NULL, proxy_id TEXT NOT NULL,
        source TEXT NOT NULL, upstream TEXT NOT NULL, result TEXT NOT NULL, request_id TEXT NOT NULL,
        prev_hash BYTEA NOT NULL, hash BYTEA NOT NULL, signature BYTEA NOT NULL,
        PRIMARY KEY (node, seq));
     CREATE INDEX audit_log_at ON audit_log (at_ms);
     CREATE TABLE audit_heads (
        node TEXT PRIMARY KEY, seq BIGINT NOT NULL, hash BYTEA NOT NULL);",
    // 3: replay marks, one row per mark and hour of its life (`bucket` = unix hour). A mark is
    //    inserted into every hour from its arrival to its expiry, so two marks of one id whose
    //    lives overlap share a (bucket, kind, key) and the second insert conflicts, whichever
    //    replica makes it. An hour's partition is consulted only during that hour (a mark's
    //    check inserts into the current hour first), so it is dropped whole once the hour is over
    //    (plus a margin for replicas' clocks): marks expire by partition, never by row.
    //    A mark already expired when it arrives needs no memory: it goes to bucket 0, dropped at
    //    the next purge. Rows reach at most `replay::HORIZON_BUCKETS` hours ahead (tickets live at
    //    most a day); `expires_at` is the mark's own expiry, for loading.
    "CREATE TABLE replay_marks (
        bucket BIGINT NOT NULL, kind SMALLINT NOT NULL, key BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (bucket, kind, key)) PARTITION BY RANGE (bucket);",
    // 4 (signing, issue 24; SQLite's migration 10): the owner's signing configuration per service.
    "CREATE TABLE sign_configs (
        service TEXT PRIMARY KEY, config TEXT NOT NULL, updated_at BIGINT NOT NULL);",
];

/// Applies every migration newer than the database's version. Holds [`MIGRATION_LOCK`] (a
/// session advisory lock on a connection of its own) throughout, so concurrent starts wait for
/// each other and the second finds the work done.
pub async fn migrate(target: &super::PgTarget) -> Result<i32, PgError> {
    let mut client = target.connect().await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply(&mut client).await;
    // Closing the session releases the lock too; unlock explicitly for a connection kept alive.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn apply(client: &mut tokio_postgres::Client) -> Result<i32, PgError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS keyholder_schema (
                version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await?;
    let current: i32 = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM keyholder_schema",
            &[],
        )
        .await?
        .get(0);
    if current > SCHEMA_VERSION {
        return Err(PgError::Corrupt(format!(
            "database schema version {current} is newer than this keyholder ({SCHEMA_VERSION})"
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index as i32 + 1;
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO keyholder_schema (version, applied_at) VALUES ($1, $2)",
            &[&version, &crate::clock::now_unix()],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, "PostgreSQL schema migrated");
    }
    Ok(SCHEMA_VERSION)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::TestDatabase;
    use super::*;

    /// Replicas starting together: each start migrates, none fails, each migration ran once.
    #[tokio::test]
    async fn concurrent_starts_migrate_once() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let target = db.target().clone();
                tokio::spawn(async move { migrate(&target).await })
            })
            .collect();
        for start in starts {
            assert_eq!(start.await.unwrap().unwrap(), SCHEMA_VERSION);
        }
        let client = db.target().connect().await.unwrap();
        let rows = client
            .query("SELECT version FROM keyholder_schema ORDER BY version", &[])
            .await
            .unwrap();
        let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
        // Started again later: nothing to do.
        assert_eq!(migrate(db.target()).await.unwrap(), SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        migrate(db.target()).await.unwrap();
        let client = db.target().connect().await.unwrap();
        client
            .execute(
                "INSERT INTO keyholder_schema (version, applied_at) VALUES ($1, 0)",
                &[&(SCHEMA_VERSION + 1)],
            )
            .await
            .unwrap();
        assert!(matches!(
            migrate(db.target()).await,
            Err(PgError::Corrupt(_))
        ));
    }
}
