//! Key rotation on the data folder, run by the owner's CLI inside its own transactions: a new
//! data-key version, re-encrypting stored credentials under the current version in small batches,
//! retiring a version nothing uses, and re-wrapping the key ring under a new master key.

use std::collections::BTreeMap;

use keyholder_protocol::document::{
    decrypt_field, decrypt_platform_v1_field, document_key_versions, encrypt_field,
    field_key_version, platform_v1_field_digest, FieldFormat, KeyLookup, DOCUMENT_ALG,
    DOCUMENT_VERSION,
};
use keyholder_protocol::wire::Collection;
use keyholder_protocol::DataKey;
use serde_json::Value;

use super::keyring::{self, KeyRing, KIND_DATA, KIND_LEGACY};
use super::master::MasterKey;
use super::VaultError;
use crate::storage::{
    ChangeSet, Check, KeyRingSnapshot, Setting, Storage, StoredDocument, WrappedKey, Write,
};

/// The change that adds a data-key version and makes it current for new writes, and the new
/// version.
pub fn rotate_data_key(
    snapshot: &KeyRingSnapshot,
    master: &MasterKey,
) -> Result<(ChangeSet, u32), VaultError> {
    let latest = snapshot.latest_version(KIND_DATA);
    let next = latest + 1;
    let key = DataKey::generate();
    let change = ChangeSet::owner()
        .check(Check::LatestKeyVersion(KIND_DATA.into(), latest))
        .write(Write::PutKey(keyring::wrap_key(
            master,
            KIND_DATA,
            next,
            key.expose(),
        )?))
        .write(Write::PutSetting(Setting::DataVersion, next.to_string()));
    Ok((change, next))
}

/// Re-encrypts the fields of one stored credential that are not under the current data key
/// (older `kh1` versions, or the platform's v1 format), re-sealing them in `kh1` with the document's
/// service, field and the current key version as associated data. A v1 field opens only where it
/// was imported (see `vault::imported_v1`): one the platform copied elsewhere is refused, never
/// laundered into a `kh1` field of the wrong service. Meta and other fields are kept as they are.
/// Returns whether anything changed.
pub fn rewrap_document(doc: &mut Value, service: &str, ring: &KeyRing) -> Result<bool, VaultError> {
    let current = ring.current_data_version();
    let current_key = ring.current_data_key()?;
    let Some(obj) = doc.as_object_mut() else {
        return Ok(false);
    };
    let Some(Value::Object(fields)) = obj.get_mut("fields") else {
        return Ok(false);
    };
    let mut changed = false;
    for (name, value) in fields.iter_mut() {
        let Some(text) = value.as_str() else {
            return Err(VaultError::Undecryptable);
        };
        let plaintext = match field_key_version(text).map_err(|_| VaultError::Undecryptable)? {
            FieldFormat::Keyholder { key_version } if key_version == current => continue,
            FieldFormat::Keyholder { key_version } => {
                let key = ring
                    .data_key(key_version)
                    .ok_or(VaultError::Undecryptable)?;
                decrypt_field(key, service, name, text).map_err(|_| VaultError::Undecryptable)?
            }
            FieldFormat::PlatformV1 => {
                let digest =
                    platform_v1_field_digest(text).map_err(|_| VaultError::Undecryptable)?;
                let key = ring
                    .platform_v1_key(service, name, &digest)
                    .ok_or(VaultError::Undecryptable)?;
                decrypt_platform_v1_field(key, text).map_err(|_| VaultError::Undecryptable)?
            }
        };
        *value = Value::String(encrypt_field(
            current_key,
            current,
            service,
            name,
            &plaintext,
        ));
        changed = true;
    }
    if changed {
        obj.insert("v".into(), Value::from(DOCUMENT_VERSION));
        obj.insert("alg".into(), Value::from(DOCUMENT_ALG));
    }
    Ok(changed)
}

/// What one rewrap batch did.
#[derive(Debug, Clone, Default)]
pub struct RewrapBatch {
    /// Credentials looked at.
    pub examined: usize,
    /// Credentials re-encrypted.
    pub rewrapped: usize,
    /// Key of the last credential looked at (the cursor for the next batch), `None` at the end.
    pub last_key: Option<String>,
    /// Credentials that could not be opened (left as they are), by key.
    pub failed: Vec<String>,
}

/// Re-encrypts up to `limit` credentials after the cursor `after` as one short change (each
/// document written only if it is still the one read), so the server keeps writing between
/// batches. Returns the change (empty when nothing was rewrapped) and the batch's counts.
pub async fn rewrap_batch(
    storage: &dyn Storage,
    master: &MasterKey,
    after: Option<&str>,
    limit: usize,
) -> Result<(ChangeSet, RewrapBatch), VaultError> {
    let (ring, _, _) = keyring::load_current(storage, master).await?;
    let rows = storage
        .documents_after(Collection::Tokens, after.unwrap_or(""), limit)
        .await?;
    let mut batch = RewrapBatch::default();
    // A running server drops its cached copies of the rewritten documents.
    let mut change = ChangeSet::owner();
    for StoredDocument { key, doc: text } in rows {
        batch.examined += 1;
        batch.last_key = Some(key.clone());
        let Ok(mut doc) = serde_json::from_str::<Value>(&text) else {
            batch.failed.push(key);
            continue;
        };
        match rewrap_document(&mut doc, &key, &ring) {
            Ok(true) => {
                change = change
                    .check(Check::DocumentIs(Collection::Tokens, key.clone(), text))
                    .write(Write::RewriteDocument(
                        Collection::Tokens,
                        key,
                        doc.to_string(),
                    ));
                batch.rewrapped += 1;
            }
            Ok(false) => {}
            Err(_) => batch.failed.push(key),
        }
    }
    Ok((change, batch))
}

/// Data-key versions referenced by stored documents (any collection), each with up to five keys
/// (`collection/key`) that use it.
pub async fn versions_in_use(
    storage: &dyn Storage,
) -> Result<BTreeMap<u32, (usize, Vec<String>)>, VaultError> {
    let mut used: BTreeMap<u32, (usize, Vec<String>)> = BTreeMap::new();
    for found in storage.scan_documents("kh1:").await? {
        let (collection, key, text) = (found.collection.as_str(), found.key, found.doc);
        let Ok(doc) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        for version in document_key_versions(&doc) {
            let entry = used.entry(version).or_default();
            entry.0 += 1;
            if entry.1.len() < 5 {
                entry.1.push(format!("{collection}/{key}"));
            }
        }
    }
    Ok(used)
}

/// Credentials that the reference webhook's key still opens (a v1 field where it was imported),
/// with up to five of their keys. v1 fields anywhere else never open, so they do not count.
pub async fn platform_v1_in_use(
    storage: &dyn Storage,
    ring: &KeyRing,
) -> Result<(usize, Vec<String>), VaultError> {
    let (mut count, mut examples) = (0, Vec::new());
    for StoredDocument { key, doc: text } in storage.documents(Collection::Tokens).await? {
        let Ok(doc) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let Some(fields) = doc.get("fields").and_then(Value::as_object) else {
            continue;
        };
        let opens = fields.iter().any(|(name, value)| {
            value
                .as_str()
                .filter(|t| matches!(field_key_version(t), Ok(FieldFormat::PlatformV1)))
                .and_then(|t| platform_v1_field_digest(t).ok())
                .is_some_and(|digest| ring.platform_v1_key(&key, name, &digest).is_some())
        });
        if opens {
            count += 1;
            if examples.len() < 5 {
                examples.push(format!("tokens/{key}"));
            }
        }
    }
    Ok((count, examples))
}

/// Removes the reference webhook's key (platform v1) and the record of where its ciphertexts were
/// imported: refused while a stored credential still needs it (run `rewrap` first). Afterwards no
/// v1 ciphertext opens here, wherever it is written.
pub async fn retire_platform_v1_key(
    storage: &dyn Storage,
    master: &MasterKey,
) -> Result<ChangeSet, VaultError> {
    let (ring, _, _) = keyring::load_current(storage, master).await?;
    if !ring.has_platform_v1_key() {
        return Err(VaultError::Invalid(
            "there is no reference (platform-v1) key: nothing was imported with `keyholder import-reference`, \
             or it was retired already"
                .into(),
        ));
    }
    let (count, examples) = platform_v1_in_use(storage, &ring).await?;
    if count > 0 {
        return Err(VaultError::Invalid(format!(
            "the reference (platform-v1) key is still used by {count} document(s) (e.g. {}); run `keyholder rewrap` first",
            examples.join(", ")
        )));
    }
    Ok(ChangeSet::owner()
        .write(Write::DeleteKeysOfKind(KIND_LEGACY.into()))
        .write(Write::ClearImportedFields))
}

/// Removes data-key `version`: refused while it is current or any stored document references it.
pub async fn retire_data_key(storage: &dyn Storage, version: u32) -> Result<ChangeSet, VaultError> {
    let snapshot = storage.key_ring_snapshot().await?;
    let current: u32 = snapshot
        .setting(Setting::DataVersion)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| VaultError::Corrupt("data_version".into()))?;
    if version == current {
        return Err(VaultError::Invalid(format!(
            "data key v{version} is current; run `keyholder rotate-key` and `keyholder rewrap` first"
        )));
    }
    if snapshot.key(KIND_DATA, version).is_none() {
        return Err(VaultError::Invalid(format!(
            "there is no data key v{version}"
        )));
    }
    if let Some((count, examples)) = versions_in_use(storage).await?.remove(&version) {
        return Err(VaultError::Invalid(format!(
            "data key v{version} is still used by {count} document(s) (e.g. {}); run `keyholder rewrap` first",
            examples.join(", ")
        )));
    }
    Ok(ChangeSet::owner()
        .check(Check::SettingIs(
            Setting::DataVersion,
            Some(current.to_string()),
        ))
        .write(Write::DeleteKey(KIND_DATA.into(), version)))
}

/// The change that re-wraps every wrapped value (key ring, pending re-bind secrets, OAuth client
/// secrets) from `old` to `new`, records the new master check value and, for a passphrase, its
/// new salt; and how many values it moves.
pub async fn rotate_master_key(
    storage: &dyn Storage,
    old: &MasterKey,
    new: &MasterKey,
    new_kdf_salt: Option<&[u8]>,
) -> Result<(ChangeSet, usize), VaultError> {
    let snapshot = storage.key_ring_snapshot().await?;
    let old_check = old.check(snapshot.setting(Setting::MasterCheck))?;
    let mut change =
        ChangeSet::owner().check(Check::SettingIs(Setting::MasterCheck, Some(old_check)));
    let mut moved = 0;
    for key in &snapshot.keys {
        let plain = old.unwrap_key(&key.kind, key.version, &key.wrapped)?;
        change = change.write(Write::PutKey(WrappedKey {
            wrapped: new.wrap(&key.kind, key.version, &plain)?,
            ..key.clone()
        }));
        moved += 1;
    }
    for (hash, wrapped) in storage.pending_secrets().await? {
        let kind = super::binding::pending_kind(&hash);
        let plain = old.unwrap_key(&kind, 0, &wrapped)?;
        change = change.write(Write::PutPendingSecret(hash, new.wrap(&kind, 0, &plain)?));
        moved += 1;
    }
    for mut row in storage.oauth_clients().await? {
        let kind = super::oauth::wrap_kind(&row.name);
        let plain = old.unwrap_key(&kind, 1, &row.wrapped_secret)?;
        row.wrapped_secret = new.wrap(&kind, 1, &plain)?;
        change = change.write(Write::PutOAuthClient(row));
        moved += 1;
    }
    change = change.write(match new_kdf_salt {
        Some(salt) => Write::PutSetting(Setting::KdfSalt, hex::encode(salt)),
        None => Write::DeleteSetting(Setting::KdfSalt),
    });
    let (new_check, _) = new.check_or_record(None)?;
    change = change.write(Write::PutSetting(Setting::MasterCheck, new_check));
    Ok((change, moved))
}
