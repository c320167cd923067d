//! Signing configurations over `sign_configs` (migration 10).

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension as _};

use super::SqliteStorage;
use crate::storage::{SignConfigs, StorageResult};

/// Writes (replaces) the configuration of `service`.
pub(super) fn put(
    conn: &Connection,
    service: &str,
    config: &str,
    now: i64,
) -> StorageResult<usize> {
    Ok(conn.execute(
        "INSERT INTO sign_configs (service, config, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(service) DO UPDATE SET config = excluded.config, updated_at = excluded.updated_at",
        params![service, config, now],
    )?)
}

/// Removes the configuration of `service`.
pub(super) fn delete(conn: &Connection, service: &str) -> StorageResult<usize> {
    Ok(conn.execute("DELETE FROM sign_configs WHERE service = ?1", [service])?)
}

#[async_trait]
impl SignConfigs for SqliteStorage {
    async fn sign_config(&self, service: &str) -> StorageResult<Option<String>> {
        let service = service.to_string();
        self.db
            .read(move |conn| {
                Ok(conn
                    .prepare_cached("SELECT config FROM sign_configs WHERE service = ?1")?
                    .query_row([&service], |r| r.get(0))
                    .optional()?)
            })
            .await
    }

    async fn sign_configs(&self) -> StorageResult<Vec<(String, String)>> {
        self.db
            .read(|conn| {
                let mut stmt =
                    conn.prepare("SELECT service, config FROM sign_configs ORDER BY service")?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
    }
}
