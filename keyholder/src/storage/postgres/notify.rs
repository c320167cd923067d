//! Owner changes (seal, key rotation, egress, policies, binding) reach every replica within a
//! second: the transaction that bumps the owner generation also sends `NOTIFY keyholder_owner`
//! (delivered at its commit), and each replica keeps one connection that LISTENs and wakes its
//! follower at once. While that connection is down, and right after it is back (notifications sent
//! meanwhile are lost), the follower polls instead.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use keyholder_protocol::wire::Collection;
use tokio::sync::{broadcast, Notify};

use super::{PgError, PgTarget};
use crate::storage::DocumentChange;

/// The channel owner changes are announced on.
pub const CHANNEL: &str = "keyholder_owner";
/// The channel document writes are announced on (`<node>\n<collection>\n<key>`), so that the
/// other replicas' document caches forget what changed.
pub const DOCS_CHANNEL: &str = "keyholder_documents";
/// Longest key announced by name (NOTIFY payloads are limited); longer ones announce "any".
const MAX_ANNOUNCED_KEY: usize = 4000;

/// The payload announcing a write of `key` in `collection` by `node` (`*`: possibly any).
pub fn document_payload(node: &str, collection: Collection, key: &str) -> String {
    let key = if key.len() > MAX_ANNOUNCED_KEY || key == "*" {
        "*"
    } else {
        key
    };
    format!("{node}\n{}\n{key}", collection.as_str())
}

fn parse_document_payload(payload: &str) -> Option<(&str, DocumentChange)> {
    let mut parts = payload.splitn(3, '\n');
    let node = parts.next()?;
    let collection = Collection::parse(parts.next()?)?;
    let key = parts.next()?;
    Some((
        node,
        if key == "*" {
            DocumentChange::All
        } else {
            DocumentChange::One(collection, key.to_string())
        },
    ))
}
/// Poll interval while the listening connection is down.
pub const POLL_WHILE_DOWN: Duration = Duration::from_millis(250);
/// Poll interval while it is up (a safety net only).
pub const POLL_WHILE_UP: Duration = Duration::from_secs(5);

/// Announces an owner change inside the caller's transaction (sent when it commits).
pub async fn announce(
    client: &impl deadpool_postgres::GenericClient,
    generation: &str,
) -> Result<(), PgError> {
    client
        .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &generation])
        .await?;
    Ok(())
}

/// What the listener tells the follower and the document cache.
pub struct OwnerSignal {
    wake: Notify,
    listening: AtomicBool,
    received: AtomicU64,
    node: String,
    docs: broadcast::Sender<DocumentChange>,
}

impl OwnerSignal {
    /// Waits until a notification arrives or the poll interval (shorter while not listening)
    /// passes; the caller then re-reads the generation.
    pub async fn wait(&self) {
        let interval = if self.listening.load(Ordering::Acquire) {
            POLL_WHILE_UP
        } else {
            POLL_WHILE_DOWN
        };
        let _ = tokio::time::timeout(interval, self.wake.notified()).await;
    }

    /// Whether the listening connection is up.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Owner-change notifications received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    /// Documents written by other replicas.
    pub fn documents(&self) -> broadcast::Receiver<DocumentChange> {
        self.docs.subscribe()
    }
}

/// Starts the listener: one connection of its own, reconnected with a growing pause (at most 2 s)
/// whenever it is lost.
pub fn listen(target: PgTarget, node: String) -> Arc<OwnerSignal> {
    let signal = Arc::new(OwnerSignal {
        wake: Notify::new(),
        listening: AtomicBool::new(false),
        received: AtomicU64::new(0),
        node,
        docs: broadcast::channel(1024).0,
    });
    let running = Arc::clone(&signal);
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(100);
        loop {
            match listen_once(&target, &running).await {
                Ok(()) => pause = Duration::from_millis(100),
                Err(err) => {
                    tracing::debug!(error = %err, "owner-change listener disconnected");
                }
            }
            running.listening.store(false, Ordering::Release);
            // Whatever was announced meanwhile is lost: the follower re-reads now, and the
            // document cache forgets everything.
            running.wake.notify_waiters();
            let _ = running.docs.send(DocumentChange::All);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    });
    signal
}

async fn listen_once(target: &PgTarget, signal: &OwnerSignal) -> Result<(), PgError> {
    let (client, mut connection) = target.config.connect(target.tls()?).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let message = (n.channel().to_string(), n.payload().to_string());
                    if tx.send(message).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "owner-change listener connection failed");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {DOCS_CHANNEL}"))
        .await?;
    signal.listening.store(true, Ordering::Release);
    // Changes made before LISTEN took effect were not announced to us.
    signal.wake.notify_waiters();
    let _ = signal.docs.send(DocumentChange::All);
    while let Some((channel, payload)) = rx.recv().await {
        if channel == DOCS_CHANNEL {
            match parse_document_payload(&payload) {
                Some((node, _)) if node == signal.node => {}
                Some((_, change)) => {
                    let _ = signal.docs.send(change);
                }
                None => {
                    let _ = signal.docs.send(DocumentChange::All);
                }
            }
            continue;
        }
        signal.received.fetch_add(1, Ordering::AcqRel);
        signal.wake.notify_waiters();
    }
    driver.abort();
    Err(PgError::Unavailable("listening connection closed".into()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::TestDatabase;
    use super::*;

    #[tokio::test]
    async fn an_announcement_wakes_every_listener_at_commit() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let (a, b) = (
            listen(db.target().clone(), "a".into()),
            listen(db.target().clone(), "b".into()),
        );
        for _ in 0..100 {
            if a.listening() && b.listening() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(a.listening() && b.listening());
        let pool = db.target().pool().unwrap();
        let mut client = pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        announce(&tx, "7").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(a.received(), 0, "nothing before the commit");
        let started = std::time::Instant::now();
        tx.commit().await.unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(1), async {
            while a.received() == 0 || b.received() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "not delivered within a second");
        assert!(started.elapsed() < Duration::from_secs(1));
        // The listeners' connections killed: they come back by themselves.
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let back = tokio::time::timeout(Duration::from_secs(5), async {
            while !(a.listening() && b.listening()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(back.is_ok(), "listeners did not reconnect");
        announce(&client, "8").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), async {
            while a.received() < 2 || b.received() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(got.is_ok());
    }
}
