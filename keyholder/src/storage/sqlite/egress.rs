//! Egress policies, pins and refusals over `egress_policies`, `egress_pins`, `egress_refusals`.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::SqliteStorage;
use crate::storage::{EgressRow, EgressStore, PinRow, RefusalRow, StorageError, StorageResult};

pub(super) fn policy(
    conn: &Connection,
    service: &str,
) -> StorageResult<(Option<EgressRow>, Vec<PinRow>)> {
    let row = conn
        .prepare_cached(
            "SELECT mode, allowlist, token_url FROM egress_policies WHERE service = ?1",
        )?
        .query_row([service], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })
        .optional()?;
    let Some((mode, allowlist, token_url)) = row else {
        return Ok((None, Vec::new()));
    };
    let allowlist: Vec<String> = serde_json::from_str(&allowlist)
        .map_err(|e| StorageError::Corrupt(format!("egress allowlist of {service}: {e}")))?;
    let mut stmt = conn.prepare_cached(
        "SELECT origin, pinned_at, credential FROM egress_pins WHERE service = ?1
         ORDER BY pinned_at DESC, origin",
    )?;
    let pins = stmt
        .query_map([service], |r| {
            Ok(PinRow {
                origin: r.get(0)?,
                pinned_at: r.get(1)?,
                credential: r.get(2)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        Some(EgressRow {
            service: service.to_string(),
            mode,
            allowlist,
            token_url,
        }),
        pins,
    ))
}

/// Upserts a policy row.
pub(super) fn put_policy(conn: &Connection, row: &EgressRow, now: i64) -> StorageResult<()> {
    let allowlist =
        serde_json::to_string(&row.allowlist).map_err(|e| StorageError::Corrupt(e.to_string()))?;
    conn.execute(
        "INSERT INTO egress_policies(service, mode, allowlist, token_url, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(service) DO UPDATE SET mode = excluded.mode, allowlist = excluded.allowlist,
           token_url = excluded.token_url, updated_at = excluded.updated_at",
        params![row.service, row.mode, allowlist, row.token_url, now],
    )?;
    Ok(())
}

pub(super) fn refusals(conn: &Connection) -> StorageResult<Vec<RefusalRow>> {
    let mut stmt = conn.prepare(
        "SELECT service, origin, count, last_at FROM egress_refusals
         ORDER BY last_at DESC, service, origin",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(RefusalRow {
                service: r.get(0)?,
                origin: r.get(1)?,
                count: r.get(2)?,
                last_at: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

#[async_trait]
impl EgressStore for SqliteStorage {
    async fn egress_policy(
        &self,
        service: &str,
    ) -> StorageResult<(Option<EgressRow>, Vec<PinRow>)> {
        let service = service.to_string();
        self.db.read(move |conn| policy(conn, &service)).await
    }

    async fn egress_services(&self) -> StorageResult<Vec<String>> {
        self.db
            .read(|conn| {
                let mut stmt =
                    conn.prepare("SELECT service FROM egress_policies ORDER BY service")?;
                let rows = stmt
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                Ok(rows)
            })
            .await
    }

    async fn claim_pin(
        &self,
        service: &str,
        credential: &str,
        origin: &str,
        now: i64,
        max_pins: i64,
    ) -> StorageResult<bool> {
        let (service, credential, origin) = (
            service.to_string(),
            credential.to_string(),
            origin.to_string(),
        );
        self.db
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO egress_pins (service, credential, origin, pinned_at)
                     SELECT ?1, ?2, ?3, ?4
                     WHERE EXISTS (SELECT 1 FROM egress_policies WHERE service = ?1 AND mode = 'pinned')
                       AND EXISTS (SELECT 1 FROM documents WHERE collection = 'tokens' AND key = ?1)
                       AND (SELECT COUNT(*) FROM egress_pins WHERE service = ?1) < ?5
                     ON CONFLICT (service, credential) DO NOTHING",
                    params![service, credential, origin, now, max_pins],
                )?;
                let pinned: Option<String> = conn
                    .query_row(
                        "SELECT origin FROM egress_pins WHERE service = ?1 AND credential = ?2",
                        params![service, credential],
                        |r| r.get(0),
                    )
                    .optional()?;
                Ok(pinned.as_deref() == Some(origin.as_str()))
            })
            .await
    }

    async fn release_pin(
        &self,
        service: &str,
        credential: &str,
        origin: &str,
    ) -> StorageResult<()> {
        let (service, credential, origin) = (
            service.to_string(),
            credential.to_string(),
            origin.to_string(),
        );
        self.db
            .write(move |conn| {
                conn.execute(
                    "DELETE FROM egress_pins WHERE service = ?1 AND credential = ?2 AND origin = ?3",
                    params![service, credential, origin],
                )?;
                Ok(())
            })
            .await
    }

    async fn claim_token_url(
        &self,
        service: &str,
        token_url: &str,
        now: i64,
    ) -> StorageResult<(bool, Option<String>)> {
        let (service, token_url) = (service.to_string(), token_url.to_string());
        self.db
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO egress_policies(service, mode, updated_at) VALUES (?1, 'known', ?2)
                     ON CONFLICT(service) DO NOTHING",
                    params![service, now],
                )?;
                let claimed = conn.execute(
                    "UPDATE egress_policies SET token_url = ?2, updated_at = ?3
                     WHERE service = ?1 AND token_url IS NULL",
                    params![service, token_url, now],
                )? > 0;
                let pinned: Option<String> = conn.query_row(
                    "SELECT token_url FROM egress_policies WHERE service = ?1",
                    [&service],
                    |r| r.get(0),
                )?;
                Ok((claimed, pinned))
            })
            .await
    }

    async fn release_token_url(&self, service: &str, token_url: &str) -> StorageResult<()> {
        let (service, token_url) = (service.to_string(), token_url.to_string());
        self.db
            .write(move |conn| {
                conn.execute(
                    "UPDATE egress_policies SET token_url = NULL WHERE service = ?1 AND token_url = ?2",
                    params![service, token_url],
                )?;
                Ok(())
            })
            .await
    }

    async fn record_refusal(
        &self,
        service: &str,
        origin: &str,
        now: i64,
        max_pending: i64,
    ) -> StorageResult<()> {
        let (service, origin) = (service.to_string(), origin.to_string());
        self.db
            .write(move |conn| {
                let updated = conn.execute(
                    "UPDATE egress_refusals SET count = count + 1, last_at = ?3
                     WHERE service = ?1 AND origin = ?2",
                    params![service, origin, now],
                )?;
                if updated == 0 {
                    conn.execute(
                        "INSERT INTO egress_refusals(service, origin, count, last_at)
                         SELECT ?1, ?2, 1, ?3 WHERE (SELECT COUNT(*) FROM egress_refusals) < ?4",
                        params![service, origin, now, max_pending],
                    )?;
                }
                Ok(())
            })
            .await
    }

    async fn refusals(&self) -> StorageResult<Vec<RefusalRow>> {
        self.db.read(refusals).await
    }
}
