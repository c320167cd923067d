//! The key ring over `keyring` and `imported_v1_fields`.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::SqliteStorage;
use std::collections::HashMap;

use crate::storage::{
    ImportedField, KeyRingSnapshot, KeyRingStore, Setting, StorageError, StorageResult, WrappedKey,
};

fn key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WrappedKey> {
    Ok(WrappedKey {
        kind: r.get(0)?,
        version: r.get(1)?,
        wrapped: r.get(2)?,
        created_at: r.get(3)?,
    })
}

/// Inserts or replaces a wrapped key.
pub(super) fn put_key(conn: &Connection, key: &WrappedKey) -> StorageResult<()> {
    conn.execute(
        "INSERT INTO keyring(kind, version, wrapped, created_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(kind, version) DO UPDATE SET wrapped = excluded.wrapped",
        params![key.kind, key.version, key.wrapped, key.created_at],
    )?;
    Ok(())
}

/// The highest version of a kind (0 when none).
pub(super) fn latest_version(conn: &Connection, kind: &str) -> StorageResult<u32> {
    Ok(conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM keyring WHERE kind = ?1",
        [kind],
        |r| r.get(0),
    )?)
}

fn imported(conn: &Connection) -> StorageResult<Vec<ImportedField>> {
    let mut stmt = conn.prepare("SELECT digest, service, field FROM imported_v1_fields")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<(Vec<u8>, String, String)>, _>>()?;
    rows.into_iter()
        .map(|(digest, service, field)| {
            Ok(ImportedField {
                digest: digest.as_slice().try_into().map_err(|_| {
                    StorageError::Corrupt("imported_v1_fields digest length".into())
                })?,
                service,
                field,
            })
        })
        .collect()
}

fn keys(conn: &Connection) -> StorageResult<Vec<WrappedKey>> {
    let mut stmt = conn
        .prepare("SELECT kind, version, wrapped, created_at FROM keyring ORDER BY kind, version")?;
    let rows = stmt
        .query_map([], key_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

#[async_trait]
impl KeyRingStore for SqliteStorage {
    async fn key_ring_snapshot(&self) -> StorageResult<KeyRingSnapshot> {
        self.db
            .read(|conn| {
                // One read transaction: a rotation or exchange committing meanwhile is seen
                // whole or not at all.
                conn.execute_batch("SAVEPOINT key_ring_snapshot")?;
                let read = (|| {
                    let mut settings = HashMap::new();
                    for which in Setting::ALL {
                        if let Some(value) = super::setting(conn, which)? {
                            settings.insert(which, value);
                        }
                    }
                    Ok(KeyRingSnapshot {
                        settings,
                        keys: keys(conn)?,
                        imported: imported(conn)?,
                        platform_keys: super::binding::platform_keys(conn)?,
                    })
                })();
                conn.execute_batch("RELEASE key_ring_snapshot")?;
                read
            })
            .await
    }

    async fn wrapped_keys(&self) -> StorageResult<Vec<WrappedKey>> {
        self.db.read(keys).await
    }

    async fn wrapped_key(&self, kind: &str, version: u32) -> StorageResult<Option<WrappedKey>> {
        let kind = kind.to_string();
        self.db
            .read(move |conn| {
                Ok(conn
                    .query_row(
                        "SELECT kind, version, wrapped, created_at FROM keyring
                         WHERE kind = ?1 AND version = ?2",
                        params![kind, version],
                        key_from_row,
                    )
                    .optional()?)
            })
            .await
    }

    async fn latest_key_version(&self, kind: &str) -> StorageResult<u32> {
        let kind = kind.to_string();
        self.db.read(move |conn| latest_version(conn, &kind)).await
    }

    async fn imported_fields(&self) -> StorageResult<Vec<ImportedField>> {
        self.db.read(imported).await
    }
}
