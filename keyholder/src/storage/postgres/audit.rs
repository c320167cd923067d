//! One audit chain per replica. A single chain would make every replica wait on its head; here each
//! replica (its node id) appends to its own chain: its own sequence from 1, each entry chained to
//! the previous one of the same node, the newest entry of each batch signed with the keyholder's
//! identity key, and the node's head kept in `audit_heads`. Now and then a replica appends an
//! `audit:xref` entry naming the other chains' heads (`node=seq:hash,...`), so that a chain cut back
//! after another replica saw its head is detected even though its own recorded head was rewritten.
//!
//! Canonical bytes: for node `""` (the trail moved from SQLite), exactly [`crate::audit::canonical_bytes`];
//! for any other node, `b"keyholder/v1/audit-node"`, the node id as a big-endian `u32` length and
//! its UTF-8 bytes, then those same bytes. Prunes are per chain, as in the SQLite trail: a signed
//! `owner:audit-prune` entry in the chain names the last removed entry.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

use super::PgError;
use crate::audit::{canonical_bytes, AuditEntry, AuditEvent, AuditProblem, AuditVerification};
use crate::storage::AuditSigner;

/// Label before the node id in a replica chain's canonical bytes.
pub const NODE_LABEL: &[u8] = b"keyholder/v1/audit-node";
/// Endpoint of a cross-reference entry.
pub const XREF_ENDPOINT: &str = "audit:xref";

/// The canonical bytes of an entry of `node`'s chain (see the module documentation).
pub fn node_canonical_bytes(node: &str, seq: u64, event: &AuditEvent, prev: &[u8; 32]) -> Vec<u8> {
    let inner = canonical_bytes(seq, event, prev);
    if node.is_empty() {
        return inner;
    }
    let mut out = Vec::with_capacity(inner.len() + NODE_LABEL.len() + 4 + node.len());
    out.extend_from_slice(NODE_LABEL);
    out.extend_from_slice(&u32::try_from(node.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(node.as_bytes());
    out.extend_from_slice(&inner);
    out
}

fn to32(bytes: &[u8]) -> Result<[u8; 32], PgError> {
    bytes
        .try_into()
        .map_err(|_| PgError::Corrupt("audit hash length".into()))
}

/// Appends `events` to `node`'s chain inside the caller's transaction (the head row is locked,
/// so the node's concurrent appenders take turns; other nodes never wait). Returns the new head.
pub async fn append_events(
    tx: &impl GenericClient,
    node: &str,
    signer: &dyn AuditSigner,
    events: Vec<AuditEvent>,
) -> Result<u64, PgError> {
    if events.is_empty() {
        return head(tx, node).await.map(|(seq, _)| seq);
    }
    tx.execute(
        "INSERT INTO audit_heads (node, seq, hash) VALUES ($1, 0, $2) ON CONFLICT DO NOTHING",
        &[&node, &vec![0u8; 32]],
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT seq, hash FROM audit_heads WHERE node = $1 FOR UPDATE",
            &[&node],
        )
        .await?;
    let mut seq = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
    let mut prev = to32(row.get::<_, &[u8]>(1))?;
    let count = events.len();
    let mut cols: [Vec<String>; 9] = Default::default();
    let (mut seqs, mut ats, mut prevs, mut hashes, mut sigs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, event) in events.into_iter().enumerate() {
        let event = bounded(event);
        seq += 1;
        let bytes = node_canonical_bytes(node, seq, &event, &prev);
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        let signature = if i + 1 == count {
            signer.sign_audit(&bytes).to_vec()
        } else {
            Vec::new()
        };
        for (col, value) in cols.iter_mut().zip(fields(&event)) {
            col.push(value.to_string());
        }
        seqs.push(i64::try_from(seq).unwrap_or(i64::MAX));
        ats.push(event.at_ms);
        prevs.push(prev.to_vec());
        hashes.push(hash.to_vec());
        sigs.push(signature);
        prev = hash;
    }
    let statement = tx
        .prepare(
            "INSERT INTO audit_log (node, seq, at_ms, endpoint, service, purpose, agent_id, proxy_id,
                source, upstream, result, request_id, prev_hash, hash, signature)
             SELECT $1, * FROM unnest($2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
                $13::bytea[], $14::bytea[], $15::bytea[])",
        )
        .await?;
    tx.execute(
        &statement,
        &[
            &node, &seqs, &ats, &cols[0], &cols[1], &cols[2], &cols[3], &cols[4], &cols[5],
            &cols[6], &cols[7], &cols[8], &prevs, &hashes, &sigs,
        ],
    )
    .await?;
    tx.execute(
        "UPDATE audit_heads SET seq = $2, hash = $3 WHERE node = $1",
        &[
            &node,
            &i64::try_from(seq).unwrap_or(i64::MAX),
            &prev.to_vec(),
        ],
    )
    .await?;
    Ok(seq)
}

fn bounded(mut event: AuditEvent) -> AuditEvent {
    for field in [
        &mut event.endpoint,
        &mut event.service,
        &mut event.purpose,
        &mut event.agent_id,
        &mut event.proxy_id,
        &mut event.source,
        &mut event.upstream,
        &mut event.result,
        &mut event.request_id,
    ] {
        if field.len() > crate::audit::MAX_FIELD_LEN {
            let mut end = crate::audit::MAX_FIELD_LEN;
            while !field.is_char_boundary(end) {
                end -= 1;
            }
            field.truncate(end);
        }
    }
    event
}

fn fields(e: &AuditEvent) -> [&str; 9] {
    [
        &e.endpoint,
        &e.service,
        &e.purpose,
        &e.agent_id,
        &e.proxy_id,
        &e.source,
        &e.upstream,
        &e.result,
        &e.request_id,
    ]
}

/// `node`'s recorded head (0 and zeros before its first entry).
pub async fn head(client: &impl GenericClient, node: &str) -> Result<(u64, [u8; 32]), PgError> {
    match client
        .query_opt(
            "SELECT seq, hash FROM audit_heads WHERE node = $1",
            &[&node],
        )
        .await?
    {
        None => Ok((0, [0u8; 32])),
        Some(row) => Ok((
            u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
            to32(row.get::<_, &[u8]>(1))?,
        )),
    }
}

/// Appends a cross-reference to `node`'s chain: the other chains' heads as they are now.
pub async fn append_xref(
    tx: &impl GenericClient,
    node: &str,
    signer: &dyn AuditSigner,
) -> Result<u64, PgError> {
    let rows = tx
        .query(
            "SELECT node, seq, hash FROM audit_heads WHERE node <> $1 AND seq > 0 ORDER BY node",
            &[&node],
        )
        .await?;
    if rows.is_empty() {
        // No other chain to refer to (a single replica).
        return head(tx, node).await.map(|(seq, _)| seq);
    }
    let detail: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}={}:{}",
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                hex::encode(r.get::<_, &[u8]>(2))
            )
        })
        .collect();
    let mut event = AuditEvent::owner("xref", &detail.join(","));
    event.endpoint = XREF_ENDPOINT.into();
    event.source = "replica".into();
    append_events(tx, node, signer, vec![event]).await
}

const SELECT_ENTRIES: &str = "SELECT node, seq, at_ms, endpoint, service, purpose, agent_id,
    proxy_id, source, upstream, result, request_id, prev_hash, hash, signature FROM audit_log";

fn entry_of(r: &tokio_postgres::Row) -> (String, AuditEntry) {
    let b32 = |i: usize| -> [u8; 32] {
        let v: &[u8] = r.get(i);
        <[u8; 32]>::try_from(v).unwrap_or([0u8; 32])
    };
    let sig: &[u8] = r.get(14);
    (
        r.get(0),
        AuditEntry {
            seq: u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
            event: AuditEvent {
                at_ms: r.get(2),
                endpoint: r.get(3),
                service: r.get(4),
                purpose: r.get(5),
                agent_id: r.get(6),
                proxy_id: r.get(7),
                source: r.get(8),
                upstream: r.get(9),
                result: r.get(10),
                request_id: r.get(11),
            },
            prev_hash: b32(12),
            hash: b32(13),
            signature: <[u8; 64]>::try_from(sig).ok(),
        },
    )
}

/// Entries of every chain (or of `service` only), oldest first by time, at most the newest `limit`.
pub async fn list_entries(
    client: &impl GenericClient,
    service: Option<&str>,
    since_ms: Option<i64>,
    limit: Option<i64>,
) -> Result<Vec<(String, AuditEntry)>, PgError> {
    let sql = format!(
        "SELECT * FROM ({SELECT_ENTRIES} WHERE ($1::text IS NULL OR service = $1)
           AND ($2::int8 IS NULL OR at_ms >= $2) ORDER BY at_ms DESC, node DESC, seq DESC
           LIMIT $3) e ORDER BY at_ms, node, seq"
    );
    let rows = client
        .query(&sql, &[&service, &since_ms, &limit.unwrap_or(i64::MAX)])
        .await?;
    Ok(rows.iter().map(entry_of).collect())
}

/// The verification of one chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainVerification {
    /// The replica's node id.
    pub node: String,
    /// What was found.
    #[serde(flatten)]
    pub verification: AuditVerification,
}

/// Verifies every chain (in one snapshot): each as the SQLite trail is verified (sequence without
/// gaps, hashes, signatures, a signed newest entry, the recorded head), then every cross-reference
/// against the chain it names. A chain is reported bad at its first bad entry.
pub async fn verify_all(
    client: &mut deadpool_postgres::Object,
    key: &VerifyingKey,
) -> Result<Vec<ChainVerification>, PgError> {
    let tx = super::snapshot(client).await?;
    let mut chains: BTreeMap<String, Vec<AuditEntry>> = BTreeMap::new();
    for row in tx
        .query(&format!("{SELECT_ENTRIES} ORDER BY node, seq"), &[])
        .await?
    {
        let (node, entry) = entry_of(&row);
        chains.entry(node).or_default().push(entry);
    }
    let heads: BTreeMap<String, (u64, [u8; 32])> = tx
        .query("SELECT node, seq, hash FROM audit_heads", &[])
        .await?
        .iter()
        .map(|r| {
            let hash: &[u8] = r.get(2);
            (
                r.get::<_, String>(0),
                (
                    u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                    <[u8; 32]>::try_from(hash).unwrap_or([0u8; 32]),
                ),
            )
        })
        .collect();
    tx.commit().await?;
    let mut nodes: Vec<String> = chains.keys().cloned().collect();
    for node in heads.keys() {
        if !chains.contains_key(node) && heads.get(node).is_some_and(|h| h.0 > 0) {
            nodes.push(node.clone());
        }
    }
    let mut out: Vec<ChainVerification> = nodes
        .iter()
        .map(|node| {
            let entries = chains.get(node).map(Vec::as_slice).unwrap_or(&[]);
            ChainVerification {
                node: node.clone(),
                verification: verify_chain(node, entries, heads.get(node).copied(), key),
            }
        })
        .collect();
    // Cross-references: every head another chain saw must still be in the chain it names.
    let mut xref_problems: Vec<(String, AuditProblem)> = Vec::new();
    for (node, entries) in &chains {
        for entry in entries.iter().filter(|e| e.event.endpoint == XREF_ENDPOINT) {
            for item in entry.event.service.split(',').filter(|s| !s.is_empty()) {
                let Some((other, rest)) = item.split_once('=') else {
                    continue;
                };
                let Some((seq, hash)) = rest.split_once(':') else {
                    continue;
                };
                let Ok(seq) = seq.parse::<u64>() else {
                    continue;
                };
                let theirs = chains.get(other).map(Vec::as_slice).unwrap_or(&[]);
                let first = theirs.first().map(|e| e.seq).unwrap_or(u64::MAX);
                let found = theirs.iter().find(|e| e.seq == seq);
                let problem = match found {
                    Some(e) if hex::encode(e.hash) == hash => None,
                    Some(_) => Some(format!(
                        "entry #{seq} differs from the one {node} saw (#{} of {node})",
                        entry.seq
                    )),
                    // Pruned since: nothing to compare.
                    None if seq < first && !theirs.is_empty() => None,
                    None => Some(format!(
                        "entries up to #{seq} are missing; {node} saw them (#{} of {node})",
                        entry.seq
                    )),
                };
                if let Some(reason) = problem {
                    xref_problems.push((other.to_string(), AuditProblem { seq, reason }));
                }
            }
        }
    }
    for (other, problem) in xref_problems {
        match out.iter_mut().find(|c| c.node == other) {
            Some(chain) => {
                if chain.verification.problem.is_none() {
                    chain.verification.problem = Some(problem);
                }
            }
            None => out.push(ChainVerification {
                node: other,
                verification: AuditVerification {
                    entries: 0,
                    first_seq: 1,
                    head_seq: 0,
                    head_hash: hex::encode([0u8; 32]),
                    problem: Some(problem),
                },
            }),
        }
    }
    Ok(out)
}

/// Verifies one chain's entries (in sequence order) against its recorded head.
pub fn verify_chain(
    node: &str,
    entries: &[AuditEntry],
    recorded: Option<(u64, [u8; 32])>,
    key: &VerifyingKey,
) -> AuditVerification {
    verify_with(node, entries, recorded, Some(key))
}

/// Like [`verify_chain`] without checking signatures (moving a trail: its links and hashes).
pub fn verify_links(
    node: &str,
    entries: &[AuditEntry],
    recorded: Option<(u64, [u8; 32])>,
) -> AuditVerification {
    verify_with(node, entries, recorded, None)
}

fn verify_with(
    node: &str,
    entries: &[AuditEntry],
    recorded: Option<(u64, [u8; 32])>,
    key: Option<&VerifyingKey>,
) -> AuditVerification {
    let first = entries.first().map(|e| e.seq).unwrap_or(1);
    let prunes: Vec<(u64, [u8; 32])> = entries
        .iter()
        .filter(|e| e.event.endpoint == crate::audit::PRUNE_ENDPOINT)
        .filter_map(|e| {
            let (seq, hash) = e.event.service.split_once(':')?;
            let hash = hex::decode(hash).ok()?;
            Some((
                seq.parse().ok()?,
                <[u8; 32]>::try_from(hash.as_slice()).ok()?,
            ))
        })
        .collect();
    let (mut expected, mut prev, mut unanchored) = (1u64, [0u8; 32], false);
    if first > 1 {
        if let Some((_, hash)) = prunes.iter().find(|(s, _)| *s == first - 1) {
            (expected, prev) = (first, *hash);
        } else if prunes.iter().any(|(s, _)| *s >= first) {
            (expected, unanchored) = (first, true);
        }
    }
    let checked_from = expected;
    let mut problem = None;
    let mut last_signed = true;
    for entry in entries {
        if unanchored {
            prev = entry.prev_hash;
            unanchored = false;
        }
        let bad = |reason: &str| AuditProblem {
            seq: expected,
            reason: format!("{reason} (entry stored as #{})", entry.seq),
        };
        if entry.seq != expected {
            problem = Some(bad(if entry.seq > expected {
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
        let bytes = node_canonical_bytes(node, entry.seq, &entry.event, &entry.prev_hash);
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if hash != entry.hash {
            problem = Some(bad("content does not match its hash (edited)"));
            break;
        }
        if let (Some(sig), Some(key)) = (entry.signature.as_ref(), key) {
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
        expected += 1;
    }
    let checked = expected - 1;
    if problem.is_none() && !last_signed {
        problem = Some(AuditProblem {
            seq: checked,
            reason: "the newest entry carries no signature (entries were removed or forged)".into(),
        });
    }
    if problem.is_none() {
        match recorded {
            Some((seq, hash)) if (seq, hash) != (checked, prev) => {
                problem = Some(AuditProblem {
                    seq: checked + 1,
                    reason: format!(
                        "the newest entries were removed (recorded head {seq}:{})",
                        hex::encode(hash)
                    ),
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
    AuditVerification {
        entries: (checked + 1).saturating_sub(checked_from),
        first_seq: checked_from,
        head_seq: checked,
        head_hash: hex::encode(prev),
        problem,
    }
}

/// Prunes every chain's entries older than `before_ms`: per chain a signed `owner:audit-prune`
/// entry naming the boundary, then the entries up to it. Returns how many entries were removed.
pub async fn prune_before(
    client: &mut deadpool_postgres::Object,
    signer: &dyn AuditSigner,
    before_ms: i64,
    source: &str,
) -> Result<u64, PgError> {
    prune_chains_before(client, signer, before_ms, source, None).await
}

/// [`prune_before`] for every chain but `skip`'s.
pub async fn prune_chains_before(
    client: &mut deadpool_postgres::Object,
    signer: &dyn AuditSigner,
    before_ms: i64,
    source: &str,
    skip: Option<&str>,
) -> Result<u64, PgError> {
    let nodes: Vec<String> = client
        .query("SELECT node FROM audit_heads WHERE seq > 0", &[])
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|n| Some(n.as_str()) != skip)
        .collect();
    let mut removed = 0u64;
    for node in nodes {
        let tx = client.transaction().await?;
        let first_kept: Option<i64> = tx
            .query_one(
                "SELECT MIN(seq) FROM audit_log WHERE node = $1 AND at_ms >= $2",
                &[&node, &before_ms],
            )
            .await?
            .get(0);
        let boundary = tx
            .query_opt(
                "SELECT seq, hash FROM audit_log WHERE node = $1 AND seq < $2
                 ORDER BY seq DESC LIMIT 1",
                &[&node, &first_kept.unwrap_or(i64::MAX)],
            )
            .await?;
        let Some(boundary) = boundary else {
            tx.commit().await?;
            continue;
        };
        let through: i64 = boundary.get(0);
        let hash: &[u8] = boundary.get(1);
        let mut event =
            AuditEvent::owner("audit-prune", &format!("{through}:{}", hex::encode(hash)));
        event.source = source.to_string();
        append_events(&tx, &node, signer, vec![event]).await?;
        tx.commit().await?;
        loop {
            let deleted = client
                .execute(
                    "DELETE FROM audit_log WHERE node = $1 AND seq IN (SELECT seq FROM audit_log
                     WHERE node = $1 AND seq <= $2 ORDER BY seq LIMIT 5000)",
                    &[&node, &through],
                )
                .await?;
            removed += deleted;
            if deleted == 0 {
                break;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::TestDatabase;
    use super::*;
    use keyholder_protocol::IdentityKey;

    struct Signer(IdentityKey);
    impl AuditSigner for Signer {
        fn sign_audit(&self, bytes: &[u8]) -> [u8; 64] {
            self.0.sign(bytes)
        }
    }

    fn events(n: usize, service: &str) -> Vec<AuditEvent> {
        (0..n)
            .map(|i| AuditEvent {
                at_ms: i as i64 + 1,
                endpoint: "/v1/credential".into(),
                service: service.into(),
                result: "ok".into(),
                ..AuditEvent::default()
            })
            .collect()
    }

    #[tokio::test]
    async fn chains_per_replica_verify_and_report_a_gap_in_any() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        super::super::schema::migrate(db.target()).await.unwrap();
        let pool = db.target().pool().unwrap();
        let key = std::sync::Arc::new(Signer(IdentityKey::generate()));
        // Two replicas appending at once.
        let mut tasks = Vec::new();
        for node in ["a", "b"] {
            for _ in 0..10 {
                let (pool, key) = (pool.clone(), std::sync::Arc::clone(&key));
                tasks.push(tokio::spawn(async move {
                    let mut c = pool.get().await.unwrap();
                    let tx = c.transaction().await.unwrap();
                    append_events(&tx, node, &*key, events(3, node))
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut c = pool.get().await.unwrap();
        let tx = c.transaction().await.unwrap();
        append_xref(&tx, "a", &*key).await.unwrap();
        tx.commit().await.unwrap();
        let report = verify_all(&mut c, &key.0.verifying_key()).await.unwrap();
        assert_eq!(report.len(), 2);
        for chain in &report {
            assert!(chain.verification.problem.is_none(), "{chain:?}");
        }
        assert_eq!(report[0].verification.head_seq, 31, "30 + the xref");
        assert_eq!(report[1].verification.head_seq, 30);
        assert_eq!(
            list_entries(&c, Some("b"), None, None).await.unwrap().len(),
            30
        );

        // b's newest entries removed and its head rewritten to match: a's cross-reference sees it.
        let (seq, hash): (i64, Vec<u8>) = {
            let r = c
                .query_one(
                    "SELECT seq, hash FROM audit_log WHERE node = 'b' AND seq = 27",
                    &[],
                )
                .await
                .unwrap();
            (r.get(0), r.get(1))
        };
        c.execute("DELETE FROM audit_log WHERE node = 'b' AND seq > 27", &[])
            .await
            .unwrap();
        c.execute(
            "UPDATE audit_heads SET seq = $1, hash = $2 WHERE node = 'b'",
            &[&seq, &hash],
        )
        .await
        .unwrap();
        // 27 is an unsigned entry: sign nothing, so also the "no signature" rule fires; the
        // cross-reference names the gap either way.
        let report = verify_all(&mut c, &key.0.verifying_key()).await.unwrap();
        let b = report.iter().find(|r| r.node == "b").unwrap();
        assert!(b.verification.problem.is_some(), "{b:?}");
        let a = report.iter().find(|r| r.node == "a").unwrap();
        assert!(a.verification.problem.is_none());

        // An edit in a's chain is found at its place.
        c.execute(
            "UPDATE audit_log SET result = 'forged' WHERE node = 'a' AND seq = 4",
            &[],
        )
        .await
        .unwrap();
        let report = verify_all(&mut c, &key.0.verifying_key()).await.unwrap();
        let a = report.iter().find(|r| r.node == "a").unwrap();
        assert_eq!(a.verification.problem.as_ref().unwrap().seq, 4);
    }

    #[tokio::test]
    async fn a_cut_back_chain_with_a_rewritten_head_is_caught_by_the_xref() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        super::super::schema::migrate(db.target()).await.unwrap();
        let pool = db.target().pool().unwrap();
        let key = Signer(IdentityKey::generate());
        let mut c = pool.get().await.unwrap();
        for batch in 0..3 {
            let tx = c.transaction().await.unwrap();
            append_events(&tx, "b", &key, events(2, &format!("s{batch}")))
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        let tx = c.transaction().await.unwrap();
        append_xref(&tx, "a", &key).await.unwrap();
        tx.commit().await.unwrap();
        // Cut b back to #4 (a signed batch end) and rewrite its head: b alone verifies.
        let r = c
            .query_one(
                "SELECT hash FROM audit_log WHERE node = 'b' AND seq = 4",
                &[],
            )
            .await
            .unwrap();
        let hash: Vec<u8> = r.get(0);
        c.execute("DELETE FROM audit_log WHERE node = 'b' AND seq > 4", &[])
            .await
            .unwrap();
        c.execute(
            "UPDATE audit_heads SET seq = 4, hash = $1 WHERE node = 'b'",
            &[&hash],
        )
        .await
        .unwrap();
        let report = verify_all(&mut c, &key.0.verifying_key()).await.unwrap();
        let b = report.iter().find(|r| r.node == "b").unwrap();
        let problem = b.verification.problem.as_ref().unwrap();
        assert!(problem.reason.contains("missing"), "{problem:?}");
        assert_eq!(problem.seq, 6);

        // Prune keeps every chain verifiable.
        let removed = prune_before(&mut c, &key, 2, "test").await.unwrap();
        assert!(removed >= 1);
    }
}
