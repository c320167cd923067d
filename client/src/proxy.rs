//! `POST /v1/proxy`: the platform asks the webhook to call an upstream API with the stored credential
//! filled into header templates. The answer is the upstream's own status, headers and body.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use keyholder_protocol::paths::{HEADER_UPSTREAM_STATUS, PATH_PROXY};
use keyholder_protocol::wire::{ProxyRequest, UpstreamRequest};
use reqwest::header::HeaderMap;

use crate::error::Error;
use crate::platform::Platform;
use crate::retry::Idempotence;

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

    /// A header template: `${TOKEN}` in `template` is replaced by the credential on the webhook.
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

impl Platform {
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
                |request_id| ProxyRequest {
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
                },
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
