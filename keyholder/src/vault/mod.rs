//! The domain layer: keys, binding, replay memory and credential operations. Knows nothing of HTTP.
//!
//! No god object: small services, each in its own module and owning only what it needs (its
//! repositories as [`SharedStorage`](crate::storage::SharedStorage), the key ring handle, a cache),
//! built in `AppState::build` and called by the HTTP handlers directly:
//! [`key_handle::KeyHandle`] (master key, key ring, binding, seal), [`collections::StorageService`]
//! (stored documents through their cache), [`credentials::CredentialsService`],
//! [`egress::EgressService`] and [`egress::ProxyService`], [`signing::SigningService`],
//! [`minting::MintingService`], [`refresh::RefreshService`], [`binding::BindingService`] and
//! [`reload::ReloadService`] (the owner's changes on disk).

pub mod binding;
pub mod catalogue;
pub mod collections;
pub mod credentials;
pub mod doc_cache;
pub mod documents;
pub mod egress;
pub mod import;
pub mod imported_v1;
pub mod key_handle;
pub mod keyring;
pub mod master;
pub mod minting;
pub mod oauth;
pub mod pkcs11;
pub mod platform_keys;
pub mod redact;
pub mod refresh;
pub mod reload;
pub mod replay;
pub mod retention;
pub mod rotation;
pub mod sealed;
pub mod signing;
pub mod totp_links;

use std::path::PathBuf;

use keyholder_protocol::{HmacSecret, PlatformPublicKey};

use crate::storage::StorageError;
use crate::upstream::UpstreamError;
use platform_keys::PlatformScheme;

/// Domain failures. Each maps to one wire error in `http::error`.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Storage failed (logged in full, sent as a fixed code).
    #[error(transparent)]
    Store(#[from] StorageError),
    /// A key could not be wrapped or unwrapped.
    #[error("key wrapping failed")]
    Crypto,
    /// The configured master key does not open this data folder.
    #[error("the master key does not match this data folder (wrong key file or passphrase)")]
    WrongMasterKey,
    /// The data folder has keys but its master key file is gone.
    #[error("the master key file {0} is missing, but this data folder holds keys wrapped by it; restore the file or pass --master-key-file")]
    MasterKeyMissing(PathBuf),
    /// A key or passphrase file could not be used.
    #[error("key file {0}: {1}")]
    KeyFile(PathBuf, String),
    /// The PKCS#11 token could not be used (module, token, PIN or key); the text says which.
    #[error("{0}")]
    Pkcs11(String),
    /// Stored state is inconsistent.
    #[error("corrupt data folder: {0}")]
    Corrupt(String),
    /// No document for the requested service.
    #[error("no credential stored for this service")]
    TokenNotFound,
    /// A create-only store found an existing credential.
    #[error("a credential is already stored for this service")]
    AlreadyExists,
    /// The input was refused; the text is safe to show the caller.
    #[error("{0}")]
    Invalid(String),
    /// The stored credential cannot be decrypted with any key we hold.
    #[error("stored credential cannot be decrypted")]
    Undecryptable,
    /// The ticket's `cid` does not name the stored token (2.4.0 ticket constraint).
    #[error("Token was replaced since this ticket was issued")]
    StaleCreation,
    /// The stored document of a service (which the platform can write with `storage set`) is
    /// malformed or its fields do not decrypt: the caller's problem to fix, not a retryable failure.
    #[error("stored credential document is corrupt")]
    CorruptDocument,
    /// The credential is not a TOTP secret.
    #[error("this credential is not a TOTP secret")]
    NotTotp,
    /// Bind code unknown or expired.
    #[error("bind code unknown or expired")]
    CodeExpired,
    /// Bind code already used.
    #[error("bind code already used")]
    CodeUsed,
    /// A plain bind code was presented to a keyholder that is already bound.
    #[error("this keyholder is already bound; issue a code with `keyholder bind --rebind`")]
    AlreadyBound,
    /// The owner sealed the keyholder (`keyholder seal`): nothing is decrypted until `unseal`.
    #[error("the keyholder is sealed by its owner")]
    Sealed,
    /// The key ring on disk changed under a write (a rotation by the owner's CLI); retried once
    /// after reloading, so it only reaches a caller if the ring keeps changing.
    #[error("the key ring changed during the write")]
    KeyRingChanged,
    /// The egress guard or the service's egress policy refused the destination (nothing was
    /// sent); the text names the destination, never a credential.
    #[error("egress denied: {0}")]
    EgressDenied(String),
    /// The proxied upstream call failed.
    #[error("upstream: {0}")]
    Upstream(UpstreamError),
    /// An OAuth or token-minting endpoint could not be reached or timed out.
    #[error("provider: {0}")]
    Provider(UpstreamError),
    /// An OAuth or token-minting endpoint answered, but not with a token.
    #[error("provider: {0}")]
    ProviderRejected(String),
}

/// Runtime settings of the domain layer.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    /// Longest accepted ticket lifetime (`exp - iat`), seconds.
    pub max_ticket_lifetime: i64,
    /// Capabilities announced at exchange and health.
    pub capabilities: Vec<String>,
}

/// Binding state: bound or not, the scheme the platform authenticates with, and what verifies it.
pub struct BindingState {
    /// True after the first successful exchange.
    pub bound: bool,
    /// This keyholder's webhook id.
    pub webhook_id: String,
    /// The current HMAC secret (only accepted under [`PlatformScheme::Hmac`]).
    pub hmac: HmacSecret,
    /// The scheme in force: HMAC (platform tickets) or Ed25519 (envelopes and `kh2` tickets).
    pub scheme: PlatformScheme,
    /// The active platform public keys (Ed25519 scheme; at most two).
    pub platform_keys: Vec<PlatformPublicKey>,
}

/// What opening the vault found, for the start-up log.
pub struct OpenReport {
    /// Keys were created by this start.
    pub created_keys: bool,
    /// A master key file was created in the data folder.
    pub created_master_file: bool,
}
