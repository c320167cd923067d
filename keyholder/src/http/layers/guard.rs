//! The guard layer (innermost, before routing): refusals that need no endpoint's logic. A client
//! over its per-address limit is refused before any other work, preflights included; a request
//! path in a second spelling is refused before anything is verified, used or served under it.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web::Data;

use super::context;
use crate::http::error::ApiError;
use crate::state::AppState;

/// The layer function (registered with `actix_web::middleware::from_fn`).
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let limited = req.app_data::<Data<AppState>>().and_then(|state| {
        let limiter = state.rate_limit.as_ref()?;
        limiter
            .check(context(req.request()).client.accountable()?)
            .err()
    });
    if let Some(retry_after_secs) = limited {
        return Ok(req
            .error_response(ApiError::RateLimited { retry_after_secs })
            .map_into_right_body());
    }
    if !is_canonical_path(req.path()) {
        return Ok(req
            .error_response(ApiError::InvalidRequest(
                "Non-canonical request path: percent-encoding, empty and dot segments are refused"
                    .into(),
            ))
            .map_into_right_body());
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// Whether `path` is in the one spelling the routes are written in: starts with `/`, only
/// unreserved characters, sub-delimiters, `:`, `@` and `/`, and no percent-encoding (our paths never
/// need one), empty segment (`//`) or dot segment (`.`, `..`). The router decodes `%63` to `c`
/// before matching, so without this `/v1/%63redential` would be served as `/v1/credential` while a
/// rule keyed by the raw path missed it; refusing such spellings outright leaves one name per route.
pub fn is_canonical_path(path: &str) -> bool {
    let allowed = |c: u8| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&c);
    path.starts_with('/')
        && path.bytes().all(allowed)
        && path
            .split('/')
            .skip(1)
            .enumerate()
            .all(|(i, segment)| match segment {
                "." | ".." => false,
                // An empty segment is `//`, except the root `/` itself.
                "" => i == 0 && path == "/",
                _ => true,
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_canonical_spelling_of_a_path_passes() {
        for ok in ["/", "/v1/credential", "/v1/health", "/bind", "/v1/a:b@c"] {
            assert!(is_canonical_path(ok), "{ok}");
        }
        for bad in [
            "",
            "v1/credential",
            "/v1/%63redential",
            "/%761/credential",
            "/v1/%70roxy",
            "/v1/credential%2F",
            "//v1/credential",
            "/v1//credential",
            "/v1/credential/",
            "/v1/./credential",
            "/v1/../v1/credential",
            "/v1/credential/.",
            "/v1/credential/..",
            "/v1\\credential",
            "/v1/cred\u{e9}ntial",
            "*",
        ] {
            assert!(!is_canonical_path(bad), "{bad}");
        }
    }
}
