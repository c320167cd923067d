//! The outbound side: one pooled HTTP client built at start, behind the SSRF guard, used for proxied
//! upstream calls and for OAuth and token-minting endpoints. Token-endpoint bodies are read whole
//! with a size cap; proxied answers come back as a head and a body stream ([`StreamedResponse`])
//! under the stream time limits (connect, head, idle between chunks, optional whole-stream cap).

pub mod guard;
pub mod mtls;
pub mod origin;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use url::Url;

pub use guard::{EgressGuard, EgressRefused};
pub use origin::Origin;

use crate::metrics::Metrics;

/// Default connect timeout of every outbound call.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A proxied answer with a known length up to this many bytes is read whole and signed as today
/// (one signature over its body); longer, unknown-length and event-stream answers are streamed.
pub const BUFFERED_ANSWER_MAX: u64 = 64 * 1024;
/// Largest token-endpoint answer read (OAuth and minting).
pub const PROVIDER_MAX_RESPONSE: usize = 256 * 1024;

/// Why an outbound call failed. Logged in full on the server; the caller gets a fixed code.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The SSRF guard refused the destination (nothing was sent).
    #[error(transparent)]
    Refused(#[from] EgressRefused),
    /// The call did not complete within its total timeout.
    #[error("timed out")]
    Timeout,
    /// Connection, TLS or protocol failure.
    #[error("request failed: {0}")]
    Failed(String),
    /// The answer's body exceeds the cap.
    #[error("response body larger than {0} bytes")]
    TooLarge(usize),
}

impl UpstreamError {
    /// True when nothing reached the destination's HTTP layer, so no answer exists.
    pub fn refused(&self) -> bool {
        matches!(self, UpstreamError::Refused(_))
    }
}

/// An outbound request, already validated and filled in.
pub struct OutboundRequest {
    /// Method.
    pub method: Method,
    /// Destination (checked by the guard before sending).
    pub url: Url,
    /// Headers to send (hop-by-hop ones already removed).
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Option<Bytes>,
}

/// A complete answer, body read up to the cap.
pub struct UpstreamResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers as received.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// The head of a proxied answer and its body, still arriving.
pub struct StreamedResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers as received.
    pub headers: HeaderMap,
    /// The body.
    pub body: UpstreamBody,
}

/// A proxied answer's body as it arrives: whole when short ([`BUFFERED_ANSWER_MAX`]), otherwise
/// a stream that yields chunks under the idle and whole-stream limits.
pub enum UpstreamBody {
    /// Read whole (short, known length, not an event stream).
    Whole(Bytes),
    /// Still arriving.
    Stream(BodyStream),
}

/// The body of a streamed answer. Dropping it drops the upstream response, which closes (or
/// cancels, on HTTP/2) the upstream request: a platform that goes away ends the upstream call.
pub struct BodyStream {
    response: reqwest::Response,
    idle: Duration,
    deadline: Option<tokio::time::Instant>,
    metrics: Option<Arc<Metrics>>,
}

impl BodyStream {
    /// The next chunk, `None` at the end. `Timeout` when the upstream sent nothing for the idle
    /// time or the stream reached its maximum duration.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let idle = tokio::time::Instant::now() + self.idle;
        let until = match self.deadline {
            Some(deadline) => deadline.min(idle),
            None => idle,
        };
        let chunk = match tokio::time::timeout_at(until, self.response.chunk()).await {
            Ok(chunk) => chunk.map_err(map_error),
            Err(_) => Err(UpstreamError::Timeout),
        };
        if let (Err(_), Some(metrics)) = (&chunk, &self.metrics) {
            // A stream that fails after its head is a failed call too.
            metrics.upstream_errors.inc();
        }
        chunk
    }
}

/// The time limits of proxied calls.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Until the TCP (and TLS) connection is up.
    pub connect: Duration,
    /// From sending the request until the answer's status and headers.
    pub head: Duration,
    /// Longest pause between two body chunks.
    pub idle: Duration,
    /// Longest whole answer (head and body), if any.
    pub max_stream: Option<Duration>,
}

/// Settings of the outbound side, fixed at start.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamSettings {
    /// The SSRF guard.
    pub guard: EgressGuard,
    /// Time limits of proxied calls.
    pub proxy: StreamLimits,
    /// Total time for one OAuth or minting call.
    pub provider_timeout: Duration,
}

/// The outbound client: one pooled `reqwest` client per thread, each built once. A connection is
/// driven by the runtime that opened it, so one client shared by the actix workers (each its own
/// runtime) would hand most calls over to another thread and back.
pub struct Upstream {
    clients: thread_local::ThreadLocal<reqwest::Client>,
    settings: UpstreamSettings,
    metrics: Option<Arc<Metrics>>,
    /// Clients of credentials that present a TLS client certificate (one each, own pools).
    identities: mtls::IdentityClients,
}

impl Upstream {
    /// Checks the settings by building this thread's client: guarded resolver, no system proxy,
    /// no redirects, keep-alive, connect timeout, https only unless private egress is allowed.
    pub fn new(settings: UpstreamSettings) -> Result<Upstream, UpstreamError> {
        let upstream = Upstream {
            clients: thread_local::ThreadLocal::new(),
            settings,
            metrics: None,
            identities: mtls::IdentityClients::default(),
        };
        upstream.client()?;
        Ok(upstream)
    }

    /// Counts every call in `metrics`: `upstream_errors_total` for a call that failed (connection,
    /// TLS, timeout, too large, a stream cut after its head) or was answered with a 5xx, and
    /// `upstream_duration_seconds` for the time until the answer (its head, for a streamed one)
    /// or the failure. A destination the guard refuses was never called and is not counted.
    pub fn observed(mut self, metrics: Arc<Metrics>) -> Upstream {
        self.metrics = Some(metrics);
        self
    }

    fn observe<T>(
        &self,
        started: tokio::time::Instant,
        result: &Result<T, UpstreamError>,
        status: impl FnOnce(&T) -> StatusCode,
    ) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        let failed = match result {
            Err(err) if err.refused() => return,
            Err(_) => true,
            Ok(answer) => status(answer).is_server_error(),
        };
        if failed {
            metrics.upstream_errors.inc();
        }
        metrics.observe_upstream(started.elapsed());
    }

    /// Builds the calling thread's client now (each server worker at start), not on a first call.
    pub fn warm(&self) {
        if let Err(err) = self.client() {
            tracing::error!(error = %err, "cannot build the outbound HTTP client");
        }
    }

    fn client(&self) -> Result<&reqwest::Client, UpstreamError> {
        self.clients.get_or_try(|| build_client(&self.settings))
    }

    /// The settings in force.
    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    /// Checks a URL against the guard (scheme, IP literal) without sending anything.
    pub fn check_url(&self, url: &Url) -> Result<(), UpstreamError> {
        self.settings.guard.check_url(url).map_err(Into::into)
    }

    /// A proxied call: waits for the answer's head (head timeout), then reads the body whole when
    /// it is short and has a known length, or hands it back as a stream. A call whose request may
    /// have reached the upstream is never sent twice (see [`may_send_again`]).
    pub async fn send_streaming(
        &self,
        request: OutboundRequest,
    ) -> Result<StreamedResponse, UpstreamError> {
        let started = tokio::time::Instant::now();
        let mut result = self.stream_call(request).await;
        self.observe(started, &result, |answer| answer.status);
        if let Ok(StreamedResponse {
            body: UpstreamBody::Stream(stream),
            ..
        }) = &mut result
        {
            stream.metrics = self.metrics.clone();
        }
        result
    }

    async fn stream_call(
        &self,
        request: OutboundRequest,
    ) -> Result<StreamedResponse, UpstreamError> {
        self.check_url(&request.url)?;
        let client = self.client()?;
        self.stream_on(client, request).await
    }

    /// [`Upstream::send_streaming`] presenting a credential's TLS client certificate, on that
    /// credential's own client (and connection pool).
    pub async fn send_streaming_as(
        &self,
        request: OutboundRequest,
        identity: &mtls::ClientIdentity,
    ) -> Result<StreamedResponse, UpstreamError> {
        self.check_url(&request.url)?;
        let client = self.identities.get(&self.settings, identity)?;
        self.stream_on(&client, request).await
    }

    async fn stream_on(
        &self,
        client: &reqwest::Client,
        request: OutboundRequest,
    ) -> Result<StreamedResponse, UpstreamError> {
        let limits = self.settings.proxy;
        let started = tokio::time::Instant::now();
        let deadline = limits.max_stream.map(|max| started + max);
        let head_by = match deadline {
            Some(deadline) => deadline.min(started + limits.head),
            None => started + limits.head,
        };
        let build = |request: OutboundRequest| {
            let builder = client
                .request(request.method, request.url)
                .headers(request.headers);
            match request.body {
                Some(body) => builder.body(body),
                None => builder,
            }
        };
        // A copy for the one re-send only where one is allowed (idempotent methods): the others
        // go without copying the URL and the header map.
        let again = idempotent(&request.method).then(|| OutboundRequest {
            method: request.method.clone(),
            url: request.url.clone(),
            headers: request.headers.clone(),
            body: request.body.clone(),
        });
        let method = request.method.clone();
        let head = async {
            match build(request).send().await {
                Ok(response) => Ok(response),
                Err(err) if may_send_again(&method, &err) => match again {
                    Some(again) => {
                        tracing::debug!(error = %err.without_url(), "upstream connection failed before an answer; sending once more");
                        build(again).send().await.map_err(map_error)
                    }
                    None => Err(map_error(err)),
                },
                Err(err) => Err(map_error(err)),
            }
        };
        let mut response = match tokio::time::timeout_at(head_by, head).await {
            Ok(result) => result?,
            Err(_) => return Err(UpstreamError::Timeout),
        };
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let event_stream = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("text/event-stream")
            });
        let short = response
            .content_length()
            .is_some_and(|len| len <= BUFFERED_ANSWER_MAX);
        let mut stream = BodyStream {
            response,
            idle: limits.idle,
            deadline,
            metrics: None,
        };
        if short && !event_stream {
            let mut body = BytesMut::new();
            while let Some(chunk) = stream.next_chunk().await? {
                if (body.len() + chunk.len()) as u64 > BUFFERED_ANSWER_MAX {
                    return Err(UpstreamError::TooLarge(BUFFERED_ANSWER_MAX as usize));
                }
                body.extend_from_slice(&chunk);
            }
            return Ok(StreamedResponse {
                status,
                headers,
                body: UpstreamBody::Whole(body.freeze()),
            });
        }
        Ok(StreamedResponse {
            status,
            headers,
            body: UpstreamBody::Stream(stream),
        })
    }

    /// A token-endpoint call: the provider timeout and a small body cap.
    pub async fn send_provider(
        &self,
        request: OutboundRequest,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let started = tokio::time::Instant::now();
        let result = self
            .execute(
                request,
                self.settings.provider_timeout,
                PROVIDER_MAX_RESPONSE,
            )
            .await;
        self.observe(started, &result, |answer| answer.status);
        result
    }

    async fn execute(
        &self,
        request: OutboundRequest,
        timeout: Duration,
        cap: usize,
    ) -> Result<UpstreamResponse, UpstreamError> {
        self.check_url(&request.url)?;
        let client = self.client()?;
        let build = |request: &OutboundRequest| {
            let builder = client
                .request(request.method.clone(), request.url.clone())
                .headers(request.headers.clone())
                .timeout(timeout);
            match request.body.clone() {
                Some(body) => builder.body(body),
                None => builder,
            }
        };
        let call = async move {
            let mut response = match build(&request).send().await {
                Ok(response) => response,
                Err(err) if may_send_again(&request.method, &err) => {
                    tracing::debug!(error = %err.without_url(), "upstream connection failed before an answer; sending once more");
                    build(&request).send().await.map_err(map_error)?
                }
                Err(err) => return Err(map_error(err)),
            };
            let status = response.status();
            let headers = std::mem::take(response.headers_mut());
            if response
                .content_length()
                .is_some_and(|len| len > cap as u64)
            {
                return Err(UpstreamError::TooLarge(cap));
            }
            let mut body = BytesMut::new();
            while let Some(chunk) = response.chunk().await.map_err(map_error)? {
                if body.len() + chunk.len() > cap {
                    return Err(UpstreamError::TooLarge(cap));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(UpstreamResponse {
                status,
                headers,
                body: body.freeze(),
            })
        };
        // reqwest's own timeout covers the body too; this one is the backstop for the whole call.
        match tokio::time::timeout(timeout + Duration::from_millis(250), call).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout),
        }
    }
}

fn build_client(settings: &UpstreamSettings) -> Result<reqwest::Client, UpstreamError> {
    build_client_with(settings, None, Vec::new())
}

/// The outbound client, optionally presenting a TLS client identity and trusting further roots.
fn build_client_with(
    settings: &UpstreamSettings,
    identity: Option<reqwest::Identity>,
    roots: Vec<reqwest::Certificate>,
) -> Result<reqwest::Client, UpstreamError> {
    let mut builder = reqwest::Client::builder();
    if let Some(identity) = identity {
        builder = builder.identity(identity);
    }
    for root in roots {
        builder = builder.add_root_certificate(root);
    }
    builder
        .dns_resolver(settings.guard.resolver())
        // A proxy from the environment would receive every request: never use one.
        .no_proxy()
        // A redirect would skip the egress policy: the platform gets the 3xx as it is.
        .redirect(reqwest::redirect::Policy::none())
        .https_only(!settings.guard.allow_private)
        .connect_timeout(settings.proxy.connect)
        .pool_idle_timeout(Duration::from_secs(90))
        // Enough idle connections for a worker's concurrent calls to one upstream: a smaller pool
        // closes connections after every burst and opens new ones (handshake, task) on the next.
        .pool_max_idle_per_host(256)
        .tcp_keepalive(Duration::from_secs(60))
        .tcp_nodelay(true)
        .user_agent(concat!("keyholder/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| UpstreamError::Failed(format!("cannot build the HTTP client: {e}")))
}

/// A server may close an idle keep-alive connection just as the client reuses it: the request then
/// fails before any answer, though nothing is wrong. RFC 9112 9.3.1 lets a client send an
/// idempotent request again in that case (and forbids it for others, which may have been applied:
/// a POST gets the 502 and the caller decides). Not after a timeout, a refused address or a failed
/// connect, which a second try would only repeat.
fn may_send_again(method: &reqwest::Method, err: &reqwest::Error) -> bool {
    idempotent(method)
        && err.is_request()
        && !err.is_timeout()
        && !err.is_connect()
        && guard::find_refusal(err).is_none()
}

/// RFC 9110 9.2.2.
fn idempotent(method: &reqwest::Method) -> bool {
    use reqwest::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(method)
}

fn map_error(err: reqwest::Error) -> UpstreamError {
    if let Some(refused) = guard::find_refusal(&err) {
        return UpstreamError::Refused(refused);
    }
    if err.is_timeout() {
        return UpstreamError::Timeout;
    }
    // The URL may carry query parameters of the platform's: keep it out of the text.
    let err = err.without_url();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    UpstreamError::Failed(text)
}

/// Hop-by-hop headers (RFC 9110 7.6.1 and the legacy ones), never forwarded either way.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, those the `Connection` header names, and the framing headers the
/// client recomputes (`Host`, `Content-Length`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(reqwest::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    headers.remove(reqwest::header::HOST);
    headers.remove(reqwest::header::CONTENT_LENGTH);
}

/// A header value that HTTP/2 must never index (it carries a credential).
pub fn sensitive_value(text: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(text).ok()?;
    value.set_sensitive(true);
    Some(value)
}
