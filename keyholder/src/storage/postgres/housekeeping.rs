//! Housekeeping that must run once for all replicas (replay partitions made ahead and dropped when
//! past, audit retention): every replica tries now and then, and only the one that gets the
//! housekeeping advisory lock does the work; the others skip that round.

use std::time::Duration;

use crate::storage::AuditSigner;
use deadpool_postgres::Pool;

use super::schema::HOUSEKEEPING_LOCK;
use super::PgError;

/// How often each replica tries.
pub const INTERVAL: Duration = Duration::from_secs(60);

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Replay partitions dropped.
    pub partitions_dropped: usize,
    /// Audit entries pruned.
    pub audit_pruned: u64,
}

/// One round, if this replica gets the lock (`None` when another replica holds it). `retention`
/// prunes audit entries older than `now - retention`, appending the prune entries with `identity`.
pub async fn round(
    pool: &Pool,
    now: i64,
    retention: Option<(Duration, &dyn AuditSigner)>,
) -> Result<Option<Round>, PgError> {
    let mut client = super::client(pool).await?;
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&HOUSEKEEPING_LOCK])
        .await?
        .get(0);
    if !got {
        return Ok(None);
    }
    let work = async {
        let mut done = Round {
            partitions_dropped: super::replay::drop_expired_partitions(&client, now).await?,
            ..Round::default()
        };
        if let Some((keep, identity)) = retention {
            let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
            let before_ms = now.saturating_mul(1000).saturating_sub(keep_ms);
            done.audit_pruned =
                super::audit::prune_before(&mut client, identity, before_ms, "retention").await?;
        }
        Ok::<_, PgError>(done)
    };
    let result = work.await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&HOUSEKEEPING_LOCK])
        .await;
    result.map(Some)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::TestDatabase;
    use super::*;

    #[tokio::test]
    async fn only_the_lock_holder_does_the_round() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        super::super::schema::migrate(db.target()).await.unwrap();
        let pool = db.target().pool().unwrap();
        // Another replica holds the lock.
        let other = db.target().connect().await.unwrap();
        other
            .execute("SELECT pg_advisory_lock($1)", &[&HOUSEKEEPING_LOCK])
            .await
            .unwrap();
        let now = crate::clock::now_unix();
        assert_eq!(round(&pool, now, None).await.unwrap(), None);
        drop(other);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let done = round(&pool, now, None).await.unwrap();
        assert!(done.is_some());
        // Partitions for the coming hours exist.
        let client = pool.get().await.unwrap();
        let have = super::super::replay::partition_buckets(&client)
            .await
            .unwrap();
        let current = super::super::replay::bucket_of(now);
        assert!(
            (current..=current + super::super::replay::AHEAD_BUCKETS).all(|b| have.contains(&b))
        );
    }
}
