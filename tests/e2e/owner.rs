//! The owner's controls on a running server (issue 8): rotation, rewrap and retire with every
//! credential readable; backup under concurrent writes; the seal on in-flight traffic; audit
//! verification against edits, removals and reordering; import from the reference webhook's files.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyholder::cli::audit::AuditExportArgs;
use keyholder::cli::data_folder::OwnerArgs;
use keyholder::cli::retire_key::{RetireKeyArgs, RetiredKey};
use keyholder::cli::rewrap::RewrapArgs;
use keyholder::config::DataArgs;
use keyholder::vault::master::MasterKeySource;
use keyholder_protocol::document::encrypt_platform_v1_field;
use keyholder_protocol::paths::*;
use keyholder_protocol::{DataKey, HmacSecret, Purpose};
use keyholder_tests::upstream::MockServer;
use keyholder_tests::*;
use serde_json::{json, Value};

fn owner_args(kh: &Keyholder) -> OwnerArgs {
    OwnerArgs {
        data: kh.data_args(),
        json: false,
    }
}

/// Runs a (blocking) CLI function off the runtime, as a separate owner process would.
async fn cli<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Waits until `check` holds (polling every 20 ms), up to `limit`; returns the time it took.
async fn within(limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

fn token_docs(kh: &Keyholder) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(kh.data_dir.join("keyholder.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT key, doc FROM documents WHERE collection = 'tokens' ORDER BY key")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows
}

fn secret_of(i: usize) -> String {
    format!("ghp_rotation_secret_{i:03}")
}

async fn assert_all_readable(kh: &Keyholder, n: usize) {
    for i in 0..n {
        let answer = kh.credential(&format!("svc{i:03}")).await;
        answer.assert_ok();
        assert_eq!(answer.json()["token"]["accessToken"], secret_of(i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_then_rewrap_then_retire_keeps_every_credential_readable() {
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    const N: usize = 40;
    for i in 0..N {
        let answer = kh
            .store(
                &format!("svc{i:03}"),
                json!({"accessToken": secret_of(i), "refreshToken": "r"}),
            )
            .await;
        assert_eq!(answer.status, 200);
    }
    let state = kh.server.as_ref().unwrap().state.clone();
    assert_eq!(state.keys.keys().current_data_version(), 1);

    let args = owner_args(&kh);
    let version = cli(move || keyholder::cli::rotate_key::rotate_key(&args))
        .await
        .unwrap();
    assert_eq!(version, 2);
    // The running server follows without a restart.
    within(Duration::from_secs(1), || {
        state.keys.keys().current_data_version() == 2
    })
    .await;
    assert_eq!(
        kh.store("svc_new", json!({"accessToken": "new_secret"}))
            .await
            .status,
        200
    );
    let new_doc = token_docs(&kh)
        .into_iter()
        .find(|(k, _)| k == "svc_new")
        .unwrap()
        .1;
    assert!(
        new_doc.contains("kh1:2:"),
        "new writes use the new key: {new_doc}"
    );
    assert_all_readable(&kh, N).await;

    // Retiring v1 is refused while credentials use it; retiring the current key always is.
    let args = RetireKeyArgs {
        data: kh.data_args(),
        key: RetiredKey::Data(1),
    };
    let err = cli(move || keyholder::cli::retire_key::retire_key(&args))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("still used"), "{err}");
    let args = RetireKeyArgs {
        data: kh.data_args(),
        key: RetiredKey::Data(2),
    };
    let err = cli(move || keyholder::cli::retire_key::retire_key(&args))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("current"), "{err}");

    // Rewrap in small batches while the server keeps serving.
    let args = RewrapArgs {
        data: kh.data_args(),
        batch_size: 7,
    };
    let rewrap = tokio::spawn(cli(move || keyholder::cli::rewrap::rewrap(&args)));
    for i in 0..10 {
        assert_eq!(kh.credential(&format!("svc{i:03}")).await.status, 200);
    }
    let report = rewrap.await.unwrap().unwrap();
    assert!(report.rewrapped >= N, "{report:?}");
    assert!(report.batches >= N / 7, "{report:?}");
    assert!(report.still_in_use.is_empty(), "{report:?}");
    assert!(token_docs(&kh).iter().all(|(_, d)| !d.contains("kh1:1:")));

    let args = RetireKeyArgs {
        data: kh.data_args(),
        key: RetiredKey::Data(1),
    };
    cli(move || keyholder::cli::retire_key::retire_key(&args))
        .await
        .unwrap();
    within(Duration::from_secs(1), || {
        state.keys.keys().data_versions() == vec![2]
    })
    .await;
    assert_all_readable(&kh, N).await;
    assert_eq!(
        kh.credential("svc_new").await.json()["token"]["accessToken"],
        "new_secret"
    );

    let args = owner_args(&kh);
    let status = cli(move || keyholder::cli::status::status(&args))
        .await
        .unwrap();
    assert_eq!(status.data_key_versions, vec![2]);
    assert_eq!(status.current_data_key, 2);
    assert_eq!(status.credential_count as usize, N + 1);
    assert!(status.bound && !status.sealed);

    // And after a restart, too.
    kh.restart().await;
    assert_all_readable(&kh, N).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_key_rotation_keeps_the_server_serving_and_locks_out_the_old_key() {
    let keys = tempfile::tempdir().unwrap();
    let old_key = keys.path().join("old.key");
    let new_key = keys.path().join("new.key");
    std::fs::write(&old_key, [1u8; 32]).unwrap();
    std::fs::write(&new_key, [2u8; 32]).unwrap();
    let live_key = keys.path().join("master.key");
    std::fs::copy(&old_key, &live_key).unwrap();
    let mut kh =
        Keyholder::start_with(|c| c.master_key = MasterKeySource::File(live_key.clone())).await;
    kh.bind().await;
    assert_eq!(
        kh.store("github", json!({"accessToken": "gh_secret"}))
            .await
            .status,
        200
    );

    let args = keyholder::cli::rotate_master_key::RotateMasterKeyArgs {
        data: kh.data_args(),
        new_master_key_file: Some(new_key.clone()),
        new_passphrase_file: None,
        to_pkcs11: None,
        from_pkcs11: None,
    };
    cli(move || keyholder::cli::rotate_master_key::rotate_master_key(&args))
        .await
        .unwrap();
    // The old key no longer opens the folder.
    let old_args = owner_args(&kh);
    assert!(cli(move || keyholder::cli::status::status(&old_args))
        .await
        .is_err());
    // The server keeps serving with the keys it holds...
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        kh.credential("github").await.json()["token"]["accessToken"],
        "gh_secret"
    );
    // ...and picks up the new key once it is where the server reads it.
    std::fs::copy(&new_key, &live_key).unwrap();
    let args = owner_args(&kh);
    cli(move || keyholder::cli::rotate_key::rotate_key(&args))
        .await
        .unwrap();
    let state = kh.server.as_ref().unwrap().state.clone();
    within(Duration::from_secs(2), || {
        state.keys.keys().current_data_version() == 2
    })
    .await;
    assert_eq!(
        kh.store("gitlab", json!({"accessToken": "gl_secret"}))
            .await
            .status,
        200
    );
    kh.restart().await;
    assert_eq!(
        kh.credential("gitlab").await.json()["token"]["accessToken"],
        "gl_secret"
    );
    assert_eq!(
        kh.credential("github").await.json()["token"]["accessToken"],
        "gh_secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_concurrent_writes_restores_every_acknowledged_write() {
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    let kh = Arc::new(kh);
    let acked: Arc<Mutex<Vec<usize>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (kh, acked, stop) = (Arc::clone(&kh), Arc::clone(&acked), Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = kh
                    .store(
                        &format!("svc{i:05}"),
                        json!({"accessToken": format!("s{i}")}),
                    )
                    .await;
                assert_eq!(answer.status, 200);
                acked.lock().unwrap().push(i);
                i += 4;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let backups = tempfile::tempdir().unwrap();
    let out = backups.path().join("snapshot.db");
    let before: Vec<usize> = acked.lock().unwrap().clone();
    assert!(!before.is_empty());
    let args = keyholder::cli::backup::BackupArgs {
        data: kh.data_args(),
        out: out.clone(),
    };
    cli(move || keyholder::cli::backup::backup(&args))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    // Never overwrites a file.
    let args = keyholder::cli::backup::BackupArgs {
        data: kh.data_args(),
        out: out.clone(),
    };
    assert!(cli(move || keyholder::cli::backup::backup(&args))
        .await
        .is_err());
    // The snapshot holds no key in the clear, and no master key file.
    let bytes = std::fs::read(&out).unwrap();
    let master = std::fs::read(kh.data_dir.join("master.key")).unwrap();
    let master = String::from_utf8(master).unwrap();
    assert!(!bytes.windows(20).any(|w| w == &master.as_bytes()[..20]));

    // Restore refuses a non-empty folder, then restores into an empty one.
    let args = keyholder::cli::restore::RestoreArgs {
        data: kh.data_args(),
        from: out.clone(),
    };
    assert!(cli(move || keyholder::cli::restore::restore(&args))
        .await
        .is_err());
    let restored = tempfile::tempdir().unwrap();
    let target = restored.path().join("data");
    let args = keyholder::cli::restore::RestoreArgs {
        data: DataArgs {
            data_dir: target.clone(),
            master_key_file: Some(kh.data_dir.join("master.key")),
            passphrase_file: None,
            pkcs11: Default::default(),
            database_url: None,
            database_password_file: None,
            node_id: None,
        },
        from: out.clone(),
    };
    let report = cli(move || keyholder::cli::restore::restore(&args))
        .await
        .unwrap();
    assert_eq!(report.master_key_checked, Some(true));

    let mut config = Keyholder::config_in(&target);
    config.master_key = MasterKeySource::File(kh.data_dir.join("master.key"));
    let mut copy = Keyholder::start_config(config).await;
    copy.secret = Some(HmacSecret::from_bytes(
        *kh.secret.as_ref().unwrap().expose(),
    ));
    for i in &before {
        let answer = copy.credential(&format!("svc{i:05}")).await;
        assert_eq!(
            answer.status, 200,
            "acknowledged write svc{i:05} missing from the backup"
        );
        assert_eq!(answer.json()["token"]["accessToken"], format!("s{i}"));
    }
    copy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seal_stops_in_flight_traffic_within_a_second_and_unseal_restores_it() {
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    assert_eq!(kh.store("github", json!({"accessToken": "gh_sealed", "totpSecret": "JBSWY3DPEHPK3PXP", "tokenType": "TOTP"})).await.status, 200);
    let kh = Arc::new(kh);
    let last: Arc<Mutex<(u16, String)>> = Arc::new(Mutex::new((0, String::new())));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (kh, last, stop) = (Arc::clone(&kh), Arc::clone(&last), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = kh.credential("github").await;
                let code = if answer.status == 200 {
                    String::new()
                } else {
                    answer.error_code()
                };
                *last.lock().unwrap() = (answer.status, code);
            }
        })
    };
    within(Duration::from_secs(1), || last.lock().unwrap().0 == 200).await;

    let args = owner_args(&kh);
    cli(move || keyholder::cli::seal::set_sealed(&args, true))
        .await
        .unwrap();
    let took = within(Duration::from_secs(1), || {
        let l = last.lock().unwrap();
        l.0 == 503 && l.1 == "sealed"
    })
    .await;
    assert!(took < Duration::from_secs(1));
    // Every credential endpoint refuses, and health says so.
    kh.credential("github").await.assert_error(503, "sealed");
    kh.store("gitlab", json!({"accessToken": "x"}))
        .await
        .assert_error(503, "sealed");
    let ticket = kh.ticket(Purpose::TotpCode, "github");
    let url = reqwest::Url::parse_with_params(
        &kh.url(PATH_TOTP_CODE),
        &[("ticket", ticket.as_str()), ("service", "github")],
    )
    .unwrap();
    read(kh.http.get(url).send().await.unwrap())
        .await
        .assert_error(503, "sealed");
    let health = read(kh.http.get(kh.url(PATH_HEALTH)).send().await.unwrap())
        .await
        .json();
    assert_eq!(health["sealed"], true);
    // A ticket presented while sealed is not burnt: it works after unseal.
    let kept = kh.ticket(Purpose::AgentCredential, "github");
    kh.credential_with(&kept, "github")
        .await
        .assert_error(503, "sealed");

    let args = owner_args(&kh);
    cli(move || keyholder::cli::seal::set_sealed(&args, false))
        .await
        .unwrap();
    within(Duration::from_secs(1), || last.lock().unwrap().0 == 200).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.await.unwrap();
    assert_eq!(kh.credential_with(&kept, "github").await.status, 200);
    let health = read(kh.http.get(kh.url(PATH_HEALTH)).send().await.unwrap())
        .await
        .json();
    assert_eq!(health["sealed"], false);
}

/// Opens a copy of a stopped keyholder's data folder (database and master key file).
fn copy_folder(from: &std::path::Path) -> (tempfile::TempDir, OwnerArgs) {
    let dir = tempfile::tempdir().unwrap();
    for name in ["keyholder.db", "keyholder.db-wal", "master.key"] {
        if from.join(name).exists() {
            std::fs::copy(from.join(name), dir.path().join(name)).unwrap();
        }
    }
    let args = OwnerArgs {
        data: DataArgs {
            data_dir: dir.path().to_path_buf(),
            master_key_file: None,
            passphrase_file: None,
            pkcs11: Default::default(),
            database_url: None,
            database_password_file: None,
            node_id: None,
        },
        json: false,
    };
    (dir, args)
}

fn tamper(dir: &std::path::Path, sql: &str) {
    let conn = rusqlite::Connection::open(dir.join("keyholder.db")).unwrap();
    conn.execute_batch(sql).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_records_uses_and_refusals_and_verify_catches_tampering() {
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    assert_eq!(
        kh.store("github", json!({"accessToken": "gh_audit"}))
            .await
            .status,
        200
    );
    let mut claims = kh.claims(Purpose::AgentCredential, "github");
    claims.aid = Some("agent_42".into());
    let ticket = kh.ticket_from(&claims);
    assert_eq!(kh.credential_with(&ticket, "github").await.status, 200);
    // Refusals: a replayed ticket and a ticket for another service.
    kh.credential_with(&ticket, "github")
        .await
        .assert_error(401, "ticket_invalid");
    let other = kh.ticket(Purpose::AgentCredential, "gitlab");
    kh.credential_with(&other, "github")
        .await
        .assert_error(401, "ticket_invalid");
    for _ in 0..3 {
        assert_eq!(kh.credential("github").await.status, 200);
    }
    kh.server.as_ref().unwrap().state.audit.flush().await;

    let args = keyholder::cli::audit::AuditListArgs {
        data: kh.data_args(),
        service: Some("github".into()),
        since: Some((now() - 60).to_string()),
        limit: None,
        json: true,
    };
    let entries = cli(move || keyholder::cli::audit::audit_list(&args))
        .await
        .unwrap();
    // The ticket for gitlab is recorded under the service it names (signed), not the one asked.
    assert_eq!(entries.len(), 6, "{entries:#?}");
    assert_eq!(entries[0].event.endpoint, PATH_STORE);
    assert_eq!(entries[0].event.purpose, "store");
    let first_use = &entries[1].event;
    assert_eq!(
        (
            first_use.endpoint.as_str(),
            first_use.agent_id.as_str(),
            first_use.result.as_str(),
            first_use.purpose.as_str()
        ),
        (PATH_CREDENTIAL, "agent_42", "ok", "agent_credential")
    );
    assert_eq!(first_use.source, "127.0.0.1");
    assert!(!first_use.request_id.is_empty());
    assert_eq!(entries[2].event.result, "ticket_invalid");
    assert_eq!(entries[3].event.result, "ok");
    let args = owner_args(&kh);
    let status = cli(move || keyholder::cli::status::status(&args))
        .await
        .unwrap();
    assert!(status.last_credential_use.is_some());
    assert_eq!(status.audit_entries, 7);

    let args = AuditExportArgs {
        data: kh.data_args(),
        format: "jsonl".into(),
        out: None,
    };
    let mut out = Vec::new();
    let exported = keyholder::cli::audit::audit_export(&args, &mut out).unwrap();
    assert_eq!(exported, 7);
    let lines: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7);
    assert_eq!(lines[1]["agentId"], "agent_42");
    assert_eq!(lines[1]["hash"].as_str().unwrap().len(), 64);

    kh.stop().await;
    let (_d, args) = copy_folder(&kh.data_dir);
    let (verification, _) = keyholder::cli::audit::audit_verify(&args).unwrap();
    assert!(verification.problem.is_none(), "{verification:?}");
    assert_eq!(verification.entries, 7);

    // Edited.
    let (dir, args) = copy_folder(&kh.data_dir);
    tamper(
        dir.path(),
        "UPDATE audit_log SET result = 'ok' WHERE seq = 3",
    );
    let (verification, _) = keyholder::cli::audit::audit_verify(&args).unwrap();
    assert_eq!(verification.problem.unwrap().seq, 3);
    // Removed.
    let (dir, args) = copy_folder(&kh.data_dir);
    tamper(dir.path(), "DELETE FROM audit_log WHERE seq = 4");
    let (verification, _) = keyholder::cli::audit::audit_verify(&args).unwrap();
    assert_eq!(verification.problem.unwrap().seq, 4);
    // The newest removed.
    let (dir, args) = copy_folder(&kh.data_dir);
    tamper(dir.path(), "DELETE FROM audit_log WHERE seq = 7");
    let (verification, _) = keyholder::cli::audit::audit_verify(&args).unwrap();
    // Found at #6 if it came in #7's batch (unsigned, so not a newest entry), else by the head.
    let seq = verification.problem.unwrap().seq;
    assert!(seq == 6 || seq == 7, "problem at #{seq}");
    // Swapped (two entries exchange places).
    let (dir, args) = copy_folder(&kh.data_dir);
    tamper(
        dir.path(),
        "UPDATE audit_log SET seq = -5 WHERE seq = 5;
         UPDATE audit_log SET seq = 5 WHERE seq = 6;
         UPDATE audit_log SET seq = 6 WHERE seq = -5;",
    );
    let (verification, _) = keyholder::cli::audit::audit_verify(&args).unwrap();
    assert_eq!(verification.problem.unwrap().seq, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_from_the_reference_keeps_the_same_platform_working() {
    let reference_key = DataKey::generate();
    let reference_secret = HmacSecret::generate();
    let key_file = json!({
        "webhook_id": "wh_reference01",
        "encryption_key": reference_key.to_base64().as_str(),
        "hmac_secret": reference_secret.to_base64().as_str(),
        "hmac_secret_hash": reference_secret.sha256_hex(),
        "tokenvault_origin": "https://tokenvault.uk",
        "is_configured": true,
    });
    let collections = json!({
        "tokens": {
            "github": {
                "v": 1, "alg": "AES-256-GCM",
                "fields": {
                    "accessToken": encrypt_platform_v1_field(&reference_key, b"ghp_reference_token"),
                    "refreshToken": encrypt_platform_v1_field(&reference_key, b"ghr_reference_refresh"),
                },
                "meta": {"serviceName": "GitHub", "tokenType": "oauth", "hasRefreshToken": true, "createdAt": "2024-01-01T00:00:00Z"}
            },
            "legacy_plain": {"accessToken": "plain_token_as_given", "meta": {"serviceName": "legacy_plain"}}
        },
        "proxy_configs": {"cfg_1": {"service": "github", "upstream": "https://api.github.com"}},
        "audit": {"evt_1": {"timestamp": "2024-01-02T00:00:00Z", "action": "store"}},
        "vault_config": {"settings": {"theme": "dark"}}
    });
    let files = tempfile::tempdir().unwrap();
    let store_file = files.path().join("tokenvault_store.json");
    let kv_file = files.path().join("tokenvault_kv_store.json");
    std::fs::write(&store_file, key_file.to_string()).unwrap();
    std::fs::write(&kv_file, collections.to_string()).unwrap();

    let mut kh = Keyholder::start().await;
    let args = keyholder::cli::import_reference::ImportReferenceArgs {
        data: kh.data_args(),
        store: store_file.clone(),
        kv: kv_file.clone(),
        force: false,
    };
    let report = cli(move || keyholder::cli::import_reference::import_reference(&args))
        .await
        .unwrap();
    assert_eq!(
        (
            report.tokens_reencrypted,
            report.tokens_plaintext,
            report.proxy_configs,
            report.audit,
            report.vault_config
        ),
        (1, 1, 1, 1, 1)
    );
    assert!(report.bound);

    // The running server adopts the reference's secret: the platform's signed calls just work.
    kh.secret = Some(HmacSecret::from_bytes(*reference_secret.expose()));
    let state = kh.server.as_ref().unwrap().state.clone();
    within(Duration::from_secs(1), || state.keys.binding().bound).await;
    let health = kh.signed(PATH_HEALTH, &json!({})).await;
    health.assert_ok();
    assert_eq!(health.json()["tokenCount"], 2);
    let token = kh.credential("github").await.json();
    assert_eq!(token["token"]["accessToken"], "ghp_reference_token");
    assert_eq!(token["token"]["refreshToken"], "ghr_reference_refresh");
    assert_eq!(
        kh.credential("legacy_plain").await.json()["token"]["accessToken"],
        "plain_token_as_given"
    );
    let cfg = kh
        .storage(json!({"operation": "get", "collection": "proxy_configs", "key": "cfg_1"}))
        .await;
    assert_eq!(cfg.json()["data"], collections["proxy_configs"]["cfg_1"]);
    let github = token_docs(&kh)
        .into_iter()
        .find(|(k, _)| k == "github")
        .unwrap()
        .1;
    assert!(
        github.contains("kh1:1:") && !github.contains("\"v\":1"),
        "re-encrypted under our key: {github}"
    );
    let args = owner_args(&kh);
    let status = cli(move || keyholder::cli::status::status(&args))
        .await
        .unwrap();
    assert_eq!(status.webhook_id, "wh_reference01");

    // A second import into a keyholder that holds credentials is refused without --force.
    let args = keyholder::cli::import_reference::ImportReferenceArgs {
        data: kh.data_args(),
        store: store_file,
        kv: kv_file,
        force: false,
    };
    let err = cli(move || keyholder::cli::import_reference::import_reference(&args))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");

    // And it all survives a restart.
    kh.restart().await;
    assert_eq!(
        kh.credential("github").await.json()["token"]["accessToken"],
        "ghp_reference_token"
    );
}

/// Item 8 of issue 17: a v1 ciphertext carries no associated data, so a hostile platform that saw
/// the reference's documents before the migration writes one into another service's document
/// (`storage set`) and asks for it with that service's ticket, or proxies it to its own host. It
/// opens only as the service and field it was imported as; `rewrap` re-seals what the reference
/// key still opens in `kh1`, after which `retire-key platform-v1` removes the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_v1_ciphertexts_open_only_where_imported_until_rewrap_and_retire() {
    let reference_key = DataKey::generate();
    let reference_secret = HmacSecret::generate();
    let github_access = encrypt_platform_v1_field(&reference_key, b"ghp_reference_token");
    let github_refresh = encrypt_platform_v1_field(&reference_key, b"ghr_reference_refresh");
    let slack_access = encrypt_platform_v1_field(&reference_key, b"xoxb-reference-slack");
    let github_v1 = json!({
        "v": 1, "alg": "AES-256-GCM",
        "fields": {"accessToken": github_access, "refreshToken": github_refresh},
        "meta": {"serviceName": "GitHub", "tokenType": "oauth", "hasRefreshToken": true}
    });
    let key_file = json!({
        "webhook_id": "wh_reference02",
        "encryption_key": reference_key.to_base64().as_str(),
        "hmac_secret": reference_secret.to_base64().as_str(),
        "hmac_secret_hash": reference_secret.sha256_hex(),
        "tokenvault_origin": "https://tokenvault.uk",
        "is_configured": true,
    });
    let collections = json!({
        "tokens": {
            "github": github_v1,
            "slack": {"v": 1, "alg": "AES-256-GCM", "fields": {"accessToken": slack_access}, "meta": {}},
        }
    });
    let files = tempfile::tempdir().unwrap();
    let store_file = files.path().join("tokenvault_store.json");
    let kv_file = files.path().join("tokenvault_kv_store.json");
    std::fs::write(&store_file, key_file.to_string()).unwrap();
    std::fs::write(&kv_file, collections.to_string()).unwrap();

    let mut kh = Keyholder::start_with(|c| c.egress_allow_private = true).await;
    let args = keyholder::cli::import_reference::ImportReferenceArgs {
        data: kh.data_args(),
        store: store_file,
        kv: kv_file,
        force: false,
    };
    let report = cli(move || keyholder::cli::import_reference::import_reference(&args))
        .await
        .unwrap();
    assert_eq!(report.tokens_reencrypted, 2);
    kh.secret = Some(HmacSecret::from_bytes(*reference_secret.expose()));
    let state = kh.server.as_ref().unwrap().state.clone();
    within(Duration::from_secs(1), || state.keys.binding().bound).await;
    let attacker = MockServer::ok().await;

    // The platform writes pre-migration ciphertexts where they do not belong: github's access
    // token as a new service's, and as slack's; github's refresh token as its access token.
    let set = |key: &str, fields: Value| {
        json!({"operation": "set", "collection": "tokens", "key": key,
               "data": {"v": 1, "alg": "AES-256-GCM", "fields": fields, "meta": {}}})
    };
    for (key, fields) in [
        ("evil", json!({"accessToken": github_access})),
        ("slack", json!({"accessToken": github_access})),
        ("github_swapped", json!({"accessToken": github_refresh})),
    ] {
        assert_eq!(kh.storage(set(key, fields)).await.status, 200);
    }
    // The owner lets `evil` reach anywhere, so only the v1 binding stands between the copied
    // ciphertext and the attacker's host.
    kh.egress("allow", "evil", &[], true).await;
    for service in ["evil", "slack", "github_swapped"] {
        let answer = kh.credential(service).await;
        assert!(
            answer.status >= 400,
            "{service}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert!(answer.json()["error"].is_string());
        let body = String::from_utf8_lossy(&answer.body);
        assert!(
            !body.contains("ghp_reference") && !body.contains("ghr_reference"),
            "{body}"
        );
    }
    let proxied = kh.proxy_get("evil", &attacker.url("/collect")).await;
    assert!(
        proxied.status >= 400,
        "{}",
        String::from_utf8_lossy(&proxied.body)
    );
    assert_eq!(attacker.count(), 0, "nothing reached the attacker");
    // Its own ciphertexts, written back to where they were imported, still open (the platform
    // may hold a copy from before the migration); that is what `rewrap` converts.
    let written_back =
        json!({"operation": "set", "collection": "tokens", "key": "github", "data": github_v1});
    assert_eq!(kh.storage(written_back).await.status, 200);
    let token = kh.credential("github").await.json();
    assert_eq!(token["token"]["accessToken"], "ghp_reference_token");
    assert_eq!(token["token"]["refreshToken"], "ghr_reference_refresh");

    let args = owner_args(&kh);
    let status = cli(move || keyholder::cli::status::status(&args))
        .await
        .unwrap();
    assert!(status.reference_key);
    assert_eq!(status.reference_key_documents, 1, "{status:?}");
    let retire = RetireKeyArgs {
        data: kh.data_args(),
        key: RetiredKey::PlatformV1,
    };
    let args = retire.clone();
    let err = cli(move || keyholder::cli::retire_key::retire_key(&args))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("rewrap"), "{err}");

    // rewrap re-seals github in kh1 (bound to service, field and key version); the misplaced
    // copies are not laundered into kh1, they are left as they are and listed.
    let args = RewrapArgs {
        data: kh.data_args(),
        batch_size: 2,
    };
    let report = cli(move || keyholder::cli::rewrap::rewrap(&args))
        .await
        .unwrap();
    assert_eq!(report.reference_key_documents, 0, "{report:?}");
    let mut failed = report.failed.clone();
    failed.sort();
    assert_eq!(failed, ["evil", "github_swapped", "slack"], "{report:?}");
    let docs = token_docs(&kh);
    let github = &docs.iter().find(|(k, _)| k == "github").unwrap().1;
    let github: Value = serde_json::from_str(github).unwrap();
    assert_eq!(github["v"], 2, "{github}");
    for field in ["accessToken", "refreshToken"] {
        assert!(
            github["fields"][field]
                .as_str()
                .unwrap()
                .starts_with("kh1:1:"),
            "{github}"
        );
    }
    for (key, doc) in docs.iter().filter(|(k, _)| k != "github") {
        assert!(!doc.contains("kh1:"), "{key} was not re-sealed: {doc}");
    }

    // The reference key goes; everything that was the owner's still decrypts.
    cli(move || keyholder::cli::retire_key::retire_key(&retire))
        .await
        .unwrap();
    within(Duration::from_secs(1), || {
        !state.keys.keys().has_platform_v1_key()
    })
    .await;
    let token = kh.credential("github").await.json();
    assert_eq!(token["token"]["accessToken"], "ghp_reference_token");
    assert_eq!(token["token"]["refreshToken"], "ghr_reference_refresh");
    assert!(kh.credential("evil").await.status >= 400);
    let args = owner_args(&kh);
    let status = cli(move || keyholder::cli::status::status(&args))
        .await
        .unwrap();
    assert!(!status.reference_key, "{status:?}");
    assert_eq!(status.reference_key_documents, 0);
    let conn = rusqlite::Connection::open(kh.data_dir.join("keyholder.db")).unwrap();
    let places: i64 = conn
        .query_row("SELECT COUNT(*) FROM imported_v1_fields", [], |r| r.get(0))
        .unwrap();
    assert_eq!(places, 0);
    let entries = kh.audit_entries(None).await;
    assert!(
        entries
            .iter()
            .any(|e| e.event.endpoint == "owner:retire-key"
                && e.event.service.contains("platform-v1"))
    );
    // Retiring it twice says there is nothing to retire.
    let args = RetireKeyArgs {
        data: kh.data_args(),
        key: RetiredKey::PlatformV1,
    };
    let err = cli(move || keyholder::cli::retire_key::retire_key(&args))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no reference"), "{err}");

    // And after a restart too.
    kh.restart().await;
    assert_eq!(
        kh.credential("github").await.json()["token"]["accessToken"],
        "ghp_reference_token"
    );
}

/// A copy the platform made before the migration, inside the reference's own files (its storage
/// `set` wrote them too): the same v1 ciphertext under two services. Importing it would bind the
/// copy as well, so the import is refused, naming both places, and nothing is imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_refuses_a_v1_ciphertext_found_in_two_places() {
    let reference_key = DataKey::generate();
    let reference_secret = HmacSecret::generate();
    let access = encrypt_platform_v1_field(&reference_key, b"ghp_reference_token");
    let key_file = json!({
        "webhook_id": "wh_reference03",
        "encryption_key": reference_key.to_base64().as_str(),
        "hmac_secret": reference_secret.to_base64().as_str(),
        "is_configured": true,
    });
    let collections = json!({"tokens": {
        "github": {"v": 1, "alg": "AES-256-GCM", "fields": {"accessToken": access}, "meta": {}},
        "platform_copy": {"v": 1, "alg": "AES-256-GCM", "fields": {"accessToken": access}, "meta": {}},
    }});
    let files = tempfile::tempdir().unwrap();
    let store_file = files.path().join("tokenvault_store.json");
    let kv_file = files.path().join("tokenvault_kv_store.json");
    std::fs::write(&store_file, key_file.to_string()).unwrap();
    std::fs::write(&kv_file, collections.to_string()).unwrap();
    let kh = Keyholder::start().await;
    let args = keyholder::cli::import_reference::ImportReferenceArgs {
        data: kh.data_args(),
        store: store_file,
        kv: kv_file,
        force: false,
    };
    let err = cli(move || keyholder::cli::import_reference::import_reference(&args))
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("tokens/github accessToken")
            && text.contains("tokens/platform_copy accessToken"),
        "{text}"
    );
    let args = owner_args(&kh);
    let status = cli(move || keyholder::cli::status::status(&args))
        .await
        .unwrap();
    assert_eq!(status.credential_count, 0);
    assert!(!status.reference_key && !status.bound, "{status:?}");
}

/// Item 10 of issue 17: `keyholder store` seals a credential from a file or standard input on the
/// data folder, without any page or script of the platform's; a running server that had the old
/// credential cached serves the new one within its quarter-second poll; the audit trail has
/// `owner:store`; secrets are refused as arguments and nothing is half-written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_store_from_a_file_reaches_the_running_server() {
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    assert_eq!(
        kh.store(
            "github",
            json!({"accessToken": "ghp_old_one", "scope": "old"})
        )
        .await
        .status,
        200
    );
    let created_at = kh.credential("github").await.json()["token"]["createdAt"].clone();
    assert!(created_at.is_string());

    let files = tempfile::tempdir().unwrap();
    let secret_file = files.path().join("token");
    std::fs::write(&secret_file, "ghp_FromTheOwnerCli_77\n").unwrap();
    let args = keyholder::cli::store::StoreArgs {
        data: kh.data_args(),
        service: "github".into(),
        token_type: Some("api_key".into()),
        meta: vec!["scope=repo".into(), "serviceName=GitHub (CLI)".into()],
        secret_file: secret_file.clone(),
        field: "accessToken".into(),
        json: false,
    };
    let store_args = args.clone();
    let report = cli(move || keyholder::cli::store::store(&store_args, &mut std::io::empty()))
        .await
        .unwrap();
    assert_eq!(report.meta["tokenType"], "api_key");
    assert!(!serde_json::to_string(&report)
        .unwrap()
        .contains("FromTheOwnerCli"));

    // The server was not told: it notices the owner generation move within a quarter second.
    let started = Instant::now();
    let token = loop {
        let token = kh.credential("github").await.json()["token"].clone();
        if token["accessToken"] == "ghp_FromTheOwnerCli_77" {
            break token;
        }
        assert_eq!(token["accessToken"], "ghp_old_one");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the server kept the old credential"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(token["tokenType"], "api_key");
    assert_eq!(token["scope"], "repo");
    assert_eq!(token["serviceName"], "GitHub (CLI)");
    assert_eq!(
        token["createdAt"], created_at,
        "a replacement keeps createdAt"
    );
    let doc = token_docs(&kh)
        .into_iter()
        .find(|(k, _)| k == "github")
        .unwrap()
        .1;
    assert!(
        !doc.contains("FromTheOwnerCli") && doc.contains("kh1:"),
        "{doc}"
    );

    // Refused before anything is written: a secret as an argument, a field that is not
    // sensitive, an empty or oversized secret, a missing file.
    let refused = |adjust: fn(&mut keyholder::cli::store::StoreArgs), needle: &'static str| {
        let mut args = args.clone();
        adjust(&mut args);
        async move {
            let err = cli(move || keyholder::cli::store::store(&args, &mut std::io::empty()))
                .await
                .unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{err:#}");
        }
    };
    refused(
        |a| a.meta.push("accessToken=ghp_on_the_command_line".into()),
        "--field accessToken",
    )
    .await;
    refused(
        |a| a.meta.push("totpUri=otpauth://totp/x?secret=AAAA".into()),
        "holds a secret",
    )
    .await;
    refused(|a| a.meta.push("novalue".into()), "KEY=VALUE").await;
    refused(|a| a.field = "scope".into(), "must be one of").await;
    refused(
        |a| a.secret_file = a.secret_file.with_file_name("absent"),
        "--secret-file",
    )
    .await;
    std::fs::write(files.path().join("empty"), "\r\n").unwrap();
    refused(
        |a| a.secret_file = a.secret_file.with_file_name("empty"),
        "empty",
    )
    .await;
    std::fs::write(
        files.path().join("big"),
        vec![b'x'; keyholder::cli::store::MAX_STORED_SECRET + 1],
    )
    .unwrap();
    refused(
        |a| a.secret_file = a.secret_file.with_file_name("big"),
        "longer than",
    )
    .await;
    // Standard input, another service.
    let mut args = args.clone();
    args.service = "slack".into();
    args.secret_file = "-".into();
    args.meta.clear();
    args.token_type = None;
    cli(move || keyholder::cli::store::store(&args, &mut &b"xoxb-from-stdin\n"[..]))
        .await
        .unwrap();
    kh.server
        .as_ref()
        .unwrap()
        .state
        .reload
        .follow_owner_changes()
        .await
        .unwrap();
    let slack = kh.credential("slack").await.json();
    assert_eq!(slack["token"]["accessToken"], "xoxb-from-stdin");
    assert_eq!(slack["token"]["tokenType"], "oauth");
    assert_eq!(
        kh.credential("github").await.json()["token"]["accessToken"],
        "ghp_FromTheOwnerCli_77",
        "the refused stores changed nothing"
    );

    let entries = kh.audit_entries(None).await;
    let stores: Vec<&str> = entries
        .iter()
        .filter(|e| e.event.endpoint == "owner:store")
        .map(|e| e.event.service.as_str())
        .collect();
    assert_eq!(stores, ["github", "slack"]);
    let trail = serde_json::to_string(&entries).unwrap();
    assert!(!trail.contains("FromTheOwnerCli") && !trail.contains("xoxb-from-stdin"));
}

/// `--audit-retention-days` in a running server: the old part of the trail goes, behind a signed
/// prune entry; credential traffic meanwhile keeps working and the kept chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_retention_prunes_in_a_running_server_and_the_rest_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let mut kh = Keyholder::start_config(Keyholder::config_in(dir.path())).await;
    kh.bind().await;
    assert_eq!(
        kh.store("github", json!({"accessToken": "gh_old"}))
            .await
            .status,
        200
    );
    for _ in 0..5 {
        assert_eq!(kh.credential("github").await.status, 200);
    }
    kh.stop().await;
    let args = keyholder::cli::data_folder::OwnerArgs {
        data: kh.data_args(),
        json: false,
    };
    let verify_args = args.clone();
    let (before, _) = cli(move || keyholder::cli::audit::audit_verify(&verify_args))
        .await
        .unwrap();
    assert!(before.problem.is_none());
    let old_head = before.head_seq;

    // Everything written before this start is "old" (a zero retention, which the flag does not
    // allow, makes the test independent of the clock).
    kh.config.audit_retention = Some(std::time::Duration::ZERO);
    kh.restart().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let verification = loop {
        // Traffic while the prune runs.
        assert_eq!(kh.credential("github").await.status, 200);
        let verify_args = args.clone();
        let (v, _) = cli(move || keyholder::cli::audit::audit_verify(&verify_args))
            .await
            .unwrap();
        if v.first_seq > old_head {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no prune happened: {v:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(verification.problem.is_none(), "{verification:?}");
    let entries = kh.audit_entries(None).await;
    let prune = entries
        .iter()
        .find(|e| e.event.endpoint == "owner:audit-prune")
        .expect("a prune entry");
    assert_eq!(prune.event.source, "retention");
    assert!(prune.event.service.starts_with(&format!("{old_head}:")));
    assert!(entries.iter().all(|e| e.seq > old_head));
}
