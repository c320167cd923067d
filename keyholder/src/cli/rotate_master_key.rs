//! `keyholder rotate-master-key`: the key ring re-wrapped under a new master key (key file,
//! passphrase or PKCS#11 token key).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::session::{block, Owner};
use crate::config::DataArgs;
use crate::storage::{Setting, Write};
use crate::vault::master::{self};
use crate::vault::{pkcs11, rotation};

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

/// Runs `keyholder rotate-master-key` and says how a running server follows.
pub fn execute(args: &RotateMasterKeyArgs) -> anyhow::Result<ExitCode> {
    let moved = rotate_master_key(args)?;
    println!("Re-wrapped {moved} key(s) under the new master key; the old one no longer opens this folder.");
    println!(
        "A running server keeps serving with the keys it holds, and switches to the new master key"
    );
    println!("as soon as it finds it where it was told to look (replace that file), or at its next start");
    println!("with --master-key-file / --passphrase-file pointing at the new one.");
    Ok(ExitCode::SUCCESS)
}
