//! OAuth clients over `oauth_providers`.

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension};

use super::SqliteStorage;
use crate::storage::{OAuthClientRow, OAuthClients, StorageResult};

const SELECT: &str =
    "SELECT name, token_url, client_id, wrapped_secret, updated_at FROM oauth_providers";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OAuthClientRow> {
    Ok(OAuthClientRow {
        name: r.get(0)?,
        token_url: r.get(1)?,
        client_id: r.get(2)?,
        wrapped_secret: r.get(3)?,
        updated_at: r.get(4)?,
    })
}

pub(super) fn all(conn: &Connection) -> StorageResult<Vec<OAuthClientRow>> {
    let mut stmt = conn.prepare(&format!("{SELECT} ORDER BY name"))?;
    let rows = stmt.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

#[async_trait]
impl OAuthClients for SqliteStorage {
    async fn oauth_client(&self, name: &str) -> StorageResult<Option<OAuthClientRow>> {
        let name = name.to_string();
        self.db
            .read(move |conn| {
                Ok(conn
                    .query_row(&format!("{SELECT} WHERE name = ?1"), [name], row)
                    .optional()?)
            })
            .await
    }

    async fn oauth_clients(&self) -> StorageResult<Vec<OAuthClientRow>> {
        self.db.read(all).await
    }
}
