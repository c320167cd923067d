//! The answer layer: every answer as it is sent. An error's JSON body is written here, once, with
//! the request id; the Ed25519 response signature covers the exact body sent (a streamed upstream
//! answer is signed in the streamed form, its head at once and its body in an end frame); our
//! security headers are added; the answer is released only once the replay marks made in handling
//! are durable; and the audited endpoints get their audit entry (queued, never waited for).

use std::sync::Arc;

use actix_web::body::{self, BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::web::{Bytes, Data};
use actix_web::{HttpMessage, HttpResponse};
use keyholder_protocol::response_sig::{response_signing_message, ResponseToSign};

use super::context::{context, RequestContext};
use crate::audit::{AuditEvent, PolicyNote, SigningNote, UpstreamOrigin};
use crate::http::error::ApiError;
use crate::http::extract::TicketContext;
use crate::state::AppState;
use crate::vault::replay::DurabilityBarrier;

/// The layer function (registered with `actix_web::middleware::from_fn`).
pub async fn sign_and_audit(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let context = context(req.request());
    let state = req.app_data::<Data<AppState>>().cloned();
    let state = state.as_ref().map(|s| s.get_ref());
    let barrier = Arc::new(DurabilityBarrier::default());
    let res = barrier.scope(next.call(req)).await?;
    let (http_req, res) = res.into_parts();
    // The answer is built and signed while the replay marks made in handling are being
    // committed (the signature is the largest piece of CPU work and overlaps the fsync), but
    // it is released only once they are durable.
    let mut finished = finish(res.map_into_boxed_body(), &http_req, &context, state).await;
    if let Some(state) = state {
        let settled =
            crate::telemetry::timed(crate::telemetry::SPAN_COMMIT, barrier.settle(&state.replay))
                .await;
        if let Err(err) = settled {
            let failed = HttpResponse::from_error(actix_web::Error::from(ApiError::from(err)));
            finished = finish(failed, &http_req, &context, Some(state)).await;
        }
        audit(state, &http_req, &context, &finished);
    }
    Ok(ServiceResponse::new(http_req, finished.response))
}

/// Queues the audit entry of an audited endpoint's answer (the preflight is not a use).
fn audit(
    state: &AppState,
    http_req: &actix_web::HttpRequest,
    context: &RequestContext,
    finished: &Finished,
) {
    let Some(endpoint) = context.endpoint.filter(|e| e.audited) else {
        return;
    };
    if http_req.method() == Method::OPTIONS {
        return;
    }
    let ticket = http_req
        .extensions()
        .get::<TicketContext>()
        .cloned()
        .unwrap_or_default();
    // Queued, not written: the answer never waits for the trail (see `audit::recorder`).
    let result = match finished.error_code {
        Some(code) => code.to_string(),
        None if finished.status.is_success() => "ok".to_string(),
        None => finished.status.as_u16().to_string(),
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
        endpoint: endpoint.route.to_string(),
        service: ticket.service,
        purpose: ticket.purpose.unwrap_or_default(),
        agent_id: ticket.agent_id.unwrap_or_default(),
        proxy_id: ticket.proxy_id.unwrap_or_default(),
        source: context
            .client
            .known()
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        upstream: http_req
            .extensions()
            .get::<UpstreamOrigin>()
            .map(|o| o.0.to_string())
            .unwrap_or_default(),
        result,
        request_id: context.request_id.clone(),
    });
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
    context: &RequestContext,
    state: Option<&AppState>,
) -> Finished {
    let (request_id, target) = (context.request_id.as_str(), context.target.as_str());
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
        return finish_streamed(response, built, http_req, request_id, target, state);
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
            crate::http::response_signer::sign(state.keys.keys(), ResponseToSign { ts, message })
                .await;
        if let Ok(v) = HeaderValue::from_str(&signature) {
            headers.insert(HeaderName::from_static("x-keyholder-signature"), v);
        }
    }
    security_headers(headers, proxied.is_some() && error_code.is_none());
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
) -> Finished {
    let status = response.status();
    let keys = state.keys.keys();
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
    if let Ok(v) = HeaderValue::from_str(&signature) {
        headers.insert(HeaderName::from_static("x-keyholder-signature"), v);
    }
    security_headers(headers, true);
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
