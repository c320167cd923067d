//! Moving in from the public reference webhook (PROTOCOL.md §6): its key file and collections file
//! are read, its credentials decrypted with its key and re-encrypted under our current data key, its
//! four collections kept, and its HMAC secret, webhook id and bound state adopted, so the same
//! platform keeps working without a re-bind. One transaction: all or nothing.

use keyholder_protocol::document::KeySet;
use keyholder_protocol::wire::Collection;
use keyholder_protocol::{DataKey, HmacSecret};
use serde::Serialize;
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::collections::validate_key;
use super::imported_v1;
use super::keyring::{self, install_hmac_secret, KIND_HMAC, KIND_LEGACY};
use super::master::MasterKey;
use super::rotation::rewrap_document;
use super::VaultError;
use crate::storage::{ChangeSet, Check, ImportedField, Setting, Storage, Write};

/// The reference webhook's key material (its key file), held only for the import.
pub struct ReferenceKeys {
    /// Its webhook id.
    pub webhook_id: String,
    /// Its AES-256-GCM key of the platform v1 documents.
    pub encryption_key: DataKey,
    /// Its HMAC secret shared with the platform.
    pub hmac_secret: HmacSecret,
    /// Whether it was bound (`is_configured`).
    pub configured: bool,
}

/// What the import did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportReport {
    /// Webhook id adopted.
    pub webhook_id: String,
    /// Whether the keyholder is now bound (the reference was configured).
    pub bound: bool,
    /// Credentials decrypted and re-encrypted under our key.
    pub tokens_reencrypted: usize,
    /// Plaintext token documents kept as given.
    pub tokens_plaintext: usize,
    /// Documents kept per other collection.
    pub proxy_configs: usize,
    /// `audit` collection documents kept.
    pub audit: usize,
    /// `vault_config` documents kept.
    pub vault_config: usize,
    /// Documents replaced because the keyholder already held one under the same key (`--force`).
    pub replaced: usize,
    /// Token documents whose `totpUri` link was sealed (seed as `totpSecret`, link removed).
    pub totp_links_sealed: usize,
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, VaultError> {
    obj.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| VaultError::Invalid(format!("the key file has no string '{name}'")))
}

/// Parses the reference's key file; checks `hmac_secret_hash` against the secret when present.
pub fn parse_reference_keys(text: &str) -> Result<ReferenceKeys, VaultError> {
    let value: Zeroizing<String> = Zeroizing::new(text.to_string());
    let parsed: Value = serde_json::from_str(&value)
        .map_err(|e| VaultError::Invalid(format!("the key file is not JSON: {e}")))?;
    let obj = parsed
        .as_object()
        .ok_or_else(|| VaultError::Invalid("the key file is not a JSON object".into()))?;
    let webhook_id = field(obj, "webhook_id")?.to_string();
    validate_key(&webhook_id)
        .map_err(|_| VaultError::Invalid("the key file's webhook_id is not usable".into()))?;
    let encryption_key = DataKey::from_base64(field(obj, "encryption_key")?).map_err(|_| {
        VaultError::Invalid("encryption_key must be 32 bytes of standard base64".into())
    })?;
    let hmac_secret = HmacSecret::from_base64(field(obj, "hmac_secret")?).map_err(|_| {
        VaultError::Invalid("hmac_secret must be 32 bytes of standard base64".into())
    })?;
    if let Some(hash) = obj.get("hmac_secret_hash").and_then(Value::as_str) {
        let ours = hmac_secret.sha256_hex();
        if !bool::from(ours.as_bytes().ct_eq(hash.to_ascii_lowercase().as_bytes())) {
            return Err(VaultError::Invalid(
                "hmac_secret_hash does not match hmac_secret: the key file is damaged".into(),
            ));
        }
    }
    let configured = obj
        .get("is_configured")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(ReferenceKeys {
        webhook_id,
        encryption_key,
        hmac_secret,
        configured,
    })
}

/// True when a JSON file looks like the reference's key file (rather than its collections file).
pub fn looks_like_key_file(value: &Value) -> bool {
    value.get("encryption_key").is_some() || value.get("hmac_secret").is_some()
}

/// Prepares the import as one owner change (applied by the caller with its audit entry). Refuses
/// when the keyholder already holds documents or is bound, unless `force` (then documents under the
/// same key are replaced, others kept).
pub async fn import_reference(
    storage: &dyn Storage,
    master: &MasterKey,
    keys: &ReferenceKeys,
    collections: &Value,
    force: bool,
) -> Result<(ChangeSet, ImportReport), VaultError> {
    let obj = collections
        .as_object()
        .ok_or_else(|| VaultError::Invalid("the collections file is not a JSON object".into()))?;
    for name in obj.keys() {
        if Collection::parse(name).is_none() {
            return Err(VaultError::Invalid(format!(
                "the collections file has an unknown collection '{name}'"
            )));
        }
    }
    let mut snapshot = storage.key_ring_snapshot().await?;
    master.check(snapshot.setting(Setting::MasterCheck))?;
    let existing = storage.count_documents(None).await?;
    let bound = snapshot.is_bound();
    if (existing > 0 || bound) && !force {
        return Err(VaultError::Invalid(format!(
            "this keyholder already holds {existing} document(s){}; import only into a new one, or pass --force \
             to merge (documents under the same key are replaced) and take over the reference's binding",
            if bound { " and is bound" } else { "" }
        )));
    }

    // Keep the reference's key as the platform-v1 key, so v1 documents the platform may still
    // write back to where they were stay readable (and `keyholder rewrap` converts them), until
    // the owner retires it (`keyholder retire-key platform-v1`).
    let legacy = keyring::wrap_key(master, KIND_LEGACY, 1, keys.encryption_key.expose())?;
    let mut change = ChangeSet::owner()
        .check(Check::SettingIs(
            Setting::MasterCheck,
            snapshot.setting(Setting::MasterCheck).map(str::to_string),
        ))
        .write(Write::DeleteKeysOfKind(KIND_LEGACY.into()))
        .write(Write::PutKey(legacy.clone()));
    // v1 ciphertexts carry no associated data: remember where each one is imported, and the key
    // opens it only there (`vault::imported_v1`). Places recorded for an earlier reference key
    // mean nothing under this one.
    // With a fresh random IV per field, one ciphertext in two places means one is a copy (the
    // platform can write the reference's documents too): the owner decides which one is real.
    change = change.write(Write::ClearImportedFields);
    let mut imported = Vec::new();
    let mut seen: std::collections::HashMap<[u8; 32], String> = std::collections::HashMap::new();
    if let Some(tokens) = obj
        .get(Collection::Tokens.as_str())
        .and_then(Value::as_object)
    {
        for (key, doc) in tokens {
            for (field, digest) in imported_v1::v1_fields(doc) {
                let place = format!("tokens/{key} {field}");
                if let Some(first) = seen.insert(digest, place.clone()) {
                    return Err(VaultError::Invalid(format!(
                        "{first} and {place} hold the same ciphertext, so one of them is a copy; remove \
                         the one that does not belong from the collections file and import again"
                    )));
                }
                imported.push(ImportedField {
                    digest,
                    service: key.clone(),
                    field,
                });
            }
        }
    }
    // The ring as it will be once the change is applied: with the reference's key, opening its
    // ciphertexts where they are imported.
    snapshot.keys.retain(|k| k.kind != KIND_LEGACY);
    snapshot.keys.push(legacy);
    snapshot.imported = imported.clone();
    let (ring, _, _) = keyring::load(&snapshot, master)?;
    for field in imported {
        change = change.write(Write::RecordImportedField(field));
    }
    // A ring that also holds exactly the reference's key, for opening its documents.
    let reference = KeySet {
        platform_v1: Some(DataKey::from_bytes(*keys.encryption_key.expose())),
        ..KeySet::default()
    };

    let mut report = ImportReport::default();
    let now = crate::clock::now_unix();
    for collection in Collection::ALL {
        let Some(docs) = obj.get(collection.as_str()) else {
            continue;
        };
        let docs = docs.as_object().ok_or_else(|| {
            VaultError::Invalid(format!(
                "collection '{}' is not an object",
                collection.as_str()
            ))
        })?;
        let stored: std::collections::HashSet<String> = storage
            .documents(*collection)
            .await?
            .into_iter()
            .map(|d| d.key)
            .collect();
        for (key, doc) in docs {
            validate_key(key).map_err(|_| {
                VaultError::Invalid(format!(
                    "collection '{}' has an unusable key",
                    collection.as_str()
                ))
            })?;
            if !doc.is_object() {
                return Err(VaultError::Invalid(format!(
                    "{}/{key} is not a JSON object",
                    collection.as_str()
                )));
            }
            let mut doc = doc.clone();
            match collection {
                Collection::Tokens if doc.get("fields").is_some() => {
                    // Check first that the reference's key opens it (a clear error names the document).
                    keyholder_protocol::document::open_document(&doc, key, &reference).map_err(
                        |_| {
                            VaultError::Invalid(format!(
                            "tokens/{key} cannot be decrypted with the key file's encryption_key"
                        ))
                        },
                    )?;
                    rewrap_document(&mut doc, key, &ring)?;
                    report.tokens_reencrypted += 1;
                }
                Collection::Tokens => report.tokens_plaintext += 1,
                Collection::ProxyConfigs => report.proxy_configs += 1,
                Collection::Audit => report.audit += 1,
                Collection::VaultConfig => report.vault_config += 1,
            }
            // Protocol 2.4.0: a totpUri link is never kept, so it is sealed on the way in.
            if collection == &Collection::Tokens && super::totp_links::holds_totp_link(&doc) {
                doc = super::totp_links::seal_totp_link(&doc, key, &ring, now).map_err(|e| {
                    VaultError::Invalid(format!(
                        "tokens/{key} holds a totpUri that cannot be sealed ({e}); fix or remove it in the collections file"
                    ))
                })?;
                report.totp_links_sealed += 1;
            }
            if stored.contains(key) {
                report.replaced += 1;
                change = change.write(Write::DeleteDocument(*collection, key.clone()));
            }
            change = change.write(Write::PutDocument {
                collection: *collection,
                key: key.clone(),
                doc: doc.to_string(),
                now,
            });
            if *collection == Collection::Tokens {
                if let Some(mark) = super::sealed::mark_if_legacy_minting(key, &doc) {
                    change = change.write(mark);
                }
            }
        }
    }

    let latest = snapshot.latest_version(KIND_HMAC);
    let (unchanged, install) = install_hmac_secret(master, &keys.hmac_secret, latest)?;
    change = change.check(unchanged);
    change.writes.extend(install);
    change = change
        .write(Write::DeleteKeysBelow(KIND_HMAC.into(), latest + 1))
        // Outstanding bind codes belong to the replaced secret.
        .write(Write::DeleteBindCodes)
        .write(Write::PutSetting(
            Setting::WebhookId,
            keys.webhook_id.clone(),
        ))
        .write(Write::PutSetting(
            Setting::Bound,
            if keys.configured { "true" } else { "false" }.into(),
        ));
    if keys.configured {
        change = change.write(Write::PutSetting(Setting::BoundAt, now.to_string()));
    }
    report.webhook_id = keys.webhook_id.clone();
    report.bound = keys.configured;
    Ok((change, report))
}
