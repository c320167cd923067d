//! `keyholder migrate-storage`: moves a data folder's SQLite database into an empty PostgreSQL
//! database, or a PostgreSQL database into a new SQLite data folder, table by table in one
//! transaction, then checks that every table holds as many rows as the source and that the audit
//! chain arrived whole (every hash and link recomputed, the head equal to the source's; the
//! signatures are copied byte for byte, and `keyholder audit verify` checks them against the
//! identity key afterwards). A target that holds anything is refused.
//!
//! The SQLite trail becomes the PostgreSQL chain of node `""` (its entries keep their canonical
//! bytes). Back to SQLite, that chain is the SQLite trail again; the replicas' own chains cannot
//! be joined into SQLite's single chain without re-signing them, so they are verified and written
//! beside the database as `audit-replicas.jsonl` (one entry per line, with its node).

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::types::Value as SqlValue;
use serde::Serialize;
use tokio_postgres::types::ToSql;

use super::{audit, replay, PgError, PgTarget};
use crate::audit::AuditEntry;

/// Tables copied column for column (same names and columns in both schemas).
pub const TABLES: &[&str] = &[
    "settings",
    "keyring",
    "documents",
    "bind_codes",
    "egress_policies",
    "oauth_providers",
    "platform_keys",
    "imported_v1_fields",
    "egress_refusals",
    "egress_pins",
    "legacy_minting",
    "policies",
    "policy_attachments",
    "policy_usage",
    "policy_approvals",
    "sign_configs",
];

/// Hours ahead of now that moved replay marks may reach (tickets live at most a day, plus skew).
const MARK_HOURS_AHEAD: i64 = 26;

/// The SQLite setting holding the trail's recorded head (`<seq>:<hash hex>`).
const AUDIT_HEAD_SETTING: &str = "audit_head";

/// What was moved.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationReport {
    /// Rows per table, equal in source and target.
    pub tables: BTreeMap<String, u64>,
    /// Audit entries moved into the target's trail.
    pub audit_entries: u64,
    /// The moved trail's head (`<seq>:<hash hex>`), as the source recorded it.
    pub audit_head: String,
    /// Live replay marks carried over.
    pub replay_marks: u64,
    /// Entries of replica chains archived beside a SQLite target.
    pub archived_replica_entries: u64,
}

fn sqlite_err(e: impl std::fmt::Display) -> PgError {
    PgError::Db(format!("SQLite: {e}"))
}

fn sqlite_columns(conn: &rusqlite::Connection, table: &str) -> Result<Vec<String>, PgError> {
    let mut stmt = conn
        .prepare(&format!("PRAGMA table_info({table})"))
        .map_err(sqlite_err)?;
    let cols = stmt
        .query_map([], |r| r.get::<_, String>(1))
        .map_err(sqlite_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sqlite_err)?;
    Ok(cols)
}

async fn pg_columns(
    client: &impl deadpool_postgres::GenericClient,
    table: &str,
) -> Result<Vec<(String, String)>, PgError> {
    Ok(client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// One SQLite value as the PostgreSQL column type wants it.
fn to_pg(value: SqlValue, data_type: &str) -> Result<Box<dyn ToSql + Sync + Send>, PgError> {
    Ok(match (value, data_type) {
        (SqlValue::Null, "bigint") => Box::new(None::<i64>),
        (SqlValue::Null, "bytea") => Box::new(None::<Vec<u8>>),
        (SqlValue::Null, _) => Box::new(None::<String>),
        (SqlValue::Integer(i), "bigint") => Box::new(i),
        (SqlValue::Integer(i), "text") => Box::new(i.to_string()),
        (SqlValue::Text(t), "text") => Box::new(t),
        (SqlValue::Text(t), "bigint") => Box::new(
            t.parse::<i64>()
                .map_err(|_| PgError::Corrupt(format!("not an integer: {t:?}")))?,
        ),
        (SqlValue::Text(t), "bytea") => Box::new(t.into_bytes()),
        (SqlValue::Blob(b), "bytea") => Box::new(b),
        (SqlValue::Real(r), "bigint") => Box::new(r as i64),
        (other, ty) => {
            return Err(PgError::Corrupt(format!(
                "a {other:?} value for a {ty} column"
            )))
        }
    })
}

async fn target_is_empty(client: &impl deadpool_postgres::GenericClient) -> Result<bool, PgError> {
    let n: i64 = client
        .query_one(
            "SELECT (SELECT COUNT(*) FROM settings) + (SELECT COUNT(*) FROM keyring)
                  + (SELECT COUNT(*) FROM documents) + (SELECT COUNT(*) FROM audit_log)",
            &[],
        )
        .await?
        .get(0);
    Ok(n == 0)
}

fn sqlite_count(conn: &rusqlite::Connection, table: &str) -> Result<u64, PgError> {
    let n: i64 = conn
        .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .map_err(sqlite_err)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

async fn pg_count(
    client: &impl deadpool_postgres::GenericClient,
    table: &str,
    filter: &str,
) -> Result<u64, PgError> {
    let n: i64 = client
        .query_one(&format!("SELECT COUNT(*) FROM {table} {filter}"), &[])
        .await?
        .get(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

fn sqlite_audit(conn: &rusqlite::Connection) -> Result<Vec<AuditEntry>, PgError> {
    let mut stmt = conn
        .prepare(
            "SELECT seq, at_ms, endpoint, service, purpose, agent_id, proxy_id, source, upstream,
                    result, request_id, prev_hash, hash, signature FROM audit_log ORDER BY seq",
        )
        .map_err(sqlite_err)?;
    let rows = stmt
        .query_map([], |r| {
            let b32 = |v: Vec<u8>| <[u8; 32]>::try_from(v.as_slice()).unwrap_or([0u8; 32]);
            let sig: Vec<u8> = r.get(13)?;
            Ok(AuditEntry {
                seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                event: crate::audit::AuditEvent {
                    at_ms: r.get(1)?,
                    endpoint: r.get(2)?,
                    service: r.get(3)?,
                    purpose: r.get(4)?,
                    agent_id: r.get(5)?,
                    proxy_id: r.get(6)?,
                    source: r.get(7)?,
                    upstream: r.get(8)?,
                    result: r.get(9)?,
                    request_id: r.get(10)?,
                },
                prev_hash: b32(r.get(11)?),
                hash: b32(r.get(12)?),
                signature: <[u8; 64]>::try_from(sig.as_slice()).ok(),
            })
        })
        .map_err(sqlite_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sqlite_err)?;
    Ok(rows)
}

fn parse_head(text: Option<&str>) -> Option<(u64, [u8; 32])> {
    let (seq, hash) = text?.split_once(':')?;
    let hash = hex::decode(hash).ok()?;
    Some((seq.parse().ok()?, hash.as_slice().try_into().ok()?))
}

/// Checks a chain's links and hashes (not its signatures) against its recorded head.
fn check_links(
    node: &str,
    entries: &[AuditEntry],
    head: Option<(u64, [u8; 32])>,
) -> Result<(), PgError> {
    let v = audit::verify_links(node, entries, head);
    match v.problem {
        Some(p) => Err(PgError::Corrupt(format!(
            "audit chain {node:?} at #{}: {}",
            p.seq, p.reason
        ))),
        None => Ok(()),
    }
}

/// Moves the SQLite database `db_file` into the empty PostgreSQL database `target`.
pub async fn sqlite_to_postgres(
    db_file: &Path,
    target: &PgTarget,
) -> Result<MigrationReport, PgError> {
    if !db_file.is_file() {
        return Err(PgError::Config(format!(
            "no database at {}",
            db_file.display()
        )));
    }
    let conn = rusqlite::Connection::open_with_flags(
        db_file,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite_err)?;
    // One read snapshot of the source for everything below.
    conn.execute_batch("BEGIN").map_err(sqlite_err)?;
    super::schema::migrate(target).await?;
    let pool = target.pool()?;
    let mut client = super::client(&pool).await?;
    if !target_is_empty(&client).await? {
        return Err(PgError::Config(format!(
            "{} is not empty: migrate-storage only moves into an empty database",
            target.display()
        )));
    }
    let source_head = {
        let text: Option<String> = conn
            .query_row(
                "SELECT value FROM settings WHERE name = ?1",
                [AUDIT_HEAD_SETTING],
                |r| r.get(0),
            )
            .ok();
        text
    };
    let entries = sqlite_audit(&conn)?;
    check_links("", &entries, parse_head(source_head.as_deref()))?;

    // Partitions for the marks moved below (the longest ticket lifetime is a day).
    let current = replay::bucket_of(crate::clock::now_unix());
    replay::ensure_partitions(
        &client,
        current - replay::KEEP_PAST_BUCKETS,
        current + MARK_HOURS_AHEAD,
    )
    .await?;
    let tx = client.transaction().await?;
    let mut report = MigrationReport {
        tables: BTreeMap::new(),
        audit_entries: entries.len() as u64,
        audit_head: source_head.clone().unwrap_or_default(),
        replay_marks: 0,
        archived_replica_entries: 0,
    };
    for table in TABLES {
        let pg_cols = pg_columns(&tx, table).await?;
        let sqlite_cols = sqlite_columns(&conn, table)?;
        let cols: Vec<(String, String)> = pg_cols
            .into_iter()
            .filter(|(name, _)| sqlite_cols.contains(name))
            .collect();
        let names: Vec<&str> = cols.iter().map(|(n, _)| n.as_str()).collect();
        let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
        let insert = tx
            .prepare(&format!(
                "INSERT INTO {table} ({}) VALUES ({})",
                names.join(", "),
                placeholders.join(", ")
            ))
            .await?;
        let filter = if *table == "settings" {
            format!(" WHERE name <> '{AUDIT_HEAD_SETTING}'")
        } else {
            String::new()
        };
        let rows: Vec<Vec<SqlValue>> = {
            let mut stmt = conn
                .prepare(&format!("SELECT {} FROM {table}{filter}", names.join(", ")))
                .map_err(sqlite_err)?;
            let n = names.len();
            let rows = stmt
                .query_map([], |r| (0..n).map(|i| r.get::<_, SqlValue>(i)).collect())
                .map_err(sqlite_err)?
                .collect::<Result<Vec<Vec<SqlValue>>, _>>()
                .map_err(sqlite_err)?;
            rows
        };
        for row in rows {
            let values = row
                .into_iter()
                .zip(&cols)
                .map(|(v, (_, ty))| to_pg(v, ty))
                .collect::<Result<Vec<_>, _>>()?;
            let params: Vec<&(dyn ToSql + Sync)> = values
                .iter()
                .map(|v| v.as_ref() as &(dyn ToSql + Sync))
                .collect();
            tx.execute(&insert, &params).await?;
        }
        let moved = pg_count(&tx, table, "").await?;
        let expected = conn
            .query_row(&format!("SELECT COUNT(*) FROM {table}{filter}"), [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(sqlite_err)?;
        if i64::try_from(moved).unwrap_or(-1) != expected {
            return Err(PgError::Corrupt(format!(
                "{table}: {moved} rows arrived, {expected} in the source"
            )));
        }
        report.tables.insert((*table).to_string(), moved);
    }
    // The trail, verbatim, as node "".
    for e in &entries {
        tx.execute(
            "INSERT INTO audit_log (node, seq, at_ms, endpoint, service, purpose, agent_id,
                proxy_id, source, upstream, result, request_id, prev_hash, hash, signature)
             VALUES ('', $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            &[
                &i64::try_from(e.seq).unwrap_or(i64::MAX),
                &e.event.at_ms,
                &e.event.endpoint,
                &e.event.service,
                &e.event.purpose,
                &e.event.agent_id,
                &e.event.proxy_id,
                &e.event.source,
                &e.event.upstream,
                &e.event.result,
                &e.event.request_id,
                &e.prev_hash.as_slice(),
                &e.hash.as_slice(),
                &e.signature.map(|s| s.to_vec()).unwrap_or_default(),
            ],
        )
        .await?;
    }
    if let Some((seq, hash)) = parse_head(source_head.as_deref()) {
        tx.execute(
            "INSERT INTO audit_heads (node, seq, hash) VALUES ('', $1, $2)",
            &[&i64::try_from(seq).unwrap_or(i64::MAX), &hash.as_slice()],
        )
        .await?;
    }
    // Live replay marks (one row per bucket of their remaining life).
    let now = crate::clock::now_unix();
    let tables: Vec<String> = {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name LIKE 'replay_marks_packed_60s_%'")
            .map_err(sqlite_err)?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sqlite_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sqlite_err)?;
        names
    };
    let mut marks: Vec<(i64, i16, i64, i64)> = Vec::new();
    for table in tables {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT tag, until, records FROM {table} WHERE until >= ?1"
            ))
            .map_err(sqlite_err)?;
        let rows = stmt
            .query_map([now], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .map_err(sqlite_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sqlite_err)?;
        for (tag, until, records) in rows {
            for key in records.chunks_exact(8) {
                let key = i64::from_le_bytes(key.try_into().unwrap_or([0u8; 8]));
                report.replay_marks += 1;
                let first = replay::bucket_of(now);
                let last = replay::bucket_of(until.max(now)).min(first + replay::HORIZON_BUCKETS);
                for bucket in first..=last {
                    marks.push((bucket, i16::try_from(tag).unwrap_or(i16::MAX), key, until));
                }
            }
        }
    }
    if let Some(highest) = marks.iter().map(|m| m.0).max() {
        if highest > replay::bucket_of(now) + MARK_HOURS_AHEAD {
            return Err(PgError::Corrupt(
                "a replay mark expires too far ahead".into(),
            ));
        }
        for chunk in marks.chunks(10_000) {
            let b: Vec<i64> = chunk.iter().map(|m| m.0).collect();
            let k: Vec<i16> = chunk.iter().map(|m| m.1).collect();
            let y: Vec<i64> = chunk.iter().map(|m| m.2).collect();
            let e: Vec<i64> = chunk.iter().map(|m| m.3).collect();
            tx.execute(
                "INSERT INTO replay_marks (bucket, kind, key, expires_at)
                 SELECT * FROM unnest($1::int8[], $2::int2[], $3::int8[], $4::int8[])
                 ON CONFLICT DO NOTHING",
                &[&b, &k, &y, &e],
            )
            .await?;
        }
    }
    tx.commit().await?;
    // Read back from the committed target: counts and the chain.
    for (table, n) in &report.tables {
        let filter = if table == "settings" {
            format!("WHERE name <> '{AUDIT_HEAD_SETTING}'")
        } else {
            String::new()
        };
        if pg_count(&client, table, &filter).await? != *n {
            return Err(PgError::Corrupt(format!(
                "{table}: counts differ after commit"
            )));
        }
    }
    let moved: Vec<AuditEntry> = audit::list_entries(&client, None, None, None)
        .await?
        .into_iter()
        .filter(|(node, _)| node.is_empty())
        .map(|(_, e)| e)
        .collect();
    if moved.len() != entries.len() || moved.iter().zip(&entries).any(|(a, b)| a != b) {
        return Err(PgError::Corrupt(
            "the audit trail did not arrive whole".into(),
        ));
    }
    let head = audit::head(&client, "").await?;
    check_links("", &moved, (head.0 > 0).then_some(head))?;
    let _ = sqlite_count(&conn, "audit_log")?;
    Ok(report)
}

/// Moves the PostgreSQL database `source` into a new SQLite database in `data_dir` (which must
/// not hold one yet).
pub async fn postgres_to_sqlite(
    source: &PgTarget,
    data_dir: &Path,
) -> Result<MigrationReport, PgError> {
    let db_file = data_dir.join(crate::store::DATABASE_FILE);
    if db_file.exists() {
        return Err(PgError::Config(format!(
            "{} exists: migrate-storage only moves into a data folder without a database",
            db_file.display()
        )));
    }
    std::fs::create_dir_all(data_dir).map_err(|e| PgError::Config(e.to_string()))?;
    let pool = source.pool()?;
    let mut client = super::client(&pool).await?;
    let tx = super::snapshot(&mut client).await?;
    let mut conn = rusqlite::Connection::open(&db_file).map_err(sqlite_err)?;
    crate::store::migrate(&mut conn).map_err(sqlite_err)?;
    let sqlite_tx = conn.transaction().map_err(sqlite_err)?;
    let mut report = MigrationReport {
        tables: BTreeMap::new(),
        audit_entries: 0,
        audit_head: String::new(),
        replay_marks: 0,
        archived_replica_entries: 0,
    };
    for table in TABLES {
        let pg_cols = pg_columns(&tx, table).await?;
        let sqlite_cols = sqlite_columns(&sqlite_tx, table)?;
        let cols: Vec<(String, String)> = pg_cols
            .into_iter()
            .filter(|(name, _)| sqlite_cols.contains(name))
            .collect();
        let names: Vec<&str> = cols.iter().map(|(n, _)| n.as_str()).collect();
        let rows = tx
            .query(&format!("SELECT {} FROM {table}", names.join(", ")), &[])
            .await?;
        let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
        let sql = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            names.join(", "),
            placeholders.join(", ")
        );
        for row in &rows {
            let values: Vec<SqlValue> = cols
                .iter()
                .enumerate()
                .map(|(i, (_, ty))| match ty.as_str() {
                    "bigint" => row
                        .get::<_, Option<i64>>(i)
                        .map_or(SqlValue::Null, SqlValue::Integer),
                    "bytea" => row
                        .get::<_, Option<Vec<u8>>>(i)
                        .map_or(SqlValue::Null, SqlValue::Blob),
                    _ => row
                        .get::<_, Option<String>>(i)
                        .map_or(SqlValue::Null, SqlValue::Text),
                })
                .collect();
            sqlite_tx
                .execute(&sql, rusqlite::params_from_iter(values))
                .map_err(sqlite_err)?;
        }
        let n = sqlite_count(&sqlite_tx, table)?;
        if n != rows.len() as u64 {
            return Err(PgError::Corrupt(format!("{table}: counts differ")));
        }
        report.tables.insert((*table).to_string(), n);
    }
    // The SQLite-born chain back as the trail; replica chains verified and archived.
    let mut chains: BTreeMap<String, Vec<AuditEntry>> = BTreeMap::new();
    for (node, entry) in audit::list_entries(&tx, None, None, None).await? {
        chains.entry(node).or_default().push(entry);
    }
    for entries in chains.values_mut() {
        entries.sort_by_key(|e| e.seq);
    }
    let mut archive = String::new();
    for (node, entries) in &chains {
        let head = audit::head(&tx, node).await?;
        check_links(node, entries, (head.0 > 0).then_some(head))?;
        if node.is_empty() {
            for e in entries {
                sqlite_tx
                    .execute(
                        "INSERT INTO audit_log(seq, at_ms, endpoint, service, purpose, agent_id,
                           proxy_id, source, upstream, result, request_id, prev_hash, hash, signature)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                        rusqlite::params![
                            i64::try_from(e.seq).unwrap_or(i64::MAX),
                            e.event.at_ms,
                            e.event.endpoint,
                            e.event.service,
                            e.event.purpose,
                            e.event.agent_id,
                            e.event.proxy_id,
                            e.event.source,
                            e.event.upstream,
                            e.event.result,
                            e.event.request_id,
                            e.prev_hash.as_slice(),
                            e.hash.as_slice(),
                            e.signature.map(|s| s.to_vec()).unwrap_or_default(),
                        ],
                    )
                    .map_err(sqlite_err)?;
            }
            report.audit_entries = entries.len() as u64;
            if head.0 > 0 {
                report.audit_head = format!("{}:{}", head.0, hex::encode(head.1));
                sqlite_tx
                    .execute(
                        "INSERT INTO settings(name, value) VALUES (?1, ?2)",
                        [AUDIT_HEAD_SETTING, report.audit_head.as_str()],
                    )
                    .map_err(sqlite_err)?;
            }
        } else {
            for e in entries {
                #[derive(Serialize)]
                struct Line<'a> {
                    node: &'a str,
                    #[serde(flatten)]
                    entry: &'a AuditEntry,
                }
                let line = serde_json::to_string(&Line { node, entry: e })
                    .map_err(|e| PgError::Corrupt(e.to_string()))?;
                archive.push_str(&line);
                archive.push('\n');
                report.archived_replica_entries += 1;
            }
        }
    }
    tx.commit().await?;
    sqlite_tx.commit().map_err(sqlite_err)?;
    crate::store::restrict_file_mode(&db_file);
    if !archive.is_empty() {
        let path = data_dir.join("audit-replicas.jsonl");
        std::fs::write(&path, archive).map_err(|e| PgError::Config(e.to_string()))?;
        crate::store::restrict_file_mode(&path);
    }
    // Read back.
    let conn = rusqlite::Connection::open(&db_file).map_err(sqlite_err)?;
    let head_rows = u64::from(!report.audit_head.is_empty());
    for (table, n) in &report.tables {
        let extra = if table == "settings" { head_rows } else { 0 };
        if sqlite_count(&conn, table)? != *n + extra {
            return Err(PgError::Corrupt(format!(
                "{table}: counts differ after commit"
            )));
        }
    }
    let trail = sqlite_audit(&conn)?;
    check_links(
        "",
        &trail,
        parse_head(Some(report.audit_head.as_str())).or(None),
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::TestDatabase;
    use super::*;
    use crate::audit::{canonical_bytes, AuditEvent};
    use keyholder_protocol::IdentityKey;
    use sha2::{Digest, Sha256};

    /// A SQLite data folder with a little of everything and a signed three-entry trail.
    fn sqlite_folder(dir: &Path, key: &IdentityKey, mark_key: i64) -> String {
        let mut conn = rusqlite::Connection::open(dir.join(crate::store::DATABASE_FILE)).unwrap();
        crate::store::migrate(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO settings VALUES ('webhook_id', 'wh_1'), ('data_version', '1');
             INSERT INTO keyring VALUES ('data', 1, x'0102', 5);
             INSERT INTO documents VALUES ('tokens', 'github', '{\"fields\":{}}', 7),
                                          ('audit', 'a1', '{}', 8);
             INSERT INTO bind_codes (code_hash, created_at, expires_at, used_at, rebind, hmac_hash)
                VALUES ('h', 1, 2, NULL, 0, 'x');
             INSERT INTO policy_usage VALUES ('p', 'svc', 'd1', 3);",
        )
        .unwrap();
        let now = crate::clock::now_unix();
        conn.execute_batch(
            "CREATE TABLE replay_marks_packed_60s_1 (tag INTEGER NOT NULL, until INTEGER NOT NULL, records BLOB NOT NULL);",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO replay_marks_packed_60s_1 VALUES (2, ?1, ?2)",
            rusqlite::params![now + 120, mark_key.to_le_bytes().to_vec()],
        )
        .unwrap();
        let mut prev = [0u8; 32];
        for seq in 1..=3u64 {
            let event = AuditEvent {
                at_ms: seq as i64,
                endpoint: "/v1/credential".into(),
                service: "github".into(),
                result: "ok".into(),
                ..AuditEvent::default()
            };
            let bytes = canonical_bytes(seq, &event, &prev);
            let hash: [u8; 32] = Sha256::digest(&bytes).into();
            let sig = if seq == 3 {
                key.sign(&bytes).to_vec()
            } else {
                Vec::new()
            };
            conn.execute(
                "INSERT INTO audit_log(seq, at_ms, endpoint, service, purpose, agent_id, proxy_id,
                    source, upstream, result, request_id, prev_hash, hash, signature)
                 VALUES (?1, ?2, ?3, ?4, '', '', '', '', '', ?5, '', ?6, ?7, ?8)",
                rusqlite::params![
                    seq as i64,
                    event.at_ms,
                    event.endpoint,
                    event.service,
                    event.result,
                    prev.to_vec(),
                    hash.to_vec(),
                    sig
                ],
            )
            .unwrap();
            prev = hash;
        }
        let head = format!("3:{}", hex::encode(prev));
        conn.execute(
            "INSERT INTO settings VALUES ('audit_head', ?1)",
            [head.as_str()],
        )
        .unwrap();
        head
    }

    #[tokio::test]
    async fn a_data_folder_moves_into_postgres_and_back() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let key = IdentityKey::generate();
        let src = tempfile::tempdir().unwrap();
        let head = sqlite_folder(src.path(), &key, 4242);
        let report = sqlite_to_postgres(&src.path().join(crate::store::DATABASE_FILE), db.target())
            .await
            .unwrap();
        assert_eq!(report.tables["documents"], 2);
        assert_eq!(
            report.tables["settings"], 2,
            "the audit head moves to audit_heads"
        );
        assert_eq!(report.tables["policy_usage"], 1);
        assert_eq!(
            (report.audit_entries, report.audit_head.as_str()),
            (3, head.as_str())
        );
        assert_eq!(report.replay_marks, 1);
        // The chain verifies in PostgreSQL, signatures included.
        let storage = super::super::PostgresStorage::open(db.target().clone(), "a")
            .await
            .unwrap();
        let chains = storage.verify_chains(&key.verifying_key()).await.unwrap();
        assert_eq!(chains.len(), 1);
        assert!(chains[0].verification.problem.is_none(), "{chains:?}");
        assert_eq!(chains[0].verification.head_seq, 3);
        // The moved replay mark is still refused.
        let marks = super::super::replay::PgReplayMarks::start(storage.pool().clone());
        let replayed = marks
            .claim(vec![super::super::replay::Mark {
                kind: 2,
                key: 4242,
                expires_at: crate::clock::now_unix() + 60,
            }])
            .await
            .unwrap();
        assert!(!replayed);
        // A non-empty target is refused.
        let again =
            sqlite_to_postgres(&src.path().join(crate::store::DATABASE_FILE), db.target()).await;
        assert!(matches!(again, Err(PgError::Config(_))), "{again:?}");

        // A replica appends to its own chain; then back into a new SQLite folder.
        struct Signer(IdentityKey);
        impl crate::storage::AuditSigner for Signer {
            fn sign_audit(&self, bytes: &[u8]) -> [u8; 64] {
                self.0.sign(bytes)
            }
        }
        let mut c = storage.pool().get().await.unwrap();
        let tx = c.transaction().await.unwrap();
        audit::append_events(
            &tx,
            "a",
            &Signer(IdentityKey::generate()),
            vec![AuditEvent::owner("seal", "")],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let back = tempfile::tempdir().unwrap();
        let report = postgres_to_sqlite(db.target(), back.path()).await.unwrap();
        assert_eq!(report.tables["documents"], 2);
        assert_eq!(report.audit_entries, 3);
        assert_eq!(report.archived_replica_entries, 1);
        assert!(back.path().join("audit-replicas.jsonl").is_file());
        let conn =
            rusqlite::Connection::open(back.path().join(crate::store::DATABASE_FILE)).unwrap();
        let trail = sqlite_audit(&conn).unwrap();
        let original = sqlite_audit(
            &rusqlite::Connection::open(src.path().join(crate::store::DATABASE_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(trail, original, "the trail came back byte for byte");
        let head_back: String = conn
            .query_row(
                "SELECT value FROM settings WHERE name = 'audit_head'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(head_back, head);
        // A folder that has a database is refused.
        assert!(postgres_to_sqlite(db.target(), back.path()).await.is_err());
    }

    #[tokio::test]
    async fn a_broken_source_chain_is_refused_before_anything_is_written() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let key = IdentityKey::generate();
        let src = tempfile::tempdir().unwrap();
        sqlite_folder(src.path(), &key, 1);
        let conn =
            rusqlite::Connection::open(src.path().join(crate::store::DATABASE_FILE)).unwrap();
        conn.execute("DELETE FROM audit_log WHERE seq = 2", [])
            .unwrap();
        drop(conn);
        let moved =
            sqlite_to_postgres(&src.path().join(crate::store::DATABASE_FILE), db.target()).await;
        assert!(matches!(moved, Err(PgError::Corrupt(_))), "{moved:?}");
        let client = db.target().connect().await.unwrap();
        let n: i64 = client
            .query_one("SELECT COUNT(*) FROM documents", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }
}
