//! `POST /v1/refresh-notify` (the keyholder refreshes at the provider) and the opt-in
//! `POST /v1/refresh` (tv-refresh `get`/`update`), both platform-signed.

use actix_web::web::Data;
use actix_web::{HttpRequest, HttpResponse};
use keyholder_protocol::wire::{
    RefreshGetResponse, RefreshNotifyRequest, RefreshNotifyResponse, RefreshRequest,
    RefreshUpdateResponse,
};
use zeroize::{Zeroize, Zeroizing};

use super::error::ApiError;
use super::extract::{Signed, Unsealed};
use crate::state::AppState;
use crate::vault::refresh::{RefreshGet, RefreshStatus};

fn service_of(service: Option<String>) -> Result<String, ApiError> {
    service
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::InvalidRequest("missing 'service'".into()))
}

/// `POST /v1/refresh-notify`.
pub async fn refresh_notify(
    _unsealed: Unsealed,
    state: Data<AppState>,
    signed: Signed<RefreshNotifyRequest>,
) -> Result<HttpResponse, ApiError> {
    let Signed {
        body,
        request_id: header_id,
    } = signed;
    let service = service_of(body.service)?;
    let outcome = state
        .refresh
        .refresh_notify(
            &state.upstream,
            &service,
            body.refresh_hint.as_ref(),
            state.config.oauth_trust_platform_secret,
            &header_id,
        )
        .await?;
    let request_id = Some(
        body.request_id
            .filter(|id| !id.is_empty())
            .unwrap_or(header_id),
    );
    let (status, new_expires_at, message) = match outcome {
        RefreshStatus::Refreshed(at) => ("refreshed", Some(at), None),
        RefreshStatus::Acknowledged(text) => ("acknowledged", None, Some(text)),
        RefreshStatus::NoToken => ("no_token", None, None),
        RefreshStatus::NoRefreshToken => ("no_refresh_token", None, None),
        RefreshStatus::Failed(text) => ("refresh_failed", None, Some(text)),
    };
    Ok(HttpResponse::Ok().json(RefreshNotifyResponse {
        request_id,
        status: status.into(),
        new_expires_at,
        message,
    }))
}

/// `POST /v1/refresh` (tv-refresh): refused unless the owner enabled it.
pub async fn refresh(
    _unsealed: Unsealed,
    req: HttpRequest,
    state: Data<AppState>,
    signed: Signed<RefreshRequest>,
) -> Result<HttpResponse, ApiError> {
    if !state.config.enable_tv_refresh {
        tracing::warn!("tv-refresh asked for, but it is not enabled");
        return Err(ApiError::Forbidden(
            "tv-refresh is not enabled on this keyholder",
        ));
    }
    let Signed {
        body,
        request_id: header_id,
    } = signed;
    let request_id = Some(
        body.request_id
            .filter(|id| !id.is_empty())
            .unwrap_or(header_id),
    );
    let service = service_of(body.service)?;
    match body.action.as_deref() {
        Some("get") => {
            // The refresh token is handed out: the owner's policies decide (no ticket: no agent).
            let admission = super::policy::enforce(
                &req,
                &state,
                crate::policy::Endpoint::RefreshGet,
                &service,
                None,
            )
            .await?;
            let got = state
                .refresh
                .refresh_get(&service)
                .await
                .map_err(ApiError::from);
            let got = super::policy::settle(&state, admission, got).await?;
            let mut response = match got {
                RefreshGet::Ok(token, meta) => RefreshGetResponse {
                    status: "ok".into(),
                    refresh_token: Some(token.to_string()),
                    meta: Some(meta),
                    request_id,
                },
                RefreshGet::NoToken => RefreshGetResponse {
                    status: "no_token".into(),
                    refresh_token: None,
                    meta: None,
                    request_id,
                },
                RefreshGet::NoRefreshToken => RefreshGetResponse {
                    status: "no_refresh_token".into(),
                    refresh_token: None,
                    meta: None,
                    request_id,
                },
            };
            let bytes = Zeroizing::new(serde_json::to_vec(&response).unwrap_or_default());
            if let Some(t) = response.refresh_token.as_mut() {
                t.zeroize();
            }
            Ok(HttpResponse::Ok()
                .content_type("application/json")
                .body(bytes.to_vec()))
        }
        Some("update") => {
            let tokens = body
                .tokens
                .ok_or_else(|| ApiError::InvalidRequest("missing 'tokens'".into()))?;
            let new_expires_at = state.refresh.refresh_update(&service, tokens).await?;
            Ok(HttpResponse::Ok().json(RefreshUpdateResponse {
                status: "updated".into(),
                new_expires_at,
                request_id,
            }))
        }
        _ => Err(ApiError::InvalidRequest(
            "'action' must be 'get' or 'update'".into(),
        )),
    }
}
