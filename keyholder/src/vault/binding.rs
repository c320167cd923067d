//! Binding to the platform: bind codes issued by the owner (CLI) and the one-time exchange that
//! hands the HMAC secret to the platform; a re-bind code carries a new secret that replaces the old.
//!
//! An asymmetric code (`keyholder bind --platform-key FILE`) carries the platform's Ed25519 public key
//! instead: its exchange hands out no secret, makes that key the only platform key and switches the
//! binding to envelopes and `kh2` tickets (it also replaces the unused HMAC secret, so a secret an
//! earlier HMAC platform held is gone from the folder). One scheme per binding: the scheme of the code
//! exchanged last is the one in force, so a re-bind can switch either way.

use keyholder_protocol::{binding, HmacSecret, PlatformPublicKey};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::keyring::{install_hmac_secret, KIND_HMAC};
use super::master::MasterKey;
use super::platform_keys::{self, PlatformScheme};
use super::{from_store, into_store, BindingState, Vault, VaultError};
use crate::store::{get_setting, put_setting};

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

/// Issues a bind code (the owner's CLI, on its own connection to a possibly running server's
/// database). A plain code is refused once bound; `rebind` makes a code whose exchange installs a
/// new HMAC secret. With `platform_key` the code is for an asymmetric binding to that key.
pub fn issue_bind_code(
    conn: &Connection,
    master: &MasterKey,
    rebind: bool,
    platform_key: Option<&PlatformPublicKey>,
    public_url: &str,
    frontend: &str,
    now: i64,
) -> Result<IssuedCode, VaultError> {
    let bound = get_setting(conn, "bound")?.as_deref() == Some("true");
    if bound && !rebind {
        return Err(VaultError::AlreadyBound);
    }
    let code = uuid::Uuid::new_v4().to_string();
    let hash = code_hash(&code);
    let ttl = keyholder_protocol::paths::BIND_CODE_TTL_SECS;
    if let Some(key) = platform_key {
        conn.execute(
            "INSERT INTO bind_codes(code_hash, created_at, expires_at, used_at, rebind, hmac_hash, pending_secret, platform_key)
             VALUES (?1, ?2, ?3, NULL, ?4, '', NULL, ?5)",
            params![hash, now, now + ttl, rebind, key.as_bytes().as_slice()],
        )?;
        conn.execute(
            "DELETE FROM bind_codes WHERE expires_at < ?1",
            [now - 86_400],
        )?;
        put_setting(conn, "public_url", public_url)?;
        put_setting(conn, "frontend_url", frontend)?;
        return Ok(IssuedCode {
            bind_page_url: format!("{}/bind?code={}", public_url.trim_end_matches('/'), code),
            registration_url: binding::registration_url_for_platform_key(
                frontend,
                &code,
                public_url,
                key.key_id(),
            ),
            code,
            expires_in: ttl,
            expires_at: now + ttl,
            rebind,
            platform_key_id: Some(key.key_id().to_owned()),
        });
    }
    let secret = if rebind {
        HmacSecret::generate()
    } else {
        let (_, current, _) = super::keyring::load(conn, master)?;
        current
    };
    let pending = if rebind {
        Some(master.wrap(&pending_kind(&hash), 0, secret.expose())?)
    } else {
        None
    };
    conn.execute(
        "INSERT INTO bind_codes(code_hash, created_at, expires_at, used_at, rebind, hmac_hash, pending_secret)
         VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6)",
        params![hash, now, now + ttl, rebind, secret.sha256_hex(), pending],
    )?;
    // Forget long-dead codes so the table stays small.
    conn.execute(
        "DELETE FROM bind_codes WHERE expires_at < ?1",
        [now - 86_400],
    )?;
    put_setting(conn, "public_url", public_url)?;
    put_setting(conn, "frontend_url", frontend)?;
    let registration_url = binding::registration_url(frontend, &code, public_url, &secret);
    Ok(IssuedCode {
        bind_page_url: format!("{}/bind?code={}", public_url.trim_end_matches('/'), code),
        code,
        registration_url,
        expires_in: ttl,
        expires_at: now + ttl,
        rebind,
        platform_key_id: None,
    })
}

/// A bind code row: expiry, use time, re-bind flag, wrapped pending secret, platform key.
type CodeRow = (i64, Option<i64>, bool, Option<Vec<u8>>, Option<Vec<u8>>);

enum ExchangeStep {
    /// HMAC binding: the secret to hand out.
    Hmac(Zeroizing<String>),
    /// Asymmetric binding to this key; the fresh (never handed out) HMAC secret.
    Ed25519(PlatformPublicKey, HmacSecret),
    Refused(VaultError),
}

/// What the platform receives from a successful exchange.
pub struct Exchanged {
    /// The HMAC secret, standard base64 (HMAC binding); `None` for an asymmetric binding.
    pub secret_base64: Option<Zeroizing<String>>,
    /// This keyholder's webhook id.
    pub webhook_id: String,
}

impl Vault {
    /// Consumes a bind code and returns the HMAC secret the platform will sign with. A re-bind
    /// code installs its new secret in the same transaction, so the old one stops working now.
    pub async fn exchange(&self, code: &str) -> Result<Exchanged, VaultError> {
        let hash = code_hash(code);
        let now = crate::clock::now_unix();
        let bound_now = self.binding().bound;
        let master = self.master();
        let step = self
            .store()
            .write(move |conn| {
                let row: Option<CodeRow> = conn
                    .query_row(
                        "SELECT expires_at, used_at, rebind, pending_secret, platform_key FROM bind_codes WHERE code_hash = ?1",
                        [&hash],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                    )
                    .optional()?;
                let Some((expires_at, used_at, rebind, pending, platform_key)) = row else {
                    return Ok(ExchangeStep::Refused(VaultError::CodeExpired));
                };
                if used_at.is_some() {
                    return Ok(ExchangeStep::Refused(VaultError::CodeUsed));
                }
                if expires_at < now {
                    return Ok(ExchangeStep::Refused(VaultError::CodeExpired));
                }
                conn.execute("UPDATE bind_codes SET used_at = ?1 WHERE code_hash = ?2", params![now, hash])?;
                let bound = get_setting(conn, "bound")?.as_deref() == Some("true");
                if (bound || bound_now) && !rebind {
                    return Ok(ExchangeStep::Refused(VaultError::AlreadyBound));
                }
                let master: &MasterKey = &master;
                // Never wrap with a master key the owner has rotated away (see `reload`).
                master.check_or_record(conn).map_err(into_store)?;
                if let Some(raw) = platform_key {
                    let key = PlatformPublicKey::parse(&raw)
                        .map_err(|_| into_store(VaultError::Corrupt("bind code platform key".into())))?;
                    // Nobody ever receives this secret, and it is never accepted in this scheme;
                    // replacing it drops whatever secret an earlier HMAC platform held.
                    let secret = HmacSecret::generate();
                    install_hmac_secret(conn, master, &secret).map_err(into_store)?;
                    conn.execute(
                        "DELETE FROM keyring WHERE kind = ?1 AND version < (SELECT MAX(version) FROM keyring WHERE kind = ?1)",
                        [KIND_HMAC],
                    )?;
                    platform_keys::install_for_binding(conn, &key, now).map_err(into_store)?;
                    put_setting(conn, "bound", "true")?;
                    put_setting(conn, "bound_at", &now.to_string())?;
                    return Ok(ExchangeStep::Ed25519(key, secret));
                }
                platform_keys::switch_to_hmac(conn).map_err(into_store)?;
                let secret = match pending {
                    Some(wrapped) => {
                        let plain = master.unwrap_key(&pending_kind(&hash), 0, &wrapped).map_err(into_store)?;
                        let secret = HmacSecret::from_slice(&plain)
                            .map_err(|_| into_store(VaultError::Corrupt("pending secret".into())))?;
                        install_hmac_secret(conn, master, &secret).map_err(into_store)?;
                        // Old secrets are of no further use: remove them.
                        conn.execute(
                            "DELETE FROM keyring WHERE kind = ?1 AND version < (SELECT MAX(version) FROM keyring WHERE kind = ?1)",
                            [KIND_HMAC],
                        )?;
                        conn.execute("UPDATE bind_codes SET pending_secret = NULL WHERE code_hash = ?1", [&hash])?;
                        secret
                    }
                    None => super::keyring::load(conn, master).map_err(into_store)?.1,
                };
                put_setting(conn, "bound", "true")?;
                put_setting(conn, "bound_at", &now.to_string())?;
                Ok(ExchangeStep::Hmac(secret.to_base64()))
            })
            .await
            .map_err(from_store)?;
        let webhook_id = self.binding().webhook_id.clone();
        match step {
            ExchangeStep::Refused(err) => Err(err),
            ExchangeStep::Hmac(secret_base64) => {
                let secret = HmacSecret::from_base64(&secret_base64)
                    .map_err(|_| VaultError::Corrupt("secret encoding".into()))?;
                self.set_binding(BindingState {
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
            ExchangeStep::Ed25519(key, secret) => {
                self.set_binding(BindingState {
                    bound: true,
                    webhook_id: webhook_id.clone(),
                    hmac: secret,
                    scheme: PlatformScheme::Ed25519,
                    platform_keys: vec![key],
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
        let hash = code_hash(code);
        let now = crate::clock::now_unix();
        let code = code.to_string();
        Ok(self
            .store()
            .read(move |conn| {
                let row: Option<(String, Option<Vec<u8>>)> = conn
                    .query_row(
                        "SELECT hmac_hash, platform_key FROM bind_codes WHERE code_hash = ?1 AND used_at IS NULL AND expires_at >= ?2",
                        params![hash, now],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((hmac_hash, platform_key)) = row else { return Ok(None) };
                let public = get_setting(conn, "public_url")?.unwrap_or_default();
                let frontend = get_setting(conn, "frontend_url")?
                    .unwrap_or_else(|| keyholder_protocol::paths::DEFAULT_FRONTEND.to_string());
                if let Some(key) = platform_key.and_then(|raw| PlatformPublicKey::parse(&raw).ok()) {
                    return Ok(Some(binding::registration_url_for_platform_key(
                        &frontend, &code, &public, key.key_id(),
                    )));
                }
                Ok(Some(binding::registration_url_for_hash(&frontend, &code, &public, &hmac_hash)))
            })
            .await?)
    }
}
