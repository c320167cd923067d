//! The platform's Ed25519 public keys of an asymmetric binding and the scheme in force (HMAC or
//! Ed25519). Only public keys are stored: nothing in the data folder can sign as the platform.
//! Every change bumps the owner generation, so a running server picks it up within a quarter second.

use keyholder_protocol::envelope::MAX_PLATFORM_KEYS;
use keyholder_protocol::PlatformPublicKey;

use super::VaultError;
use crate::storage::{
    ChangeSet, Check, KeyRingSnapshot, Setting, Storage, StoredPlatformKey, Write,
};

/// How the bound platform authenticates (one scheme per binding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformScheme {
    /// Token Vault's HMAC signatures and platform tickets (the default).
    Hmac,
    /// Ed25519 request envelopes and `kh2` tickets.
    Ed25519,
}

impl PlatformScheme {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            PlatformScheme::Hmac => "hmac",
            PlatformScheme::Ed25519 => "ed25519",
        }
    }
}

/// An active platform key, as `keyholder platform-key list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlatformKeyInfo {
    /// Key id (16 hex).
    pub key_id: String,
    /// Standard base64 of the public key.
    pub public_key: String,
    /// Unix time it was added.
    pub added_at: i64,
}

/// The scheme in force.
pub fn read_scheme(snapshot: &KeyRingSnapshot) -> PlatformScheme {
    match snapshot.setting(Setting::PlatformScheme) {
        Some("ed25519") => PlatformScheme::Ed25519,
        _ => PlatformScheme::Hmac,
    }
}

/// The scheme and the active platform keys (oldest first).
pub fn load(
    snapshot: &KeyRingSnapshot,
) -> Result<(PlatformScheme, Vec<PlatformPublicKey>), VaultError> {
    let keys = list(&snapshot.platform_keys)?
        .into_iter()
        .map(|(info, key)| {
            if key.key_id() != info.key_id {
                return Err(VaultError::Corrupt("platform key id".into()));
            }
            Ok(key)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((read_scheme(snapshot), keys))
}

fn list(
    stored: &[StoredPlatformKey],
) -> Result<Vec<(PlatformKeyInfo, PlatformPublicKey)>, VaultError> {
    stored
        .iter()
        .map(|row| {
            let key = PlatformPublicKey::parse(&row.public_key)
                .map_err(|_| VaultError::Corrupt("platform key".into()))?;
            Ok((
                PlatformKeyInfo {
                    key_id: row.key_id.clone(),
                    public_key: key.to_base64(),
                    added_at: row.added_at,
                },
                key,
            ))
        })
        .collect()
}

/// `keyholder platform-key list`.
pub async fn list_keys(storage: &dyn Storage) -> Result<Vec<PlatformKeyInfo>, VaultError> {
    Ok(list(&storage.platform_keys().await?)?
        .into_iter()
        .map(|(info, _)| info)
        .collect())
}

/// The stored form of a platform key.
pub fn stored(key: &PlatformPublicKey, now: i64) -> StoredPlatformKey {
    StoredPlatformKey {
        key_id: key.key_id().to_owned(),
        public_key: key.as_bytes().to_vec(),
        added_at: now,
    }
}

fn require_asymmetric(snapshot: &KeyRingSnapshot) -> Result<(), VaultError> {
    let bound = snapshot.is_bound();
    if !bound || read_scheme(snapshot) != PlatformScheme::Ed25519 {
        return Err(VaultError::Invalid(
            "this keyholder is not bound asymmetrically; bind first with `keyholder bind --platform-key FILE`"
                .into(),
        ));
    }
    Ok(())
}

/// The checks that keep a platform-key change valid until it is applied: the binding and the set
/// of active keys as read.
fn unchanged(snapshot: &KeyRingSnapshot) -> ChangeSet {
    ChangeSet::owner()
        .check(Check::SettingIs(Setting::Bound, Some("true".into())))
        .check(Check::SettingIs(
            Setting::PlatformScheme,
            Some(PlatformScheme::Ed25519.as_str().into()),
        ))
        .check(Check::PlatformKeysAre(
            snapshot
                .platform_keys
                .iter()
                .map(|k| k.key_id.clone())
                .collect(),
        ))
}

/// `keyholder platform-key add`: a second active key (rotation). Refused unless the binding is
/// asymmetric, when the key is already active, or when two keys are active already. Returns the
/// owner change to apply (it bumps the generation).
pub fn add_key(
    snapshot: &KeyRingSnapshot,
    key: &PlatformPublicKey,
    now: i64,
) -> Result<ChangeSet, VaultError> {
    require_asymmetric(snapshot)?;
    let active = list(&snapshot.platform_keys)?;
    if active.iter().any(|(info, _)| info.key_id == key.key_id()) {
        return Err(VaultError::Invalid(format!(
            "platform key {} is already active",
            key.key_id()
        )));
    }
    if active.len() >= MAX_PLATFORM_KEYS {
        return Err(VaultError::Invalid(format!(
            "{MAX_PLATFORM_KEYS} platform keys are active already; remove one first"
        )));
    }
    Ok(unchanged(snapshot).write(Write::AddPlatformKey(stored(key, now))))
}

/// `keyholder platform-key remove`: the key stops verifying at once. The last key cannot be removed
/// (that would lock the platform out; re-bind instead).
pub fn remove_key(snapshot: &KeyRingSnapshot, key_id: &str) -> Result<ChangeSet, VaultError> {
    require_asymmetric(snapshot)?;
    let active = list(&snapshot.platform_keys)?;
    if !active.iter().any(|(info, _)| info.key_id == key_id) {
        return Err(VaultError::Invalid(format!(
            "no active platform key {key_id}"
        )));
    }
    if active.len() <= 1 {
        return Err(VaultError::Invalid(
            "this is the only platform key; add its successor first (or re-bind)".into(),
        ));
    }
    Ok(unchanged(snapshot).write(Write::RemovePlatformKey(key_id.to_string())))
}
