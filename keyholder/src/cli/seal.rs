//! `keyholder seal` and `keyholder unseal`: the kill switch (every credential use refused with
//! `503 sealed` until lifted), without going offline.

use std::process::ExitCode;

use super::data_folder::OwnerArgs;
use super::session::{block, Owner};
use crate::vault::reload;

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

/// Runs `keyholder seal` (`sealed = true`) or `keyholder unseal` and says what it means.
pub fn execute(args: &OwnerArgs, sealed: bool) -> anyhow::Result<ExitCode> {
    set_sealed(args, sealed)?;
    if sealed {
        println!("Sealed: credential use is refused (503 sealed) until `keyholder unseal`.");
    } else {
        println!("Unsealed: credential use resumes.");
    }
    Ok(ExitCode::SUCCESS)
}
