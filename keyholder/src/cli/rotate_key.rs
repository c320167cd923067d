//! `keyholder rotate-key`: a new data-key version, current for new writes.

use std::process::ExitCode;

use super::data_folder::OwnerArgs;
use super::session::{block, Owner};
use crate::vault::rotation;

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

/// Runs `keyholder rotate-key` and says what to do next.
pub fn execute(args: &OwnerArgs) -> anyhow::Result<ExitCode> {
    let version = rotate_key(args)?;
    println!("Data key v{version} is now current for new writes.");
    println!("Run `keyholder rewrap` to re-encrypt stored credentials under it.");
    Ok(ExitCode::SUCCESS)
}
