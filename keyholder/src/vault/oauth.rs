//! The owner's OAuth clients (`keyholder oauth set`): token URL, client id, and the client secret
//! wrapped by the master key and bound to the provider's name. Read per refresh, so changes made
//! while the server runs take effect at once.

use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use zeroize::Zeroizing;

use super::master::MasterKey;
use super::{from_store, into_store, Vault, VaultError};

/// An OAuth client usable for refreshing (no Debug: it holds the secret).
pub struct OAuthClient {
    /// Token endpoint.
    pub token_url: String,
    /// Client id.
    pub client_id: String,
    /// Client secret (public clients have none).
    pub client_secret: Option<Zeroizing<String>>,
}

/// What `keyholder oauth list` shows (never the secret).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderInfo {
    /// Provider name.
    pub name: String,
    /// Token endpoint.
    pub token_url: String,
    /// Client id.
    pub client_id: String,
    /// Unix time of the last change.
    pub updated_at: i64,
}

pub(crate) fn wrap_kind(name: &str) -> String {
    format!("oauth:{name}")
}

/// Refuses provider names that are empty, long or unusual.
pub fn validate_provider_name(name: &str) -> Result<(), VaultError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(VaultError::Invalid(
            "provider names are 1-64 characters of A-Z a-z 0-9 . _ -".into(),
        ))
    }
}

/// Creates or replaces a provider's client.
pub fn set_provider(
    conn: &Connection,
    master: &MasterKey,
    name: &str,
    token_url: &str,
    client_id: &str,
    client_secret: &[u8],
) -> Result<(), VaultError> {
    validate_provider_name(name)?;
    let wrapped = master.wrap(&wrap_kind(name), 1, client_secret)?;
    conn.execute(
        "INSERT INTO oauth_providers(name, token_url, client_id, wrapped_secret, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(name) DO UPDATE SET token_url = excluded.token_url, client_id = excluded.client_id,
           wrapped_secret = excluded.wrapped_secret, updated_at = excluded.updated_at",
        params![name, token_url, client_id, wrapped, crate::clock::now_unix()],
    )?;
    Ok(())
}

/// Every configured provider.
pub fn list_providers(conn: &Connection) -> Result<Vec<ProviderInfo>, VaultError> {
    let mut stmt = conn.prepare(
        "SELECT name, token_url, client_id, updated_at FROM oauth_providers ORDER BY name",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(ProviderInfo {
                name: r.get(0)?,
                token_url: r.get(1)?,
                client_id: r.get(2)?,
                updated_at: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Removes a provider; true if it existed.
pub fn remove_provider(conn: &Connection, name: &str) -> Result<bool, VaultError> {
    Ok(conn.execute("DELETE FROM oauth_providers WHERE name = ?1", [name])? > 0)
}

fn load_provider(
    conn: &Connection,
    master: &MasterKey,
    name: &str,
) -> Result<Option<OAuthClient>, VaultError> {
    let row = conn
        .query_row(
            "SELECT token_url, client_id, wrapped_secret FROM oauth_providers WHERE name = ?1",
            [name],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            },
        )
        .optional()?;
    let Some((token_url, client_id, wrapped)) = row else {
        return Ok(None);
    };
    let secret = master.unwrap_key(&wrap_kind(name), 1, &wrapped)?;
    let secret = std::str::from_utf8(&secret)
        .map_err(|_| VaultError::Corrupt("OAuth client secret is not UTF-8".into()))?;
    Ok(Some(OAuthClient {
        token_url,
        client_id,
        client_secret: (!secret.is_empty()).then(|| Zeroizing::new(secret.to_string())),
    }))
}

impl Vault {
    /// The owner's OAuth client for `provider`, if configured.
    pub async fn oauth_client(&self, provider: &str) -> Result<Option<OAuthClient>, VaultError> {
        if validate_provider_name(provider).is_err() {
            return Ok(None);
        }
        let master: Arc<MasterKey> = self.master();
        let name = provider.to_string();
        self.store()
            .read(move |conn| load_provider(conn, &master, &name).map_err(into_store))
            .await
            .map_err(from_store)
    }
}
