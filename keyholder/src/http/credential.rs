//! Ticket endpoints reached by agents and the owner's browser: `/v1/store`, `/v1/credential`,
//! `/v1/totp-code`. The platform's own addresses are refused on all three.

use actix_web::web::Data;
use actix_web::{HttpRequest, HttpResponse};
use keyholder_protocol::wire::StoreResponse;

use super::error::ApiError;
use super::extract::{CredentialEndpoint, StoreEndpoint, TicketEndpoint, Ticketed, TotpEndpoint};
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
        .credentials
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
    let body = use_credential(&req, &state, Endpoint::Credential, &ticketed, || async {
        // A signing key (service account, GitHub App) is never handed out: a minted token is.
        state
            .credentials
            .credential_body(&state.upstream, &ticketed.service)
            .await
    })
    .await?;
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
    let code = use_credential(&req, &state, Endpoint::TotpCode, &ticketed, || async {
        state.credentials.totp_code(&ticketed.service).await
    })
    .await?;
    Ok(HttpResponse::Ok().json(code))
}

/// One use of the ticket's credential: admitted by the owner's policies, refused when the ticket's
/// creation no longer matches (2.4.0), then `body`; a use that fails is given back to its usage
/// caps.
async fn use_credential<E, T, F>(
    req: &HttpRequest,
    state: &AppState,
    endpoint: Endpoint,
    ticketed: &Ticketed<E>,
    body: impl FnOnce() -> F,
) -> Result<T, ApiError>
where
    E: TicketEndpoint,
    F: std::future::Future<Output = Result<T, crate::vault::VaultError>>,
{
    let admission = enforce(
        req,
        state,
        endpoint,
        &ticketed.service,
        Some(&ticketed.claims),
    )
    .await?;
    let result = async {
        state
            .credentials
            .check_creation(&ticketed.service, &ticketed.claims)
            .await?;
        Ok(body().await?)
    }
    .await;
    settle(state, admission, result).await
}
