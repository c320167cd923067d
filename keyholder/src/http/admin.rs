//! `POST /v1/admin/migrate` (signed, protocol 2.4.0): the platform asks the keyholder to seal every
//! stored `totpUri` link; the answer carries counts only.

use actix_web::web::Data;
use actix_web::HttpResponse;
use keyholder_protocol::wire::AdminMigrateResponse;

use super::error::ApiError;
use super::extract::Signed;
use crate::state::AppState;

/// `POST /v1/admin/migrate` (signed, 2.4.0): seals every stored `totpUri` link; answers counts only.
pub async fn admin_migrate(
    state: Data<AppState>,
    _signed: Signed<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let report = state.documents.migrate_totp_links().await?;
    tracing::info!(
        scanned = report.scanned,
        migrated = report.migrated,
        failed = report.failed,
        "totpUri migration"
    );
    Ok(HttpResponse::Ok().json(AdminMigrateResponse {
        status: "ok".into(),
        totp: report,
    }))
}
