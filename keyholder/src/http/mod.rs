//! The HTTP face of the keyholder: routes, verification extractors, the response layer and the
//! single error mapping. Handlers are thin: extract, call the domain, map the result.

pub mod admin;
pub mod approval_page;
pub mod bind_page;
pub mod credential;
pub mod endpoints;
pub mod error;
pub mod exchange;
pub mod extract;
pub mod health;
pub mod layers;
pub mod network;
pub mod policy;
pub mod proxy;
pub mod rate_limit;
pub mod refresh;
pub mod response_signer;
pub mod storage;
pub mod store_page;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::header::HeaderValue;
use actix_web::http::Method;
use actix_web::middleware::from_fn;
use actix_web::web::{self, Data};
use actix_web::App;

use crate::state::AppState;

/// Registers every route of the [`endpoints::ENDPOINTS`] table; unknown paths and methods get JSON
/// errors (a 405 names the methods allowed, as RFC 9110 requires; `OPTIONS` on the browser-facing
/// paths is the CORS preflight). `docs/openapi.json` describes exactly these routes (checked by
/// `tests/e2e/openapi.rs`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    for endpoint in endpoints::ENDPOINTS {
        let mut resource = web::resource(endpoint.route);
        if endpoint.form {
            resource = resource
                .app_data(
                    web::FormConfig::default()
                        .limit(endpoint.body_limit)
                        .error_handler(|_, _| {
                            error::ApiError::InvalidRequest("Invalid approval form".into()).into()
                        }),
                )
                .app_data(web::QueryConfig::default().error_handler(|_, _| {
                    error::ApiError::InvalidRequest("Invalid query string".into()).into()
                }));
        }
        for (verb, handler) in endpoint.methods {
            resource = resource.route(handler().method(verb.method()));
        }
        if endpoint.cors.is_some() {
            // The preflight: the ticket, not CORS, is the security boundary.
            resource = resource.route(web::route().method(Method::OPTIONS).to(layers::preflight));
        }
        let allow = HeaderValue::from_str(&endpoint.allow()).ok();
        cfg.service(
            resource.default_service(web::to(move || layers::method_not_allowed(allow.clone()))),
        );
    }
    cfg.default_service(web::to(layers::not_found));
}

/// The actix application of one worker: the shared state, the layers in their order (the last
/// `wrap` is the outermost, see [`layers`]) and the routes.
pub fn app(
    state: Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(state)
        // Extractors read bodies themselves with per-endpoint limits; this caps the rest.
        .app_data(web::PayloadConfig::new(64 * 1024))
        .wrap(from_fn(layers::guard::guard))
        .wrap(from_fn(layers::answer::sign_and_audit))
        .wrap(from_fn(layers::cors::cors))
        .wrap(from_fn(layers::context::request_context))
        .configure(configure)
}
