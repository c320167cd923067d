//! The platform side: a webhook handle that signs its calls ([`Platform`]), the bind-code exchange that
//! creates one (HMAC, or asymmetric with the platform's own Ed25519 key), and `/v1/health`. Storage,
//! proxy and refresh calls live in their own files.

use std::sync::Arc;

use keyholder_protocol::paths::{
    HEADER_KEYHOLDER_SIGNATURE, HEADER_PLATFORM_REQUEST_ID, PATH_EXCHANGE, PATH_HEALTH,
};
use keyholder_protocol::request_id::new_request_id;
use keyholder_protocol::wire::{ExchangeRequest, ExchangeResponse, HealthResponse};
use keyholder_protocol::{HmacSecret, IdentityDocument, PlatformSigningKey};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use url::Url;
use zeroize::Zeroizing;

use crate::auth::PlatformAuth;
use crate::builder::ClientBuilder;
use crate::error::Error;
use crate::identity::{IdentityPin, PinnedIdentity};
use crate::retry::Idempotence;
use crate::tickets::TicketIssuer;
use crate::transport::{Outgoing, RawResponse, Transport};

/// What the bind-code exchange told about the webhook.
#[derive(Debug, Clone)]
pub struct ExchangeInfo {
    /// The webhook's id.
    pub webhook_id: String,
    /// Protocol version.
    pub version: String,
    /// Capability names.
    pub capabilities: Vec<String>,
    /// The response-signing identity the webhook announced (Keyholder extension).
    pub signing_key: Option<IdentityDocument>,
}

impl ExchangeInfo {
    /// Whether the exchange listed `capability` (`totp`, `ticketConstraints`, ...).
    pub fn has_capability(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    /// Whether the webhook speaks protocol 2.4.0 (version and the capabilities that come with it).
    pub fn speaks_2_4_0(&self) -> bool {
        self.version == keyholder_protocol::paths::PROTOCOL_VERSION
            && self.has_capability(keyholder_protocol::paths::CAP_TICKET_CONSTRAINTS)
    }
}

/// The platform's handle on one webhook: every call is signed with [`PlatformAuth`], each attempt with a
/// fresh request id and timestamp, retried as the platform does.
///
/// Cheap to clone (shared connection pool).
///
/// ```no_run
/// # async fn demo() -> Result<(), keyholder_client::Error> {
/// use keyholder_client::Platform;
/// use keyholder_protocol::wire::Collection;
///
/// let platform = Platform::bind("https://keyholder.example.org", "3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f").await?;
/// // Save the secret somewhere safe: it is what every later call is signed with.
/// let _secret = platform.auth().hmac_secret();
/// let health = platform.health_signed().await?;
/// let tokens = platform.list_all(Collection::Tokens, Default::default()).await?;
/// println!("{} tokens, {} listed", health.token_count, tokens.len());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Platform {
    pub(crate) transport: Arc<Transport>,
    auth: Arc<PlatformAuth>,
    exchange: Option<Arc<ExchangeInfo>>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("base_url", &self.transport.base().as_str())
            .field("auth", &self.auth)
            .field(
                "pinned",
                &self.transport.pin().map(IdentityPin::expected_key_id),
            )
            .finish()
    }
}

/// The platform's clock: seconds since the Unix epoch (the timestamp of signed requests and tickets).
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Platform {
    /// A platform for an already-bound webhook, with the builder's secure defaults.
    pub fn new(base_url: &str, secret: HmacSecret) -> Result<Self, Error> {
        ClientBuilder::new(base_url).platform(secret)
    }

    /// Bind with a one-time code, with the builder's secure defaults (see [`ClientBuilder::bind`]).
    pub async fn bind(base_url: &str, code: &str) -> Result<Self, Error> {
        ClientBuilder::new(base_url).bind(code).await
    }

    /// Bind asymmetrically with a code from `keyholder bind --platform-key` (see
    /// [`ClientBuilder::bind_with_key`]).
    pub async fn bind_with_key(
        base_url: &str,
        code: &str,
        key: PlatformSigningKey,
    ) -> Result<Self, Error> {
        ClientBuilder::new(base_url).bind_with_key(code, key).await
    }

    /// The same webhook (connection pool, identity pin and exchange info shared) with other
    /// credentials: for example the platform's next Ed25519 key during a rotation.
    pub fn with_auth(&self, auth: impl Into<PlatformAuth>) -> Platform {
        Platform {
            transport: self.transport.clone(),
            auth: Arc::new(auth.into()),
            exchange: self.exchange.clone(),
        }
    }

    pub(crate) fn from_parts(
        transport: Arc<Transport>,
        auth: PlatformAuth,
        exchange: Option<ExchangeInfo>,
    ) -> Self {
        Platform {
            transport,
            auth: Arc::new(auth),
            exchange: exchange.map(Arc::new),
        }
    }

    /// `POST /v1/exchange`; see [`ClientBuilder::bind`]. With `key`, the code must be for an
    /// asymmetric binding (the answer must carry no HMAC secret).
    pub(crate) async fn exchange(
        builder: ClientBuilder,
        code: &str,
        key: Option<PlatformSigningKey>,
    ) -> Result<Self, Error> {
        let transport = builder.transport()?;
        let body = serde_json::to_vec(&ExchangeRequest {
            code: Some(code.to_owned()),
        })
        .map_err(|e| Error::Protocol(format!("exchange request: {e}")))?;
        let resp = transport
            .send(Idempotence::SingleUse, |_| {
                let mut out = Outgoing::new(Method::POST, PATH_EXCHANGE);
                out.body = Some(body.clone());
                Ok(out)
            })
            .await?;
        let mut answer: ExchangeResponse = resp.json()?;
        let secret_b64 = answer.hmac_secret.take().map(Zeroizing::new);
        let auth = match (key, secret_b64) {
            (None, Some(secret_b64)) => PlatformAuth::Hmac(
                HmacSecret::from_base64(&secret_b64).map_err(|e| {
                    Error::Protocol(format!("the exchanged secret is unusable: {e}"))
                })?,
            ),
            (None, None) => {
                return Err(Error::Protocol(
                    "the exchange answer carries no hmacSecret (an asymmetric code: bind with the platform key)"
                        .into(),
                ))
            }
            (Some(key), None) => PlatformAuth::Ed25519(key),
            (Some(_), Some(_)) => {
                return Err(Error::Protocol(
                    "the webhook answered with an HMAC secret: the code was not for an asymmetric binding"
                        .into(),
                ))
            }
        };
        let announced = answer
            .signing_key
            .as_ref()
            .map(PinnedIdentity::from_document)
            .transpose()?;
        let builder = match (builder.pinned(), announced) {
            (Some(pin), Some(announced)) => {
                if pin.expected_key_id() != announced.key_id() {
                    return Err(Error::IdentityMismatch {
                        expected: pin.expected_key_id().to_owned(),
                        found: announced.key_id().to_owned(),
                    });
                }
                builder
            }
            (None, Some(announced)) => {
                // The exchange answer must itself be signed by the identity it announces.
                let (_, path_and_query) = transport.target(PATH_EXCHANGE, &[]);
                announced.verify(
                    resp.header(HEADER_KEYHOLDER_SIGNATURE),
                    "POST",
                    &path_and_query,
                    &resp.request_id,
                    resp.status,
                    &resp.body,
                )?;
                builder.pin_identity(IdentityPin::Key(announced))
            }
            (_, None) => builder,
        };
        let info = ExchangeInfo {
            webhook_id: answer.webhook_id,
            version: answer.version,
            capabilities: answer.capabilities,
            signing_key: answer.signing_key,
        };
        Ok(Platform::from_parts(builder.transport()?, auth, Some(info)))
    }

    /// The webhook's base URL.
    pub fn base_url(&self) -> &Url {
        self.transport.base()
    }

    /// The credentials this platform signs with (to save the secret after an HMAC bind).
    pub fn auth(&self) -> &PlatformAuth {
        &self.auth
    }

    /// What the exchange answered, when this platform was created by [`Platform::bind`].
    pub fn exchange_info(&self) -> Option<&ExchangeInfo> {
        self.exchange.as_deref()
    }

    /// A ticket issuer with this platform's key (subject `platform`, 60 s lifetime; adjust with its setters).
    pub fn ticket_issuer(&self) -> TicketIssuer {
        TicketIssuer::from_auth(self.auth.duplicate())
    }

    /// `GET /v1/health` (public).
    pub async fn health(&self) -> Result<HealthResponse, Error> {
        self.transport
            .send(Idempotence::FreshPerAttempt, |_| {
                Ok(Outgoing::new(Method::GET, PATH_HEALTH))
            })
            .await?
            .json()
    }

    /// `POST /v1/health`, signed: also proves the webhook accepts this platform's signature.
    pub async fn health_signed(&self) -> Result<HealthResponse, Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body {
            request_id: String,
        }
        self.signed(PATH_HEALTH, |request_id| Body {
            request_id: request_id.to_owned(),
        })
        .await
    }

    /// `POST /v1/admin/migrate`, signed (protocol 2.4.0): the webhook seals every stored `totpUri`
    /// link and answers counts only.
    pub async fn admin_migrate(
        &self,
    ) -> Result<keyholder_protocol::wire::TotpMigrationCounts, Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body {
            request_id: String,
        }
        let answer: keyholder_protocol::wire::AdminMigrateResponse = self
            .signed(
                keyholder_protocol::paths::PATH_ADMIN_MIGRATE,
                |request_id| Body {
                    request_id: request_id.to_owned(),
                },
            )
            .await?;
        Ok(answer.totp)
    }

    /// A signed `POST` of `body(request_id)` to `path`, decoded as `R`. Each attempt gets a fresh request
    /// id (header and body) and timestamp.
    pub(crate) async fn signed<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: impl Fn(&str) -> B,
    ) -> Result<R, Error> {
        self.signed_raw(path, body, Idempotence::FreshPerAttempt)
            .await?
            .json()
    }

    /// A signed `POST`, answer read whole and not interpreted.
    pub(crate) async fn signed_raw<B: Serialize>(
        &self,
        path: &str,
        body: impl Fn(&str) -> B,
        idempotence: Idempotence,
    ) -> Result<RawResponse, Error> {
        self.transport
            .send(idempotence, |request_id| {
                let bytes = serde_json::to_vec(&body(request_id))
                    .map_err(|e| Error::Protocol(format!("request body: {e}")))?;
                Ok(self.signed_outgoing(path, bytes, now_unix(), request_id))
            })
            .await
    }

    /// One signed request with every part chosen by the caller (the checker's refusal probes).
    pub(crate) fn signed_outgoing(
        &self,
        path: &str,
        body: Vec<u8>,
        timestamp: i64,
        request_id: &str,
    ) -> Outgoing {
        let (_, path_and_query) = self.transport.target(path, &[]);
        let mut out = Outgoing::new(Method::POST, path);
        out.headers = self
            .auth
            .request_headers("POST", &path_and_query, &body, timestamp)
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        out.headers
            .push((HEADER_PLATFORM_REQUEST_ID.to_owned(), request_id.to_owned()));
        out.body = Some(body);
        out
    }

    /// Send one prepared request once, with a fresh request id unless `out` names one.
    pub(crate) async fn send_once(
        &self,
        out: &Outgoing,
        request_id: Option<&str>,
    ) -> Result<RawResponse, Error> {
        let id = request_id.map_or_else(new_request_id, str::to_owned);
        self.transport.send_once(out, &id).await
    }
}
