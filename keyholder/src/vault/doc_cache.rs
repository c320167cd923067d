//! In-memory cache of stored documents and of built list items, so the hot paths (credential
//! fetch, storage list) do no database read. Writes invalidate what they touch; the owner's CLI
//! changes (rewrap, import, retire) bump the owner generation, which clears everything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keyholder_protocol::wire::Collection;
use serde_json::Value;

/// Most documents kept; past it the cache starts over (it is a cache, the database is the truth).
const MAX_DOCUMENTS: usize = 50_000;

/// A collection's list items in list order, and the same items already serialized as a JSON array
/// (an unfiltered list is answered from it without building or serializing anything).
pub struct CachedList {
    /// The items.
    pub items: Vec<Value>,
    /// `items` as a JSON array.
    pub json: String,
}

/// A cached lookup: the document, or `None` when it is known to be absent.
type CachedDocument = Option<Arc<Value>>;

/// Cached documents (`None`: known to be absent) and list items per collection.
#[derive(Default)]
pub struct DocumentCache {
    /// Bumped by every invalidation: a read that started before it must not fill the cache.
    epoch: AtomicU64,
    docs: Mutex<HashMap<(Collection, String), CachedDocument>>,
    lists: Mutex<HashMap<Collection, Arc<CachedList>>>,
}

impl DocumentCache {
    /// The current epoch; pass it back to `put_*` after reading the database.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A cached document: `Some(None)` when known absent, `None` when not cached.
    pub fn get(&self, collection: Collection, key: &str) -> Option<Option<Arc<Value>>> {
        let docs = self.docs.lock().ok()?;
        docs.get(&(collection, key.to_string())).cloned()
    }

    /// Caches what a read found, unless something was invalidated since `epoch`.
    pub fn put(&self, collection: Collection, key: &str, doc: Option<Arc<Value>>, epoch: u64) {
        if let Ok(mut docs) = self.docs.lock() {
            if self.epoch() != epoch {
                return;
            }
            if docs.len() >= MAX_DOCUMENTS {
                docs.clear();
            }
            docs.insert((collection, key.to_string()), doc);
        }
    }

    /// Cached list items of a collection, in list order.
    pub fn list(&self, collection: Collection) -> Option<Arc<CachedList>> {
        self.lists.lock().ok()?.get(&collection).cloned()
    }

    /// Caches a collection's list items, unless something was invalidated since `epoch`.
    pub fn put_list(&self, collection: Collection, items: Arc<CachedList>, epoch: u64) {
        if let Ok(mut lists) = self.lists.lock() {
            if self.epoch() == epoch {
                lists.insert(collection, items);
            }
        }
    }

    /// Forgets one document (after a committed write to it) and its collection's list.
    pub fn invalidate(&self, collection: Collection, key: &str) {
        let docs = self.docs.lock();
        let lists = self.lists.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut docs) = docs {
            docs.remove(&(collection, key.to_string()));
        }
        if let Ok(mut lists) = lists {
            lists.remove(&collection);
        }
    }

    /// Forgets everything (changes made by another process).
    pub fn clear(&self) {
        let docs = self.docs.lock();
        let lists = self.lists.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut docs) = docs {
            docs.clear();
        }
        if let Ok(mut lists) = lists {
            lists.clear();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_raced_a_write_does_not_fill_the_cache() {
        let cache = DocumentCache::default();
        let before = cache.epoch();
        cache.invalidate(Collection::Tokens, "github");
        cache.put(
            Collection::Tokens,
            "github",
            Some(Arc::new(Value::Null)),
            before,
        );
        assert!(cache.get(Collection::Tokens, "github").is_none());
        let now = cache.epoch();
        cache.put(Collection::Tokens, "github", None, now);
        assert_eq!(cache.get(Collection::Tokens, "github"), Some(None));
        cache.clear();
        assert!(cache.get(Collection::Tokens, "github").is_none());
    }
}
