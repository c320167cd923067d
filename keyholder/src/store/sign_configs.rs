//! The `sign_configs` table: the owner's signing configuration of a service (see
//! `vault::signing::config`), one JSON document per service. All the SQL of signing is here.

use rusqlite::{params, Connection, OptionalExtension as _};

use super::StoreError;

/// The stored configuration text of `service`, if any.
pub fn load(conn: &Connection, service: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT config FROM sign_configs WHERE service = ?1",
            [service],
            |r| r.get(0),
        )
        .optional()?)
}

/// Writes (replaces) the configuration of `service`.
pub fn save(conn: &Connection, service: &str, config: &str, now: i64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO sign_configs (service, config, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(service) DO UPDATE SET config = excluded.config, updated_at = excluded.updated_at",
        params![service, config, now],
    )?;
    Ok(())
}

/// Removes the configuration of `service`; true when there was one.
pub fn remove(conn: &Connection, service: &str) -> Result<bool, StoreError> {
    Ok(conn.execute("DELETE FROM sign_configs WHERE service = ?1", [service])? > 0)
}

/// Every configuration, in service order.
pub fn list(conn: &Connection) -> Result<Vec<(String, String)>, StoreError> {
    let mut stmt = conn.prepare("SELECT service, config FROM sign_configs ORDER BY service")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}
