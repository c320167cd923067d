//! Opening the data folder for an owner command: its database (migrated) and its key ring
//! unlocked with the configured master key, and the owner-change transaction every command that
//! changes something goes through (with its owner entry in the audit trail).

use std::path::Path;

use clap::Args;
use rusqlite::{Connection, TransactionBehavior};

use crate::audit::{self, AuditEvent};
use crate::config::DataArgs;
use crate::store;
use crate::vault::keyring;
use crate::vault::master::{load_master_key, MasterKey};

/// Flags of commands that only need the data folder and its master key.
#[derive(Debug, Clone, Args)]
pub struct OwnerArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
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

/// Opens an existing data folder (never creates one) and unlocks it with the configured master key.
pub fn open_existing(data: &DataArgs) -> anyhow::Result<(Connection, MasterKey)> {
    let mut conn = open_database(&data.data_dir)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (master, _) = load_master_key(&data.data_dir, &data.master_key_source(), &tx)?;
    master.check_or_record(&tx)?;
    tx.commit()?;
    Ok((conn, master))
}

/// Opens an existing data folder's database (migrated), without its keys.
pub fn open_database(data_dir: &Path) -> anyhow::Result<Connection> {
    let path = data_dir.join(store::DATABASE_FILE);
    if !path.is_file() {
        anyhow::bail!(
            "no keyholder data in {} (expected {}); pass --data-dir or set KEYHOLDER_DATA_DIR",
            data_dir.display(),
            path.display()
        );
    }
    let mut conn = store::open_connection(&path, false)?;
    store::migrate(&mut conn)?;
    Ok(conn)
}

/// Runs `f` in one immediate transaction and appends an owner entry to the audit trail with it.
pub(crate) fn owner_change<T>(
    conn: &mut Connection,
    master: &MasterKey,
    command: &str,
    f: impl FnOnce(&Connection) -> anyhow::Result<(T, String)>,
) -> anyhow::Result<T> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (value, detail) = f(&tx)?;
    let (ring, _, _) = keyring::load(&tx, master)?;
    audit::append_events(&tx, ring.identity(), [AuditEvent::owner(command, &detail)])?;
    tx.commit()?;
    Ok(value)
}
