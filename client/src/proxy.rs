//! `POST /v1/proxy`: the platform asks the webhook to call an upstream API with the stored credential
//! filled into header templates. The answer is the upstream's own status, headers and body.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use keyholder_protocol::paths::{HEADER_KEYHOLDER_SIGNATURE, HEADER_UPSTREAM_STATUS, PATH_PROXY};
use keyholder_protocol::request_id::new_request_id;
use keyholder_protocol::response_stream::{self, StreamVerifier};
use keyholder_protocol::wire::{ProxyRequest, UpstreamRequest};
use reqwest::header::HeaderMap;

use crate::error::Error;
use crate::platform::{now_unix, Platform};
use crate::retry::Idempotence;

/// Replaced by the credential (or a token minted or exchanged with it) in header templates.
pub const TOKEN_PLACEHOLDER: &str = "${TOKEN}";
/// Replaced by a fresh JWT assertion in header templates (Keyholder: the owner's `sign-config`
/// template, signed with the credential's `privateKeyData`).
pub const JWT_PLACEHOLDER: &str = "${JWT}";

/// One proxied upstream call.
///
/// ```
/// use keyholder_client::ProxyCall;
/// let call = ProxyCall::new("https://api.github.com/user")
///     .method("GET")
///     .header("Accept", "application/json")
///     .template("Authorization", "Bearer ${TOKEN}");
/// assert_eq!(call.url(), "https://api.github.com/user");
/// ```
#[derive(Debug, Clone, Default)]
pub struct ProxyCall {
    url: String,
    method: Option<String>,
    headers: BTreeMap<String, String>,
    body: Option<Vec<u8>>,
    templates: BTreeMap<String, String>,
}

impl ProxyCall {
    /// A `GET` of `url`.
    pub fn new(url: impl Into<String>) -> Self {
        ProxyCall {
            url: url.into(),
            ..ProxyCall::default()
        }
    }

    /// The upstream URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The HTTP method (default `GET`).
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.method = Some(method.into());
        self
    }

    /// An extra upstream header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The upstream body (sent base64-encoded).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// A header template: `${TOKEN}` ([`TOKEN_PLACEHOLDER`]) in `template` is replaced by the
    /// credential on the webhook, and on a Keyholder `${JWT}` ([`JWT_PLACEHOLDER`]) by a fresh JWT
    /// signed with the credential's key from the owner's template. An AWS key needs no template:
    /// the request itself is signed (SigV4).
    pub fn template(mut self, header: impl Into<String>, template: impl Into<String>) -> Self {
        self.templates.insert(header.into(), template.into());
        self
    }
}

/// The upstream's answer as the webhook relayed it.
#[derive(Debug)]
pub struct ProxyResponse {
    /// The upstream status.
    pub status: u16,
    /// The upstream headers (hop-by-hop ones removed by the webhook) plus `X-Upstream-Status`.
    pub headers: HeaderMap,
    /// The upstream body.
    pub body: bytes::Bytes,
}

/// A proxied answer read as it arrives ([`Platform::proxy_stream`]): the head is verified before
/// this is returned, the body chunk by chunk, its end frame at the end.
pub struct ProxyStream {
    /// The upstream status.
    pub status: u16,
    /// The upstream headers (hop-by-hop ones removed by the webhook) plus `X-Upstream-Status`.
    pub headers: HeaderMap,
    request_id: String,
    body: StreamBody,
}

enum StreamBody {
    /// A short answer, verified whole (the plain signature form); handed out once.
    Whole(Option<bytes::Bytes>),
    /// A streamed answer: the verifier when an identity is pinned.
    Streamed {
        response: reqwest::Response,
        verifier: Option<Box<StreamVerifier>>,
        held: Vec<u8>,
        done: bool,
    },
}

impl ProxyStream {
    /// The request id the answer is signed for.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The next body bytes as they arrive; `Ok(None)` once the whole body verified. A truncated
    /// or altered stream ends in [`Error::ResponseSignature`]: bytes handed out before stay
    /// provisional until this returns `Ok(None)`.
    pub async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, Error> {
        let (status, request_id) = (self.status, self.request_id.clone());
        match &mut self.body {
            StreamBody::Whole(body) => Ok(body.take()),
            StreamBody::Streamed {
                response,
                verifier,
                held,
                done,
            } => loop {
                if *done {
                    return Ok(None);
                }
                let chunk = response.chunk().await.map_err(|e| Error::Transport {
                    request_id: request_id.clone(),
                    source: e.without_url(),
                });
                let mut out = Vec::new();
                match chunk {
                    Ok(Some(chunk)) => match verifier.as_mut() {
                        Some(v) => v.push(&chunk, &mut out),
                        None => {
                            held.extend_from_slice(&chunk);
                            let release = response_stream::releasable(held);
                            out.extend(held.drain(..release));
                        }
                    },
                    Ok(None) | Err(_) => {
                        *done = true;
                        if let Some(v) = verifier.take() {
                            v.finish().map_err(|reason| Error::ResponseSignature {
                                status,
                                request_id: request_id.clone(),
                                reason,
                            })?;
                        }
                        chunk?;
                    }
                }
                if !out.is_empty() {
                    return Ok(Some(bytes::Bytes::from(out)));
                }
            },
        }
    }
}

impl Platform {
    /// `POST /v1/proxy` like [`Platform::proxy`], the answer read as it arrives (an MCP event
    /// stream, a long download): the head comes back as soon as the webhook sends it, verified
    /// when an identity is pinned; [`ProxyStream::next_chunk`] verifies the body incrementally.
    /// Sent once (the ticket is single use); the client timeout covers the head only.
    pub async fn proxy_stream(
        &self,
        ticket: &str,
        service: &str,
        call: &ProxyCall,
    ) -> Result<ProxyStream, Error> {
        let request_id = new_request_id();
        let body = serde_json::to_vec(&proxy_request(ticket, service, call, &request_id))
            .map_err(|e| Error::Protocol(format!("request body: {e}")))?;
        let out = self.signed_outgoing(PATH_PROXY, body, now_unix(), &request_id);
        let transport = &self.transport;
        let (response, path_and_query) = transport.open_stream(&out, &request_id).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let signature = headers
            .get(HEADER_KEYHOLDER_SIGNATURE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let identity = transport.identity().await?;
        let streamed = signature
            .as_deref()
            .is_some_and(response_stream::is_stream_header);
        if !streamed {
            // A short answer or the webhook's own refusal: read and verified whole.
            let body = response.bytes().await.map_err(|e| Error::Transport {
                request_id: request_id.clone(),
                source: e.without_url(),
            })?;
            if let Some(identity) = identity {
                identity.verify(
                    signature.as_deref(),
                    "POST",
                    &path_and_query,
                    &request_id,
                    status,
                    &body,
                )?;
            }
            let raw = crate::transport::RawResponse {
                status,
                headers: headers.clone(),
                body: body.clone(),
                request_id: request_id.clone(),
            };
            if raw.header(HEADER_UPSTREAM_STATUS).is_none() && !(200..300).contains(&status) {
                return Err(raw.api_error());
            }
            return Ok(ProxyStream {
                status,
                headers,
                request_id,
                body: StreamBody::Whole(Some(body)),
            });
        }
        let verifier = match identity {
            Some(identity) => Some(Box::new(
                StreamVerifier::new(
                    identity.public_key(),
                    signature.as_deref().unwrap_or_default(),
                    "POST",
                    &path_and_query,
                    &request_id,
                    status,
                )
                .map_err(|reason| Error::ResponseSignature {
                    status,
                    request_id: request_id.clone(),
                    reason,
                })?,
            )),
            None => None,
        };
        Ok(ProxyStream {
            status,
            headers,
            request_id,
            body: StreamBody::Streamed {
                response,
                verifier,
                held: Vec::new(),
                done: false,
            },
        })
    }

    /// `POST /v1/proxy` with a `proxy` ticket for `service`.
    ///
    /// An answer with `X-Upstream-Status` is the upstream's, whatever its status; any other non-2xx answer
    /// is the webhook's own refusal and becomes [`Error::Api`]. The ticket is single use, so the call is
    /// retried only when the connection failed before anything was sent.
    pub async fn proxy(
        &self,
        ticket: &str,
        service: &str,
        call: &ProxyCall,
    ) -> Result<ProxyResponse, Error> {
        let resp = self
            .signed_raw(
                PATH_PROXY,
                |request_id| proxy_request(ticket, service, call, request_id),
                Idempotence::SingleUse,
            )
            .await?;
        let from_upstream = resp.header(HEADER_UPSTREAM_STATUS).is_some();
        if !from_upstream && !(200..300).contains(&resp.status) {
            return Err(resp.api_error());
        }
        Ok(ProxyResponse {
            status: resp.status,
            headers: resp.headers,
            body: resp.body,
        })
    }
}

fn proxy_request(ticket: &str, service: &str, call: &ProxyCall, request_id: &str) -> ProxyRequest {
    ProxyRequest {
        ticket: Some(ticket.to_owned()),
        service: Some(service.to_owned()),
        upstream: Some(UpstreamRequest {
            url: Some(call.url.clone()),
            method: call.method.clone(),
            headers: (!call.headers.is_empty()).then(|| call.headers.clone()),
            body: call.body.as_ref().map(|b| STANDARD.encode(b)),
        }),
        header_templates: (!call.templates.is_empty()).then(|| call.templates.clone()),
        request_id: Some(request_id.to_owned()),
    }
}
