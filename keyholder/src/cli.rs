//! The owner's commands that work on the data folder directly, also while a server runs on it
//! (SQLite WAL; every change is a committed transaction the server reads on its next request).

pub mod owner;

use clap::Args;
use rusqlite::Connection;

use crate::config::{validate_url, DataArgs};
use crate::store::{self, get_setting};
use crate::vault::binding::{issue_bind_code, IssuedCode};
use crate::vault::master::{load_master_key, MasterKey};
use crate::vault::{keyring, VaultError};

/// Flags of `keyholder bind`.
#[derive(Debug, Clone, Args)]
pub struct BindArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Public URL the platform reaches this keyholder at (remembered from `serve --public-url` if omitted).
    #[arg(long, env = "KEYHOLDER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Platform frontend that serves the registration page.
    #[arg(long, env = "KEYHOLDER_FRONTEND_URL", default_value = keyholder_protocol::paths::DEFAULT_FRONTEND)]
    pub frontend_url: String,
    /// Issue a code whose exchange replaces the HMAC secret (the old one stops working then).
    #[arg(long)]
    pub rebind: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Opens the data folder's database for an owner command (creating and migrating it if needed),
/// and unlocks the key ring with the configured master key (creating keys on a new folder).
pub fn open_data(data: &DataArgs) -> anyhow::Result<(Connection, MasterKey)> {
    std::fs::create_dir_all(&data.data_dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&data.data_dir, std::fs::Permissions::from_mode(0o700));
    }
    let path = data.data_dir.join(store::DATABASE_FILE);
    store::create_private_file(&path)?;
    let mut conn = store::open_connection(&path, false)?;
    store::migrate(&mut conn)?;
    store::restrict_file_mode(&path);
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let (master, _) = load_master_key(&data.data_dir, &data.master_key_source(), &tx)?;
    keyring::init_or_load(&tx, &master)?;
    tx.commit()?;
    Ok((conn, master))
}

/// Issues a bind code (see [`issue_bind_code`]).
pub fn bind(args: &BindArgs) -> anyhow::Result<IssuedCode> {
    let frontend = validate_url("--frontend-url", &args.frontend_url)?;
    let (mut conn, master) = open_data(&args.data)?;
    let public_url = match &args.public_url {
        Some(url) => validate_url("--public-url / KEYHOLDER_PUBLIC_URL", url)?,
        None => get_setting(&conn, "public_url")?.ok_or_else(|| {
            anyhow::anyhow!(
                "no public URL known: pass --public-url https://<host> (the address the platform reaches this keyholder at)"
            )
        })?,
    };
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let issued = match issue_bind_code(&tx, &master, args.rebind, &public_url, &frontend, crate::clock::now_unix()) {
        Ok(issued) => issued,
        Err(VaultError::AlreadyBound) => anyhow::bail!(
            "this keyholder is already bound; `keyholder bind --rebind` issues a code that replaces the HMAC secret"
        ),
        Err(other) => return Err(other.into()),
    };
    tx.commit()?;
    Ok(issued)
}
