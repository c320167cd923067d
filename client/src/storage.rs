//! `POST /v1/storage`: the platform's signed get, set, delete, list and list_batch, with list options,
//! pagination and a stream of pages that follows `nextCursor`.

use std::collections::BTreeMap;

use futures_util::Stream;
use keyholder_protocol::paths::PATH_STORAGE;
use keyholder_protocol::wire::{
    Collection, GetResponse, ListBatchResponse, ListOptions, ListPage, ListResponse,
    StatusResponse, StorageOperation, StorageRequest,
};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::platform::Platform;

/// Upper bound on pages followed by [`Platform::list_all`] (a webhook that never stops paging is a bug).
pub const MAX_PAGES: usize = 10_000;

fn request(operation: StorageOperation, request_id: &str) -> StorageRequest {
    StorageRequest {
        operation,
        collection: None,
        collections: None,
        key: None,
        data: None,
        options: None,
        request_id: Some(request_id.to_owned()),
    }
}

impl Platform {
    /// `get`: the document as stored, or `None`.
    pub async fn storage_get(
        &self,
        collection: Collection,
        key: &str,
    ) -> Result<Option<Value>, Error> {
        let resp: GetResponse = self
            .signed(PATH_STORAGE, |id| StorageRequest {
                collection: Some(collection.as_str().to_owned()),
                key: Some(key.to_owned()),
                ..request(StorageOperation::Get, id)
            })
            .await?;
        Ok(match resp.data {
            Value::Null => None,
            data => Some(data),
        })
    }

    /// `set` (upsert): `data` must be a JSON object.
    pub async fn storage_set(
        &self,
        collection: Collection,
        key: &str,
        data: &Map<String, Value>,
    ) -> Result<(), Error> {
        let _: StatusResponse = self
            .signed(PATH_STORAGE, |id| StorageRequest {
                collection: Some(collection.as_str().to_owned()),
                key: Some(key.to_owned()),
                data: Some(Value::Object(data.clone())),
                ..request(StorageOperation::Set, id)
            })
            .await?;
        Ok(())
    }

    /// `delete` (idempotent).
    pub async fn storage_delete(&self, collection: Collection, key: &str) -> Result<(), Error> {
        let _: StatusResponse = self
            .signed(PATH_STORAGE, |id| StorageRequest {
                collection: Some(collection.as_str().to_owned()),
                key: Some(key.to_owned()),
                ..request(StorageOperation::Delete, id)
            })
            .await?;
        Ok(())
    }

    /// `list`: one page (all items when `options.limit` is unset).
    pub async fn storage_list(
        &self,
        collection: Collection,
        options: &ListOptions,
    ) -> Result<ListResponse, Error> {
        self.signed(PATH_STORAGE, |id| StorageRequest {
            collection: Some(collection.as_str().to_owned()),
            options: Some(options.clone()),
            ..request(StorageOperation::List, id)
        })
        .await
    }

    /// `list_batch`: one page of each collection, keyed by collection name.
    pub async fn storage_list_batch(
        &self,
        collections: &[Collection],
        options: &ListOptions,
    ) -> Result<BTreeMap<String, ListPage>, Error> {
        let names: Vec<String> = collections.iter().map(|c| c.as_str().to_owned()).collect();
        let resp: ListBatchResponse = self
            .signed(PATH_STORAGE, |id| StorageRequest {
                collections: Some(names.clone()),
                options: Some(options.clone()),
                ..request(StorageOperation::ListBatch, id)
            })
            .await?;
        Ok(resp.results)
    }

    /// Every page of a `list`, following `nextCursor` (sent back as `after`) while `hasMore`.
    ///
    /// ```no_run
    /// # async fn demo(platform: keyholder_client::Platform) -> Result<(), keyholder_client::Error> {
    /// use futures_util::TryStreamExt as _;
    /// use keyholder_protocol::wire::{Collection, ListOptions};
    ///
    /// let options = ListOptions { limit: Some(50), ..Default::default() };
    /// let mut pages = std::pin::pin!(platform.list_pages(Collection::Audit, options));
    /// while let Some(page) = pages.try_next().await? {
    ///     println!("{} entries", page.items.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn list_pages(
        &self,
        collection: Collection,
        options: ListOptions,
    ) -> impl Stream<Item = Result<ListResponse, Error>> + '_ {
        struct State {
            options: ListOptions,
            pages: usize,
            done: bool,
        }
        let state = State {
            options,
            pages: 0,
            done: false,
        };
        futures_util::stream::try_unfold(state, move |mut state| async move {
            if state.done {
                return Ok(None);
            }
            let page = self.storage_list(collection, &state.options).await?;
            state.pages += 1;
            match page.pagination.as_ref() {
                Some(p) if p.has_more => {
                    let next = p.next_cursor.clone().filter(|c| !c.is_null());
                    if next.is_none() || next == state.options.after || state.pages >= MAX_PAGES {
                        return Err(Error::Protocol(
                            "list pagination does not advance (hasMore without a new nextCursor)"
                                .into(),
                        ));
                    }
                    state.options.after = next;
                }
                _ => state.done = true,
            }
            Ok(Some((page, state)))
        })
    }

    /// Every item of a `list`, all pages followed (see [`Platform::list_pages`]).
    pub async fn list_all(
        &self,
        collection: Collection,
        options: ListOptions,
    ) -> Result<Vec<Value>, Error> {
        use futures_util::TryStreamExt as _;
        let pages: Vec<ListResponse> = self.list_pages(collection, options).try_collect().await?;
        Ok(pages.into_iter().flat_map(|p| p.items).collect())
    }
}
