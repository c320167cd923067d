//! `keyholder rewrap`: every stored credential re-encrypted under the current data key.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use super::session::{block, Owner};
use crate::config::DataArgs;
use crate::vault::rotation;

/// Flags of `keyholder rewrap`.
#[derive(Debug, Clone, Args)]
pub struct RewrapArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Credentials re-encrypted per transaction (small batches keep the server writing in between).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch_size: u16,
}

/// What `keyholder rewrap` did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RewrapReport {
    /// The version everything was re-encrypted under.
    pub current_data_key: u32,
    /// Credentials looked at.
    pub examined: usize,
    /// Credentials re-encrypted.
    pub rewrapped: usize,
    /// Transactions used.
    pub batches: usize,
    /// Credentials that could not be opened (left unchanged), by key.
    pub failed: Vec<String>,
    /// Data-key versions still referenced afterwards, with document counts.
    pub still_in_use: BTreeMap<u32, usize>,
    /// Whether the reference webhook's key is still held.
    pub reference_key: bool,
    /// Credentials the reference key still opens afterwards.
    pub reference_key_documents: usize,
}

/// `keyholder rewrap`: every credential under the current data key, in small transactions. Passes
/// over the credentials until none is left under an older key (a server that has not yet noticed a
/// rotation may write one more under the old key; its next write uses the new one).
pub fn rewrap(args: &RewrapArgs) -> anyhow::Result<RewrapReport> {
    block(async {
        let owner = Owner::open(&args.data).await?;
        let storage = owner.storage();
        let mut report = RewrapReport::default();
        for pass in 0..5 {
            let mut cursor: Option<String> = None;
            report.failed.clear();
            loop {
                let (change, batch) = rotation::rewrap_batch(
                    storage,
                    &owner.master,
                    cursor.as_deref(),
                    usize::from(args.batch_size),
                )
                .await?;
                if batch.rewrapped > 0 {
                    if let crate::storage::Applied::CheckFailed(_) = storage.apply(change).await? {
                        // A document changed under the batch (a store by the server): again.
                        continue;
                    }
                }
                report.batches += 1;
                report.examined += batch.examined;
                report.rewrapped += batch.rewrapped;
                report.failed.extend(batch.failed);
                match batch.last_key {
                    Some(last) if batch.examined == usize::from(args.batch_size) => {
                        cursor = Some(last)
                    }
                    _ => break,
                }
            }
            let ring = owner.ring().await?;
            report.current_data_key = ring.current_data_version();
            report.still_in_use = rotation::versions_in_use(storage)
                .await?
                .into_iter()
                .filter(|(v, _)| *v != report.current_data_key)
                .map(|(v, (n, _))| (v, n))
                .collect();
            report.reference_key = ring.has_platform_v1_key();
            report.reference_key_documents = rotation::platform_v1_in_use(storage, &ring).await?.0;
            if (report.still_in_use.is_empty() && report.reference_key_documents == 0) || pass == 4
            {
                break;
            }
            // Give a server that is about to reload its key ring the moment it needs.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        let detail = format!(
            "{} credential(s) under data key v{}",
            report.rewrapped, report.current_data_key
        );
        // The entry alone (the batches were written and followed already).
        let note = crate::storage::ChangeSet::default();
        owner.commit("rewrap", &detail, note).await?;
        Ok(report)
    })
}

/// Runs `keyholder rewrap` and prints what it did; exit code 1 while an older key is still in use.
pub fn execute(args: &RewrapArgs) -> anyhow::Result<ExitCode> {
    let report = rewrap(args)?;
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
        Ok(ExitCode::SUCCESS)
    } else {
        println!("Still in use: {:?}", report.still_in_use);
        Ok(ExitCode::from(1))
    }
}
