//! The audit trail over `audit_log` (and the recorded head in `settings`). Linking and signing
//! are the domain's (`audit::link_events`); verification walks one read snapshot through
//! `audit::ChainVerifier`.

use async_trait::async_trait;
use ed25519_dalek::VerifyingKey;
use rusqlite::{params, Connection, OptionalExtension};

use super::{put_setting, setting, SqliteStorage};
use crate::audit::{
    head_record, link_events, AuditEntry, AuditEvent, AuditFilter, AuditVerification,
    ChainVerifier, PruneBoundary, PRUNE_CHUNK, PRUNE_ENDPOINT,
};
use crate::storage::{AuditLog, AuditSigner, Setting, SharedSigner, StorageResult};

type StoreError = crate::storage::StorageError;

/// The last entry's sequence number and hash (zeros for an empty trail).
fn head(conn: &Connection) -> Result<(u64, [u8; 32]), StoreError> {
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match row {
        None => Ok((0, [0u8; 32])),
        Some((seq, hash)) => {
            let hash: [u8; 32] = hash
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("audit hash length".into()))?;
            Ok((u64::try_from(seq).unwrap_or(0), hash))
        }
    }
}

/// Appends events to the chain inside the caller's write transaction (the head is read in the
/// same transaction, so the server and the owner's CLI can both append). Returns the new head seq.
pub(super) fn append_events(
    conn: &Connection,
    signer: &dyn AuditSigner,
    events: impl IntoIterator<Item = AuditEvent>,
) -> StorageResult<u64> {
    let head = head(conn)?;
    let entries = link_events(head, events, signer);
    let (seq, hash) = entries.last().map_or(head, |last| (last.seq, last.hash));
    let mut stmt = conn.prepare_cached(
        "INSERT INTO audit_log(seq, at_ms, endpoint, service, purpose, agent_id, proxy_id, source,
                               upstream, result, request_id, prev_hash, hash, signature)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?;
    for entry in &entries {
        let e = &entry.event;
        let signature: &[u8] = entry.signature.as_ref().map_or(&[], |s| s.as_slice());
        stmt.execute(params![
            i64::try_from(entry.seq).unwrap_or(i64::MAX),
            e.at_ms,
            e.endpoint,
            e.service,
            e.purpose,
            e.agent_id,
            e.proxy_id,
            e.source,
            e.upstream,
            e.result,
            e.request_id,
            entry.prev_hash.as_slice(),
            entry.hash.as_slice(),
            signature,
        ])?;
    }
    // The head is kept apart too, so that removing the newest entries is noticed as well.
    put_setting(conn, Setting::AuditHead, &head_record(seq, &hash))?;
    Ok(seq)
}

pub(super) fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditEntry> {
    let blob = |i: usize| -> rusqlite::Result<Vec<u8>> { r.get(i) };
    let to32 = |v: Vec<u8>| -> [u8; 32] {
        let mut out = [0u8; 32];
        if v.len() == 32 {
            out.copy_from_slice(&v);
        }
        out
    };
    let sig = blob(13)?;
    let signature = <[u8; 64]>::try_from(sig.as_slice()).ok();
    Ok(AuditEntry {
        seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
        event: AuditEvent {
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
        prev_hash: to32(blob(11)?),
        hash: to32(blob(12)?),
        signature,
    })
}

const SELECT_ENTRIES: &str =
    "SELECT seq, at_ms, endpoint, service, purpose, agent_id, proxy_id, source, upstream,
        result, request_id, prev_hash, hash, signature FROM audit_log";

/// Entries in chain order, filtered.
pub(super) fn list_entries(
    conn: &Connection,
    filter: &AuditFilter,
) -> Result<Vec<AuditEntry>, StoreError> {
    let limit = filter
        .limit
        .map(|l| i64::try_from(l).unwrap_or(i64::MAX))
        .unwrap_or(-1);
    let sql = format!(
        "SELECT * FROM ({SELECT_ENTRIES} WHERE (?1 IS NULL OR service = ?1) AND (?2 IS NULL OR at_ms >= ?2)
         AND seq <= ?4 ORDER BY seq DESC LIMIT ?3) ORDER BY seq"
    );
    let through = filter
        .through_seq
        .map(|s| i64::try_from(s).unwrap_or(i64::MAX))
        .unwrap_or(i64::MAX);
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt
        .query_map(
            params![filter.service, filter.since_ms, limit, through],
            entry_from_row,
        )?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Unix time (ms) of the newest successful credential use, if any.
pub(super) fn last_credential_use(conn: &Connection) -> Result<Option<i64>, StoreError> {
    Ok(conn.query_row(
        "SELECT MAX(at_ms) FROM audit_log WHERE (result = 'ok' OR result LIKE 'ok %') AND endpoint NOT LIKE 'owner:%'
           AND endpoint != '/v1/store'",
        [],
        |r| r.get(0),
    )?)
}

/// Verifies the chain in one snapshot: a server appending meanwhile must not make the recorded
/// head look newer than the entries read.
pub(super) fn verify_chain(
    conn: &Connection,
    key: &VerifyingKey,
) -> StorageResult<AuditVerification> {
    conn.execute_batch("SAVEPOINT audit_verify")?;
    let result = verify_snapshot(conn, key);
    conn.execute_batch("RELEASE audit_verify")?;
    result
}

fn verify_snapshot(conn: &Connection, key: &VerifyingKey) -> StorageResult<AuditVerification> {
    let first: Option<i64> = conn.query_row("SELECT MIN(seq) FROM audit_log", [], |r| r.get(0))?;
    let first = first.and_then(|s| u64::try_from(s).ok());
    let prunes = if first.unwrap_or(1) > 1 {
        recorded_prunes(conn)?
    } else {
        Vec::new()
    };
    let mut verifier = ChainVerifier::new(*key, first, &prunes);
    let mut stmt = conn.prepare(&format!("{SELECT_ENTRIES} ORDER BY rowid"))?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        if !verifier.check(&entry_from_row(row)?) {
            break;
        }
    }
    Ok(verifier.finish(setting(conn, Setting::AuditHead)?))
}

/// Where a prune of every entry older than `before_ms` would end: the newest entry before the first
/// one at or after `before_ms` (entries at or after it are always kept). `None` if nothing is older.
pub(super) fn prune_boundary(
    conn: &Connection,
    before_ms: i64,
) -> Result<Option<PruneBoundary>, StoreError> {
    let first_kept: Option<i64> = conn.query_row(
        "SELECT MIN(seq) FROM audit_log WHERE at_ms >= ?1",
        [before_ms],
        |r| r.get(0),
    )?;
    let row: Option<(i64, Vec<u8>)> = match first_kept {
        Some(kept) => conn
            .query_row(
                "SELECT seq, hash FROM audit_log WHERE seq < ?1 ORDER BY seq DESC LIMIT 1",
                [kept],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?,
        None => conn
            .query_row(
                "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?,
    };
    Ok(row.and_then(|(seq, hash)| {
        Some(PruneBoundary {
            through_seq: u64::try_from(seq).ok()?,
            hash: hash.as_slice().try_into().ok()?,
        })
    }))
}

/// Deletes up to [`PRUNE_CHUNK`] of the oldest entries up to a recorded prune's boundary; returns
/// how many were deleted (0 when none are left).
pub(super) fn delete_pruned(conn: &Connection, boundary: PruneBoundary) -> Result<u64, StoreError> {
    let through = boundary.through_seq;
    let deleted = conn.execute(
        "DELETE FROM audit_log WHERE seq IN (SELECT seq FROM audit_log WHERE seq <= ?1
           ORDER BY seq LIMIT ?2)",
        params![
            i64::try_from(through).unwrap_or(i64::MAX),
            i64::try_from(PRUNE_CHUNK).unwrap_or(i64::MAX)
        ],
    )?;
    Ok(deleted as u64)
}

/// Every prune boundary the trail records (the prune entries' details).
fn recorded_prunes(conn: &Connection) -> Result<Vec<PruneBoundary>, StoreError> {
    let mut stmt = conn.prepare("SELECT service FROM audit_log WHERE endpoint = ?1")?;
    let details = stmt
        .query_map([PRUNE_ENDPOINT], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(details
        .iter()
        .filter_map(|d| PruneBoundary::parse(d))
        .collect())
}

#[async_trait]
impl AuditLog for SqliteStorage {
    async fn append_audit(
        &self,
        events: Vec<AuditEvent>,
        signer: SharedSigner,
    ) -> StorageResult<u64> {
        self.db
            .write(move |conn| append_events(conn, signer.as_ref(), events))
            .await
    }

    async fn audit_entries(&self, filter: AuditFilter) -> StorageResult<Vec<AuditEntry>> {
        self.db.read(move |conn| list_entries(conn, &filter)).await
    }

    async fn audit_count(&self) -> StorageResult<u64> {
        self.db
            .read(|conn| {
                let n: i64 = conn.query_row("SELECT COUNT(*) FROM audit_log", [], |r| r.get(0))?;
                Ok(super::unsigned(n))
            })
            .await
    }

    async fn last_credential_use(&self) -> StorageResult<Option<i64>> {
        self.db.read(last_credential_use).await
    }

    async fn verify_audit(&self, key: VerifyingKey) -> StorageResult<AuditVerification> {
        self.db.read(move |conn| verify_chain(conn, &key)).await
    }

    async fn prune_boundary(&self, before_ms: i64) -> StorageResult<Option<PruneBoundary>> {
        self.db
            .read(move |conn| prune_boundary(conn, before_ms))
            .await
    }

    async fn delete_pruned(&self, boundary: PruneBoundary) -> StorageResult<u64> {
        self.db
            .write(move |conn| delete_pruned(conn, boundary))
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use keyholder_protocol::IdentityKey;

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::migrate(&mut conn).unwrap();
        conn
    }

    fn put_setting(conn: &Connection, name: &str, value: &str) -> StorageResult<()> {
        crate::storage::sqlite::writer::put_setting(conn, name, value)
    }

    fn record_prune(
        conn: &Connection,
        key: &IdentityKey,
        boundary: PruneBoundary,
        source: &str,
    ) -> StorageResult<u64> {
        append_events(conn, key, [crate::audit::prune_event(boundary, source)])
    }

    #[test]
    fn chain_verifies_and_detects_edits() {
        let conn = db();
        let key = IdentityKey::generate();
        let events = (0..5).map(|i| AuditEvent {
            at_ms: i,
            endpoint: "/v1/credential".into(),
            service: format!("svc{i}"),
            result: "ok".into(),
            ..AuditEvent::default()
        });
        assert_eq!(append_events(&conn, &key, events).unwrap(), 5);
        let ok = verify_chain(&conn, &key.verifying_key()).unwrap();
        assert_eq!(ok.entries, 5);
        assert!(ok.problem.is_none());
        // Another key: the batch's signed entry (its newest) does not verify.
        let other = IdentityKey::generate();
        let wrong = verify_chain(&conn, &other.verifying_key()).unwrap();
        assert_eq!(wrong.problem.unwrap().seq, 5);
        // Only the newest entry of a batch is signed, and the chain must end signed.
        let signed: Vec<bool> = list_entries(&conn, &AuditFilter::default())
            .unwrap()
            .iter()
            .map(|e| e.signature.is_some())
            .collect();
        assert_eq!(signed.iter().filter(|s| **s).count(), 1);
        conn.execute(
            "UPDATE audit_log SET result = 'ticket_invalid' WHERE seq = 3",
            [],
        )
        .unwrap();
        let bad = verify_chain(&conn, &key.verifying_key()).unwrap();
        assert_eq!(bad.problem.unwrap().seq, 3);
    }

    fn append_aged(conn: &Connection, key: &IdentityKey, ages_ms: &[i64]) {
        for at_ms in ages_ms {
            let event = AuditEvent {
                at_ms: *at_ms,
                endpoint: "/v1/credential".into(),
                result: "ok".into(),
                ..AuditEvent::default()
            };
            append_events(conn, key, [event]).unwrap();
        }
    }

    fn prune(conn: &Connection, key: &IdentityKey, before_ms: i64) -> Option<PruneBoundary> {
        let boundary = prune_boundary(conn, before_ms).unwrap()?;
        record_prune(conn, key, boundary, "test").unwrap();
        while delete_pruned(conn, boundary).unwrap() > 0 {}
        Some(boundary)
    }

    #[test]
    fn a_recorded_prune_keeps_the_rest_verifiable() {
        let conn = db();
        let key = IdentityKey::generate();
        append_aged(&conn, &key, &[100, 200, 300, 400, 500]);
        assert!(prune(&conn, &key, 50).is_none(), "nothing is that old");
        let boundary = prune(&conn, &key, 350).unwrap();
        assert_eq!(boundary.through_seq, 3);
        let seqs: Vec<u64> = list_entries(&conn, &AuditFilter::default())
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![4, 5, 6], "#6 is the prune entry");
        let ok = verify_chain(&conn, &key.verifying_key()).unwrap();
        assert!(ok.problem.is_none(), "{:?}", ok.problem);
        assert_eq!((ok.first_seq, ok.entries, ok.head_seq), (4, 3, 6));
        // A second prune later: the first prune's entry (#6, written now) is newer, so kept.
        append_aged(&conn, &key, &[900]);
        let boundary = prune(&conn, &key, 800).unwrap();
        assert_eq!(boundary.through_seq, 5);
        let ok = verify_chain(&conn, &key.verifying_key()).unwrap();
        assert!(ok.problem.is_none(), "{:?}", ok.problem);
        assert_eq!(ok.first_seq, 6);
    }

    #[test]
    fn dropping_old_entries_without_a_signed_prune_is_detected() {
        let conn = db();
        let key = IdentityKey::generate();
        append_aged(&conn, &key, &[100, 200, 300, 400]);
        conn.execute("DELETE FROM audit_log WHERE seq <= 2", [])
            .unwrap();
        let bad = verify_chain(&conn, &key.verifying_key()).unwrap();
        assert_eq!(bad.problem.unwrap().seq, 1, "entries missing before #3");
        // A prune entry names the boundary, but nobody without the identity key can sign it: an
        // attacker's one (signed with another key) breaks the chain where it stands.
        let boundary = PruneBoundary {
            through_seq: 2,
            hash: {
                let row: Vec<u8> = conn
                    .query_row("SELECT prev_hash FROM audit_log WHERE seq = 3", [], |r| {
                        r.get(0)
                    })
                    .unwrap();
                row.try_into().unwrap()
            },
        };
        let forger = IdentityKey::generate();
        record_prune(&conn, &forger, boundary, "attacker").unwrap();
        let bad = verify_chain(&conn, &key.verifying_key()).unwrap();
        let problem = bad.problem.unwrap();
        assert_eq!(problem.seq, 5, "{problem:?}");
        assert!(problem.reason.contains("signature"), "{problem:?}");
    }

    #[test]
    fn a_prune_still_deleting_verifies() {
        let conn = db();
        let key = IdentityKey::generate();
        append_aged(&conn, &key, &[100, 200, 300, 400, 500]);
        let boundary = prune_boundary(&conn, 450).unwrap().unwrap();
        record_prune(&conn, &key, boundary, "test").unwrap();
        // Interrupted after deleting part of the range.
        conn.execute("DELETE FROM audit_log WHERE seq <= 2", [])
            .unwrap();
        let ok = verify_chain(&conn, &key.verifying_key()).unwrap();
        assert!(ok.problem.is_none(), "{:?}", ok.problem);
        assert_eq!(ok.first_seq, 3);
    }

    #[test]
    fn an_unsigned_newest_entry_is_refused() {
        let conn = db();
        let key = IdentityKey::generate();
        let events = (0..3).map(|i| AuditEvent {
            at_ms: i,
            endpoint: "/v1/credential".into(),
            ..AuditEvent::default()
        });
        append_events(&conn, &key, events).unwrap();
        // Dropping the signed newest entry (and fixing the recorded head) leaves an unsigned end.
        let (hash,): (Vec<u8>,) = conn
            .query_row("SELECT hash FROM audit_log WHERE seq = 2", [], |r| {
                Ok((r.get(0)?,))
            })
            .unwrap();
        conn.execute("DELETE FROM audit_log WHERE seq = 3", [])
            .unwrap();
        put_setting(&conn, "audit_head", &format!("2:{}", hex::encode(hash))).unwrap();
        let bad = verify_chain(&conn, &key.verifying_key()).unwrap();
        assert!(bad.problem.unwrap().reason.contains("no signature"));
    }
}
