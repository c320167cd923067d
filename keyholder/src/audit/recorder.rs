//! Appends audit entries off the request path: handlers hand events to a bounded channel (no
//! await, no disk), and one task appends them in batches as ordinary group-commit write jobs.
//!
//! On a crash, events still in the channel or in the batch being committed (about the last
//! [`WRITE_INTERVAL`] of traffic, 20 ms) are lost; the answer to the request does not wait for its
//! entry. A graceful stop flushes everything. If the channel is ever full, the lost events are counted
//! and the trail records an `audit:dropped` entry with the count, so a gap is never silent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{Duration, Instant};

use super::AuditEvent;
use crate::storage::SharedStorage;
use crate::vault::keyring::KeyRing;

/// Events queued at most before new ones are counted as dropped.
const QUEUE: usize = 16_384;
/// Events appended in one write job at most.
const BATCH: usize = 512;
/// Write jobs start at most this often (unless a flush comes first or a batch is full). Each one
/// signs its newest entry and updates the chain head: written at every group commit, that cost
/// the writer thread about a tenth of a core under 8k requests/s of paced load.
const WRITE_INTERVAL: Duration = Duration::from_millis(20);

enum Message {
    Event(Box<AuditEvent>),
    Flush(oneshot::Sender<()>),
}

/// The handle request handlers record through (cheap to clone).
#[derive(Clone)]
pub struct AuditRecorder {
    tx: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
}

/// The receiving end, until its appending task is spawned.
pub struct AuditQueue {
    rx: mpsc::Receiver<Message>,
    dropped: Arc<AtomicU64>,
}

impl AuditQueue {
    /// Starts the appending task; `keys` gives the identity key in force at each batch.
    pub fn spawn(
        self,
        storage: SharedStorage,
        keys: impl Fn() -> Arc<KeyRing> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run(storage, keys, self.rx, self.dropped))
    }
}

impl AuditRecorder {
    /// A recorder and its queue (spawn the queue's task once the key ring is available).
    pub fn new() -> (AuditRecorder, AuditQueue) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        (
            AuditRecorder {
                tx,
                dropped: Arc::clone(&dropped),
            },
            AuditQueue { rx, dropped },
        )
    }

    /// Queues an event; never waits. A full queue counts the event as dropped.
    pub fn record(&self, event: AuditEvent) {
        if self.tx.try_send(Message::Event(Box::new(event))).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Resolves once every event queued before this call is committed.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn run(
    storage: SharedStorage,
    keys: impl Fn() -> Arc<KeyRing> + Send + 'static,
    mut rx: mpsc::Receiver<Message>,
    dropped: Arc<AtomicU64>,
) {
    let mut last_write = Instant::now()
        .checked_sub(WRITE_INTERVAL)
        .unwrap_or_else(Instant::now);
    let mut open = true;
    let mut behind = false;
    while open {
        let Some(first) = rx.recv().await else {
            break;
        };
        let (mut events, mut flushes) = (Vec::new(), Vec::new());
        sort_message(first, &mut events, &mut flushes);
        // Gather until the interval since the last write is over (at once if it is, or if the
        // first message is a flush), then take what queued meanwhile, up to a batch. Sleeping
        // instead of receiving each event as it comes: a sender wakes this task (and its thread)
        // once per batch, not once per request.
        // A full batch last time: more is queued, write on without waiting.
        let deadline = last_write + WRITE_INTERVAL;
        if flushes.is_empty() && !behind {
            tokio::time::sleep_until(deadline).await;
        }
        while events.len() < BATCH {
            match rx.try_recv() {
                Ok(message) => sort_message(message, &mut events, &mut flushes),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        behind = events.len() >= BATCH;
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            tracing::error!(lost, "audit queue was full: events were dropped");
            let mut marker = AuditEvent::owner("dropped", &lost.to_string());
            marker.endpoint = "audit:dropped".into();
            marker.source = String::new();
            marker.result = "dropped".into();
            events.push(marker);
        }
        if !events.is_empty() {
            last_write = Instant::now();
            let ring: crate::storage::SharedSigner = keys();
            let count = events.len();
            let result = storage.append_audit(events, ring).await;
            if let Err(err) = result {
                tracing::error!(error = %err, count, "audit entries could not be written");
                dropped.fetch_add(count as u64, Ordering::Relaxed);
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

fn sort_message(
    message: Message,
    events: &mut Vec<AuditEvent>,
    flushes: &mut Vec<oneshot::Sender<()>>,
) {
    match message {
        Message::Event(e) => events.push(*e),
        Message::Flush(done) => flushes.push(done),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::audit::AuditFilter;
    use crate::storage::sqlite::SqliteStorage;
    use crate::vault::keyring::init_or_load;
    use crate::vault::master::MasterKey;

    #[tokio::test]
    async fn entries_are_written_at_most_once_an_interval_and_all_on_flush() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Arc::new(SqliteStorage::open(dir.path()).unwrap());
        let storage: SharedStorage = sqlite.clone();
        let ring = Arc::new(
            init_or_load(storage.as_ref(), &MasterKey::from_bytes([7; 32]))
                .await
                .unwrap()
                .ring,
        );
        let (recorder, queue) = AuditRecorder::new();
        let keys = Arc::clone(&ring);
        queue.spawn(Arc::clone(&storage), move || Arc::clone(&keys));
        let before = sqlite.commit_stats().jobs;
        let started = Instant::now();
        // One event every 2 ms for about 200 ms: a write per event would be 100 jobs.
        for i in 0..100 {
            recorder.record(AuditEvent::owner("test", &i.to_string()));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        recorder.flush().await;
        let elapsed = started.elapsed();
        let jobs = sqlite.commit_stats().jobs - before;
        let most = elapsed.as_millis() / WRITE_INTERVAL.as_millis() + 2;
        assert!(
            (1..=most as u64).contains(&jobs),
            "{jobs} write jobs in {elapsed:?} (at most {most})"
        );
        let key = ring.identity().verifying_key();
        let entries = storage.audit_entries(AuditFilter::default()).await.unwrap();
        let check = storage.verify_audit(key).await.unwrap();
        assert_eq!(entries.len(), 100, "every event is written by the flush");
        assert!(check.problem.is_none(), "{:?}", check.problem);
    }
}
