//! The platform's Ed25519 public keys of an asymmetric binding and the scheme in force (HMAC or
//! Ed25519). Only public keys are stored: nothing in the data folder can sign as the platform.
//! Every change bumps the owner generation, so a running server picks it up within a quarter second.

use keyholder_protocol::envelope::MAX_PLATFORM_KEYS;
use keyholder_protocol::PlatformPublicKey;
use rusqlite::{params, Connection};

use super::reload::bump_generation;
use super::VaultError;
use crate::store::{get_setting, put_setting};

/// Setting naming the scheme the platform authenticates with: `hmac` (default) or `ed25519`.
pub const SCHEME_SETTING: &str = "platform_scheme";

/// How the bound platform authenticates (one scheme per binding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformScheme {
    /// Token Vault's HMAC signatures and platform tickets (the default).
    Hmac,
    /// Ed25519 request envelopes and `kh2` tickets.
    Ed25519,
}

impl PlatformScheme {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            PlatformScheme::Hmac => "hmac",
            PlatformScheme::Ed25519 => "ed25519",
        }
    }
}

/// An active platform key, as `keyholder platform-key list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlatformKeyInfo {
    /// Key id (16 hex).
    pub key_id: String,
    /// Standard base64 of the public key.
    pub public_key: String,
    /// Unix time it was added.
    pub added_at: i64,
}

/// The scheme in force.
pub fn read_scheme(conn: &Connection) -> Result<PlatformScheme, VaultError> {
    Ok(match get_setting(conn, SCHEME_SETTING)?.as_deref() {
        Some("ed25519") => PlatformScheme::Ed25519,
        _ => PlatformScheme::Hmac,
    })
}

/// The scheme and the active platform keys (oldest first).
pub fn load(conn: &Connection) -> Result<(PlatformScheme, Vec<PlatformPublicKey>), VaultError> {
    let scheme = read_scheme(conn)?;
    let keys = list(conn)?
        .into_iter()
        .map(|(info, key)| {
            if key.key_id() != info.key_id {
                return Err(VaultError::Corrupt("platform key id".into()));
            }
            Ok(key)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((scheme, keys))
}

fn list(conn: &Connection) -> Result<Vec<(PlatformKeyInfo, PlatformPublicKey)>, VaultError> {
    let mut stmt = conn.prepare(
        "SELECT key_id, public_key, added_at FROM platform_keys ORDER BY added_at, key_id",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(key_id, bytes, added_at)| {
            let key = PlatformPublicKey::parse(&bytes)
                .map_err(|_| VaultError::Corrupt("platform key".into()))?;
            Ok((
                PlatformKeyInfo {
                    key_id,
                    public_key: key.to_base64(),
                    added_at,
                },
                key,
            ))
        })
        .collect()
}

/// `keyholder platform-key list`.
pub fn list_keys(conn: &Connection) -> Result<Vec<PlatformKeyInfo>, VaultError> {
    Ok(list(conn)?.into_iter().map(|(info, _)| info).collect())
}

fn insert(conn: &Connection, key: &PlatformPublicKey, now: i64) -> Result<(), VaultError> {
    conn.execute(
        "INSERT INTO platform_keys(key_id, public_key, added_at) VALUES (?1, ?2, ?3)",
        params![key.key_id(), key.as_bytes().as_slice(), now],
    )?;
    Ok(())
}

/// Makes `key` the only platform key and switches to the Ed25519 scheme (an asymmetric exchange).
pub fn install_for_binding(
    conn: &Connection,
    key: &PlatformPublicKey,
    now: i64,
) -> Result<(), VaultError> {
    conn.execute("DELETE FROM platform_keys", [])?;
    insert(conn, key, now)?;
    put_setting(conn, SCHEME_SETTING, PlatformScheme::Ed25519.as_str())?;
    Ok(())
}

/// Switches to the HMAC scheme and forgets every platform key (an HMAC exchange).
pub fn switch_to_hmac(conn: &Connection) -> Result<(), VaultError> {
    conn.execute("DELETE FROM platform_keys", [])?;
    put_setting(conn, SCHEME_SETTING, PlatformScheme::Hmac.as_str())?;
    Ok(())
}

fn require_asymmetric(conn: &Connection) -> Result<(), VaultError> {
    let bound = get_setting(conn, "bound")?.as_deref() == Some("true");
    if !bound || read_scheme(conn)? != PlatformScheme::Ed25519 {
        return Err(VaultError::Invalid(
            "this keyholder is not bound asymmetrically; bind first with `keyholder bind --platform-key FILE`"
                .into(),
        ));
    }
    Ok(())
}

/// `keyholder platform-key add`: a second active key (rotation). Refused unless the binding is
/// asymmetric, when the key is already active, or when two keys are active already.
pub fn add_key(conn: &Connection, key: &PlatformPublicKey, now: i64) -> Result<(), VaultError> {
    require_asymmetric(conn)?;
    let active = list(conn)?;
    if active.iter().any(|(info, _)| info.key_id == key.key_id()) {
        return Err(VaultError::Invalid(format!(
            "platform key {} is already active",
            key.key_id()
        )));
    }
    if active.len() >= MAX_PLATFORM_KEYS {
        return Err(VaultError::Invalid(format!(
            "{MAX_PLATFORM_KEYS} platform keys are active already; remove one first"
        )));
    }
    insert(conn, key, now)?;
    bump_generation(conn)?;
    Ok(())
}

/// `keyholder platform-key remove`: the key stops verifying at once. The last key cannot be removed
/// (that would lock the platform out; re-bind instead).
pub fn remove_key(conn: &Connection, key_id: &str) -> Result<(), VaultError> {
    require_asymmetric(conn)?;
    let active = list(conn)?;
    if !active.iter().any(|(info, _)| info.key_id == key_id) {
        return Err(VaultError::Invalid(format!(
            "no active platform key {key_id}"
        )));
    }
    if active.len() <= 1 {
        return Err(VaultError::Invalid(
            "this is the only platform key; add its successor first (or re-bind)".into(),
        ));
    }
    conn.execute("DELETE FROM platform_keys WHERE key_id = ?1", [key_id])?;
    bump_generation(conn)?;
    Ok(())
}
