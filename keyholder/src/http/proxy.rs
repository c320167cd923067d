//! `POST /v1/proxy`: the platform's signed call with a `proxy` ticket; the domain makes the upstream
//! call under the egress policy, and the answer goes back with hop-by-hop headers removed, its body
//! streamed as it arrives (short answers of known length whole).

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::web::Data;
use actix_web::{HttpMessage, HttpRequest, HttpResponse};
use keyholder_protocol::paths::HEADER_UPSTREAM_STATUS;
use keyholder_protocol::ErrorCode;

use super::error::ApiError;
use super::extract::ProxyCall;
use super::layers::ProxiedAnswerHead;
use super::policy::{enforce, settle};
use crate::state::AppState;
use crate::upstream::strip_hop_by_hop;
use crate::vault::egress::ProxiedBody;

/// Proxies one upstream call with the credential injected.
pub async fn proxy(
    req: HttpRequest,
    state: Data<AppState>,
    call: ProxyCall,
) -> Result<HttpResponse, ApiError> {
    let ProxyCall {
        claims,
        service,
        request_id,
        upstream,
        templates,
    } = call;
    // The owner's policies (the client address is the platform's: it makes this call).
    let admission = enforce(
        &req,
        &state,
        crate::policy::Endpoint::Proxy,
        &service,
        Some(&claims),
    )
    .await?;
    // 2.4.0: a ticket for a token that was replaced since is refused before any upstream call.
    let checked = state
        .credentials
        .check_creation(&service, &claims)
        .await
        .map_err(ApiError::from);
    // The audit entry of this request names the upstream origin (never the path or query), in
    // the one form the egress policy pins and allows (`scheme://host:port`).
    // Parsed once here: the call below takes it along.
    let url = upstream
        .url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok());
    if let Some(origin) = url
        .as_ref()
        .and_then(|u| crate::upstream::Origin::of(u).ok())
    {
        req.extensions_mut()
            .insert(crate::audit::UpstreamOrigin(origin));
    }
    let result = match checked {
        Ok(()) => state
            .proxy
            .proxy_call(
                &state.upstream,
                &service,
                crate::vault::egress::UpstreamCall {
                    request: upstream,
                    url,
                    templates,
                },
                &request_id,
                &state.replay,
            )
            .await
            .map_err(ApiError::from),
        Err(err) => Err(err),
    };
    let result = settle(&state, admission, result).await;
    let answer = match result {
        Ok(answer) => answer,
        Err(err) => {
            if err.code() == ErrorCode::EgressDenied {
                state.metrics.egress_denials.inc();
            }
            return Err(err);
        }
    };
    state.metrics.upstream_calls.inc();
    if let Some(note) = answer.signed.clone() {
        req.extensions_mut().insert(crate::audit::SigningNote(note));
    }
    if answer.redactions > 0 {
        state
            .metrics
            .credential_redactions
            .inc_by(answer.redactions);
    }
    let status = StatusCode::from_u16(answer.status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = answer.headers;
    strip_hop_by_hop(&mut headers);
    let mut builder = HttpResponse::build(status);
    for (name, value) in headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            builder.append_header((name, value));
        }
    }
    builder.insert_header((HEADER_UPSTREAM_STATUS, status.as_u16().to_string()));
    match answer.body {
        ProxiedBody::Whole(body) => {
            builder
                .extensions_mut()
                .insert(ProxiedAnswerHead { streamed: false });
            Ok(builder.body(body))
        }
        ProxiedBody::Stream(stream) => {
            builder
                .extensions_mut()
                .insert(ProxiedAnswerHead { streamed: true });
            let metrics = state.metrics.clone();
            let counted = answer.redactions;
            let body = futures_util::stream::unfold(Some(stream), move |stream| {
                let metrics = metrics.clone();
                async move {
                    let mut stream = stream?;
                    match stream.next_chunk().await {
                        Ok(Some(chunk)) => Some((Ok(chunk), Some(stream))),
                        Ok(None) => {
                            let found = stream.redactions().saturating_sub(counted);
                            if found > 0 {
                                tracing::warn!(
                                    redactions = found,
                                    "the upstream echoed the injected credential; redacted from the streamed answer"
                                );
                                metrics.credential_redactions.inc_by(found);
                            }
                            None
                        }
                        Err(err) => {
                            // The head is sent: the body ends without its signed end frame,
                            // which a verifier treats as truncated.
                            tracing::warn!(error = %err, "proxied stream ended early");
                            Some((Err(err), None))
                        }
                    }
                }
            });
            Ok(builder.streaming(body))
        }
    }
}
