//! The key ring: versioned data-encryption keys, the Ed25519 identity key and the HMAC secret,
//! stored wrapped by the master key and unwrapped once at start (never per request).

use std::collections::BTreeMap;

use keyholder_protocol::document::KeyLookup;
use keyholder_protocol::{DataKey, HmacSecret, IdentityKey};
use rand::RngCore;

use super::imported_v1::ImportedV1Fields;
use super::master::MasterKey;
use super::VaultError;
use crate::storage::{
    Applied, ChangeSet, Check, KeyRingSnapshot, Setting, Storage, WrappedKey, Write,
};

/// Key kinds as stored in the `keyring` table.
pub const KIND_DATA: &str = "data";
/// The Ed25519 identity key's kind.
pub const KIND_IDENTITY: &str = "identity";
/// The platform HMAC secret's kind.
pub const KIND_HMAC: &str = "hmac";
/// A data key imported from the reference webhook (platform v1 ciphertexts, no associated data).
pub const KIND_LEGACY: &str = "legacy_v1";

/// Unwrapped data keys and the identity key, shared read-only by request handlers.
pub struct KeyRing {
    data_keys: BTreeMap<u32, DataKey>,
    current_data_version: u32,
    legacy_v1: Option<DataKey>,
    /// Where each imported v1 ciphertext belongs: the legacy key opens it only there.
    legacy_v1_fields: ImportedV1Fields,
    identity: IdentityKey,
}

impl KeyRing {
    /// The version new ciphertexts are written under.
    pub fn current_data_version(&self) -> u32 {
        self.current_data_version
    }

    /// The key new ciphertexts are written under.
    pub fn current_data_key(&self) -> Result<&DataKey, VaultError> {
        self.data_keys
            .get(&self.current_data_version)
            .ok_or_else(|| VaultError::Corrupt("current data key missing".into()))
    }

    /// All data-key versions present.
    pub fn data_versions(&self) -> Vec<u32> {
        self.data_keys.keys().copied().collect()
    }

    /// The identity key that signs responses and audit entries.
    pub fn identity(&self) -> &IdentityKey {
        &self.identity
    }

    /// Whether the reference webhook's key (platform v1 ciphertexts) is held.
    pub fn has_platform_v1_key(&self) -> bool {
        self.legacy_v1.is_some()
    }
}

impl crate::storage::AuditSigner for KeyRing {
    fn sign_audit(&self, bytes: &[u8]) -> [u8; 64] {
        self.identity.sign(bytes)
    }
}

impl KeyLookup for KeyRing {
    fn data_key(&self, version: u32) -> Option<&DataKey> {
        self.data_keys.get(&version)
    }

    /// Only for a ciphertext imported as this very service and field (see `vault::imported_v1`).
    fn platform_v1_key(&self, service: &str, field: &str, digest: &[u8; 32]) -> Option<&DataKey> {
        self.legacy_v1
            .as_ref()
            .filter(|_| self.legacy_v1_fields.allows(service, field, digest))
    }
}

/// What [`init_or_load`] found or made.
pub struct LoadedKeys {
    /// Data and identity keys.
    pub ring: KeyRing,
    /// The current HMAC secret.
    pub hmac: HmacSecret,
    /// This keyholder's webhook id.
    pub webhook_id: String,
    /// True when this call created the keys (first start).
    pub created: bool,
}

fn now_unix() -> i64 {
    crate::clock::now_unix()
}

/// The change that makes a new data folder's keys (only if it still has none).
fn first_keys(master: &MasterKey) -> Result<ChangeSet, VaultError> {
    let mut id = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut id);
    let hmac = HmacSecret::generate();
    let data = DataKey::generate();
    let identity = IdentityKey::generate();
    Ok(ChangeSet::default()
        .check(Check::SettingIs(Setting::WebhookId, None))
        .write(Write::PutSetting(
            Setting::WebhookId,
            format!("wh_{}", hex::encode(id)),
        ))
        .write(Write::PutKey(wrap_key(
            master,
            KIND_HMAC,
            1,
            hmac.expose(),
        )?))
        .write(Write::PutSetting(Setting::HmacVersion, "1".into()))
        .write(Write::PutSetting(Setting::HmacHash, hmac.sha256_hex()))
        .write(Write::PutKey(wrap_key(
            master,
            KIND_DATA,
            1,
            data.expose(),
        )?))
        .write(Write::PutSetting(Setting::DataVersion, "1".into()))
        .write(Write::PutKey(wrap_key(
            master,
            KIND_IDENTITY,
            1,
            identity.to_bytes().as_ref(),
        )?))
        .write(Write::PutSetting(Setting::Bound, "false".into())))
}

/// Records the master key check and creates the keys on first start; loads them all.
pub async fn init_or_load(
    storage: &dyn Storage,
    master: &MasterKey,
) -> Result<LoadedKeys, VaultError> {
    let mut snapshot = storage.key_ring_snapshot().await?;
    let (_, record) = master.check_or_record(snapshot.setting(Setting::MasterCheck))?;
    let mut created = false;
    let mut changes = record.unwrap_or_default();
    if snapshot.setting(Setting::WebhookId).is_none() {
        let keys = first_keys(master)?;
        changes.checks.extend(keys.checks);
        changes.writes.extend(keys.writes);
        created = true;
    }
    if !changes.writes.is_empty() {
        if let Applied::CheckFailed(_) = storage.apply(changes).await? {
            // Another process made them first: use theirs (checked below like any).
            created = false;
        }
        snapshot = storage.key_ring_snapshot().await?;
        master.check(snapshot.setting(Setting::MasterCheck))?;
    }
    load(&snapshot, master).map(|(ring, hmac, webhook_id)| LoadedKeys {
        ring,
        hmac,
        webhook_id,
        created,
    })
}

/// Unwraps the key ring and the current HMAC secret from a snapshot.
pub fn load(
    snapshot: &KeyRingSnapshot,
    master: &MasterKey,
) -> Result<(KeyRing, HmacSecret, String), VaultError> {
    let webhook_id = snapshot
        .setting(Setting::WebhookId)
        .ok_or_else(|| VaultError::Corrupt("webhook_id".into()))?
        .to_string();
    let hmac_version = setting_u32(snapshot, Setting::HmacVersion)?;
    let hmac = HmacSecret::from_slice(&load_key(snapshot, master, KIND_HMAC, hmac_version)?)
        .map_err(|_| VaultError::Corrupt("hmac key length".into()))?;
    let current_data_version = setting_u32(snapshot, Setting::DataVersion)?;
    let mut data_keys = BTreeMap::new();
    for key in snapshot.keys.iter().filter(|k| k.kind == KIND_DATA) {
        let plain = master.unwrap_key(KIND_DATA, key.version, &key.wrapped)?;
        let data = DataKey::from_slice(&plain)
            .map_err(|_| VaultError::Corrupt("data key length".into()))?;
        data_keys.insert(key.version, data);
    }
    if !data_keys.contains_key(&current_data_version) {
        return Err(VaultError::Corrupt("current data key missing".into()));
    }
    let identity_bytes = load_key(snapshot, master, KIND_IDENTITY, 1)?;
    let seed: [u8; 32] = identity_bytes
        .as_slice()
        .try_into()
        .map_err(|_| VaultError::Corrupt("identity key length".into()))?;
    let identity = IdentityKey::from_bytes(&seed);
    let legacy_v1 = match try_load_key(snapshot, master, KIND_LEGACY, 1)? {
        Some(bytes) => Some(
            DataKey::from_slice(&bytes)
                .map_err(|_| VaultError::Corrupt("legacy key length".into()))?,
        ),
        None => None,
    };
    let legacy_v1_fields = if legacy_v1.is_some() {
        ImportedV1Fields::from_fields(&snapshot.imported)
    } else {
        ImportedV1Fields::default()
    };
    Ok((
        KeyRing {
            data_keys,
            current_data_version,
            legacy_v1,
            legacy_v1_fields,
            identity,
        },
        hmac,
        webhook_id,
    ))
}

/// Reads a snapshot and unwraps the key ring from it (owner commands).
pub async fn load_current(
    storage: &dyn Storage,
    master: &MasterKey,
) -> Result<(KeyRing, HmacSecret, String), VaultError> {
    let snapshot = storage.key_ring_snapshot().await?;
    master.check(snapshot.setting(Setting::MasterCheck))?;
    load(&snapshot, master)
}

fn setting_u32(snapshot: &KeyRingSnapshot, setting: Setting) -> Result<u32, VaultError> {
    snapshot
        .setting(setting)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| VaultError::Corrupt(setting.name().to_string()))
}

/// Wraps a key as `kind` version `version`.
pub fn wrap_key(
    master: &MasterKey,
    kind: &str,
    version: u32,
    key: &[u8],
) -> Result<WrappedKey, VaultError> {
    Ok(WrappedKey {
        kind: kind.to_string(),
        version,
        wrapped: master.wrap(kind, version, key)?,
        created_at: now_unix(),
    })
}

fn load_key(
    snapshot: &KeyRingSnapshot,
    master: &MasterKey,
    kind: &str,
    version: u32,
) -> Result<zeroize::Zeroizing<Vec<u8>>, VaultError> {
    try_load_key(snapshot, master, kind, version)?
        .ok_or_else(|| VaultError::Corrupt(format!("{kind} key v{version} missing")))
}

fn try_load_key(
    snapshot: &KeyRingSnapshot,
    master: &MasterKey,
    kind: &str,
    version: u32,
) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, VaultError> {
    match snapshot.key(kind, version) {
        Some(w) => Ok(Some(master.unwrap_key(kind, version, &w.wrapped)?)),
        None => Ok(None),
    }
}

/// The writes that make `secret` the current HMAC secret (re-binding, import) when the latest
/// stored version is `latest`; the old one stops working.
pub fn install_hmac_secret(
    master: &MasterKey,
    secret: &HmacSecret,
    latest: u32,
) -> Result<(Check, Vec<Write>), VaultError> {
    let next = latest + 1;
    Ok((
        Check::LatestKeyVersion(KIND_HMAC.into(), latest),
        vec![
            Write::PutKey(wrap_key(master, KIND_HMAC, next, secret.expose())?),
            Write::PutSetting(Setting::HmacVersion, next.to_string()),
            Write::PutSetting(Setting::HmacHash, secret.sha256_hex()),
        ],
    ))
}
