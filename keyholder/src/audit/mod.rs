//! The keyholder's own audit trail: an append-only table of credential uses and refusals (and the
//! owner's actions), each entry chained to the previous one by SHA-256 and signed with the identity key
//! over explicit canonical bytes, so that an edited, removed or reordered entry is detected.
//!
//! # Canonical bytes of an entry
//!
//! `b"keyholder/v1/audit"`, then `seq` (u64 big-endian), `at_ms` (i64 big-endian), the previous entry's
//! hash (32 bytes; zeros for the first entry), then each of endpoint, service, purpose, agent id, proxy id,
//! source address, upstream origin, result and request id as a big-endian `u32` length followed by the
//! UTF-8 bytes (absent = empty). The entry's hash is SHA-256 of these bytes.
//!
//! # Signatures
//!
//! Entries are appended in batches (one write transaction each), and the newest entry of every batch
//! carries an Ed25519 signature over its canonical bytes. Those bytes hold the previous entry's hash,
//! which holds the one before, so that signature covers every entry of its batch and all before it:
//! an entry cannot be edited, removed or reordered without breaking a signed hash. The other entries
//! carry no signature of their own; one signature per batch instead of per entry keeps the appender
//! off the critical path of the writer (an Ed25519 signature costs as much as the rest of a
//! credential request). `audit verify` requires the newest entry to be signed.
//!
//! # Pruning
//!
//! Old entries can be removed (`keyholder audit prune`, or `--audit-retention-days` in the
//! server): first an `owner:audit-prune` entry is appended whose detail is `<last pruned seq>:<its
//! hash (hex)>`, then the entries up to that seq are deleted in small transactions. The prune entry
//! is chained and signed like any other, so verification can start at the first kept entry: its
//! `prev_hash` must equal the hash a signed prune entry names. Nobody without the identity key can
//! drop the oldest entries and claim they were pruned.

pub mod recorder;

use ed25519_dalek::{Signature, VerifyingKey};
use keyholder_protocol::IdentityKey;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::store::{get_setting, put_setting, StoreError};

pub use recorder::AuditRecorder;

/// Domain label at the start of every entry's canonical bytes.
pub const AUDIT_LABEL: &[u8] = b"keyholder/v1/audit";
/// Longest text kept per field (longer values are cut, on a character boundary).
pub const MAX_FIELD_LEN: usize = 512;

/// The upstream origin (`scheme://host[:port]`) of a proxied call: the proxy handler puts it in the
/// request extensions, and the audit entry of the request carries it.
#[derive(Debug, Clone)]
pub struct UpstreamOrigin(pub String);

/// The custody-policy decision of a request, appended to its audit entry's result
/// (`ok policy=NAME,...` or `policy_denied rule=RULE policy=NAME`): policy and rule names only.
#[derive(Debug, Clone)]
pub struct PolicyNote(pub String);

/// How a proxied request was signed (`signed=aws-sigv4 key=AKID... scope=REGION/SERVICE`,
/// `signed=tls-client-cert cert=sha256:...`, `signed=jwt-ALG iss=... use=...`), appended to its
/// audit entry's result: key ids and certificate fingerprints only, never a key or a signature.
#[derive(Debug, Clone)]
pub struct SigningNote(pub String);

/// What happened, before it is chained and signed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// Unix time in milliseconds.
    pub at_ms: i64,
    /// Endpoint path (`/v1/credential`) or owner command (`owner:rotate-key`).
    pub endpoint: String,
    /// Service the request was for (as asked; verified when the ticket was).
    pub service: String,
    /// Ticket purpose, when a ticket was verified.
    pub purpose: String,
    /// Agent id from the ticket.
    pub agent_id: String,
    /// Proxy config id from the ticket.
    pub proxy_id: String,
    /// Client address.
    pub source: String,
    /// Upstream origin of a proxied call.
    pub upstream: String,
    /// `ok`, or the wire error code of the refusal.
    pub result: String,
    /// Request id.
    pub request_id: String,
}

impl AuditEvent {
    /// An event for an owner command, time now.
    pub fn owner(command: &str, detail: &str) -> AuditEvent {
        AuditEvent {
            at_ms: now_ms(),
            endpoint: format!("owner:{command}"),
            service: detail.to_string(),
            source: "cli".into(),
            result: "ok".into(),
            ..AuditEvent::default()
        }
    }

    fn fields(&self) -> [&str; 9] {
        [
            &self.endpoint,
            &self.service,
            &self.purpose,
            &self.agent_id,
            &self.proxy_id,
            &self.source,
            &self.upstream,
            &self.result,
            &self.request_id,
        ]
    }

    /// Cuts every field to [`MAX_FIELD_LEN`] bytes.
    fn bounded(mut self) -> AuditEvent {
        for field in [
            &mut self.endpoint,
            &mut self.service,
            &mut self.purpose,
            &mut self.agent_id,
            &mut self.proxy_id,
            &mut self.source,
            &mut self.upstream,
            &mut self.result,
            &mut self.request_id,
        ] {
            if field.len() > MAX_FIELD_LEN {
                let mut end = MAX_FIELD_LEN;
                while !field.is_char_boundary(end) {
                    end -= 1;
                }
                field.truncate(end);
            }
        }
        self
    }
}

/// A stored entry: the event, its place in the chain and its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// The event.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// Hash of the previous entry (hex).
    #[serde(with = "hex_bytes")]
    pub prev_hash: [u8; 32],
    /// SHA-256 of this entry's canonical bytes (hex).
    #[serde(with = "hex_bytes")]
    pub hash: [u8; 32],
    /// Ed25519 signature over the canonical bytes (hex) on the newest entry of each appended batch;
    /// absent on the others (their batch's signature covers them through the hash chain).
    #[serde(with = "hex_opt")]
    pub signature: Option<[u8; 64]>,
}

mod hex_opt {
    pub fn serialize<S: serde::Serializer>(
        bytes: &Option<[u8; 64]>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_str(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer, const N: usize>(
        bytes: &[u8; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The canonical bytes that are hashed and signed (see the module documentation).
pub fn canonical_bytes(seq: u64, event: &AuditEvent, prev_hash: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(AUDIT_LABEL);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&event.at_ms.to_be_bytes());
    out.extend_from_slice(prev_hash);
    for field in event.fields() {
        // Fields are capped at MAX_FIELD_LEN when appended; saturate rather than wrap regardless.
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out
}

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
pub fn append_events(
    conn: &Connection,
    identity: &IdentityKey,
    events: impl IntoIterator<Item = AuditEvent>,
) -> Result<u64, StoreError> {
    let (mut seq, mut prev) = head(conn)?;
    let mut events = events.into_iter().peekable();
    let mut stmt = conn.prepare_cached(
        "INSERT INTO audit_log(seq, at_ms, endpoint, service, purpose, agent_id, proxy_id, source,
                               upstream, result, request_id, prev_hash, hash, signature)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?;
    while let Some(event) = events.next() {
        let event = event.bounded();
        seq += 1;
        let bytes = canonical_bytes(seq, &event, &prev);
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        // Only the batch's newest entry is signed; the chain carries the signature back.
        let signature: Vec<u8> = if events.peek().is_none() {
            identity.sign(&bytes).to_vec()
        } else {
            Vec::new()
        };
        stmt.execute(params![
            i64::try_from(seq).unwrap_or(i64::MAX),
            event.at_ms,
            event.endpoint,
            event.service,
            event.purpose,
            event.agent_id,
            event.proxy_id,
            event.source,
            event.upstream,
            event.result,
            event.request_id,
            prev.as_slice(),
            hash.as_slice(),
            signature.as_slice(),
        ])?;
        prev = hash;
    }
    // The head is kept apart too, so that removing the newest entries is noticed as well.
    put_setting(conn, "audit_head", &format!("{seq}:{}", hex::encode(prev)))?;
    Ok(seq)
}

/// Which entries [`list_entries`] returns.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this service.
    pub service: Option<String>,
    /// Only entries at or after this unix time (milliseconds).
    pub since_ms: Option<i64>,
    /// At most this many (the newest), all when `None`.
    pub limit: Option<u64>,
    /// Only entries up to this sequence number.
    pub through_seq: Option<u64>,
}

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditEntry> {
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
pub fn list_entries(
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
pub fn last_credential_use(conn: &Connection) -> Result<Option<i64>, StoreError> {
    Ok(conn.query_row(
        "SELECT MAX(at_ms) FROM audit_log WHERE (result = 'ok' OR result LIKE 'ok %') AND endpoint NOT LIKE 'owner:%'
           AND endpoint != '/v1/store'",
        [],
        |r| r.get(0),
    )?)
}

/// Why verification stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditProblem {
    /// Sequence number of the first bad entry (the position where the chain breaks).
    pub seq: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// Outcome of [`verify_chain`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditVerification {
    /// Entries checked.
    pub entries: u64,
    /// Sequence number of the first entry checked (above 1 after a prune).
    pub first_seq: u64,
    /// Sequence number and hash (hex) of the last good entry: record it to detect later truncation.
    pub head_seq: u64,
    /// Hash of the last good entry.
    pub head_hash: String,
    /// The first problem, if any.
    pub problem: Option<AuditProblem>,
}

/// Walks the whole chain in order: sequence without gaps, each entry's `prev_hash` equal to the
/// previous entry's hash, its hash equal to SHA-256 of its canonical bytes, its signature valid under
/// `key`, and the recorded head equal to the last entry. Stops at the first bad entry.
pub fn verify_chain(
    conn: &Connection,
    key: &VerifyingKey,
) -> Result<AuditVerification, StoreError> {
    // One snapshot for all the reads: a server appending meanwhile must not make the recorded head
    // look newer than the entries read.
    conn.execute_batch("SAVEPOINT audit_verify")?;
    let result = verify_snapshot(conn, key);
    conn.execute_batch("RELEASE audit_verify")?;
    result
}

fn verify_snapshot(conn: &Connection, key: &VerifyingKey) -> Result<AuditVerification, StoreError> {
    // After a prune the chain starts at the first kept entry, anchored by a prune entry further
    // on (which the walk below verifies like every other entry).
    let first: Option<i64> = conn.query_row("SELECT MIN(seq) FROM audit_log", [], |r| r.get(0))?;
    let first = first.and_then(|s| u64::try_from(s).ok()).unwrap_or(1);
    let (mut expected_seq, mut prev, mut unanchored) = (1u64, [0u8; 32], false);
    if first > 1 {
        let prunes = recorded_prunes(conn)?;
        if let Some(b) = prunes.iter().find(|b| b.through_seq == first - 1) {
            (expected_seq, prev) = (first, b.hash);
        } else if prunes.iter().any(|b| b.through_seq >= first) {
            // A prune still deleting: the first kept entry is itself to be removed, and its link
            // to the deleted one cannot be checked.
            (expected_seq, unanchored) = (first, true);
        }
    }
    let checked_from = expected_seq;
    let mut stmt = conn.prepare(&format!("{SELECT_ENTRIES} ORDER BY rowid"))?;
    let mut rows = stmt.query([])?;
    let mut problem = None;
    let mut last_signed = true;
    while let Some(row) = rows.next()? {
        let entry = entry_from_row(row)?;
        if unanchored {
            prev = entry.prev_hash;
            unanchored = false;
        }
        let bad = |reason: &str| AuditProblem {
            seq: expected_seq,
            reason: format!("{reason} (entry stored as #{})", entry.seq),
        };
        if entry.seq != expected_seq {
            problem = Some(bad(if entry.seq > expected_seq {
                "entries are missing before this one"
            } else {
                "entry out of order"
            }));
            break;
        }
        if entry.prev_hash != prev {
            problem = Some(bad(
                "does not chain to the previous entry (removed or reordered entries)",
            ));
            break;
        }
        let bytes = canonical_bytes(entry.seq, &entry.event, &entry.prev_hash);
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if hash != entry.hash {
            problem = Some(bad("content does not match its hash (edited)"));
            break;
        }
        if let Some(sig) = entry.signature.as_ref() {
            if key
                .verify_strict(&bytes, &Signature::from_bytes(sig))
                .is_err()
            {
                problem = Some(bad("signature invalid"));
                break;
            }
        }
        last_signed = entry.signature.is_some();
        prev = hash;
        expected_seq += 1;
    }
    let checked = expected_seq - 1;
    let entries = checked + 1 - checked_from;
    if problem.is_none() && !last_signed {
        problem = Some(AuditProblem {
            seq: checked,
            reason: "the newest entry carries no signature (entries were removed or forged)".into(),
        });
    }
    if problem.is_none() {
        let recorded = get_setting(conn, "audit_head")?;
        let actual = format!("{checked}:{}", hex::encode(prev));
        match recorded {
            Some(head) if head != actual => {
                problem = Some(AuditProblem {
                    seq: checked + 1,
                    reason: format!("the newest entries were removed (recorded head {head})"),
                });
            }
            None if checked > 0 => {
                problem = Some(AuditProblem {
                    seq: checked + 1,
                    reason: "the recorded head is missing".into(),
                });
            }
            _ => {}
        }
    }
    Ok(AuditVerification {
        entries,
        first_seq: checked_from,
        head_seq: checked,
        head_hash: hex::encode(prev),
        problem,
    })
}

/// Endpoint of the entry that records a prune.
pub const PRUNE_ENDPOINT: &str = "owner:audit-prune";
/// Entries deleted per transaction while pruning: short transactions keep the server's writes
/// flowing while a large prune runs.
pub const PRUNE_CHUNK: u64 = 5_000;

/// The boundary of a prune: every entry up to `through_seq` is to be removed; `hash` is that
/// entry's hash (the `prev_hash` of the first kept entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneBoundary {
    /// Last entry removed.
    pub through_seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

impl PruneBoundary {
    fn detail(&self) -> String {
        format!("{}:{}", self.through_seq, hex::encode(self.hash))
    }

    fn parse(detail: &str) -> Option<PruneBoundary> {
        let (seq, hash) = detail.split_once(':')?;
        let hash = hex::decode(hash).ok()?;
        Some(PruneBoundary {
            through_seq: seq.parse().ok()?,
            hash: hash.as_slice().try_into().ok()?,
        })
    }
}

/// Where a prune of every entry older than `before_ms` would end: the newest entry before the first
/// one at or after `before_ms` (entries at or after it are always kept). `None` if nothing is older.
pub fn prune_boundary(
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

/// Records a prune (appends the signed `owner:audit-prune` entry). Call in the caller's write
/// transaction, then [`delete_pruned`] until it returns 0.
pub fn record_prune(
    conn: &Connection,
    identity: &IdentityKey,
    boundary: PruneBoundary,
    source: &str,
) -> Result<u64, StoreError> {
    let mut event = AuditEvent::owner("audit-prune", &boundary.detail());
    event.source = source.to_string();
    append_events(conn, identity, [event])
}

/// Deletes up to [`PRUNE_CHUNK`] of the oldest entries up to a recorded prune's boundary; returns
/// how many were deleted (0 when none are left).
pub fn delete_pruned(conn: &Connection, boundary: PruneBoundary) -> Result<u64, StoreError> {
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

/// Parses `--since`: unix seconds, or an ISO 8601 time `YYYY-MM-DDTHH:MM:SSZ`. Returns milliseconds.
pub fn parse_since(text: &str) -> Option<i64> {
    if let Ok(secs) = text.parse::<i64>() {
        return secs.checked_mul(1000);
    }
    keyholder_protocol::document::parse_iso8601(text).and_then(|s| s.checked_mul(1000))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::migrate(&mut conn).unwrap();
        conn
    }

    #[test]
    fn canonical_bytes_are_length_prefixed() {
        let a = AuditEvent {
            endpoint: "ab".into(),
            service: "c".into(),
            ..AuditEvent::default()
        };
        let b = AuditEvent {
            endpoint: "a".into(),
            service: "bc".into(),
            ..AuditEvent::default()
        };
        assert_ne!(
            canonical_bytes(1, &a, &[0; 32]),
            canonical_bytes(1, &b, &[0; 32])
        );
        assert!(canonical_bytes(1, &a, &[0; 32]).starts_with(AUDIT_LABEL));
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

    #[test]
    fn since_parses_seconds_and_iso() {
        assert_eq!(parse_since("10"), Some(10_000));
        assert_eq!(parse_since("1970-01-01T00:00:10Z"), Some(10_000));
        assert_eq!(parse_since("yesterday"), None);
    }
}
