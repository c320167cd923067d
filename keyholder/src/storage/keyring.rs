//! The key ring as stored: keys wrapped by the master key, by kind and version, and where each
//! imported platform v1 ciphertext belongs.

use std::collections::HashMap;

use async_trait::async_trait;

use super::binding::StoredPlatformKey;
use super::{Setting, StorageResult};

/// A wrapped key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// Its kind (`data`, `identity`, `hmac`, `legacy_v1`).
    pub kind: String,
    /// Its version within the kind.
    pub version: u32,
    /// The key wrapped by the master key (its kind and version are the associated data).
    pub wrapped: Vec<u8>,
    /// Unix time it was made.
    pub created_at: i64,
}

/// Where one imported v1 ciphertext belongs: its SHA-256, service and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedField {
    /// SHA-256 of the ciphertext.
    pub digest: [u8; 32],
    /// The service it was imported as.
    pub service: String,
    /// The field it was imported as.
    pub field: String,
}

/// Everything the key ring, the binding and the seal are rebuilt from, read in one snapshot (at
/// start and whenever the owner generation moves).
#[derive(Debug, Clone, Default)]
pub struct KeyRingSnapshot {
    /// Every setting that is set.
    pub settings: HashMap<Setting, String>,
    /// Every wrapped key.
    pub keys: Vec<WrappedKey>,
    /// Where imported v1 ciphertexts belong.
    pub imported: Vec<ImportedField>,
    /// The platform's public keys, oldest first.
    pub platform_keys: Vec<StoredPlatformKey>,
}

impl KeyRingSnapshot {
    /// A setting's value.
    pub fn setting(&self, setting: Setting) -> Option<&str> {
        self.settings.get(&setting).map(String::as_str)
    }

    /// Whether the keyholder is bound, as of the snapshot (the typed reading of
    /// [`Setting::Bound`], like [`super::Settings::is_bound`]).
    pub fn is_bound(&self) -> bool {
        self.setting(Setting::Bound) == Some("true")
    }

    /// The highest version of a key kind (0 when none).
    pub fn latest_version(&self, kind: &str) -> u32 {
        self.keys
            .iter()
            .filter(|k| k.kind == kind)
            .map(|k| k.version)
            .max()
            .unwrap_or(0)
    }

    /// A wrapped key.
    pub fn key(&self, kind: &str, version: u32) -> Option<&WrappedKey> {
        self.keys
            .iter()
            .find(|k| k.kind == kind && k.version == version)
    }
}

/// The key-ring repository. Writes go through [`super::ChangeSet`] (every key change is an owner
/// change, applied with its audit entry and a generation bump).
#[async_trait]
pub trait KeyRingStore: Send + Sync {
    /// Settings, keys, imported fields and platform keys in one snapshot.
    async fn key_ring_snapshot(&self) -> StorageResult<KeyRingSnapshot>;

    /// Every wrapped key, by kind then version.
    async fn wrapped_keys(&self) -> StorageResult<Vec<WrappedKey>>;

    /// One wrapped key.
    async fn wrapped_key(&self, kind: &str, version: u32) -> StorageResult<Option<WrappedKey>>;

    /// The highest version of a kind (0 when none).
    async fn latest_key_version(&self, kind: &str) -> StorageResult<u32>;

    /// Every recorded imported v1 field.
    async fn imported_fields(&self) -> StorageResult<Vec<ImportedField>>;
}
