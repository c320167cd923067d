//! `keyholder status`: binding, keys, credential count, seal, last credential use and policies.

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde::Serialize;

use super::data_folder::OwnerArgs;
use super::session::{block, Owner};
use crate::vault::keyring::{self, KIND_LEGACY};
use crate::vault::{platform_keys, reload, rotation};

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

/// Runs `keyholder status` and prints the report (or one JSON object).
pub fn execute(args: &OwnerArgs) -> anyhow::Result<ExitCode> {
    let status = status(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!("Bound:              {}", status.bound);
        println!("Platform scheme:    {}", status.platform_scheme);
        if !status.platform_keys.is_empty() {
            println!("Platform keys:      {}", status.platform_keys.join(", "));
        }
        println!("Webhook id:         {}", status.webhook_id);
        println!("Identity key:       {}", status.identity_key_id);
        println!(
            "Data keys:          {:?} (current v{})",
            status.data_key_versions, status.current_data_key
        );
        for (version, count) in &status.documents_per_key {
            println!("  v{version}: {count} document(s)");
        }
        println!(
            "Reference key held: {}{}",
            status.reference_key,
            if status.reference_key {
                format!(
                    " ({} credential(s) still need it)",
                    status.reference_key_documents
                )
            } else {
                String::new()
            }
        );
        println!("Credentials:        {}", status.credential_count);
        println!("Sealed:             {}", status.sealed);
        println!(
            "Last credential use: {}",
            status.last_credential_use.as_deref().unwrap_or("never")
        );
        println!("Audit entries:      {}", status.audit_entries);
        if status.policies.is_empty() {
            println!("Policies:           (none)");
        } else {
            println!("Policies:");
            for view in &status.policies {
                for line in view.lines() {
                    println!("  {line}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
