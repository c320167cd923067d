//! Operating it like infrastructure: the systemd unit, `keyholder doctor`, the PKCS#11 master key
//! and OpenTelemetry traces.

use std::path::{Path, PathBuf};

use clap::{Args, FromArgMatches};
use keyholder::config::{Config, ServeArgs};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

const UNIT: &str = "contrib/systemd/keyholder.service";

/// The unit's `ExecStart=` arguments after `keyholder serve`, with systemd's `${STATE_DIRECTORY}` and
/// `%d` (the credentials directory) replaced by `state` and `creds`.
fn unit_exec_args(unit: &str, state: &Path, creds: &Path) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart= line");
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/keyholder"));
    assert_eq!(words.next(), Some("serve"));
    words
        .map(|a| {
            a.replace("${STATE_DIRECTORY}", state.to_str().unwrap())
                .replace("%d", creds.to_str().unwrap())
        })
        .collect()
}

fn unit_directives(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[tokio::test]
async fn systemd_unit_is_hardened_and_its_command_line_serves_with_the_credential() {
    let unit = std::fs::read_to_string(repo_file(UNIT)).unwrap();
    let directives = unit_directives(&unit);
    let has = |k: &str, v: &str| directives.iter().any(|(dk, dv)| dk == k && dv == v);
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("StateDirectory", "keyholder"),
        ("LoadCredential", "master-key:/etc/keyholder/master.key"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert!(has(k, v), "{k}={v} missing from {UNIT}");
    }

    // The unit's own command line, with what systemd would substitute: the server reads the
    // master key from the credentials directory and keeps nothing but the database in the state
    // directory (no master.key is created there).
    let state = tempfile::tempdir().unwrap();
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(
        creds.path().join("master-key"),
        "dGhpcyBpcyBhIDMyIGJ5dGUgbWFzdGVyIGtleSEhISE=\n",
    )
    .unwrap();
    let mut args = vec!["serve".to_string()];
    args.extend(unit_exec_args(&unit, state.path(), creds.path()));
    args.extend(["--listen".into(), "127.0.0.1:0".into()]);
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    let matches = command.try_get_matches_from(&args).unwrap();
    let serve = ServeArgs::from_arg_matches(&matches).unwrap();
    let mut config = Config::from_args(&serve).unwrap();
    config.handle_signals = false;
    let server = keyholder::start(config).await.unwrap();
    let health = reqwest::get(format!("{}/v1/health", server.url()))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    server.stop().await;
    assert!(state.path().join("keyholder.db").exists());
    assert!(!state.path().join("master.key").exists());

    // `systemd-analyze` (when installed) accepts the unit and rates its exposure "OK" (< 2.0; the
    // figure recorded in contrib/systemd/README.md).
    if let Ok(out) = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(repo_file(UNIT))
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let level = text
            .lines()
            .find_map(|l| l.split("exposure level for keyholder.service: ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no exposure level in: {text}"));
        assert!(level < 2.0, "exposure {level}");
    } else {
        println!("systemd-analyze not installed: exposure level not checked");
    }
}

// ---------------------------------------------------------------------------------------------
// `keyholder doctor`

use keyholder::cli::doctor::{DoctorArgs, DoctorReport};
use keyholder::vault::master::MasterKeySource;
use keyholder_tests::certs::TestCert;
use keyholder_tests::upstream::{MockServer, Reply};
use keyholder_tests::Keyholder;
use serde_json::json;

#[cfg(unix)]
fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `keyholder doctor ARGS...` as typed by the owner (parsed by the real flag definitions), on
/// `kh`'s data folder with its master-key flags; returns the report and the exit code.
async fn doctor(kh: &Keyholder, extra: &[&str]) -> (DoctorReport, u8) {
    let mut argv = vec![
        "doctor".to_string(),
        "--data-dir".into(),
        kh.data_dir.display().to_string(),
    ];
    if let MasterKeySource::File(path) = &kh.config.master_key {
        argv.extend(["--master-key-file".into(), path.display().to_string()]);
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    doctor_argv(&argv).await
}

async fn doctor_argv(argv: &[String]) -> (DoctorReport, u8) {
    let matches = DoctorArgs::augment_args(clap::Command::new("doctor"))
        .try_get_matches_from(argv)
        .unwrap();
    let args = DoctorArgs::from_arg_matches(&matches).unwrap();
    let report = keyholder::cli::doctor::doctor(&args).await.unwrap();
    // The JSON form (--json) carries the same report.
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["ok"], report.ok);
    assert_eq!(
        json["findings"].as_array().unwrap().len(),
        report.findings.len()
    );
    let code = if report.ok { 0 } else { 1 };
    (report, code)
}

fn checks(report: &DoctorReport) -> Vec<&str> {
    report.findings.iter().map(|f| f.check.as_str()).collect()
}

fn finding<'a>(report: &'a DoctorReport, check: &str) -> &'a keyholder::cli::doctor::Finding {
    report
        .findings
        .iter()
        .find(|f| f.check == check)
        .unwrap_or_else(|| panic!("no {check} finding in {:#?}", report.findings))
}

/// A keyholder with its master key in a 0400 file outside the data folder.
async fn keyholder_with_key_outside(keys: &Path) -> Keyholder {
    let key = keys.join("master.key");
    std::fs::write(&key, [9u8; 32]).unwrap();
    chmod(&key, 0o400);
    Keyholder::start_with(|c| {
        c.master_key = MasterKeySource::File(key.clone());
        c.egress_allow_private = true;
    })
    .await
}

fn backup(kh: &Keyholder, out: &Path) {
    keyholder::cli::owner::backup(&keyholder::cli::owner::BackupArgs {
        data: kh.data_args(),
        out: out.to_path_buf(),
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_finds_nothing_on_a_good_setup_and_exits_0() {
    let keys = tempfile::tempdir().unwrap();
    let mut kh = keyholder_with_key_outside(keys.path()).await;
    kh.bind().await;
    let upstream = MockServer::ok().await;
    assert_eq!(
        kh.store("github", json!({"accessToken": "gho_doc"}))
            .await
            .status,
        200
    );
    kh.egress("allow", "github", &[&upstream.origin()], false)
        .await;
    assert_eq!(
        kh.proxy_get("github", &upstream.url("/user")).await.status,
        200
    );
    let cert_dir = tempfile::tempdir().unwrap();
    let tls = TestCert::valid_for_days("doctor", 90).write(cert_dir.path(), "");
    kh.stop().await; // the audit recorder flushes
    backup(&kh, &keys.path().join("backup.db"));
    let (report, code) = doctor(
        &kh,
        &[
            "--tls-cert",
            tls.cert.to_str().unwrap(),
            "--min-free-mb",
            "1",
        ],
    )
    .await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert_eq!(code, 0);
    for check in [
        "master_key_location",
        "data_folder_permissions",
        "key_file_permissions",
        "public_url_https",
        "bound",
        "tls_certificate",
        "policy_attached",
        "egress_entry_used",
        "backup_age",
        "audit_chain",
        "disk_space",
    ] {
        assert!(
            report.passed.iter().any(|p| p == check),
            "{check} not passed: {report:#?}"
        );
    }
    assert!(report.to_text().contains("Nothing to fix."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_each_problem_with_its_remedy_and_the_remedies_fix_them() {
    // The weak default: master.key inside the data folder, loose modes, unbound, no backup.
    let mut kh = Keyholder::start_with(|c| c.egress_allow_private = true).await;
    let dir = kh.data_dir.clone();
    kh.stop().await;
    chmod(&dir, 0o755);
    chmod(&dir.join("keyholder.db"), 0o644);
    chmod(&dir.join("master.key"), 0o644);
    let cert_dir = tempfile::tempdir().unwrap();
    let tls = TestCert::valid_for_days("doctor", 5).write(cert_dir.path(), "");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (report, code) = doctor(
        &kh,
        &[
            "--tls-cert",
            tls.cert.to_str().unwrap(),
            "--public-url",
            &closed_url,
            "--probe",
            "--min-free-mb",
            "1",
        ],
    )
    .await;
    assert_eq!(code, 1);
    let text = report.to_text();
    let loc = finding(&report, "master_key_location");
    assert!(loc.message.contains("master.key"), "{loc:?}");
    assert!(
        loc.remedy.contains("keyholder rotate-master-key"),
        "{loc:?}"
    );
    let perms: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.check == "data_folder_permissions")
        .collect();
    assert_eq!(perms.len(), 2, "{perms:#?}");
    assert!(perms
        .iter()
        .any(|f| f.remedy == format!("chmod 0700 {}", dir.display())));
    assert!(perms
        .iter()
        .any(|f| f.remedy == format!("chmod 0600 {}", dir.join("keyholder.db").display())));
    assert_eq!(
        finding(&report, "key_file_permissions").remedy,
        format!("chmod 0400 {}", dir.join("master.key").display())
    );
    assert!(finding(&report, "public_url_https")
        .message
        .contains("not https"));
    assert!(finding(&report, "public_url_reachable")
        .message
        .contains("cannot be reached"));
    assert!(finding(&report, "bound").remedy.contains("keyholder bind"));
    assert!(finding(&report, "tls_certificate")
        .message
        .contains("within 21 days"));
    assert!(finding(&report, "backup_age")
        .remedy
        .contains("keyholder backup"));
    assert!(text.contains("FAIL bound:"), "{text}");

    // Apply the remedies as printed (chmod, bind, backup) and ask again.
    for f in &report.findings {
        if let Some(args) = f.remedy.strip_prefix("chmod ") {
            let (mode, path) = args.split_once(' ').unwrap();
            chmod(Path::new(path), u32::from_str_radix(mode, 8).unwrap());
        }
    }
    kh.restart().await;
    kh.bind().await;
    kh.stop().await;
    let backups = tempfile::tempdir().unwrap();
    backup(&kh, &backups.path().join("backup.db"));
    let (after, _) = doctor(&kh, &["--min-free-mb", "1"]).await;
    assert_eq!(
        checks(&after),
        vec!["master_key_location"],
        "{:#?}",
        after.findings
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_finds_unused_egress_entries_orphan_policies_old_backups_tampering_and_low_disk() {
    let keys = tempfile::tempdir().unwrap();
    let mut kh = keyholder_with_key_outside(keys.path()).await;
    kh.bind().await;
    let upstream = MockServer::ok().await;
    assert_eq!(
        kh.store("github", json!({"accessToken": "gho_doc"}))
            .await
            .status,
        200
    );
    kh.egress(
        "allow",
        "github",
        &[&upstream.origin(), "api.unused.example"],
        false,
    )
    .await;
    kh.egress("allow", "nobody", &["api.nobody.example"], false)
        .await;
    assert_eq!(
        kh.proxy_get("github", &upstream.url("/user")).await.status,
        200
    );
    kh.stop().await;
    backup(&kh, &keys.path().join("backup.db"));
    let (report, _) = doctor(&kh, &["--min-free-mb", "1"]).await;
    let unused: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.check == "egress_entry_used")
        .collect();
    assert_eq!(unused.len(), 2, "{unused:#?}"); // github's unused entry and nobody's only one
    let gh = unused
        .iter()
        .find(|f| f.message.contains("'github'"))
        .unwrap();
    assert!(gh.message.contains("api.unused.example"), "{gh:?}");
    assert!(
        gh.remedy.contains(&format!(
            "keyholder egress allow --data-dir {} github {}",
            kh.data_dir.display(),
            upstream.origin()
        )),
        "{gh:?}"
    );
    let orphan = finding(&report, "policy_attached");
    assert!(orphan.message.contains("'nobody'"), "{orphan:?}");
    assert_eq!(
        report
            .findings
            .iter()
            .filter(|f| f.check == "policy_attached")
            .count(),
        1
    );
    assert_eq!(checks(&report).len(), 3, "{:#?}", report.findings);

    // The remedy for the orphan policy clears it.
    kh.egress("reset", "nobody", &[], false).await;
    let (report, _) = doctor(&kh, &["--min-free-mb", "1"]).await;
    assert_eq!(checks(&report), vec!["egress_entry_used"]);

    // A backup older than --backup-max-age-days.
    let db = rusqlite::Connection::open(kh.data_dir.join("keyholder.db")).unwrap();
    db.execute(
        "UPDATE settings SET value = ?1 WHERE name = 'last_backup_at'",
        [(keyholder_tests::now() - 10 * 86_400).to_string()],
    )
    .unwrap();
    let (report, _) = doctor(&kh, &["--min-free-mb", "1", "--backup-max-age-days", "30"]).await;
    assert!(!checks(&report).contains(&"backup_age"));
    let (report, _) = doctor(&kh, &["--min-free-mb", "1", "--backup-max-age-days", "7"]).await;
    assert!(finding(&report, "backup_age")
        .message
        .contains("10 days old"));

    // Less free space than wanted.
    let (report, _) = doctor(&kh, &["--min-free-mb", "1000000000"]).await;
    assert!(finding(&report, "disk_space").message.contains("MiB free"));

    // A changed audit entry.
    db.execute_batch("UPDATE audit_log SET result = 'ok', agent_id = 'forged' WHERE seq = 2")
        .unwrap();
    let (report, code) = doctor(&kh, &["--min-free-mb", "1"]).await;
    assert_eq!(code, 1);
    assert!(finding(&report, "audit_chain").message.contains("entry 2"));

    // A wrong master key is a finding too, not a crash.
    let wrong = keys.path().join("wrong.key");
    std::fs::write(&wrong, [1u8; 32]).unwrap();
    chmod(&wrong, 0o400);
    let argv: Vec<String> = [
        "doctor",
        "--data-dir",
        kh.data_dir.to_str().unwrap(),
        "--master-key-file",
        wrong.to_str().unwrap(),
        "--min-free-mb",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (report, _) = doctor_argv(&argv).await;
    assert!(finding(&report, "master_key")
        .message
        .contains("does not open"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_probe_reaches_an_https_public_url_and_measures_clock_skew() {
    // The keyholder itself over https, trusted through --probe-ca: reachable, clock in step.
    let cert_dir = tempfile::tempdir().unwrap();
    let cert = TestCert::valid_for_days("127.0.0.1", 30);
    let tls = cert.write(cert_dir.path(), "");
    let files = tls.clone();
    let kh = Keyholder::start_with(move |c| c.tls = Some(files)).await;
    let public = kh.base.clone();
    assert!(public.starts_with("https://127.0.0.1:"));
    let (report, _) = doctor(
        &kh,
        &[
            "--public-url",
            &public,
            "--probe",
            "--probe-ca",
            tls.cert.to_str().unwrap(),
        ],
    )
    .await;
    for check in ["public_url_https", "public_url_reachable", "clock_skew"] {
        assert!(
            report.passed.iter().any(|p| p == check),
            "{check}: {report:#?}"
        );
    }
    // Without the CA the same URL is not reachable (the certificate is not trusted).
    let (report, _) = doctor(&kh, &["--public-url", &public, "--probe"]).await;
    assert!(finding(&report, "public_url_reachable")
        .message
        .contains("cannot be reached"));

    // A server whose clock is an hour ahead.
    let ahead = httpdate::fmt_http_date(
        std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
    );
    let skewed = MockServer::start(move |_| {
        Reply::json(200, json!({"status": "healthy"})).header("Date", &ahead)
    })
    .await;
    let (report, _) = doctor(&kh, &["--public-url", &skewed.url(""), "--probe"]).await;
    let skew = finding(&report, "clock_skew");
    assert!(
        skew.message.contains("differ by 3599 s")
            || skew.message.contains("differ by 3600 s")
            || skew.message.contains("differ by 3598 s"),
        "{skew:?}"
    );
    assert!(skew.remedy.contains("NTP"));
    assert!(skewed.count() >= 1);
    // A server answering 503.
    let sick = MockServer::start(|_| Reply::text(503, "no")).await;
    let (report, _) = doctor(&kh, &["--public-url", &sick.url(""), "--probe"]).await;
    assert!(finding(&report, "public_url_reachable")
        .message
        .contains("503"));
}
