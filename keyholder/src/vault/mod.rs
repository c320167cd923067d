//! The domain layer: keys, binding, replay memory and credential operations. Knows nothing of HTTP.

pub mod binding;
pub mod catalogue;
pub mod collections;
pub mod credentials;
pub mod doc_cache;
pub mod documents;
pub mod egress;
pub mod import;
pub mod imported_v1;
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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use keyholder_protocol::{HmacSecret, PlatformPublicKey};

use crate::storage::{SharedStorage, StorageError};
use crate::upstream::UpstreamError;
use keyring::KeyRing;
use master::{MasterKey, MasterKeySource};
use platform_keys::PlatformScheme;
use replay::ReplayGuard;

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

/// The keyholder's domain state, shared by all workers.
pub struct Vault {
    storage: SharedStorage,
    master: RwLock<Arc<MasterKey>>,
    keys: RwLock<Arc<KeyRing>>,
    binding: RwLock<Arc<BindingState>>,
    /// Replay memory for request ids and ticket nonces.
    pub replay: ReplayGuard,
    settings: VaultSettings,
    started: std::time::Instant,
    /// The kill switch, kept fresh from the database by [`Vault::follow_owner_changes`].
    sealed: AtomicBool,
    /// Where the master key came from (re-read after an owner's master key rotation).
    data_dir: PathBuf,
    source: MasterKeySource,
    /// State of following the owner's changes on disk.
    follow: Mutex<reload::FollowState>,
    /// Minted short-lived tokens, in memory only.
    minter: minting::Minter,
    /// Stored documents and list items, so hot paths skip the database.
    documents: documents::CachedDocuments,
    /// Egress policies, so a proxied call skips the database.
    egress_cache: egress::EgressPolicyCache,
    /// Signing configurations, assumed-role sessions and exchanged JWT tokens (issue 24).
    signing: signing::SigningState,
    /// One OAuth refresh per service at a time.
    refresh_locks: minting::KeyedLocks,
    /// The owner's custody policies (reloaded with every owner change).
    pub policy: crate::policy::PolicyEngine,
}

/// What opening the vault found, for the start-up log.
pub struct OpenReport {
    /// Keys were created by this start.
    pub created_keys: bool,
    /// A master key file was created in the data folder.
    pub created_master_file: bool,
}

impl Vault {
    /// Opens the vault on `storage`: loads (creating on first start) the master key and key
    /// ring, and the replay memory.
    pub async fn open(
        storage: SharedStorage,
        data_dir: &Path,
        source: &MasterKeySource,
        settings: VaultSettings,
    ) -> Result<(Vault, OpenReport), VaultError> {
        let (master, created_master_file) =
            master::open_master_key(storage.as_ref(), data_dir, source).await?;
        let loaded = keyring::init_or_load(storage.as_ref(), &master).await?;
        let snapshot = storage.key_ring_snapshot().await?;
        let bound = snapshot.is_bound();
        let sealed = reload::read_sealed(&snapshot);
        let generation = reload::owner_generation(&snapshot);
        let (scheme, platform_keys) = platform_keys::load(&snapshot)?;
        let replay = ReplayGuard::load(Arc::clone(&storage)).await?;
        let report = OpenReport {
            created_keys: loaded.created,
            created_master_file,
        };
        let vault = Vault {
            documents: documents::CachedDocuments::new(Arc::clone(&storage)),
            storage,
            master: RwLock::new(Arc::new(master)),
            keys: RwLock::new(Arc::new(loaded.ring)),
            binding: RwLock::new(Arc::new(BindingState {
                bound,
                webhook_id: loaded.webhook_id,
                hmac: loaded.hmac,
                scheme,
                platform_keys,
            })),
            replay,
            settings,
            started: std::time::Instant::now(),
            sealed: AtomicBool::new(sealed),
            data_dir: data_dir.to_path_buf(),
            source: source.clone(),
            follow: Mutex::new(reload::FollowState::new(generation)),
            minter: minting::Minter::default(),
            egress_cache: egress::EgressPolicyCache::default(),
            signing: signing::SigningState::default(),
            refresh_locks: minting::KeyedLocks::default(),
            policy: crate::policy::PolicyEngine::default(),
        };
        vault.policy.reload(vault.storage.as_ref()).await?;
        Ok((vault, report))
    }

    /// The key ring in force.
    pub fn keys(&self) -> Arc<KeyRing> {
        match self.keys.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The binding in force.
    pub fn binding(&self) -> Arc<BindingState> {
        match self.binding.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The master key in force (it changes when the owner rotates it and the server picks it up).
    pub fn master(&self) -> Arc<MasterKey> {
        match self.master.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn set_master(&self, master: MasterKey) {
        let next = Arc::new(master);
        match self.master.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    fn set_keys(&self, ring: KeyRing) {
        let next = Arc::new(ring);
        match self.keys.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    /// Whether the owner has sealed the keyholder (one atomic load: cheap on every request).
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// Refuses with [`VaultError::Sealed`] while sealed. Every endpoint that decrypts or stores a
    /// credential calls this before doing anything else (proxy and refresh endpoints included).
    pub fn ensure_unsealed(&self) -> Result<(), VaultError> {
        if self.is_sealed() {
            Err(VaultError::Sealed)
        } else {
            Ok(())
        }
    }

    fn set_binding(&self, state: BindingState) {
        let next = Arc::new(state);
        match self.binding.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    /// Domain settings.
    pub fn settings(&self) -> &VaultSettings {
        &self.settings
    }

    /// The storage.
    pub fn storage(&self) -> &SharedStorage {
        &self.storage
    }

    /// The stored documents, through their cache.
    pub fn documents(&self) -> &documents::CachedDocuments {
        &self.documents
    }

    /// Seconds since this vault was opened.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}
