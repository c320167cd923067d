//! Bind codes (stored by hash, single use), the exchange that consumes one, and the platform's
//! Ed25519 public keys.

use async_trait::async_trait;

use super::keyring::WrappedKey;
use super::StorageResult;

/// A bind code as stored (the code itself never is: only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindCode {
    /// SHA-256 (hex) of the code.
    pub code_hash: String,
    /// Unix time it was issued.
    pub created_at: i64,
    /// Unix time it expires.
    pub expires_at: i64,
    /// Unix time it was used, if it was.
    pub used_at: Option<i64>,
    /// Whether its exchange replaces a binding.
    pub rebind: bool,
    /// SHA-256 (hex) of the HMAC secret its link names (empty for an asymmetric code).
    pub hmac_hash: String,
    /// A re-bind code's new secret, wrapped by the master key.
    pub pending_secret: Option<Vec<u8>>,
    /// The platform public key of an asymmetric code (raw 32 bytes).
    pub platform_key: Option<Vec<u8>>,
}

/// A platform public key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPlatformKey {
    /// Its id.
    pub key_id: String,
    /// The raw 32-byte public key.
    pub public_key: Vec<u8>,
    /// Unix time it was added.
    pub added_at: i64,
}

/// What the exchange installs, decided by the domain from the code it read.
#[derive(Debug, Clone)]
pub enum ExchangeInstall {
    /// HMAC binding keeping the current secret.
    KeepHmac,
    /// HMAC binding with the code's pending secret as the new current secret (older ones dropped).
    NewHmac {
        /// The secret wrapped as the next `hmac` version.
        key: WrappedKey,
        /// SHA-256 (hex) of the secret.
        hash: String,
    },
    /// Asymmetric binding: this key is the only platform key, and this fresh (never handed out)
    /// HMAC secret replaces every older one.
    Ed25519 {
        /// The platform key.
        platform_key: StoredPlatformKey,
        /// The fresh secret wrapped as the next `hmac` version.
        key: WrappedKey,
        /// SHA-256 (hex) of the secret.
        hash: String,
    },
}

/// One exchange, applied in one transaction by [`Binding::exchange`].
#[derive(Debug, Clone)]
pub struct Exchange {
    /// SHA-256 (hex) of the presented code.
    pub code_hash: String,
    /// Unix time now.
    pub now: i64,
    /// Refuse with [`ExchangeOutcome::AlreadyBound`] when bound and the code is no re-bind code
    /// (the engine reads the code's flag and the bound flag in the transaction).
    pub bound_in_memory: bool,
    /// The master-key check value the wrapped keys were made under; refused with
    /// [`ExchangeOutcome::MasterKeyChanged`] when storage holds another.
    pub master_check: String,
    /// What to install.
    pub install: ExchangeInstall,
}

/// Outcome of [`Binding::exchange`]; only [`ExchangeOutcome::Exchanged`] changed anything except
/// (for [`ExchangeOutcome::AlreadyBound`]) burning the code, as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeOutcome {
    /// Bound.
    Exchanged,
    /// Unknown or expired code.
    Expired,
    /// Code already used.
    Used,
    /// A plain code on a bound keyholder (the code is used up).
    AlreadyBound,
    /// The master key was rotated meanwhile: nothing written.
    MasterKeyChanged,
    /// The key ring's HMAC versions moved meanwhile: nothing written; read again and retry.
    KeyRingChanged,
}

/// The bind-code and platform-key repository.
#[async_trait]
pub trait Binding: Send + Sync {
    /// Inserts a fresh code and forgets codes expired before `forget_before`, and records the
    /// URLs its links use, in one transaction.
    async fn insert_bind_code(
        &self,
        code: BindCode,
        forget_before: i64,
        public_url: &str,
        frontend_url: &str,
    ) -> StorageResult<()>;

    /// A stored code by hash.
    async fn bind_code(&self, code_hash: &str) -> StorageResult<Option<BindCode>>;

    /// Consumes a code and installs the binding, all in one transaction; the code is used at most
    /// once whatever runs concurrently.
    async fn exchange(&self, exchange: Exchange) -> StorageResult<ExchangeOutcome>;

    /// Every code still holding a wrapped pending secret: (code hash, wrapped secret).
    async fn pending_secrets(&self) -> StorageResult<Vec<(String, Vec<u8>)>>;

    /// The platform's active public keys, oldest first.
    async fn platform_keys(&self) -> StorageResult<Vec<StoredPlatformKey>>;
}
