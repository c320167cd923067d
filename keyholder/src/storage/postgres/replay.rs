//! Replay marks shared by every replica: a mark is accepted once, by PostgreSQL itself, with
//! `INSERT ... ON CONFLICT DO NOTHING` on `(bucket, kind, key)` (see the schema's migration 3).
//!
//! A mark arriving at `now` and needed until `expires_at` is one row in every unix hour from
//! `now` to `expires_at`: two marks of one id whose lives overlap meet in at least one hour, so the
//! second one conflicts, on whichever replica it arrives. Marks are group-committed like the SQLite
//! writer's: every mark queued while a batch is in flight goes into the next one, one statement
//! (one round trip, one synchronous commit) for all of them. Hours are partitions of their own,
//! created ahead and dropped whole once past (by [`drop_expired_partitions`]), never row by row.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, Semaphore};

use super::PgError;
use crate::storage::{MarkCommit, MarkReply, MarkVerdict, StorageError};

/// Seconds per bucket (and partition).
pub const BUCKET_SECS: i64 = 3600;
/// Partitions kept after their hour: replicas' clocks may differ by this much (in buckets).
pub const KEEP_PAST_BUCKETS: i64 = 1;
/// Partitions created ahead of the current hour.
pub const AHEAD_BUCKETS: i64 = 3;
/// Most marks in one statement.
const MAX_BATCH: usize = 2048;
/// Batches in flight at once. One: everything queued meanwhile joins the next batch, so fewer,
/// larger commits; measured against 2 and 4 at 64 connections it gave the most credential GETs
/// per second (PostgreSQL's cost is mostly per statement and per commit, not per row).
const IN_FLIGHT: usize = 1;
/// Lock serialising partition creation across replicas.
const PARTITION_LOCK: i64 = 0x4b48_0003;

/// One mark: its kind's code, the 8-byte key of its id, and when it may be forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// The kind (the same codes as the SQLite tables').
    pub kind: i16,
    /// First 8 bytes of SHA-256 of the id.
    pub key: i64,
    /// Unix second after which the mark is not needed.
    pub expires_at: i64,
}

/// The bucket (unix hour) of a unix second.
pub fn bucket_of(unix: i64) -> i64 {
    unix.div_euclid(BUCKET_SECS)
}

/// Hours ahead of now a mark's rows reach at most: a ticket lives at most a day
/// (`--max-ticket-lifetime` is at most 86,400 s) plus the clock-skew allowance, so every real
/// mark fits; a longer one is refused for this long.
pub const HORIZON_BUCKETS: i64 = 26;
/// The bucket of marks that arrive already expired (no memory needed; dropped at the next purge).
pub const EXPIRED_BUCKET: i64 = 0;

/// The buckets of a mark arriving at `now`: every hour of its life (at most the horizon).
fn rows_of(mark: &Mark, now: i64) -> impl Iterator<Item = (i64, i16, i64)> + '_ {
    let (first, last) = if mark.expires_at < now {
        (EXPIRED_BUCKET, EXPIRED_BUCKET)
    } else {
        let first = bucket_of(now);
        (
            first,
            bucket_of(mark.expires_at).min(first + HORIZON_BUCKETS),
        )
    };
    (first..=last).map(move |b| (b, mark.kind, mark.key))
}

struct Job {
    marks: Vec<Mark>,
    now: i64,
    reply: MarkReply,
}

/// The group-committing writer of replay marks (cheap to clone).
#[derive(Clone)]
pub struct PgReplayMarks {
    queue: mpsc::UnboundedSender<Job>,
}

impl PgReplayMarks {
    /// Starts the writer on `pool`.
    pub fn start(pool: Pool) -> PgReplayMarks {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(pool, rx));
        PgReplayMarks { queue }
    }

    /// Claims every mark, all or none: `true` once all are committed as new, `false` if any was
    /// already claimed (on any replica) and not expired; then none of them is kept.
    pub async fn claim(&self, marks: Vec<Mark>) -> Result<bool, PgError> {
        self.claim_at(marks, crate::clock::now_unix()).await
    }

    /// [`PgReplayMarks::claim`] at a given time (tests).
    pub async fn claim_at(&self, marks: Vec<Mark>, now: i64) -> Result<bool, PgError> {
        let (reply, commit) = MarkCommit::channel();
        self.submit(marks, now, reply);
        match commit.await {
            Ok(verdict) => Ok(verdict == MarkVerdict::Fresh),
            Err(err) => Err(PgError::Unavailable(err.to_string())),
        }
    }

    /// Queues a claim, answered on `reply` once committed: [`MarkVerdict::Fresh`] when all marks
    /// were new, else the index of the first mark already held. The batch answers the engine's
    /// channel itself: no task per claim on the hot path.
    pub fn submit(&self, marks: Vec<Mark>, now: i64, reply: MarkReply) {
        if marks.is_empty() {
            let _ = reply.send(Ok(MarkVerdict::Fresh));
            return;
        }
        if let Err(refused) = self.queue.send(Job { marks, now, reply }) {
            let _ = refused.0.reply.send(Err(StorageError::Unavailable(
                "replay writer stopped".into(),
            )));
        }
    }
}

async fn writer(pool: Pool, mut rx: mpsc::UnboundedReceiver<Job>) {
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let partitions = Arc::new(tokio::sync::Mutex::new(HashSet::new()));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let mut batch = vec![first];
        let mut count = batch[0].marks.len();
        while count < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => {
                    count += job.marks.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        let partitions = Arc::clone(&partitions);
        tokio::spawn(async move {
            let outcome = super::timed_batch(&pool, "replay marks", async |client| {
                run_batch(client, &partitions, &batch).await
            })
            .await;
            match outcome {
                Ok(verdicts) => {
                    for (job, lost) in batch.into_iter().zip(verdicts) {
                        let verdict = lost.map_or(MarkVerdict::Fresh, MarkVerdict::Replayed);
                        let _ = job.reply.send(Ok(verdict));
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "replay marks not committed");
                    let text = err.to_string();
                    for job in batch {
                        let _ = job.reply.send(Err(StorageError::Unavailable(text.clone())));
                    }
                }
            }
            drop(permit);
        });
    }
}

type Row = (i64, i16, i64);

/// Records that mark `m` of a job was already held (keeping the first such mark).
fn lose(lost: &mut Option<usize>, m: usize) {
    *lost = Some(lost.map_or(m, |l| l.min(m)));
}

/// One statement for the whole batch; returns per job `None` when all its marks were new, else
/// the index of its first mark already held.
async fn run_batch(
    client: &deadpool_postgres::Object,
    partitions: &tokio::sync::Mutex<HashSet<i64>>,
    batch: &[Job],
) -> Result<Vec<Option<usize>>, PgError> {
    // The first job of the batch to name a row claims it; a later job naming it too is a replay.
    let mut claimant: HashMap<Row, (usize, usize)> = HashMap::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut expiries: Vec<i64> = Vec::new();
    let mut lost: Vec<Option<usize>> = vec![None; batch.len()];
    let mut needed: HashSet<i64> = HashSet::new();
    for (i, job) in batch.iter().enumerate() {
        for (m, mark) in job.marks.iter().enumerate() {
            for row in rows_of(mark, job.now) {
                needed.insert(row.0);
                match claimant.get(&row) {
                    Some(&(owner, _)) if owner != i => lose(&mut lost[i], m),
                    Some(_) => {}
                    None => {
                        claimant.insert(row, (i, m));
                        rows.push(row);
                        expiries.push(mark.expires_at);
                    }
                }
            }
        }
    }
    {
        let mut known = partitions.lock().await;
        if needed.iter().any(|b| !known.contains(b)) {
            ensure_buckets(client, needed.iter().copied()).await?;
            known.extend(needed.iter().copied());
        }
    }
    let (buckets, kinds, keys): (Vec<i64>, Vec<i16>, Vec<i64>) = {
        let mut b = Vec::with_capacity(rows.len());
        let mut k = Vec::with_capacity(rows.len());
        let mut y = Vec::with_capacity(rows.len());
        for (bucket, kind, key) in &rows {
            b.push(*bucket);
            k.push(*kind);
            y.push(*key);
        }
        (b, k, y)
    };
    let insert = client
        .prepare_cached(
            "INSERT INTO replay_marks (bucket, kind, key, expires_at)
             SELECT * FROM unnest($1::int8[], $2::int2[], $3::int8[], $4::int8[])
             ON CONFLICT DO NOTHING RETURNING bucket, kind, key",
        )
        .await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&buckets, &kinds, &keys, &expiries];
    let answer = match client.query(&insert, &params).await {
        // 23514: no partition for a row (dropped meanwhile, e.g. the expired bucket): make them.
        Err(err) if err.code().is_some_and(|c| c.code() == "23514") => {
            ensure_buckets(client, needed.iter().copied()).await?;
            client.query(&insert, &params).await?
        }
        other => other?,
    };
    let inserted: HashSet<Row> = answer
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for row in &rows {
        if !inserted.contains(row) {
            if let Some(&(owner, m)) = claimant.get(row) {
                lose(&mut lost[owner], m);
            }
        }
    }
    // All or none per job: a job that lost any row gives back the rows it did insert.
    let give_back: Vec<&Row> = rows
        .iter()
        .filter(|row| {
            inserted.contains(*row) && claimant.get(*row).is_some_and(|&(o, _)| lost[o].is_some())
        })
        .collect();
    if !give_back.is_empty() {
        let b: Vec<i64> = give_back.iter().map(|r| r.0).collect();
        let k: Vec<i16> = give_back.iter().map(|r| r.1).collect();
        let y: Vec<i64> = give_back.iter().map(|r| r.2).collect();
        client
            .execute(
                "DELETE FROM replay_marks WHERE (bucket, kind, key) IN
                 (SELECT * FROM unnest($1::int8[], $2::int2[], $3::int8[]))",
                &[&b, &k, &y],
            )
            .await?;
    }
    Ok(lost)
}

fn partition_name(bucket: i64) -> String {
    // Buckets are non-negative for any time after 1970; a negative one keeps a valid name.
    if bucket < 0 {
        format!("replay_marks_hn{}", bucket.unsigned_abs())
    } else {
        format!("replay_marks_h{bucket}")
    }
}

/// Creates the partitions of buckets `from..=to` that do not exist yet (under a lock, so that
/// replicas creating the same one do not collide).
pub async fn ensure_partitions(
    client: &tokio_postgres::Client,
    from: i64,
    to: i64,
) -> Result<(), PgError> {
    ensure_buckets(client, from..=to).await
}

/// Creates the partitions of these buckets that do not exist yet.
pub async fn ensure_buckets(
    client: &tokio_postgres::Client,
    buckets: impl IntoIterator<Item = i64>,
) -> Result<(), PgError> {
    let existing = partition_buckets(client).await?;
    let mut missing: Vec<i64> = buckets
        .into_iter()
        .filter(|b| !existing.contains(b))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let mut sql = format!("BEGIN; SELECT pg_advisory_xact_lock({PARTITION_LOCK});");
    for b in missing {
        sql.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF replay_marks FOR VALUES FROM ({b}) TO ({});",
            partition_name(b),
            b + 1
        ));
    }
    sql.push_str("COMMIT;");
    if let Err(err) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(err.into());
    }
    Ok(())
}

/// The buckets that have a partition.
pub async fn partition_buckets(client: &tokio_postgres::Client) -> Result<HashSet<i64>, PgError> {
    let rows = client
        .query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'replay_marks'::regclass",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let name: String = r.get(0);
            let rest = name.strip_prefix("replay_marks_h")?;
            match rest.strip_prefix('n') {
                Some(neg) => neg.parse::<i64>().ok().map(|b| -b),
                None => rest.parse().ok(),
            }
        })
        .collect())
}

/// Drops every partition whose hour ended more than [`KEEP_PAST_BUCKETS`] ago, and creates the
/// next [`AHEAD_BUCKETS`]. Returns how many were dropped.
pub async fn drop_expired_partitions(
    client: &tokio_postgres::Client,
    now: i64,
) -> Result<usize, PgError> {
    let current = bucket_of(now);
    ensure_partitions(client, current - KEEP_PAST_BUCKETS, current + AHEAD_BUCKETS).await?;
    let mut dropped = 0;
    for bucket in partition_buckets(client).await? {
        if bucket < current - KEEP_PAST_BUCKETS {
            client
                .batch_execute(&format!("DROP TABLE IF EXISTS {}", partition_name(bucket)))
                .await?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::TestDatabase;
    use super::*;

    fn mark(kind: i16, key: i64, expires_at: i64) -> Mark {
        Mark {
            kind,
            key,
            expires_at,
        }
    }

    async fn setup() -> Option<(TestDatabase, Pool)> {
        let db = TestDatabase::create().await?;
        super::super::schema::migrate(db.target()).await.unwrap();
        let pool = db.target().pool().unwrap();
        Some((db, pool))
    }

    /// Two replicas (two writers on two pools) claiming the same marks concurrently: each mark is
    /// won exactly once; overlapping lives conflict across hours; all or none per claim.
    #[tokio::test]
    async fn marks_are_claimed_once_across_writers() {
        let Some((db, pool_a)) = setup().await else {
            return;
        };
        let pool_b = db.target().pool().unwrap();
        let (a, b) = (
            PgReplayMarks::start(pool_a.clone()),
            PgReplayMarks::start(pool_b),
        );
        let now = 1_800_000_000 - 30; // 30 s before an hour boundary
        let mut tasks = Vec::new();
        for i in 0..200i64 {
            for writer in [&a, &b] {
                let writer = writer.clone();
                tasks.push(tokio::spawn(async move {
                    (
                        i,
                        writer
                            .claim_at(vec![mark(1, i, now + 600)], now)
                            .await
                            .unwrap(),
                    )
                }));
            }
        }
        let mut wins = vec![0; 200];
        for t in tasks {
            let (i, fresh) = t.await.unwrap();
            if fresh {
                wins[i as usize] += 1;
            }
        }
        assert!(wins.iter().all(|w| *w == 1), "{wins:?}");
        // A replay in the next hour (the first mark's life reaches into it) is refused; the same
        // id of another kind is not.
        assert!(!b
            .claim_at(vec![mark(1, 5, now + 700)], now + 60)
            .await
            .unwrap());
        assert!(a
            .claim_at(vec![mark(2, 5, now + 700)], now + 60)
            .await
            .unwrap());
        // All or none: a claim with one replayed mark keeps none of its others.
        assert!(!a
            .claim_at(vec![mark(3, 77, now + 10), mark(1, 6, now + 10)], now)
            .await
            .unwrap());
        assert!(b.claim_at(vec![mark(3, 77, now + 10)], now).await.unwrap());
        // Two hours after the first mark expired, its id is new again.
        assert!(a
            .claim_at(vec![mark(1, 5, now + 3 * 3600 + 600)], now + 3 * 3600)
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn expired_hours_are_dropped_whole() {
        let Some((_db, pool)) = setup().await else {
            return;
        };
        let marks = PgReplayMarks::start(pool.clone());
        let now = 1_800_000_000;
        assert!(marks
            .claim_at(vec![mark(1, 1, now + 60)], now)
            .await
            .unwrap());
        let client = pool.get().await.unwrap();
        assert!(partition_buckets(&client)
            .await
            .unwrap()
            .contains(&bucket_of(now)));
        let dropped = drop_expired_partitions(&client, now + 3 * 3600)
            .await
            .unwrap();
        assert!(dropped >= 1);
        let left = partition_buckets(&client).await.unwrap();
        assert!(!left.contains(&bucket_of(now)), "{left:?}");
        assert!(left.contains(&(bucket_of(now) + 3 + AHEAD_BUCKETS)));
        let rows: i64 = client
            .query_one("SELECT count(*) FROM replay_marks", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 0);
    }
}
