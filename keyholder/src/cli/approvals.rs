//! `keyholder approvals`, `approve` and `deny`: the uses a custody policy holds for the owner's
//! approval, and the owner's decision on one.

use std::process::ExitCode;

use clap::Args;

use super::session::{block, Owner};
use crate::config::DataArgs;
use crate::policy;
use crate::policy::approvals::PendingApproval;
use crate::storage::{ChangeSet, Check, Write};

/// Flags of `keyholder approvals`.
#[derive(Debug, Clone, Args)]
pub struct ApprovalsArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `keyholder approve` and `keyholder deny`.
#[derive(Debug, Clone, Args)]
pub struct DecideArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// The approval id (from `keyholder approvals`).
    pub id: String,
}

/// `keyholder approvals`: the uses waiting for the owner.
pub fn approvals(args: &ApprovalsArgs) -> anyhow::Result<Vec<PendingApproval>> {
    block(async {
        let owner = Owner::open(&args.data).await?;
        Ok(policy::approvals::list_pending(owner.storage(), crate::clock::now_unix()).await?)
    })
}

/// `keyholder approve ID` / `keyholder deny ID`.
pub fn decide(args: &DecideArgs, approve: bool) -> anyhow::Result<String> {
    let id = args.id.trim().to_string();
    let verb = if approve { "approve" } else { "deny" };
    block(async {
        let owner = Owner::open(&args.data).await?;
        let now = crate::clock::now_unix();
        // The waiting server picks the decision up with the owner generation.
        let change = ChangeSet::owner()
            .check(Check::ApprovalPending(id.clone(), now))
            .write(Write::DecideApproval {
                id: id.clone(),
                approve,
                now,
            });
        if owner.change(verb, &id, change).await?.is_err() {
            anyhow::bail!("no pending approval '{id}' (unknown, already decided or expired)");
        }
        let done = if approve { "approved" } else { "denied" };
        Ok(format!("{id} {done}"))
    })
}

/// One line per pending approval for the terminal.
pub fn approval_line(p: &PendingApproval, now: i64) -> String {
    format!(
        "{}  service={} agent={} client={} endpoint={} policy={} age={}s (denied in {}s)",
        p.id,
        p.service,
        if p.agent.is_empty() { "-" } else { &p.agent },
        if p.client.is_empty() { "-" } else { &p.client },
        p.endpoint,
        p.policy,
        (now - p.created_at).max(0),
        (p.expires_at - now).max(0)
    )
}

/// Runs `keyholder approvals` and lists the held uses (or JSON).
pub fn execute_list(args: &ApprovalsArgs) -> anyhow::Result<ExitCode> {
    let pending = approvals(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&pending)?);
    } else if pending.is_empty() {
        println!("No uses waiting for approval.");
    } else {
        let now = crate::clock::now_unix();
        for p in &pending {
            println!("{}", approval_line(p, now));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `keyholder approve` (`approve = true`) or `keyholder deny` and prints the decision.
pub fn execute_decide(args: &DecideArgs, approve: bool) -> anyhow::Result<ExitCode> {
    println!("{}", decide(args, approve)?);
    Ok(ExitCode::SUCCESS)
}
