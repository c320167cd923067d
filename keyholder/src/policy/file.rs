//! `serve --policy-file FILE`: policies and attachments declared in TOML, for owners who keep
//! configuration in git. At start the file's policies replace those the previous file declared
//! (source `file`), in one transaction with an owner-generation bump; policies made with the CLI
//! stay, and a name used by both is refused. The CLI shows which came from the file and refuses to
//! change them (edit the file instead).
//!
//! ```toml
//! [[policy]]
//! name = "office"
//! agents = ["agent_ci"]
//! hours = ["Mon-Fri 08:00-18:00"]
//! time-zone = "Europe/Berlin"
//! max-uses = 200
//! per = "day"
//! attach = { agents = ["agent_ci"], services = ["github"] }
//! ```

use std::path::Path;

use crate::storage::{AttachmentRow, ChangeSet, Check, Storage, Write};

use serde::Deserialize;

use super::{put_policy, Delivery, Per, Rules, TargetKind};
use crate::vault::VaultError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    policy: Vec<FilePolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Attach {
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    proxies: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FilePolicy {
    name: String,
    delivery: Option<String>,
    #[serde(default)]
    hours: Vec<String>,
    time_zone: Option<String>,
    #[serde(default)]
    client_ip: Vec<String>,
    rate: Option<String>,
    max_uses: Option<u64>,
    per: Option<String>,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    geo: Vec<String>,
    #[serde(default)]
    approval: bool,
    approval_timeout: Option<u64>,
    #[serde(default)]
    attach: Attach,
}

impl FilePolicy {
    fn rules(&self) -> Result<Rules, VaultError> {
        let bad = |text: String| VaultError::Invalid(format!("policy '{}': {text}", self.name));
        Ok(Rules {
            delivery: self.delivery.as_deref().map(Delivery::parse).transpose()?,
            hours: self.hours.clone(),
            time_zone: self.time_zone.clone(),
            client_ip: self.client_ip.clone(),
            rate: self.rate.clone(),
            max_uses: self.max_uses,
            per: match self.per.as_deref() {
                None => None,
                Some("day") => Some(Per::Day),
                Some("total") => Some(Per::Total),
                Some(other) => return Err(bad(format!("per '{other}': expected day or total"))),
            },
            agents: self.agents.clone(),
            geo: self
                .geo
                .iter()
                .map(|g| g.trim().to_ascii_uppercase())
                .collect(),
            approval: self.approval,
            approval_timeout: self.approval_timeout,
        })
    }
}

/// One declared policy: its name, rules and the targets it attaches to.
pub type Declared = (String, Rules, Vec<(TargetKind, String)>);

/// Reads and validates the file (every policy compiled), naming what is wrong.
pub fn read(path: &Path) -> Result<Vec<Declared>, VaultError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| VaultError::Invalid(format!("{}: {e}", path.display())))?;
    let file: PolicyFile = toml::from_str(&text)
        .map_err(|e| VaultError::Invalid(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for p in file.policy {
        let rules = p.rules()?;
        rules
            .compile()
            .map_err(|e| VaultError::Invalid(format!("policy '{}': {e}", p.name)))?;
        let mut targets = Vec::new();
        targets.extend(
            p.attach
                .services
                .iter()
                .map(|s| (TargetKind::Service, s.clone())),
        );
        targets.extend(
            p.attach
                .agents
                .iter()
                .map(|s| (TargetKind::Agent, s.clone())),
        );
        targets.extend(
            p.attach
                .proxies
                .iter()
                .map(|s| (TargetKind::Proxy, s.clone())),
        );
        if out.iter().any(|(n, _, _)| n == &p.name) {
            return Err(VaultError::Invalid(format!(
                "policy '{}' declared twice",
                p.name
            )));
        }
        out.push((p.name, rules, targets));
    }
    Ok(out)
}

/// The change that replaces the file-declared policies and attachments with `declared` (one
/// transaction, checked against the policies as read).
pub async fn apply(storage: &dyn Storage, declared: &[Declared]) -> Result<ChangeSet, VaultError> {
    let stored = super::load_policies(storage).await?;
    let source_of = |name: &str| {
        stored
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.source.clone())
    };
    let mut change = ChangeSet::owner().write(Write::DeleteAttachmentsOf("file".into()));
    for old in stored.iter().filter(|p| p.source == "file") {
        if !declared.iter().any(|(n, _, _)| *n == old.name) {
            change = change
                .check(Check::PolicyExists(old.name.clone(), true))
                .write(Write::DeletePolicy(old.name.clone()));
        }
    }
    for (name, rules, targets) in declared {
        let source = source_of(name);
        if source.as_deref() == Some("cli") {
            return Err(VaultError::Invalid(format!(
                "policy '{name}' is declared in the policy file and was also made with the CLI; \
                 delete one of them"
            )));
        }
        let put = put_policy(name, rules, source.is_none(), "file")?;
        change.checks.extend(put.checks);
        change.writes.extend(put.writes);
        for (kind, target) in targets {
            change = change.write(Write::ReplaceAttachment(AttachmentRow {
                policy: name.clone(),
                kind: kind.as_str().to_string(),
                target: target.clone(),
                source: "file".into(),
            }));
        }
    }
    Ok(change)
}
