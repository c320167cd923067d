//! Audit retention: removes entries older than the configured age, behind a signed prune entry,
//! and only after the whole chain verified (a broken chain is evidence, never pruned away).

use std::time::Duration;

use super::key_handle::KeyHandle;
use super::VaultError;
use crate::audit;
use crate::storage::Storage;

/// Prunes audit entries older than `retention`, signing the prune entry with the key ring in
/// force; returns how many were removed.
pub async fn prune_audit(
    storage: &dyn Storage,
    keys: &KeyHandle,
    retention: Duration,
) -> Result<u64, VaultError> {
    let age_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let before_ms = audit::now_ms().saturating_sub(age_ms);
    let key = keys.keys().identity().verifying_key();
    if storage.prune_boundary(before_ms).await?.is_none() {
        return Ok(0);
    }
    let chains = storage.verify_audit_chains(key).await?;
    if let Some(problem) = chains.into_iter().find_map(|(_, v)| v.problem) {
        return Err(VaultError::Corrupt(format!(
            "the audit chain does not verify at #{} ({}); run `keyholder audit verify`",
            problem.seq, problem.reason
        )));
    }
    let ring: crate::storage::SharedSigner = keys.keys();
    Ok(storage.prune_audit(before_ms, ring, "retention").await?)
}
