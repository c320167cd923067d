//! Restarts and the data at rest: binding, credentials and replay memory survive a restart; the
//! data folder holds no plaintext, and without the master key it opens nothing.

use keyholder::vault::master::MasterKeySource;
use keyholder_protocol::paths::*;
use keyholder_protocol::Purpose;
use keyholder_tests::*;
use serde_json::json;

const SECRET: &str = "ghp_PersistedSecret_8d1f0a77";

fn folder_contains(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

#[tokio::test]
async fn restart_keeps_binding_credentials_and_replay_memory() {
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    assert_eq!(
        kh.store("github", json!({"accessToken": SECRET}))
            .await
            .status,
        200
    );
    let used_ticket = kh.ticket(Purpose::AgentCredential, "github");
    assert_eq!(kh.credential_with(&used_ticket, "github").await.status, 200);
    let raw = br#"{"operation":"list","collection":"tokens"}"#;
    let rid = format!("req_{}", random_hex(8));
    assert_eq!(
        kh.signed_raw(PATH_STORAGE, raw, now(), &rid).await.status,
        200
    );

    kh.restart().await;

    assert_eq!(
        kh.signed(PATH_HEALTH, &json!({})).await.status,
        200,
        "still bound with the same secret"
    );
    assert_eq!(
        kh.credential("github").await.json()["token"]["accessToken"],
        SECRET
    );
    // Replays stay refused after the restart.
    kh.credential_with(&used_ticket, "github")
        .await
        .assert_error(401, "ticket_invalid");
    let replay = kh.signed_raw(PATH_STORAGE, raw, now(), &rid).await;
    replay.assert_error(401, "auth_failed");
    let health = kh.signed(PATH_HEALTH, &json!({})).await.json();
    assert_eq!(health["tokenCount"], 1);
}

#[tokio::test]
async fn data_folder_without_its_master_key_reveals_nothing() {
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("master.key");
    std::fs::write(&key_file, [7u8; 32]).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = Keyholder::config_in(data.path());
    config.master_key = MasterKeySource::File(key_file.clone());
    let mut kh = Keyholder::start_config(config.clone()).await;
    let secret = kh.bind().await;
    assert_eq!(
        kh.store(
            "github",
            json!({"accessToken": SECRET, "refreshToken": "refresh_Secret_77"})
        )
        .await
        .status,
        200
    );
    assert_eq!(kh.credential("github").await.status, 200);
    kh.stop().await;

    assert!(!data.path().join("master.key").exists());
    for needle in [
        SECRET.as_bytes(),
        b"refresh_Secret_77".as_slice(),
        secret.expose().as_slice(),
        secret.to_base64().as_bytes(),
    ] {
        let hits = folder_contains(data.path(), needle);
        assert!(hits.is_empty(), "secret material found in {hits:?}");
    }
    // Every file is private to its owner.
    #[cfg(unix)]
    for entry in std::fs::read_dir(data.path()).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        let mode = entry.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
    }
    // Another master key cannot open the folder, and says so.
    let wrong = keys.path().join("wrong.key");
    std::fs::write(&wrong, [8u8; 32]).unwrap();
    let mut bad = config.clone();
    bad.master_key = MasterKeySource::File(wrong);
    let err = keyholder::start(bad)
        .await
        .err()
        .expect("wrong key refused");
    assert!(
        format!("{err:#}").contains("master key does not match"),
        "{err:#}"
    );
    // With the default source and no key file in the folder: refused, not silently re-keyed.
    let mut missing = config.clone();
    missing.master_key = MasterKeySource::DataFolder;
    let err = keyholder::start(missing)
        .await
        .err()
        .expect("missing key refused");
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
}

#[tokio::test]
async fn passphrase_master_key() {
    let keys = tempfile::tempdir().unwrap();
    let pass = keys.path().join("passphrase");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = Keyholder::config_in(data.path());
    config.master_key = MasterKeySource::Passphrase(pass.clone());
    let mut kh = Keyholder::start_config(config.clone()).await;
    kh.bind().await;
    kh.store("svc", json!({"accessToken": SECRET})).await;
    kh.restart().await;
    assert_eq!(
        kh.credential("svc").await.json()["token"]["accessToken"],
        SECRET
    );
    kh.stop().await;
    std::fs::write(&pass, "a different passphrase\n").unwrap();
    let err = keyholder::start(config)
        .await
        .err()
        .expect("wrong passphrase refused");
    assert!(
        format!("{err:#}").contains("master key does not match"),
        "{err:#}"
    );
}
