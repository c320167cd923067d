//! Ticket endpoints reached by agents and the owner's browser: `/v1/store`, `/v1/credential`,
//! `/v1/totp-code`. The platform's own addresses are refused on all three.

use actix_web::web::Data;
use actix_web::{HttpRequest, HttpResponse};
use keyholder_protocol::wire::StoreResponse;

use super::error::ApiError;
use super::extract::{CredentialEndpoint, StoreEndpoint, Ticketed, TotpEndpoint};
use super::policy::{enforce, settle};
use crate::policy::Endpoint;
use crate::state::AppState;
use crate::vault::credentials::StoreMode;

/// `POST /v1/store`: encrypt and keep a credential sent by the owner's browser.
pub async fn store(
    state: Data<AppState>,
    ticketed: Ticketed<StoreEndpoint>,
) -> Result<HttpResponse, ApiError> {
    let Ticketed {
        claims,
        service,
        request,
    } = ticketed;
    let token_data = request
        .token_data
        .ok_or_else(|| ApiError::InvalidRequest("missing 'tokenData'".into()))?;
    let constraints = claims.store_constraints()?;
    let mode = if constraints.create_only {
        StoreMode::Create
    } else {
        StoreMode::Overwrite
    };
    let meta = state
        .vault
        .store_credential(
            &service,
            token_data,
            mode,
            constraints.creation_id.as_deref(),
        )
        .await?;
    Ok(HttpResponse::Ok().json(StoreResponse {
        status: "stored".into(),
        service,
        meta,
    }))
}

/// `GET|POST /v1/credential`: the decrypted credential for a ticket holder.
pub async fn credential(
    req: HttpRequest,
    state: Data<AppState>,
    ticketed: Ticketed<CredentialEndpoint>,
) -> Result<HttpResponse, ApiError> {
    let admission = enforce(
        &req,
        &state,
        Endpoint::Credential,
        &ticketed.service,
        Some(&ticketed.claims),
    )
    .await?;
    let result = async {
        state
            .vault
            .check_creation(&ticketed.service, &ticketed.claims)
            .await?;
        // A signing key (service account, GitHub App) is never handed out: a minted token is.
        Ok(state
            .vault
            .credential_body(&state.upstream, &ticketed.service)
            .await?)
    }
    .await;
    let body = settle(&state, admission, result).await?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(body.to_vec()))
}

/// `GET|POST /v1/totp-code`: the current code of a TOTP credential.
pub async fn totp_code(
    req: HttpRequest,
    state: Data<AppState>,
    ticketed: Ticketed<TotpEndpoint>,
) -> Result<HttpResponse, ApiError> {
    let admission = enforce(
        &req,
        &state,
        Endpoint::TotpCode,
        &ticketed.service,
        Some(&ticketed.claims),
    )
    .await?;
    let result = async {
        state
            .vault
            .check_creation(&ticketed.service, &ticketed.claims)
            .await?;
        Ok(state.vault.totp_code(&ticketed.service).await?)
    }
    .await;
    let code = settle(&state, admission, result).await?;
    Ok(HttpResponse::Ok().json(code))
}
