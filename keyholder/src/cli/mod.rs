//! The `keyholder` command line: `serve` runs the server; the other subcommands are the owner's
//! controls, working on the data folder directly, also while a server runs on it (SQLite WAL:
//! every change is a committed transaction the server reads on its next request). One module per
//! command: its flags, what it does, and its report as printed.

pub mod approvals;
pub mod audit;
pub mod backup;
pub mod bind;
pub mod data_folder;
pub mod doctor;
pub mod egress;
pub mod healthcheck;
pub mod import_reference;
pub mod migrate_storage;
pub mod oauth;
pub mod platform_key;
pub mod policy;
pub mod restore;
pub mod retire_key;
pub mod rewrap;
pub mod rotate_key;
pub mod rotate_master_key;
pub mod seal;
pub mod serve;
pub mod session;
pub mod sign_config;
pub mod status;
pub mod store;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::ServeArgs;

/// Keyholder: the self-hosted key-custody webhook for Token Vault.
#[derive(Debug, Parser)]
#[command(name = "keyholder", version = crate::build_info::long_version(), about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    /// The subcommand.
    pub command: Command,
}

// Each variant's doc comment is its `--help` text (clap reads them); the enum's own would not be.
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the keyholder server (creates the data folder and keys on first start).
    Serve(Box<ServeArgs>),
    /// Issue a one-time bind code and the registration link to connect the platform.
    Bind(bind::BindArgs),
    /// The platform's Ed25519 keys of an asymmetric binding (add, remove, list; at most two active).
    PlatformKey(platform_key::PlatformKeyArgs),
    /// Show or change where a service's credential may be sent (known, pinned, allowlist, any), and
    /// list refused destinations (`egress pending`).
    Egress(egress::EgressArgs),
    /// Configure the OAuth clients used to refresh tokens.
    Oauth(oauth::OAuthArgs),
    /// The owner's custody policies: rules enforced here whatever a ticket says.
    Policy(policy::PolicyArgs),
    /// How a service's key signs proxied requests: AWS region/service/STS role, JWT assertion
    /// template, upstream CA for client certificates (set, list, show, remove).
    SignConfig(sign_config::SignConfigArgs),
    /// Uses held for the owner's approval (service, agent, client address, endpoint, age).
    Approvals(approvals::ApprovalsArgs),
    /// Approve a held use.
    Approve(approvals::DecideArgs),
    /// Deny a held use.
    Deny(approvals::DecideArgs),
    /// Exit 0 if the local server answers healthy (for container health checks).
    Healthcheck(healthcheck::HealthcheckArgs),
    /// Show binding, keys, credential count, seal and last credential use.
    Status(data_folder::OwnerArgs),
    /// Add a data-key version and make it current for new writes.
    RotateKey(data_folder::OwnerArgs),
    /// Re-encrypt every stored credential under the current data key, in small batches.
    Rewrap(rewrap::RewrapArgs),
    /// Remove a data-key version (or the imported `platform-v1` key) that no stored credential uses any more.
    RetireKey(retire_key::RetireKeyArgs),
    /// Re-wrap the key ring under a new master key (key file or passphrase).
    RotateMasterKey(rotate_master_key::RotateMasterKeyArgs),
    /// Write a consistent online snapshot of the database (wrapped keys only) to a new file.
    Backup(backup::BackupArgs),
    /// Restore a backup into an empty data folder.
    Restore(restore::RestoreArgs),
    /// Move the storage: this data folder's SQLite into an empty PostgreSQL database
    /// (`--to postgres://...`), or `--database-url` into a new SQLite data folder (`--to FOLDER`).
    MigrateStorage(migrate_storage::MigrateStorageArgs),
    /// Kill switch: refuse every credential use (503 sealed) until `unseal`, without going offline.
    Seal(data_folder::OwnerArgs),
    /// Lift the seal.
    Unseal(data_folder::OwnerArgs),
    /// The signed, hash-chained audit trail.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Move in from the public reference webhook's two JSON files (keeps its binding).
    ImportReference(import_reference::ImportReferenceArgs),
    /// Check the setup and say what to fix (exit 0 only when nothing is wrong; --json for monitoring).
    Doctor(doctor::DoctorArgs),
    /// Store a credential from a file or standard input, without the platform's pages or scripts.
    Store(store::StoreArgs),
}

/// Parses the command line and runs the command; exit code 2 (with the error on stderr) when it
/// fails.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("keyholder: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::execute(&args),
        Command::Bind(args) => bind::execute(&args),
        Command::PlatformKey(args) => platform_key::execute(&args),
        Command::Egress(args) => egress::execute(&args),
        Command::Oauth(args) => oauth::execute(&args),
        Command::Policy(args) => policy::execute(&args),
        Command::SignConfig(args) => {
            println!("{}", sign_config::run(&args)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Approvals(args) => approvals::execute_list(&args),
        Command::Approve(args) => approvals::execute_decide(&args, true),
        Command::Deny(args) => approvals::execute_decide(&args, false),
        Command::Healthcheck(args) => healthcheck::execute(&args),
        Command::Status(args) => status::execute(&args),
        Command::RotateKey(args) => rotate_key::execute(&args),
        Command::Rewrap(args) => rewrap::execute(&args),
        Command::RetireKey(args) => retire_key::execute(&args),
        Command::RotateMasterKey(args) => rotate_master_key::execute(&args),
        Command::Backup(args) => backup::execute(&args),
        Command::Restore(args) => restore::execute(&args),
        Command::MigrateStorage(args) => migrate_storage::execute(&args),
        Command::Seal(args) => seal::execute(&args, true),
        Command::Unseal(args) => seal::execute(&args, false),
        Command::Audit(command) => audit::execute(&command),
        Command::ImportReference(args) => import_reference::execute(&args),
        Command::Doctor(args) => doctor::execute(&args),
        Command::Store(args) => store::execute(&args),
    }
}
