//! Small named values (the webhook id, the binding flags, the seal, key versions) and the owner
//! generation every replica follows.

use async_trait::async_trait;

use super::StorageResult;

/// Every setting the keyholder keeps, by role; [`Setting::name`] is its stored name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Setting {
    /// This keyholder's webhook id (`wh_<hex>`).
    WebhookId,
    /// `true` after the first successful exchange (read typed via [`Settings::is_bound`]).
    Bound,
    /// Unix time of the last exchange.
    BoundAt,
    /// Version of the HMAC secret in force.
    HmacVersion,
    /// SHA-256 (hex) of the HMAC secret in force.
    HmacHash,
    /// Version of the data key new ciphertexts are written under.
    DataVersion,
    /// A known plaintext wrapped by the master key (hex): tells a wrong master key.
    MasterCheck,
    /// Salt of the passphrase-derived master key (hex).
    KdfSalt,
    /// The master key sealed by a PKCS#11 token.
    Pkcs11SealedMaster,
    /// The owner's kill switch (`true` while sealed).
    Sealed,
    /// Bumped by every owner change a running server must pick up.
    OwnerGeneration,
    /// The public URL bind links point at.
    PublicUrl,
    /// The platform's frontend the registration link opens.
    FrontendUrl,
    /// The platform authentication scheme (`hmac` or `ed25519`).
    PlatformScheme,
    /// The audit trail's recorded head (`<seq>:<hash hex>`).
    AuditHead,
    /// Unix time of the last `keyholder backup`.
    LastBackupAt,
}

impl Setting {
    /// Every setting.
    pub const ALL: [Setting; 16] = [
        Setting::WebhookId,
        Setting::Bound,
        Setting::BoundAt,
        Setting::HmacVersion,
        Setting::HmacHash,
        Setting::DataVersion,
        Setting::MasterCheck,
        Setting::KdfSalt,
        Setting::Pkcs11SealedMaster,
        Setting::Sealed,
        Setting::OwnerGeneration,
        Setting::PublicUrl,
        Setting::FrontendUrl,
        Setting::PlatformScheme,
        Setting::AuditHead,
        Setting::LastBackupAt,
    ];

    /// Stored name.
    pub fn name(self) -> &'static str {
        match self {
            Setting::WebhookId => "webhook_id",
            Setting::Bound => "bound",
            Setting::BoundAt => "bound_at",
            Setting::HmacVersion => "hmac_version",
            Setting::HmacHash => "hmac_hash",
            Setting::DataVersion => "data_version",
            Setting::MasterCheck => "master_check",
            Setting::KdfSalt => "kdf_salt",
            Setting::Pkcs11SealedMaster => "pkcs11_sealed_master",
            Setting::Sealed => "sealed",
            Setting::OwnerGeneration => "owner_generation",
            Setting::PublicUrl => "public_url",
            Setting::FrontendUrl => "frontend_url",
            Setting::PlatformScheme => "platform_scheme",
            Setting::AuditHead => "audit_head",
            Setting::LastBackupAt => "last_backup_at",
        }
    }
}

/// Settings and the owner generation.
#[async_trait]
pub trait Settings: Send + Sync {
    /// A setting's value, `None` when unset.
    async fn setting(&self, setting: Setting) -> StorageResult<Option<String>>;

    /// Several settings read together (one snapshot), in the order asked.
    async fn settings(&self, which: &[Setting]) -> StorageResult<Vec<Option<String>>>;

    /// Writes a setting (durable on return). Owner changes that must be followed go through
    /// [`super::ChangeSet`] with `bump_generation`.
    async fn put_setting(&self, setting: Setting, value: &str) -> StorageResult<()>;

    /// Whether the keyholder is bound: the one typed reading of [`Setting::Bound`].
    async fn is_bound(&self) -> StorageResult<bool> {
        Ok(self.setting(Setting::Bound).await?.as_deref() == Some("true"))
    }

    /// The owner generation (0 before any owner change). Polled by every replica (a primary-key
    /// lookup), so it must be cheap.
    async fn owner_generation(&self) -> StorageResult<u64>;

    /// Bumps the owner generation on its own and returns the new value (a change set bumps it in
    /// its own transaction instead).
    async fn bump_owner_generation(&self) -> StorageResult<u64>;

    /// A push channel of owner-generation changes made by other processes (PostgreSQL
    /// LISTEN/NOTIFY), if the engine has one; `None` means "poll [`Settings::owner_generation`]".
    fn watch_owner_generation(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Whether this process should run the housekeeping job `job` (replay purge, audit
    /// retention) now: engines shared by replicas take an advisory lock so it runs once.
    async fn housekeeping_turn(&self, _job: &str) -> StorageResult<bool> {
        Ok(true)
    }
}
