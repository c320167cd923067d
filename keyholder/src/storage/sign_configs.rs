//! The owner's signing configurations (issue 24): one JSON document per service, parsed by
//! `vault::signing::config`. Writes go through [`super::ChangeSet`] (`Write::PutSignConfig`,
//! `Write::DeleteSignConfig`).

use async_trait::async_trait;

use super::StorageResult;

/// The signing-configuration repository.
#[async_trait]
pub trait SignConfigs: Send + Sync {
    /// The stored configuration text of `service`, if any.
    async fn sign_config(&self, service: &str) -> StorageResult<Option<String>>;

    /// Every configuration `(service, text)`, in service order.
    async fn sign_configs(&self) -> StorageResult<Vec<(String, String)>>;
}
