//! The key ring as stored: keys wrapped by the master key, by kind and version, and where each
//! imported platform v1 ciphertext belongs.

use async_trait::async_trait;

use super::StorageResult;

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

/// The key-ring repository. Writes go through [`super::ChangeSet`] (every key change is an owner
/// change, applied with its audit entry and a generation bump).
#[async_trait]
pub trait KeyRingStore: Send + Sync {
    /// Every wrapped key, by kind then version.
    async fn wrapped_keys(&self) -> StorageResult<Vec<WrappedKey>>;

    /// One wrapped key.
    async fn wrapped_key(&self, kind: &str, version: u32) -> StorageResult<Option<WrappedKey>>;

    /// The highest version of a kind (0 when none).
    async fn latest_key_version(&self, kind: &str) -> StorageResult<u32>;

    /// Every recorded imported v1 field.
    async fn imported_fields(&self) -> StorageResult<Vec<ImportedField>>;
}
