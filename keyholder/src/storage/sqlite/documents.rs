//! Documents over the `documents` and `legacy_minting` tables.

use async_trait::async_trait;
use keyholder_protocol::wire::Collection;
use rusqlite::{params, Connection, OptionalExtension};

use super::{setting, SqliteStorage};
use crate::storage::{
    CredentialDocument, CredentialWrite, DocumentSwap, Documents, ScannedDocument, Setting,
    StorageError, StorageResult, StoredDocument, SwapOutcome,
};

pub(super) fn get(
    conn: &Connection,
    collection: Collection,
    key: &str,
) -> StorageResult<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT doc FROM documents WHERE collection = ?1 AND key = ?2")?
        .query_row(params![collection.as_str(), key], |r| r.get(0))
        .optional()?)
}

pub(super) fn put(
    conn: &Connection,
    collection: Collection,
    key: &str,
    doc: &str,
    now: i64,
) -> StorageResult<()> {
    conn.prepare_cached(
        "INSERT INTO documents(collection, key, doc, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(collection, key) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at",
    )?
    .execute(params![collection.as_str(), key, doc, now])?;
    Ok(())
}

pub(super) fn delete(conn: &Connection, collection: Collection, key: &str) -> StorageResult<usize> {
    Ok(conn.execute(
        "DELETE FROM documents WHERE collection = ?1 AND key = ?2",
        params![collection.as_str(), key],
    )?)
}

fn rows(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> StorageResult<Vec<StoredDocument>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt
        .query_map(params, |r| {
            Ok(StoredDocument {
                key: r.get(0)?,
                doc: r.get(1)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

#[async_trait]
impl Documents for SqliteStorage {
    async fn document(&self, collection: Collection, key: &str) -> StorageResult<Option<String>> {
        let key = key.to_string();
        self.db.read(move |conn| get(conn, collection, &key)).await
    }

    async fn documents(&self, collection: Collection) -> StorageResult<Vec<StoredDocument>> {
        self.db
            .read(move |conn| {
                rows(
                    conn,
                    "SELECT key, doc FROM documents WHERE collection = ?1 ORDER BY key",
                    [collection.as_str()],
                )
            })
            .await
    }

    async fn documents_after(
        &self,
        collection: Collection,
        after: &str,
        limit: usize,
    ) -> StorageResult<Vec<StoredDocument>> {
        let after = after.to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.db
            .read(move |conn| {
                rows(
                    conn,
                    "SELECT key, doc FROM documents WHERE collection = ?1 AND key > ?2 ORDER BY key LIMIT ?3",
                    params![collection.as_str(), after, limit],
                )
            })
            .await
    }

    async fn scan_documents(&self, needle: &str) -> StorageResult<Vec<ScannedDocument>> {
        let pattern = format!(
            "%{}%",
            needle
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        self.db
            .read(move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT collection, key, doc FROM documents WHERE doc LIKE ?1 ESCAPE '\\'
                     ORDER BY collection, key",
                )?;
                let found = stmt
                    .query_map([pattern], |r| {
                        Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect::<Result<Vec<(String, String, String)>, _>>()?;
                found
                    .into_iter()
                    .map(|(collection, key, doc)| {
                        let collection = Collection::parse(&collection).ok_or_else(|| {
                            StorageError::Corrupt(format!("unknown collection {collection}"))
                        })?;
                        Ok(ScannedDocument {
                            collection,
                            key,
                            doc,
                        })
                    })
                    .collect()
            })
            .await
    }

    async fn count_documents(&self, collection: Option<Collection>) -> StorageResult<u64> {
        self.db
            .read(move |conn| {
                let n: i64 = match collection {
                    Some(c) => conn.query_row(
                        "SELECT COUNT(*) FROM documents WHERE collection = ?1",
                        [c.as_str()],
                        |r| r.get(0),
                    )?,
                    None => conn.query_row("SELECT COUNT(*) FROM documents", [], |r| r.get(0))?,
                };
                Ok(super::unsigned(n))
            })
            .await
    }

    async fn put_document(
        &self,
        collection: Collection,
        key: &str,
        doc: &str,
        now: i64,
    ) -> StorageResult<()> {
        let (key, doc) = (key.to_string(), doc.to_string());
        self.db
            .write(move |conn| put(conn, collection, &key, &doc, now))
            .await
    }

    async fn delete_document(&self, collection: Collection, key: &str) -> StorageResult<()> {
        let key = key.to_string();
        self.db
            .write(move |conn| delete(conn, collection, &key).map(|_| ()))
            .await
    }

    async fn swap_document(&self, swap: DocumentSwap) -> StorageResult<SwapOutcome> {
        self.db
            .write(move |conn| {
                if let Some(version) = swap.data_version {
                    let current = setting(conn, Setting::DataVersion)?;
                    if current.as_deref() != Some(version.to_string().as_str()) {
                        return Ok(SwapOutcome::KeyRingChanged);
                    }
                }
                let n = conn.execute(
                    "UPDATE documents SET doc = ?4, updated_at = ?5
                     WHERE collection = ?1 AND key = ?2 AND doc = ?3",
                    params![
                        swap.collection.as_str(),
                        swap.key,
                        swap.expected,
                        swap.doc,
                        swap.now
                    ],
                )?;
                Ok(if n > 0 {
                    SwapOutcome::Swapped
                } else {
                    SwapOutcome::Changed
                })
            })
            .await
    }

    async fn store_credential(&self, write: CredentialDocument) -> StorageResult<CredentialWrite> {
        self.db
            .write(move |conn| {
                // Written under the version that is current on disk, never under one the owner
                // has since rotated away from (and perhaps retired).
                let current = setting(conn, Setting::DataVersion)?;
                if current.as_deref() != Some(write.data_version.to_string().as_str()) {
                    return Ok(CredentialWrite::KeyRingChanged);
                }
                if write.create_only && get(conn, Collection::Tokens, &write.service)?.is_some() {
                    return Ok(CredentialWrite::AlreadyExists);
                }
                put(
                    conn,
                    Collection::Tokens,
                    &write.service,
                    &write.doc,
                    write.now,
                )?;
                conn.execute(
                    "DELETE FROM legacy_minting WHERE service = ?1",
                    [&write.service],
                )?;
                Ok(CredentialWrite::Stored)
            })
            .await
    }

    async fn is_legacy_minting(&self, service: &str) -> StorageResult<bool> {
        let service = service.to_string();
        self.db
            .read(move |conn| {
                Ok(conn
                    .prepare_cached("SELECT 1 FROM legacy_minting WHERE service = ?1")?
                    .query_row([service], |r| r.get::<_, i64>(0))
                    .optional()?
                    .is_some())
            })
            .await
    }
}
