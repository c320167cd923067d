//! Replay marks: "this id was used until then", accepted once. The domain keeps the marks in
//! memory (`vault::replay`); the engine makes them durable in batches and, where several
//! processes share the storage, decides which of them saw a mark first.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::{StorageError, StorageResult};

/// What is remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplayKind {
    /// `X-TokenVault-Request-Id` values (600 s).
    RequestId,
    /// Ticket nonces (until the ticket's expiry plus the clock-skew allowance).
    Nonce,
    /// Ed25519 request-envelope nonces (until the envelope's timestamp plus the clock-skew allowance).
    EnvelopeNonce,
    /// HMAC request signatures (until the request's timestamp plus the clock-skew allowance): the
    /// same signed bytes are accepted once, whatever request id or endpoint they come with.
    Signature,
}

impl ReplayKind {
    /// Every kind.
    pub const ALL: [ReplayKind; 4] = [
        ReplayKind::RequestId,
        ReplayKind::Nonce,
        ReplayKind::EnvelopeNonce,
        ReplayKind::Signature,
    ];

    /// Stored code.
    pub fn code(self) -> i64 {
        match self {
            ReplayKind::RequestId => 1,
            ReplayKind::Nonce => 2,
            ReplayKind::EnvelopeNonce => 3,
            ReplayKind::Signature => 4,
        }
    }

    /// The kind of a stored code; an unknown one (a newer keyholder's) is kept as a nonce, since
    /// refusing too much is safe.
    pub fn from_code(code: i64) -> ReplayKind {
        ReplayKind::ALL
            .into_iter()
            .find(|kind| kind.code() == code)
            .unwrap_or(ReplayKind::Nonce)
    }
}

/// The 8-byte key a mark is kept under: the first 8 bytes of the SHA-256 of its id. Fixed size
/// (a fifth of a `String` entry) whatever the id's length. A collision could only refuse a fresh
/// id as a replay (never accept a replay), ids and nonces are chosen by the signer, and with
/// millions of live marks the chance that a fresh id collides is about one in 10^12.
pub fn mark_key(id: &str) -> u64 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(id.as_bytes());
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(key)
}

/// One mark: its kind, the 8-byte key of its id (first 8 bytes of SHA-256), its expiry (unix s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// The kind.
    pub kind: ReplayKind,
    /// The id's key.
    pub key: u64,
    /// Needed until this unix second (never negative).
    pub expires_at: i64,
}

/// A live mark read back at start; `until` may be later than the mark's own expiry (an engine may
/// keep marks in groups), never earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedMark {
    /// The kind.
    pub kind: ReplayKind,
    /// The id's key.
    pub key: u64,
    /// Refused until this unix second.
    pub until: i64,
}

/// The engine's verdict on a batch of marks once durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkVerdict {
    /// All marks are new and durable.
    Fresh,
    /// The mark at this index was already held by the storage (another replica used it); none of
    /// the batch is kept.
    Replayed(usize),
}

/// A batch of marks handed to the engine, resolving once durable. A plain channel, not a boxed
/// future: one is made per request on the credential hot path.
pub struct MarkCommit {
    rx: oneshot::Receiver<StorageResult<MarkVerdict>>,
}

/// The sending half of a [`MarkCommit`], for engines.
pub type MarkReply = oneshot::Sender<StorageResult<MarkVerdict>>;

impl MarkCommit {
    /// A commit and the sender its engine answers on.
    pub fn channel() -> (MarkReply, MarkCommit) {
        let (tx, rx) = oneshot::channel();
        (tx, MarkCommit { rx })
    }

    /// A commit that already failed.
    pub fn failed(err: StorageError) -> MarkCommit {
        let (tx, commit) = MarkCommit::channel();
        let _ = tx.send(Err(err));
        commit
    }
}

impl Future for MarkCommit {
    type Output = StorageResult<MarkVerdict>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|received| {
            received.unwrap_or_else(|_| Err(StorageError::Unavailable("replay writer gone".into())))
        })
    }
}

/// The replay-marks repository.
#[async_trait]
pub trait ReplayMarks: Send + Sync {
    /// True when this process is the only one using the storage: the in-memory check is then the
    /// authority and every verdict is [`MarkVerdict::Fresh`], so the domain may answer before
    /// the commit resolves (awaiting it before the answer leaves). False for shared engines: the
    /// domain awaits the verdict before going on.
    fn verdict_is_local(&self) -> bool;

    /// Every mark not expired at `now` (at start; converting older layouts first).
    async fn load_marks(&self, now: i64) -> StorageResult<Vec<LoadedMark>>;

    /// Queues marks for the next group commit (all or none) and returns at once. Engines batch
    /// the marks of concurrent requests into one write.
    fn append_marks(&self, marks: Vec<Mark>) -> MarkCommit;

    /// Drops marks expired at `now` (SQLite: whole tables of a period); returns how many groups
    /// (tables, partitions) were dropped.
    async fn drop_expired_marks(&self, now: i64) -> StorageResult<usize>;
}
