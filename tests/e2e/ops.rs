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
