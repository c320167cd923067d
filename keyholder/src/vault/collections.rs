//! The platform's metadata store (`/v1/storage`): get, set, delete, and list with the reference
//! webhook's list semantics (meta building, filters, cursors, pagination).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use keyholder_protocol::document::is_sensitive;
use keyholder_protocol::wire::{Collection, ListOptions, ListPage, Pagination};
use serde_json::{Map, Value};

use super::doc_cache::CachedList;
use super::documents::CachedDocuments;
use super::key_handle::KeyHandle;
use super::keyring::KeyRing;
use super::VaultError;
use crate::policy::PolicyEngine;
use crate::storage::{SharedStorage, StoredDocument};

/// Longest accepted document key.
pub const MAX_KEY_LEN: usize = 256;

/// Refuses empty, oversized or control-character keys.
pub fn validate_key(key: &str) -> Result<(), VaultError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(char::is_control) {
        return Err(VaultError::Invalid(format!(
            "'key' must be 1-{MAX_KEY_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

/// The storage service: the platform's documents through their one cache (token documents sealed
/// on read, see `totp_links`), and the collection lists built from them.
pub struct StorageService {
    storage: SharedStorage,
    documents: CachedDocuments,
    keys: Arc<KeyHandle>,
    policy: Arc<PolicyEngine>,
}

impl StorageService {
    /// The service over `storage`, with the document cache in front.
    pub fn new(
        storage: SharedStorage,
        keys: Arc<KeyHandle>,
        policy: Arc<PolicyEngine>,
    ) -> StorageService {
        StorageService {
            documents: CachedDocuments::new(Arc::clone(&storage)),
            storage,
            keys,
            policy,
        }
    }

    fn storage(&self) -> &SharedStorage {
        &self.storage
    }

    /// The stored documents, through their cache.
    pub fn documents(&self) -> &CachedDocuments {
        &self.documents
    }

    pub(super) fn keys(&self) -> Arc<KeyRing> {
        self.keys.keys()
    }

    pub(super) fn is_sealed(&self) -> bool {
        self.keys.is_sealed()
    }

    pub(super) fn ensure_unsealed(&self) -> Result<(), VaultError> {
        self.keys.ensure_unsealed()
    }

    /// The document stored under `key`, as stored.
    pub async fn storage_get(
        &self,
        collection: Collection,
        key: String,
    ) -> Result<Option<Value>, VaultError> {
        Ok(self
            .document(collection, key)
            .await?
            .map(|doc| doc.as_ref().clone()))
    }

    /// The document stored under `key`, shared from the cache (read from the database on a miss).
    pub async fn document(
        &self,
        collection: Collection,
        key: String,
    ) -> Result<Option<Arc<Value>>, VaultError> {
        validate_key(&key)?;
        if let Some(cached) = self.documents.cached(collection, &key) {
            return Ok(cached);
        }
        let epoch = self.documents.epoch();
        let text = self.documents.read(collection, &key).await?;
        let mut cacheable = true;
        let doc = match text {
            Some(t) => {
                let doc: Value =
                    serde_json::from_str(&t).map_err(|e| VaultError::Corrupt(e.to_string()))?;
                // A token document still holding a totpUri link is sealed on first read (2.4.0).
                let doc = match collection {
                    Collection::Tokens => {
                        let (doc, on_disk) = self.upgrade_token_document(&key, &t, doc).await;
                        cacheable = on_disk;
                        doc
                    }
                    _ => doc,
                };
                Some(Arc::new(doc))
            }
            None => None,
        };
        if cacheable {
            self.documents.fill(collection, &key, doc.clone(), epoch);
        }
        Ok(doc)
    }

    /// Upserts a document (must be a JSON object).
    pub async fn storage_set(
        &self,
        collection: Collection,
        key: String,
        data: Value,
    ) -> Result<(), VaultError> {
        validate_key(&key)?;
        if !data.is_object() {
            return Err(VaultError::Invalid("'data' must be a JSON object".into()));
        }
        self.documents
            .put(
                collection,
                &key,
                &data.to_string(),
                crate::clock::now_unix(),
            )
            .await
    }

    /// Deletes a document; deleting a missing one is not an error.
    pub async fn storage_delete(
        &self,
        collection: Collection,
        key: String,
    ) -> Result<(), VaultError> {
        validate_key(&key)?;
        self.documents.delete(collection, &key).await
    }

    /// Lists a collection with the given options.
    pub async fn storage_list(
        &self,
        collection: Collection,
        options: Option<ListOptions>,
    ) -> Result<ListPage, VaultError> {
        let list = self.list_items(collection).await?;
        Ok(list_page(collection, &list.items, options.as_ref()))
    }

    /// Lists several collections at once; unknown names are skipped.
    pub async fn storage_list_batch(
        &self,
        names: &[String],
        options: Option<ListOptions>,
    ) -> Result<BTreeMap<String, ListPage>, VaultError> {
        let mut results = BTreeMap::new();
        for name in names {
            if let Some(collection) = Collection::parse(name) {
                if results.contains_key(collection.as_str()) {
                    continue;
                }
                let list = self.list_items(collection).await?;
                results.insert(
                    collection.as_str().to_string(),
                    list_page(collection, &list.items, options.as_ref()),
                );
            }
        }
        Ok(results)
    }

    /// Number of stored credentials (documents in `tokens`).
    pub async fn token_count(&self) -> Result<u64, VaultError> {
        Ok(self
            .storage()
            .count_documents(Some(Collection::Tokens))
            .await?)
    }

    /// A collection's list items (built, in list order), from the cache or the database.
    pub async fn list_items(&self, collection: Collection) -> Result<Arc<CachedList>, VaultError> {
        if let Some(items) = self.documents.cached_list(collection) {
            return Ok(items);
        }
        let epoch = self.documents.epoch();
        let rows = self.documents.read_all(collection).await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut cacheable = true;
        for StoredDocument { key, doc: text } in rows {
            let doc: Value =
                serde_json::from_str(&text).map_err(|e| VaultError::Corrupt(e.to_string()))?;
            let doc = match collection {
                Collection::Tokens => {
                    let (doc, on_disk) = self.upgrade_token_document(&key, &text, doc).await;
                    cacheable &= on_disk;
                    doc
                }
                _ => doc,
            };
            let mut item = list_item(collection, &key, doc);
            if collection == Collection::Tokens {
                // The owner's custody policies on this service, by name only (so the platform's
                // dashboard can explain a refusal); the platform cannot set or hide this field.
                let policies = self.policy.service_policies(&key);
                if let Some(meta) = item.get_mut("meta").and_then(Value::as_object_mut) {
                    meta.remove("keyholderPolicies");
                    if !policies.is_empty() {
                        meta.insert("keyholderPolicies".into(), serde_json::json!(policies));
                    }
                }
            }
            items.push(item);
        }
        if collection == Collection::Audit {
            items.sort_by(|a, b| cursor_cmp(&cursor(collection, b), &cursor(collection, a)));
        }
        let json = serde_json::to_string(&items).map_err(|e| VaultError::Corrupt(e.to_string()))?;
        let list = Arc::new(CachedList { items, json });
        if cacheable {
            self.documents
                .fill_list(collection, Arc::clone(&list), epoch);
        }
        Ok(list)
    }
}

/// Builds a list item: `{"key", "meta"}` (plus `"data"` for audit). `meta` is the stored meta
/// object plus every other non-sensitive top-level field, `serviceName` defaulting to the key.
pub fn list_item(collection: Collection, key: &str, doc: Value) -> Value {
    let mut meta = Map::new();
    if let Value::Object(fields) = &doc {
        if let Some(Value::Object(stored)) = fields.get("meta") {
            meta = stored.clone();
        }
        meta.entry("serviceName")
            .or_insert_with(|| Value::String(key.to_string()));
        for (name, value) in fields {
            if !meta.contains_key(name)
                && !is_sensitive(name)
                && !matches!(name.as_str(), "v" | "alg" | "fields" | "meta")
            {
                meta.insert(name.clone(), value.clone());
            }
        }
        if !meta.contains_key("hasRefreshToken") {
            if let Some(refresh) = fields.get("refreshToken") {
                meta.insert("hasRefreshToken".into(), Value::Bool(truthy(refresh)));
            }
        }
    } else {
        meta.insert("serviceName".into(), Value::String(key.to_string()));
    }
    let mut item = Map::new();
    item.insert("key".into(), Value::String(key.to_string()));
    item.insert("meta".into(), Value::Object(meta));
    if collection == Collection::Audit {
        item.insert("data".into(), doc);
    }
    Value::Object(item)
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// The cursor of an item: the audit entry's timestamp, else its key.
fn cursor(collection: Collection, item: &Value) -> Value {
    if collection == Collection::Audit {
        if let Some(ts) = item.get("data").and_then(|d| d.get("timestamp")) {
            return ts.clone();
        }
        return Value::String(String::new());
    }
    item.get("key").cloned().unwrap_or(Value::Null)
}

/// Orders cursors: numbers numerically, strings lexically, otherwise by their JSON text.
fn cursor_cmp(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .unwrap_or(0.0)
            .partial_cmp(&y.as_f64().unwrap_or(0.0))
            .unwrap_or(Ordering::Equal),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        _ => a.to_string().cmp(&b.to_string()),
    }
}

/// Applies filters, `since`, `after` and `limit` to a collection's documents (in key order).
pub fn list_page(collection: Collection, all: &[Value], options: Option<&ListOptions>) -> ListPage {
    let Some(options) = options else {
        return ListPage {
            items: all.to_vec(),
            pagination: None,
        };
    };
    let mut items: Vec<&Value> = all.iter().collect();
    if let Some(filters) = options.filters.as_ref().filter(|f| !f.is_empty()) {
        items.retain(|item| {
            let source = if collection == Collection::Audit {
                item.get("data")
            } else {
                item.get("meta")
            };
            filters
                .iter()
                .all(|(field, want)| source.and_then(|s| s.get(field)) == Some(want))
        });
    }
    if let Some(since) = options.since.as_ref().filter(|v| !v.is_null()) {
        items.retain(|item| cursor_cmp(&cursor(collection, item), since) != Ordering::Less);
    }
    let total_count = items.len() as u64;
    if let Some(after) = options
        .after
        .as_ref()
        .filter(|v| !v.is_null() && *v != &Value::String(String::new()))
    {
        items.retain(|item| {
            let ord = cursor_cmp(&cursor(collection, item), after);
            if collection == Collection::Audit {
                ord == Ordering::Less
            } else {
                ord == Ordering::Greater
            }
        });
    }
    let mut pagination = None;
    if let Some(limit) = options.limit.filter(|l| *l > 0) {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let has_more = items.len() > limit;
        items.truncate(limit);
        let next_cursor = if has_more {
            items.last().map(|i| cursor(collection, i))
        } else {
            None
        };
        pagination = Some(Pagination {
            has_more,
            next_cursor,
            total_count,
        });
    }
    ListPage {
        items: items.into_iter().cloned().collect(),
        pagination,
    }
}
