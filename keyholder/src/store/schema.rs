//! Schema migrations, applied in order at open; `PRAGMA user_version` records the last one.

use rusqlite::Connection;

use super::StoreError;

/// Current schema version.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const MIGRATIONS: &[&str] = &[
    // 1: settings, wrapped key ring, documents of the four collections, replay memory, bind codes.
    "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE keyring (
        kind TEXT NOT NULL, version INTEGER NOT NULL, wrapped BLOB NOT NULL, created_at INTEGER NOT NULL,
        PRIMARY KEY (kind, version));
     CREATE TABLE documents (
        collection TEXT NOT NULL, key TEXT NOT NULL, doc TEXT NOT NULL, updated_at INTEGER NOT NULL,
        PRIMARY KEY (collection, key)) WITHOUT ROWID;
     CREATE TABLE replay (
        kind TEXT NOT NULL, id TEXT NOT NULL, expires_at INTEGER NOT NULL,
        PRIMARY KEY (kind, id)) WITHOUT ROWID;
     CREATE INDEX replay_expiry ON replay (expires_at);
     CREATE TABLE bind_codes (
        code_hash TEXT PRIMARY KEY, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
        used_at INTEGER, rebind INTEGER NOT NULL, hmac_hash TEXT NOT NULL, pending_secret BLOB);",
    // 2 (owner controls): the signed, hash-chained audit trail (append-only; see `audit`).
    "CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, endpoint TEXT NOT NULL, service TEXT NOT NULL,
        purpose TEXT NOT NULL, agent_id TEXT NOT NULL, proxy_id TEXT NOT NULL, source TEXT NOT NULL,
        upstream TEXT NOT NULL, result TEXT NOT NULL, request_id TEXT NOT NULL,
        prev_hash BLOB NOT NULL, hash BLOB NOT NULL, signature BLOB NOT NULL);
     CREATE INDEX audit_service ON audit_log (service, at_ms);",
    // 3: the owner's egress policy per service (outside anything the platform can write) and the
    //    owner's OAuth clients (client secret wrapped by the master key).
    "CREATE TABLE egress_policies (
        service TEXT PRIMARY KEY, mode TEXT NOT NULL DEFAULT 'pinned', allowlist TEXT NOT NULL DEFAULT '[]',
        pinned_origin TEXT, token_url TEXT, updated_at INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE oauth_providers (
        name TEXT PRIMARY KEY, token_url TEXT NOT NULL, client_id TEXT NOT NULL,
        wrapped_secret BLOB NOT NULL, updated_at INTEGER NOT NULL) WITHOUT ROWID;",
    // 4 (asymmetric binding): the platform's Ed25519 public keys (at most two active; public keys
    //    only, never a private one) and the platform key an asymmetric bind code is for.
    "CREATE TABLE platform_keys (
        key_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, added_at INTEGER NOT NULL) WITHOUT ROWID;
     ALTER TABLE bind_codes ADD COLUMN platform_key BLOB;",
    // 5: replay marks as an append-only log. Random ids in a keyed table touch a different B-tree
    //    page per insert (one WAL frame each); appended rows share the last page. The in-memory
    //    set is the authority while running; the log only rebuilds it at start.
    "CREATE TABLE replay_log (kind TEXT NOT NULL, id TEXT NOT NULL, expires_at INTEGER NOT NULL);
     CREATE INDEX replay_log_expiry ON replay_log (expires_at);
     INSERT INTO replay_log (kind, id, expires_at) SELECT kind, id, expires_at FROM replay;
     DROP TABLE replay;",
    // 6: no index on the audit trail's services. Filters on it are optional (`?1 IS NULL OR ..`),
    //    which SQLite cannot serve from an index, and every batch of entries for many services
    //    rewrote dozens of its pages. Replay marks move to one table per 5 minutes of expiry
    //    (`replay_marks_<period>`, created as needed by `vault::replay`): expired marks go with a
    //    DROP TABLE instead of deleting rows (measured: deleting a minute's marks under load
    //    stalled the writer for half a second); `replay_log`'s rows are converted at the next start.
    //    (Since then one table per minute with a group commit's marks packed into rows,
    //    `replay_marks_packed_60s_<period>`; the live marks of the older tables are moved into
    //    them at start, see `vault::replay`.)
    "DROP INDEX audit_service;",
    // 7: where each platform v1 ciphertext imported from the reference webhook belongs (see
    //    `vault::imported_v1`): v1 fields carry no associated data, so a v1 field opens only as the
    //    service and field it was imported as. Emptied when the reference key is retired.
    "CREATE TABLE imported_v1_fields (
        digest BLOB NOT NULL, service TEXT NOT NULL, field TEXT NOT NULL,
        PRIMARY KEY (digest, service, field)) WITHOUT ROWID;",
    // 8 (owner-decided egress): the default mode becomes `known` (the built-in catalogue plus the
    //    owner's entries). Pins of the old default were chosen by the platform's first call, so they
    //    are not kept as allowed: each becomes a pending entry (count 0) that the owner sees in
    //    `keyholder egress pending` and allows with one command. A pin now belongs to the credential
    //    it was made with (`egress_pins`, one per credential); refusals are counted per service and
    //    origin. GitHub App credentials
    //    stored before minting inputs were sealed (their key is an ordinary field) are listed in
    //    `legacy_minting`: they are never handed out as plain credentials, whatever their meta says
    //    later, until the owner stores them again.
    "CREATE TABLE egress_refusals (
        service TEXT NOT NULL, origin TEXT NOT NULL, count INTEGER NOT NULL, last_at INTEGER NOT NULL,
        PRIMARY KEY (service, origin)) WITHOUT ROWID;
     CREATE TABLE egress_pins (
        service TEXT NOT NULL, credential TEXT NOT NULL, origin TEXT NOT NULL, pinned_at INTEGER NOT NULL,
        PRIMARY KEY (service, credential)) WITHOUT ROWID;
     INSERT INTO egress_refusals (service, origin, count, last_at)
        SELECT service, pinned_origin, 0, updated_at FROM egress_policies
        WHERE mode = 'pinned' AND pinned_origin IS NOT NULL;
     UPDATE egress_policies SET mode = 'known', pinned_origin = NULL WHERE mode = 'pinned';
     CREATE TABLE legacy_minting (service TEXT PRIMARY KEY) WITHOUT ROWID;
     INSERT INTO legacy_minting (service)
        SELECT key FROM documents WHERE collection = 'tokens'
        AND (CASE WHEN json_valid(doc) THEN lower(json_extract(doc, '$.meta.tokenType')) END) = 'githubapp'
        AND (CASE WHEN json_valid(doc) THEN json_extract(doc, '$.fields.sealedInputs') END) IS NULL;",
    // 9 (custody policies): the owner's named rule sets, what they attach to, and the durable
    //    usage counts of their caps (one row per policy, target and period).
    "CREATE TABLE policies (
        name TEXT PRIMARY KEY, rules TEXT NOT NULL, source TEXT NOT NULL DEFAULT 'cli',
        updated_at INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE policy_attachments (
        policy TEXT NOT NULL, kind TEXT NOT NULL, target TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT 'cli', PRIMARY KEY (policy, kind, target)) WITHOUT ROWID;
     CREATE TABLE policy_usage (
        policy TEXT NOT NULL, target TEXT NOT NULL, period TEXT NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (policy, target, period)) WITHOUT ROWID;
     CREATE TABLE policy_approvals (
        id TEXT PRIMARY KEY, policy TEXT NOT NULL, service TEXT NOT NULL, agent TEXT NOT NULL,
        client TEXT NOT NULL, endpoint TEXT NOT NULL, created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL, decision TEXT, decided_at INTEGER,
        link_hash BLOB NOT NULL) WITHOUT ROWID;",
    // 10 (signing, issue 24): the owner's signing configuration per service (AWS region and
    //    service, STS role, JWT assertion template, upstream CA), as one JSON document per row.
    "CREATE TABLE sign_configs (
        service TEXT PRIMARY KEY, config TEXT NOT NULL, updated_at INTEGER NOT NULL) WITHOUT ROWID;",
];

/// Applies every migration newer than the database's version, each in its own transaction.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > MIGRATIONS.len() as i64 {
        return Err(StoreError::Corrupt(format!(
            "database schema version {current} is newer than this keyholder ({})",
            MIGRATIONS.len()
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}
