//! The key ring: versioned data-encryption keys, the Ed25519 identity key and the HMAC secret,
//! stored wrapped by the master key and unwrapped once at start (never per request).

use std::collections::BTreeMap;

use keyholder_protocol::document::KeyLookup;
use keyholder_protocol::{DataKey, HmacSecret, IdentityKey};
use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension};

use super::imported_v1::{self, ImportedV1Fields};
use super::master::MasterKey;
use super::VaultError;
use crate::store::{get_setting, put_setting};

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

/// Creates the keys on first start (inside the caller's transaction) and loads them all.
pub fn init_or_load(conn: &Connection, master: &MasterKey) -> Result<LoadedKeys, VaultError> {
    master.check_or_record(conn)?;
    let mut created = false;
    if get_setting(conn, "webhook_id")?.is_none() {
        created = true;
        let mut id = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut id);
        put_setting(conn, "webhook_id", &format!("wh_{}", hex::encode(id)))?;
        let hmac = HmacSecret::generate();
        store_key(conn, master, KIND_HMAC, 1, hmac.expose())?;
        put_setting(conn, "hmac_version", "1")?;
        put_setting(conn, "hmac_hash", &hmac.sha256_hex())?;
        let data = DataKey::generate();
        store_key(conn, master, KIND_DATA, 1, data.expose())?;
        put_setting(conn, "data_version", "1")?;
        let identity = IdentityKey::generate();
        store_key(conn, master, KIND_IDENTITY, 1, identity.to_bytes().as_ref())?;
        put_setting(conn, "bound", "false")?;
    }
    load(conn, master).map(|(ring, hmac, webhook_id)| LoadedKeys {
        ring,
        hmac,
        webhook_id,
        created,
    })
}

/// Loads the key ring and the current HMAC secret.
pub fn load(
    conn: &Connection,
    master: &MasterKey,
) -> Result<(KeyRing, HmacSecret, String), VaultError> {
    let webhook_id =
        get_setting(conn, "webhook_id")?.ok_or_else(|| VaultError::Corrupt("webhook_id".into()))?;
    let hmac_version = setting_u32(conn, "hmac_version")?;
    let hmac = HmacSecret::from_slice(&load_key(conn, master, KIND_HMAC, hmac_version)?)
        .map_err(|_| VaultError::Corrupt("hmac key length".into()))?;
    let current_data_version = setting_u32(conn, "data_version")?;
    let mut data_keys = BTreeMap::new();
    let mut stmt =
        conn.prepare("SELECT version, wrapped FROM keyring WHERE kind = ?1 ORDER BY version")?;
    let rows = stmt
        .query_map([KIND_DATA], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (version, wrapped) in rows {
        let plain = master.unwrap_key(KIND_DATA, version, &wrapped)?;
        let key = DataKey::from_slice(&plain)
            .map_err(|_| VaultError::Corrupt("data key length".into()))?;
        data_keys.insert(version, key);
    }
    if !data_keys.contains_key(&current_data_version) {
        return Err(VaultError::Corrupt("current data key missing".into()));
    }
    let identity_bytes = load_key(conn, master, KIND_IDENTITY, 1)?;
    let seed: [u8; 32] = identity_bytes
        .as_slice()
        .try_into()
        .map_err(|_| VaultError::Corrupt("identity key length".into()))?;
    let identity = IdentityKey::from_bytes(&seed);
    let legacy_v1 = match try_load_key(conn, master, KIND_LEGACY, 1)? {
        Some(bytes) => Some(
            DataKey::from_slice(&bytes)
                .map_err(|_| VaultError::Corrupt("legacy key length".into()))?,
        ),
        None => None,
    };
    let legacy_v1_fields = if legacy_v1.is_some() {
        imported_v1::load(conn)?
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

fn setting_u32(conn: &Connection, name: &str) -> Result<u32, VaultError> {
    get_setting(conn, name)?
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| VaultError::Corrupt(name.to_string()))
}

/// Wraps and inserts a key.
pub fn store_key(
    conn: &Connection,
    master: &MasterKey,
    kind: &str,
    version: u32,
    key: &[u8],
) -> Result<(), VaultError> {
    let wrapped = master.wrap(kind, version, key)?;
    conn.execute(
        "INSERT INTO keyring(kind, version, wrapped, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![kind, version, wrapped, now_unix()],
    )?;
    Ok(())
}

fn load_key(
    conn: &Connection,
    master: &MasterKey,
    kind: &str,
    version: u32,
) -> Result<zeroize::Zeroizing<Vec<u8>>, VaultError> {
    try_load_key(conn, master, kind, version)?
        .ok_or_else(|| VaultError::Corrupt(format!("{kind} key v{version} missing")))
}

fn try_load_key(
    conn: &Connection,
    master: &MasterKey,
    kind: &str,
    version: u32,
) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, VaultError> {
    let wrapped: Option<Vec<u8>> = conn
        .query_row(
            "SELECT wrapped FROM keyring WHERE kind = ?1 AND version = ?2",
            params![kind, version],
            |r| r.get(0),
        )
        .optional()?;
    match wrapped {
        Some(w) => Ok(Some(master.unwrap_key(kind, version, &w)?)),
        None => Ok(None),
    }
}

/// Replaces the current HMAC secret with `secret` (re-binding); the old one stops working.
pub fn install_hmac_secret(
    conn: &Connection,
    master: &MasterKey,
    secret: &HmacSecret,
) -> Result<(), VaultError> {
    let next: u32 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) + 1 FROM keyring WHERE kind = ?1",
        [KIND_HMAC],
        |r| r.get(0),
    )?;
    store_key(conn, master, KIND_HMAC, next, secret.expose())?;
    put_setting(conn, "hmac_version", &next.to_string())?;
    put_setting(conn, "hmac_hash", &secret.sha256_hex())?;
    Ok(())
}
