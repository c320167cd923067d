//! The audit trail: entries appended to a hash chain (linked and signed by the domain's
//! `audit::link_entries`), listed, verified, pruned.

use std::sync::Arc;

use async_trait::async_trait;
use ed25519_dalek::VerifyingKey;

pub use crate::audit::{AuditEntry, AuditEvent, AuditFilter, AuditVerification, PruneBoundary};

use super::StorageResult;

/// Signs the newest entry of each appended batch (the keyholder identity key).
pub trait AuditSigner: Send + Sync {
    /// Ed25519 signature over `bytes`.
    fn sign_audit(&self, bytes: &[u8]) -> [u8; 64];
}

/// A signer shared with the engine's writer.
pub type SharedSigner = Arc<dyn AuditSigner>;

/// The audit repository.
#[async_trait]
pub trait AuditLog: Send + Sync {
    /// Appends events after the chain's head (read in the same transaction, so several writers
    /// can append); returns the new head's sequence number. Durable on return.
    async fn append_audit(
        &self,
        events: Vec<AuditEvent>,
        signer: SharedSigner,
    ) -> StorageResult<u64>;

    /// Entries in chain order, filtered.
    async fn audit_entries(&self, filter: AuditFilter) -> StorageResult<Vec<AuditEntry>>;

    /// Number of entries held.
    async fn audit_count(&self) -> StorageResult<u64>;

    /// Unix time (ms) of the newest successful credential use.
    async fn last_credential_use(&self) -> StorageResult<Option<i64>>;

    /// Verifies the whole chain in one snapshot (see `audit::verify_chain`).
    async fn verify_audit(&self, key: VerifyingKey) -> StorageResult<AuditVerification>;

    /// Verifies every chain the storage holds: (node id, its verification). One chain (SQLite)
    /// has the empty node id; engines with a chain per replica override this.
    async fn verify_audit_chains(
        &self,
        key: VerifyingKey,
    ) -> StorageResult<Vec<(String, AuditVerification)>> {
        Ok(vec![(String::new(), self.verify_audit(key).await?)])
    }

    /// Prunes entries older than `before_ms` behind a signed prune entry (`source`: who asked);
    /// returns how many were removed. The caller has verified the chain first.
    async fn prune_audit(
        &self,
        before_ms: i64,
        signer: SharedSigner,
        source: &str,
    ) -> StorageResult<u64> {
        let Some(boundary) = self.prune_boundary(before_ms).await? else {
            return Ok(0);
        };
        self.append_audit(vec![crate::audit::prune_event(boundary, source)], signer)
            .await?;
        let mut removed = 0;
        loop {
            let deleted = self.delete_pruned(boundary).await?;
            if deleted == 0 {
                return Ok(removed);
            }
            removed += deleted;
        }
    }

    /// Where a prune of entries older than `before_ms` would end.
    async fn prune_boundary(&self, before_ms: i64) -> StorageResult<Option<PruneBoundary>>;

    /// Deletes a chunk of entries up to a recorded prune's boundary; 0 when none are left.
    async fn delete_pruned(&self, boundary: PruneBoundary) -> StorageResult<u64>;
}
