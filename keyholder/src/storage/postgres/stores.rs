//! Credential stores group-committed like the replay marks: every `/v1/store` write queued while
//! a batch is in flight goes into the next one, one transaction (one synchronous commit) for all of
//! them, its statements pipelined (sent without waiting for each answer). Each write keeps its own
//! outcome, in queue order, as if written alone: the data key version is checked for each (under
//! the shared owner lock, so no key rotation crosses the batch), a create-only write finds a
//! document written earlier in the same batch, and each announces its document to the other
//! replicas in the same transaction. A failed batch fails every write in it (none is
//! acknowledged).

use std::sync::Arc;

use deadpool_postgres::Pool;
use futures_util::future::try_join_all;
use keyholder_protocol::wire::Collection;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::notify;
use crate::storage::{CredentialDocument, CredentialWrite, Setting, StorageError, StorageResult};

/// Most writes in one transaction.
const MAX_BATCH: usize = 256;
/// Batches in flight at once: one, as for the replay marks (fewer, larger commits; measured
/// against 2 and 4, one stored the most per second at 16 and 64 connections).
const IN_FLIGHT: usize = 1;

struct Job {
    write: CredentialDocument,
    reply: oneshot::Sender<StorageResult<CredentialWrite>>,
}

/// The group-committing writer of credential stores (cheap to clone).
#[derive(Clone)]
pub struct PgStores {
    queue: mpsc::UnboundedSender<Job>,
}

impl PgStores {
    /// Starts the writer on `pool`; `node` names this replica in its announcements.
    pub fn start(pool: Pool, node: String) -> PgStores {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(pool, node, rx));
        PgStores { queue }
    }

    /// Writes one credential in the next batch; its outcome once the batch is committed.
    pub async fn store(&self, write: CredentialDocument) -> StorageResult<CredentialWrite> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { write, reply })
            .map_err(|_| StorageError::Unavailable("store writer gone".into()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(StorageError::Unavailable("store writer gone".into())))
    }
}

async fn writer(pool: Pool, node: String, mut rx: mpsc::UnboundedReceiver<Job>) {
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let node: Arc<str> = node.into();
    while let Some(first) = rx.recv().await {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (pool, node) = (pool.clone(), Arc::clone(&node));
        tokio::spawn(async move {
            let (writes, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|j| (j.write, j.reply)).unzip();
            let outcome = super::timed_batch(&pool, "credential stores", async |client| {
                run_batch(client, &node, &writes).await
            })
            .await;
            match outcome {
                Ok(outcomes) => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, count = writes.len(), "credential stores not committed");
                    let text = err.to_string();
                    for reply in replies {
                        let _ = reply.send(Err(StorageError::Unavailable(text.clone())));
                    }
                }
            }
            drop(permit);
        });
    }
}

/// One statement per write: the document (inserted, or upserted), the service's legacy-minting
/// mark cleared and the write announced, all only when the document was written (one row back).
const UPSERT: &str = "WITH w AS (
        INSERT INTO documents (collection, key, doc, updated_at) VALUES ($1, $2, $3, $4)
        ON CONFLICT (collection, key) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at
        RETURNING key),
    d AS (DELETE FROM legacy_minting WHERE service IN (SELECT key FROM w))
    SELECT pg_notify($5, $6) FROM w";
const INSERT_NEW: &str = "WITH w AS (
        INSERT INTO documents (collection, key, doc, updated_at) VALUES ($1, $2, $3, $4)
        ON CONFLICT (collection, key) DO NOTHING
        RETURNING key),
    d AS (DELETE FROM legacy_minting WHERE service IN (SELECT key FROM w))
    SELECT pg_notify($5, $6) FROM w";

async fn run_batch(
    client: &mut deadpool_postgres::Object,
    node: &str,
    writes: &[CredentialDocument],
) -> StorageResult<Vec<CredentialWrite>> {
    let pg = |e: tokio_postgres::Error| StorageError::from(super::PgError::from(e));
    let upsert = client.prepare_cached(UPSERT).await.map_err(pg)?;
    let insert_new = client.prepare_cached(INSERT_NEW).await.map_err(pg)?;
    let tx = client.transaction().await.map_err(pg)?;
    // Shared: key rotation (exclusive) waits for the batch, and the batch for it.
    tx.execute(
        "SELECT pg_advisory_xact_lock_shared($1)",
        &[&super::engine::OWNER_LOCK],
    )
    .await
    .map_err(pg)?;
    let current: Option<String> = tx
        .query_opt(
            "SELECT value FROM settings WHERE name = $1",
            &[&Setting::DataVersion.name()],
        )
        .await
        .map_err(pg)?
        .map(|r| r.get(0));
    let tokens = Collection::Tokens.as_str();
    let current_ok =
        |w: &CredentialDocument| current.as_deref() == Some(w.data_version.to_string().as_str());
    let payloads: Vec<String> = writes
        .iter()
        .map(|w| notify::document_payload(node, Collection::Tokens, &w.service))
        .collect();
    type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
    let channel = notify::DOCS_CHANNEL;
    // In key order, the writes of one service in queue order (a stable sort): every batch, on
    // every replica, locks its rows in the same order, so two batches never deadlock; writes of
    // different services do not see each other, so their order changes no outcome.
    let mut order: Vec<usize> = (0..writes.len())
        .filter(|&i| writes.get(i).is_some_and(&current_ok))
        .collect();
    order.sort_by(|&a, &b| writes[a].service.cmp(&writes[b].service));
    let params: Vec<(bool, [Param<'_>; 6])> = order
        .iter()
        .map(|&i| {
            let (w, payload) = (&writes[i], &payloads[i]);
            let row: [Param<'_>; 6] = [&tokens, &w.service, &w.doc, &w.now, &channel, payload];
            (w.create_only, row)
        })
        .collect();
    // Pipelined (each statement sees the ones before it).
    let sent = params.iter().map(|(create_only, row)| {
        let statement = if *create_only { &insert_new } else { &upsert };
        tx.execute(statement, &row[..])
    });
    let written = try_join_all(sent).await.map_err(pg)?;
    tx.commit().await.map_err(pg)?;
    let mut outcomes = vec![CredentialWrite::KeyRingChanged; writes.len()];
    for (&i, rows) in order.iter().zip(written) {
        if let Some(outcome) = outcomes.get_mut(i) {
            *outcome = if rows > 0 {
                CredentialWrite::Stored
            } else {
                CredentialWrite::AlreadyExists
            };
        }
    }
    Ok(outcomes)
}
