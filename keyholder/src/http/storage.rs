//! `POST /v1/storage`: the platform's signed metadata operations on the four collections.

use actix_web::web::Data;
use actix_web::HttpResponse;
use keyholder_protocol::wire::{
    Collection, GetResponse, ListBatchResponse, ListResponse, StatusResponse, StorageOperation,
    StorageRequest,
};

use super::error::ApiError;
use super::extract::Signed;
use crate::state::AppState;

fn collection(name: Option<&str>) -> Result<Collection, ApiError> {
    let name = name.ok_or_else(|| ApiError::InvalidRequest("missing 'collection'".into()))?;
    Collection::parse(name).ok_or_else(|| ApiError::InvalidRequest("unknown collection".into()))
}

fn key(key: Option<String>) -> Result<String, ApiError> {
    key.filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::InvalidRequest("missing 'key'".into()))
}

/// Dispatches one storage operation.
pub async fn storage(
    state: Data<AppState>,
    signed: Signed<StorageRequest>,
) -> Result<HttpResponse, ApiError> {
    let Signed {
        body: request,
        request_id: header_id,
    } = signed;
    let request_id = Some(
        request
            .request_id
            .clone()
            .filter(|id| !id.is_empty())
            .unwrap_or(header_id),
    );
    let documents = &state.documents;
    let response = match request.operation {
        StorageOperation::Get => {
            let data = documents
                .storage_get(
                    collection(request.collection.as_deref())?,
                    key(request.key)?,
                )
                .await?;
            HttpResponse::Ok().json(GetResponse {
                data: data.unwrap_or(serde_json::Value::Null),
                request_id,
            })
        }
        StorageOperation::Set => {
            let data = request
                .data
                .ok_or_else(|| ApiError::InvalidRequest("missing 'data'".into()))?;
            documents
                .storage_set(
                    collection(request.collection.as_deref())?,
                    key(request.key)?,
                    data,
                )
                .await?;
            HttpResponse::Ok().json(StatusResponse {
                status: "ok".into(),
                request_id,
            })
        }
        StorageOperation::Delete => {
            documents
                .storage_delete(
                    collection(request.collection.as_deref())?,
                    key(request.key)?,
                )
                .await?;
            HttpResponse::Ok().json(StatusResponse {
                status: "ok".into(),
                request_id,
            })
        }
        StorageOperation::List if request.options.is_none() => {
            // The common unfiltered list: the cached JSON array, spliced into the answer.
            let list = documents
                .list_items(collection(request.collection.as_deref())?)
                .await?;
            let request_id = serde_json::to_string(&request_id).unwrap_or_else(|_| "null".into());
            let mut body = String::with_capacity(list.json.len() + request_id.len() + 32);
            body.push_str("{\"items\":");
            body.push_str(&list.json);
            body.push_str(",\"requestId\":");
            body.push_str(&request_id);
            body.push('}');
            HttpResponse::Ok()
                .content_type("application/json")
                .body(body)
        }
        StorageOperation::List => {
            let page = documents
                .storage_list(collection(request.collection.as_deref())?, request.options)
                .await?;
            HttpResponse::Ok().json(ListResponse {
                items: page.items,
                pagination: page.pagination,
                request_id,
            })
        }
        StorageOperation::ListBatch => {
            let names = request
                .collections
                .ok_or_else(|| ApiError::InvalidRequest("missing 'collections'".into()))?;
            if names.len() > 16 {
                return Err(ApiError::InvalidRequest("too many collections".into()));
            }
            let results = documents
                .storage_list_batch(&names, request.options)
                .await?;
            HttpResponse::Ok().json(ListBatchResponse {
                results,
                request_id,
            })
        }
    };
    Ok(response)
}
