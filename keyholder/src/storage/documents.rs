//! The platform's documents (`tokens`, `audit`, ... collections) as stored JSON text. The domain's
//! cache sits in front of this (see `vault::documents`); nothing here caches.

use async_trait::async_trait;
use keyholder_protocol::wire::Collection;

use super::StorageResult;

/// One stored document: its key and JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDocument {
    /// The document key (for `tokens`: the service).
    pub key: String,
    /// The document as stored (JSON text).
    pub doc: String,
}

/// A document with its collection (scans over every collection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedDocument {
    /// The collection.
    pub collection: Collection,
    /// The key.
    pub key: String,
    /// The JSON text.
    pub doc: String,
}

/// What [`Documents::store_credential`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialWrite {
    /// Written (and the service's legacy-minting mark cleared).
    Stored,
    /// The data key version current in storage is not the one the document was sealed under.
    KeyRingChanged,
    /// `create_only` and a credential is already stored.
    AlreadyExists,
}

/// A sealed credential to write with [`Documents::store_credential`].
#[derive(Debug, Clone)]
pub struct CredentialDocument {
    /// The service (key in `tokens`).
    pub service: String,
    /// The sealed document (JSON text).
    pub doc: String,
    /// The data key version it was sealed under; the write is refused unless it is current.
    pub data_version: u32,
    /// Refuse when a credential is already stored.
    pub create_only: bool,
    /// Unix time of the write.
    pub now: i64,
}

/// A compare-and-swap of one document.
#[derive(Debug, Clone)]
pub struct DocumentSwap {
    /// Collection.
    pub collection: Collection,
    /// Key.
    pub key: String,
    /// The text the document must still hold.
    pub expected: String,
    /// Its replacement.
    pub doc: String,
    /// Unix time of the write.
    pub now: i64,
    /// The data key version `doc` was sealed under, if it must still be current.
    pub data_version: Option<u32>,
}

/// What [`Documents::swap_document`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapOutcome {
    /// Replaced.
    Swapped,
    /// The document no longer reads `expected` (or is gone): nothing written.
    Changed,
    /// The data key version moved: nothing written.
    KeyRingChanged,
}

/// The documents repository.
#[async_trait]
pub trait Documents: Send + Sync {
    /// The document under `key`, if any.
    async fn document(&self, collection: Collection, key: &str) -> StorageResult<Option<String>>;

    /// Every document of a collection, in key order.
    async fn documents(&self, collection: Collection) -> StorageResult<Vec<StoredDocument>>;

    /// Up to `limit` documents of a collection with keys after `after`, in key order (batched
    /// scans: rewrap, migrations).
    async fn documents_after(
        &self,
        collection: Collection,
        after: &str,
        limit: usize,
    ) -> StorageResult<Vec<StoredDocument>>;

    /// Every document of every collection whose text contains `needle` (all when empty).
    async fn scan_documents(&self, needle: &str) -> StorageResult<Vec<ScannedDocument>>;

    /// Number of documents in a collection.
    async fn count_documents(&self, collection: Option<Collection>) -> StorageResult<u64>;

    /// Upserts a document; durable on return.
    async fn put_document(
        &self,
        collection: Collection,
        key: &str,
        doc: &str,
        now: i64,
    ) -> StorageResult<()>;

    /// Deletes a document (a missing one is not an error); durable on return.
    async fn delete_document(&self, collection: Collection, key: &str) -> StorageResult<()>;

    /// Replaces a document only if it still reads `expected` (compare and swap) and, when
    /// `data_version` is given, that data key version is still current.
    async fn swap_document(&self, swap: DocumentSwap) -> StorageResult<SwapOutcome>;

    /// Writes a sealed credential in one transaction: checks the data key version and (with
    /// `create_only`) absence, upserts, clears the service's legacy-minting mark.
    async fn store_credential(&self, write: CredentialDocument) -> StorageResult<CredentialWrite>;

    /// Whether a GitHub App credential of `service` predates sealed minting inputs.
    async fn is_legacy_minting(&self, service: &str) -> StorageResult<bool>;

    /// Documents changed by other processes sharing the storage (PostgreSQL NOTIFY), so the
    /// domain's cache can forget them; `None` when no other process writes documents (SQLite:
    /// the owner CLI's changes bump the owner generation, which clears the cache).
    fn watch_documents(&self) -> Option<tokio::sync::broadcast::Receiver<DocumentChange>> {
        None
    }
}

/// A document changed elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocumentChange {
    /// This one.
    One(Collection, String),
    /// Possibly any (the notification channel was lost and reconnected).
    All,
}
