//! The owner's handle on a data folder for one command: its storage (the same repositories the
//! server uses, never SQL) and the unlocked master key. The CLI is synchronous; [`block`] drives
//! the async repositories on a thread of its own, so a command also works when called from inside
//! a runtime (the test harness does).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use crate::audit::AuditEvent;
use crate::config::DataArgs;
use crate::storage::sqlite::{SqliteStorage, DATABASE_FILE};
use crate::storage::{Applied, ChangeSet, SharedSigner, SharedStorage, Storage};
use crate::vault::keyring::{self, KeyRing};
use crate::vault::master::{self, MasterKey};

/// Runs an owner command's future to completion on a fresh single-threaded runtime on its own
/// thread.
pub fn block<T: Send>(fut: impl Future<Output = anyhow::Result<T>> + Send) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| anyhow::anyhow!("cannot start the owner command's runtime: {e}"));
            runtime.and_then(|rt| rt.block_on(fut))
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// An opened data folder.
pub struct Owner {
    storage: SharedStorage,
    /// The master key that opens it.
    pub master: MasterKey,
}

/// Opens a data folder's storage (migrated); `create` makes the folder and database if missing.
pub fn open_storage(data_dir: &Path, create: bool) -> anyhow::Result<SharedStorage> {
    let path = data_dir.join(DATABASE_FILE);
    if create {
        std::fs::create_dir_all(data_dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700));
        }
    } else if !path.is_file() {
        anyhow::bail!(
            "no keyholder data in {} (expected {}); pass --data-dir or set KEYHOLDER_DATA_DIR",
            data_dir.display(),
            path.display()
        );
    }
    Ok(Arc::new(SqliteStorage::open(data_dir)?))
}

/// The storage the data arguments name: the shared PostgreSQL database of `--database-url`, or
/// the data folder's SQLite (`create`: made if missing).
pub async fn open_data_storage(data: &DataArgs, create: bool) -> anyhow::Result<SharedStorage> {
    match data.database("cli")? {
        Some(db) => Ok(Arc::new(
            crate::storage::postgres::PostgresStorage::open(db.target.clone(), &db.node_id).await?,
        )),
        None => open_storage(&data.data_dir, create),
    }
}

impl Owner {
    /// Opens an existing data folder (never creates one) and unlocks it with the configured master
    /// key.
    pub async fn open(data: &DataArgs) -> anyhow::Result<Owner> {
        let storage = open_data_storage(data, false).await?;
        let (master, _) =
            master::open_master_key(storage.as_ref(), &data.data_dir, &data.master_key_source())
                .await?;
        let snapshot = storage.key_ring_snapshot().await?;
        if let (_, Some(record)) =
            master.check_or_record(snapshot.setting(crate::storage::Setting::MasterCheck))?
        {
            storage.apply(record).await?;
        }
        Ok(Owner { storage, master })
    }

    /// Opens the data folder for an owner command, creating and migrating it if needed, and
    /// unlocks the key ring (creating keys on a new folder).
    pub async fn open_or_create(data: &DataArgs) -> anyhow::Result<Owner> {
        let storage = open_data_storage(data, true).await?;
        let (master, _) =
            master::open_master_key(storage.as_ref(), &data.data_dir, &data.master_key_source())
                .await?;
        keyring::init_or_load(storage.as_ref(), &master).await?;
        Ok(Owner { storage, master })
    }

    /// The storage.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// The key ring as stored now.
    pub async fn ring(&self) -> anyhow::Result<KeyRing> {
        Ok(keyring::load_current(self.storage(), &self.master).await?.0)
    }

    /// Applies an owner change with an owner entry in the audit trail (one transaction). Returns
    /// whether each write changed anything, or the index of the check that no longer held.
    pub async fn change(
        &self,
        command: &str,
        detail: &str,
        change: ChangeSet,
    ) -> anyhow::Result<Result<Vec<bool>, usize>> {
        let signer: SharedSigner = Arc::new(self.ring().await?);
        let change = change.audited(AuditEvent::owner(command, detail), signer);
        Ok(match self.storage.apply(change).await? {
            Applied::Done { changed } => Ok(changed),
            Applied::CheckFailed(i) => Err(i),
        })
    }

    /// Like [`Owner::change`], refusing when a check no longer holds (the data folder changed
    /// meanwhile).
    pub async fn commit(
        &self,
        command: &str,
        detail: &str,
        change: ChangeSet,
    ) -> anyhow::Result<Vec<bool>> {
        self.change(command, detail, change).await?.map_err(|_| {
            anyhow::anyhow!("the data folder changed while `{command}` ran; run it again")
        })
    }
}
