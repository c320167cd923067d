//! `keyholder doctor`: checks a setup and says what to fix, each finding with the exact remedy.
//! Read-only on the data folder (it opens the database like every owner command, and unlocks the
//! key ring only to verify the audit trail). Exit code 0 only when nothing is wrong.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::audit::AuditFilter;
use crate::config::{validate_url, DataArgs};
use crate::storage::{Setting, Storage};
use crate::vault::egress;
use crate::vault::master::MasterKeySource;

/// The setting recording when `keyholder backup` last wrote a snapshot (unix seconds).
pub const LAST_BACKUP_SETTING: &str = "last_backup_at";
/// A TLS certificate expiring within this many days is a finding.
pub const CERT_WARN_DAYS: u32 = 21;
/// Clock skew against the public URL's `Date` header above this is a finding (tickets and signed
/// requests tolerate `MAX_CLOCK_SKEW_SECS`; this leaves room before they fail).
pub const MAX_SKEW_SECS: i64 = 60;

/// Flags of `keyholder doctor`.
#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// Data folder and master key.
    #[command(flatten)]
    pub data: DataArgs,
    /// Public URL to check (default: the one `serve --public-url` remembered).
    #[arg(long, env = "KEYHOLDER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// The server's certificate (as `serve --tls-cert`): checked for expiry.
    #[arg(long, env = "KEYHOLDER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Also reach the public URL from here: health answer and clock skew against its Date header.
    #[arg(long)]
    pub probe: bool,
    /// PEM certificate to trust (besides the system's roots) for the probe: a private CA.
    #[arg(long, requires = "probe")]
    pub probe_ca: Option<PathBuf>,
    /// A backup older than this many days (or none at all) is a finding.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub backup_max_age_days: u32,
    /// Less free space than this (MiB) where the database lives is a finding (also less than
    /// twice the database's size).
    #[arg(long, default_value_t = 512)]
    pub min_free_mb: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One thing wrong, what it means and the exact command or change that fixes it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// Stable identifier of the check (for monitoring).
    pub check: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub remedy: String,
}

/// What `keyholder doctor` found.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DoctorReport {
    /// True when nothing is wrong.
    pub ok: bool,
    /// Everything wrong.
    pub findings: Vec<Finding>,
    /// Checks that ran and found nothing.
    pub passed: Vec<String>,
    /// Checks that did not run, and why.
    pub skipped: Vec<String>,
}

impl DoctorReport {
    fn finding(&mut self, check: &str, message: impl Into<String>, remedy: impl Into<String>) {
        self.findings.push(Finding {
            check: check.into(),
            message: message.into(),
            remedy: remedy.into(),
        });
    }

    fn pass(&mut self, check: &str) {
        if !self.findings.iter().any(|f| f.check == check)
            && !self.passed.iter().any(|p| p == check)
        {
            self.passed.push(check.into());
        }
    }

    fn skip(&mut self, check: &str, why: &str) {
        self.skipped.push(format!("{check}: {why}"));
    }

    /// Text for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&format!(
                "FAIL {}: {}\n     fix: {}\n",
                f.check, f.message, f.remedy
            ));
        }
        for p in &self.passed {
            out.push_str(&format!("ok   {p}\n"));
        }
        for s in &self.skipped {
            out.push_str(&format!("skip {s}\n"));
        }
        if self.ok {
            out.push_str("Nothing to fix.\n");
        } else {
            out.push_str(&format!("{} finding(s).\n", self.findings.len()));
        }
        out
    }
}

fn shell(path: &Path) -> String {
    let text = path.display().to_string();
    if text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@%".contains(c))
    {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

#[cfg(unix)]
fn mode_of(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

#[cfg(not(unix))]
fn mode_of(_path: &Path) -> Option<u32> {
    None
}

/// Runs every check. Only `--probe` sends anything over the network (to the public URL).
pub async fn doctor(args: &DoctorArgs) -> anyhow::Result<DoctorReport> {
    let mut report = DoctorReport::default();
    let data_dir = &args.data.data_dir;
    let dir = shell(data_dir);

    // `--data-dir DIR` plus the master-key flags this run was given, for remedies that are owner
    // commands needing the key.
    let with_key = format!("{dir}{}", key_flags(&args.data));
    check_master_key_location(&mut report, args, &dir);
    check_permissions(&mut report, args, &dir);
    // Opened after the permission checks: opening makes the database file owner-only.
    let storage = super::session::open_storage(data_dir, false)?;
    let repos = storage.as_ref();
    let public_url = check_public_url(&mut report, args, repos).await?;
    if args.probe {
        match &public_url {
            Some(url) => probe(&mut report, url, args.probe_ca.as_deref()).await,
            None => {
                report.skip("public_url_reachable", "no public URL known");
                report.skip("clock_skew", "no public URL known");
            }
        }
    } else {
        report.skip("public_url_reachable", "pass --probe");
        report.skip("clock_skew", "pass --probe");
    }
    check_bound(&mut report, repos, &with_key).await?;
    check_certificate(&mut report, args);
    check_egress(&mut report, repos, &with_key).await?;
    check_backup(&mut report, args, repos, &dir).await?;
    check_audit(&mut report, args, &dir).await;
    storage.close();
    check_disk(&mut report, args);
    report.ok = report.findings.is_empty();
    Ok(report)
}

/// The master-key flags of `data`, as they would be typed (with a leading space), or nothing.
fn key_flags(data: &DataArgs) -> String {
    match data.master_key_source() {
        MasterKeySource::DataFolder => String::new(),
        MasterKeySource::File(path) => format!(" --master-key-file {}", shell(&path)),
        MasterKeySource::Passphrase(path) => format!(" --passphrase-file {}", shell(&path)),
        MasterKeySource::Pkcs11(config) => {
            let mut flags = format!(
                " --master-key-pkcs11 '{}'",
                config.uri.replace('\'', "'\\''")
            );
            if let Some(module) = &config.module {
                flags.push_str(&format!(" --pkcs11-module {}", shell(module)));
            }
            if let Some(pin) = &config.pin_file {
                flags.push_str(&format!(" --pkcs11-pin-file {}", shell(pin)));
            }
            flags
        }
    }
}

fn check_master_key_location(report: &mut DoctorReport, args: &DoctorArgs, dir: &str) {
    let check = "master_key_location";
    let data_dir = &args.data.data_dir;
    let inside = |path: &Path| -> bool {
        match (std::fs::canonicalize(path), std::fs::canonicalize(data_dir)) {
            (Ok(file), Ok(folder)) => file.starts_with(folder),
            _ => false,
        }
    };
    let remedy = format!(
        "make a key outside the data folder and move the key ring to it: \
         `install -d -m 0700 /etc/keyholder && head -c 32 /dev/urandom | base64 > /etc/keyholder/master.key && chmod 0400 /etc/keyholder/master.key && \
         keyholder rotate-master-key --data-dir {dir}{} --new-master-key-file /etc/keyholder/master.key`, \
         then start with --master-key-file /etc/keyholder/master.key and delete the old key file",
        key_flags(&args.data)
    );
    match args.data.master_key_source() {
        MasterKeySource::DataFolder => report.finding(
            check,
            format!(
                "the master key is the file {}/{} inside the data folder: a copy of the folder (or of a backup next to it) opens every credential",
                dir,
                crate::vault::master::DEFAULT_MASTER_KEY_FILE
            ),
            remedy,
        ),
        MasterKeySource::File(path) | MasterKeySource::Passphrase(path) if inside(&path) => {
            report.finding(
                check,
                format!(
                    "the master key file {} is inside the data folder: a copy of the folder opens every credential",
                    shell(&path)
                ),
                remedy,
            )
        }
        MasterKeySource::File(_)
        | MasterKeySource::Passphrase(_)
        | MasterKeySource::Pkcs11(_) => report.pass(check),
    }
}

fn check_permissions(report: &mut DoctorReport, args: &DoctorArgs, dir: &str) {
    let data_dir = &args.data.data_dir;
    let check = "data_folder_permissions";
    if let Some(mode) = mode_of(data_dir) {
        if mode & 0o077 != 0 {
            report.finding(
                check,
                format!("the data folder {dir} has mode {mode:04o}: other users can look inside"),
                format!("chmod 0700 {dir}"),
            );
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        let path = data_dir.join(format!("{}{suffix}", crate::store::DATABASE_FILE));
        if let Some(mode) = mode_of(&path) {
            if mode & 0o077 != 0 {
                report.finding(
                    check,
                    format!(
                        "{} has mode {mode:04o}: other users can read the (wrapped) key ring and the credentials",
                        shell(&path)
                    ),
                    format!("chmod 0600 {}", shell(&path)),
                );
            }
        }
    }
    report.pass(check);

    let check = "key_file_permissions";
    let key_file = match args.data.master_key_source() {
        MasterKeySource::File(path) | MasterKeySource::Passphrase(path) => Some(path),
        MasterKeySource::DataFolder => {
            Some(data_dir.join(crate::vault::master::DEFAULT_MASTER_KEY_FILE))
        }
        // The token's key cannot be read; its PIN file can.
        MasterKeySource::Pkcs11(config) => config.pin_file,
    };
    let what = if matches!(args.data.master_key_source(), MasterKeySource::Pkcs11(_)) {
        "the PKCS#11 PIN file"
    } else {
        "the master key file"
    };
    match key_file {
        Some(path) if path.exists() => {
            if let Some(mode) = mode_of(&path) {
                if mode & 0o077 != 0 {
                    report.finding(
                        check,
                        format!(
                            "{what} {} has mode {mode:04o}: other users can read it",
                            shell(&path)
                        ),
                        format!("chmod 0400 {}", shell(&path)),
                    );
                }
            }
            report.pass(check);
        }
        Some(path) => report.finding(
            check,
            format!("{what} {} does not exist", shell(&path)),
            "pass --master-key-file / --passphrase-file naming the file the server starts with",
        ),
        None => report.pass(check),
    }
}

async fn check_public_url(
    report: &mut DoctorReport,
    args: &DoctorArgs,
    storage: &dyn Storage,
) -> anyhow::Result<Option<String>> {
    let check = "public_url_https";
    let url = match &args.public_url {
        Some(url) => Some(url.clone()),
        None => storage.setting(Setting::PublicUrl).await?,
    };
    let Some(url) = url else {
        report.finding(
            check,
            "no public URL known: bind links cannot be made",
            "start with `keyholder serve --public-url https://<host>` (or set KEYHOLDER_PUBLIC_URL)",
        );
        return Ok(None);
    };
    let parsed = match validate_url("--public-url", &url).map(|u| url::Url::parse(&u)) {
        Ok(Ok(parsed)) => parsed,
        _ => {
            report.finding(
                check,
                format!("the public URL '{url}' is not an absolute http(s) URL"),
                "start with `keyholder serve --public-url https://<host>` (or set KEYHOLDER_PUBLIC_URL)",
            );
            return Ok(None);
        }
    };
    if parsed.scheme() != "https" {
        report.finding(
            check,
            format!("the public URL {url} is not https: the platform's tickets and the owner's bind page would travel in clear"),
            "serve https (`--tls-cert`/`--tls-key`) or put a TLS tunnel / reverse proxy in front, then start with `keyholder serve --public-url https://<host>`",
        );
    }
    report.pass(check);
    Ok(Some(url.trim_end_matches('/').to_string()))
}

async fn probe(report: &mut DoctorReport, base: &str, ca: Option<&Path>) {
    let url = format!("{base}{}", keyholder_protocol::paths::PATH_HEALTH);
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = ca {
        match std::fs::read(ca)
            .map_err(|e| e.to_string())
            .and_then(|pem| reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string()))
        {
            Ok(cert) => builder = builder.add_root_certificate(cert),
            Err(e) => {
                report.finding(
                    "public_url_reachable",
                    format!("--probe-ca {}: {e}", shell(ca)),
                    "pass a PEM certificate to --probe-ca",
                );
                return;
            }
        }
    }
    let client = match builder.build() {
        Ok(client) => client,
        Err(e) => {
            report.skip("public_url_reachable", &format!("no HTTP client: {e}"));
            return;
        }
    };
    let sent = crate::clock::now_unix();
    let response = match client.get(&url).send().await {
        Ok(response) => response,
        Err(e) => {
            report.finding(
                "public_url_reachable",
                format!("{url} cannot be reached from here: {}", error_chain(&e)),
                "check DNS, the tunnel or reverse proxy, the firewall and the certificate for the public URL's host, and that `keyholder serve` is running",
            );
            report.skip("clock_skew", "the public URL did not answer");
            return;
        }
    };
    let received = crate::clock::now_unix();
    let status = response.status();
    if !status.is_success() {
        report.finding(
            "public_url_reachable",
            format!("{url} answered {status}, not a healthy keyholder"),
            "point the tunnel or reverse proxy for the public URL at `keyholder serve`, and check `keyholder status` (sealed?) and the server's log",
        );
    }
    report.pass("public_url_reachable");
    let date = response
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    match date {
        None => report.skip("clock_skew", "the answer has no valid Date header"),
        Some(at) => {
            let theirs = at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            // The Date was set between sending and receiving (1 s resolution).
            let skew = if theirs < sent {
                sent - theirs
            } else if theirs > received + 1 {
                theirs - received - 1
            } else {
                0
            };
            if skew > MAX_SKEW_SECS {
                report.finding(
                    "clock_skew",
                    format!(
                        "this machine's clock and the Date header of {url} differ by {skew} s (tickets and signed requests fail beyond {} s)",
                        keyholder_protocol::paths::MAX_CLOCK_SKEW_SECS
                    ),
                    "synchronise both clocks with NTP (`timedatectl set-ntp true`, or chrony/systemd-timesyncd) on this machine and the server's",
                );
            } else {
                report.pass("clock_skew");
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

async fn check_bound(
    report: &mut DoctorReport,
    storage: &dyn Storage,
    dir: &str,
) -> anyhow::Result<()> {
    if storage.is_bound().await? {
        report.pass("bound");
    } else {
        report.finding(
            "bound",
            "this keyholder is not bound to a platform yet: every platform call is refused",
            format!("`keyholder bind --data-dir {dir}` and open the registration link while logged in to the platform"),
        );
    }
    Ok(())
}

fn check_certificate(report: &mut DoctorReport, args: &DoctorArgs) {
    let check = "tls_certificate";
    let Some(path) = &args.tls_cert else {
        report.skip(check, "no --tls-cert (TLS ends in front of the keyholder)");
        return;
    };
    let file = shell(path);
    let certs = std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|pem| openssl::x509::X509::stack_from_pem(&pem).map_err(|e| e.to_string()));
    let leaf = match certs {
        Ok(certs) => certs.into_iter().next(),
        Err(e) => {
            report.finding(
                check,
                format!("the certificate {file} cannot be read: {e}"),
                "point --tls-cert / KEYHOLDER_TLS_CERT at the PEM certificate chain the server uses",
            );
            return;
        }
    };
    let Some(leaf) = leaf else {
        report.finding(
            check,
            format!("{file} holds no PEM certificate"),
            "point --tls-cert / KEYHOLDER_TLS_CERT at the PEM certificate chain the server uses",
        );
        return;
    };
    let expiring = openssl::asn1::Asn1Time::days_from_now(CERT_WARN_DAYS)
        .ok()
        .and_then(|limit| leaf.not_after().compare(&limit).ok())
        .map(|order| order == std::cmp::Ordering::Less);
    match expiring {
        Some(true) => report.finding(
            check,
            format!(
                "the certificate {file} expires {} (within {CERT_WARN_DAYS} days)",
                leaf.not_after()
            ),
            format!("renew it (e.g. `certbot renew`), write the new chain and key to {file} and its key file, then reload with SIGHUP (`systemctl reload keyholder` / `docker kill --signal HUP keyholder`)"),
        ),
        Some(false) => report.pass(check),
        None => report.skip(check, "the expiry date cannot be compared"),
    }
}

/// The credential services that have a stored credential.
async fn stored_services(
    storage: &dyn Storage,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    Ok(storage
        .documents(keyholder_protocol::wire::Collection::Tokens)
        .await?
        .into_iter()
        .map(|d| d.key)
        .collect())
}

async fn check_egress(
    report: &mut DoctorReport,
    storage: &dyn Storage,
    dir: &str,
) -> anyhow::Result<()> {
    let services = storage.egress_services().await?;
    let stored = stored_services(storage).await?;
    for service in &services {
        if !stored.contains(service) {
            report.finding(
                "policy_attached",
                format!("the egress policy of '{service}' belongs to no stored credential"),
                format!("`keyholder egress reset --data-dir {dir} {service}` (or store the credential it was meant for)"),
            );
        }
        // Owner entries count in every mode.
        let policy = egress::load_policy(storage, service).await?;
        let origins: Vec<String> = {
            let filter = AuditFilter {
                service: Some(service.clone()),
                ..AuditFilter::default()
            };
            let rows: std::collections::BTreeSet<String> = storage
                .audit_entries(filter)
                .await?
                .into_iter()
                .filter(|e| e.event.result == "ok" && !e.event.upstream.is_empty())
                .map(|e| e.event.upstream)
                .collect();
            // The audit trail's origins in the egress policy's form (default port written out).
            rows.into_iter()
                .map(|o| {
                    url::Url::parse(&o)
                        .ok()
                        .and_then(|u| egress::origin_of(&u).ok())
                        .unwrap_or(o)
                })
                .collect()
        };
        for entry in &policy.allowlist {
            let used = origins
                .iter()
                .any(|origin| egress::entry_matches(entry, origin));
            if !used {
                let keep: Vec<&str> = policy
                    .allowlist
                    .iter()
                    .filter(|e| *e != entry)
                    .map(String::as_str)
                    .collect();
                let remedy = if keep.is_empty() {
                    format!(
                        "if it is not needed: `keyholder egress reset --data-dir {dir} {service}`"
                    )
                } else {
                    format!(
                        "if it is not needed: `keyholder egress reset --data-dir {dir} {service} && keyholder egress allow --data-dir {dir} {service} {}`",
                        keep.join(" ")
                    )
                };
                report.finding(
                    "egress_entry_used",
                    format!("the egress entry {entry} of '{service}' never matched a successful call in the audit trail"),
                    remedy,
                );
            }
        }
    }
    report.pass("policy_attached");
    report.pass("egress_entry_used");
    Ok(())
}

async fn check_backup(
    report: &mut DoctorReport,
    args: &DoctorArgs,
    storage: &dyn Storage,
    dir: &str,
) -> anyhow::Result<()> {
    let check = "backup_age";
    let remedy = format!(
        "`keyholder backup --data-dir {dir} --out /var/backups/keyholder-$(date +%F).db` (daily, e.g. from a timer); keep the master key apart"
    );
    let last = storage
        .setting(Setting::LastBackupAt)
        .await?
        .and_then(|v| v.parse::<i64>().ok());
    let now = crate::clock::now_unix();
    let max_age = i64::from(args.backup_max_age_days) * 86_400;
    match last {
        None => report.finding(
            check,
            "no backup was ever made with `keyholder backup`",
            remedy,
        ),
        Some(at) if now.saturating_sub(at) > max_age => report.finding(
            check,
            format!(
                "the newest backup is {} days old (more than {})",
                now.saturating_sub(at) / 86_400,
                args.backup_max_age_days
            ),
            remedy,
        ),
        Some(_) => report.pass(check),
    }
    Ok(())
}

async fn check_audit(report: &mut DoctorReport, args: &DoctorArgs, dir: &str) {
    let check = "audit_chain";
    let opened = async {
        let owner = super::session::Owner::open(&args.data).await?;
        let ring = owner.ring().await?;
        Ok::<_, anyhow::Error>(
            owner
                .storage()
                .verify_audit(ring.identity().verifying_key())
                .await?,
        )
    }
    .await;
    match opened {
        Ok(verification) => match verification.problem {
            None => report.pass(check),
            Some(problem) => report.finding(
                check,
                format!(
                    "the audit trail does not verify at entry {}: {}",
                    problem.seq, problem.reason
                ),
                format!("the database was changed outside Keyholder: compare with a backup (`keyholder audit verify --data-dir {dir}` on a restored copy), find out who wrote to {dir}, and keep the evidence (`keyholder audit export`)"),
            ),
        },
        Err(e) => report.finding(
            "master_key",
            format!("the master key does not open the key ring: {e:#}"),
            "pass the --master-key-file / --passphrase-file the server starts with",
        ),
    }
}

fn check_disk(report: &mut DoctorReport, args: &DoctorArgs) {
    let check = "disk_space";
    let data_dir = &args.data.data_dir;
    let stat = match rustix::fs::statvfs(data_dir) {
        Ok(stat) => stat,
        Err(e) => {
            report.skip(check, &format!("statvfs failed: {e}"));
            return;
        }
    };
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    let db: u64 = ["", "-wal"]
        .iter()
        .filter_map(|s| {
            std::fs::metadata(data_dir.join(format!("{}{s}", crate::store::DATABASE_FILE))).ok()
        })
        .map(|m| m.len())
        .sum();
    let need = (args.min_free_mb.saturating_mul(1 << 20)).max(db.saturating_mul(2));
    if free < need {
        report.finding(
            check,
            format!(
                "{} MiB free where the database lives (it uses {} MiB; at least {} MiB wanted): a full disk stops every write",
                free >> 20,
                db >> 20,
                need >> 20
            ),
            format!("free space on the file system of {} or move the data folder to a larger one (stop the server, `keyholder backup`, `keyholder restore` into the new folder)", shell(data_dir)),
        );
    } else {
        report.pass(check);
    }
}

/// Runs `keyholder doctor` and prints the findings (or one JSON object); exit code 0 only when
/// nothing is wrong.
pub fn execute(args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(doctor(args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::from(if report.ok { 0 } else { 1 }))
}
