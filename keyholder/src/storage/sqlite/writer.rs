//! The SQLite connection machinery: one writer thread that group-commits jobs (every acknowledged
//! write is fsync'ed) and a pool of read connections. The engine's repositories (see `super`) run
//! their statements through [`Db::write`] and [`Db::read`]; nothing outside `storage::sqlite`
//! sees a connection.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use tokio::sync::oneshot;

use crate::storage::{MarkReply, MarkVerdict, StorageError};
use crate::store::migrate;

/// Name of the database file inside the data folder.
pub const DATABASE_FILE: &str = "keyholder.db";

/// Most jobs folded into one transaction; bounds the latency of the first job in a batch.
const MAX_BATCH: usize = 512;
/// Read connections kept open for request handlers.
const READERS: usize = 4;

/// Errors inside the engine: SQLite's, or the interface's own.
pub type StoreError = StorageError;

impl From<rusqlite::Error> for StorageError {
    fn from(err: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        match err.sqlite_error_code() {
            // The database cannot take the write now: the caller may retry.
            Some(
                ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::ReadOnly
                | ErrorCode::CannotOpen
                | ErrorCode::OutOfMemory,
            ) => StorageError::Unavailable(err.to_string()),
            _ => StorageError::Engine(err.to_string()),
        }
    }
}

type AnyResult = Result<Box<dyn Any + Send>, StoreError>;
type JobFn = Box<dyn FnOnce(&Connection) -> AnyResult + Send>;

struct WriteJob {
    work: Work,
}

/// Where a job's outcome goes.
enum Reply {
    Job(oneshot::Sender<AnyResult>),
    Marks(MarkReply),
    Unit(crate::storage::UsageReply),
}

impl Reply {
    fn send(self, result: AnyResult) {
        match self {
            Reply::Job(tx) => {
                let _ = tx.send(result);
            }
            Reply::Marks(tx) => {
                let _ = tx.send(result.map(|_| MarkVerdict::Fresh));
            }
            Reply::Unit(tx) => {
                let _ = tx.send(result.map(|_| ()));
            }
        }
    }
}

impl WriteJob {
    /// Splits the job into its work and where its outcome goes.
    fn into_parts(self) -> (Option<JobFn>, Option<Vec<PackedRecord>>, Reply) {
        match self.work {
            Work::Run(run, tx) => (Some(run), None, Reply::Job(tx)),
            Work::Records(records, tx) => (None, Some(records), Reply::Marks(tx)),
            Work::RunUnit(run, tx) => (Some(run), None, Reply::Unit(tx)),
        }
    }
}

enum Work {
    /// A closure run inside its own savepoint, so that a failure rolls back only this job.
    Run(JobFn, oneshot::Sender<AnyResult>),
    /// Records appended with the batch's others (see [`Db::submit_records`]), answered on their
    /// own typed channel.
    Records(Vec<PackedRecord>, MarkReply),
    /// A closure like `Run`, answered on a typed channel (see [`Db::submit_unit`]).
    RunUnit(JobFn, crate::storage::UsageReply),
}

/// A small fixed-size record for [`Db::submit_record`]. The writer folds the records of one
/// group commit that share a table and tag into rows of `(tag, until, records)`, `records` being
/// their bytes end to end: one INSERT per row instead of one per record, and tables under half the
/// pages of one row per record (measured: 2,379 against 5,661 pages for a million records packed
/// ten a row), so that dropping a whole table (the way such records expire) frees fewer pages while
/// every other write waits.
#[derive(Debug, Clone, Copy)]
pub struct PackedRecord {
    /// The table: `<prefix><number>`, created on first use (see [`PACKED_TABLE_COLUMNS`]).
    pub table: (&'static str, i64),
    /// Kept per row (replay marks: their kind).
    pub tag: i64,
    /// Kept per row as the largest of its records' (replay marks: the expiry).
    pub until: i64,
    /// The record.
    pub bytes: [u8; 8],
}

/// Columns of a table of packed records.
pub const PACKED_TABLE_COLUMNS: &str =
    "(tag INTEGER NOT NULL, until INTEGER NOT NULL, records BLOB NOT NULL)";
/// Most records in one row: 800 bytes, so that four rows fill a 4 KiB page (larger ones would
/// leave pages half empty or spill into overflow pages).
const RECORDS_PER_ROW: usize = 100;

/// Told about every group commit by the writer thread (metrics). Called on the writer thread:
/// implementations must be quick and must not block.
pub trait CommitObserver: Send + Sync {
    /// One transaction of `jobs` write jobs committed (or failed) after `elapsed`.
    fn observe_commit(&self, elapsed: Duration, jobs: usize);
}

/// Statistics of the group commit, for metrics and the benchmark.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitStats {
    /// Transactions committed.
    pub commits: u64,
    /// Jobs acknowledged.
    pub jobs: u64,
}

/// A write handed to the writer, resolving to its result once committed and fsync'ed.
pub struct PendingWrite<T> {
    rx: oneshot::Receiver<AnyResult>,
    _result: std::marker::PhantomData<fn() -> T>,
}

impl<T: 'static> std::future::Future for PendingWrite<T> {
    type Output = Result<T, StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx).poll(cx).map(|received| {
            received
                .map_err(|_| StoreError::Unavailable("storage writer is not running".into()))?
                .and_then(|any| {
                    any.downcast::<T>()
                        .map(|b| *b)
                        .map_err(|_| StoreError::Corrupt("write job result type".into()))
                })
        })
    }
}

/// Handle to the database: cheap to clone, shared by all workers.
#[derive(Clone)]
pub struct Db {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    path: PathBuf,
    writer: Mutex<Option<mpsc::Sender<WriteJob>>>,
    readers: Mutex<Vec<Connection>>,
    /// One permit per pooled read connection: a read waits for a connection instead of opening one.
    read_permits: tokio::sync::Semaphore,
    stats: Arc<Mutex<CommitStats>>,
}

/// Opens a connection with the settings every connection must have.
pub fn open_connection(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)?;
    // Other processes (the owner's CLI) write to the same file; wait for them briefly.
    conn.busy_timeout(Duration::from_secs(5))?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: the WAL is fsync'ed at every commit, so an acknowledged write survives power loss.
        conn.pragma_update(None, "synchronous", "FULL")?;
    }
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Statement journals (one per savepoint) stay in memory instead of temp files in /var/tmp
    // created and unlinked by every batch.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

impl Db {
    /// Opens (creating and migrating if needed) the database in `data_dir` and starts the writer.
    pub fn open(data_dir: &Path) -> Result<Db, StoreError> {
        Self::open_observed(data_dir, None)
    }

    /// Like [`Store::open`], reporting every group commit to `observer`.
    pub fn open_observed(
        data_dir: &Path,
        observer: Option<Arc<dyn CommitObserver>>,
    ) -> Result<Db, StoreError> {
        let path = data_dir.join(DATABASE_FILE);
        create_private_file(&path)?;
        let mut conn = open_connection(&path, false)?;
        migrate(&mut conn)?;
        restrict_file_mode(&path);
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            readers.push(open_connection(&path, true)?);
        }
        // The writer checkpoints itself, between batches and after answering (see `writer_loop`).
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let (tx, rx) = mpsc::channel::<WriteJob>();
        let stats = Arc::new(Mutex::new(CommitStats::default()));
        let writer_stats = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("keyholder-writer".into())
            .spawn(move || writer_loop(conn, rx, writer_stats, observer))?;
        Ok(Db {
            inner: Arc::new(StoreInner {
                path,
                writer: Mutex::new(Some(tx)),
                readers: Mutex::new(readers),
                read_permits: tokio::sync::Semaphore::new(READERS),
                stats,
            }),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Group-commit counters so far.
    pub fn commit_stats(&self) -> CommitStats {
        self.inner.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Runs `f` inside a write transaction shared with other concurrent writes; resolves only
    /// after the transaction is committed and fsync'ed. A failing job is rolled back alone.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        crate::telemetry::timed(crate::telemetry::SPAN_COMMIT, self.submit(f)?).await
    }

    /// Hands `f` to the writer now and returns a future that resolves once it is committed and
    /// fsync'ed, so the caller can do other work while the commit happens.
    pub fn submit<T, F>(&self, f: F) -> Result<PendingWrite<T>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.enqueue(f)
    }

    /// Appends `record` in the next group commit; resolves once it is committed and fsync'ed.
    /// For the hottest writes (replay marks): no closure, no savepoint, no statement of its own.
    pub fn submit_record(&self, record: PackedRecord) -> crate::storage::MarkCommit {
        self.submit_records(vec![record])
    }

    /// Appends `records` in the next group commit, all or none (one job, so never split across
    /// two commits); resolves once they are committed and fsync'ed.
    pub fn submit_records(&self, records: Vec<PackedRecord>) -> crate::storage::MarkCommit {
        let (reply, commit) = crate::storage::MarkCommit::channel();
        if let Err((err, Work::Records(_, reply))) = self.send_work(Work::Records(records, reply)) {
            let _ = reply.send(Err(err));
        }
        commit
    }

    fn enqueue<T, F>(&self, f: F) -> Result<PendingWrite<T>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let run: JobFn = Box::new(move |conn| f(conn).map(|v| Box::new(v) as Box<dyn Any + Send>));
        self.send_work(Work::Run(run, reply))
            .map_err(|(err, _)| err)?;
        Ok(PendingWrite {
            rx,
            _result: std::marker::PhantomData,
        })
    }

    /// Hands `f` to the writer now; the commit resolves once it is committed and fsync'ed, on a
    /// typed channel (no boxed result to downcast).
    pub fn submit_unit<F>(&self, f: F) -> crate::storage::UsageCommit
    where
        F: FnOnce(&Connection) -> Result<(), StoreError> + Send + 'static,
    {
        let (reply, commit) = crate::storage::UsageCommit::channel();
        let run: JobFn =
            Box::new(move |conn| f(conn).map(|()| Box::new(()) as Box<dyn Any + Send>));
        if let Err((err, Work::RunUnit(_, reply))) = self.send_work(Work::RunUnit(run, reply)) {
            let _ = reply.send(Err(err));
        }
        commit
    }

    /// Hands work to the writer; gives it back with the error when the writer is gone.
    fn send_work(&self, work: Work) -> Result<(), (StoreError, Work)> {
        let gone = || StoreError::Unavailable("storage writer is not running".into());
        let Ok(guard) = self.inner.writer.lock() else {
            return Err((gone(), work));
        };
        let Some(sender) = guard.as_ref() else {
            return Err((gone(), work));
        };
        sender
            .send(WriteJob { work })
            .map_err(|mpsc::SendError(job)| (gone(), job.work))
    }

    /// Runs a read on a pooled read-only connection, off the async workers. At most `READERS`
    /// reads run at once; the others wait for a connection (opening one per request would cost more).
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = self
            .inner
            .read_permits
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("storage writer is not running".into()))?;
        let inner = Arc::clone(&self.inner);
        let result = tokio::task::spawn_blocking(move || {
            let pooled = inner.readers.lock().ok().and_then(|mut pool| pool.pop());
            let conn = match pooled {
                Some(conn) => conn,
                None => open_connection(&inner.path, true)?,
            };
            let result = f(&conn);
            if let Ok(mut pool) = inner.readers.lock() {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|_| StoreError::Unavailable("storage writer is not running".into()))?;
        drop(permit);
        result
    }

    /// Stops accepting writes; the writer thread finishes queued jobs and exits.
    pub fn close(&self) {
        if let Ok(mut guard) = self.inner.writer.lock() {
            guard.take();
        }
    }
}

// Measured and left: fsyncing on a second thread while the writer runs the next batch
// (SQLite at synchronous=NORMAL plus our own fdatasync of the WAL) cost more CPU per request than
// it saved: batches got smaller and every commit rewrites its pages. Handing each worker thread
// its replies as one message (one wake-up system call per batch instead of one per reply) made
// no measurable difference either. Nor did checkpointing on a second thread and connection (with
// the writer copying the last frames so the WAL can start over): the writer's own checkpoint
// takes 3-5 ms four times a second, but removing it changed neither req/s nor p99 of a credential
// GET at 64 connections beyond the run-to-run noise (three runs each). Nor did starting group
// commits at most once a millisecond under paced load (7,750 requests/s: under 1,000 commits/s
// instead of ~2,300): the keyholder's CPU per request stayed within the noise (122-139 us against
// 129-138), and the median latency rose 0.35 ms.
fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<WriteJob>,
    stats: Arc<Mutex<CommitStats>>,
    observer: Option<Arc<dyn CommitObserver>>,
) {
    let mut last_checkpoint = Instant::now();
    let mut unchecked = false;
    loop {
        // Idle with committed pages in the WAL: checkpoint then instead of at the next write.
        let first = if unchecked {
            match rx.recv_timeout(CHECKPOINT_INTERVAL.saturating_sub(last_checkpoint.elapsed())) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    checkpoint(&conn);
                    (last_checkpoint, unchecked) = (Instant::now(), false);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(job) => job,
                Err(_) => break,
            }
        };
        // Natural group commit: everything that arrived while the previous batch was committing
        // goes into this one. (A fixed wait for more jobs was measured slower: workers idle.)
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let outcome = run_batch(&mut conn, batch);
        let jobs = outcome.len() as u64;
        let elapsed = started.elapsed();
        tracing::trace!(
            jobs,
            elapsed_us = elapsed.as_micros() as u64,
            "group commit"
        );
        if elapsed >= SLOW_WRITE {
            // Every write waits meanwhile: usually the disk's sync, worth an operator's look.
            tracing::warn!(
                jobs,
                elapsed_ms = elapsed.as_millis() as u64,
                "slow group commit"
            );
        }
        if let Some(observer) = observer.as_ref() {
            observer.observe_commit(elapsed, outcome.len());
        }
        if let Ok(mut s) = stats.lock() {
            s.commits += 1;
            s.jobs += jobs;
        }
        for (reply, result) in outcome {
            reply.send(result);
        }
        // SQLite's automatic checkpoint would run inside a commit, holding up the answers of that
        // batch (measured: p99 spikes of tens of milliseconds under sustained load). Here it runs
        // after they are sent, bounded in size by running often; and on this thread, so the WAL is
        // fully copied and restarts instead of growing (a checkpoint thread racing the writer
        // never caught up).
        unchecked = true;
        if last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
            checkpoint(&conn);
            (last_checkpoint, unchecked) = (Instant::now(), false);
        }
    }
}

/// How often the writer copies the WAL into the database while writes keep coming.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// A group commit or checkpoint taking this long is logged as a warning.
const SLOW_WRITE: Duration = Duration::from_millis(100);

fn checkpoint(conn: &Connection) {
    let started = Instant::now();
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    }) {
        Ok((frames, copied)) => {
            let elapsed = started.elapsed();
            tracing::trace!(
                frames,
                copied,
                elapsed_us = elapsed.as_micros() as u64,
                "checkpoint"
            );
            if elapsed >= SLOW_WRITE {
                tracing::warn!(
                    frames,
                    copied,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "slow checkpoint"
                );
            }
        }
        Err(err) => tracing::warn!(error = %err, "WAL checkpoint failed"),
    }
}

fn run_batch(conn: &mut Connection, batch: Vec<WriteJob>) -> Vec<(Reply, AnyResult)> {
    let mut results = Vec::with_capacity(batch.len());
    // A transaction left open by an earlier failure would make every later BEGIN fail.
    ensure_no_transaction(conn);
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(err) => {
            tracing::error!(error = %err, "cannot begin write transaction");
            let msg = err.to_string();
            return batch
                .into_iter()
                .map(|job| {
                    (
                        job.into_parts().2,
                        Err(StoreError::Unavailable(msg.clone())),
                    )
                })
                .collect();
        }
    };
    let mut records = Vec::new();
    let mut jobs = batch.into_iter();
    for job in jobs.by_ref() {
        let (run, job_records, reply) = job.into_parts();
        let Some(run) = run else {
            records.push((job_records.unwrap_or_default(), reply));
            continue;
        };
        let result = match tx
            .prepare_cached("SAVEPOINT job")
            .and_then(|mut st| st.execute([]))
        {
            Ok(_) => {
                let r = run(&tx);
                // Cached statements: a batch runs these once per job.
                let end = if r.is_ok() {
                    tx.prepare_cached("RELEASE job")
                        .and_then(|mut st| st.execute([]))
                } else {
                    tx.execute_batch("ROLLBACK TO job; RELEASE job").map(|()| 0)
                };
                match end {
                    Ok(_) => r,
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        };
        results.push((reply, result));
        // SQLite rolls the whole transaction back by itself on some errors (disk full, I/O).
        // The jobs so far are then lost, and a later job would run (and commit) on its own
        // outside the batch while being answered as failed: stop here and fail them all.
        if tx.is_autocommit() {
            let rest = records.into_iter().map(|(_, reply)| reply);
            return fail_batch(results, rest.chain(jobs.map(|job| job.into_parts().2)));
        }
    }
    if !records.is_empty() {
        // All of the batch's records or none (one savepoint for them all).
        let written = tx.execute_batch("SAVEPOINT records").and_then(|()| {
            let rows = write_records(&tx, records.iter().flat_map(|(job, _)| job.iter().copied()));
            match rows {
                Ok(()) => tx.execute_batch("RELEASE records"),
                Err(err) => {
                    tx.execute_batch("ROLLBACK TO records; RELEASE records")?;
                    Err(err)
                }
            }
        });
        if tx.is_autocommit() {
            return fail_batch(results, records.into_iter().map(|(_, reply)| reply));
        }
        let msg = written.as_ref().err().map(|e| e.to_string());
        results.extend(records.into_iter().map(|(_, reply)| {
            let result: AnyResult = match &msg {
                None => Ok(Box::new(())),
                Some(msg) => Err(StoreError::Unavailable(msg.clone())),
            };
            (reply, result)
        }));
    }
    if let Err(err) = tx.commit() {
        tracing::error!(error = %err, "group commit failed");
        // rusqlite rolls back when the failed transaction is dropped, ignoring errors; make sure.
        ensure_no_transaction(conn);
        let msg = err.to_string();
        return results
            .into_iter()
            .map(|(reply, _)| (reply, Err(StoreError::Unavailable(msg.clone()))))
            .collect();
    }
    results
}

/// Writes records as packed rows: grouped by table and tag, at most [`RECORDS_PER_ROW`] a row.
/// The writer does this for each batch's records; conversions at start call it directly.
pub fn write_records(
    conn: &Connection,
    records: impl Iterator<Item = PackedRecord>,
) -> rusqlite::Result<()> {
    let mut groups: std::collections::BTreeMap<((&str, i64), i64), Vec<PackedRecord>> =
        Default::default();
    for record in records {
        groups
            .entry((record.table, record.tag))
            .or_default()
            .push(record);
    }
    for (((prefix, number), tag), records) in groups {
        for row in records.chunks(RECORDS_PER_ROW) {
            let until = row.iter().map(|r| r.until).max().unwrap_or(0);
            let bytes: Vec<u8> = row.iter().flat_map(|r| r.bytes).collect();
            append_packed_row(conn, &format!("{prefix}{number}"), tag, until, &bytes)?;
        }
    }
    Ok(())
}

/// Appends one row of packed records to `table`, creating the table on first use (a failure can
/// leave only an empty table behind, which is harmless).
pub fn append_packed_row(
    conn: &Connection,
    table: &str,
    tag: i64,
    until: i64,
    records: &[u8],
) -> rusqlite::Result<()> {
    let sql = format!("INSERT INTO {table}(tag, until, records) VALUES (?1, ?2, ?3)");
    let insert = || {
        conn.prepare_cached(&sql)?
            .execute(rusqlite::params![tag, until, records])
    };
    // Missing when first used, and also when a rolled-back batch had created it: a cached
    // statement then fails on execution rather than on preparation.
    match insert() {
        Ok(_) => Ok(()),
        Err(err) if err.to_string().contains("no such table") => {
            conn.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {table} {PACKED_TABLE_COLUMNS}"
            ))?;
            insert().map(|_| ())
        }
        Err(err) => Err(err),
    }
}

/// One row of packed records: `(tag, until, records)`.
pub type PackedRow = (i64, i64, Vec<[u8; 8]>);

/// The rows of a table of packed records whose `until` is at least `min_until`.
pub fn read_packed_rows(
    conn: &Connection,
    table: &str,
    min_until: i64,
) -> Result<Vec<PackedRow>, StoreError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT tag, until, records FROM {table} WHERE until >= ?1"
    ))?;
    let rows = stmt
        .query_map([min_until], |r| {
            let bytes: Vec<u8> = r.get(2)?;
            let records = bytes
                .chunks_exact(8)
                .filter_map(|c| <[u8; 8]>::try_from(c).ok())
                .collect();
            Ok((r.get(0)?, r.get(1)?, records))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Fails every job of a batch whose transaction SQLite rolled back by itself.
fn fail_batch(
    done: Vec<(Reply, AnyResult)>,
    rest: impl Iterator<Item = Reply>,
) -> Vec<(Reply, AnyResult)> {
    tracing::error!("write transaction rolled back by SQLite; failing the batch");
    let msg = "transaction rolled back by the database";
    done.into_iter()
        .map(|(reply, _)| reply)
        .chain(rest)
        .map(|reply| (reply, Err(StoreError::Unavailable(msg.into()))))
        .collect()
}

/// Rolls back a transaction a failure left open, so the writer keeps working once the fault clears.
fn ensure_no_transaction(conn: &Connection) {
    if !conn.is_autocommit() {
        if let Err(err) = conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %err, "cannot roll back a failed write transaction");
        }
    }
}

/// Creates an empty owner-only file if none exists, so that SQLite (which gives its WAL and
/// shared-memory files the database file's mode) never makes a world-readable one.
pub fn create_private_file(path: &Path) -> Result<(), StoreError> {
    if path.exists() {
        return Ok(());
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?;
    Ok(())
}

/// Makes a file readable by its owner only (database, key files).
pub fn restrict_file_mode(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if path.exists() {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
    }
}

/// Reads a setting (a small named value) on any connection.
pub fn get_setting(conn: &Connection, name: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row("SELECT value FROM settings WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?)
}

/// Writes a setting on a write connection or transaction.
pub fn put_setting(conn: &Connection, name: &str, value: &str) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO settings(name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        [name, value],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    async fn setting(store: &Db, name: &'static str) -> Option<String> {
        store.read(move |c| get_setting(c, name)).await.unwrap()
    }

    /// SQLite may roll a transaction back by itself (disk full, I/O error). Before the fix the
    /// jobs after that point ran outside the batch, were committed one by one, and were still
    /// answered as failed: a write visible that nobody acknowledged.
    #[tokio::test]
    async fn a_transaction_rolled_back_mid_batch_fails_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Db::open(dir.path()).unwrap();
        // Keep the writer busy so that the next three jobs are folded into one batch.
        let hold = store.clone();
        let hold = tokio::spawn(async move {
            hold.write(|_| {
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let job = |sql: &'static str| {
            let store = store.clone();
            tokio::spawn(async move { store.write(move |c| Ok(c.execute_batch(sql)?)).await })
        };
        let a = job("INSERT INTO settings(name, value) VALUES ('a', '1')");
        let b = job("ROLLBACK");
        let c = job("INSERT INTO settings(name, value) VALUES ('c', '1')");
        hold.await.unwrap().unwrap();
        assert!(a.await.unwrap().is_err());
        assert!(b.await.unwrap().is_err());
        assert!(c.await.unwrap().is_err(), "answered as failed");
        assert_eq!(setting(&store, "a").await, None);
        assert_eq!(
            setting(&store, "c").await,
            None,
            "committed outside its batch"
        );
        // The writer keeps working.
        store.write(|c| put_setting(c, "d", "1")).await.unwrap();
        assert_eq!(setting(&store, "d").await.as_deref(), Some("1"));
    }

    /// Records of one group commit are packed per table and tag, at most `RECORDS_PER_ROW` a row;
    /// when they cannot be written, all of the batch's records fail and nothing else does.
    #[tokio::test]
    async fn records_are_packed_per_batch_and_fail_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = Db::open(dir.path()).unwrap();
        let hold = |store: &Db| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(|_| {
                        std::thread::sleep(Duration::from_millis(200));
                        Ok(())
                    })
                    .await
            })
        };
        // Queued while the writer is busy: one batch.
        let held = hold(&store);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let record = |table: (&'static str, i64), tag: i64, n: u64| PackedRecord {
            table,
            tag,
            until: 1_000 + n as i64,
            bytes: n.to_le_bytes(),
        };
        let pending: Vec<_> = (0..250u64)
            .map(|n| {
                let r = record(("packed_", 7), (n % 2) as i64, n);
                store.submit_record(r)
            })
            .collect();
        held.await.unwrap().unwrap();
        for p in pending {
            p.await.unwrap();
        }
        let rows = store
            .read(|c| read_packed_rows(c, "packed_7", 0))
            .await
            .unwrap();
        let mut seen: Vec<u64> = Vec::new();
        for (tag, until, records) in &rows {
            assert!(
                records.len() <= RECORDS_PER_ROW,
                "{} in a row",
                records.len()
            );
            let keys: Vec<u64> = records.iter().map(|b| u64::from_le_bytes(*b)).collect();
            assert!(
                keys.iter().all(|k| (k % 2) as i64 == *tag),
                "grouped by tag"
            );
            assert_eq!(*until, 1_000 + *keys.iter().max().unwrap() as i64);
            seen.extend(keys);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..250).collect::<Vec<_>>());
        assert_eq!(rows.len(), 4, "125 records of each tag: two rows each");
        assert!(read_packed_rows(
            &open_connection(store.path(), true).unwrap(),
            "packed_7",
            1_200
        )
        .unwrap()
        .iter()
        .all(|(_, until, _)| *until >= 1_200));

        // A table of another shape: the records fail (also those written before it, in an
        // earlier table), the job beside them commits.
        store
            .write(|c| Ok(c.execute_batch("CREATE TABLE packed_8 (x)")?))
            .await
            .unwrap();
        let held = hold(&store);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let good = store.submit_record(record(("packed_", 6), 1, 1));
        let bad = store.submit_record(record(("packed_", 8), 1, 2));
        let beside = store.submit(|c| put_setting(c, "beside", "1")).unwrap();
        held.await.unwrap().unwrap();
        assert!(bad.await.is_err());
        assert!(good.await.is_err(), "all of a batch's records or none");
        beside.await.unwrap();
        assert_eq!(setting(&store, "beside").await.as_deref(), Some("1"));
        let left = store
            .read(|c| Ok(c.query_row("SELECT count(*) FROM packed_6", [], |r| r.get::<_, i64>(0))?))
            .await;
        assert!(
            matches!(left, Ok(0) | Err(_)),
            "no half-written records: {left:?}"
        );
        // And the writer goes on.
        store
            .submit_record(record(("packed_", 6), 1, 3))
            .await
            .unwrap();
    }

    /// A COMMIT that fails (here a deferred foreign-key violation) fails its batch only.
    #[tokio::test]
    async fn the_writer_keeps_working_after_a_failed_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Db::open(dir.path()).unwrap();
        store
            .write(|c| {
                Ok(c.execute_batch(
                    "CREATE TABLE p(id INTEGER PRIMARY KEY); CREATE TABLE k(pid REFERENCES p(id));",
                )?)
            })
            .await
            .unwrap();
        let failed = store
            .write(|c| {
                c.execute_batch("PRAGMA defer_foreign_keys = ON; INSERT INTO k VALUES (7);")?;
                put_setting(c, "lost", "1")
            })
            .await;
        assert!(
            matches!(failed, Err(StoreError::Unavailable(_))),
            "{failed:?}"
        );
        assert_eq!(setting(&store, "lost").await, None);
        store.write(|c| put_setting(c, "kept", "1")).await.unwrap();
        assert_eq!(setting(&store, "kept").await.as_deref(), Some("1"));
    }
}
