//! Binding to the platform: bind codes issued by the owner (CLI) and the one-time exchange that
//! hands the HMAC secret to the platform; a re-bind code carries a new secret that replaces the old.
//!
//! An asymmetric code (`keyholder bind --platform-key FILE`) carries the platform's Ed25519 public key
//! instead: its exchange hands out no secret, makes that key the only platform key and switches the
//! binding to envelopes and `kh2` tickets (it also replaces the unused HMAC secret, so a secret an
//! earlier HMAC platform held is gone from the folder). One scheme per binding: the scheme of the code
//! exchanged last is the one in force, so a re-bind can switch either way.

use std::sync::Arc;

use keyholder_protocol::{binding, HmacSecret, PlatformPublicKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::key_handle::KeyHandle;
use super::keyring::{wrap_key, KIND_HMAC};
use super::master::MasterKey;
use super::platform_keys::{self, PlatformScheme};
use super::{BindingState, VaultError};
use crate::storage::{
    BindCode, Exchange, ExchangeInstall, ExchangeOutcome, Setting, SharedStorage, Storage,
};

/// A freshly issued bind code, as `keyholder bind` prints it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCode {
    /// The one-time code (UUID v4).
    pub code: String,
    /// The link the owner opens while logged in to the platform.
    pub registration_url: String,
    /// This keyholder's `/bind` page showing the same link.
    pub bind_page_url: String,
    /// Seconds the code stays valid.
    pub expires_in: i64,
    /// Unix time the code expires.
    pub expires_at: i64,
    /// Whether the exchange replaces the current binding (and its HMAC secret).
    pub rebind: bool,
    /// The platform key id of an asymmetric code (`--platform-key`), else `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform_key_id: Option<String>,
}

/// Hash under which a code is stored (the database never holds a live code).
fn code_hash(code: &str) -> String {
    hex::encode(Sha256::digest(code.as_bytes()))
}

/// Key-wrapping label of a re-bind code's pending secret.
pub(crate) fn pending_kind(hash: &str) -> String {
    format!("bind:{hash}")
}

/// Issues a bind code (the owner's CLI, on storage a server may be using). A plain code is
/// refused once bound; `rebind` makes a code whose exchange installs a new HMAC secret. With
/// `platform_key` the code is for an asymmetric binding to that key.
pub async fn issue_bind_code(
    storage: &dyn Storage,
    master: &MasterKey,
    rebind: bool,
    platform_key: Option<&PlatformPublicKey>,
    public_url: &str,
    frontend: &str,
    now: i64,
) -> Result<IssuedCode, VaultError> {
    if storage.is_bound().await? && !rebind {
        return Err(VaultError::AlreadyBound);
    }
    let code = uuid::Uuid::new_v4().to_string();
    let hash = code_hash(&code);
    let ttl = keyholder_protocol::paths::BIND_CODE_TTL_SECS;
    // What the code's link names: the platform key, or the secret the exchange hands out (a new
    // one for a re-bind code, kept wrapped until then).
    let (hmac_hash, pending_secret, registration_url) = match platform_key {
        Some(key) => (
            String::new(),
            None,
            binding::registration_url_for_platform_key(frontend, &code, public_url, key.key_id()),
        ),
        None => {
            let secret = if rebind {
                HmacSecret::generate()
            } else {
                super::keyring::load_current(storage, master).await?.1
            };
            let pending = if rebind {
                Some(master.wrap(&pending_kind(&hash), 0, secret.expose())?)
            } else {
                None
            };
            let url = binding::registration_url(frontend, &code, public_url, &secret);
            (secret.sha256_hex(), pending, url)
        }
    };
    storage
        .insert_bind_code(
            BindCode {
                code_hash: hash,
                created_at: now,
                expires_at: now + ttl,
                used_at: None,
                rebind,
                hmac_hash,
                pending_secret,
                platform_key: platform_key.map(|k| k.as_bytes().to_vec()),
            },
            // Forget long-dead codes so the table stays small.
            now - 86_400,
            public_url,
            frontend,
        )
        .await?;
    Ok(IssuedCode {
        bind_page_url: format!("{}/bind?code={}", public_url.trim_end_matches('/'), code),
        code,
        registration_url,
        expires_in: ttl,
        expires_at: now + ttl,
        rebind,
        platform_key_id: platform_key.map(|k| k.key_id().to_owned()),
    })
}

/// What the platform receives from a successful exchange.
pub struct Exchanged {
    /// The HMAC secret, standard base64 (HMAC binding); `None` for an asymmetric binding.
    pub secret_base64: Option<Zeroizing<String>>,
    /// This keyholder's webhook id.
    pub webhook_id: String,
}

/// The error of a refused exchange (`None`: exchanged).
fn refusal(outcome: ExchangeOutcome) -> Option<VaultError> {
    match outcome {
        ExchangeOutcome::Exchanged => None,
        ExchangeOutcome::Expired => Some(VaultError::CodeExpired),
        ExchangeOutcome::Used => Some(VaultError::CodeUsed),
        ExchangeOutcome::AlreadyBound => Some(VaultError::AlreadyBound),
        ExchangeOutcome::MasterKeyChanged => Some(VaultError::WrongMasterKey),
        ExchangeOutcome::KeyRingChanged => Some(VaultError::KeyRingChanged),
    }
}

/// How an exchange ends, once storage has answered.
enum Bound {
    Hmac(HmacSecret),
    Ed25519(Box<PlatformPublicKey>, HmacSecret),
}

/// The binding service: bind codes exchanged for the platform's secret (`/v1/exchange`) and the
/// registration link of the `/bind` page; the binding in force lives in the key handle.
pub struct BindingService {
    storage: SharedStorage,
    keys: Arc<KeyHandle>,
}

impl BindingService {
    /// The service over the binding repository in `storage`.
    pub fn new(storage: SharedStorage, keys: Arc<KeyHandle>) -> BindingService {
        BindingService { storage, keys }
    }

    fn storage(&self) -> &SharedStorage {
        &self.storage
    }

    /// Consumes a bind code and returns the HMAC secret the platform will sign with. A re-bind
    /// code installs its new secret in the same transaction, so the old one stops working now.
    pub async fn exchange(&self, code: &str) -> Result<Exchanged, VaultError> {
        let hash = code_hash(code);
        let now = crate::clock::now_unix();
        let storage = self.storage();
        // The install is prepared from the code as read; storage applies it only if the code is
        // still unused, the master key unchanged and the HMAC versions as read.
        let Some(stored) = storage.bind_code(&hash).await? else {
            return Err(VaultError::CodeExpired);
        };
        let master = self.keys.master();
        let snapshot = storage.key_ring_snapshot().await?;
        // Never wrap with a master key the owner has rotated away (see `reload`): with a stale
        // key nothing is installed, and storage refuses the exchange after its bound check.
        let Ok(master_check) = master.check(snapshot.setting(Setting::MasterCheck)) else {
            let outcome = storage
                .exchange(Exchange {
                    code_hash: hash,
                    now,
                    bound_in_memory: self.keys.binding().bound,
                    master_check: String::new(),
                    install: ExchangeInstall::KeepHmac,
                })
                .await?;
            return Err(refusal(outcome).unwrap_or(VaultError::WrongMasterKey));
        };
        let latest_hmac = snapshot.latest_version(KIND_HMAC);
        let (install, bound) = match (&stored.platform_key, &stored.pending_secret) {
            (Some(raw), _) => {
                let key = PlatformPublicKey::parse(raw)
                    .map_err(|_| VaultError::Corrupt("bind code platform key".into()))?;
                // Nobody ever receives this secret, and it is never accepted in this scheme;
                // replacing it drops whatever secret an earlier HMAC platform held.
                let secret = HmacSecret::generate();
                let install = ExchangeInstall::Ed25519 {
                    platform_key: platform_keys::stored(&key, now),
                    key: wrap_key(&master, KIND_HMAC, latest_hmac + 1, secret.expose())?,
                    hash: secret.sha256_hex(),
                };
                (install, Bound::Ed25519(Box::new(key), secret))
            }
            (None, Some(wrapped)) => {
                let plain = master.unwrap_key(&pending_kind(&hash), 0, wrapped)?;
                let secret = HmacSecret::from_slice(&plain)
                    .map_err(|_| VaultError::Corrupt("pending secret".into()))?;
                let install = ExchangeInstall::NewHmac {
                    key: wrap_key(&master, KIND_HMAC, latest_hmac + 1, secret.expose())?,
                    hash: secret.sha256_hex(),
                };
                (install, Bound::Hmac(secret))
            }
            (None, None) => {
                let (_, secret, _) = super::keyring::load(&snapshot, &master)?;
                (ExchangeInstall::KeepHmac, Bound::Hmac(secret))
            }
        };
        let outcome = storage
            .exchange(Exchange {
                code_hash: hash,
                now,
                bound_in_memory: self.keys.binding().bound,
                master_check,
                install,
            })
            .await?;
        if let Some(err) = refusal(outcome) {
            return Err(err);
        }
        let webhook_id = self.keys.binding().webhook_id.clone();
        match bound {
            Bound::Hmac(secret) => {
                let secret_base64 = secret.to_base64();
                self.keys.set_binding(BindingState {
                    bound: true,
                    webhook_id: webhook_id.clone(),
                    hmac: secret,
                    scheme: PlatformScheme::Hmac,
                    platform_keys: Vec::new(),
                });
                Ok(Exchanged {
                    secret_base64: Some(secret_base64),
                    webhook_id,
                })
            }
            Bound::Ed25519(key, secret) => {
                self.keys.set_binding(BindingState {
                    bound: true,
                    webhook_id: webhook_id.clone(),
                    hmac: secret,
                    scheme: PlatformScheme::Ed25519,
                    platform_keys: vec![*key],
                });
                Ok(Exchanged {
                    secret_base64: None,
                    webhook_id,
                })
            }
        }
    }

    /// The registration link for a live, unused code (for the `/bind` page), or `None`.
    pub async fn bind_link(&self, code: &str) -> Result<Option<String>, VaultError> {
        let storage = self.storage();
        let now = crate::clock::now_unix();
        let Some(stored) = storage.bind_code(&code_hash(code)).await? else {
            return Ok(None);
        };
        if stored.used_at.is_some() || stored.expires_at < now {
            return Ok(None);
        }
        let urls = storage
            .settings(&[Setting::PublicUrl, Setting::FrontendUrl])
            .await?;
        let mut urls = urls.into_iter();
        let public = urls.next().flatten().unwrap_or_default();
        let frontend = urls
            .next()
            .flatten()
            .unwrap_or_else(|| keyholder_protocol::paths::DEFAULT_FRONTEND.to_string());
        if let Some(key) = stored
            .platform_key
            .and_then(|raw| PlatformPublicKey::parse(&raw).ok())
        {
            return Ok(Some(binding::registration_url_for_platform_key(
                &frontend,
                code,
                &public,
                key.key_id(),
            )));
        }
        Ok(Some(binding::registration_url_for_hash(
            &frontend,
            code,
            &public,
            &stored.hmac_hash,
        )))
    }
}
