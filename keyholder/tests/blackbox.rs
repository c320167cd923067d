//! The built `keyholder` binary, run as a user would: `serve` on a fresh data folder, `bind`
//! while it runs, a simulated platform exchange, a browser store and an agent fetch; the logs (at
//! trace level) never hold a secret or a ticket; SIGTERM stops it cleanly; with TLS, the
//! argument-less healthcheck passes and SIGHUP reloads the certificate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod hardening;
mod harness;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyholder_protocol::paths::*;
use keyholder_protocol::ticket::encode_ticket;
use keyholder_protocol::{HmacSecret, Purpose, TicketClaims};
use serde_json::{json, Value};

use harness::{bind_json, free_port, now, owner, wait_healthy, BIN};

const SECRET: &str = "ghp_BlackBoxSecret_41c2e9";
const TOTP_SEED: &str = "KRUGS4ZANFZSAYJAORXXI4BAONSWKZDB";

#[test]
fn help_names_every_command() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in [
        "serve",
        "bind",
        "healthcheck",
        "status",
        "rotate-key",
        "rewrap",
        "retire-key",
        "rotate-master-key",
        "backup",
        "restore",
        "seal",
        "unseal",
        "audit",
        "import-reference",
        "store",
        "sign-config",
    ] {
        assert!(text.contains(cmd), "{text}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("KEYHOLDER_DATA_DIR") && text.contains("KEYHOLDER_LISTEN"),
        "{text}"
    );
}

/// `keyholder sign-config --help` and `sign-config set --help` name the subcommands and every flag
/// the issue fixes (issue 24).
#[test]
fn sign_config_help_names_its_subcommands_and_flags() {
    let out = Command::new(BIN)
        .args(["sign-config", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for sub in ["set", "list", "show", "remove"] {
        assert!(text.contains(sub), "{text}");
    }
    let out = Command::new(BIN)
        .args(["sign-config", "set", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--aws-region",
        "--aws-service",
        "--aws-unsigned-payload",
        "--aws-role-arn",
        "--iss",
        "--sub",
        "--aud",
        "--lifetime",
        "--alg",
        "--token-url",
        "--tls-ca",
    ] {
        assert!(text.contains(flag), "{flag}: {text}");
    }
    // A bad value is refused with a message, not a panic.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "sign-config",
            "set",
            "svc",
            "--aws-region",
            "Not A Region",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

/// `keyholder --version`: package version, the commit built from, protocol version. In a git checkout
/// the commit is `git rev-parse HEAD` (the build script reruns when HEAD moves).
#[test]
fn version_names_package_commit_and_protocol() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let commit = keyholder::build_info::GIT_COMMIT;
    assert_eq!(
        text,
        format!(
            "keyholder {} (commit {commit}, protocol {PROTOCOL_VERSION})\n",
            env!("CARGO_PKG_VERSION")
        )
    );
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned())
    };
    match git(&["ls-files", "--error-unmatch", "Cargo.toml"]).and(git(&["rev-parse", "HEAD"])) {
        Some(head) => assert_eq!(commit, head),
        None => assert!(
            commit == "unknown"
                || (commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
            "{commit}"
        ),
    }
}

#[test]
fn invalid_settings_name_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "nonsense"])
        .env("KEYHOLDER_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--listen"), "{err}");
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("KEYHOLDER_DATA_DIR", dir.path())
        .env("KEYHOLDER_PLATFORM_IP", "not-an-ip")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEYHOLDER_PLATFORM_IP"));
    for rate in ["0/min", "ten/min", "5/hour"] {
        let out = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--rate-limit-per-ip",
                rate,
            ])
            .env("KEYHOLDER_DATA_DIR", dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("KEYHOLDER_RATE_LIMIT_PER_IP"),
            "{rate}"
        );
    }
}

#[test]
fn serve_bind_store_fetch_as_a_user_would() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .arg("serve")
        .env("KEYHOLDER_DATA_DIR", &data)
        .env("KEYHOLDER_LISTEN", format!("127.0.0.1:{port}"))
        .env("KEYHOLDER_PUBLIC_URL", "https://kh.example.org")
        .env("KEYHOLDER_LOG", "trace")
        .env("KEYHOLDER_LOG_FORMAT", "json")
        .env("KEYHOLDER_RATE_LIMIT_PER_IP", "10000/min")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained while the server runs: a full pipe (trace level logs a lot) would block its writes.
    let mut stderr = child.stderr.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut logs = String::new();
        let _ = stderr.read_to_string(&mut logs);
        logs
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = reqwest::Client::new();
    rt.block_on(wait_healthy(&http, &base, Duration::from_secs(20), || {
        child.try_wait().unwrap().map(|s| s.to_string())
    }));

    // The owner issues a code while the server runs.
    let issued = bind_json(&data);
    let code = issued["code"].as_str().unwrap().to_string();
    assert!(issued["registrationUrl"]
        .as_str()
        .unwrap()
        .contains("webhook_url="));
    assert_eq!(issued["expiresIn"], 300);

    let ticket_secret = rt.block_on(async {
        let answer: Value = http
            .post(format!("{base}{PATH_EXCHANGE}"))
            .json(&json!({ "code": code }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let secret = HmacSecret::from_base64(answer["hmacSecret"].as_str().unwrap()).unwrap();
        let n = now();
        let store = encode_ticket(&secret, &TicketClaims::new("u", "github", Purpose::Store, n, n + 60, "n-store-1"));
        let r = http
            .post(format!("{base}{PATH_STORE}"))
            .json(&json!({"ticket": store, "service": "github", "tokenData": {"accessToken": SECRET}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let fetch = encode_ticket(&secret, &TicketClaims::new("u", "github", Purpose::AgentCredential, n, n + 60, "n-fetch-1"));
        let r: Value = http
            .get(format!("{base}{PATH_CREDENTIAL}"))
            .query(&[("ticket", fetch.as_str()), ("service", "github")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["token"]["accessToken"], SECRET);
        // Protocol 2.4.0: a totpUri link is sealed, a malformed one refused; neither reaches the log.
        for (service, link, status) in [
            ("bank", format!("otpauth://totp/Bank:me?secret={TOTP_SEED}&digits=8"), 200),
            ("bad", format!("otpauth://totp/Bank:me?secret={TOTP_SEED}&digits=9"), 400),
        ] {
            let ticket = encode_ticket(&secret, &TicketClaims::new("u", service, Purpose::Store, n, n + 60, format!("n-store-{service}")));
            let r = http
                .post(format!("{base}{PATH_STORE}"))
                .json(&json!({"ticket": ticket, "service": service, "tokenData": {"totpUri": link}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), status, "{service}");
            assert!(!r.text().await.unwrap().contains(TOTP_SEED));
        }
        let fetch_bank = encode_ticket(&secret, &TicketClaims::new("u", "bank", Purpose::AgentCredential, n, n + 60, "n-fetch-bank"));
        let r = http
            .get(format!("{base}{PATH_CREDENTIAL}"))
            .query(&[("ticket", fetch_bank.as_str()), ("service", "bank")])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(r.contains("\"totpGenerated\":true") && !r.contains(TOTP_SEED), "{r}");
        (store, fetch, secret.to_base64().to_string())
    });

    // A binding code for a bound keyholder is refused with a hint.
    let out = owner(&data)(&["bind"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rebind"));

    // The container health check agrees.
    let hc = Command::new(BIN)
        .args(["healthcheck", "--url", &format!("{base}{PATH_HEALTH}")])
        .status()
        .unwrap();
    assert!(hc.success());

    // SIGTERM: graceful stop, exit 0.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let logs = drain.join().unwrap();
    assert!(logs.contains("keyholder listening"), "{logs}");
    let (store_ticket, fetch_ticket, secret_b64) = ticket_secret;
    for needle in [
        SECRET,
        store_ticket.as_str(),
        fetch_ticket.as_str(),
        secret_b64.as_str(),
        code.as_str(),
        TOTP_SEED,
        "otpauth://",
    ] {
        assert!(!logs.contains(needle), "log leaks a secret: {needle}");
    }
}

#[test]
fn owner_commands_status_seal_and_audit_verify() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = owner(&data);
    // Owner commands never create a data folder.
    let out = run(&["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no keyholder data"));
    let out = run(&["bind", "--public-url", "https://kh.example", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run(&["seal"]).status.success());
    let out = run(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["sealed"], true);
    assert_eq!(status["bound"], false);
    assert_eq!(status["currentDataKey"], 1);
    let out = run(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK: 1 entries"));
    // Prune with an export first; what is kept still verifies from the signed prune entry.
    assert!(run(&["unseal"]).status.success());
    let archive = dir.path().join("audit-archive.jsonl");
    let prune_all = || {
        run(&[
            "audit",
            "prune",
            "--older-than-days",
            "0",
            "--export",
            archive.to_str().unwrap(),
        ])
    };
    let out = prune_all();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Pruned 2 entries (through #2)"), "{text}");
    let archived = std::fs::read_to_string(&archive).unwrap();
    let endpoints: Vec<String> = archived
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["endpoint"].to_string())
        .collect();
    assert_eq!(endpoints, ["\"owner:seal\"", "\"owner:unseal\""]);
    let out = run(&["audit", "verify", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let verified: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (verified["firstSeq"].as_u64(), verified["entries"].as_u64()),
        (Some(3), Some(1))
    );
    // The archive is never overwritten.
    let out = prune_all();
    assert!(!out.status.success());
    let out = run(&["backup", "--out", dir.path().join("b.db").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `keyholder store` as the owner types it: the secret comes on standard input, never as an
/// argument, and is neither printed nor stored in the clear.
#[test]
fn store_reads_the_secret_from_standard_input() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = owner(&data);
    let out = run(&["bind", "--public-url", "https://kh.example", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = Command::new(BIN)
        .args([
            "store",
            "github",
            "--type",
            "api_key",
            "--meta",
            "scope=repo",
            "--secret-file",
            "-",
            "--json",
        ])
        .env("KEYHOLDER_DATA_DIR", &data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{SECRET}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!printed.contains(SECRET), "{printed}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "stored");
    assert_eq!(report["meta"]["tokenType"], "api_key");
    assert_eq!(report["meta"]["scope"], "repo");
    let db = std::fs::read(data.join("keyholder.db")).unwrap();
    let wal = std::fs::read(data.join("keyholder.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "stored in the clear"
        );
    }
    let out = run(&["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["credentialCount"], 1);
    let out = run(&["audit", "list", "--json"]);
    let trail = String::from_utf8_lossy(&out.stdout);
    assert!(trail.contains("\"owner:store\""), "{trail}");
    // A secret offered as an argument is refused, naming the way to pass it.
    let out = run(&[
        "store",
        "github",
        "--meta",
        &format!("accessToken={SECRET}"),
        "--secret-file",
        "-",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--secret-file"));
}

/// A self-signed P-256 certificate for 127.0.0.1, as PEM (certificate, key), and its SHA-256.
fn self_signed() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    use openssl::{asn1::Asn1Time, ec, hash::MessageDigest, nid::Nid, pkey::PKey, x509};
    let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap();
    let mut name = x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "blackbox").unwrap();
    let name = name.build();
    let mut b = x509::X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    let san = x509::extension::SubjectAlternativeName::new()
        .ip("127.0.0.1")
        .build(&b.x509v3_context(None, None))
        .unwrap();
    b.append_extension(san).unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    let cert = b.build();
    let digest = cert.digest(MessageDigest::sha256()).unwrap().to_vec();
    (
        cert.to_pem().unwrap(),
        key.private_key_to_pem_pkcs8().unwrap(),
        digest,
    )
}

/// SHA-256 of the certificate the server presents to a new connection.
fn served_certificate(port: u16) -> Option<Vec<u8>> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut connector = SslConnector::builder(SslMethod::tls_client()).ok()?;
    connector.set_verify(SslVerifyMode::NONE);
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let stream = connector
        .build()
        .configure()
        .ok()?
        .verify_hostname(false)
        .connect("localhost", tcp)
        .ok()?;
    let cert = stream.ssl().peer_certificate()?;
    Some(
        cert.digest(openssl::hash::MessageDigest::sha256())
            .ok()?
            .to_vec(),
    )
}

#[test]
fn tls_healthcheck_and_certificate_reload_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, first) = self_signed();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    let port = free_port();
    let env = [
        ("KEYHOLDER_DATA_DIR", dir.path().join("data")),
        ("KEYHOLDER_LISTEN", format!("0.0.0.0:{port}").into()),
        ("KEYHOLDER_TLS_CERT", cert_file.clone()),
        ("KEYHOLDER_TLS_KEY", key_file.clone()),
    ];
    let mut child = Command::new(BIN)
        .arg("serve")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The container's health check: no arguments, it follows the server's own settings.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = Command::new(BIN)
            .arg("healthcheck")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "healthcheck never passed over TLS"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(served_certificate(port), Some(first));

    let (cert, key, second) = self_signed();
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_certificate(port).as_ref() != Some(&second) {
        assert!(
            Instant::now() < deadline,
            "certificate not reloaded on SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the server"
    );

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("certificate reloaded"), "{logs}");
}
