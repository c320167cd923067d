//! The layers every request passes through, outermost first, each with one job:
//!
//! 1. [`context`]: the request id, the client address and the endpoint, worked out once; the
//!    request's span around everything inside; the request metrics and the access-log line.
//! 2. [`cors`]: CORS headers on the answers of the browser-facing endpoints.
//! 3. [`answer`]: the answer as sent: the error body (with the request id), the Ed25519 response
//!    signature over the exact body, our security headers, release only once the replay marks are
//!    durable, and the audit entry of the audited endpoints.
//! 4. [`guard`]: refusals before routing (the per-address rate limit, non-canonical paths).
//!
//! Then the router ([`super::configure`]): handlers, the CORS preflight, 404 and 405. They are
//! stacked in [`super::app`].

pub mod answer;
pub mod context;
pub mod cors;
pub mod guard;

use actix_web::http::header::{self, HeaderValue};
use actix_web::HttpResponse;

pub use answer::ProxiedAnswerHead;
pub use context::{context, RequestContext};

use super::error::ApiError;

/// Fallback for unknown routes.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

/// Fallback for a known route with an unsupported method; `allow` goes to the `Allow` header.
pub async fn method_not_allowed(allow: Option<HeaderValue>) -> HttpResponse {
    let mut response = HttpResponse::from_error(ApiError::MethodNotAllowed);
    if let Some(allow) = allow {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}

/// The CORS preflight of a browser-facing endpoint (its headers come from the [`cors`] layer).
pub async fn preflight() -> HttpResponse {
    HttpResponse::NoContent().finish()
}
