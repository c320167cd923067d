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
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::storage::AuditSigner;

pub use recorder::AuditRecorder;

/// Domain label at the start of every entry's canonical bytes.
pub const AUDIT_LABEL: &[u8] = b"keyholder/v1/audit";
/// Longest text kept per field (longer values are cut, on a character boundary).
pub const MAX_FIELD_LEN: usize = 512;

/// The upstream origin of a proxied call (`scheme://host:port`, the form egress pins hold): the
/// proxy handler puts it in the request extensions, and the audit entry of the request carries it.
#[derive(Debug, Clone)]
pub struct UpstreamOrigin(pub crate::upstream::Origin);

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

/// Links events onto a chain whose head is `(seq, hash)`: bounds each event, gives it the next
/// sequence number and the previous hash, hashes its canonical bytes, and signs the newest (the
/// chain carries that signature back over the others). Engines store the entries as returned, in
/// the transaction that read the head.
pub fn link_events(
    head: (u64, [u8; 32]),
    events: impl IntoIterator<Item = AuditEvent>,
    signer: &dyn AuditSigner,
) -> Vec<AuditEntry> {
    let (mut seq, mut prev) = head;
    let mut events = events.into_iter().peekable();
    let mut out = Vec::new();
    while let Some(event) = events.next() {
        let event = event.bounded();
        seq += 1;
        let bytes = canonical_bytes(seq, &event, &prev);
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        // Only the batch's newest entry is signed; the chain carries the signature back.
        let signature = events.peek().is_none().then(|| signer.sign_audit(&bytes));
        out.push(AuditEntry {
            seq,
            event,
            prev_hash: prev,
            hash,
            signature,
        });
        prev = hash;
    }
    out
}

/// The recorded head after `entries` (kept apart from the entries, so that removing the newest
/// ones is noticed too): `<seq>:<hash hex>`.
pub fn head_record(seq: u64, hash: &[u8; 32]) -> String {
    format!("{seq}:{}", hex::encode(hash))
}

impl AuditSigner for keyholder_protocol::IdentityKey {
    fn sign_audit(&self, bytes: &[u8]) -> [u8; 64] {
        self.sign(bytes)
    }
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

/// Walks a chain in order (see [`ChainVerifier::check`]): sequence without gaps, each entry's
/// `prev_hash` equal to the previous entry's hash, its hash equal to SHA-256 of its canonical
/// bytes, its signature valid under the key, and the recorded head equal to the last entry. Stops
/// at the first bad entry. Engines feed it the entries of one snapshot.
pub struct ChainVerifier {
    key: VerifyingKey,
    expected_seq: u64,
    prev: [u8; 32],
    unanchored: bool,
    checked_from: u64,
    last_signed: bool,
    problem: Option<AuditProblem>,
}

impl ChainVerifier {
    /// Starts at the chain's first stored entry `first_seq` (above 1 after a prune, anchored by
    /// one of the recorded prunes).
    pub fn new(key: VerifyingKey, first_seq: Option<u64>, prunes: &[PruneBoundary]) -> Self {
        let first = first_seq.unwrap_or(1);
        let (mut expected_seq, mut prev, mut unanchored) = (1u64, [0u8; 32], false);
        // After a prune the chain starts at the first kept entry, anchored by a prune entry
        // further on (which the walk verifies like every other entry).
        if first > 1 {
            if let Some(b) = prunes.iter().find(|b| b.through_seq == first - 1) {
                (expected_seq, prev) = (first, b.hash);
            } else if prunes.iter().any(|b| b.through_seq >= first) {
                // A prune still deleting: the first kept entry is itself to be removed, and its
                // link to the deleted one cannot be checked.
                (expected_seq, unanchored) = (first, true);
            }
        }
        ChainVerifier {
            key,
            expected_seq,
            prev,
            unanchored,
            checked_from: expected_seq,
            last_signed: true,
            problem: None,
        }
    }

    /// Checks the next entry in storage order; false once a problem is found (stop feeding).
    pub fn check(&mut self, entry: &AuditEntry) -> bool {
        if self.problem.is_some() {
            return false;
        }
        if self.unanchored {
            self.prev = entry.prev_hash;
            self.unanchored = false;
        }
        let expected_seq = self.expected_seq;
        let bad = |reason: &str| AuditProblem {
            seq: expected_seq,
            reason: format!("{reason} (entry stored as #{})", entry.seq),
        };
        if entry.seq != expected_seq {
            self.problem = Some(bad(if entry.seq > expected_seq {
                "entries are missing before this one"
            } else {
                "entry out of order"
            }));
            return false;
        }
        if entry.prev_hash != self.prev {
            self.problem = Some(bad(
                "does not chain to the previous entry (removed or reordered entries)",
            ));
            return false;
        }
        let bytes = canonical_bytes(entry.seq, &entry.event, &entry.prev_hash);
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if hash != entry.hash {
            self.problem = Some(bad("content does not match its hash (edited)"));
            return false;
        }
        if let Some(sig) = entry.signature.as_ref() {
            if self
                .key
                .verify_strict(&bytes, &Signature::from_bytes(sig))
                .is_err()
            {
                self.problem = Some(bad("signature invalid"));
                return false;
            }
        }
        self.last_signed = entry.signature.is_some();
        self.prev = hash;
        self.expected_seq += 1;
        true
    }

    /// The outcome, given the recorded head (see [`head_record`]).
    pub fn finish(self, recorded_head: Option<String>) -> AuditVerification {
        let ChainVerifier {
            expected_seq,
            prev,
            checked_from,
            last_signed,
            mut problem,
            ..
        } = self;
        let checked = expected_seq - 1;
        let entries = checked + 1 - checked_from;
        if problem.is_none() && !last_signed {
            problem = Some(AuditProblem {
                seq: checked,
                reason: "the newest entry carries no signature (entries were removed or forged)"
                    .into(),
            });
        }
        if problem.is_none() {
            let actual = head_record(checked, &prev);
            match recorded_head {
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
        AuditVerification {
            entries,
            first_seq: checked_from,
            head_seq: checked,
            head_hash: hex::encode(prev),
            problem,
        }
    }
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
    /// The detail of its prune entry: `<seq>:<hash hex>`.
    pub fn detail(&self) -> String {
        format!("{}:{}", self.through_seq, hex::encode(self.hash))
    }

    /// Parses a prune entry's detail.
    pub fn parse(detail: &str) -> Option<PruneBoundary> {
        let (seq, hash) = detail.split_once(':')?;
        let hash = hex::decode(hash).ok()?;
        Some(PruneBoundary {
            through_seq: seq.parse().ok()?,
            hash: hash.as_slice().try_into().ok()?,
        })
    }
}

/// The signed `owner:audit-prune` entry that records a prune (append it, then delete the entries
/// up to the boundary in chunks).
pub fn prune_event(boundary: PruneBoundary, source: &str) -> AuditEvent {
    let mut event = AuditEvent::owner("audit-prune", &boundary.detail());
    event.source = source.to_string();
    event
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
    fn since_parses_seconds_and_iso() {
        assert_eq!(parse_since("10"), Some(10_000));
        assert_eq!(parse_since("1970-01-01T00:00:10Z"), Some(10_000));
        assert_eq!(parse_since("yesterday"), None);
    }
}
