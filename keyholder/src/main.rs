//! The `keyholder` command: `serve` runs the server; the other subcommands are the owner's
//! controls, working on the data folder (also while a server runs on it).

use clap::{Parser, Subcommand};
use keyholder::cli::owner::{
    self, AuditCommand, BackupArgs, ImportReferenceArgs, OwnerArgs, RestoreArgs, RetireKeyArgs,
    RewrapArgs, RotateMasterKeyArgs, StoreArgs,
};
use keyholder::cli::{
    self, BindArgs, EgressArgs, HealthcheckArgs, OAuthArgs, OAuthOutcome, PlatformKeyAction,
    PlatformKeyArgs,
};
use keyholder::config::{Config, ServeArgs};

/// Keyholder: the self-hosted key-custody webhook for Token Vault.
#[derive(Debug, Parser)]
#[command(name = "keyholder", version = keyholder::build_info::long_version(), about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the keyholder server (creates the data folder and keys on first start).
    Serve(Box<ServeArgs>),
    /// Issue a one-time bind code and the registration link to connect the platform.
    Bind(BindArgs),
    /// The platform's Ed25519 keys of an asymmetric binding (add, remove, list; at most two active).
    PlatformKey(PlatformKeyArgs),
    /// Show or change where a service's credential may be sent (known, pinned, allowlist, any), and
    /// list refused destinations (`egress pending`).
    Egress(EgressArgs),
    /// Configure the OAuth clients used to refresh tokens.
    Oauth(OAuthArgs),
    /// The owner's custody policies: rules enforced here whatever a ticket says.
    Policy(keyholder::cli::policy::PolicyArgs),
    /// How a service's key signs proxied requests: AWS region/service/STS role, JWT assertion
    /// template, upstream CA for client certificates (set, list, show, remove).
    SignConfig(keyholder::cli::sign_config::SignConfigArgs),
    /// Uses held for the owner's approval (service, agent, client address, endpoint, age).
    Approvals(keyholder::cli::policy::ApprovalsArgs),
    /// Approve a held use.
    Approve(keyholder::cli::policy::DecideArgs),
    /// Deny a held use.
    Deny(keyholder::cli::policy::DecideArgs),
    /// Exit 0 if the local server answers healthy (for container health checks).
    Healthcheck(HealthcheckArgs),
    /// Show binding, keys, credential count, seal and last credential use.
    Status(OwnerArgs),
    /// Add a data-key version and make it current for new writes.
    RotateKey(OwnerArgs),
    /// Re-encrypt every stored credential under the current data key, in small batches.
    Rewrap(RewrapArgs),
    /// Remove a data-key version (or the imported `platform-v1` key) that no stored credential uses any more.
    RetireKey(RetireKeyArgs),
    /// Re-wrap the key ring under a new master key (key file or passphrase).
    RotateMasterKey(RotateMasterKeyArgs),
    /// Write a consistent online snapshot of the database (wrapped keys only) to a new file.
    Backup(BackupArgs),
    /// Restore a backup into an empty data folder.
    Restore(RestoreArgs),
    /// Move the storage: this data folder's SQLite into an empty PostgreSQL database
    /// (`--to postgres://...`), or `--database-url` into a new SQLite data folder (`--to FOLDER`).
    MigrateStorage(keyholder::cli::migrate_storage::MigrateStorageArgs),
    /// Kill switch: refuse every credential use (503 sealed) until `unseal`, without going offline.
    Seal(OwnerArgs),
    /// Lift the seal.
    Unseal(OwnerArgs),
    /// The signed, hash-chained audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Move in from the public reference webhook's two JSON files (keeps its binding).
    ImportReference(ImportReferenceArgs),
    /// Check the setup and say what to fix (exit 0 only when nothing is wrong; --json for monitoring).
    Doctor(keyholder::cli::doctor::DoctorArgs),
    /// Store a credential from a file or standard input, without the platform's pages or scripts.
    Store(StoreArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("keyholder: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let otlp = args
                .otlp_endpoint
                .as_deref()
                .filter(|e| !e.trim().is_empty())
                .map(keyholder::telemetry::OtlpSettings::from_endpoint)
                .transpose()?;
            keyholder::telemetry::init(&args.log, &args.log_format, otlp.as_ref())?;
            let config = Config::from_args(&args)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let server = keyholder::start(config).await?;
                server.wait().await?;
                tracing::info!("keyholder stopped");
                Ok::<_, anyhow::Error>(())
            })?;
            drop(runtime);
            keyholder::telemetry::shutdown();
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Bind(args) => {
            let issued = cli::bind(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&issued)?);
            } else {
                println!("Bind code:        {}", issued.code);
                println!("Valid for:        {} seconds, once", issued.expires_in);
                println!("Registration URL: {}", issued.registration_url);
                println!("Bind page:        {}", issued.bind_page_url);
                println!();
                println!("Open the registration URL while logged in to the platform to connect this keyholder.");
                if let Some(key_id) = &issued.platform_key_id {
                    println!("Asymmetric binding to platform key {key_id}: the exchange hands out no secret.");
                }
                if issued.rebind {
                    println!("This is a re-bind: when the platform exchanges it, the current binding (and its HMAC secret) stops working.");
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::PlatformKey(args) => {
            let keys = cli::platform_key(&args)?;
            match &args.action {
                PlatformKeyAction::List { json: true, .. } => {
                    println!("{}", serde_json::to_string_pretty(&keys)?)
                }
                PlatformKeyAction::Add { .. } => println!("Platform key added."),
                PlatformKeyAction::Remove { key_id, .. } => {
                    println!(
                        "Platform key {key_id} removed: its signatures are refused from now on."
                    )
                }
                PlatformKeyAction::List { .. } => {}
            }
            if !matches!(&args.action, PlatformKeyAction::List { json: true, .. }) {
                println!("Active platform keys:");
                for key in &keys {
                    println!(
                        "  {}  {}  added {}",
                        key.key_id,
                        key.public_key,
                        keyholder_protocol::document::format_iso8601(key.added_at)
                    );
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::MigrateStorage(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report =
                runtime.block_on(keyholder::cli::migrate_storage::migrate_storage(&args))?;
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
        Command::Status(args) => {
            let status = owner::status(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("Bound:              {}", status.bound);
                println!("Platform scheme:    {}", status.platform_scheme);
                if !status.platform_keys.is_empty() {
                    println!("Platform keys:      {}", status.platform_keys.join(", "));
                }
                println!("Webhook id:         {}", status.webhook_id);
                println!("Identity key:       {}", status.identity_key_id);
                println!(
                    "Data keys:          {:?} (current v{})",
                    status.data_key_versions, status.current_data_key
                );
                for (version, count) in &status.documents_per_key {
                    println!("  v{version}: {count} document(s)");
                }
                println!(
                    "Reference key held: {}{}",
                    status.reference_key,
                    if status.reference_key {
                        format!(
                            " ({} credential(s) still need it)",
                            status.reference_key_documents
                        )
                    } else {
                        String::new()
                    }
                );
                println!("Credentials:        {}", status.credential_count);
                println!("Sealed:             {}", status.sealed);
                println!(
                    "Last credential use: {}",
                    status.last_credential_use.as_deref().unwrap_or("never")
                );
                println!("Audit entries:      {}", status.audit_entries);
                if status.policies.is_empty() {
                    println!("Policies:           (none)");
                } else {
                    println!("Policies:");
                    for view in &status.policies {
                        for line in view.lines() {
                            println!("  {line}");
                        }
                    }
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::RotateKey(args) => {
            let version = owner::rotate_key(&args)?;
            println!("Data key v{version} is now current for new writes.");
            println!("Run `keyholder rewrap` to re-encrypt stored credentials under it.");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Rewrap(args) => {
            let report = owner::rewrap(&args)?;
            println!(
                "Re-encrypted {} of {} credential(s) under data key v{} in {} batch(es).",
                report.rewrapped, report.examined, report.current_data_key, report.batches
            );
            if !report.failed.is_empty() {
                println!(
                    "Could not open (left unchanged): {}",
                    report.failed.join(", ")
                );
            }
            if report.reference_key {
                if report.reference_key_documents == 0 {
                    println!("No credential needs the reference key any more: `keyholder retire-key platform-v1` removes it.");
                } else {
                    println!(
                        "The reference key still opens {} credential(s).",
                        report.reference_key_documents
                    );
                }
            }
            if report.still_in_use.is_empty() && report.reference_key_documents == 0 {
                println!("No document uses an older data key; old versions can be retired.");
                Ok(std::process::ExitCode::SUCCESS)
            } else {
                println!("Still in use: {:?}", report.still_in_use);
                Ok(std::process::ExitCode::from(1))
            }
        }
        Command::RetireKey(args) => {
            owner::retire_key(&args)?;
            let key = args.key.to_string();
            println!("{}{} removed.", key[..1].to_uppercase(), &key[1..]);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::RotateMasterKey(args) => {
            let moved = owner::rotate_master_key(&args)?;
            println!("Re-wrapped {moved} key(s) under the new master key; the old one no longer opens this folder.");
            println!("A running server keeps serving with the keys it holds, and switches to the new master key");
            println!("as soon as it finds it where it was told to look (replace that file), or at its next start");
            println!("with --master-key-file / --passphrase-file pointing at the new one.");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Doctor(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = runtime.block_on(keyholder::cli::doctor::doctor(&args))?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(std::process::ExitCode::from(if report.ok { 0 } else { 1 }))
        }
        Command::Backup(args) => {
            owner::backup(&args)?;
            println!(
                "Backup written to {} (wrapped keys only: keep the master key apart).",
                args.out.display()
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Restore(args) => {
            let report = owner::restore(&args)?;
            println!(
                "Restored webhook {} into {}.",
                report.webhook_id,
                args.data.data_dir.display()
            );
            match report.master_key_checked {
                Some(true) => println!("The given master key opens the restored keys."),
                Some(false) => {
                    println!("WARNING: the given master key does NOT open the restored keys.");
                    return Ok(std::process::ExitCode::from(1));
                }
                None => println!(
                    "Start it with the master key (file or passphrase) that wrapped the backup."
                ),
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Seal(args) => {
            owner::set_sealed(&args, true)?;
            println!("Sealed: credential use is refused (503 sealed) until `keyholder unseal`.");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Unseal(args) => {
            owner::set_sealed(&args, false)?;
            println!("Unsealed: credential use resumes.");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::List(args)) => {
            for entry in owner::audit_list(&args)? {
                if args.json {
                    println!("{}", owner::audit_json_line(&entry)?);
                } else {
                    println!("{}", owner::audit_line(&entry));
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::Export(args)) => {
            let count = match &args.out {
                Some(path) => {
                    let mut options = std::fs::OpenOptions::new();
                    options.write(true).create_new(true);
                    let file = options.open(path)?;
                    owner::audit_export(&args, &mut std::io::BufWriter::new(file))?
                }
                None => owner::audit_export(&args, &mut std::io::stdout().lock())?,
            };
            eprintln!("{count} entries exported");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::Prune(args)) => {
            let report = owner::audit_prune(&args)?;
            if report.through_seq == 0 {
                println!(
                    "Nothing to prune: no entry is older than {} days.",
                    args.older_than_days
                );
            } else {
                if let Some(path) = &args.export {
                    println!("{} entries exported to {}", report.exported, path.display());
                }
                println!(
                    "Pruned {} entries (through #{}); `keyholder audit verify` checks the rest.",
                    report.removed, report.through_seq
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::Verify(args)) => {
            let (verification, key_id) = owner::audit_verify(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&verification)?);
            }
            match &verification.problem {
                None => {
                    if !args.json {
                        println!(
                            "OK: {} entries, chain intact, all signed by identity key {key_id}. Head: #{} {}",
                            verification.entries, verification.head_seq, verification.head_hash
                        );
                    }
                    Ok(std::process::ExitCode::SUCCESS)
                }
                Some(problem) => {
                    eprintln!(
                        "FAILED at entry #{}: {} ({} entries before it are intact)",
                        problem.seq, problem.reason, verification.entries
                    );
                    Ok(std::process::ExitCode::from(1))
                }
            }
        }
        Command::Store(args) => {
            let report = owner::store(&args, &mut std::io::stdin().lock())?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "Stored the credential of '{}' ({} sealed; meta: {}).",
                    report.service,
                    args.field,
                    serde_json::to_string(&report.meta)?
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::ImportReference(args) => {
            let report = owner::import_reference(&args)?;
            println!("Imported the reference webhook {}:", report.webhook_id);
            println!("  credentials re-encrypted: {}", report.tokens_reencrypted);
            println!(
                "  plaintext token documents kept: {}",
                report.tokens_plaintext
            );
            println!(
                "  proxy_configs: {}, audit: {}, vault_config: {}",
                report.proxy_configs, report.audit, report.vault_config
            );
            if report.totp_links_sealed > 0 {
                println!(
                    "  totpUri links sealed (seed encrypted, link removed): {}",
                    report.totp_links_sealed
                );
            }
            if report.replaced > 0 {
                println!("  replaced existing documents: {}", report.replaced);
            }
            println!(
                "  binding: {}",
                if report.bound {
                    "bound (same HMAC secret: no re-bind needed)"
                } else {
                    "not bound yet (run `keyholder bind`)"
                }
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Egress(EgressArgs {
            action: cli::EgressAction::Pending { data, json },
        }) => {
            let pending = cli::egress_pending(&data)?;
            if json {
                println!("{}", serde_json::to_string(&pending)?);
            } else if pending.is_empty() {
                println!("No refused destinations.");
            } else {
                println!(
                    "{:<24} {:<40} {:>7}  LAST (UTC)",
                    "SERVICE", "ORIGIN", "COUNT"
                );
                for p in &pending {
                    println!(
                        "{:<24} {:<40} {:>7}  {}",
                        p.service,
                        p.origin,
                        p.count,
                        keyholder_protocol::document::format_iso8601(p.last_at)
                    );
                }
                println!("Allow one with: keyholder egress allow SERVICE ORIGIN");
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Egress(args) => {
            let (policy, json) = cli::egress(&args)?;
            if json {
                println!("{}", serde_json::to_string(&policy)?);
            } else {
                let mode = serde_json::to_value(policy.mode)?;
                println!("Service:       {}", policy.service);
                println!("Mode:          {}", mode.as_str().unwrap_or_default());
                if policy.pins.is_empty() {
                    println!(
                        "Pins:          {}",
                        if policy.mode == keyholder::vault::egress::EgressMode::Pinned {
                            "(none yet: the first call with a credential pins its origin)"
                        } else {
                            "(none: only in pinned mode)"
                        }
                    );
                }
                for pin in &policy.pins {
                    println!(
                        "Pin:           {} (since {}, for one credential)",
                        pin.origin,
                        keyholder_protocol::document::format_iso8601(pin.pinned_at)
                    );
                }
                println!(
                    "Allowlist:     {}",
                    if policy.allowlist.is_empty() {
                        "(empty)".to_string()
                    } else {
                        policy.allowlist.join(", ")
                    }
                );
                println!(
                    "Token URL pin: {}",
                    policy.token_url.as_deref().unwrap_or("(none)")
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::SignConfig(args) => {
            println!("{}", keyholder::cli::sign_config::run(&args)?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Policy(args) => {
            match keyholder::cli::policy::run(&args)? {
                keyholder::cli::policy::PolicyOutcome::Done(line) => println!("{line}"),
                keyholder::cli::policy::PolicyOutcome::Views(views, true) => {
                    if matches!(
                        args.action,
                        keyholder::cli::policy::PolicyAction::Show { .. }
                    ) {
                        if let Some(view) = views.first() {
                            println!("{}", serde_json::to_string(view)?);
                        }
                    } else {
                        println!("{}", serde_json::to_string(&views)?);
                    }
                }
                keyholder::cli::policy::PolicyOutcome::Views(views, false) => {
                    if views.is_empty() {
                        println!("No policies.");
                    }
                    for view in views {
                        for line in view.lines() {
                            println!("{line}");
                        }
                    }
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Approvals(args) => {
            let pending = keyholder::cli::policy::approvals(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&pending)?);
            } else if pending.is_empty() {
                println!("No uses waiting for approval.");
            } else {
                let now = keyholder::clock::now_unix();
                for p in &pending {
                    println!("{}", keyholder::cli::policy::approval_line(p, now));
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Approve(args) => {
            println!("{}", keyholder::cli::policy::decide(&args, true)?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Deny(args) => {
            println!("{}", keyholder::cli::policy::decide(&args, false)?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Oauth(args) => {
            match cli::oauth(&args)? {
                OAuthOutcome::Set(name) => {
                    println!("OAuth client for '{name}' stored (secret wrapped by the master key).")
                }
                OAuthOutcome::List(providers) => {
                    if providers.is_empty() {
                        println!("No OAuth clients configured.");
                    }
                    for p in providers {
                        println!("{}\t{}\tclient_id={}", p.name, p.token_url, p.client_id);
                    }
                }
                OAuthOutcome::Removed(name, true) => println!("OAuth client for '{name}' removed."),
                OAuthOutcome::Removed(name, false) => println!("No OAuth client for '{name}'."),
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Healthcheck(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let healthy = runtime.block_on(cli::healthcheck(&args));
            match healthy {
                Ok(true) => Ok(std::process::ExitCode::SUCCESS),
                Ok(false) => {
                    eprintln!("keyholder: the server answered, but not healthy");
                    Ok(std::process::ExitCode::from(1))
                }
                Err(err) => {
                    eprintln!("keyholder: health check failed: {err:#}");
                    Ok(std::process::ExitCode::from(1))
                }
            }
        }
    }
}
