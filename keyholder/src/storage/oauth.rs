//! The owner's OAuth clients (client secret wrapped by the master key).

use async_trait::async_trait;

use super::StorageResult;

/// A stored OAuth client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthClientRow {
    /// Provider name.
    pub name: String,
    /// Token endpoint.
    pub token_url: String,
    /// Client id.
    pub client_id: String,
    /// Client secret wrapped by the master key.
    pub wrapped_secret: Vec<u8>,
    /// Unix time of the last change.
    pub updated_at: i64,
}

/// The OAuth-client repository. Writes go through [`super::ChangeSet`].
#[async_trait]
pub trait OAuthClients: Send + Sync {
    /// One client by provider name.
    async fn oauth_client(&self, name: &str) -> StorageResult<Option<OAuthClientRow>>;

    /// Every client, by name.
    async fn oauth_clients(&self) -> StorageResult<Vec<OAuthClientRow>>;
}
