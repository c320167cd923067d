//! `POST /v1/exchange`: the platform trades a one-time bind code for the HMAC secret (or, for an
//! asymmetric code, for nothing secret: the answer then carries no `hmacSecret`).

use actix_web::web::{Bytes, Data};
use actix_web::HttpResponse;
use keyholder_protocol::paths::PROTOCOL_VERSION;
use keyholder_protocol::wire::{ExchangeRequest, ExchangeResponse};

use super::error::ApiError;
use super::extract::parse_json;
use crate::state::AppState;

/// Handles the exchange. The code is the only authentication here.
pub async fn exchange(state: Data<AppState>, body: Bytes) -> Result<HttpResponse, ApiError> {
    let request: ExchangeRequest = parse_json(&body)?;
    let code = request
        .code
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ApiError::InvalidRequest("missing 'code'".into()))?;
    if code.len() > 64 {
        return Err(ApiError::Vault(crate::vault::VaultError::CodeExpired));
    }
    let exchanged = state.binding.exchange(&code).await?;
    tracing::info!(webhook_id = %exchanged.webhook_id, "bound to the platform");
    let response = ExchangeResponse {
        hmac_secret: exchanged.secret_base64.map(|s| s.to_string()),
        webhook_id: exchanged.webhook_id,
        version: PROTOCOL_VERSION.to_string(),
        capabilities: state.keys.settings().capabilities.clone(),
        signing_key: Some(state.keys.keys().identity().identity_document()),
    };
    Ok(HttpResponse::Ok().json(&response))
}
