//! The storage interface the domain lives on: one repository trait per concern, typed rows and
//! outcomes, one error type, async at the edges. Engines implement every trait; the domain
//! (`vault/`, `policy/`, `audit/`), the HTTP layer and the owner CLI hold an [`SharedStorage`] and
//! never see SQL. SQLite (`sqlite/`) is the embedded engine; `conformance` is the suite every
//! engine must pass.
//!
//! Rules for engines: no transaction or connection is held by a caller (compound writes are
//! repository methods or a [`ChangeSet`]); a method returns only once its write is durable; replay
//! marks and usage counts are batched by the engine (group commit); "accepted once" holds across
//! every process sharing the storage.

pub mod audit;
pub mod binding;
pub mod changes;
#[cfg(any(test, feature = "storage-conformance"))]
pub mod conformance;
pub mod documents;
pub mod egress;
mod error;
pub mod keyring;
pub mod oauth;
pub mod policies;
pub mod postgres;
pub mod replay;
pub mod settings;
pub mod sign_configs;
pub mod sqlite;

use std::sync::Arc;

pub use audit::{AuditLog, AuditSigner, SharedSigner};
pub use binding::{
    BindCode, Binding, Exchange, ExchangeInstall, ExchangeOutcome, StoredPlatformKey,
};
pub use changes::{Applied, ChangeSet, ChangeSets, Check, Write};
pub use documents::{
    CredentialDocument, CredentialWrite, DocumentChange, DocumentSwap, Documents, ScannedDocument,
    StoredDocument, SwapOutcome,
};
pub use egress::{EgressRow, EgressStore, PinRow, RefusalRow};
pub use error::{StorageError, StorageResult};
pub use keyring::{ImportedField, KeyRingSnapshot, KeyRingStore, WrappedKey};
pub use oauth::{OAuthClientRow, OAuthClients};
pub use policies::{
    grant_capped_uses, ApprovalDecision, ApprovalRow, AttachmentRow, CappedUse, PolicyRow,
    PolicySnapshot, PolicyStore, UsageCommit, UsageCounter, UsageReply, UsageTake,
};
pub use replay::{LoadedMark, Mark, MarkCommit, MarkReply, MarkVerdict, ReplayKind, ReplayMarks};
pub use settings::{Setting, Settings};
pub use sign_configs::SignConfigs;

/// Every repository of one engine.
pub trait Storage:
    Documents
    + ReplayMarks
    + Binding
    + KeyRingStore
    + EgressStore
    + PolicyStore
    + OAuthClients
    + SignConfigs
    + AuditLog
    + Settings
    + ChangeSets
    + Send
    + Sync
{
    /// The engine's name for logs and metrics (`sqlite`, `postgres`).
    fn engine(&self) -> &'static str;

    /// Stops accepting writes (queued ones finish).
    fn close(&self);
}

/// The storage shared by the whole process.
pub type SharedStorage = Arc<dyn Storage>;
