//! The owner's controls beyond binding: status, data-key rotation, rewrap and retirement, master
//! key rotation, backup and restore, the seal (kill switch), the audit trail and the import from the
//! reference webhook. Each works on the data folder in its own short transactions, also while a
//! server runs on it; the server follows within a quarter second (see `vault::reload`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::Value;

use super::session::{block, open_storage, Owner};
use crate::audit::{self, AuditEntry, AuditFilter, AuditVerification};
use crate::config::DataArgs;
use crate::storage::{Setting, Write};
use crate::store::backup;
use crate::vault::import::{self, ImportReport};
use crate::vault::keyring::{self, KIND_LEGACY};
use crate::vault::master::{self, load_master_key};
use crate::vault::{pkcs11, platform_keys, reload, rotation};

/// Flags of commands that only need the data folder and its master key.
#[derive(Debug, Clone, Args)]
pub struct OwnerArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `keyholder rewrap`.
#[derive(Debug, Clone, Args)]
pub struct RewrapArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Credentials re-encrypted per transaction (small batches keep the server writing in between).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch_size: u16,
}

/// Flags of `keyholder retire-key`.
#[derive(Debug, Clone, Args)]
pub struct RetireKeyArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// The data-key version to remove, or `platform-v1` for the reference webhook's key (kept by
    /// `import-reference`).
    #[arg(value_name = "VERSION|platform-v1", value_parser = parse_retired_key)]
    pub key: RetiredKey,
}

/// A key `keyholder retire-key` can remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetiredKey {
    /// A data-key version.
    Data(u32),
    /// The reference webhook's key, for platform v1 ciphertexts.
    PlatformV1,
}

impl std::fmt::Display for RetiredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RetiredKey::Data(version) => write!(f, "data key v{version}"),
            RetiredKey::PlatformV1 => f.write_str("reference key platform-v1"),
        }
    }
}

fn parse_retired_key(text: &str) -> Result<RetiredKey, String> {
    if text == "platform-v1" {
        return Ok(RetiredKey::PlatformV1);
    }
    text.strip_prefix('v')
        .unwrap_or(text)
        .parse()
        .map(RetiredKey::Data)
        .map_err(|_| "expected a data-key version (a number) or `platform-v1`".to_string())
}

/// Flags of `keyholder rotate-master-key`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("new_master").required(true).args(["new_master_key_file", "new_passphrase_file", "to_pkcs11"])))]
pub struct RotateMasterKeyArgs {
    /// Data folder and the current master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// File holding the new 32-byte master key (raw or base64).
    #[arg(long)]
    pub new_master_key_file: Option<PathBuf>,
    /// File holding the new passphrase (the key is derived with Argon2id and a new salt).
    #[arg(long)]
    pub new_passphrase_file: Option<PathBuf>,
    /// Seal the key ring by this PKCS#11 token key from now on (RFC 7512 URI; module and PIN from
    /// --pkcs11-module and --pkcs11-pin-file / KEYHOLDER_PKCS11_PIN).
    #[arg(long, value_name = "URI")]
    pub to_pkcs11: Option<String>,
    /// The current master key is sealed by this PKCS#11 token key (same as --master-key-pkcs11).
    #[arg(long, value_name = "URI", conflicts_with_all = ["master_key_file", "passphrase_file", "master_key_pkcs11"])]
    pub from_pkcs11: Option<String>,
}

/// Flags of `keyholder backup`.
#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    /// Data folder (the master key is not needed: the snapshot holds wrapped keys only).
    #[command(flatten)]
    pub data: DataArgs,
    /// File to write (must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

/// Flags of `keyholder restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// The new (empty) data folder, and optionally the master key to check the backup against.
    #[command(flatten)]
    pub data: DataArgs,
    /// Backup file made by `keyholder backup`.
    #[arg(long)]
    pub from: PathBuf,
}

/// `keyholder audit` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Print entries, oldest first.
    List(AuditListArgs),
    /// Write every entry, one JSON object per line.
    Export(AuditExportArgs),
    /// Check the whole chain: hashes, signatures, order, nothing removed. Exit 1 on the first bad entry.
    Verify(OwnerArgs),
    /// Remove entries older than N days (the chain is verified first; a signed prune entry records
    /// where the kept chain starts, so `verify` still proves nothing else was removed).
    Prune(AuditPruneArgs),
}

/// Flags of `keyholder audit prune`.
#[derive(Debug, Clone, Args)]
pub struct AuditPruneArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Remove entries older than this many days (entries newer are always kept; 0 = every entry
    /// written before now).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=36_500))]
    pub older_than_days: u32,
    /// First write the entries to be removed to this new file (JSON lines, as `audit export`),
    /// fsync'ed before anything is deleted.
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// Prune even though the chain does not verify (the broken part may be evidence: export it).
    #[arg(long)]
    pub force: bool,
}

/// What `keyholder audit prune` did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditPruneReport {
    /// Entries removed.
    pub removed: u64,
    /// Last removed sequence number (0 when nothing was old enough).
    pub through_seq: u64,
    /// Entries written to `--export`.
    pub exported: usize,
}

/// Flags of `keyholder audit list`.
#[derive(Debug, Clone, Args)]
pub struct AuditListArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Only this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Only entries at or after this time (unix seconds or `YYYY-MM-DDTHH:MM:SSZ`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only the newest N entries.
    #[arg(long)]
    pub limit: Option<u64>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `keyholder audit export`.
#[derive(Debug, Clone, Args)]
pub struct AuditExportArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Output format.
    #[arg(long, default_value = "jsonl", value_parser = ["jsonl"])]
    pub format: String,
    /// Write to this file instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Flags of `keyholder import-reference`.
#[derive(Debug, Clone, Args)]
pub struct ImportReferenceArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// The reference's key file (`tokenvault_store.json`: webhook id, encryption key, HMAC secret).
    #[arg(long)]
    pub store: PathBuf,
    /// The reference's collections file (`tokenvault_kv_store.json`).
    #[arg(long)]
    pub kv: PathBuf,
    /// Import into a keyholder that already holds documents or is bound (same keys are replaced).
    #[arg(long)]
    pub force: bool,
}

/// Flags of `keyholder store`.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// The service (credential key) to store the credential under; an existing one is replaced.
    pub service: String,
    /// The credential's `tokenType` (default `oauth`).
    #[arg(long = "type", value_name = "T")]
    pub token_type: Option<String>,
    /// A non-secret meta field, `key=value` (repeatable); never a sensitive field name.
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// File holding the secret, or `-` for standard input (the secret is never an argument).
    /// Trailing line breaks are dropped.
    #[arg(long, value_name = "FILE|-")]
    pub secret_file: PathBuf,
    /// The sensitive field the secret is stored as.
    #[arg(long, default_value = "accessToken")]
    pub field: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Longest secret `keyholder store` reads (the `/v1/store` body limit).
pub const MAX_STORED_SECRET: usize = 64 * 1024;

/// Meta keys `keyholder store --meta` refuses: sensitive fields (they would put a secret on the
/// command line) and `totpUri` (an `otpauth://` link holds the TOTP seed).
fn check_meta_key(key: &str) -> anyhow::Result<()> {
    if key.is_empty() || key.len() > 128 || key.chars().any(char::is_control) {
        anyhow::bail!("--meta: a key must be 1-128 characters without control characters");
    }
    if keyholder_protocol::document::is_sensitive(key) || key == "totpUri" {
        anyhow::bail!(
            "--meta {key}=...: '{key}' holds a secret; pass it with --field {key} --secret-file FILE|- instead"
        );
    }
    Ok(())
}

/// Reads the secret from a file or (`-`) from `stdin`: at most [`MAX_STORED_SECRET`] bytes of
/// UTF-8, trailing CR/LF dropped, held in zeroizing memory.
fn read_secret(
    path: &Path,
    stdin: &mut dyn std::io::Read,
) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::io::Read as _;
    let mut raw = zeroize::Zeroizing::new(Vec::new());
    let limit = (MAX_STORED_SECRET + 1) as u64;
    if path == Path::new("-") {
        stdin.take(limit).read_to_end(&mut raw)?;
    } else {
        std::fs::File::open(path)
            .with_context(|| format!("--secret-file {}", path.display()))?
            .take(limit)
            .read_to_end(&mut raw)
            .with_context(|| format!("--secret-file {}", path.display()))?;
    }
    if raw.len() > MAX_STORED_SECRET {
        anyhow::bail!("--secret-file: the secret is longer than {MAX_STORED_SECRET} bytes");
    }
    let end = raw
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n'))
        .map_or(0, |i| i + 1);
    raw.truncate(end);
    if raw.is_empty() {
        anyhow::bail!("--secret-file: the secret is empty");
    }
    let text = std::str::from_utf8(&raw)
        .map_err(|_| anyhow::anyhow!("--secret-file: the secret is not UTF-8 text"))?;
    Ok(zeroize::Zeroizing::new(text.to_owned()))
}

/// What `keyholder store` stored (never the secret).
#[derive(Debug, Clone, Serialize)]
pub struct StoreReport {
    /// Always `stored`.
    pub status: &'static str,
    /// The service.
    pub service: String,
    /// The credential's meta, as `/v1/store` answers it.
    pub meta: serde_json::Map<String, Value>,
}

/// `keyholder store SERVICE --secret-file FILE|-`: seals the secret (and the meta) as the
/// service's credential in the data folder, with an `owner:store` audit entry; a running server
/// serves it within a quarter second. `stdin` is read for `--secret-file -`.
pub fn store(args: &StoreArgs, stdin: &mut dyn std::io::Read) -> anyhow::Result<StoreReport> {
    crate::vault::collections::validate_key(&args.service)?;
    if !keyholder_protocol::document::is_sensitive(&args.field) {
        anyhow::bail!(
            "--field {}: must be one of {}",
            args.field,
            keyholder_protocol::document::SENSITIVE_FIELDS.join(", ")
        );
    }
    let mut token_data = serde_json::Map::new();
    for entry in &args.meta {
        let (key, value) = entry
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--meta {entry}: expected KEY=VALUE"))?;
        check_meta_key(key)?;
        token_data.insert(key.to_owned(), Value::String(value.to_owned()));
    }
    if let Some(token_type) = &args.token_type {
        if token_type.is_empty() || token_type.len() > 128 {
            anyhow::bail!("--type: must be 1-128 characters");
        }
        token_data.insert("tokenType".into(), Value::String(token_type.clone()));
    }
    let secret = read_secret(&args.secret_file, stdin)?;
    token_data.insert(
        args.field.clone(),
        Value::String(secret.as_str().to_owned()),
    );
    drop(secret);
    let service = args.service.clone();
    let result = block(async {
        let owner = Owner::open(&args.data).await?;
        let ring = owner.ring().await?;
        let existing = owner
            .storage()
            .document(keyholder_protocol::wire::Collection::Tokens, &service)
            .await?;
        let (change, meta) = crate::vault::credentials::store_on_disk(
            &ring,
            &service,
            &mut token_data,
            existing.as_deref(),
            crate::clock::now_unix(),
        )?;
        owner.commit("store", &service, change).await?;
        Ok(meta)
    });
    token_data
        .values_mut()
        .for_each(crate::vault::credentials::scrub);
    Ok(StoreReport {
        status: "stored",
        service: args.service.clone(),
        meta: result?,
    })
}

/// What `keyholder status` reports.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Bound to a platform.
    pub bound: bool,
    /// How the platform authenticates: `hmac` or `ed25519` (asymmetric binding).
    pub platform_scheme: String,
    /// Key ids of the active platform keys (asymmetric binding).
    pub platform_keys: Vec<String>,
    /// Webhook id.
    pub webhook_id: String,
    /// Identity key id (signs responses and the audit trail).
    pub identity_key_id: String,
    /// Data-key versions held.
    pub data_key_versions: Vec<u32>,
    /// The version new credentials are written under.
    pub current_data_key: u32,
    /// Documents referencing each data-key version.
    pub documents_per_key: BTreeMap<u32, usize>,
    /// Whether the reference webhook's key is held (for platform v1 documents).
    pub reference_key: bool,
    /// Credentials the reference key still opens (v1 fields where they were imported); at 0
    /// `retire-key platform-v1` can remove it.
    pub reference_key_documents: usize,
    /// Stored credentials.
    pub credential_count: u64,
    /// Sealed by the owner.
    pub sealed: bool,
    /// Newest successful credential use (ISO 8601), from the audit trail.
    pub last_credential_use: Option<String>,
    /// Audit entries.
    pub audit_entries: u64,
    /// Custody policies with their attachments and usage counts.
    pub policies: Vec<super::policy::PolicyView>,
}

/// `keyholder status`.
pub fn status(args: &OwnerArgs) -> anyhow::Result<Status> {
    block(async {
        let owner = Owner::open(&args.data).await?;
        let storage = owner.storage();
        let snapshot = storage.key_ring_snapshot().await?;
        let (ring, _, webhook_id) = keyring::load(&snapshot, &owner.master)?;
        let (reference_key_documents, _) = rotation::platform_v1_in_use(storage, &ring).await?;
        Ok(Status {
            bound: snapshot.is_bound(),
            platform_scheme: platform_keys::read_scheme(&snapshot).as_str().to_owned(),
            platform_keys: platform_keys::list_keys(storage)
                .await?
                .into_iter()
                .map(|k| k.key_id)
                .collect(),
            webhook_id,
            identity_key_id: ring.identity().key_id(),
            data_key_versions: ring.data_versions(),
            current_data_key: ring.current_data_version(),
            documents_per_key: rotation::versions_in_use(storage)
                .await?
                .into_iter()
                .map(|(v, (n, _))| (v, n))
                .collect(),
            reference_key: snapshot.keys.iter().any(|k| k.kind == KIND_LEGACY),
            reference_key_documents,
            credential_count: storage
                .count_documents(Some(keyholder_protocol::wire::Collection::Tokens))
                .await?,
            sealed: reload::read_sealed(&snapshot),
            last_credential_use: storage
                .last_credential_use()
                .await?
                .map(|ms| keyholder_protocol::document::format_iso8601(ms.div_euclid(1000))),
            audit_entries: storage.audit_count().await?,
            policies: super::policy::views(storage).await?,
        })
    })
}

/// `keyholder rotate-key`: returns the new current version.
pub fn rotate_key(args: &OwnerArgs) -> anyhow::Result<u32> {
    block(async {
        let owner = Owner::open(&args.data).await?;
        let snapshot = owner.storage().key_ring_snapshot().await?;
        let (change, version) = rotation::rotate_data_key(&snapshot, &owner.master)?;
        owner
            .commit("rotate-key", &format!("data key v{version}"), change)
            .await?;
        Ok(version)
    })
}

/// What `keyholder rewrap` did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RewrapReport {
    /// The version everything was re-encrypted under.
    pub current_data_key: u32,
    /// Credentials looked at.
    pub examined: usize,
    /// Credentials re-encrypted.
    pub rewrapped: usize,
    /// Transactions used.
    pub batches: usize,
    /// Credentials that could not be opened (left unchanged), by key.
    pub failed: Vec<String>,
    /// Data-key versions still referenced afterwards, with document counts.
    pub still_in_use: BTreeMap<u32, usize>,
    /// Whether the reference webhook's key is still held.
    pub reference_key: bool,
    /// Credentials the reference key still opens afterwards.
    pub reference_key_documents: usize,
}

/// `keyholder rewrap`: every credential under the current data key, in small transactions. Passes
/// over the credentials until none is left under an older key (a server that has not yet noticed a
/// rotation may write one more under the old key; its next write uses the new one).
pub fn rewrap(args: &RewrapArgs) -> anyhow::Result<RewrapReport> {
    block(async {
        let owner = Owner::open(&args.data).await?;
        let storage = owner.storage();
        let mut report = RewrapReport::default();
        for pass in 0..5 {
            let mut cursor: Option<String> = None;
            report.failed.clear();
            loop {
                let (change, batch) = rotation::rewrap_batch(
                    storage,
                    &owner.master,
                    cursor.as_deref(),
                    usize::from(args.batch_size),
                )
                .await?;
                if batch.rewrapped > 0 {
                    if let crate::storage::Applied::CheckFailed(_) = storage.apply(change).await? {
                        // A document changed under the batch (a store by the server): again.
                        continue;
                    }
                }
                report.batches += 1;
                report.examined += batch.examined;
                report.rewrapped += batch.rewrapped;
                report.failed.extend(batch.failed);
                match batch.last_key {
                    Some(last) if batch.examined == usize::from(args.batch_size) => {
                        cursor = Some(last)
                    }
                    _ => break,
                }
            }
            let ring = owner.ring().await?;
            report.current_data_key = ring.current_data_version();
            report.still_in_use = rotation::versions_in_use(storage)
                .await?
                .into_iter()
                .filter(|(v, _)| *v != report.current_data_key)
                .map(|(v, (n, _))| (v, n))
                .collect();
            report.reference_key = ring.has_platform_v1_key();
            report.reference_key_documents = rotation::platform_v1_in_use(storage, &ring).await?.0;
            if (report.still_in_use.is_empty() && report.reference_key_documents == 0) || pass == 4
            {
                break;
            }
            // Give a server that is about to reload its key ring the moment it needs.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        let detail = format!(
            "{} credential(s) under data key v{}",
            report.rewrapped, report.current_data_key
        );
        // The entry alone (the batches were written and followed already).
        let note = crate::storage::ChangeSet::default();
        owner.commit("rewrap", &detail, note).await?;
        Ok(report)
    })
}

/// `keyholder retire-key VERSION|platform-v1`.
pub fn retire_key(args: &RetireKeyArgs) -> anyhow::Result<()> {
    block(async {
        let owner = Owner::open(&args.data).await?;
        let key = args.key;
        let change = match key {
            RetiredKey::Data(version) => {
                rotation::retire_data_key(owner.storage(), version).await?
            }
            RetiredKey::PlatformV1 => {
                rotation::retire_platform_v1_key(owner.storage(), &owner.master).await?
            }
        };
        owner.commit("retire-key", &key.to_string(), change).await?;
        Ok(())
    })
}

/// `keyholder rotate-master-key`: re-wraps the key ring under the new master key. Returns how
/// many wrapped values moved.
pub fn rotate_master_key(args: &RotateMasterKeyArgs) -> anyhow::Result<usize> {
    let mut current = args.data.clone();
    if let Some(uri) = &args.from_pkcs11 {
        current.pkcs11.master_key_pkcs11 = Some(uri.clone());
    }
    let (new, salt, sealed) = match (
        &args.new_master_key_file,
        &args.new_passphrase_file,
        &args.to_pkcs11,
    ) {
        (Some(file), _, _) => (master::read_key_file(file)?, None, None),
        (None, Some(file), _) => {
            let salt = master::new_kdf_salt();
            (master::derive_with_salt(file, &salt)?, Some(salt), None)
        }
        (None, None, Some(uri)) => {
            let (key, sealed) = pkcs11::new_sealed_master(&args.data.pkcs11.config_for(uri))?;
            (key, None, Some(sealed))
        }
        (None, None, None) => {
            anyhow::bail!("pass --new-master-key-file, --new-passphrase-file or --to-pkcs11")
        }
    };
    block(async {
        let owner = Owner::open(&current).await?;
        let (mut change, moved) =
            rotation::rotate_master_key(owner.storage(), &owner.master, &new, salt.as_deref())
                .await?;
        change = change.write(match &sealed {
            Some(sealed) => Write::PutSetting(Setting::Pkcs11SealedMaster, sealed.clone()),
            None => Write::DeleteSetting(Setting::Pkcs11SealedMaster),
        });
        // The entry is signed with the identity key, which the rotation does not change.
        owner
            .commit(
                "rotate-master-key",
                &format!("{moved} wrapped value(s)"),
                change,
            )
            .await?;
        Ok(moved)
    })
}

/// `keyholder seal` (`sealed = true`) and `keyholder unseal`.
pub fn set_sealed(args: &OwnerArgs, sealed: bool) -> anyhow::Result<()> {
    block(async {
        let owner = Owner::open(&args.data).await?;
        let command = if sealed { "seal" } else { "unseal" };
        owner
            .commit(command, "", reload::write_sealed(sealed))
            .await?;
        Ok(())
    })
}

/// `keyholder backup --out FILE`.
pub fn backup(args: &BackupArgs) -> anyhow::Result<()> {
    let storage = open_storage(&args.data.data_dir, false)?;
    backup::backup_database(
        &args.data.data_dir.join(crate::store::DATABASE_FILE),
        &args.out,
    )
    .with_context(|| format!("backup to {} failed", args.out.display()))?;
    // For `keyholder doctor`'s backup age (after the snapshot: the backup does not carry it).
    block(async {
        storage
            .put_setting(Setting::LastBackupAt, &crate::clock::now_unix().to_string())
            .await?;
        storage.close();
        Ok(())
    })
}

/// What `keyholder restore` found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    /// Webhook id of the restored keyholder.
    pub webhook_id: String,
    /// Whether the given master key opens the restored key ring (`None`: no master key given).
    pub master_key_checked: Option<bool>,
}

/// `keyholder restore --from FILE --data-dir DIR`: into an empty folder only.
pub fn restore(args: &RestoreArgs) -> anyhow::Result<RestoreReport> {
    backup::restore_database(&args.from, &args.data.data_dir)
        .with_context(|| format!("restore from {} failed", args.from.display()))?;
    let storage = open_storage(&args.data.data_dir, false)?;
    block(async {
        let snapshot = storage.key_ring_snapshot().await?;
        let webhook_id = snapshot
            .setting(Setting::WebhookId)
            .unwrap_or_default()
            .to_string();
        let master_key_checked =
            if args.data.master_key_file.is_some() || args.data.passphrase_file.is_some() {
                let source = args.data.master_key_source();
                let ok = load_master_key(&args.data.data_dir, &source, &snapshot)
                    .ok()
                    .is_some_and(|m| keyring::load(&snapshot, &m.key).is_ok());
                Some(ok)
            } else {
                None
            };
        storage.close();
        Ok(RestoreReport {
            webhook_id,
            master_key_checked,
        })
    })
}

async fn identity_verifying_key(
    owner: &Owner,
) -> anyhow::Result<(ed25519_dalek::VerifyingKey, String)> {
    let ring = owner.ring().await?;
    Ok((ring.identity().verifying_key(), ring.identity().key_id()))
}

/// `keyholder audit list`.
pub fn audit_list(args: &AuditListArgs) -> anyhow::Result<Vec<AuditEntry>> {
    let since_ms = match &args.since {
        Some(text) => Some(audit::parse_since(text).ok_or_else(|| {
            anyhow::anyhow!("--since must be unix seconds or YYYY-MM-DDTHH:MM:SSZ")
        })?),
        None => None,
    };
    block(async {
        let owner = Owner::open(&args.data).await?;
        Ok(owner
            .storage()
            .audit_entries(AuditFilter {
                service: args.service.clone(),
                since_ms,
                limit: args.limit,
                through_seq: None,
            })
            .await?)
    })
}

/// Characters that must not reach the owner's terminal as they are: C0 and C1 controls and DEL
/// (escape sequences, carriage returns that overwrite a line, bells) and the bidirectional
/// overrides and isolates that reorder what is shown. Audit fields come from the platform (agent
/// ids, proxy ids, service names in its tickets) and from any caller (request ids, addresses).
fn is_unsafe_for_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every character unsafe for a terminal written as `\u{..}` (and `\` as `\\`, so
/// that an escape in the output always means one was made). Whitespace is escaped too: the fields
/// of a line are separated by spaces, so an agent id cannot pose as another field.
pub fn escape_for_terminal(text: &str) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| c.is_whitespace() || is_unsafe_for_terminal(c);
    if !text.chars().any(|c| c == '\\' || escaped(c)) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if escaped(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// One `keyholder audit list` line: every field escaped for the terminal.
pub fn audit_line(entry: &AuditEntry) -> String {
    let e = &entry.event;
    let f = |text: &str| escape_for_terminal(text).into_owned();
    format!(
        "#{} {} {} service={} purpose={} agent={} proxy={} from={} upstream={} result={} request={}",
        entry.seq,
        keyholder_protocol::document::format_iso8601(e.at_ms.div_euclid(1000)),
        f(&e.endpoint),
        f(&e.service),
        f(&e.purpose),
        f(&e.agent_id),
        f(&e.proxy_id),
        f(&e.source),
        f(&e.upstream),
        f(&e.result),
        f(&e.request_id)
    )
}

/// One `keyholder audit list --json` line. JSON escapes C0 controls itself; DEL, C1 controls and
/// bidirectional controls are written as `\uXXXX` too (still the same JSON strings).
pub fn audit_json_line(entry: &AuditEntry) -> anyhow::Result<String> {
    let json = serde_json::to_string(entry)?;
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if is_unsafe_for_terminal(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// `keyholder audit export --format jsonl`: writes every entry; returns how many.
pub fn audit_export(args: &AuditExportArgs, out: &mut dyn std::io::Write) -> anyhow::Result<usize> {
    let entries = block(async {
        let owner = Owner::open(&args.data).await?;
        Ok(owner
            .storage()
            .audit_entries(AuditFilter::default())
            .await?)
    })?;
    for entry in &entries {
        serde_json::to_writer(&mut *out, entry)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(entries.len())
}

/// `keyholder audit prune`: verify, export (optional), record the prune, delete in chunks.
pub fn audit_prune(args: &AuditPruneArgs) -> anyhow::Result<AuditPruneReport> {
    block(async {
        let owner = Owner::open(&args.data).await?;
        let storage = owner.storage();
        let before_ms = audit::now_ms() - i64::from(args.older_than_days) * 86_400_000;
        let Some(boundary) = storage.prune_boundary(before_ms).await? else {
            return Ok(AuditPruneReport {
                removed: 0,
                through_seq: 0,
                exported: 0,
            });
        };
        let (key, _) = identity_verifying_key(&owner).await?;
        if let Some(problem) = storage.verify_audit(key).await?.problem {
            if !args.force {
                anyhow::bail!(
                    "the audit chain does not verify at #{} ({}): nothing pruned. Export it \
                     (`keyholder audit export`) and prune with --force if you must.",
                    problem.seq,
                    problem.reason
                );
            }
        }
        let mut exported = 0;
        if let Some(path) = &args.export {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let file = options
                .open(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            let through = AuditFilter {
                through_seq: Some(boundary.through_seq),
                ..AuditFilter::default()
            };
            for entry in storage.audit_entries(through).await? {
                serde_json::to_writer(&mut out, &entry)?;
                std::io::Write::write_all(&mut out, b"\n")?;
                exported += 1;
            }
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()
                .with_context(|| format!("cannot fsync {}", path.display()))?;
        }
        let signer: crate::storage::SharedSigner = std::sync::Arc::new(owner.ring().await?);
        storage
            .append_audit(vec![audit::prune_event(boundary, "cli")], signer)
            .await?;
        let mut removed = 0;
        loop {
            let deleted = storage.delete_pruned(boundary).await?;
            if deleted == 0 {
                break;
            }
            removed += deleted;
        }
        Ok(AuditPruneReport {
            removed,
            through_seq: boundary.through_seq,
            exported,
        })
    })
}

/// `keyholder audit verify`: the verification and the identity key id it used.
pub fn audit_verify(args: &OwnerArgs) -> anyhow::Result<(AuditVerification, String)> {
    block(async {
        let owner = Owner::open(&args.data).await?;
        let (key, key_id) = identity_verifying_key(&owner).await?;
        Ok((owner.storage().verify_audit(key).await?, key_id))
    })
}

fn read_json(path: &Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    Ok(zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    ))
}

/// `keyholder import-reference --store FILE --kv FILE`. The two files are told apart by content,
/// so swapping them by mistake is harmless.
pub fn import_reference(args: &ImportReferenceArgs) -> anyhow::Result<ImportReport> {
    let first = read_json(&args.store)?;
    let second = read_json(&args.kv)?;
    let probe = |text: &str, path: &Path| -> anyhow::Result<bool> {
        let value: Value = serde_json::from_str(text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(import::looks_like_key_file(&value))
    };
    let (key_text, collections_text) =
        match (probe(&first, &args.store)?, probe(&second, &args.kv)?) {
            (true, false) => (first, second),
            (false, true) => (second, first),
            _ => anyhow::bail!(
            "expected one key file (with encryption_key and hmac_secret) and one collections file"
        ),
        };
    let keys = import::parse_reference_keys(&key_text)?;
    let collections: Value = serde_json::from_str(&collections_text)?;
    let force = args.force;
    block(async {
        let owner = Owner::open(&args.data).await?;
        let (change, report) =
            import::import_reference(owner.storage(), &owner.master, &keys, &collections, force)
                .await?;
        let detail = format!(
            "webhook {}: {} credential(s) re-encrypted",
            report.webhook_id, report.tokens_reencrypted
        );
        owner.commit("import-reference", &detail, change).await?;
        Ok(report)
    })
}
