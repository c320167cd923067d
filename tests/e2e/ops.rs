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
    keyholder::cli::backup::backup(&keyholder::cli::backup::BackupArgs {
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
    // The folder and the database; SQLite's -wal and -shm files take the database's mode, and
    // whether they exist at this moment depends on who last closed the database.
    assert!((2..=4).contains(&perms.len()), "{perms:#?}");
    assert!(
        perms
            .iter()
            .all(|f| f.remedy == format!("chmod 0700 {}", dir.display())
                || f.remedy.starts_with(&format!(
                    "chmod 0600 {}",
                    dir.join("keyholder.db").display()
                ))),
        "{perms:#?}"
    );
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
            // SQLite removes its -wal and -shm files when the last connection closes.
            if Path::new(path).exists() {
                chmod(Path::new(path), u32::from_str_radix(mode, 8).unwrap());
            }
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
            "keyholder egress allow --data-dir {} --master-key-file {} github {}",
            kh.data_dir.display(),
            keys.path().join("master.key").display(),
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

// ---------------------------------------------------------------------------------------------
// The master key sealed by a PKCS#11 token (SoftHSM2)

use keyholder::vault::pkcs11::Pkcs11Config;

const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const USER_PIN: &str = "274913";

/// A SoftHSM2 token store in a temporary folder (`SOFTHSM2_CONF` points at its configuration).
struct SoftHsm {
    dir: PathBuf,
    conf: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl SoftHsm {
    /// `None` (with the reason printed) only when SoftHSM2 is not installed here.
    fn new() -> Option<SoftHsm> {
        let util = std::process::Command::new("softhsm2-util")
            .arg("--version")
            .output();
        if !Path::new(SOFTHSM_MODULE).exists() || util.is_err() {
            println!(
                "SKIPPED: SoftHSM2 is not installed ({SOFTHSM_MODULE} or softhsm2-util missing; \
                 `apt-get install softhsm2`, which .ci/run does)"
            );
            return None;
        }
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().to_path_buf();
        let tokens = dir.join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .unwrap();
        Some(SoftHsm {
            dir,
            conf,
            _temp: Some(temp),
        })
    }

    /// The token store a parent test process made (see the test below).
    fn at(dir: PathBuf) -> SoftHsm {
        SoftHsm {
            conf: dir.join("softhsm2.conf"),
            dir,
            _temp: None,
        }
    }

    /// `softhsm2-util --init-token` with `label`.
    fn init_token(&self, label: &str) {
        let out = std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", USER_PIN, "--so-pin", "99887766"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Generates an AES-256 key `label` inside token `token` (the key never leaves the token).
    fn generate_aes_key(&self, token: &str, label: &str, extractable: bool) {
        use cryptoki::context::{CInitializeArgs, Pkcs11};
        use cryptoki::mechanism::Mechanism;
        use cryptoki::object::Attribute;
        use cryptoki::session::UserType;
        use cryptoki::types::AuthPin;
        let ctx = Pkcs11::new(SOFTHSM_MODULE).unwrap();
        ctx.initialize(CInitializeArgs::OsThreads).unwrap();
        let slot = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label().trim() == token)
            .unwrap();
        let session = ctx.open_rw_session(slot).unwrap();
        session
            .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
            .unwrap();
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(!extractable),
                    Attribute::Extractable(extractable),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::ValueLen(32.into()),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
            )
            .unwrap();
        drop(session);
        ctx.finalize();
    }

    fn pin_file(&self, name: &str, pin: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, format!("{pin}\n")).unwrap();
        path
    }

    fn config(&self, uri: &str, pin_file: Option<PathBuf>) -> Pkcs11Config {
        Pkcs11Config {
            uri: uri.into(),
            module: Some(SOFTHSM_MODULE.into()),
            pin_file,
        }
    }
}

async fn start_err(config: Config) -> String {
    match keyholder::start(config).await {
        Ok(server) => {
            server.stop().await;
            panic!("the server started")
        }
        Err(e) => format!("{e:#}"),
    }
}

fn all_bytes_of(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            all.extend(std::fs::read(path).unwrap());
        }
    }
    all
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

const PKCS11_TEST: &str =
    "ops::pkcs11_master_key_in_softhsm2_start_store_restart_refusals_and_rotation";
const CHILD_ENV: &str = "KEYHOLDER_TEST_SOFTHSM_DIR";

/// SoftHSM2 is configured by the process environment (`SOFTHSM2_CONF`) and is one library per
/// process (`C_Initialize` is global), so this test runs its scenarios, in sequence, in a child
/// process of this test binary that has its own environment from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_master_key_in_softhsm2_start_store_restart_refusals_and_rotation() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        return pkcs11_scenarios(SoftHsm::at(dir.into())).await;
    }
    let Some(hsm) = SoftHsm::new() else { return };
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", PKCS11_TEST, "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env(CHILD_ENV, &hsm.dir)
        .env_remove("KEYHOLDER_PKCS11_PIN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child test failed:\n{stdout}\n{stderr}"
    );
}

async fn pkcs11_scenarios(hsm: SoftHsm) {
    hsm.init_token("keyholder");
    hsm.init_token("other");
    hsm.generate_aes_key("keyholder", "kh-master", false);
    hsm.generate_aes_key("other", "kh-master", false);
    hsm.generate_aes_key("keyholder", "weak", true);
    let uri = "pkcs11:token=keyholder;object=kh-master;type=secret-key";
    let pin = hsm.pin_file("pin", USER_PIN);
    let sealed = hsm.config(uri, Some(pin.clone()));

    // Start on a new folder, bind, store; nothing key-like is written to the folder.
    let data = tempfile::tempdir().unwrap();
    let mut config = Keyholder::config_in(data.path());
    config.master_key = MasterKeySource::Pkcs11(sealed.clone());
    let mut kh = Keyholder::start_config(config.clone()).await;
    kh.bind().await;
    const SECRET: &str = "gho_sealed_by_the_hsm_4711";
    assert_eq!(
        kh.store("github", json!({"accessToken": SECRET}))
            .await
            .status,
        200
    );
    assert_eq!(
        kh.credential("github").await.json()["token"]["accessToken"],
        SECRET
    );

    // Restart: the token is asked again and the credential is there.
    kh.restart().await;
    assert_eq!(
        kh.credential("github").await.json()["token"]["accessToken"],
        SECRET
    );
    kh.stop().await;
    assert!(!data.path().join("master.key").exists());
    let folder = all_bytes_of(data.path());
    assert!(!contains(&folder, SECRET.as_bytes()));

    // The PIN from KEYHOLDER_PKCS11_PIN instead of a file.
    std::env::set_var("KEYHOLDER_PKCS11_PIN", USER_PIN);
    let mut env_pin = config.clone();
    env_pin.master_key = MasterKeySource::Pkcs11(hsm.config(uri, None));
    keyholder::start(env_pin.clone())
        .await
        .unwrap()
        .stop()
        .await;
    std::env::remove_var("KEYHOLDER_PKCS11_PIN");
    let err = start_err(env_pin).await;
    assert!(err.contains("no PIN for the PKCS#11 token"), "{err}");

    // A wrong PIN refuses to start, saying so.
    let mut wrong = config.clone();
    wrong.master_key =
        MasterKeySource::Pkcs11(hsm.config(uri, Some(hsm.pin_file("wrong", "000000"))));
    let err = start_err(wrong).await;
    assert!(err.contains("refused the PIN (CKR_PIN_INCORRECT)"), "{err}");

    // A missing token refuses too, naming the tokens that are there.
    let mut missing = config.clone();
    missing.master_key = MasterKeySource::Pkcs11(
        hsm.config("pkcs11:token=gone;object=kh-master", Some(pin.clone())),
    );
    let err = start_err(missing).await;
    assert!(
        err.contains("no PKCS#11 token matches pkcs11:token=gone"),
        "{err}"
    );
    assert!(err.contains("'keyholder'"), "{err}");
    // ... and so does a missing module.
    let mut no_module = config.clone();
    no_module.master_key = MasterKeySource::Pkcs11(Pkcs11Config {
        module: Some("/nonexistent/libpkcs11.so".into()),
        ..sealed.clone()
    });
    let err = start_err(no_module).await;
    assert!(err.contains("cannot be loaded"), "{err}");

    // Another token with a key of the same name does not open it.
    let mut other = config.clone();
    other.master_key = MasterKeySource::Pkcs11(
        hsm.config("pkcs11:token=other;object=kh-master", Some(pin.clone())),
    );
    let err = start_err(other).await;
    assert!(
        err.contains("does not open this data folder's master key"),
        "{err}"
    );

    // An extractable key is refused (its value could leave the token).
    let weak_dir = tempfile::tempdir().unwrap();
    let mut weak = Keyholder::config_in(weak_dir.path());
    weak.master_key = MasterKeySource::Pkcs11(
        hsm.config("pkcs11:token=keyholder;object=weak", Some(pin.clone())),
    );
    let err = start_err(weak).await;
    assert!(err.contains("extractable"), "{err}");

    // A copy of the data folder and everything else but the token reveals nothing: it does not
    // start without the token (with the data-folder default or any key file), and no byte of
    // the credential is in it.
    let copy = tempfile::tempdir().unwrap();
    for name in ["keyholder.db", "keyholder.db-wal"] {
        if data.path().join(name).exists() {
            std::fs::copy(data.path().join(name), copy.path().join(name)).unwrap();
        }
    }
    let mut plain = Keyholder::config_in(copy.path());
    plain.master_key = MasterKeySource::DataFolder;
    let err = start_err(plain.clone()).await;
    assert!(err.contains("sealed by a PKCS#11 token"), "{err}");
    assert!(!copy.path().join("master.key").exists());
    let guess = hsm.dir.join("guess.key");
    std::fs::write(&guess, [0u8; 32]).unwrap();
    plain.master_key = MasterKeySource::File(guess);
    let err = start_err(plain).await;
    assert!(err.contains("sealed by a PKCS#11 token"), "{err}");

    // rotate-master-key --from-pkcs11 URI --new-master-key-file F: off the token...
    let key_file = hsm.dir.join("master.key");
    std::fs::write(&key_file, [5u8; 32]).unwrap();
    let mut data_args = kh.data_args();
    data_args.pkcs11.master_key_pkcs11 = None; // named by --from-pkcs11 instead
    let from = keyholder::cli::rotate_master_key::RotateMasterKeyArgs {
        data: data_args.clone(),
        new_master_key_file: Some(key_file.clone()),
        new_passphrase_file: None,
        to_pkcs11: None,
        from_pkcs11: Some(uri.into()),
    };
    keyholder::cli::rotate_master_key::rotate_master_key(&from).unwrap();
    let mut on_file = config.clone();
    on_file.master_key = MasterKeySource::File(key_file.clone());
    let err = start_err(config.clone()).await;
    assert!(err.contains("not in a PKCS#11 token"), "{err}");
    let mut kh_file = Keyholder::start_config(on_file.clone()).await;
    kh_file.secret = kh
        .secret
        .as_ref()
        .map(|s| keyholder_protocol::HmacSecret::from_bytes(*s.expose()));
    assert_eq!(
        kh_file.credential("github").await.json()["token"]["accessToken"],
        SECRET
    );
    kh_file.stop().await;

    // ... and back with --to-pkcs11 URI: the key file no longer opens the folder.
    let to = keyholder::cli::rotate_master_key::RotateMasterKeyArgs {
        data: keyholder::config::DataArgs {
            master_key_file: Some(key_file.clone()),
            ..data_args
        },
        new_master_key_file: None,
        new_passphrase_file: None,
        to_pkcs11: Some(uri.into()),
        from_pkcs11: None,
    };
    keyholder::cli::rotate_master_key::rotate_master_key(&to).unwrap();
    let err = start_err(on_file).await;
    assert!(err.contains("sealed by a PKCS#11 token"), "{err}");
    kh.restart().await;
    assert_eq!(
        kh.credential("github").await.json()["token"]["accessToken"],
        SECRET
    );

    // Owner commands open it through the token as well; doctor has nothing to say about the key.
    let (report, _) = doctor_argv(
        &[
            "doctor",
            "--data-dir",
            data.path().to_str().unwrap(),
            "--master-key-pkcs11",
            uri,
            "--pkcs11-module",
            SOFTHSM_MODULE,
            "--pkcs11-pin-file",
            pin.to_str().unwrap(),
            "--min-free-mb",
            "1",
        ]
        .map(String::from),
    )
    .await;
    assert!(
        report.passed.iter().any(|p| p == "master_key_location"),
        "{report:#?}"
    );
    assert!(
        report.passed.iter().any(|p| p == "audit_chain"),
        "{report:#?}"
    );
    kh.stop().await;
}

// ---------------------------------------------------------------------------------------------
// OpenTelemetry traces

use keyholder_protocol::paths::{
    HEADER_PLATFORM_REQUEST_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, PATH_PROXY,
};
use keyholder_protocol::Purpose;

/// All spans the collector received, flattened: (span JSON, its resource's service.name).
fn received_spans(collector: &MockServer) -> Vec<(serde_json::Value, String)> {
    let mut spans = Vec::new();
    for request in collector.requests() {
        // Protobuf (the default), read into the JSON form of the same messages.
        assert_eq!(
            request.header("content-type"),
            Some("application/x-protobuf"),
            "OTLP/HTTP export is protobuf by default"
        );
        let Ok(decoded) = <opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest as prost::Message>::decode(request.body.as_slice()) else {
            continue;
        };
        let Ok(body) = serde_json::to_value(&decoded) else {
            continue;
        };
        for rs in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or("")
                .to_string();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for span in ss["spans"].as_array().into_iter().flatten() {
                    spans.push((span.clone(), service.clone()));
                }
            }
        }
    }
    spans
}

fn attr(span: &serde_json::Value, key: &str) -> Option<String> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| {
            let v = &a["value"];
            v["stringValue"]
                .as_str()
                .map(str::to_string)
                .or_else(|| v["intValue"].as_str().map(str::to_string))
                .or_else(|| v["intValue"].as_i64().map(|i| i.to_string()))
                .unwrap_or_else(|| v.to_string())
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_traces_spans_per_request_with_children_traceparent_in_and_out_and_no_secret() {
    let collector = MockServer::start(|_| Reply::json(200, json!({}))).await;
    let settings = keyholder::telemetry::OtlpSettings {
        traces_url: collector.url("/v1/traces"),
        service_name: "keyholder-e2e".into(),
        export_interval: std::time::Duration::from_millis(100),
        json: false,
    };
    tokio::task::spawn_blocking(move || keyholder::telemetry::init_traces_only(&settings))
        .await
        .unwrap()
        .unwrap();
    assert!(keyholder::telemetry::enabled());

    let mut kh = Keyholder::start_with(|c| c.egress_allow_private = true).await;
    let hmac = kh.bind().await;
    let upstream = MockServer::ok().await;
    const SECRET: &str = "gho_traced_but_never_in_a_span_8861";
    assert_eq!(
        kh.store("github", json!({"accessToken": SECRET}))
            .await
            .status,
        200
    );
    kh.egress("allow", "github", &[&upstream.origin()], false)
        .await;
    // A custody policy on the service, so its check is a span too.
    crate::policy::policy(&kh, "create local --client-ip 127.0.0.0/8")
        .await
        .unwrap();
    crate::policy::policy(&kh, "attach local --service github")
        .await
        .unwrap();

    // The platform's proxied call, part of its trace.
    let trace_id = keyholder_tests::random_hex(16);
    let parent_span = keyholder_tests::random_hex(8);
    let traceparent = format!("00-{trace_id}-{parent_span}-01");
    let mut claims = kh.claims(Purpose::Proxy, "github");
    claims.aid = Some("agent_traced".into());
    claims.pid = Some("proxy_traced".into());
    let ticket = kh.ticket_from(&claims);
    let request_id = format!("req_{}", keyholder_tests::random_hex(12));
    let raw = serde_json::to_vec(&json!({
        "ticket": ticket,
        "service": "github",
        "upstream": {"url": upstream.url("/user"), "method": "GET"},
        "headerTemplates": {"Authorization": "Bearer ${TOKEN}"},
        "requestId": request_id,
    }))
    .unwrap();
    let ts = keyholder_tests::now();
    let answer = kh
        .http
        .post(kh.url(PATH_PROXY))
        .header("content-type", "application/json")
        .header(
            HEADER_SIGNATURE,
            keyholder_protocol::signing::signature_header_value(&hmac, ts, &raw),
        )
        .header(HEADER_TIMESTAMP, ts.to_string())
        .header(HEADER_PLATFORM_REQUEST_ID, &request_id)
        .header("traceparent", &traceparent)
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    // An agent's credential fetch (the ticket rides in the query).
    let agent_ticket = kh.ticket(Purpose::AgentCredential, "github");
    assert_eq!(
        kh.credential_with(&agent_ticket, "github").await.status,
        200
    );
    // A request in a trace the platform did not sample: answered, and nothing of it exported.
    let unsampled = keyholder_tests::random_hex(16);
    let url = reqwest::Url::parse_with_params(
        &kh.url(keyholder_protocol::paths::PATH_CREDENTIAL),
        &[
            (
                "ticket",
                kh.ticket(Purpose::AgentCredential, "github").as_str(),
            ),
            ("service", "github"),
        ],
    )
    .unwrap();
    let answer = kh
        .http
        .get(url)
        .header(
            "traceparent",
            format!("00-{unsampled}-{}-00", keyholder_tests::random_hex(8)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    // The upstream got the trace context, as a child of the platform's trace.
    let sent = upstream.requests();
    let upstream_tp = sent[0]
        .header("traceparent")
        .expect("traceparent sent upstream")
        .to_string();
    let parts: Vec<&str> = upstream_tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{upstream_tp}");
    assert_eq!(parts[1], trace_id);
    assert_ne!(parts[2], parent_span);

    // Wait for the exporter.
    let mut spans = Vec::new();
    for _ in 0..100 {
        tokio::task::spawn_blocking(keyholder::telemetry::flush)
            .await
            .unwrap();
        spans = received_spans(&collector);
        let names: Vec<String> = spans
            .iter()
            .filter(|(s, _)| s["traceId"].as_str() == Some(trace_id.as_str()))
            .map(|(s, _)| s["name"].as_str().unwrap_or("").to_string())
            .collect();
        if [
            "POST /v1/proxy",
            "ticket.verify",
            "policy",
            "credential.decrypt",
            "egress.policy",
            "upstream.call",
            "db.group_commit",
        ]
        .iter()
        .all(|n| names.iter().any(|m| m == n))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let in_trace: Vec<&serde_json::Value> = spans
        .iter()
        .filter(|(s, _)| s["traceId"].as_str() == Some(trace_id.as_str()))
        .map(|(s, _)| s)
        .collect();
    let by_name = |name: &str| {
        *in_trace
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no span {name} in {in_trace:#?}"))
    };
    let server = by_name("POST /v1/proxy");
    assert_eq!(server["parentSpanId"].as_str(), Some(parent_span.as_str()));
    assert_eq!(attr(server, "http.route").as_deref(), Some("/v1/proxy"));
    assert_eq!(
        attr(server, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(server, "request_id").as_deref(),
        Some(request_id.as_str())
    );
    assert_eq!(attr(server, "agent_id").as_deref(), Some("agent_traced"));
    assert_eq!(attr(server, "proxy_id").as_deref(), Some("proxy_traced"));
    assert!(spans.iter().all(|(_, service)| service == "keyholder-e2e"));
    let server_id = server["spanId"].as_str().unwrap();
    // Every child is below the request span (directly or through the handler's spans).
    let parent_of = |s: &serde_json::Value| s["parentSpanId"].as_str().unwrap_or("").to_string();
    let descends = |s: &serde_json::Value| {
        let mut at = parent_of(s);
        for _ in 0..10 {
            if at == server_id {
                return true;
            }
            match in_trace
                .iter()
                .find(|p| p["spanId"].as_str() == Some(at.as_str()))
            {
                Some(p) => at = parent_of(p),
                None => return false,
            }
        }
        false
    };
    for name in [
        "ticket.verify",
        "policy",
        "credential.decrypt",
        "egress.policy",
        "upstream.call",
        "db.group_commit",
    ] {
        assert!(
            descends(by_name(name)),
            "{name} is not under the request span"
        );
    }
    assert_eq!(by_name("upstream.call")["spanId"].as_str(), Some(parts[2]));
    assert!(
        spans
            .iter()
            .all(|(s, _)| s["traceId"].as_str() != Some(unsampled.as_str())),
        "an unsampled trace was exported"
    );
    // The agent's request is its own trace, with its route pattern.
    assert!(spans.iter().any(|(s, _)| s["name"] == "GET /v1/credential"
        && attr(s, "http.route").as_deref() == Some("/v1/credential")));

    // No secret, ticket or credential in anything the collector received.
    let everything: Vec<u8> = collector
        .requests()
        .into_iter()
        .flat_map(|r| r.body)
        .collect();
    let hmac_b64 =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, hmac.expose());
    for needle in [
        SECRET,
        ticket.as_str(),
        agent_ticket.as_str(),
        hmac_b64.as_str(),
    ] {
        assert!(
            !contains(&everything, needle.as_bytes()),
            "{needle} reached the collector"
        );
    }
    // Nor the ticket's signature part alone.
    let sig = ticket.rsplit('.').next().unwrap();
    assert!(!contains(&everything, sig.as_bytes()));
    kh.stop().await;
}
