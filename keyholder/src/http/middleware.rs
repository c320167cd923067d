//! Wraps every response: a request id, CORS for the browser-facing endpoints, the Ed25519
//! response signature over the exact body sent, error bodies carrying the request id, and one
//! access-log line per request (path only: query strings carry tickets), and the request metrics.

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::{self, BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::web::{Bytes, Data};
use actix_web::{HttpMessage, HttpResponse};
use keyholder_protocol::paths::{
    HEADER_PLATFORM_REQUEST_ID, HEADER_REQUEST_ID, PATH_ADMIN_MIGRATE, PATH_CREDENTIAL,
    PATH_HEALTH, PATH_IDENTITY, PATH_PROXY, PATH_REFRESH, PATH_REFRESH_NOTIFY, PATH_STORE,
    PATH_TOTP_CODE,
};
use keyholder_protocol::request_id::{is_valid_request_id, new_request_id};
use keyholder_protocol::response_sig::{response_signing_message, ResponseToSign};
use tracing::Instrument;

use super::error::ApiError;
use super::extract::TicketContext;
use crate::audit::{AuditEvent, PolicyNote, SigningNote, UpstreamOrigin};
use crate::state::AppState;
use crate::vault::replay::DurabilityBarrier;

/// The request id of the current request, in request extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn pick_request_id(headers: &HeaderMap) -> String {
    [HEADER_PLATFORM_REQUEST_ID, HEADER_REQUEST_ID]
        .iter()
        .filter_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
        .find(|id| is_valid_request_id(id))
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
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

/// Endpoints called from the owner's browser on the platform's origin, with the methods they
/// answer CORS for. `/v1/health` is public (with CORS) only for `GET`: its `POST` is the signed
/// platform call and `HEAD` is a liveness probe (PROTOCOL §3, §5), neither meant for a browser.
fn cors_methods(path: &str) -> Option<&'static str> {
    match path {
        PATH_STORE | PATH_CREDENTIAL | PATH_TOTP_CODE => Some("GET, POST, OPTIONS"),
        PATH_HEALTH | PATH_IDENTITY => Some("GET, OPTIONS"),
        _ => None,
    }
}

/// Whether `method` on `path` answers with CORS headers (`OPTIONS` being the preflight).
fn answers_cors(path: &str, method: &Method) -> bool {
    match cors_methods(path) {
        Some(methods) => {
            method == Method::OPTIONS || methods.split(", ").any(|m| m == method.as_str())
        }
        None => false,
    }
}

fn cors_headers(headers: &mut HeaderMap, origin: &HeaderValue, methods: &'static str) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
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

/// Endpoints whose every use and refusal goes to the audit trail.
fn is_audited_path(path: &str) -> bool {
    matches!(
        path,
        PATH_CREDENTIAL
            | PATH_STORE
            | PATH_TOTP_CODE
            | PATH_PROXY
            | PATH_REFRESH
            | PATH_REFRESH_NOTIFY
            | PATH_ADMIN_MIGRATE
    )
}

/// The middleware function (registered with `actix_web::middleware::from_fn`).
pub async fn keyholder_layer(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let started = Instant::now();
    let request_id = pick_request_id(req.headers());
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let method = req.method().clone();
    // Per-path rules are keyed by the path as the router matches it (percent-decoded), never
    // the raw spelling; non-canonical spellings are refused below anyway.
    let raw_path = req.path().to_string();
    let path = req.match_info().as_str().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let origin = if answers_cors(&path, &method) {
        req.headers()
            .get(header::ORIGIN)
            .cloned()
            .zip(cors_methods(&path))
    } else {
        None
    };
    let state = req.app_data::<Data<AppState>>().cloned();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %method,
        path = %raw_path,
        otel.name = tracing::field::Empty,
        otel.kind = "server",
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        agent_id = tracing::field::Empty,
        proxy_id = tracing::field::Empty,
    );
    if crate::telemetry::enabled() {
        // Named by the route pattern (never the raw path), before any child span starts it.
        let route = req.match_pattern();
        let route = route.as_deref().unwrap_or("unmatched");
        span.record("otel.name", format!("{method} {route}"));
        span.record("http.route", route);
        crate::telemetry::adopt_remote_parent(&span, req.headers());
    }

    let state_ref = state.as_ref().map(|s| s.get_ref());
    let finishing = |response, http_req| {
        finish(
            response,
            http_req,
            &request_id,
            &target,
            state_ref,
            origin.as_ref(),
        )
    };
    let limited = state_ref.and_then(|state| {
        let limiter = state.rate_limit.as_ref()?;
        // An unreadable X-Forwarded-For from a trusted proxy counts against the proxy itself.
        let ip = state
            .network
            .client_ip(req.request())
            .ok()
            .flatten()
            .or_else(|| req.peer_addr().map(|a| a.ip()))?;
        limiter.check(ip).err()
    });
    let (http_req, finished) = if let Some(retry_after_secs) = limited {
        // Over the per-address limit: refused before any other work, preflights included.
        let (http_req, _) = req.into_parts();
        let refused = HttpResponse::from_error(actix_web::Error::from(ApiError::RateLimited {
            retry_after_secs,
        }));
        let finished = finishing(refused, &http_req).await;
        (http_req, finished)
    } else if !is_canonical_path(&raw_path) {
        // Before routing: nothing is verified, used or served under a second name.
        let (http_req, _) = req.into_parts();
        let refused = HttpResponse::from_error(actix_web::Error::from(ApiError::InvalidRequest(
            "Non-canonical request path: percent-encoding, empty and dot segments are refused"
                .into(),
        )));
        let finished = finishing(refused, &http_req).await;
        (http_req, finished)
    } else if method == Method::OPTIONS && cors_methods(&path).is_some() {
        // CORS preflight: the ticket, not CORS, is the security boundary.
        let (http_req, _) = req.into_parts();
        let finished = finishing(HttpResponse::NoContent().finish(), &http_req).await;
        (http_req, finished)
    } else {
        let barrier = Arc::new(DurabilityBarrier::default());
        let res = match barrier.scope(next.call(req)).instrument(span.clone()).await {
            Ok(res) => res,
            Err(err) => return Err(err),
        };
        let (http_req, res) = res.into_parts();
        // The answer is built and signed while the replay marks made in handling are being
        // committed (the signature is the largest piece of CPU work and overlaps the fsync), but
        // it is released only once they are durable.
        let finished = finishing(res.map_into_boxed_body(), &http_req).await;
        let settled = match state_ref {
            Some(state) => {
                barrier
                    .settle(&state.vault.replay)
                    .instrument(tracing::debug_span!(target: crate::telemetry::TARGET, parent: &span, "db.group_commit"))
                    .await
            }
            None => Ok(()),
        };
        match settled {
            Ok(()) => (http_req, finished),
            Err(err) => {
                let failed = HttpResponse::from_error(actix_web::Error::from(ApiError::from(err)));
                let finished = finishing(failed, &http_req).await;
                (http_req, finished)
            }
        }
    };
    let Finished {
        response,
        status,
        error_code,
    } = finished;
    if let Some(state) = state.as_ref() {
        // Labelled by the registered route pattern, never the raw path (tickets ride in queries).
        let route = http_req.match_pattern();
        state.metrics.observe_request(
            route.as_deref().unwrap_or("unmatched"),
            crate::metrics::method_label(&method),
            status.as_u16(),
            started.elapsed(),
        );
    }

    let ticket = http_req
        .extensions()
        .get::<TicketContext>()
        .cloned()
        .unwrap_or_default();
    if let Some(state) = state.as_ref() {
        if is_audited_path(&path) && method != Method::OPTIONS {
            // Queued, not written: the answer never waits for the trail (see `audit::recorder`).
            let result = match error_code {
                Some(code) => code.to_string(),
                None if status.is_success() => "ok".to_string(),
                None => status.as_u16().to_string(),
            };
            let result = match http_req.extensions().get::<PolicyNote>() {
                Some(note) => format!("{result} {}", note.0),
                None => result,
            };
            // Which key signed what kind of request (issue 24): never a key or a signature.
            let result = match http_req.extensions().get::<SigningNote>() {
                Some(note) => format!("{result} {}", note.0),
                None => result,
            };
            state.audit.record(AuditEvent {
                at_ms: crate::audit::now_ms(),
                endpoint: path.clone(),
                service: ticket.service.clone(),
                purpose: ticket.purpose.clone().unwrap_or_default(),
                agent_id: ticket.agent_id.clone().unwrap_or_default(),
                proxy_id: ticket.proxy_id.clone().unwrap_or_default(),
                source: state
                    .network
                    .client_ip(&http_req)
                    .ok()
                    .flatten()
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
                upstream: http_req
                    .extensions()
                    .get::<UpstreamOrigin>()
                    .map(|o| o.0.clone())
                    .unwrap_or_default(),
                result,
                request_id: request_id.clone(),
            });
        }
    }
    if crate::telemetry::enabled() {
        span.record("http.response.status_code", status.as_u16());
        span.record("agent_id", ticket.agent_id.as_deref().unwrap_or(""));
        span.record("proxy_id", ticket.proxy_id.as_deref().unwrap_or(""));
    }
    span.in_scope(|| {
        tracing::info!(
            status = status.as_u16(),
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            agent_id = ticket.agent_id.as_deref().unwrap_or(""),
            proxy_id = ticket.proxy_id.as_deref().unwrap_or(""),
            "request"
        )
    });
    Ok(ServiceResponse::new(http_req, response))
}

/// A response ready to send: headers set, body collected and signed.
struct Finished {
    response: HttpResponse<BoxBody>,
    status: StatusCode,
    error_code: Option<&'static str>,
}

/// Collects the body of `response` (an error's as the JSON error body with the request id) and
/// sets the headers every answer carries, the Ed25519 response signature among them.
async fn finish(
    response: HttpResponse<BoxBody>,
    http_req: &actix_web::HttpRequest,
    request_id: &str,
    target: &str,
    state: Option<&AppState>,
    origin: Option<&(HeaderValue, &'static str)>,
) -> Finished {
    let method = http_req.method();
    let status = response.status();
    let api_error = response.error().and_then(|e| e.as_error::<ApiError>());
    let error_code = api_error.map(|e| e.code().as_str());
    let error_body = api_error.map(|e| e.body(Some(request_id)));
    let proxied = response.extensions().get::<ProxiedAnswerHead>().copied();
    let mut head = HttpResponse::build(status);
    for (name, value) in response.headers() {
        head.append_header((name.clone(), value.clone()));
    }
    let mut built = head.finish();
    if let (Some(ProxiedAnswerHead { streamed: true }), Some(state), true) =
        (proxied, state, api_error.is_none())
    {
        return finish_streamed(response, built, http_req, request_id, target, state, origin);
    }
    let bytes: Bytes = match error_body {
        Some(json) => {
            built.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Bytes::from(serde_json::to_vec(&json).unwrap_or_default())
        }
        None => body::to_bytes(response.into_body())
            .await
            .unwrap_or_default(),
    };
    let bytes = if method == Method::HEAD {
        Bytes::new()
    } else {
        bytes
    };

    let headers = built.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    if let Some(state) = state {
        let ts = crate::clock::now_unix();
        let message = response_signing_message(
            ts,
            method.as_str(),
            target,
            request_id,
            status.as_u16(),
            &bytes,
        );
        let signature =
            super::response_signer::sign(state.vault.keys(), ResponseToSign { ts, message }).await;
        if let Ok(v) = HeaderValue::from_str(&signature) {
            headers.insert(HeaderName::from_static("x-keyholder-signature"), v);
        }
    }
    security_headers(headers, proxied.is_some() && error_code.is_none());
    if let Some((origin, methods)) = origin {
        cors_headers(headers, origin, methods);
    }
    if let Some(AllowedMethods(allow)) = http_req.extensions().get::<AllowedMethods>().copied() {
        headers.insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    Finished {
        response: built.set_body(BoxBody::new(bytes)),
        status,
        error_code,
    }
}

/// Set by the proxy handler on an upstream's answer: its `Cache-Control` is kept, and a streamed
/// body is signed in the streamed form (`response_stream`) instead of being collected.
#[derive(Debug, Clone, Copy)]
pub struct ProxiedAnswerHead {
    /// The body is a stream of unknown length.
    pub streamed: bool,
}

/// Our own headers on every answer. On an upstream's answer they are added to its own, not put
/// in their place: its `Cache-Control` stays (an MCP event stream says `no-cache`), `no-store`
/// only where it said nothing.
fn security_headers(headers: &mut actix_web::http::header::HeaderMap, upstream_answer: bool) {
    if !upstream_answer || !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// A streamed upstream answer: the head is signed at once with the `stream` marker, the body
/// goes on chunk by chunk as the upstream sends it and ends with its signed end frame.
fn finish_streamed(
    response: HttpResponse<BoxBody>,
    mut built: HttpResponse,
    http_req: &actix_web::HttpRequest,
    request_id: &str,
    target: &str,
    state: &AppState,
    origin: Option<&(HeaderValue, &'static str)>,
) -> Finished {
    let status = response.status();
    let keys = state.vault.keys();
    let stream = keyholder_protocol::response_stream::new_stream_id();
    let signature = keyholder_protocol::response_stream::sign_stream_head(
        keys.identity(),
        crate::clock::now_unix(),
        http_req.method().as_str(),
        target,
        request_id,
        status.as_u16(),
        &stream,
    );
    let headers = built.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    if let Ok(v) = HeaderValue::from_str(&signature) {
        headers.insert(HeaderName::from_static("x-keyholder-signature"), v);
    }
    security_headers(headers, true);
    if let Some((origin, methods)) = origin {
        cors_headers(headers, origin, methods);
    }
    let body = SignedStreamBody {
        inner: response.into_body(),
        signer: Some(keyholder_protocol::response_stream::StreamSigner::new(
            stream,
        )),
        keys,
    };
    Finished {
        response: built.set_body(BoxBody::new(body)),
        status,
        error_code: None,
    }
}

/// A streamed body that hashes what it sends and appends the signed end frame after the last
/// chunk. On an upstream failure mid-stream it ends without the frame (truncated, so refused by
/// a verifier).
struct SignedStreamBody {
    inner: BoxBody,
    signer: Option<keyholder_protocol::response_stream::StreamSigner>,
    keys: Arc<crate::vault::keyring::KeyRing>,
}

impl MessageBody for SignedStreamBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> body::BodySize {
        body::BodySize::Stream
    }

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Bytes, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.signer.is_none() {
            return Poll::Ready(None);
        }
        match std::pin::Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(signer) = this.signer.as_mut() {
                    signer.update(&chunk);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(err))) => {
                this.signer = None;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => match this.signer.take() {
                Some(signer) => {
                    Poll::Ready(Some(Ok(Bytes::from(signer.finish(this.keys.identity())))))
                }
                None => Poll::Ready(None),
            },
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Fallback for unknown routes.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

/// The methods a route allows, set by its 405 fallback for the `Allow` header.
#[derive(Debug, Clone, Copy)]
struct AllowedMethods(&'static str);

/// Fallback for a known route with an unsupported method; `allow` goes to the `Allow` header.
pub async fn method_not_allowed(
    req: actix_web::HttpRequest,
    allow: &'static str,
) -> Result<HttpResponse, ApiError> {
    req.extensions_mut().insert(AllowedMethods(allow));
    Err(ApiError::MethodNotAllowed)
}

/// Status `200` with a JSON body.
pub fn json_ok<T: serde::Serialize>(value: &T) -> HttpResponse {
    HttpResponse::build(StatusCode::OK).json(value)
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
