//! `keyholder backup`: a consistent online snapshot of the database (wrapped keys only).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::session::{block, open_storage};
use crate::config::DataArgs;
use crate::storage::Setting;
use crate::store::backup;

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

/// Runs `keyholder backup` and says where the snapshot went.
pub fn execute(args: &BackupArgs) -> anyhow::Result<ExitCode> {
    backup(args)?;
    println!(
        "Backup written to {} (wrapped keys only: keep the master key apart).",
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
