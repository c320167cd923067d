//! The documents repository with its cache in front: every read of a document or a collection
//! list goes through here, and so does every write, which is where the cache is invalidated (the
//! one place). Changes other processes make arrive as owner-generation bumps (`reload` calls
//! [`CachedDocuments::forget_all`]) or, on engines that notify, as document changes.

use std::sync::Arc;

use keyholder_protocol::wire::Collection;
use serde_json::Value;

use super::doc_cache::{CachedList, DocumentCache};
use super::VaultError;
use crate::storage::{
    CredentialDocument, CredentialWrite, DocumentChange, DocumentSwap, SharedStorage,
    StoredDocument, SwapOutcome,
};

/// Documents through their cache.
pub struct CachedDocuments {
    storage: SharedStorage,
    cache: Arc<DocumentCache>,
}

impl CachedDocuments {
    /// The cache over `storage`; follows the engine's change notifications if it has them.
    pub fn new(storage: SharedStorage) -> CachedDocuments {
        let cache = Arc::new(DocumentCache::default());
        if let Some(mut changes) = storage.watch_documents() {
            let cache = Arc::downgrade(&cache);
            tokio::spawn(async move {
                loop {
                    let change = changes.recv().await;
                    let Some(cache) = cache.upgrade() else { break };
                    match change {
                        Ok(DocumentChange::One(collection, key)) => {
                            cache.invalidate(collection, &key)
                        }
                        // Missed notifications or a reconnect: anything may have changed.
                        Ok(DocumentChange::All)
                        | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => cache.clear(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
            });
        }
        CachedDocuments { storage, cache }
    }

    /// A cached document: `Some(None)` when known absent, `None` when not cached.
    pub fn cached(&self, collection: Collection, key: &str) -> Option<Option<Arc<Value>>> {
        self.cache.get(collection, key)
    }

    /// The cache epoch to pass back to [`CachedDocuments::fill`] after a read.
    pub fn epoch(&self) -> u64 {
        self.cache.epoch()
    }

    /// Caches what a read found, unless something was invalidated since `epoch`.
    pub fn fill(&self, collection: Collection, key: &str, doc: Option<Arc<Value>>, epoch: u64) {
        self.cache.put(collection, key, doc, epoch);
    }

    /// A collection's cached list items.
    pub fn cached_list(&self, collection: Collection) -> Option<Arc<CachedList>> {
        self.cache.list(collection)
    }

    /// Caches a collection's list items, unless something was invalidated since `epoch`.
    pub fn fill_list(&self, collection: Collection, list: Arc<CachedList>, epoch: u64) {
        self.cache.put_list(collection, list, epoch);
    }

    /// The stored text of a document (no cache).
    pub async fn read(
        &self,
        collection: Collection,
        key: &str,
    ) -> Result<Option<String>, VaultError> {
        Ok(self.storage.document(collection, key).await?)
    }

    /// Every stored document of a collection, in key order (no cache).
    pub async fn read_all(
        &self,
        collection: Collection,
    ) -> Result<Vec<StoredDocument>, VaultError> {
        Ok(self.storage.documents(collection).await?)
    }

    /// Upserts a document.
    pub async fn put(
        &self,
        collection: Collection,
        key: &str,
        doc: &str,
        now: i64,
    ) -> Result<(), VaultError> {
        let written = self.storage.put_document(collection, key, doc, now).await;
        self.forget(collection, key);
        Ok(written?)
    }

    /// Deletes a document.
    pub async fn delete(&self, collection: Collection, key: &str) -> Result<(), VaultError> {
        let deleted = self.storage.delete_document(collection, key).await;
        self.forget(collection, key);
        Ok(deleted?)
    }

    /// Writes a sealed credential (see [`crate::storage::Documents::store_credential`]).
    pub async fn store_credential(
        &self,
        write: CredentialDocument,
    ) -> Result<CredentialWrite, VaultError> {
        let service = write.service.clone();
        let written = self.storage.store_credential(write).await;
        // Whatever the outcome, a cached copy may now be stale.
        self.forget(Collection::Tokens, &service);
        Ok(written?)
    }

    /// Compare-and-swap of one document.
    pub async fn swap(&self, swap: DocumentSwap) -> Result<SwapOutcome, VaultError> {
        let (collection, key) = (swap.collection, swap.key.clone());
        let swapped = self.storage.swap_document(swap).await;
        self.forget(collection, &key);
        Ok(swapped?)
    }

    /// Forgets one cached document and its collection's list.
    pub fn forget(&self, collection: Collection, key: &str) {
        self.cache.invalidate(collection, key);
    }

    /// Forgets everything (changes made by another process).
    pub fn forget_all(&self) {
        self.cache.clear();
    }
}
