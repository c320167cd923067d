//! Uses held open for the owner's approval (`--approval`). A held use is a row the owner's CLI
//! lists (`keyholder approvals`) and decides (`keyholder approve|deny ID`, which bumps the owner
//! generation); the server wakes the waiting request when it picks the change up. No answer
//! within the policy's timeout is a denial. Nothing is decrypted before the approval.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::storage::{ApprovalDecision, ApprovalRow, Storage, StorageError};
use crate::vault::VaultError;

/// A use waiting for the owner (as stored: see [`ApprovalRow`]).
pub type PendingApproval = ApprovalRow;

/// How a held use ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The owner approved.
    Approved,
    /// The owner denied.
    Denied,
    /// No decision in time.
    TimedOut,
}

/// The requests waiting on this server.
#[derive(Default)]
pub struct Approvals {
    waiters: Mutex<HashMap<String, oneshot::Sender<Decision>>>,
}

impl From<ApprovalDecision> for Decision {
    fn from(decision: ApprovalDecision) -> Decision {
        match decision {
            ApprovalDecision::Approved => Decision::Approved,
            ApprovalDecision::Denied => Decision::Denied,
            ApprovalDecision::TimedOut => Decision::TimedOut,
        }
    }
}

/// A fresh approval id.
pub fn new_id() -> String {
    format!("apr_{}", hex::encode(rand::random::<[u8; 8]>()))
}

impl Approvals {
    /// Records `pending`, then calls `recorded` (the owner's notification: its link must find the
    /// approval, so it goes out only once the row is committed), and waits for the owner's
    /// decision until its expiry.
    pub async fn hold(
        &self,
        storage: &dyn Storage,
        pending: PendingApproval,
        link_hash: [u8; 32],
        recorded: impl FnOnce(),
    ) -> Result<Decision, VaultError> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.insert(pending.id.clone(), tx);
        }
        let id = pending.id.clone();
        let wait = Duration::from_secs((pending.expires_at - pending.created_at).max(1) as u64);
        let inserted = storage.insert_approval(pending, link_hash).await;
        if let Err(err) = inserted {
            self.forget(&id);
            return Err(err.into());
        }
        recorded();
        let decision = match tokio::time::timeout(wait, rx).await {
            Ok(Ok(decision)) => decision,
            // Timed out (or the waiter was dropped): close it unless the owner decided just now.
            _ => {
                self.forget(&id);
                storage
                    .time_out_approval(&id, crate::clock::now_unix())
                    .await?
                    .into()
            }
        };
        Ok(decision)
    }

    fn forget(&self, id: &str) {
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.remove(id);
        }
    }

    /// Wakes the requests whose approval the owner decided (after an owner-generation change).
    pub async fn wake_decided(&self, storage: &dyn Storage) -> Result<(), StorageError> {
        let ids: Vec<String> = match self.waiters.lock() {
            Ok(waiters) if !waiters.is_empty() => waiters.keys().cloned().collect(),
            _ => return Ok(()),
        };
        let decided = storage.approval_decisions(&ids).await?;
        if let Ok(mut waiters) = self.waiters.lock() {
            for (id, decision) in decided {
                if let Some(tx) = waiters.remove(&id) {
                    let _ = tx.send(decision.into());
                }
            }
        }
        Ok(())
    }
}

/// Uses waiting for the owner now (the CLI's `keyholder approvals`).
pub async fn list_pending(
    storage: &dyn Storage,
    now: i64,
) -> Result<Vec<PendingApproval>, StorageError> {
    storage.pending_approvals(now).await
}

/// The pending use `id` if `token` is its link's token (compared in constant time).
pub async fn pending_for_link(
    storage: &dyn Storage,
    id: &str,
    token: &str,
    now: i64,
) -> Result<Option<PendingApproval>, StorageError> {
    use sha2::Digest as _;
    use subtle::ConstantTimeEq as _;
    let Some((pending, stored)) = storage.pending_approval(id, now).await? else {
        return Ok(None);
    };
    let given = sha2::Sha256::digest(token.as_bytes());
    Ok(bool::from(stored.as_slice().ct_eq(given.as_slice())).then_some(pending))
}
