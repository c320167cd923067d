//! Replay marks as packed rows in one table per minute of expiry
//! (`replay_marks_packed_60s_<period>`), appended with each group commit and dropped a table at a
//! time once its whole minute is over.
//!
//! Seconds of expiry per mark table: every mark in `replay_marks_packed_60s_<p>` expires within
//! `[p * PERIOD_SECS, (p + 1) * PERIOD_SECS)`, so the whole table is dropped after that. A drop
//! frees every page of the table and holds all other writes meanwhile: measured under 10-11k req/s
//! of sustained load, a 5-minute table held the writer 106-246 ms, a 1-minute table 21-86 ms, and
//! with a group commit's marks packed into rows (see [`PackedRecord`]) 11-46 ms. Measured and left:
//! emptying the table 2,000 rows per group commit before the drop held the writer at most 1.4-5.9
//! ms per slice, but took 3-10 times the writer time of a drop (80-290 ms per table, pages rewritten
//! rather than freed) within a fraction of a second, and three sustained runs with it had worse p99
//! windows (medians 38-54 ms against 12-26 ms), two of them queueing for seconds near the end. The
//! cost is a CREATE and a DROP per minute (schema changes re-prepare cached statements: negligible).

use std::collections::HashSet;
use std::sync::Mutex;

use async_trait::async_trait;
use rusqlite::Connection;

use super::writer::{read_packed_rows, write_records, PackedRecord};
use super::SqliteStorage;
use crate::storage::replay::mark_key;
use crate::storage::{
    LoadedMark, Mark, MarkCommit, ReplayKind, ReplayMarks, StorageError, StorageResult,
};

pub(super) const PERIOD_SECS: i64 = 60;
pub(super) const TABLE_PREFIX: &str = "replay_marks_packed_60s_";
/// Tables of one row per mark and minute (`replay_marks_60s_<p>`, before packing) and of 5-minute
/// periods (`replay_marks_<p>`, schema 6): their live marks are packed into the current tables at
/// load.
pub(super) const ROW_TABLE_PREFIX: &str = "replay_marks_60s_";
pub(super) const LEGACY_PERIOD_PREFIX: &str = "replay_marks_";
const LEGACY_PERIOD_SECS: i64 = 300;

/// The periods whose table exists (created, or found at start).
#[derive(Default)]
pub(super) struct MarkTables {
    periods: Mutex<HashSet<i64>>,
}

pub(super) fn period_of(expires_at: i64) -> i64 {
    expires_at.div_euclid(PERIOD_SECS)
}

/// The first unix second after `period` (saturating: a period near `i64::MAX / 60` must not wrap).
fn period_end(period: i64) -> i64 {
    period.saturating_add(1).saturating_mul(PERIOD_SECS)
}

/// Name in the legacy `replay_log` table.
fn legacy_kind(name: &str) -> ReplayKind {
    match name {
        "request" => ReplayKind::RequestId,
        "envelope" => ReplayKind::EnvelopeNonce,
        _ => ReplayKind::Nonce,
    }
}

/// The durable form of a mark: 8 bytes in its expiry period's table, tagged with its kind.
fn mark_record(kind: ReplayKind, key: u64, expires_at: i64) -> PackedRecord {
    PackedRecord {
        table: (TABLE_PREFIX, period_of(expires_at)),
        tag: kind.code(),
        until: expires_at,
        bytes: key.to_le_bytes(),
    }
}

/// Writes marks found in an older layout (at load) in the current one.
fn write_converted_marks(
    conn: &Connection,
    marks: impl IntoIterator<Item = (ReplayKind, u64, i64)>,
) -> StorageResult<()> {
    let records = marks
        .into_iter()
        .map(|(kind, key, expires_at)| mark_record(kind, key, expires_at));
    write_records(conn, records)?;
    Ok(())
}

/// Every table name in the schema.
pub(super) fn table_names(conn: &Connection) -> StorageResult<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(names)
}

/// The periods that have a mark table, from the schema.
pub(super) fn mark_periods(conn: &Connection) -> StorageResult<Vec<i64>> {
    Ok(table_names(conn)?
        .iter()
        .filter_map(|n| n.strip_prefix(TABLE_PREFIX)?.parse().ok())
        .collect())
}

/// The `(kind, key, expires_at)` rows of a one-row-per-mark table that have not expired at `now`.
fn live_marks(
    conn: &Connection,
    table: &str,
    now: i64,
) -> StorageResult<Vec<(ReplayKind, u64, i64)>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT kind, key, expires_at FROM {table} WHERE expires_at >= ?1"
    ))?;
    let rows = stmt
        .query_map([now], |r| {
            Ok((
                ReplayKind::from_code(r.get(0)?),
                r.get::<_, i64>(1)? as u64,
                r.get(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Packs the live marks of one-row-per-mark tables (of 5-minute or one-minute periods) into the
/// current tables, then drops them.
fn convert_row_tables(conn: &Connection, now: i64) -> StorageResult<()> {
    let names = table_names(conn)?;
    let period_tables = |prefix: &str, secs: i64| -> Vec<(String, i64)> {
        names
            .iter()
            .filter_map(|n| Some((n.clone(), n.strip_prefix(prefix)?.parse::<i64>().ok()?)))
            .map(|(name, period)| (name, (period + 1) * secs))
            .collect()
    };
    let legacy = period_tables(LEGACY_PERIOD_PREFIX, LEGACY_PERIOD_SECS);
    for (table, period_end) in legacy
        .into_iter()
        .chain(period_tables(ROW_TABLE_PREFIX, PERIOD_SECS))
    {
        if period_end > now {
            write_converted_marks(conn, live_marks(conn, &table, now)?)?;
        }
        conn.execute_batch(&format!("DROP TABLE {table}"))?;
    }
    Ok(())
}

/// Moves marks of the text-id `replay_log` (schema 5) into the period tables, then drops it.
fn convert_legacy_marks(conn: &Connection) -> StorageResult<()> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'replay_log')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(());
    }
    let rows = {
        let mut stmt = conn.prepare("SELECT kind, id, expires_at FROM replay_log")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows
    };
    write_converted_marks(
        conn,
        rows.into_iter()
            .map(|(name, id, expires_at)| (legacy_kind(&name), mark_key(&id), expires_at)),
    )?;
    conn.execute_batch("DROP TABLE replay_log")?;
    Ok(())
}

fn poisoned<T>(_: T) -> StorageError {
    StorageError::Corrupt("replay table lock".into())
}

#[async_trait]
impl ReplayMarks for SqliteStorage {
    fn verdict_is_local(&self) -> bool {
        // One process writes the database (the owner's CLI never makes marks).
        true
    }

    async fn load_marks(&self, now: i64) -> StorageResult<Vec<LoadedMark>> {
        self.db.write(convert_legacy_marks).await?;
        self.db
            .write(move |conn| convert_row_tables(conn, now))
            .await?;
        let (periods, rows) = self
            .db
            .read(move |conn| {
                let periods = mark_periods(conn)?;
                let mut rows = Vec::new();
                for period in periods.iter().filter(|p| period_end(**p) > now) {
                    let table = format!("{TABLE_PREFIX}{period}");
                    rows.extend(read_packed_rows(conn, &table, now)?);
                }
                Ok((periods, rows))
            })
            .await?;
        self.replay
            .periods
            .lock()
            .map_err(poisoned)?
            .extend(periods);
        // Each mark of a row is kept until the row's `until` (the latest of its period): at most
        // a minute longer than its own expiry.
        Ok(rows
            .into_iter()
            .flat_map(|(tag, until, keys)| {
                let kind = ReplayKind::from_code(tag);
                keys.into_iter().map(move |key| LoadedMark {
                    kind,
                    key: u64::from_le_bytes(key),
                    until,
                })
            })
            .collect())
    }

    fn append_marks(&self, marks: Vec<Mark>) -> MarkCommit {
        let records: Vec<PackedRecord> = marks
            .iter()
            .map(|m| mark_record(m.kind, m.key, m.expires_at.max(0)))
            .collect();
        match self.replay.periods.lock() {
            Ok(mut periods) => periods.extend(records.iter().map(|r| r.table.1)),
            Err(err) => return MarkCommit::failed(poisoned(err)),
        }
        self.db.submit_records(records)
    }

    async fn drop_expired_marks(&self, now: i64) -> StorageResult<usize> {
        // Tables whose whole period is over: every mark in them has expired.
        let expired: Vec<i64> = {
            let mut periods = self.replay.periods.lock().map_err(poisoned)?;
            let expired: Vec<i64> = periods
                .iter()
                .copied()
                .filter(|p| period_end(*p) <= now)
                .collect();
            for period in &expired {
                periods.remove(period);
            }
            expired
        };
        let mut dropped = 0;
        for period in expired {
            let held = self
                .db
                .write(move |conn| {
                    let started = std::time::Instant::now();
                    conn.execute_batch(&format!("DROP TABLE IF EXISTS {TABLE_PREFIX}{period}"))?;
                    Ok(started.elapsed())
                })
                .await?;
            // The drop holds every other write for this long (it frees every page of the table).
            tracing::info!(
                period,
                held_ms = held.as_secs_f64() * 1000.0,
                "dropped the replay marks of an expired period"
            );
            dropped += 1;
        }
        Ok(dropped)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::storage::SharedStorage;
    use crate::vault::replay::{ReplayGuard, Seen};
    use rusqlite::params;
    use std::sync::Arc;

    #[tokio::test]
    async fn marks_survive_a_restart_and_legacy_marks_are_converted() {
        let dir = tempfile::tempdir().unwrap();
        let later = crate::clock::now_unix() + 300;
        {
            let sqlite = Arc::new(SqliteStorage::open(dir.path()).unwrap());
            let store: SharedStorage = sqlite.clone();
            // Rows as a schema-5 keyholder wrote them (one already expired).
            sqlite
                .db
                .write(move |conn| {
                    conn.execute(
                        "INSERT INTO replay_log(kind, id, expires_at) VALUES
                         ('request', 'req-old', ?1), ('nonce', 'nonce-old', ?1),
                         ('envelope', 'env-old', ?1), ('nonce', 'gone', 1)",
                        [later],
                    )?;
                    // And as keyholders with one row per mark in 5-minute and in one-minute
                    // tables did (one table of each over, one live).
                    for (table, id, expires_at) in [
                        (format!("replay_marks_{}", later / 300), "nonce-5min", later),
                        ("replay_marks_1".into(), "nonce-5min-gone", 400),
                        (
                            format!("replay_marks_60s_{}", later / 60),
                            "nonce-1min",
                            later,
                        ),
                        ("replay_marks_60s_6".into(), "nonce-1min-gone", 400),
                    ] {
                        conn.execute_batch(&format!(
                            "CREATE TABLE IF NOT EXISTS {table} (kind INTEGER NOT NULL,
                               key INTEGER NOT NULL, expires_at INTEGER NOT NULL)"
                        ))?;
                        conn.execute(
                            &format!("INSERT INTO {table} VALUES (2, ?1, ?2)"),
                            params![mark_key(id) as i64, expires_at],
                        )?;
                    }
                    Ok(())
                })
                .await
                .unwrap();
            let guard = ReplayGuard::load(Arc::clone(&store)).await.unwrap();
            assert_eq!(guard.len(), 5, "the expired legacy marks are not loaded");
            let names = sqlite.db.read(table_names).await.unwrap();
            assert!(
                !names.iter().any(|n| n.starts_with(ROW_TABLE_PREFIX)
                    || n.strip_prefix(LEGACY_PERIOD_PREFIX)
                        .is_some_and(|p| p.parse::<i64>().is_ok())),
                "one-row-per-mark tables are gone: {names:?}"
            );
            let fresh = guard
                .remember(ReplayKind::Nonce, "nonce-new", later)
                .await
                .unwrap();
            assert_eq!(fresh, Seen::Fresh);
            store.close();
        }
        let sqlite = Arc::new(SqliteStorage::open(dir.path()).unwrap());
        let guard = ReplayGuard::load(sqlite.clone()).await.unwrap();
        for (kind, id) in [
            (ReplayKind::RequestId, "req-old"),
            (ReplayKind::Nonce, "nonce-old"),
            (ReplayKind::EnvelopeNonce, "env-old"),
            (ReplayKind::Nonce, "nonce-5min"),
            (ReplayKind::Nonce, "nonce-1min"),
            (ReplayKind::Nonce, "nonce-new"),
        ] {
            let seen = guard.remember(kind, id, later).await.unwrap();
            assert_eq!(seen, Seen::Replayed, "{id} must be refused after a restart");
        }
        // Kinds are separate sets, and an expired mark is usable again.
        assert_eq!(
            guard
                .remember(ReplayKind::RequestId, "nonce-old", later)
                .await
                .unwrap(),
            Seen::Fresh
        );
        assert_eq!(
            guard
                .remember(ReplayKind::Nonce, "gone", later)
                .await
                .unwrap(),
            Seen::Fresh
        );
        // A mark whose period is over goes with its whole table at the next purge.
        let past = crate::clock::now_unix() - 10 * PERIOD_SECS;
        guard
            .remember(ReplayKind::Nonce, "stale", past)
            .await
            .unwrap();
        let periods = || async { sqlite.db.read(mark_periods).await.unwrap() };
        assert!(periods().await.contains(&period_of(past)));
        // Its table, and the one the expired legacy mark was converted into.
        assert_eq!(guard.purge_expired().await.unwrap(), 2);
        let left = periods().await;
        assert!(!left.contains(&period_of(past)));
        assert!(left.contains(&period_of(later)), "live marks stay");
    }
}
