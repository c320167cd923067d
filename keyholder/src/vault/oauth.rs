//! The owner's OAuth clients (`keyholder oauth set`): token URL, client id, and the client secret
//! wrapped by the master key and bound to the provider's name. Read per refresh, so changes made
//! while the server runs take effect at once.

use serde::Serialize;
use zeroize::Zeroizing;

use super::master::MasterKey;
use super::VaultError;
use crate::storage::{ChangeSet, OAuthClientRow, Storage, Write};

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

/// Creates or replaces a provider's client: the owner change to apply.
pub fn set_provider(
    master: &MasterKey,
    name: &str,
    token_url: &str,
    client_id: &str,
    client_secret: &[u8],
) -> Result<ChangeSet, VaultError> {
    validate_provider_name(name)?;
    let wrapped = master.wrap(&wrap_kind(name), 1, client_secret)?;
    Ok(
        ChangeSet::owner().write(Write::PutOAuthClient(OAuthClientRow {
            name: name.to_string(),
            token_url: token_url.to_string(),
            client_id: client_id.to_string(),
            wrapped_secret: wrapped,
            updated_at: crate::clock::now_unix(),
        })),
    )
}

/// Every configured provider.
pub async fn list_providers(storage: &dyn Storage) -> Result<Vec<ProviderInfo>, VaultError> {
    Ok(storage
        .oauth_clients()
        .await?
        .into_iter()
        .map(|row| ProviderInfo {
            name: row.name,
            token_url: row.token_url,
            client_id: row.client_id,
            updated_at: row.updated_at,
        })
        .collect())
}

/// Removes a provider: the owner change to apply (its write reports whether it existed).
pub fn remove_provider(name: &str) -> ChangeSet {
    ChangeSet::owner().write(Write::RemoveOAuthClient(name.to_string()))
}

fn open_provider(master: &MasterKey, row: OAuthClientRow) -> Result<OAuthClient, VaultError> {
    let secret = master.unwrap_key(&wrap_kind(&row.name), 1, &row.wrapped_secret)?;
    let secret = std::str::from_utf8(&secret)
        .map_err(|_| VaultError::Corrupt("OAuth client secret is not UTF-8".into()))?;
    Ok(OAuthClient {
        token_url: row.token_url,
        client_id: row.client_id,
        client_secret: (!secret.is_empty()).then(|| Zeroizing::new(secret.to_string())),
    })
}

/// The owner's OAuth client for `provider`, if configured (its secret unwrapped with `master`).
pub async fn oauth_client(
    storage: &dyn Storage,
    master: &MasterKey,
    provider: &str,
) -> Result<Option<OAuthClient>, VaultError> {
    if validate_provider_name(provider).is_err() {
        return Ok(None);
    }
    let Some(row) = storage.oauth_client(provider).await? else {
        return Ok(None);
    };
    open_provider(master, row).map(Some)
}
