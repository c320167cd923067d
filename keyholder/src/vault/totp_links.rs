//! Sealing `totpUri` links (protocol 2.4.0, PROTOCOL.md §7.5) in documents written before: by an
//! earlier keyholder (which kept the link as plaintext meta), by the reference webhooks, by an import,
//! or by the platform through `/v1/storage set`. Such a document is rewritten with the seed sealed as
//! `totpSecret` and only the descriptors in meta; the link is gone. This runs at start, on every read
//! of a token document, and for `POST /v1/admin/migrate`. Until a document can be rewritten (sealed
//! keyholder, malformed link), every answer built from it leaves the link out.

use keyholder_protocol::document::{open_document, seal_token_data};
use keyholder_protocol::otpauth::{expand_totp_uri, parse_otpauth, TOTP_URI_FIELD};
use keyholder_protocol::wire::Collection;
use serde_json::{Map, Value};

use super::collections::StorageService;
use super::credentials::scrub;
use super::keyring::KeyRing;
use super::VaultError;
use crate::storage::{DocumentSwap, StoredDocument, SwapOutcome};

/// Counts of one sweep (`POST /v1/admin/migrate`): documents looked at, rewritten, and left as they
/// were because their link could not be sealed.
pub type TotpMigration = keyholder_protocol::wire::TotpMigrationCounts;

/// True when a token document holds a link, at the top level (plaintext documents) or in meta.
pub fn holds_totp_link(doc: &Value) -> bool {
    doc.get(TOTP_URI_FIELD).is_some()
        || doc
            .get("meta")
            .and_then(|m| m.get(TOTP_URI_FIELD))
            .is_some()
}

/// The document without any link (what is answered while it cannot be rewritten).
pub fn without_totp_link(doc: &Value) -> Value {
    let mut doc = doc.clone();
    if let Some(obj) = doc.as_object_mut() {
        if let Some(mut link) = obj.remove(TOTP_URI_FIELD) {
            scrub(&mut link);
        }
        if let Some(Value::Object(meta)) = obj.get_mut("meta") {
            if let Some(mut link) = meta.remove(TOTP_URI_FIELD) {
                scrub(&mut link);
            }
        }
    }
    doc
}

/// Why a document's link could not be sealed (never says what the link held).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The document cannot be opened with the keys held.
    #[error("the document cannot be opened")]
    Undecryptable,
    /// The link is not a valid `otpauth://totp/` link.
    #[error("{0}")]
    Link(#[from] keyholder_protocol::otpauth::OtpauthError),
    /// No current data key.
    #[error("no current data key")]
    NoKey,
}

/// Rewrites a document holding a link into our sealed shape: every field re-sealed under the current
/// data key, the seed as `totpSecret` (a `totpSecret` already stored wins over the link's), the
/// descriptors in meta, `createdAt` and `creationId` kept.
pub fn seal_totp_link(
    doc: &Value,
    service: &str,
    keys: &KeyRing,
    now: i64,
) -> Result<Value, LinkError> {
    let opened = open_document(doc, service, keys).map_err(|_| LinkError::Undecryptable)?;
    let body = opened.credential_json();
    let mut parsed: Value = serde_json::from_slice(&body).map_err(|_| LinkError::Undecryptable)?;
    drop(body);
    let mut token_data = match parsed.get_mut("token").map(Value::take) {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    scrub(&mut parsed);
    let result = rebuild(&mut token_data, doc, service, keys, now);
    token_data.values_mut().for_each(scrub);
    result
}

fn rebuild(
    token_data: &mut Map<String, Value>,
    doc: &Value,
    service: &str,
    keys: &KeyRing,
    now: i64,
) -> Result<Value, LinkError> {
    if token_data.contains_key("totpSecret") {
        // The sealed seed stays; the link only contributes its descriptors.
        let mut link = token_data.remove(TOTP_URI_FIELD).unwrap_or(Value::Null);
        let parsed = link
            .as_str()
            .ok_or(keyholder_protocol::otpauth::OtpauthError::Conflict)
            .and_then(parse_otpauth);
        scrub(&mut link);
        for (name, value) in parsed?.descriptors() {
            token_data.entry(name).or_insert(value);
        }
    } else {
        expand_totp_uri(token_data)?;
    }
    let meta = doc.get("meta");
    let kept = |name: &str| {
        meta.and_then(|m| m.get(name))
            .or_else(|| doc.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let created_at = kept("createdAt");
    let creation_id = kept("creationId");
    // Computed meta is recomputed; the creation id is re-set only from the stored one.
    token_data.remove("creationId");
    let key = keys.current_data_key().map_err(|_| LinkError::NoKey)?;
    seal_token_data(
        service,
        token_data,
        key,
        keys.current_data_version(),
        now,
        created_at.as_deref(),
        creation_id.as_deref(),
    )
    .map_err(|_| LinkError::Undecryptable)
}

impl StorageService {
    /// A token document as it may be answered: unchanged without a link; with one, rewritten (and
    /// written back, unless the stored text changed meanwhile) or, when that is not possible now, the
    /// document without its link. The flag says whether the answer is what is on disk: only then may
    /// it be cached (a link still on disk is tried again on the next read).
    pub(super) async fn upgrade_token_document(
        &self,
        key: &str,
        text: &str,
        doc: Value,
    ) -> (Value, bool) {
        if !holds_totp_link(&doc) {
            return (doc, true);
        }
        if self.is_sealed() {
            return (without_totp_link(&doc), false);
        }
        let keys = self.keys();
        match seal_totp_link(&doc, key, &keys, crate::clock::now_unix()) {
            Ok(sealed) => {
                let version = keys.current_data_version();
                let written = match self.replace_document(key, text, &sealed, version).await {
                    Ok(true) => {
                        tracing::info!(service = key, "sealed a stored totpUri link");
                        true
                    }
                    Ok(false) => false,
                    Err(err) => {
                        tracing::warn!(error = %err, "could not write a sealed totpUri link back");
                        false
                    }
                };
                (sealed, written)
            }
            Err(err) => {
                tracing::warn!(service = key, error = %err, "a stored totpUri link cannot be sealed; left out of answers");
                (without_totp_link(&doc), false)
            }
        }
    }

    /// Replaces `tokens/<key>` when it still holds exactly `old_text` and the current data key is
    /// still `version` on disk; returns whether it was replaced.
    async fn replace_document(
        &self,
        key: &str,
        old_text: &str,
        new_doc: &Value,
        version: u32,
    ) -> Result<bool, VaultError> {
        let swapped = self
            .documents()
            .swap(DocumentSwap {
                collection: Collection::Tokens,
                key: key.to_string(),
                expected: old_text.to_string(),
                doc: new_doc.to_string(),
                now: crate::clock::now_unix(),
                data_version: Some(version),
            })
            .await?;
        match swapped {
            SwapOutcome::Swapped => Ok(true),
            SwapOutcome::Changed => Ok(false),
            SwapOutcome::KeyRingChanged => Err(VaultError::KeyRingChanged),
        }
    }

    /// Seals every stored link (`POST /v1/admin/migrate`, and at start). Counts only.
    pub async fn migrate_totp_links(&self) -> Result<TotpMigration, VaultError> {
        self.ensure_unsealed()?;
        let rows = self.documents().read_all(Collection::Tokens).await?;
        let mut report = TotpMigration::default();
        for StoredDocument { key, doc: text } in rows {
            report.scanned += 1;
            let Ok(doc) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if !holds_totp_link(&doc) {
                continue;
            }
            let keys = self.keys();
            let sealed = match seal_totp_link(&doc, &key, &keys, crate::clock::now_unix()) {
                Ok(sealed) => sealed,
                Err(err) => {
                    tracing::warn!(service = %key, error = %err, "a stored totpUri link cannot be sealed");
                    report.failed += 1;
                    continue;
                }
            };
            match self
                .replace_document(&key, &text, &sealed, keys.current_data_version())
                .await
            {
                Ok(true) => report.migrated += 1,
                // Rewritten meanwhile by someone else: that write's own read will see to it.
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(service = %key, error = %err, "a sealed totpUri link was not written");
                    report.failed += 1;
                }
            }
        }
        Ok(report)
    }
}
