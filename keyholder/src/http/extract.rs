//! Verification before handling: extractors that cap the body, check the platform's signature,
//! timestamp and request id, or a ticket's signature, expiry, nonce and scope, and only then
//! deserialize. A handler only ever sees an already-verified request.
//!
//! Both checks follow the binding's scheme (one per binding): HMAC headers and platform tickets in
//! the Token Vault scheme, Ed25519 envelopes and `kh2` tickets in the asymmetric one. A request or
//! ticket of the other scheme is refused (`401 auth_failed` / `401 ticket_invalid`). Every extractor
//! goes through [`verify_signed`] and [`verify_ticket_for`], so every endpoint gets the switch.

use actix_web::dev::Payload;
use actix_web::web::{Bytes, BytesMut, Data};
use actix_web::{FromRequest, HttpMessage, HttpRequest};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use keyholder_protocol::envelope::verify_envelope;
use keyholder_protocol::paths::{
    HEADER_ENVELOPE, HEADER_PLATFORM_REQUEST_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP,
    MAX_CLOCK_SKEW_SECS, REQUEST_ID_TTL_SECS,
};
use keyholder_protocol::request_id::is_valid_request_id;
use keyholder_protocol::signing::verify_request;
use keyholder_protocol::ticket::verify_ticket;
use keyholder_protocol::ticket_kh2::{is_kh2_ticket, verify_kh2_ticket};
use keyholder_protocol::wire::{CredentialRequest, ProxyRequest, StoreRequest, UpstreamRequest};
use keyholder_protocol::{Purpose, TicketClaims};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::state::AppState;
use crate::vault::platform_keys::PlatformScheme;
use crate::vault::replay::{ReplayKind, Seen};
use crate::vault::BindingState;

/// Ticket facts kept on the request for the access log (never the ticket itself).
#[derive(Debug, Clone, Default)]
pub struct TicketContext {
    /// Agent id from the ticket.
    pub agent_id: Option<String>,
    /// Proxy config id from the ticket.
    pub proxy_id: Option<String>,
    /// Service the verified ticket names (its signed `svc`). Empty while no ticket verified: a
    /// name from an unverified request never reaches the audit trail as if it were verified.
    pub service: String,
    /// The ticket's purpose, once verified.
    pub purpose: Option<String>,
}

/// Refuses with `503 sealed` while the owner has sealed the keyholder. Ticket endpoints get this
/// through [`Ticketed`]; every other endpoint that decrypts or stores a credential (the signed proxy
/// and refresh endpoints) calls it first, or takes [`Unsealed`] as its first extractor.
pub fn ensure_unsealed(state: &AppState) -> Result<(), ApiError> {
    state.keys.ensure_unsealed().map_err(ApiError::from)
}

/// An extractor that only succeeds while the keyholder is not sealed (list it first in a handler).
pub struct Unsealed;

impl FromRequest for Unsealed {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Unsealed, ApiError>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        std::future::ready(
            state(req)
                .and_then(|s| ensure_unsealed(&s))
                .map(|_| Unsealed),
        )
    }
}

fn state(req: &HttpRequest) -> Result<Data<AppState>, ApiError> {
    req.app_data::<Data<AppState>>().cloned().ok_or_else(|| {
        ApiError::Vault(crate::vault::VaultError::Corrupt(
            "app state missing".into(),
        ))
    })
}

/// The body limit of the endpoint `req` is for (from the endpoint table).
fn body_limit(req: &HttpRequest) -> usize {
    super::layers::context(req)
        .endpoint
        .map_or(super::endpoints::DEFAULT_BODY_LIMIT, |e| e.body_limit)
}

/// Reads the whole body, refusing more than `limit` bytes (checked before and while reading).
pub async fn read_body(
    req: &HttpRequest,
    payload: &mut Payload,
    limit: usize,
) -> Result<Bytes, ApiError> {
    if let Some(len) = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::InvalidRequest("request body could not be read".into()))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Parses JSON strictly into `T` (an empty body is JSON `null`).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"null"
    } else {
        body
    };
    serde_json::from_slice(text).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "Invalid JSON"
        } else {
            "Invalid request"
        };
        ApiError::InvalidRequest(format!("{what}: {}", e_safe(&e)))
    })
}

/// A serde error without echoing input values (they could be secrets).
fn e_safe(e: &serde_json::Error) -> String {
    match e.classify() {
        serde_json::error::Category::Data => {
            // Data errors name the field and the expected type, not the value.
            let text = e.to_string();
            text.split(" at line")
                .next()
                .unwrap_or("invalid field")
                .replace('`', "'")
                .chars()
                .take(160)
                .collect()
        }
        _ => format!("at line {} column {}", e.line(), e.column()),
    }
}

/// A platform call whose HMAC signature, timestamp and request id were verified.
pub struct Signed<T> {
    /// The deserialized body.
    pub body: T,
    /// The platform's request id (also remembered against replay).
    pub request_id: String,
}

/// Verifies a signed platform request over the exact bytes received, in the binding's scheme.
///
/// HMAC scheme, in order: bound, no envelope header, signature headers, timestamp, signature
/// (constant time), a valid request id header equal to the body's `requestId` (where the body has
/// one), then replay (so a forger cannot burn ids): the request id, and the signature itself, so
/// that the same signed bytes are accepted once whatever request id or endpoint they come with
/// (both marks durable, in one group commit). Asymmetric scheme: bound, no HMAC signature header,
/// envelope format, known key, timestamp, Ed25519 signature over the method, target and body, the
/// request id header as above, then nonce replay (durable; the nonce is the replay key and is
/// signed with the method and target, so these signed bytes cannot be replayed on another
/// endpoint either). Returns the raw body and the request id.
pub async fn verify_signed(
    req: &HttpRequest,
    payload: &mut Payload,
) -> Result<(Bytes, String), ApiError> {
    verify_signed_marks(req, payload, false).await
}

/// [`verify_signed`] whose replay marks, taken at once, go to the writer with the request's next
/// marks (the proxy ticket's nonce): one commit for the three.
async fn verify_signed_marks(
    req: &HttpRequest,
    payload: &mut Payload,
    with_next: bool,
) -> Result<(Bytes, String), ApiError> {
    let state = state(req)?;
    let mut binding = state.keys.binding();
    if !binding.bound && state.reload.catch_up().await {
        binding = state.keys.binding();
    }
    if !binding.bound {
        return Err(ApiError::SetupRequired);
    }
    let body = read_body(req, payload, body_limit(req)).await?;
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let now = crate::clock::now_unix();
    let refused = |reason: &dyn std::fmt::Debug| {
        state.metrics.signature_failures.inc();
        tracing::info!(reason = ?reason, "platform signature refused");
    };
    let replay_key = match platform_signature(req, &binding, &body, now) {
        // Another replica may have rebound a moment ago: check once more with what is stored.
        Err(e) if e.may_be_stale_binding() && state.reload.catch_up().await => {
            platform_signature(req, &state.keys.binding(), &body, now)
        }
        verified => verified,
    }
    .inspect_err(|e| refused(e))?;
    let request_id = header(HEADER_PLATFORM_REQUEST_ID)
        .filter(|id| is_valid_request_id(id))
        .ok_or(ApiError::BadRequestId)?
        .to_string();
    if !body_request_id_matches(&body, &request_id) {
        refused(&"body requestId differs from the request id header");
        return Err(ApiError::RequestIdMismatch);
    }
    let request_id_until = now.saturating_add(REQUEST_ID_TTL_SECS);
    let marks = match &replay_key {
        ReplayKey::Signature { signature, until } => vec![
            (ReplayKind::RequestId, request_id.as_str(), request_id_until),
            (ReplayKind::Signature, *signature, *until),
        ],
        ReplayKey::EnvelopeNonce { nonce, until } => {
            vec![(ReplayKind::EnvelopeNonce, nonce.as_str(), *until)]
        }
    };
    let replay = &state.replay;
    let replayed = if with_next {
        replay.remember_all_with_next(&marks).await?
    } else {
        replay.remember_all(&marks).await?
    };
    match replayed {
        None => Ok((body, request_id)),
        Some(ReplayKind::EnvelopeNonce) => {
            state.metrics.replay_refused("envelope_nonce");
            tracing::warn!("replayed envelope nonce refused");
            Err(ApiError::EnvelopeReplayed)
        }
        Some(ReplayKind::Signature) => {
            state.metrics.replay_refused("signature");
            tracing::warn!("replayed platform signature refused");
            Err(ApiError::SignatureReplayed)
        }
        Some(_) => {
            state.metrics.replay_refused("request_id");
            tracing::warn!("duplicate platform request id refused");
            Err(ApiError::DuplicateRequestId)
        }
    }
}

/// Verifies the platform's signature of a request (HMAC or Ed25519 envelope, as the binding
/// says) and returns what makes it single-use.
fn platform_signature<'r>(
    req: &'r HttpRequest,
    binding: &BindingState,
    body: &[u8],
    now: i64,
) -> Result<ReplayKey<'r>, ApiError> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    Ok(match binding.scheme {
        PlatformScheme::Hmac => {
            if req.headers().contains_key(HEADER_ENVELOPE) {
                // An envelope in an HMAC binding.
                return Err(ApiError::WrongScheme);
            }
            let ts = verify_request(
                &binding.hmac,
                header(HEADER_SIGNATURE),
                header(HEADER_TIMESTAMP),
                body,
                now,
                MAX_CLOCK_SKEW_SECS,
            )?;
            // Verified, so 64 lowercase hex: one spelling per signature.
            let signature = header(HEADER_SIGNATURE)
                .and_then(|h| h.strip_prefix("sha256="))
                .unwrap_or_default();
            ReplayKey::Signature {
                signature,
                until: ts.max(now).saturating_add(MAX_CLOCK_SKEW_SECS),
            }
        }
        PlatformScheme::Ed25519 => {
            if req.headers().contains_key(HEADER_SIGNATURE) {
                // An HMAC signature in an asymmetric binding.
                return Err(ApiError::WrongScheme);
            }
            let target = req
                .uri()
                .path_and_query()
                .map_or_else(|| req.path(), |p| p.as_str());
            let envelope = verify_envelope(
                &binding.platform_keys,
                header(HEADER_ENVELOPE),
                req.method().as_str(),
                target,
                body,
                now,
                MAX_CLOCK_SKEW_SECS,
            )?;
            // Accepted while |now - ts| <= skew: remembered at least that long.
            ReplayKey::EnvelopeNonce {
                nonce: envelope.nonce,
                until: envelope.ts.max(now).saturating_add(MAX_CLOCK_SKEW_SECS),
            }
        }
    })
}

/// What makes a verified signed request single-use, besides its request id.
enum ReplayKey<'a> {
    /// HMAC scheme: the signature (the same signed bytes), until its timestamp's window ends.
    Signature { signature: &'a str, until: i64 },
    /// Asymmetric scheme: the envelope's nonce, until its timestamp's window ends.
    EnvelopeNonce { nonce: String, until: i64 },
}

/// Whether a signed body's `requestId`, where it has one, is exactly `header` (PROTOCOL §2.1: the
/// platform sends it in both). A body that is not a JSON object has none (its handler refuses it
/// as invalid); a `requestId` that is present but not that string, or present twice, does not
/// match. Only the one member is decoded: other values are skipped, not built.
fn body_request_id_matches(body: &[u8], header: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "requestId", default, deserialize_with = "present")]
        request_id: Option<serde_json::Value>,
    }
    fn present<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<serde_json::Value>, D::Error> {
        serde::Deserialize::deserialize(d).map(Some)
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return true;
    }
    match serde_json::from_slice::<Probe>(body) {
        Ok(Probe { request_id: None }) => true,
        Ok(Probe {
            request_id: Some(value),
        }) => value.as_str() == Some(header),
        // Not JSON: refused by the handler's parse (400), nothing to compare.
        Err(e) if e.is_syntax() || e.is_eof() => true,
        // A duplicate `requestId`: ambiguous, so not a match.
        Err(_) => false,
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for Signed<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let mut payload = payload.take();
        Box::pin(async move {
            let (body, request_id) = verify_signed(&req, &mut payload).await?;
            Ok(Signed {
                body: parse_json(&body)?,
                request_id,
            })
        })
    }
}

/// A `/v1/proxy` call: platform-signed **and** carrying a `proxy` ticket for the service it names.
pub struct ProxyCall {
    /// Verified ticket claims.
    pub claims: TicketClaims,
    /// The service (equal to the ticket's `svc`).
    pub service: String,
    /// The platform's request id.
    pub request_id: String,
    /// The upstream call to make (`url` present).
    pub upstream: UpstreamRequest,
    /// Header templates with `${TOKEN}`.
    pub templates: std::collections::BTreeMap<String, String>,
}

impl FromRequest for ProxyCall {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let mut payload = payload.take();
        Box::pin(async move {
            // Sealed: refuse before anything is verified, so no ticket is used up.
            ensure_unsealed(&*state(&req)?)?;
            let (body, request_id) = verify_signed_marks(&req, &mut payload, true).await?;
            let request: ProxyRequest = parse_json(&body)?;
            let ticket = request
                .ticket
                .filter(|t| !t.is_empty())
                .ok_or_else(|| ApiError::InvalidRequest("missing 'ticket'".into()))?;
            let service = request
                .service
                .filter(|s| !s.is_empty())
                .ok_or_else(|| ApiError::InvalidRequest("missing 'service'".into()))?;
            // Every required field is checked before the ticket, so a malformed call does not burn it.
            let upstream = request
                .upstream
                .filter(|u| u.url.as_deref().is_some_and(|url| !url.is_empty()))
                .ok_or_else(|| ApiError::InvalidRequest("missing 'upstream.url'".into()))?;
            let claims = verify_ticket_for(&req, &ticket, &service, &[Purpose::Proxy]).await?;
            Ok(ProxyCall {
                claims,
                service,
                request_id,
                upstream,
                templates: request.header_templates.unwrap_or_default(),
            })
        })
    }
}

/// Verifies a ticket for `service` and one of `purposes`. Order as the protocol lists it:
/// bound, (scheme of the binding), form, signature, payload, expiry, (nonce present, lifetime cap),
/// nonce replay, scope. Platform tickets verify with the HMAC secret, `kh2` tickets with the active
/// platform keys; their nonces share one replay memory.
pub async fn verify_ticket_for(
    req: &HttpRequest,
    ticket: &str,
    service: &str,
    purposes: &[Purpose],
) -> Result<TicketClaims, ApiError> {
    crate::telemetry::timed(
        crate::telemetry::SPAN_TICKET,
        verify_ticket_in_order(req, ticket, service, purposes),
    )
    .await
}

async fn verify_ticket_in_order(
    req: &HttpRequest,
    ticket: &str,
    service: &str,
    purposes: &[Purpose],
) -> Result<TicketClaims, ApiError> {
    let state = state(req)?;
    let now = crate::clock::now_unix();
    let claims = match verify_ticket_signed(&state, ticket, now) {
        // Another replica may have bound or rebound a moment ago: check once more with what is
        // stored.
        Err(e) if e.may_be_stale_binding() && state.reload.catch_up().await => {
            verify_ticket_signed(&state, ticket, now)
        }
        verified => verified,
    }
    .inspect_err(|e| {
        state.metrics.ticket_failures.inc();
        tracing::info!(reason = ?e, "ticket refused");
    })?;
    // Signed by the platform from here on: what it names is recorded even if it is then refused
    // (replayed, wrong purpose or service), and the purpose once the scope holds.
    req.extensions_mut().insert(TicketContext {
        agent_id: claims.aid.clone(),
        proxy_id: claims.pid.clone(),
        service: claims.svc.clone(),
        purpose: None,
    });
    let nonce = claims.nonce.clone().unwrap_or_default();
    // Verified, so `exp <= now + cap`; saturating all the same where a claim meets the clock.
    let until = claims
        .exp
        .unwrap_or(now)
        .max(now)
        .saturating_add(MAX_CLOCK_SKEW_SECS);
    if state
        .replay
        .remember(ReplayKind::Nonce, &nonce, until)
        .await?
        == Seen::Replayed
    {
        state.metrics.replay_refused("nonce");
        tracing::warn!("replayed ticket nonce refused");
        return Err(ApiError::TicketReplayed);
    }
    claims.check_scope(purposes, service).inspect_err(|e| {
        state.metrics.ticket_failures.inc();
        tracing::info!(reason = ?e, "ticket scope refused");
    })?;
    if let Some(context) = req.extensions_mut().get_mut::<TicketContext>() {
        context.purpose = Some(claims.pur.clone());
    }
    Ok(claims)
}

/// Checks a ticket for `service` and one of `purposes` like [`verify_ticket_for`] (binding,
/// scheme, form, signature, payload, expiry, nonce present, lifetime cap, scope), but without using
/// up its nonce: for the keyholder's own `/store` page, which shows a bad link at once and leaves
/// the ticket to the `/v1/store` call the page makes (that call is where the nonce is spent, and
/// where a replayed one is refused).
pub fn check_ticket_unspent(
    state: &AppState,
    ticket: &str,
    service: &str,
    purposes: &[Purpose],
) -> Result<TicketClaims, ApiError> {
    let claims = verify_ticket_signed(state, ticket, crate::clock::now_unix())?;
    claims.check_scope(purposes, service)?;
    Ok(claims)
}

/// The ticket's checks up to its scope, in the binding's scheme: bound, scheme, form, signature,
/// payload, expiry, nonce present, lifetime cap. Platform tickets verify with the HMAC secret,
/// `kh2` tickets with the active platform keys.
fn verify_ticket_signed(
    state: &AppState,
    ticket: &str,
    now: i64,
) -> Result<TicketClaims, ApiError> {
    let binding = state.keys.binding();
    if !binding.bound {
        return Err(ApiError::SetupRequired);
    }
    let max_lifetime = state.keys.settings().max_ticket_lifetime;
    match (binding.scheme, is_kh2_ticket(ticket)) {
        (PlatformScheme::Hmac, false) => {
            verify_ticket(&binding.hmac, ticket, now, max_lifetime).map_err(ApiError::from)
        }
        (PlatformScheme::Ed25519, true) => {
            verify_kh2_ticket(&binding.platform_keys, ticket, now, max_lifetime)
                .map_err(ApiError::from)
        }
        // One scheme per binding: a platform ticket in an asymmetric binding, or a kh2 one in an
        // HMAC binding, is refused before anything else is looked at.
        _ => Err(ApiError::TicketWrongScheme),
    }
}

/// A request body that carries a ticket and the service it is for.
pub trait CarriesTicket {
    /// The ticket text.
    fn ticket(&self) -> Option<&str>;
    /// The service asked for.
    fn service(&self) -> Option<&str>;
}

impl CarriesTicket for CredentialRequest {
    fn ticket(&self) -> Option<&str> {
        self.ticket.as_deref()
    }
    fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }
}

impl CarriesTicket for StoreRequest {
    fn ticket(&self) -> Option<&str> {
        self.ticket.as_deref()
    }
    fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }
}

/// What a ticket-bearing endpoint accepts.
pub trait TicketEndpoint {
    /// The request body (or query) type.
    type Request: CarriesTicket + DeserializeOwned + 'static;
    /// Purposes accepted.
    const PURPOSES: &'static [Purpose];
    /// Whether the platform's own addresses are refused.
    const REFUSE_PLATFORM: bool;
}

/// `/v1/credential`: agents (and the owner's dashboard) fetch a credential.
pub struct CredentialEndpoint;
impl TicketEndpoint for CredentialEndpoint {
    type Request = CredentialRequest;
    const PURPOSES: &'static [Purpose] = &[Purpose::AgentCredential, Purpose::UserReveal];
    const REFUSE_PLATFORM: bool = true;
}

/// `/v1/store`: the owner's browser stores a credential.
pub struct StoreEndpoint;
impl TicketEndpoint for StoreEndpoint {
    type Request = StoreRequest;
    const PURPOSES: &'static [Purpose] = &[Purpose::Store];
    const REFUSE_PLATFORM: bool = true;
}

/// `/v1/totp-code`: a TOTP code instead of the secret.
pub struct TotpEndpoint;
impl TicketEndpoint for TotpEndpoint {
    type Request = CredentialRequest;
    const PURPOSES: &'static [Purpose] = &[
        Purpose::TotpCode,
        Purpose::AgentCredential,
        Purpose::UserReveal,
    ];
    // Keyholder rule: a code is a credential too, so the platform may not fetch it itself.
    const REFUSE_PLATFORM: bool = true;
}

/// A request whose ticket was verified for the endpoint `E` and the service it names.
pub struct Ticketed<E: TicketEndpoint> {
    /// Verified claims.
    pub claims: TicketClaims,
    /// The service (equal to the ticket's `svc`).
    pub service: String,
    /// The request (query or JSON body).
    pub request: E::Request,
}

impl<E: TicketEndpoint + 'static> FromRequest for Ticketed<E> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let mut payload = payload.take();
        Box::pin(async move {
            let state = state(&req)?;
            if E::REFUSE_PLATFORM {
                state.network.refuse_platform(&req)?;
            }
            // Sealed: refuse before the ticket is looked at (its nonce stays unused for a retry).
            ensure_unsealed(&state)?;
            if !state.keys.binding().bound && !state.reload.catch_up().await {
                return Err(ApiError::SetupRequired);
            }
            let request: E::Request = if req.method() == actix_web::http::Method::GET {
                serde_urlencoded_query(req.query_string())?
            } else {
                let body = read_body(&req, &mut payload, body_limit(&req)).await?;
                parse_json(&body)?
            };
            let ticket = request
                .ticket()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| ApiError::InvalidRequest("missing 'ticket'".into()))?;
            let service = request
                .service()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| ApiError::InvalidRequest("missing 'service'".into()))?
                .to_string();
            let claims = verify_ticket_for(&req, ticket, &service, E::PURPOSES).await?;
            Ok(Ticketed {
                claims,
                service,
                request,
            })
        })
    }
}

fn serde_urlencoded_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    if query.len() > 16 * 1024 {
        return Err(ApiError::PayloadTooLarge(16 * 1024));
    }
    actix_web::web::Query::<T>::from_query(query)
        .map(|q| q.into_inner())
        .map_err(|_| ApiError::InvalidRequest("Invalid query string".into()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::body_request_id_matches;

    #[test]
    fn a_body_request_id_must_be_exactly_the_header() {
        let id = "req_1";
        for (body, matches) in [
            (r#"{"requestId":"req_1","operation":"list"}"#, true),
            (
                r#"  {"operation":"list","nested":{"requestId":"other"}}"#,
                true,
            ),
            (r#"{"operation":"list"}"#, true),
            ("", true),
            ("[1,2]", true),
            ("{not json", true),
            (r#"{"requestId":"req_2"}"#, false),
            (r#"{"requestId":"REQ_1"}"#, false),
            (r#"{"requestId":1}"#, false),
            (r#"{"requestId":null}"#, false),
            (r#"{"requestId":["req_1"]}"#, false),
            (r#"{"requestId":"req_1","requestId":"req_2"}"#, false),
            (r#"{"requestId":"req_1","requestId":"req_1"}"#, false),
            (r#"{"requestId":"req_\u0031"}"#, true),
        ] {
            assert_eq!(
                body_request_id_matches(body.as_bytes(), id),
                matches,
                "{body}"
            );
        }
    }
}
