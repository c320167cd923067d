//! Online backup and restore of the database with SQLite's backup API: the snapshot is one
//! consistent read of a running server's database (every write committed before the backup began is
//! in it) and holds only wrapped keys; the master key is never part of it.

use std::path::Path;
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::{create_private_file, get_setting, open_connection, restrict_file_mode, StoreError};

fn refuse_existing(path: &Path) -> Result<(), StoreError> {
    if path.exists() {
        return Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} already exists; refusing to overwrite it",
                path.display()
            ),
        )));
    }
    Ok(())
}

/// Copies the live database at `db` into the new file `out` (owner-only; refuses an existing file).
/// All pages are copied in one step, inside one read transaction: a consistent snapshot, without
/// blocking the server's writer (WAL).
pub fn backup_database(db: &Path, out: &Path) -> Result<(), StoreError> {
    refuse_existing(out)?;
    let source = open_connection(db, true)?;
    create_private_file(out)?;
    let result = (|| {
        let mut dest = Connection::open(out)?;
        copy_all(&source, &mut dest)?;
        // A single self-contained file, whatever the source's journal mode.
        dest.pragma_update(None, "journal_mode", "DELETE")?;
        check_database(&dest)?;
        Ok::<_, StoreError>(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(out);
    }
    restrict_file_mode(out);
    result
}

/// Copies every page in one backup step (one read transaction on the source: a consistent
/// snapshot); retries while the source is briefly locked.
fn copy_all(source: &Connection, dest: &mut Connection) -> Result<(), StoreError> {
    let backup = Backup::new(source, dest)?;
    for _ in 0..500 {
        match backup.step(-1)? {
            StepResult::Done => return Ok(()),
            StepResult::More | StepResult::Busy | StepResult::Locked => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    Err(StoreError::Unavailable(
        "the database stayed busy; backup not taken".into(),
    ))
}

/// Checks that `conn` is an intact keyholder database.
pub fn check_database(conn: &Connection) -> Result<(), StoreError> {
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(StoreError::Corrupt(format!("integrity check: {check}")));
    }
    if get_setting(conn, "webhook_id")?.is_none() {
        return Err(StoreError::Corrupt(
            "not a keyholder database (no webhook id)".into(),
        ));
    }
    Ok(())
}

/// Restores the backup `from` as the database of `data_dir`, which must be empty or absent.
pub fn restore_database(from: &Path, data_dir: &Path) -> Result<(), StoreError> {
    if data_dir.exists() {
        let mut entries = std::fs::read_dir(data_dir)?;
        if entries.next().is_some() {
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} is not empty; restore only into an empty folder",
                    data_dir.display()
                ),
            )));
        }
    }
    let source = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    check_database(&source)?;
    std::fs::create_dir_all(data_dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700));
    }
    let path = data_dir.join(super::DATABASE_FILE);
    create_private_file(&path)?;
    let mut dest = Connection::open(&path)?;
    copy_all(&source, &mut dest)?;
    drop(dest);
    let mut conn = open_connection(&path, false)?;
    super::migrate(&mut conn)?;
    check_database(&conn)?;
    restrict_file_mode(&path);
    Ok(())
}
