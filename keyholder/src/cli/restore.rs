//! `keyholder restore`: a backup restored into an empty data folder.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::session::{block, open_storage};
use crate::config::DataArgs;
use crate::storage::Setting;
use crate::store::backup;
use crate::vault::keyring::{self};
use crate::vault::master::load_master_key;

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

/// Runs `keyholder restore` and says whether the given master key opens what it restored.
pub fn execute(args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let report = restore(args)?;
    println!(
        "Restored webhook {} into {}.",
        report.webhook_id,
        args.data.data_dir.display()
    );
    match report.master_key_checked {
        Some(true) => println!("The given master key opens the restored keys."),
        Some(false) => {
            println!("WARNING: the given master key does NOT open the restored keys.");
            return Ok(ExitCode::from(1));
        }
        None => {
            println!("Start it with the master key (file or passphrase) that wrapped the backup.")
        }
    }
    Ok(ExitCode::SUCCESS)
}
