//! `keyholder restore`: a backup restored into an empty data folder.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::data_folder::open_database;
use crate::config::DataArgs;
use crate::store::{backup, get_setting};
use crate::vault::keyring;
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
    let conn = open_database(&args.data.data_dir)?;
    let webhook_id = get_setting(&conn, "webhook_id")?.unwrap_or_default();
    let master_key_checked =
        if args.data.master_key_file.is_some() || args.data.passphrase_file.is_some() {
            let source = args.data.master_key_source();
            let ok = load_master_key(&args.data.data_dir, &source, &conn)
                .ok()
                .is_some_and(|(m, _)| keyring::load(&conn, &m).is_ok());
            Some(ok)
        } else {
            None
        };
    Ok(RestoreReport {
        webhook_id,
        master_key_checked,
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
