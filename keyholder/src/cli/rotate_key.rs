//! `keyholder rotate-key`: a new data-key version, current for new writes.

use std::process::ExitCode;

use super::data_folder::{open_existing, owner_change, OwnerArgs};
use crate::vault::rotation;

/// `keyholder rotate-key`: returns the new current version.
pub fn rotate_key(args: &OwnerArgs) -> anyhow::Result<u32> {
    let (mut conn, master) = open_existing(&args.data)?;
    owner_change(&mut conn, &master, "rotate-key", |tx| {
        let version = rotation::rotate_data_key(tx, &master)?;
        Ok((version, format!("data key v{version}")))
    })
}

/// Runs `keyholder rotate-key` and says what to do next.
pub fn execute(args: &OwnerArgs) -> anyhow::Result<ExitCode> {
    let version = rotate_key(args)?;
    println!("Data key v{version} is now current for new writes.");
    println!("Run `keyholder rewrap` to re-encrypt stored credentials under it.");
    Ok(ExitCode::SUCCESS)
}
