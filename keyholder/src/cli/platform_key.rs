//! `keyholder platform-key`: the platform's Ed25519 keys of an asymmetric binding.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::session::{block, Owner};
use crate::config::DataArgs;
use crate::storage::Applied;
use crate::vault::platform_keys::{self, PlatformKeyInfo};
use keyholder_protocol::PlatformPublicKey;

/// Reads a platform public key file (32 raw bytes, standard base64, or an identity document).
pub fn read_platform_key(path: &std::path::Path) -> anyhow::Result<PlatformPublicKey> {
    let raw = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("--platform-key {}: {e}", path.display()))?;
    PlatformPublicKey::parse(&raw)
        .map_err(|e| anyhow::anyhow!("--platform-key {}: {e}", path.display()))
}

/// `keyholder platform-key`: the platform's Ed25519 keys of an asymmetric binding (at most two, so
/// that the platform can rotate: add the new key, switch, remove the old one).
#[derive(Debug, Clone, Args)]
pub struct PlatformKeyArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: PlatformKeyAction,
}

/// `keyholder platform-key` subcommands (each takes effect at once, also on a running server).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum PlatformKeyAction {
    /// Add a second active platform key (public key file: 32 raw bytes, base64, or identity document).
    Add {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The public key file.
        file: PathBuf,
    },
    /// Remove an active platform key by key id; its signatures are refused from then on.
    Remove {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The key id (16 hex).
        key_id: String,
    },
    /// List the active platform keys.
    List {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a platform-key subcommand; returns the keys active afterwards.
pub fn platform_key(args: &PlatformKeyArgs) -> anyhow::Result<Vec<PlatformKeyInfo>> {
    let data = match &args.action {
        PlatformKeyAction::Add { data, .. }
        | PlatformKeyAction::Remove { data, .. }
        | PlatformKeyAction::List { data, .. } => data,
    };
    let key = match &args.action {
        PlatformKeyAction::Add { file, .. } => Some(read_platform_key(file)?),
        _ => None,
    };
    block(async {
        let owner = Owner::open_or_create(data).await?;
        let storage = owner.storage();
        let change = match (&args.action, &key) {
            (PlatformKeyAction::Add { .. }, Some(key)) => Some(platform_keys::add_key(
                &storage.key_ring_snapshot().await?,
                key,
                crate::clock::now_unix(),
            )?),
            (PlatformKeyAction::Remove { key_id, .. }, _) => Some(platform_keys::remove_key(
                &storage.key_ring_snapshot().await?,
                key_id.trim(),
            )?),
            _ => None,
        };
        if let Some(change) = change {
            if let Applied::CheckFailed(_) = storage.apply(change).await? {
                anyhow::bail!("the platform keys changed meanwhile; run the command again");
            }
        }
        Ok(platform_keys::list_keys(storage).await?)
    })
}

/// Runs `keyholder platform-key` and prints what it did and the keys active afterwards.
pub fn execute(args: &PlatformKeyArgs) -> anyhow::Result<ExitCode> {
    let keys = platform_key(args)?;
    match &args.action {
        PlatformKeyAction::List { json: true, .. } => {
            println!("{}", serde_json::to_string_pretty(&keys)?)
        }
        PlatformKeyAction::Add { .. } => println!("Platform key added."),
        PlatformKeyAction::Remove { key_id, .. } => {
            println!("Platform key {key_id} removed: its signatures are refused from now on.")
        }
        PlatformKeyAction::List { .. } => {}
    }
    if !matches!(&args.action, PlatformKeyAction::List { json: true, .. }) {
        println!("Active platform keys:");
        for key in &keys {
            println!(
                "  {}  {}  added {}",
                key.key_id,
                key.public_key,
                keyholder_protocol::document::format_iso8601(key.added_at)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
