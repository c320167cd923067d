//! The CORS layer: the endpoints the owner's browser calls from the platform's origin (those with
//! [`Endpoint::cors`](crate::http::endpoints::Endpoint::cors)) answer with CORS headers for the
//! methods listed there, refusals included. The preflight itself is a route (see
//! [`super::preflight`]); the ticket, not CORS, is the security boundary.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::middleware::Next;

use super::context;

/// The layer function (registered with `actix_web::middleware::from_fn`).
pub async fn cors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let allowed = context(req.request())
        .endpoint
        .filter(|endpoint| endpoint.answers_cors(req.method()))
        .and_then(|endpoint| Some((req.headers().get(header::ORIGIN)?.clone(), endpoint.cors?)));
    let mut res = next.call(req).await?;
    if let Some((origin, methods)) = allowed {
        cors_headers(res.headers_mut(), origin, methods);
    }
    Ok(res)
}

fn cors_headers(headers: &mut HeaderMap, origin: HeaderValue, methods: &'static str) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type"),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("X-Request-Id, X-Keyholder-Signature"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}
