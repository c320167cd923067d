//! The HTTP core shared by every resource: URL building under the base URL, one fresh request id per
//! attempt, the retry loop, reading the answer whole, response-signature verification when an identity is
//! pinned, and the mapping of error answers to [`Error::Api`].
//!
//! **Low-level, for conformance testing.** The public part of this module ([`Outgoing`], [`RawResponse`],
//! [`RawPlatform`], [`RawAgent`]) lets a checker such as the `keyholder-check` crate send requests built
//! exactly as it chooses (a stale timestamp, a forged header, the same signed bytes twice), once, without
//! retries, and read the answer uninterpreted. Applications want the typed calls on
//! [`crate::Platform`] and [`crate::Agent`] instead: nothing here checks that a request makes sense. The
//! traits are sealed (implemented only for [`crate::Platform`] and [`crate::Agent`]) and must be imported
//! to be used, so they stay out of the way of ordinary SDK use.

use std::future::Future;
use std::time::Duration;

use keyholder_protocol::paths::{HEADER_KEYHOLDER_SIGNATURE, HEADER_REQUEST_ID, PATH_IDENTITY};
use keyholder_protocol::request_id::new_request_id;
use keyholder_protocol::response_stream;
use keyholder_protocol::{ErrorBody, IdentityDocument};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;
use url::Url;

use crate::error::Error;
use crate::identity::{IdentityPin, PinnedIdentity};
use crate::retry::{Idempotence, RetryPolicy};

/// One request as the SDK (or the checker) wants it sent.
pub struct Outgoing {
    /// HTTP method.
    pub method: Method,
    /// Path under the base URL, starting with `/`.
    pub path: String,
    /// Query pairs (percent-encoded when sent).
    pub query: Vec<(String, String)>,
    /// JSON body bytes, sent exactly as given.
    pub body: Option<Vec<u8>>,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
}

impl Outgoing {
    /// A request without body, query or extra headers.
    pub fn new(method: Method, path: &str) -> Self {
        Outgoing {
            method,
            path: path.to_owned(),
            query: Vec::new(),
            body: None,
            headers: Vec::new(),
        }
    }
}

/// An answer, read whole.
pub struct RawResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: bytes::Bytes,
    /// The request id this attempt sent.
    pub request_id: String,
}

impl RawResponse {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The decoded wire error body, if the body is one.
    pub fn error_body(&self) -> Option<ErrorBody> {
        serde_json::from_slice(&self.body).ok()
    }

    /// `Error::Api` for a non-2xx answer.
    pub fn api_error(&self) -> Error {
        let (error, message) = match self.error_body() {
            Some(b) => (b.error, b.message),
            None => (format!("http_{}", self.status), String::new()),
        };
        Error::Api {
            status: self.status,
            error,
            message,
            request_id: self.request_id.clone(),
        }
    }

    /// The body as `T` after requiring a 2xx status.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        if !(200..300).contains(&self.status) {
            return Err(self.api_error());
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::decode(self.status, &self.request_id, &e))
    }
}

/// Shared HTTP state of a [`crate::Platform`] or [`crate::Agent`].
pub(crate) struct Transport {
    http: reqwest::Client,
    base: Url,
    timeout: Duration,
    retry: RetryPolicy,
    pin: Option<IdentityPin>,
    resolved: OnceCell<PinnedIdentity>,
}

impl Transport {
    pub fn new(
        http: reqwest::Client,
        base: Url,
        timeout: Duration,
        retry: RetryPolicy,
        pin: Option<IdentityPin>,
    ) -> Self {
        Transport {
            http,
            base,
            timeout,
            retry,
            pin,
            resolved: OnceCell::new(),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The pinned identity, if any.
    pub fn pin(&self) -> Option<&IdentityPin> {
        self.pin.as_ref()
    }

    /// The full URL and the exact path-and-query the server will see (and sign).
    pub fn target(&self, path: &str, query: &[(String, String)]) -> (Url, String) {
        let mut url = self.base.clone();
        let prefix = self.base.path().trim_end_matches('/');
        url.set_path(&format!("{prefix}{path}"));
        url.set_query(None);
        url.set_fragment(None);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let path_and_query = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        (url, path_and_query)
    }

    /// One attempt, without signature verification.
    async fn send_unverified(
        &self,
        out: &Outgoing,
        request_id: &str,
    ) -> Result<(RawResponse, String), Error> {
        let (url, path_and_query) = self.target(&out.path, &out.query);
        let mut req = self
            .http
            .request(out.method.clone(), url)
            .timeout(self.timeout)
            .header(HEADER_REQUEST_ID, request_id);
        for (name, value) in &out.headers {
            req = req.header(name.as_str(), value.as_str());
        }
        if let Some(body) = &out.body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let map_err = |e: reqwest::Error| {
            if e.is_timeout() {
                Error::Timeout {
                    request_id: request_id.to_owned(),
                    after: self.timeout,
                }
            } else {
                Error::Transport {
                    request_id: request_id.to_owned(),
                    source: e.without_url(),
                }
            }
        };
        let resp = req.send().await.map_err(map_err)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(map_err)?;
        Ok((
            RawResponse {
                status,
                headers,
                body,
                request_id: request_id.to_owned(),
            },
            path_and_query,
        ))
    }

    /// One attempt whose answer is read as a stream: the client's timeout covers the answer's head
    /// only (a stream may last longer). Returns the response and the exact target sent.
    pub async fn open_stream(
        &self,
        out: &Outgoing,
        request_id: &str,
    ) -> Result<(reqwest::Response, String), Error> {
        let (url, path_and_query) = self.target(&out.path, &out.query);
        let mut req = self
            .http
            .request(out.method.clone(), url)
            .header(HEADER_REQUEST_ID, request_id);
        for (name, value) in &out.headers {
            req = req.header(name.as_str(), value.as_str());
        }
        if let Some(body) = &out.body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        match tokio::time::timeout(self.timeout, req.send()).await {
            Ok(Ok(resp)) => Ok((resp, path_and_query)),
            Ok(Err(e)) => Err(Error::Transport {
                request_id: request_id.to_owned(),
                source: e.without_url(),
            }),
            Err(_) => Err(Error::Timeout {
                request_id: request_id.to_owned(),
                after: self.timeout,
            }),
        }
    }

    /// One attempt; when an identity is pinned the answer's signature must verify over the request id
    /// and the target this attempt sent.
    pub async fn send_once(&self, out: &Outgoing, request_id: &str) -> Result<RawResponse, Error> {
        let (mut resp, path_and_query) = self.send_unverified(out, request_id).await?;
        let streamed = resp
            .header(HEADER_KEYHOLDER_SIGNATURE)
            .is_some_and(response_stream::is_stream_header);
        if streamed {
            // A streamed answer (a proxied event stream or long body): head signature, body, end
            // frame. Verified when an identity is pinned; the frame never reaches the caller.
            let body = match self.identity().await? {
                Some(identity) => response_stream::verify_stream_whole(
                    identity.public_key(),
                    resp.header(HEADER_KEYHOLDER_SIGNATURE).unwrap_or_default(),
                    out.method.as_str(),
                    &path_and_query,
                    request_id,
                    resp.status,
                    &resp.body,
                )
                .map_err(|reason| Error::ResponseSignature {
                    status: resp.status,
                    request_id: request_id.to_owned(),
                    reason,
                })?,
                None => {
                    let cut = resp
                        .body
                        .len()
                        .saturating_sub(response_stream::END_FRAME_LEN);
                    resp.body[..cut].to_vec()
                }
            };
            resp.body = bytes::Bytes::from(body);
            return Ok(resp);
        }
        if let Some(identity) = self.identity().await? {
            identity.verify(
                resp.header(HEADER_KEYHOLDER_SIGNATURE),
                out.method.as_str(),
                &path_and_query,
                request_id,
                resp.status,
                &resp.body,
            )?;
        }
        Ok(resp)
    }

    /// Attempts under the retry policy; `build` makes each attempt from its fresh request id.
    pub async fn send(
        &self,
        idempotence: Idempotence,
        mut build: impl FnMut(&str) -> Result<Outgoing, Error>,
    ) -> Result<RawResponse, Error> {
        let mut delays = self.retry.delays().iter();
        loop {
            let request_id = new_request_id();
            let out = build(&request_id)?;
            let result = self.send_once(&out, &request_id).await;
            let retry = match (&result, idempotence) {
                (Ok(resp), Idempotence::FreshPerAttempt) => resp.status >= 500,
                (Err(Error::Timeout { .. }), Idempotence::FreshPerAttempt) => true,
                (Err(Error::Transport { .. }), Idempotence::FreshPerAttempt) => true,
                (Err(Error::Transport { source, .. }), Idempotence::SingleUse) => {
                    source.is_connect()
                }
                _ => false,
            };
            match delays.next() {
                Some(delay) if retry => tokio::time::sleep(*delay).await,
                _ => return result,
            }
        }
    }

    /// The identity answers must be signed with: the pinned key, or for a key-id pin the document from
    /// `GET /v1/identity`, fetched once, which must carry the pinned key id and be signed by its own key.
    pub async fn identity(&self) -> Result<Option<&PinnedIdentity>, Error> {
        match &self.pin {
            None => Ok(None),
            Some(IdentityPin::Key(identity)) => Ok(Some(identity)),
            Some(IdentityPin::KeyId(expected)) => self
                .resolved
                .get_or_try_init(|| self.fetch_identity(expected))
                .await
                .map(Some),
        }
    }

    async fn fetch_identity(&self, expected: &str) -> Result<PinnedIdentity, Error> {
        let request_id = new_request_id();
        let out = Outgoing::new(Method::GET, PATH_IDENTITY);
        let (resp, path_and_query) = self.send_unverified(&out, &request_id).await?;
        let doc: IdentityDocument = resp.json()?;
        let identity = PinnedIdentity::from_document(&doc)?;
        if identity.key_id() != expected {
            return Err(Error::IdentityMismatch {
                expected: expected.to_owned(),
                found: identity.key_id().to_owned(),
            });
        }
        identity.verify(
            resp.header(HEADER_KEYHOLDER_SIGNATURE),
            "GET",
            &path_and_query,
            &request_id,
            resp.status,
            &resp.body,
        )?;
        Ok(identity)
    }
}

mod sealed {
    /// Keeps [`super::RawPlatform`] and [`super::RawAgent`] implemented only by this crate.
    pub trait Sealed {}
    impl Sealed for crate::Platform {}
    impl Sealed for crate::Agent {}
}

/// Low-level platform calls for conformance testing (see the [module documentation](self)).
pub trait RawPlatform: sealed::Sealed {
    /// A signed `POST` of `body` to `path` with the caller's timestamp and request id (header
    /// `X-TokenVault-Request-Id`; the body is sent as given and is not checked to carry the same id).
    fn signed_outgoing(
        &self,
        path: &str,
        body: Vec<u8>,
        timestamp: i64,
        request_id: &str,
    ) -> Outgoing;

    /// Send one prepared request once, without retries, with `request_id` as the `X-Request-Id` header
    /// (a fresh one when `None`). When an identity is pinned the answer's signature must verify.
    fn send_once(
        &self,
        out: &Outgoing,
        request_id: Option<&str>,
    ) -> impl Future<Output = Result<RawResponse, Error>> + Send;

    /// The full URL of `path` and `query` under the base URL, and the exact path-and-query the webhook
    /// sees (what request signatures cover).
    fn target(&self, path: &str, query: &[(String, String)]) -> (Url, String);

    /// The identity answers must be signed with, if one is pinned (after a bind: the one the exchange
    /// announced).
    fn pin(&self) -> Option<&IdentityPin>;
}

impl RawPlatform for crate::Platform {
    fn signed_outgoing(
        &self,
        path: &str,
        body: Vec<u8>,
        timestamp: i64,
        request_id: &str,
    ) -> Outgoing {
        crate::Platform::signed_outgoing(self, path, body, timestamp, request_id)
    }

    fn send_once(
        &self,
        out: &Outgoing,
        request_id: Option<&str>,
    ) -> impl Future<Output = Result<RawResponse, Error>> + Send {
        crate::Platform::send_once(self, out, request_id)
    }

    fn target(&self, path: &str, query: &[(String, String)]) -> (Url, String) {
        self.transport.target(path, query)
    }

    fn pin(&self) -> Option<&IdentityPin> {
        self.transport.pin()
    }
}

/// Low-level agent calls for conformance testing (see the [module documentation](self)).
pub trait RawAgent: sealed::Sealed {
    /// Send one prepared request once, without retries, with a fresh request id. When an identity is
    /// pinned the answer's signature must verify.
    fn send_once(&self, out: &Outgoing) -> impl Future<Output = Result<RawResponse, Error>> + Send;
}

impl RawAgent for crate::Agent {
    fn send_once(&self, out: &Outgoing) -> impl Future<Output = Result<RawResponse, Error>> + Send {
        crate::Agent::send_once(self, out)
    }
}
