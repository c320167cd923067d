//! The HTTP face of the keyholder: routes, verification extractors, the response layer and the
//! single error mapping. Handlers are thin: extract, call the domain, map the result.

pub mod admin;
pub mod approval_page;
pub mod bind_page;
pub mod credential;
pub mod error;
pub mod exchange;
pub mod extract;
pub mod health;
pub mod middleware;
pub mod network;
pub mod policy;
pub mod proxy;
pub mod rate_limit;
pub mod refresh;
pub mod response_signer;
pub mod storage;
pub mod store_page;

use actix_web::{web, HttpRequest};
use keyholder_protocol::paths::*;

/// Registers every route; unknown paths and methods get JSON errors (a 405 names the methods
/// allowed, as RFC 9110 requires; `OPTIONS` on the browser-facing paths is the CORS preflight).
/// `docs/openapi.json` describes exactly these routes (checked by `tests/e2e/openapi.rs`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    let fallback = |allow: &'static str| {
        web::to(move |req: HttpRequest| middleware::method_not_allowed(req, allow))
    };
    cfg.service(
        web::resource(PATH_EXCHANGE)
            .route(web::post().to(exchange::exchange))
            .default_service(fallback("POST")),
    )
    .service(
        web::resource(PATH_HEALTH)
            .route(web::get().to(health::health_public))
            .route(web::head().to(health::health_public))
            .route(web::post().to(health::health_signed))
            .default_service(fallback("GET, HEAD, POST, OPTIONS")),
    )
    .service(
        web::resource(PATH_IDENTITY)
            .route(web::get().to(health::identity))
            .default_service(fallback("GET, OPTIONS")),
    )
    .service(
        web::resource(PATH_STORAGE)
            .route(web::post().to(storage::storage))
            .default_service(fallback("POST")),
    )
    .service(
        web::resource(PATH_STORE)
            .route(web::post().to(credential::store))
            .default_service(fallback("POST, OPTIONS")),
    )
    .service(
        web::resource(PATH_CREDENTIAL)
            .route(web::get().to(credential::credential))
            .route(web::post().to(credential::credential))
            .default_service(fallback("GET, POST, OPTIONS")),
    )
    .service(
        web::resource(PATH_TOTP_CODE)
            .route(web::get().to(credential::totp_code))
            .route(web::post().to(credential::totp_code))
            .default_service(fallback("GET, POST, OPTIONS")),
    )
    .service(
        web::resource(PATH_PROXY)
            .route(web::post().to(proxy::proxy))
            .default_service(fallback("POST")),
    )
    .service(
        web::resource(PATH_REFRESH_NOTIFY)
            .route(web::post().to(refresh::refresh_notify))
            .default_service(fallback("POST")),
    )
    .service(
        web::resource(PATH_REFRESH)
            .route(web::post().to(refresh::refresh))
            .default_service(fallback("POST")),
    )
    .service(
        web::resource(PATH_ADMIN_MIGRATE)
            .route(web::post().to(admin::admin_migrate))
            .default_service(fallback("POST")),
    )
    .service(
        web::resource(PATH_BIND)
            .route(web::get().to(bind_page::bind_page))
            .default_service(fallback("GET")),
    )
    .service(
        web::resource(PATH_STORE_PAGE)
            .route(web::get().to(store_page::store_page))
            .default_service(fallback("GET")),
    )
    .service(
        web::resource(PATH_APPROVAL_PAGE)
            .app_data(
                web::FormConfig::default()
                    .limit(4096)
                    .error_handler(|_, _| {
                        error::ApiError::InvalidRequest("Invalid approval form".into()).into()
                    }),
            )
            .app_data(web::QueryConfig::default().error_handler(|_, _| {
                error::ApiError::InvalidRequest("Invalid query string".into()).into()
            }))
            .route(web::get().to(approval_page::approval_page))
            .route(web::post().to(approval_page::approval_decide))
            .default_service(fallback("GET, POST")),
    )
    .service(
        web::resource(PATH_STORE_PAGE_SCRIPT)
            .route(web::get().to(store_page::store_script))
            .default_service(fallback("GET")),
    )
    .default_service(web::to(middleware::not_found));
}
