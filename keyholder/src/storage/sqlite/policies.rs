//! Policies, attachments, usage counts and approvals over `policies`, `policy_attachments`,
//! `policy_usage` and `policy_approvals`.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{signed, unsigned, SqliteStorage};
use crate::storage::{
    grant_capped_uses, ApprovalDecision, ApprovalRow, AttachmentRow, CappedUse, PolicyRow,
    PolicySnapshot, PolicyStore, StorageResult, UsageCommit, UsageCounter, UsageTake,
};

fn decision(text: &str) -> ApprovalDecision {
    match text {
        "approved" => ApprovalDecision::Approved,
        "denied" => ApprovalDecision::Denied,
        _ => ApprovalDecision::TimedOut,
    }
}

fn decision_of(conn: &Connection, id: &str) -> StorageResult<Option<ApprovalDecision>> {
    let text: Option<Option<String>> = conn
        .query_row(
            "SELECT decision FROM policy_approvals WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(text.flatten().map(|t| decision(&t)))
}

const APPROVAL_COLUMNS: &str =
    "id, policy, service, agent, client, endpoint, created_at, expires_at";

fn approval_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<ApprovalRow> {
    Ok(ApprovalRow {
        id: r.get(at)?,
        policy: r.get(at + 1)?,
        service: r.get(at + 2)?,
        agent: r.get(at + 3)?,
        client: r.get(at + 4)?,
        endpoint: r.get(at + 5)?,
        created_at: r.get(at + 6)?,
        expires_at: r.get(at + 7)?,
    })
}

/// Decides an approval in the caller's transaction; prunes rows expired over a day ago.
pub(super) fn decide(conn: &Connection, id: &str, approve: bool, now: i64) -> StorageResult<bool> {
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

/// Whether an approval is undecided and unexpired.
pub(super) fn is_pending(conn: &Connection, id: &str, now: i64) -> StorageResult<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM policy_approvals WHERE id = ?1 AND decision IS NULL AND expires_at > ?2",
            params![id, now],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .is_some())
}

pub(super) fn snapshot(conn: &Connection) -> StorageResult<PolicySnapshot> {
    let mut stmt = conn.prepare("SELECT name, rules, source FROM policies ORDER BY name")?;
    let policies = stmt
        .query_map([], |r| {
            Ok(PolicyRow {
                name: r.get(0)?,
                rules: r.get(1)?,
                source: r.get(2)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = conn.prepare(
        "SELECT policy, kind, target, source FROM policy_attachments ORDER BY policy, kind, target",
    )?;
    let attachments = stmt
        .query_map([], |r| {
            Ok(AttachmentRow {
                policy: r.get(0)?,
                kind: r.get(1)?,
                target: r.get(2)?,
                source: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = conn.prepare("SELECT policy, target, period, count FROM policy_usage")?;
    let usage = stmt
        .query_map([], |r| {
            Ok((
                UsageCounter {
                    policy: r.get(0)?,
                    target: r.get(1)?,
                    period: r.get(2)?,
                },
                unsigned(r.get(3)?),
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PolicySnapshot {
        policies,
        attachments,
        usage,
    })
}

#[async_trait]
impl PolicyStore for SqliteStorage {
    async fn policy_snapshot(&self) -> StorageResult<PolicySnapshot> {
        self.db.read(snapshot).await
    }

    async fn add_usage(&self, increments: Vec<(UsageCounter, u64)>) -> StorageResult<Vec<u64>> {
        // One job in the group commit; its savepoint makes the batch all or none.
        self.db
            .write(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "INSERT INTO policy_usage (policy, target, period, count) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(policy, target, period) DO UPDATE SET count = count + ?4
                     RETURNING count",
                )?;
                increments
                    .iter()
                    .map(|(key, n)| {
                        let count: i64 = stmt.query_row(
                            params![key.policy, key.target, key.period, signed(*n)],
                            |r| r.get(0),
                        )?;
                        Ok(unsigned(count))
                    })
                    .collect()
            })
            .await
    }

    fn queue_usage(&self, take: UsageTake) -> UsageCommit {
        // The job's savepoint makes the batch all or none, whatever else shares the commit.
        self.db.submit_unit(move |conn| {
            let mut stmt = conn.prepare_cached(
                "INSERT INTO policy_usage (policy, target, period, count) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(policy, target, period) DO UPDATE SET count = count + ?4",
            )?;
            for (key, n) in take() {
                stmt.execute(params![key.policy, key.target, key.period, signed(n)])?;
            }
            Ok(())
        })
    }

    async fn take_capped_uses(&self, uses: Vec<CappedUse>) -> StorageResult<Vec<Option<usize>>> {
        // One job of the single writer: read, decide and write under its savepoint. (The serving
        // domain keeps SQLite's counts in memory, this process being their only writer; this is
        // the interface's exact path, for any caller.)
        self.db
            .write(move |conn| {
                let mut counts = std::collections::HashMap::new();
                {
                    let mut read = conn.prepare_cached(
                        "SELECT count FROM policy_usage
                         WHERE policy = ?1 AND target = ?2 AND period = ?3",
                    )?;
                    for (key, _) in uses.iter().flatten() {
                        if !counts.contains_key(key) {
                            let count: Option<i64> = read
                                .query_row(params![key.policy, key.target, key.period], |r| {
                                    r.get(0)
                                })
                                .optional()?;
                            counts.insert(key.clone(), count.map(unsigned).unwrap_or(0));
                        }
                    }
                }
                let before = counts.clone();
                let taken = grant_capped_uses(&uses, &mut counts);
                let mut write = conn.prepare_cached(
                    "INSERT INTO policy_usage (policy, target, period, count) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(policy, target, period) DO UPDATE SET count = ?4",
                )?;
                for (key, count) in &counts {
                    if before.get(key) != Some(count) {
                        write.execute(params![key.policy, key.target, key.period, signed(*count)])?;
                    }
                }
                Ok(taken)
            })
            .await
    }

    async fn release_usage(&self, counters: Vec<UsageCounter>) -> StorageResult<()> {
        self.db
            .write(move |conn| {
                for key in &counters {
                    conn.execute(
                        "UPDATE policy_usage SET count = MAX(count - 1, 0)
                         WHERE policy = ?1 AND target = ?2 AND period = ?3",
                        params![key.policy, key.target, key.period],
                    )?;
                }
                Ok(())
            })
            .await
    }

    async fn usage_of(&self, policy: &str) -> StorageResult<Vec<(String, String, u64)>> {
        let policy = policy.to_string();
        self.db
            .read(move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT target, period, count FROM policy_usage WHERE policy = ?1
                     ORDER BY target, period",
                )?;
                let rows = stmt
                    .query_map([policy], |r| {
                        Ok((r.get(0)?, r.get(1)?, unsigned(r.get(2)?)))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
    }

    async fn insert_approval(&self, row: ApprovalRow, link_hash: [u8; 32]) -> StorageResult<()> {
        self.db
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO policy_approvals (id, policy, service, agent, client, endpoint,
                                                   created_at, expires_at, link_hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        row.id,
                        row.policy,
                        row.service,
                        row.agent,
                        row.client,
                        row.endpoint,
                        row.created_at,
                        row.expires_at,
                        link_hash.as_slice()
                    ],
                )?;
                Ok(())
            })
            .await
    }

    async fn time_out_approval(&self, id: &str, now: i64) -> StorageResult<ApprovalDecision> {
        let id = id.to_string();
        self.db
            .write(move |conn| {
                let changed = conn.execute(
                    "UPDATE policy_approvals SET decision = 'timeout', decided_at = ?2
                     WHERE id = ?1 AND decision IS NULL",
                    params![id, now],
                )?;
                if changed > 0 {
                    return Ok(ApprovalDecision::TimedOut);
                }
                Ok(decision_of(conn, &id)?.unwrap_or(ApprovalDecision::TimedOut))
            })
            .await
    }

    async fn approval_decisions(
        &self,
        ids: &[String],
    ) -> StorageResult<Vec<(String, ApprovalDecision)>> {
        let ids = ids.to_vec();
        self.db
            .read(move |conn| {
                let mut out = Vec::new();
                for id in ids {
                    if let Some(decision) = decision_of(conn, &id)? {
                        out.push((id, decision));
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn pending_approvals(&self, now: i64) -> StorageResult<Vec<ApprovalRow>> {
        self.db
            .read(move |conn| {
                let mut stmt = conn.prepare(&format!(
                    "SELECT {APPROVAL_COLUMNS} FROM policy_approvals
                     WHERE decision IS NULL AND expires_at > ?1 ORDER BY created_at, id"
                ))?;
                let rows = stmt
                    .query_map([now], |r| approval_at(r, 0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
    }

    async fn pending_approval(
        &self,
        id: &str,
        now: i64,
    ) -> StorageResult<Option<(ApprovalRow, [u8; 32])>> {
        let id = id.to_string();
        self.db
            .read(move |conn| {
                let row: Option<(Vec<u8>, ApprovalRow)> = conn
                    .query_row(
                        &format!(
                            "SELECT link_hash, {APPROVAL_COLUMNS} FROM policy_approvals
                             WHERE id = ?1 AND decision IS NULL AND expires_at > ?2"
                        ),
                        params![id, now],
                        |r| Ok((r.get(0)?, approval_at(r, 1)?)),
                    )
                    .optional()?;
                // A hash of another length matches no token.
                Ok(row.and_then(|(hash, row)| Some((row, hash.as_slice().try_into().ok()?))))
            })
            .await
    }

    async fn decide_approval(&self, id: &str, approve: bool, now: i64) -> StorageResult<bool> {
        let id = id.to_string();
        self.db
            .write(move |conn| decide(conn, &id, approve, now))
            .await
    }
}
