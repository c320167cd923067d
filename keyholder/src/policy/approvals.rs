//! Uses held open for the owner's approval (`--approval`). A held use is a row the owner's CLI
//! lists (`keyholder approvals`) and decides (`keyholder approve|deny ID`, which bumps the owner
//! generation); the server wakes the waiting request when it picks the change up. No answer
//! within the policy's timeout is a denial. Nothing is decrypted before the approval.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::store::{Store, StoreError};
use crate::vault::VaultError;

/// A use waiting for the owner.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingApproval {
    /// One-time id (`apr_` and 16 hex digits).
    pub id: String,
    /// The policies asking for approval.
    pub policy: String,
    /// The service.
    pub service: String,
    /// The ticket's agent id (empty: none).
    pub agent: String,
    /// The client address (empty: unknown).
    pub client: String,
    /// The endpoint.
    pub endpoint: String,
    /// Unix seconds when it was asked.
    pub created_at: i64,
    /// Unix seconds when it is denied unless decided.
    pub expires_at: i64,
}

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

fn parse_decision(text: &str) -> Decision {
    match text {
        "approved" => Decision::Approved,
        "denied" => Decision::Denied,
        _ => Decision::TimedOut,
    }
}

/// A fresh approval id.
pub fn new_id() -> String {
    format!("apr_{}", hex::encode(rand::random::<[u8; 8]>()))
}

impl Approvals {
    /// Records `pending` and waits for the owner's decision until its expiry.
    pub async fn hold(
        &self,
        store: &Store,
        pending: PendingApproval,
        link_hash: [u8; 32],
    ) -> Result<Decision, VaultError> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.insert(pending.id.clone(), tx);
        }
        let id = pending.id.clone();
        let wait = Duration::from_secs((pending.expires_at - pending.created_at).max(1) as u64);
        let row = pending.clone();
        let inserted = store
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO policy_approvals (id, policy, service, agent, client, endpoint, created_at, expires_at, link_hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![row.id, row.policy, row.service, row.agent, row.client, row.endpoint, row.created_at, row.expires_at, link_hash.to_vec()],
                )?;
                Ok(())
            })
            .await;
        if let Err(err) = inserted {
            self.forget(&id);
            return Err(err.into());
        }
        let decision = match tokio::time::timeout(wait, rx).await {
            Ok(Ok(decision)) => decision,
            // Timed out (or the waiter was dropped): close it unless the owner decided just now.
            _ => {
                self.forget(&id);
                let id = id.clone();
                store
                    .write(move |conn| {
                        let changed = conn.execute(
                            "UPDATE policy_approvals SET decision = 'timeout', decided_at = ?2
                             WHERE id = ?1 AND decision IS NULL",
                            params![id, crate::clock::now_unix()],
                        )?;
                        if changed > 0 {
                            return Ok(Decision::TimedOut);
                        }
                        Ok(decision_of(conn, &id)?.unwrap_or(Decision::TimedOut))
                    })
                    .await?
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
    pub async fn wake_decided(&self, store: &Store) -> Result<(), StoreError> {
        let ids: Vec<String> = match self.waiters.lock() {
            Ok(waiters) if !waiters.is_empty() => waiters.keys().cloned().collect(),
            _ => return Ok(()),
        };
        let decided = store
            .read(move |conn| {
                let mut out = Vec::new();
                for id in ids {
                    if let Some(d) = decision_of(conn, &id)? {
                        out.push((id, d));
                    }
                }
                Ok(out)
            })
            .await?;
        if let Ok(mut waiters) = self.waiters.lock() {
            for (id, decision) in decided {
                if let Some(tx) = waiters.remove(&id) {
                    let _ = tx.send(decision);
                }
            }
        }
        Ok(())
    }
}

fn decision_of(conn: &Connection, id: &str) -> Result<Option<Decision>, StoreError> {
    let text: Option<Option<String>> = conn
        .query_row(
            "SELECT decision FROM policy_approvals WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(text.flatten().map(|t| parse_decision(&t)))
}

/// Uses waiting for the owner now (the CLI's `keyholder approvals`).
pub fn list_pending(conn: &Connection, now: i64) -> Result<Vec<PendingApproval>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, policy, service, agent, client, endpoint, created_at, expires_at
         FROM policy_approvals WHERE decision IS NULL AND expires_at > ?1 ORDER BY created_at, id",
    )?;
    let rows = stmt.query_map([now], |r| {
        Ok(PendingApproval {
            id: r.get(0)?,
            policy: r.get(1)?,
            service: r.get(2)?,
            agent: r.get(3)?,
            client: r.get(4)?,
            endpoint: r.get(5)?,
            created_at: r.get(6)?,
            expires_at: r.get(7)?,
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>().map_err(Into::into)
}

/// Decides a pending use (the owner's `approve`/`deny`): false if it is unknown, already decided
/// or expired. Old decided rows are pruned on the way.
pub fn decide(conn: &Connection, id: &str, approve: bool, now: i64) -> Result<bool, StoreError> {
    let changed = conn.execute(
        "UPDATE policy_approvals SET decision = ?2, decided_at = ?3
         WHERE id = ?1 AND decision IS NULL AND expires_at > ?3",
        params![id, if approve { "approved" } else { "denied" }, now],
    )?;
    conn.execute(
        "DELETE FROM policy_approvals WHERE expires_at < ?1",
        [now - 86_400],
    )?;
    Ok(changed > 0)
}

/// The pending use `id` if `token` is its link's token (compared in constant time).
pub fn pending_for_link(
    conn: &Connection,
    id: &str,
    token: &str,
    now: i64,
) -> Result<Option<PendingApproval>, StoreError> {
    use sha2::Digest as _;
    use subtle::ConstantTimeEq as _;
    let row: Option<(Vec<u8>, PendingApproval)> = conn
        .query_row(
            "SELECT link_hash, id, policy, service, agent, client, endpoint, created_at, expires_at
             FROM policy_approvals WHERE id = ?1 AND decision IS NULL AND expires_at > ?2",
            params![id, now],
            |r| {
                Ok((
                    r.get(0)?,
                    PendingApproval {
                        id: r.get(1)?,
                        policy: r.get(2)?,
                        service: r.get(3)?,
                        agent: r.get(4)?,
                        client: r.get(5)?,
                        endpoint: r.get(6)?,
                        created_at: r.get(7)?,
                        expires_at: r.get(8)?,
                    },
                ))
            },
        )
        .optional()?;
    let Some((stored, pending)) = row else {
        return Ok(None);
    };
    let given = sha2::Sha256::digest(token.as_bytes());
    Ok(bool::from(stored.as_slice().ct_eq(given.as_slice())).then_some(pending))
}
