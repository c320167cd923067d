//! `keyholder policy ...`: the owner's custody policies (create, update, delete, list, show,
//! attach, detach). Each change is one transaction with an owner entry in the audit trail and an
//! owner-generation bump, so a running server applies it within a quarter second.

use std::process::ExitCode;

use clap::{ArgGroup, Args, Subcommand};
use serde::Serialize;

use super::session::{block, Owner};
use crate::config::DataArgs;
use crate::policy::{self, Attachment, Delivery, Per, Rules, StoredPolicy, TargetKind};
use crate::storage::{ChangeSet, Check, Storage};

/// `keyholder policy`.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: PolicyAction,
}

/// The rules of a policy (all must hold).
#[derive(Debug, Clone, Default, Args)]
pub struct RuleArgs {
    /// `inject-only` (only `/v1/proxy` uses the credential; never handed out) or `hand-out`.
    #[arg(long, value_name = "MODE")]
    pub delivery: Option<String>,
    /// An allowed window such as 'Mon-Fri 08:00-18:00' (repeat for several).
    #[arg(long, value_name = "WINDOW")]
    pub hours: Vec<String>,
    /// IANA time zone of --hours and of daily caps (default UTC).
    #[arg(long, value_name = "IANA")]
    pub time_zone: Option<String>,
    /// Allowed client addresses or networks (the agent's; the platform's for /v1/proxy).
    #[arg(long, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    pub client_ip: Vec<String>,
    /// Uses per target: N/s, N/min or N/h.
    #[arg(long, value_name = "N/UNIT")]
    pub rate: Option<String>,
    /// Usage cap (durable across restarts and crashes).
    #[arg(long, value_name = "N")]
    pub max_uses: Option<u64>,
    /// What --max-uses counts over: day or total (default total).
    #[arg(long, value_name = "day|total")]
    pub per: Option<String>,
    /// Allowed agent ids (the ticket's aid).
    #[arg(long, value_name = "AID[,AID]", value_delimiter = ',')]
    pub agents: Vec<String>,
    /// Allowed client countries (ISO codes; needs `serve --geoip-db`).
    #[arg(long, value_name = "CC[,CC]", value_delimiter = ',')]
    pub geo: Vec<String>,
    /// Each use waits (held open) for the owner's `keyholder approve ID`.
    #[arg(long)]
    pub approval: bool,
    /// Seconds a use waits for approval before it is denied (default 60).
    #[arg(long, value_name = "SECS")]
    pub approval_timeout: Option<u64>,
}

impl RuleArgs {
    /// Lays the given flags over `base` (a rule not given keeps its value).
    fn apply(&self, mut base: Rules) -> anyhow::Result<Rules> {
        if let Some(d) = &self.delivery {
            base.delivery = Some(Delivery::parse(d)?);
        }
        if !self.hours.is_empty() {
            base.hours = self.hours.clone();
        }
        if let Some(tz) = &self.time_zone {
            base.time_zone = Some(tz.clone());
        }
        if !self.client_ip.is_empty() {
            base.client_ip = self
                .client_ip
                .iter()
                .map(|s| s.trim().to_string())
                .collect();
        }
        if let Some(r) = &self.rate {
            base.rate = Some(r.clone());
        }
        if let Some(n) = self.max_uses {
            base.max_uses = Some(n);
        }
        if let Some(per) = &self.per {
            base.per = Some(match per.as_str() {
                "day" => Per::Day,
                "total" => Per::Total,
                other => anyhow::bail!("--per '{other}': expected day or total"),
            });
        }
        if !self.agents.is_empty() {
            base.agents = self.agents.iter().map(|s| s.trim().to_string()).collect();
        }
        if !self.geo.is_empty() {
            base.geo = self
                .geo
                .iter()
                .map(|s| s.trim().to_ascii_uppercase())
                .collect();
        }
        if self.approval {
            base.approval = true;
        }
        if let Some(secs) = self.approval_timeout {
            base.approval_timeout = Some(secs);
        }
        Ok(base)
    }
}

/// What a policy attaches to (exactly one).
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("target").required(true).multiple(false)))]
pub struct TargetArgs {
    /// A service (credential key).
    #[arg(long, group = "target")]
    pub service: Option<String>,
    /// An agent id (the ticket's aid).
    #[arg(long, group = "target")]
    pub agent: Option<String>,
    /// A proxy config id (the ticket's pid).
    #[arg(long, group = "target")]
    pub proxy: Option<String>,
}

impl TargetArgs {
    fn target(&self) -> anyhow::Result<(TargetKind, String)> {
        match (&self.service, &self.agent, &self.proxy) {
            (Some(s), None, None) => Ok((TargetKind::Service, s.clone())),
            (None, Some(a), None) => Ok((TargetKind::Agent, a.clone())),
            (None, None, Some(p)) => Ok((TargetKind::Proxy, p.clone())),
            _ => anyhow::bail!("give exactly one of --service, --agent, --proxy"),
        }
    }
}

/// `keyholder policy` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum PolicyAction {
    /// Create a policy (its rules all must hold).
    Create {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Policy name.
        name: String,
        /// Rules.
        #[command(flatten)]
        rules: RuleArgs,
    },
    /// Change rules of a policy (rules not given keep their value).
    Update {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Policy name.
        name: String,
        /// Rules.
        #[command(flatten)]
        rules: RuleArgs,
    },
    /// Delete a policy with its attachments and counts.
    Delete {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Policy name.
        name: String,
    },
    /// List policies with their attachments and counts.
    List {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one policy.
    Show {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Policy name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Attach a policy to a service, an agent id or a proxy config.
    Attach {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Policy name.
        name: String,
        /// The target.
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Detach a policy.
    Detach {
        /// Data folder and master key.
        #[command(flatten)]
        data: DataArgs,
        /// Policy name.
        name: String,
        /// The target.
        #[command(flatten)]
        target: TargetArgs,
    },
}

/// A durable usage count.
#[derive(Debug, Clone, Serialize)]
pub struct UsageView {
    /// `service:S`, `agent:A` or `proxy:P`.
    pub target: String,
    /// `total` or the local date.
    pub period: String,
    /// Uses counted.
    pub count: u64,
}

/// A policy as the CLI shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    /// The policy.
    #[serde(flatten)]
    pub policy: StoredPolicy,
    /// Where it is attached.
    pub attachments: Vec<Attachment>,
    /// Its durable usage counts.
    pub usage: Vec<UsageView>,
}

impl PolicyView {
    /// Text lines for the terminal.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "{} (from {})",
            self.policy.name,
            if self.policy.source == "file" {
                "the policy file"
            } else {
                "the CLI"
            }
        )];
        let rules = self.policy.rules.describe();
        if rules.is_empty() {
            out.push("  rules: (none)".into());
        }
        out.extend(rules.into_iter().map(|r| format!("  rule: {r}")));
        if self.attachments.is_empty() {
            out.push("  attached to: (nothing)".into());
        }
        out.extend(self.attachments.iter().map(|a| {
            format!(
                "  attached to: {} {}{}",
                a.kind.as_str(),
                a.target,
                if a.source == "file" {
                    " (from the policy file)"
                } else {
                    ""
                }
            )
        }));
        out.extend(
            self.usage
                .iter()
                .map(|u| format!("  uses: {} {} = {}", u.target, u.period, u.count)),
        );
        out
    }
}

/// What a policy command printed.
pub enum PolicyOutcome {
    /// A confirmation line.
    Done(String),
    /// Policies to show.
    Views(Vec<PolicyView>, bool),
}

/// Every policy with attachments and counts (also for `keyholder status`).
pub async fn views(storage: &dyn Storage) -> anyhow::Result<Vec<PolicyView>> {
    let attachments = policy::load_attachments(storage).await?;
    let mut out = Vec::new();
    for p in policy::load_policies(storage).await? {
        let usage = policy::usage_of(storage, &p.name)
            .await?
            .into_iter()
            .map(|(target, period, count)| UsageView {
                target,
                period,
                count,
            })
            .collect();
        out.push(PolicyView {
            attachments: attachments
                .iter()
                .filter(|a| a.policy == p.name)
                .cloned()
                .collect(),
            usage,
            policy: p,
        });
    }
    Ok(out)
}

/// Runs a policy subcommand.
pub fn run(args: &PolicyArgs) -> anyhow::Result<PolicyOutcome> {
    match &args.action {
        PolicyAction::List { data, json } => block(async {
            let owner = Owner::open(data).await?;
            Ok(PolicyOutcome::Views(views(owner.storage()).await?, *json))
        }),
        PolicyAction::Show { data, name, json } => block(async {
            let owner = Owner::open(data).await?;
            let view = views(owner.storage())
                .await?
                .into_iter()
                .find(|v| &v.policy.name == name)
                .ok_or_else(|| anyhow::anyhow!("no policy '{name}'"))?;
            Ok(PolicyOutcome::Views(vec![view], *json))
        }),
        PolicyAction::Create { data, name, rules } => {
            let rules = rules.apply(Rules::default())?;
            block(async {
                let owner = Owner::open(data).await?;
                let change = policy::put_policy(name, &rules, true, "cli")?;
                if apply(&owner, "policy create", name, change).await?.is_err() {
                    return Err(policy::policy_exists(name).into());
                }
                Ok(PolicyOutcome::Done(format!("policy '{name}' created")))
            })
        }
        PolicyAction::Update { data, name, rules } => block(async {
            let owner = Owner::open(data).await?;
            let current = policy::load_policies(owner.storage())
                .await?
                .into_iter()
                .find(|p| &p.name == name)
                .ok_or_else(|| anyhow::anyhow!("no policy '{name}'"))?;
            if current.source == "file" {
                anyhow::bail!("policy '{name}' comes from the policy file (serve --policy-file): edit the file");
            }
            let next = rules.apply(current.rules)?;
            let change = policy::put_policy(name, &next, false, "cli")?
                .check(Check::PolicyExists(name.clone(), true));
            if apply(&owner, "policy update", name, change).await?.is_err() {
                anyhow::bail!("no policy '{name}'");
            }
            Ok(PolicyOutcome::Done(format!("policy '{name}' updated")))
        }),
        PolicyAction::Delete { data, name } => block(async {
            let owner = Owner::open(data).await?;
            if policy::load_policies(owner.storage())
                .await?
                .iter()
                .any(|p| &p.name == name && p.source == "file")
            {
                anyhow::bail!("policy '{name}' comes from the policy file (serve --policy-file): edit the file");
            }
            let change = policy::delete_policy(name).check(Check::PolicyExists(name.clone(), true));
            if apply(&owner, "policy delete", name, change).await?.is_err() {
                anyhow::bail!("no policy '{name}'");
            }
            Ok(PolicyOutcome::Done(format!("policy '{name}' deleted")))
        }),
        PolicyAction::Attach { data, name, target } => {
            let (kind, target) = target.target()?;
            block(async {
                let owner = Owner::open(data).await?;
                let change = policy::set_attachment(name, kind, &target, true)?;
                if apply(&owner, "policy attach", name, change).await?.is_err() {
                    return Err(policy::no_policy(name).into());
                }
                Ok(PolicyOutcome::Done(format!(
                    "policy '{name}' attached to {} {target}",
                    kind.as_str()
                )))
            })
        }
        PolicyAction::Detach { data, name, target } => {
            let (kind, target) = target.target()?;
            block(async {
                let owner = Owner::open(data).await?;
                if policy::load_attachments(owner.storage())
                    .await?
                    .iter()
                    .any(|a| {
                        &a.policy == name
                            && a.kind == kind
                            && a.target == target
                            && a.source == "file"
                    })
                {
                    anyhow::bail!("this attachment comes from the policy file (serve --policy-file): edit the file");
                }
                let not_attached = || {
                    anyhow::anyhow!(
                        "policy '{name}' is not attached to {} {target}",
                        kind.as_str()
                    )
                };
                let change = policy::set_attachment(name, kind, &target, false)?
                    // Nothing to detach: nothing written (and no audit entry).
                    .check(Check::AttachmentIs(
                        name.clone(),
                        kind.as_str().to_string(),
                        target.clone(),
                        true,
                    ));
                match apply(&owner, "policy detach", name, change).await? {
                    Ok(_) => {}
                    Err(0) => return Err(policy::no_policy(name).into()),
                    Err(_) => return Err(not_attached()),
                }
                Ok(PolicyOutcome::Done(format!(
                    "policy '{name}' detached from {} {target}",
                    kind.as_str()
                )))
            })
        }
    }
}

/// Applies a policy change with its owner entry (detail `policy NAME`); `Err(i)`: check `i`
/// failed and nothing was written.
async fn apply(
    owner: &Owner,
    command: &str,
    name: &str,
    change: ChangeSet,
) -> anyhow::Result<Result<Vec<bool>, usize>> {
    owner
        .change(command, &format!("policy {name}"), change)
        .await
}

/// Runs `keyholder policy` and prints the change made or the policies (or JSON).
pub fn execute(args: &PolicyArgs) -> anyhow::Result<ExitCode> {
    match run(args)? {
        PolicyOutcome::Done(line) => println!("{line}"),
        PolicyOutcome::Views(views, true) => {
            if matches!(args.action, PolicyAction::Show { .. }) {
                if let Some(view) = views.first() {
                    println!("{}", serde_json::to_string(view)?);
                }
            } else {
                println!("{}", serde_json::to_string(&views)?);
            }
        }
        PolicyOutcome::Views(views, false) => {
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
    Ok(ExitCode::SUCCESS)
}
