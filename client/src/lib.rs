//! `keyholder-client`: a typed async SDK for anything that talks to a Token Vault webhook (a Keyholder or
//! any other implementation of the protocol): the platform side ([`Platform`], [`TicketIssuer`]) and the
//! agent and browser side ([`Agent`]). The `keyholder-check` conformance checker, built on this SDK, is its own
//! crate; [`transport`] holds the low-level calls it needs.
//!
//! Every byte on the wire is produced and checked by [`keyholder_protocol`]; this crate adds transport,
//! retries, identity pinning and typed answers. Secure by default: https only (unless
//! [`ClientBuilder::danger_allow_http`]), timeouts, no redirects followed, secrets in zeroizing types that
//! never print.
//!
//! ```
//! use keyholder_client::{ClientBuilder, TicketIssuer};
//! use keyholder_protocol::HmacSecret;
//!
//! // The platform mints a ticket; an agent would send it to the webhook.
//! let issuer = TicketIssuer::new(HmacSecret::generate()).subject("user_1");
//! let ticket = issuer.credential("github");
//! assert_eq!(ticket.claims().pur, "agent_credential");
//! assert!(!format!("{ticket:?}").contains(ticket.expose()));
//!
//! let agent = ClientBuilder::new("https://keyholder.example.org").agent().unwrap();
//! assert_eq!(agent.base_url().host_str(), Some("keyholder.example.org"));
//! ```
#![warn(missing_docs)]

pub mod agent;
pub mod auth;
pub mod builder;
pub mod error;
pub mod identity;
pub mod platform;
pub mod proxy;
pub mod refresh;
pub mod retry;
pub mod secret;
pub mod storage;
pub mod tickets;
pub mod transport;

pub use agent::Agent;
pub use auth::PlatformAuth;
pub use builder::ClientBuilder;
pub use error::Error;
pub use identity::{IdentityPin, PinnedIdentity};
pub use platform::{ExchangeInfo, Platform};
pub use proxy::{ProxyCall, ProxyResponse, ProxyStream, JWT_PLACEHOLDER, TOKEN_PLACEHOLDER};
pub use refresh::RefreshGet;
pub use retry::RetryPolicy;
pub use secret::{Credential, SecretString, TokenData, TotpCode};
pub use tickets::{StoreMode, Ticket, TicketBuilder, TicketIssuer};

/// The protocol crate, re-exported so that callers use the same wire types.
pub use keyholder_protocol as protocol;
