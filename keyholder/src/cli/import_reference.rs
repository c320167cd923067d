//! `keyholder import-reference`: moving in from the public reference webhook's two JSON files
//! (keeps its binding).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

use super::session::{block, Owner};
use crate::config::DataArgs;
use crate::vault::import::{self, ImportReport};

/// Flags of `keyholder import-reference`.
#[derive(Debug, Clone, Args)]
pub struct ImportReferenceArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// The reference's key file (`tokenvault_store.json`: webhook id, encryption key, HMAC secret).
    #[arg(long)]
    pub store: PathBuf,
    /// The reference's collections file (`tokenvault_kv_store.json`).
    #[arg(long)]
    pub kv: PathBuf,
    /// Import into a keyholder that already holds documents or is bound (same keys are replaced).
    #[arg(long)]
    pub force: bool,
}

fn read_json(path: &Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    Ok(zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    ))
}

/// `keyholder import-reference --store FILE --kv FILE`. The two files are told apart by content,
/// so swapping them by mistake is harmless.
pub fn import_reference(args: &ImportReferenceArgs) -> anyhow::Result<ImportReport> {
    let first = read_json(&args.store)?;
    let second = read_json(&args.kv)?;
    let probe = |text: &str, path: &Path| -> anyhow::Result<bool> {
        let value: Value = serde_json::from_str(text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(import::looks_like_key_file(&value))
    };
    let (key_text, collections_text) =
        match (probe(&first, &args.store)?, probe(&second, &args.kv)?) {
            (true, false) => (first, second),
            (false, true) => (second, first),
            _ => anyhow::bail!(
            "expected one key file (with encryption_key and hmac_secret) and one collections file"
        ),
        };
    let keys = import::parse_reference_keys(&key_text)?;
    let collections: Value = serde_json::from_str(&collections_text)?;
    let force = args.force;
    block(async {
        let owner = Owner::open(&args.data).await?;
        let (change, report) =
            import::import_reference(owner.storage(), &owner.master, &keys, &collections, force)
                .await?;
        let detail = format!(
            "webhook {}: {} credential(s) re-encrypted",
            report.webhook_id, report.tokens_reencrypted
        );
        owner.commit("import-reference", &detail, change).await?;
        Ok(report)
    })
}

/// Runs `keyholder import-reference` and prints what was imported.
pub fn execute(args: &ImportReferenceArgs) -> anyhow::Result<ExitCode> {
    let report = import_reference(args)?;
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
    Ok(ExitCode::SUCCESS)
}
