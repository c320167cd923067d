//! Audit retention: removes entries older than the configured age, behind a signed prune entry,
//! and only after the whole chain verified (a broken chain is evidence, never pruned away).

use std::time::Duration;

use super::{Vault, VaultError};
use crate::audit;

impl Vault {
    /// Prunes audit entries older than `retention`; returns how many were removed.
    pub async fn prune_audit(&self, retention: Duration) -> Result<u64, VaultError> {
        let age_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let before_ms = audit::now_ms().saturating_sub(age_ms);
        let key = self.keys().identity().verifying_key();
        if self.storage().prune_boundary(before_ms).await?.is_none() {
            return Ok(0);
        }
        let chains = self.storage().verify_audit_chains(key).await?;
        if let Some(problem) = chains.into_iter().find_map(|(_, v)| v.problem) {
            return Err(VaultError::Corrupt(format!(
                "the audit chain does not verify at #{} ({}); run `keyholder audit verify`",
                problem.seq, problem.reason
            )));
        }
        let ring: crate::storage::SharedSigner = self.keys();
        Ok(self
            .storage()
            .prune_audit(before_ms, ring, "retention")
            .await?)
    }
}
