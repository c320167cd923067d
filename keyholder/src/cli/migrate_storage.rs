//! `keyholder migrate-storage`: a data folder's SQLite database into an empty PostgreSQL database
//! (`--to postgres://...`), or a PostgreSQL database (`--database-url`) into a new SQLite data
//! folder (`--to <folder>`). See [`crate::storage::postgres::migrate`].

use std::path::PathBuf;

use clap::Args;

use crate::config::DataArgs;
use crate::storage::postgres::migrate::{self, MigrationReport};
use crate::storage::postgres::{is_postgres_url, PgTarget};

/// Flags of `keyholder migrate-storage`.
#[derive(Debug, Clone, Args)]
pub struct MigrateStorageArgs {
    /// The source: the data folder's SQLite database, or the PostgreSQL one of --database-url.
    #[command(flatten)]
    pub data: DataArgs,
    /// The target: an empty PostgreSQL database (`postgres://...`), or a data folder without a
    /// database (when the source is --database-url).
    #[arg(long, value_name = "URL|FOLDER")]
    pub to: String,
    /// File holding the target PostgreSQL's password.
    #[arg(long, value_name = "FILE")]
    pub to_password_file: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Moves the storage; the report of what arrived (counts and the audit head, verified).
pub async fn migrate_storage(args: &MigrateStorageArgs) -> anyhow::Result<MigrationReport> {
    let source = args.data.database("cli")?;
    match (source, is_postgres_url(&args.to)) {
        (None, true) => {
            let target = PgTarget::parse(&args.to, args.to_password_file.as_deref())?;
            let file = args.data.data_dir.join(crate::store::DATABASE_FILE);
            Ok(migrate::sqlite_to_postgres(&file, &target).await?)
        }
        (Some(db), false) => {
            Ok(migrate::postgres_to_sqlite(&db.target, std::path::Path::new(&args.to)).await?)
        }
        (None, false) => anyhow::bail!(
            "--to names a folder: give the PostgreSQL source with --database-url (or --to postgres://... to move this data folder into PostgreSQL)"
        ),
        (Some(_), true) => anyhow::bail!(
            "from PostgreSQL to PostgreSQL: use pg_dump / pg_restore"
        ),
    }
}

/// Runs `keyholder migrate-storage` and prints what arrived.
pub fn execute(args: &MigrateStorageArgs) -> anyhow::Result<std::process::ExitCode> {
    // A runtime of its own on this thread (the migration holds a SQLite connection across awaits).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(migrate_storage(args))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (table, rows) in &report.tables {
            println!("{table:<20} {rows} rows");
        }
        println!(
            "audit trail          {} entries, head {}",
            report.audit_entries, report.audit_head
        );
        println!("replay marks         {}", report.replay_marks);
        if report.archived_replica_entries > 0 {
            println!(
                "replica chains       {} entries archived in audit-replicas.jsonl",
                report.archived_replica_entries
            );
        }
        println!("Verified: every table's count and the audit chain match the source.");
    }
    Ok(std::process::ExitCode::SUCCESS)
}
