//! `/v1/health` (public GET/HEAD, signed POST) and `GET /v1/identity` (the Ed25519 identity).

use actix_web::web::Data;
use actix_web::HttpResponse;
use keyholder_protocol::paths::PROTOCOL_VERSION;
use keyholder_protocol::wire::HealthResponse;

use super::error::ApiError;
use super::extract::Signed;
use crate::state::AppState;

async fn health_body(state: &AppState) -> Result<HealthResponse, ApiError> {
    Ok(HealthResponse {
        status: "healthy".into(),
        version: PROTOCOL_VERSION.into(),
        key_configured: true,
        capabilities: state.keys.settings().capabilities.clone(),
        uptime: state.keys.uptime_secs(),
        token_count: state.documents.token_count().await?,
        sealed: Some(state.keys.is_sealed()),
        keyholder_version: Some(crate::build_info::VERSION.into()),
    })
}

/// `GET` and `HEAD /v1/health` (the middleware drops the body for HEAD).
pub async fn health_public(state: Data<AppState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(health_body(&state).await?))
}

/// `POST /v1/health`, signed by the platform.
pub async fn health_signed(
    state: Data<AppState>,
    _signed: Signed<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(health_body(&state).await?))
}

/// `GET /v1/identity`: the key that signs every response.
pub async fn identity(state: Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.keys.keys().identity().identity_document())
}
