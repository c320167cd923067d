//! `keyholder egress`: where each service's credential may be sent (mode, pins, allowlist) and
//! the destinations refused so far.

use std::process::ExitCode;

use clap::Args;

use super::session::{block, Owner};
use crate::config::DataArgs;
use crate::vault::collections::validate_key;
use crate::vault::egress::{self, EgressMode, EgressPolicy};

/// `keyholder egress`: the owner's control over where each credential may be sent.
#[derive(Debug, Clone, Args)]
pub struct EgressArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: EgressAction,
}

/// `keyholder egress` subcommands (each takes effect at once, also on a running server).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum EgressAction {
    /// Show a service's egress policy (mode, pinned origin, allowlist, pinned token URL).
    Show {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The service (credential key).
        service: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Allow origins (`https://host[:port]`) or host patterns (`api.example.com`, `*.example.com`)
    /// for the service's proxied calls and token endpoints (minting, e.g. a GitHub Enterprise
    /// host), in every mode; or `--any` (mode `any`).
    Allow {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The service (credential key).
        service: String,
        /// Origins or host patterns to add.
        entries: Vec<String>,
        /// Allow any destination the SSRF guard allows (mode `any`).
        #[arg(long, conflicts_with = "entries")]
        any: bool,
    },
    /// Set the mode: `known` (default: the built-in catalogue for the credential's shape plus
    /// allowed entries), `pinned` (the first call with a credential pins its origin), `allowlist`
    /// (allowed entries only) or `any`.
    Set {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The service (credential key).
        service: String,
        /// The mode.
        #[arg(long)]
        mode: EgressMode,
    },
    /// Back to the default: `known`, no allowed entries, no pin, no pinned OAuth token URL.
    Reset {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// The service (credential key).
        service: String,
    },
    /// List refused (service, origin) pairs, with how often and when last, to allow with
    /// `keyholder egress allow SERVICE ORIGIN`.
    Pending {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `keyholder egress pending`: the refusals recorded so far.
pub fn egress_pending(data: &DataArgs) -> anyhow::Result<Vec<egress::PendingEgress>> {
    block(async {
        let owner = Owner::open_or_create(data).await?;
        Ok(egress::list_pending(owner.storage()).await?)
    })
}

/// Runs an egress subcommand; returns the policy in force afterwards and whether to print JSON.
pub fn egress(args: &EgressArgs) -> anyhow::Result<(EgressPolicy, bool)> {
    let (data, service) = match &args.action {
        EgressAction::Show { data, service, .. }
        | EgressAction::Allow { data, service, .. }
        | EgressAction::Set { data, service, .. }
        | EgressAction::Reset { data, service } => (data, service),
        EgressAction::Pending { .. } => {
            anyhow::bail!("`egress pending` lists refusals: use cli::egress_pending")
        }
    };
    validate_key(service)?;
    block(async {
        let owner = Owner::open_or_create(data).await?;
        let storage = owner.storage();
        // Every change bumps the owner generation: a running server drops its cached policy on
        // its next look (within a quarter second).
        let (change, policy, json) = match &args.action {
            EgressAction::Show { json, .. } => {
                (None, egress::load_policy(storage, service).await?, *json)
            }
            EgressAction::Allow { entries, any, .. } => {
                let (change, policy) = egress::allow(storage, service, entries, *any).await?;
                (Some(change), policy, false)
            }
            EgressAction::Set { mode, .. } => {
                let (change, policy) = egress::set_mode(storage, service, *mode).await?;
                (Some(change), policy, false)
            }
            EgressAction::Reset { .. } => {
                let (change, policy) = egress::reset(service);
                (Some(change), policy, false)
            }
            EgressAction::Pending { .. } => anyhow::bail!("not a policy change"),
        };
        if let Some(change) = change {
            storage.apply(change).await?;
        }
        Ok((policy, json))
    })
}

/// Runs `keyholder egress` and prints the policy in force afterwards (or the refusals).
pub fn execute(args: &EgressArgs) -> anyhow::Result<ExitCode> {
    if let EgressAction::Pending { data, json } = &args.action {
        let json = *json;
        let pending = egress_pending(data)?;
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
        return Ok(ExitCode::SUCCESS);
    }
    let (policy, json) = egress(args)?;
    if json {
        println!("{}", serde_json::to_string(&policy)?);
    } else {
        let mode = serde_json::to_value(policy.mode)?;
        println!("Service:       {}", policy.service);
        println!("Mode:          {}", mode.as_str().unwrap_or_default());
        if policy.pins.is_empty() {
            println!(
                "Pins:          {}",
                if policy.mode == EgressMode::Pinned {
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
    Ok(ExitCode::SUCCESS)
}
