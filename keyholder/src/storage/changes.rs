//! Owner changes as one typed transaction: checks that must still hold, writes across
//! repositories, audit entries and the owner-generation bump, applied all or none by
//! [`ChangeSets::apply`]. This is how the owner CLI and the domain's compound writes stay atomic
//! without holding a transaction (or a connection) themselves.

use async_trait::async_trait;
use keyholder_protocol::wire::Collection;

use super::audit::{AuditEvent, SharedSigner};
use super::binding::StoredPlatformKey;
use super::egress::EgressRow;
use super::keyring::{ImportedField, WrappedKey};
use super::oauth::OAuthClientRow;
use super::policies::{AttachmentRow, PolicyRow};
use super::settings::Setting;
use super::StorageResult;

/// A condition checked in the transaction before any write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The setting holds exactly this (`None`: unset).
    SettingIs(Setting, Option<String>),
    /// No document under this key.
    DocumentAbsent(Collection, String),
    /// The document under this key reads exactly this text.
    DocumentIs(Collection, String, String),
    /// The highest version of a key kind is this (0: none).
    LatestKeyVersion(String, u32),
    /// A policy of this name exists (`true`) or not (`false`).
    PolicyExists(String, bool),
    /// An attachment (policy, kind, target) exists (`true`) or not (`false`).
    AttachmentIs(String, String, String, bool),
    /// The active platform keys are exactly these ids (any order).
    PlatformKeysAre(Vec<String>),
    /// An approval of this id is undecided and unexpired at this unix time.
    ApprovalPending(String, i64),
}

/// One write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Sets a setting.
    PutSetting(Setting, String),
    /// Removes a setting.
    DeleteSetting(Setting),
    /// Upserts a document.
    PutDocument {
        /// Collection.
        collection: Collection,
        /// Key.
        key: String,
        /// JSON text.
        doc: String,
        /// Unix time.
        now: i64,
    },
    /// Replaces a document's text, keeping its update time (re-encryption).
    RewriteDocument(Collection, String, String),
    /// Deletes a document.
    DeleteDocument(Collection, String),
    /// Marks a GitHub App credential stored before sealed minting inputs.
    MarkLegacyMinting(String),
    /// Clears that mark.
    ClearLegacyMinting(String),
    /// Inserts or replaces a wrapped key.
    PutKey(WrappedKey),
    /// Deletes one key version.
    DeleteKey(String, u32),
    /// Deletes every version of a kind below `version`.
    DeleteKeysBelow(String, u32),
    /// Deletes every version of a kind.
    DeleteKeysOfKind(String),
    /// Records where an imported v1 ciphertext belongs.
    RecordImportedField(ImportedField),
    /// Forgets every imported-field record.
    ClearImportedFields,
    /// Replaces a re-bind code's wrapped pending secret (master key rotation).
    PutPendingSecret(String, Vec<u8>),
    /// Deletes every bind code.
    DeleteBindCodes,
    /// Adds a platform public key.
    AddPlatformKey(StoredPlatformKey),
    /// Removes a platform public key.
    RemovePlatformKey(String),
    /// Upserts an OAuth client.
    PutOAuthClient(OAuthClientRow),
    /// Removes an OAuth client.
    RemoveOAuthClient(String),
    /// Upserts a service's signing configuration (service, JSON text, `now`: its update time).
    PutSignConfig(String, String, i64),
    /// Removes a service's signing configuration.
    DeleteSignConfig(String),
    /// Upserts a service's egress policy row (`now`: its update time).
    PutEgressPolicy(EgressRow, i64),
    /// Removes a service's egress policy row.
    DeleteEgressPolicy(String),
    /// Removes every pin of a service.
    DeleteEgressPins(String),
    /// Removes one recorded refusal.
    DeleteRefusal(String, String),
    /// Upserts a policy (`now`: its update time).
    PutPolicy(PolicyRow, i64),
    /// Deletes a policy with its attachments and usage counts.
    DeletePolicy(String),
    /// Adds an attachment (kept if present).
    Attach(AttachmentRow),
    /// Adds or replaces an attachment.
    ReplaceAttachment(AttachmentRow),
    /// Removes an attachment.
    Detach(String, String, String),
    /// Removes every attachment of a source (`file`).
    DeleteAttachmentsOf(String),
    /// Decides an approval (the owner's `approve`/`deny`; rows expired over a day ago pruned).
    DecideApproval {
        /// Approval id.
        id: String,
        /// Approved or denied.
        approve: bool,
        /// Unix time.
        now: i64,
    },
}

/// A set of changes applied all or none.
#[derive(Default, Clone)]
pub struct ChangeSet {
    /// Checked first, in order; the first that fails stops the set.
    pub checks: Vec<Check>,
    /// Applied in order.
    pub writes: Vec<Write>,
    /// Appended to the audit trail in the same transaction (with the signer).
    pub audit: Option<(Vec<AuditEvent>, SharedSigner)>,
    /// Bump the owner generation in the same transaction.
    pub bump_generation: bool,
}

impl ChangeSet {
    /// An owner change: bumps the generation.
    pub fn owner() -> ChangeSet {
        ChangeSet {
            bump_generation: true,
            ..ChangeSet::default()
        }
    }

    /// Adds a check.
    pub fn check(mut self, check: Check) -> ChangeSet {
        self.checks.push(check);
        self
    }

    /// Adds a write.
    pub fn write(mut self, write: Write) -> ChangeSet {
        self.writes.push(write);
        self
    }

    /// Adds an audit entry.
    pub fn audited(mut self, event: AuditEvent, signer: SharedSigner) -> ChangeSet {
        match &mut self.audit {
            Some((events, _)) => events.push(event),
            None => self.audit = Some((vec![event], signer)),
        }
        self
    }
}

/// What [`ChangeSets::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Everything written. `changed[i]`: whether write `i` changed a row (e.g. a detach of a
    /// missing attachment did not).
    Done {
        /// Per write, whether it changed anything.
        changed: Vec<bool>,
    },
    /// Check `i` failed: nothing written.
    CheckFailed(usize),
}

/// Applies change sets.
#[async_trait]
pub trait ChangeSets: Send + Sync {
    /// Applies a change set in one transaction (durable on return).
    async fn apply(&self, changes: ChangeSet) -> StorageResult<Applied>;
}
