//! `keyholder audit`: the signed, hash-chained audit trail (list, export, verify, prune).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::data_folder::OwnerArgs;
use super::session::{block, Owner};
use crate::audit::{self, AuditEntry, AuditFilter, AuditVerification};
use crate::config::DataArgs;

/// `keyholder audit` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Print entries, oldest first.
    List(AuditListArgs),
    /// Write every entry, one JSON object per line.
    Export(AuditExportArgs),
    /// Check the whole chain: hashes, signatures, order, nothing removed. Exit 1 on the first bad entry.
    Verify(OwnerArgs),
    /// Remove entries older than N days (the chain is verified first; a signed prune entry records
    /// where the kept chain starts, so `verify` still proves nothing else was removed).
    Prune(AuditPruneArgs),
}

/// Flags of `keyholder audit prune`.
#[derive(Debug, Clone, Args)]
pub struct AuditPruneArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Remove entries older than this many days (entries newer are always kept; 0 = every entry
    /// written before now).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=36_500))]
    pub older_than_days: u32,
    /// First write the entries to be removed to this new file (JSON lines, as `audit export`),
    /// fsync'ed before anything is deleted.
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// Prune even though the chain does not verify (the broken part may be evidence: export it).
    #[arg(long)]
    pub force: bool,
}

/// What `keyholder audit prune` did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditPruneReport {
    /// Entries removed.
    pub removed: u64,
    /// Last removed sequence number (0 when nothing was old enough).
    pub through_seq: u64,
    /// Entries written to `--export`.
    pub exported: usize,
}

/// Flags of `keyholder audit list`.
#[derive(Debug, Clone, Args)]
pub struct AuditListArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Only this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Only entries at or after this time (unix seconds or `YYYY-MM-DDTHH:MM:SSZ`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only the newest N entries.
    #[arg(long)]
    pub limit: Option<u64>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `keyholder audit export`.
#[derive(Debug, Clone, Args)]
pub struct AuditExportArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Output format.
    #[arg(long, default_value = "jsonl", value_parser = ["jsonl"])]
    pub format: String,
    /// Write to this file instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

async fn identity_verifying_key(
    owner: &Owner,
) -> anyhow::Result<(ed25519_dalek::VerifyingKey, String)> {
    let ring = owner.ring().await?;
    Ok((ring.identity().verifying_key(), ring.identity().key_id()))
}

/// `keyholder audit list`.
pub fn audit_list(args: &AuditListArgs) -> anyhow::Result<Vec<AuditEntry>> {
    let since_ms = match &args.since {
        Some(text) => Some(audit::parse_since(text).ok_or_else(|| {
            anyhow::anyhow!("--since must be unix seconds or YYYY-MM-DDTHH:MM:SSZ")
        })?),
        None => None,
    };
    block(async {
        let owner = Owner::open(&args.data).await?;
        Ok(owner
            .storage()
            .audit_entries(AuditFilter {
                service: args.service.clone(),
                since_ms,
                limit: args.limit,
                through_seq: None,
            })
            .await?)
    })
}

/// Characters that must not reach the owner's terminal as they are: C0 and C1 controls and DEL
/// (escape sequences, carriage returns that overwrite a line, bells) and the bidirectional
/// overrides and isolates that reorder what is shown. Audit fields come from the platform (agent
/// ids, proxy ids, service names in its tickets) and from any caller (request ids, addresses).
fn is_unsafe_for_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every character unsafe for a terminal written as `\u{..}` (and `\` as `\\`, so
/// that an escape in the output always means one was made). Whitespace is escaped too: the fields
/// of a line are separated by spaces, so an agent id cannot pose as another field.
pub fn escape_for_terminal(text: &str) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| c.is_whitespace() || is_unsafe_for_terminal(c);
    if !text.chars().any(|c| c == '\\' || escaped(c)) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if escaped(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// One `keyholder audit list` line: every field escaped for the terminal.
pub fn audit_line(entry: &AuditEntry) -> String {
    let e = &entry.event;
    let f = |text: &str| escape_for_terminal(text).into_owned();
    format!(
        "#{} {} {} service={} purpose={} agent={} proxy={} from={} upstream={} result={} request={}",
        entry.seq,
        keyholder_protocol::document::format_iso8601(e.at_ms.div_euclid(1000)),
        f(&e.endpoint),
        f(&e.service),
        f(&e.purpose),
        f(&e.agent_id),
        f(&e.proxy_id),
        f(&e.source),
        f(&e.upstream),
        f(&e.result),
        f(&e.request_id)
    )
}

/// One `keyholder audit list --json` line. JSON escapes C0 controls itself; DEL, C1 controls and
/// bidirectional controls are written as `\uXXXX` too (still the same JSON strings).
pub fn audit_json_line(entry: &AuditEntry) -> anyhow::Result<String> {
    let json = serde_json::to_string(entry)?;
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if is_unsafe_for_terminal(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// `keyholder audit export --format jsonl`: writes every entry; returns how many.
pub fn audit_export(args: &AuditExportArgs, out: &mut dyn std::io::Write) -> anyhow::Result<usize> {
    let entries = block(async {
        let owner = Owner::open(&args.data).await?;
        Ok(owner
            .storage()
            .audit_entries(AuditFilter::default())
            .await?)
    })?;
    for entry in &entries {
        serde_json::to_writer(&mut *out, entry)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(entries.len())
}

/// `keyholder audit prune`: verify, export (optional), record the prune, delete in chunks.
pub fn audit_prune(args: &AuditPruneArgs) -> anyhow::Result<AuditPruneReport> {
    block(async {
        let owner = Owner::open(&args.data).await?;
        let storage = owner.storage();
        let before_ms = audit::now_ms() - i64::from(args.older_than_days) * 86_400_000;
        let Some(boundary) = storage.prune_boundary(before_ms).await? else {
            return Ok(AuditPruneReport {
                removed: 0,
                through_seq: 0,
                exported: 0,
            });
        };
        let (key, _) = identity_verifying_key(&owner).await?;
        if let Some(problem) = storage.verify_audit(key).await?.problem {
            if !args.force {
                anyhow::bail!(
                    "the audit chain does not verify at #{} ({}): nothing pruned. Export it \
                     (`keyholder audit export`) and prune with --force if you must.",
                    problem.seq,
                    problem.reason
                );
            }
        }
        let mut exported = 0;
        if let Some(path) = &args.export {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let file = options
                .open(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            let through = AuditFilter {
                through_seq: Some(boundary.through_seq),
                ..AuditFilter::default()
            };
            for entry in storage.audit_entries(through).await? {
                serde_json::to_writer(&mut out, &entry)?;
                std::io::Write::write_all(&mut out, b"\n")?;
                exported += 1;
            }
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()
                .with_context(|| format!("cannot fsync {}", path.display()))?;
        }
        let signer: crate::storage::SharedSigner = std::sync::Arc::new(owner.ring().await?);
        storage
            .append_audit(vec![audit::prune_event(boundary, "cli")], signer)
            .await?;
        let mut removed = 0;
        loop {
            let deleted = storage.delete_pruned(boundary).await?;
            if deleted == 0 {
                break;
            }
            removed += deleted;
        }
        Ok(AuditPruneReport {
            removed,
            through_seq: boundary.through_seq,
            exported,
        })
    })
}

/// `keyholder audit verify`: the verification and the identity key id it used.
pub fn audit_verify(args: &OwnerArgs) -> anyhow::Result<(AuditVerification, String)> {
    block(async {
        let owner = Owner::open(&args.data).await?;
        let (key, key_id) = identity_verifying_key(&owner).await?;
        Ok((owner.storage().verify_audit(key).await?, key_id))
    })
}

/// Runs a `keyholder audit` subcommand and prints its entries or its result.
pub fn execute(command: &AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::List(args) => {
            for entry in audit_list(args)? {
                if args.json {
                    println!("{}", audit_json_line(&entry)?);
                } else {
                    println!("{}", audit_line(&entry));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export(args) => {
            let count = match &args.out {
                Some(path) => {
                    let mut options = std::fs::OpenOptions::new();
                    options.write(true).create_new(true);
                    let file = options.open(path)?;
                    audit_export(args, &mut std::io::BufWriter::new(file))?
                }
                None => audit_export(args, &mut std::io::stdout().lock())?,
            };
            eprintln!("{count} entries exported");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Prune(args) => {
            let report = audit_prune(args)?;
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
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify(args) => {
            let (verification, key_id) = audit_verify(args)?;
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
                    Ok(ExitCode::SUCCESS)
                }
                Some(problem) => {
                    eprintln!(
                        "FAILED at entry #{}: {} ({} entries before it are intact)",
                        problem.seq, problem.reason, verification.entries
                    );
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}
