//! Audit retention: removes entries older than the configured age, behind a signed prune entry,
//! and only after the whole chain verified (a broken chain is evidence, never pruned away).

use std::time::Duration;

use super::{Vault, VaultError};
use crate::audit::{self, PruneBoundary};

impl Vault {
    /// Prunes audit entries older than `retention`; returns how many were removed.
    pub async fn prune_audit(&self, retention: Duration) -> Result<u64, VaultError> {
        let age_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let before_ms = audit::now_ms().saturating_sub(age_ms);
        let key = self.keys().identity().verifying_key();
        let Some(boundary) = self.storage().prune_boundary(before_ms).await? else {
            return Ok(0);
        };
        let verification = self.storage().verify_audit(key).await?;
        if let Some(problem) = verification.problem {
            return Err(VaultError::Corrupt(format!(
                "the audit chain does not verify at #{} ({}); run `keyholder audit verify`",
                problem.seq, problem.reason
            )));
        }
        let ring: crate::storage::SharedSigner = self.keys();
        self.storage()
            .append_audit(vec![audit::prune_event(boundary, "retention")], ring)
            .await?;
        self.delete_pruned(boundary).await
    }

    async fn delete_pruned(&self, boundary: PruneBoundary) -> Result<u64, VaultError> {
        let mut removed = 0;
        loop {
            let deleted = self.storage().delete_pruned(boundary).await?;
            if deleted == 0 {
                return Ok(removed);
            }
            removed += deleted;
        }
    }
}
