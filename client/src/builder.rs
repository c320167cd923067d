//! The client builder: secure defaults (https only, timeouts, no redirects followed, the platform's retry
//! policy), every opt-out named `danger_*`, and the constructors of [`Platform`] and [`Agent`].

use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::agent::Agent;
use crate::auth::PlatformAuth;
use crate::error::Error;
use crate::identity::IdentityPin;
use crate::platform::Platform;
use crate::retry::RetryPolicy;
use crate::transport::Transport;

/// Default time for a whole request, answer included. Longer than the webhook's 30 s upstream timeout, so
/// that a proxied call's own `504 upstream_timeout` reaches the caller.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(35);
/// Default time to establish a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a [`Platform`] or an [`Agent`] for one webhook base URL.
///
/// ```
/// use std::time::Duration;
/// use keyholder_client::{ClientBuilder, RetryPolicy};
/// use keyholder_protocol::HmacSecret;
///
/// let platform = ClientBuilder::new("https://keyholder.example.org")
///     .timeout(Duration::from_secs(10))
///     .retry(RetryPolicy::none())
///     .platform(HmacSecret::generate())
///     .unwrap();
/// assert_eq!(platform.base_url().as_str(), "https://keyholder.example.org/");
///
/// // Plain http is refused unless explicitly allowed.
/// assert!(ClientBuilder::new("http://127.0.0.1:8080").agent().is_err());
/// assert!(ClientBuilder::new("http://127.0.0.1:8080").danger_allow_http().agent().is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    base_url: String,
    timeout: Duration,
    connect_timeout: Duration,
    retry: RetryPolicy,
    pin: Option<IdentityPin>,
    allow_http: bool,
    user_agent: String,
}

impl ClientBuilder {
    /// A builder for the webhook at `base_url` (its public URL, e.g. `https://keyholder.example.org`).
    pub fn new(base_url: impl Into<String>) -> Self {
        ClientBuilder {
            base_url: base_url.into(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retry: RetryPolicy::platform(),
            pin: None,
            allow_http: false,
            user_agent: format!("keyholder-client/{}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// Time for a whole attempt (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Time to connect (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The retry policy (default [`RetryPolicy::platform`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Pin the keyholder's identity: every answer's `X-Keyholder-Signature` must then verify.
    pub fn pin_identity(mut self, pin: IdentityPin) -> Self {
        self.pin = Some(pin);
        self
    }

    /// The `User-Agent` header.
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// Allow plain `http://` URLs. Tickets, secrets and credentials then cross the network in clear text:
    /// for loopback tests only.
    pub fn danger_allow_http(mut self) -> Self {
        self.allow_http = true;
        self
    }

    /// The configured pin.
    pub(crate) fn pinned(&self) -> Option<&IdentityPin> {
        self.pin.as_ref()
    }

    pub(crate) fn transport(&self) -> Result<Arc<Transport>, Error> {
        let base = Url::parse(&self.base_url)
            .map_err(|e| Error::Config(format!("base URL does not parse: {e}")))?;
        match base.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(Error::Config(
                    "plain http is refused; use https (or danger_allow_http() for loopback tests)"
                        .into(),
                ))
            }
            other => return Err(Error::Config(format!("unsupported URL scheme {other:?}"))),
        }
        if base.query().is_some() || base.fragment().is_some() || !base.username().is_empty() {
            return Err(Error::Config(
                "the base URL must not carry a query, fragment or user info".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .https_only(!self.allow_http)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(self.connect_timeout)
            // The request timeout is set per request (a streamed proxy answer's covers its head
            // only), never client-wide.
            .user_agent(self.user_agent.clone())
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Arc::new(Transport::new(
            http,
            base,
            self.timeout,
            self.retry.clone(),
            self.pin.clone(),
        )))
    }

    /// A [`Platform`] that signs with `auth` (an [`keyholder_protocol::HmacSecret`] or a
    /// [`keyholder_protocol::PlatformSigningKey`] converts).
    pub fn platform(self, auth: impl Into<PlatformAuth>) -> Result<Platform, Error> {
        Ok(Platform::from_parts(self.transport()?, auth.into(), None))
    }

    /// Bind with a one-time code (`POST /v1/exchange`) and return the [`Platform`] holding the secret.
    ///
    /// When the exchange announces a signing identity, it must match the pinned one; with no pin, the
    /// announced identity is pinned from then on (trust on first use).
    pub async fn bind(self, code: &str) -> Result<Platform, Error> {
        Platform::exchange(self, code, None).await
    }

    /// Bind asymmetrically with a code from `keyholder bind --platform-key FILE` (the file holding
    /// `key`'s public key). The exchange hands out no secret; the returned [`Platform`] signs every call
    /// with an Ed25519 envelope and mints `kh2` tickets. Identity pinning works as for [`Self::bind`].
    pub async fn bind_with_key(
        self,
        code: &str,
        key: keyholder_protocol::PlatformSigningKey,
    ) -> Result<Platform, Error> {
        Platform::exchange(self, code, Some(key)).await
    }

    /// An [`Agent`] (credential fetch, browser store, TOTP).
    pub fn agent(self) -> Result<Agent, Error> {
        Ok(Agent::from_transport(self.transport()?))
    }
}
