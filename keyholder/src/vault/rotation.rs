//! Key rotation on the data folder, run by the owner's CLI inside its own transactions: a new
//! data-key version, re-encrypting stored credentials under the current version in small batches,
//! retiring a version nothing uses, and re-wrapping the key ring under a new master key.

use std::collections::BTreeMap;

use keyholder_protocol::document::{
    decrypt_field, decrypt_platform_v1_field, document_key_versions, encrypt_field,
    field_key_version, platform_v1_field_digest, FieldFormat, KeyLookup, DOCUMENT_ALG,
    DOCUMENT_VERSION,
};
use keyholder_protocol::DataKey;
use rusqlite::{params, Connection};
use serde_json::Value;

use super::keyring::{self, KeyRing, KIND_DATA, KIND_LEGACY};
use super::master::MasterKey;
use super::reload::bump_generation;
use super::VaultError;
use crate::store::{get_setting, put_setting};

/// Adds a data-key version and makes it current for new writes. Returns the new version.
pub fn rotate_data_key(conn: &Connection, master: &MasterKey) -> Result<u32, VaultError> {
    let next: u32 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) + 1 FROM keyring WHERE kind = ?1",
        [KIND_DATA],
        |r| r.get(0),
    )?;
    let key = DataKey::generate();
    keyring::store_key(conn, master, KIND_DATA, next, key.expose())?;
    put_setting(conn, "data_version", &next.to_string())?;
    bump_generation(conn)?;
    Ok(next)
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

/// Re-encrypts up to `limit` credentials after the cursor `after`, inside the caller's (short)
/// transaction, so the server keeps writing between batches.
pub fn rewrap_batch(
    conn: &Connection,
    master: &MasterKey,
    after: Option<&str>,
    limit: usize,
) -> Result<RewrapBatch, VaultError> {
    let (ring, _, _) = keyring::load(conn, master)?;
    let mut stmt = conn.prepare(
        "SELECT key, doc FROM documents WHERE collection = 'tokens' AND key > ?1 ORDER BY key LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(
            params![
                after.unwrap_or(""),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let mut batch = RewrapBatch::default();
    for (key, text) in rows {
        batch.examined += 1;
        batch.last_key = Some(key.clone());
        let Ok(mut doc) = serde_json::from_str::<Value>(&text) else {
            batch.failed.push(key);
            continue;
        };
        match rewrap_document(&mut doc, &key, &ring) {
            Ok(true) => {
                conn.execute(
                    "UPDATE documents SET doc = ?1 WHERE collection = 'tokens' AND key = ?2",
                    params![doc.to_string(), key],
                )?;
                batch.rewrapped += 1;
            }
            Ok(false) => {}
            Err(_) => batch.failed.push(key),
        }
    }
    if batch.rewrapped > 0 {
        // A running server drops its cached copies of the rewritten documents.
        bump_generation(conn)?;
    }
    Ok(batch)
}

/// Data-key versions referenced by stored documents (any collection), each with up to five keys
/// (`collection/key`) that use it.
pub fn versions_in_use(
    conn: &Connection,
) -> Result<BTreeMap<u32, (usize, Vec<String>)>, VaultError> {
    let mut stmt =
        conn.prepare("SELECT collection, key, doc FROM documents WHERE doc LIKE '%kh1:%'")?;
    let mut rows = stmt.query([])?;
    let mut used: BTreeMap<u32, (usize, Vec<String>)> = BTreeMap::new();
    while let Some(row) = rows.next()? {
        let collection: String = row.get(0)?;
        let key: String = row.get(1)?;
        let text: String = row.get(2)?;
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
pub fn platform_v1_in_use(
    conn: &Connection,
    ring: &KeyRing,
) -> Result<(usize, Vec<String>), VaultError> {
    let mut stmt = conn.prepare("SELECT key, doc FROM documents WHERE collection = 'tokens'")?;
    let mut rows = stmt.query([])?;
    let (mut count, mut examples) = (0, Vec::new());
    while let Some(row) = rows.next()? {
        let key: String = row.get(0)?;
        let text: String = row.get(1)?;
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
pub fn retire_platform_v1_key(conn: &Connection, master: &MasterKey) -> Result<(), VaultError> {
    let (ring, _, _) = keyring::load(conn, master)?;
    if !ring.has_platform_v1_key() {
        return Err(VaultError::Invalid(
            "there is no reference (platform-v1) key: nothing was imported with `keyholder import-reference`, \
             or it was retired already"
                .into(),
        ));
    }
    let (count, examples) = platform_v1_in_use(conn, &ring)?;
    if count > 0 {
        return Err(VaultError::Invalid(format!(
            "the reference (platform-v1) key is still used by {count} document(s) (e.g. {}); run `keyholder rewrap` first",
            examples.join(", ")
        )));
    }
    conn.execute("DELETE FROM keyring WHERE kind = ?1", [KIND_LEGACY])?;
    super::imported_v1::clear(conn)?;
    bump_generation(conn)?;
    Ok(())
}

/// Removes data-key `version`: refused while it is current or any stored document references it.
pub fn retire_data_key(conn: &Connection, version: u32) -> Result<(), VaultError> {
    let current: u32 = get_setting(conn, "data_version")?
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| VaultError::Corrupt("data_version".into()))?;
    if version == current {
        return Err(VaultError::Invalid(format!(
            "data key v{version} is current; run `keyholder rotate-key` and `keyholder rewrap` first"
        )));
    }
    let exists: i64 = conn.query_row(
        "SELECT COUNT(*) FROM keyring WHERE kind = ?1 AND version = ?2",
        params![KIND_DATA, version],
        |r| r.get(0),
    )?;
    if exists == 0 {
        return Err(VaultError::Invalid(format!(
            "there is no data key v{version}"
        )));
    }
    if let Some((count, examples)) = versions_in_use(conn)?.remove(&version) {
        return Err(VaultError::Invalid(format!(
            "data key v{version} is still used by {count} document(s) (e.g. {}); run `keyholder rewrap` first",
            examples.join(", ")
        )));
    }
    conn.execute(
        "DELETE FROM keyring WHERE kind = ?1 AND version = ?2",
        params![KIND_DATA, version],
    )?;
    bump_generation(conn)?;
    Ok(())
}

/// Re-wraps every wrapped value (key ring and pending re-bind secrets) from `old` to `new`, records
/// the new master check value and, for a passphrase, its new salt. Returns how many values moved.
pub fn rotate_master_key(
    conn: &Connection,
    old: &MasterKey,
    new: &MasterKey,
    new_kdf_salt: Option<&[u8]>,
) -> Result<usize, VaultError> {
    old.check_or_record(conn)?;
    let mut moved = 0;
    let rows = conn
        .prepare("SELECT kind, version, wrapped FROM keyring")?
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (kind, version, wrapped) in rows {
        let plain = old.unwrap_key(&kind, version, &wrapped)?;
        let rewrapped = new.wrap(&kind, version, &plain)?;
        conn.execute(
            "UPDATE keyring SET wrapped = ?1 WHERE kind = ?2 AND version = ?3",
            params![rewrapped, kind, version],
        )?;
        moved += 1;
    }
    let pending = conn
        .prepare(
            "SELECT code_hash, pending_secret FROM bind_codes WHERE pending_secret IS NOT NULL",
        )?
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (hash, wrapped) in pending {
        let kind = super::binding::pending_kind(&hash);
        let plain = old.unwrap_key(&kind, 0, &wrapped)?;
        let rewrapped = new.wrap(&kind, 0, &plain)?;
        conn.execute(
            "UPDATE bind_codes SET pending_secret = ?1 WHERE code_hash = ?2",
            params![rewrapped, hash],
        )?;
        moved += 1;
    }
    let providers = conn
        .prepare("SELECT name, wrapped_secret FROM oauth_providers")?
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (name, wrapped) in providers {
        let kind = super::oauth::wrap_kind(&name);
        let plain = old.unwrap_key(&kind, 1, &wrapped)?;
        let rewrapped = new.wrap(&kind, 1, &plain)?;
        conn.execute(
            "UPDATE oauth_providers SET wrapped_secret = ?1 WHERE name = ?2",
            params![rewrapped, name],
        )?;
        moved += 1;
    }
    conn.execute("DELETE FROM settings WHERE name = 'master_check'", [])?;
    match new_kdf_salt {
        Some(salt) => put_setting(conn, "kdf_salt", &hex::encode(salt))?,
        None => {
            conn.execute("DELETE FROM settings WHERE name = 'kdf_salt'", [])?;
        }
    }
    new.check_or_record(conn)?;
    bump_generation(conn)?;
    Ok(moved)
}
