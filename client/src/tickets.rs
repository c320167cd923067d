//! Minting tickets (PROTOCOL.md §2.2) for every purpose, each with a fresh random nonce and a bounded
//! lifetime, encoded and signed by `keyholder_protocol::ticket` (HMAC platform tickets) or
//! `keyholder_protocol::ticket_kh2` (`kh2` tickets of an asymmetric binding).

use std::fmt;
use std::time::Duration;

use keyholder_protocol::ticket::encode_ticket;
use keyholder_protocol::ticket_kh2::encode_kh2_ticket;
use keyholder_protocol::{HmacSecret, Purpose, TicketClaims};

use crate::auth::PlatformAuth;
use crate::platform::now_unix;

/// Default ticket lifetime.
pub const DEFAULT_TICKET_LIFETIME: Duration = Duration::from_secs(60);

/// A minted ticket: a single-use bearer secret. `Debug` shows the claims' scope, never the text.
pub struct Ticket {
    text: zeroize::Zeroizing<String>,
    claims: TicketClaims,
}

impl Ticket {
    /// The ticket text, to send.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The claims it carries.
    pub fn claims(&self) -> &TicketClaims {
        &self.claims
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("svc", &self.claims.svc)
            .field("pur", &self.claims.pur)
            .field("exp", &self.claims.exp)
            .finish_non_exhaustive()
    }
}

/// Store mode of a `store` ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// Refuse to replace an existing token (`409 already_exists`).
    Create,
    /// Replace an existing token.
    Overwrite,
}

/// Mints tickets the way the platform does.
///
/// ```
/// use std::time::Duration;
/// use keyholder_client::TicketIssuer;
/// use keyholder_protocol::ticket::verify_ticket;
/// use keyholder_protocol::{HmacSecret, Purpose};
///
/// let secret = HmacSecret::from_bytes([7u8; 32]);
/// let issuer = TicketIssuer::new(HmacSecret::from_bytes([7u8; 32]))
///     .subject("user_42")
///     .lifetime(Duration::from_secs(30));
/// let ticket = issuer.ticket(Purpose::AgentCredential, "github").agent_id("agent_7").mint();
/// let now = ticket.claims().iat.unwrap();
/// let claims = verify_ticket(&secret, ticket.expose(), now, 3600).unwrap();
/// assert_eq!(claims.svc, "github");
/// assert_eq!(claims.exp, Some(now + 30));
/// assert_eq!(claims.aid.as_deref(), Some("agent_7"));
/// // Every ticket has its own nonce.
/// assert_ne!(issuer.credential("github").claims().nonce, ticket.claims().nonce);
/// ```
pub struct TicketIssuer {
    auth: PlatformAuth,
    subject: String,
    lifetime: Duration,
}

impl fmt::Debug for TicketIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketIssuer")
            .field("auth", &self.auth)
            .field("subject", &self.subject)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl TicketIssuer {
    /// An issuer signing with the webhook's HMAC secret (subject `platform`, lifetime 60 s).
    pub fn new(secret: HmacSecret) -> Self {
        TicketIssuer::from_auth(PlatformAuth::Hmac(secret))
    }

    /// An issuer for any scheme: an HMAC secret mints platform tickets, a
    /// [`keyholder_protocol::PlatformSigningKey`] mints `kh2` tickets.
    ///
    /// ```
    /// use keyholder_client::TicketIssuer;
    /// use keyholder_protocol::ticket_kh2::verify_kh2_ticket;
    /// use keyholder_protocol::PlatformSigningKey;
    ///
    /// let key = PlatformSigningKey::generate();
    /// let public = key.public_key();
    /// let ticket = TicketIssuer::with_auth(key).proxy("github");
    /// assert!(ticket.expose().starts_with("kh2."));
    /// let now = ticket.claims().iat.unwrap();
    /// assert_eq!(verify_kh2_ticket(&[public], ticket.expose(), now, 3600).unwrap().pur, "proxy");
    /// ```
    pub fn with_auth(auth: impl Into<PlatformAuth>) -> Self {
        TicketIssuer::from_auth(auth.into())
    }

    pub(crate) fn from_auth(auth: PlatformAuth) -> Self {
        TicketIssuer {
            auth,
            subject: "platform".into(),
            lifetime: DEFAULT_TICKET_LIFETIME,
        }
    }

    /// The `sub` claim (owner id) of tickets minted from now on.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = subject.into();
        self
    }

    /// The lifetime (`exp - iat`) of tickets minted from now on. Keyholders refuse more than their cap
    /// (default 1 hour).
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// Start a ticket for `purpose` and `service`; finish with [`TicketBuilder::mint`].
    pub fn ticket(&self, purpose: Purpose, service: &str) -> TicketBuilder<'_> {
        let iat = now_unix();
        let lifetime = i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX);
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        TicketBuilder {
            issuer: self,
            claims: TicketClaims::new(
                self.subject.clone(),
                service,
                purpose,
                iat,
                iat.saturating_add(lifetime),
                nonce,
            ),
        }
    }

    /// An `agent_credential` ticket (`/v1/credential`, `/v1/totp-code`).
    pub fn credential(&self, service: &str) -> Ticket {
        self.ticket(Purpose::AgentCredential, service).mint()
    }

    /// A `user_reveal` ticket (the owner's dashboard).
    pub fn user_reveal(&self, service: &str) -> Ticket {
        self.ticket(Purpose::UserReveal, service).mint()
    }

    /// A `store` ticket (`/v1/store`), overwriting by default.
    pub fn store(&self, service: &str) -> Ticket {
        self.ticket(Purpose::Store, service).mint()
    }

    /// A `proxy` ticket (`/v1/proxy`).
    pub fn proxy(&self, service: &str) -> Ticket {
        self.ticket(Purpose::Proxy, service).mint()
    }

    /// A `totp_code` ticket (`/v1/totp-code`).
    pub fn totp(&self, service: &str) -> Ticket {
        self.ticket(Purpose::TotpCode, service).mint()
    }

    fn encode(&self, claims: &TicketClaims) -> String {
        match &self.auth {
            PlatformAuth::Hmac(secret) => encode_ticket(secret, claims),
            PlatformAuth::Ed25519(key) => encode_kh2_ticket(key, claims),
        }
    }
}

/// A ticket being minted: optional claims, then [`TicketBuilder::mint`].
#[derive(Debug)]
#[must_use = "a ticket is only minted by `mint()`"]
pub struct TicketBuilder<'a> {
    issuer: &'a TicketIssuer,
    claims: TicketClaims,
}

impl TicketBuilder<'_> {
    /// The `aid` claim (agent id).
    pub fn agent_id(mut self, agent_id: impl Into<String>) -> Self {
        self.claims.aid = Some(agent_id.into());
        self
    }

    /// The `pid` claim (proxy config id).
    pub fn proxy_id(mut self, proxy_id: impl Into<String>) -> Self {
        self.claims.pid = Some(proxy_id.into());
        self
    }

    /// The `cid` claim (creation id, protocol 2.4.0): a credential, proxy or TOTP-code ticket only
    /// works while the stored token has this `creationId`; a store ticket gives it to the token.
    pub fn creation_id(mut self, creation_id: impl Into<String>) -> Self {
        self.claims.cid = Some(serde_json::Value::String(creation_id.into()));
        self
    }

    /// The `mode` claim (store tickets).
    pub fn mode(mut self, mode: StoreMode) -> Self {
        self.claims.mode = Some(serde_json::Value::String(
            match mode {
                StoreMode::Create => "create",
                StoreMode::Overwrite => "overwrite",
            }
            .into(),
        ));
        self
    }

    /// Any JSON value as the `cid` claim (conformance checks of what a webhook refuses).
    pub fn raw_creation_id(mut self, value: serde_json::Value) -> Self {
        self.claims.cid = Some(value);
        self
    }

    /// Any JSON value as the `mode` claim (conformance checks of what a webhook refuses).
    pub fn raw_mode(mut self, value: serde_json::Value) -> Self {
        self.claims.mode = Some(value);
        self
    }

    /// A lifetime for this ticket only.
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        let iat = self.claims.iat.unwrap_or_else(now_unix);
        let secs = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
        self.claims.exp = Some(iat.saturating_add(secs));
        self
    }

    /// Explicit `iat` and `exp` (tests of expiry handling).
    pub fn validity(mut self, iat: i64, exp: i64) -> Self {
        self.claims.iat = Some(iat);
        self.claims.exp = Some(exp);
        self
    }

    /// Encode and sign.
    pub fn mint(self) -> Ticket {
        Ticket {
            text: zeroize::Zeroizing::new(self.issuer.encode(&self.claims)),
            claims: self.claims,
        }
    }
}
