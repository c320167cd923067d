//! The asymmetric binding (issue 10): bind with the platform's Ed25519 public key, then store, fetch,
//! proxy and refresh through the SDK with envelopes and `kh2` tickets; rotate the platform key without a
//! failed request; every envelope and scheme refusal (also a replay after a restart); a re-bind back to
//! HMAC; the checker over an asymmetric binding; and a data folder that holds nothing that signs as the
//! platform.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use keyholder_check::{self as check, CheckAuth, CheckOptions};
use keyholder_client::{Platform, ProxyCall, TokenData};
use keyholder_protocol::envelope::{new_envelope_nonce, sign_envelope};
use keyholder_protocol::paths::*;
use keyholder_protocol::signing::signature_header_value;
use keyholder_protocol::ticket::encode_ticket;
use keyholder_protocol::ticket_kh2::encode_kh2_ticket;
use keyholder_protocol::wire::Collection;
use keyholder_protocol::{ErrorCode, HmacSecret, PlatformSigningKey, Purpose, TicketClaims};
use keyholder_tests::upstream::{MockServer, Reply};
use keyholder_tests::*;
use serde_json::{json, Map, Value};

/// Writes `key`'s public key to a file outside the data folder (as an identity document, or base64).
fn public_key_file(dir: &Path, key: &PlatformSigningKey, document: bool) -> std::path::PathBuf {
    let path = dir.join(format!("platform-{}.pub", key.key_id()));
    let public = key.public_key();
    let text = if document {
        serde_json::to_string(&public.identity_document()).unwrap()
    } else {
        public.to_base64()
    };
    std::fs::write(&path, text).unwrap();
    path
}

/// `keyholder bind [--rebind] --platform-key FILE` as the owner runs it.
fn issue_asymmetric_code(kh: &Keyholder, file: &Path, rebind: bool) -> String {
    let args = keyholder::cli::bind::BindArgs {
        data: kh.data_args(),
        public_url: None,
        frontend_url: DEFAULT_FRONTEND.into(),
        rebind,
        platform_key: Some(file.to_path_buf()),
        json: true,
    };
    let issued = keyholder::cli::bind::bind(&args).expect("asymmetric code issued");
    assert!(
        issued.registration_url.contains("platform_key_id="),
        "{}",
        issued.registration_url
    );
    assert!(!issued.registration_url.contains("hmac_hash="));
    issued.code
}

fn platform_key_cli(kh: &Keyholder, action: &str, arg: &str) -> anyhow::Result<Vec<String>> {
    use keyholder::cli::platform_key::{PlatformKeyAction, PlatformKeyArgs};
    let data = kh.data_args();
    let action = match action {
        "add" => PlatformKeyAction::Add {
            data,
            file: arg.into(),
        },
        "remove" => PlatformKeyAction::Remove {
            data,
            key_id: arg.into(),
        },
        _ => PlatformKeyAction::List { data, json: true },
    };
    keyholder::cli::platform_key::platform_key(&PlatformKeyArgs { action })
        .map(|keys| keys.into_iter().map(|k| k.key_id).collect())
}

async fn within(limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn active_key_ids(kh: &Keyholder) -> Vec<String> {
    kh.server
        .as_ref()
        .unwrap()
        .state
        .keys
        .binding()
        .platform_keys
        .iter()
        .map(|k| k.key_id().to_owned())
        .collect()
}

fn active_keys(kh: &Keyholder) -> usize {
    kh.server
        .as_ref()
        .unwrap()
        .state
        .keys
        .binding()
        .platform_keys
        .len()
}

/// A bind code row: hash, wrapped pending secret, platform public key.
type CodeRow = (String, Option<Vec<u8>>, Option<Vec<u8>>);

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

/// A raw POST with an envelope signed by `key` (or any headers the caller picks).
async fn enveloped(
    kh: &Keyholder,
    key: &PlatformSigningKey,
    path: &str,
    body: &[u8],
    ts: i64,
) -> (Answer, String) {
    let header = sign_envelope(key, ts, &new_envelope_nonce(), "POST", path, body);
    (
        send(kh, path, body, &[(HEADER_ENVELOPE, &header)]).await,
        header,
    )
}

async fn send(kh: &Keyholder, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Answer {
    let mut req = kh
        .http
        .post(kh.url(path))
        .header("content-type", "application/json")
        .header(HEADER_PLATFORM_REQUEST_ID, format!("req_{}", random_hex(8)))
        .body(body.to_vec());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    read(req.send().await.unwrap()).await
}

#[tokio::test]
async fn asymmetric_binding_stores_fetches_proxies_refreshes_and_rotates() {
    let keys_dir = tempfile::tempdir().unwrap();
    let mut kh = Keyholder::start_with(|c| c.egress_allow_private = true).await;
    let first = PlatformSigningKey::generate();
    let code = issue_asymmetric_code(&kh, &public_key_file(keys_dir.path(), &first, true), false);
    let platform = kh
        .sdk_builder()
        .bind_with_key(&code, first.duplicate())
        .await
        .unwrap();
    assert!(platform.auth().hmac_secret().is_none());
    assert_eq!(
        platform.auth().signing_key().unwrap().key_id(),
        first.key_id()
    );
    let info = platform.exchange_info().unwrap();
    assert!(info.signing_key.is_some());

    // Signed calls: health and storage.
    let health = platform.health_signed().await.unwrap();
    assert_eq!(health.capabilities, info.capabilities);
    platform
        .storage_set(
            Collection::VaultConfig,
            "settings",
            &object(json!({"meta": {"v": 1}, "theme": "dark"})),
        )
        .await
        .unwrap();
    let got = platform
        .storage_get(Collection::VaultConfig, "settings")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got["theme"], "dark");

    // kh2 tickets: the browser's store and the agent's fetch.
    let issuer = platform.ticket_issuer().subject("user_test");
    assert!(issuer.store("github").expose().starts_with("kh2."));
    let agent = kh.sdk_builder().agent().unwrap();
    agent
        .store(
            issuer.store("github").expose(),
            "github",
            &TokenData::new()
                .secret("accessToken", "gho_asym_1")
                .secret("refreshToken", "ghr_asym_1")
                .field("provider", "github"),
        )
        .await
        .unwrap();
    let credential = agent
        .credential(issuer.credential("github").expose(), "github")
        .await
        .unwrap();
    assert_eq!(credential.access_token().unwrap().expose(), "gho_asym_1");

    // Proxy: envelope and kh2 proxy ticket; the upstream sees the credential.
    let upstream = MockServer::start(|r| {
        Reply::json(
            200,
            json!({"auth": r.header("authorization").unwrap_or("")}),
        )
    })
    .await;
    kh.egress("allow", "github", &[&upstream.origin()], false)
        .await;
    let answer = platform
        .proxy(
            issuer.proxy("github").expose(),
            "github",
            &ProxyCall::new(upstream.url("/user")).template("Authorization", "Bearer ${TOKEN}"),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    let seen: Value = serde_json::from_slice(&answer.body).unwrap();
    // The upstream got the credential; its echo comes back redacted (issue 17, item 3).
    assert_eq!(
        upstream.requests()[0].header("authorization"),
        Some("Bearer gho_asym_1")
    );
    assert_eq!(seen["auth"], "Bearer [REDACTED]");

    // Refresh through the owner's OAuth client.
    let provider = MockServer::start(|r| {
        if r.form().get("refresh_token").map(String::as_str) == Some("ghr_asym_1") {
            Reply::json(
                200,
                json!({"access_token": "gho_asym_2", "expires_in": 3600}),
            )
        } else {
            Reply::json(400, json!({"error": "invalid_grant"}))
        }
    })
    .await;
    kh.oauth_set(
        "github",
        &provider.url("/token"),
        "owner-client",
        "owner-secret",
    );
    let refreshed = platform
        .refresh_notify("github", "expired", None)
        .await
        .unwrap();
    assert_eq!(refreshed.status, "refreshed", "{refreshed:?}");
    let credential = agent
        .credential(issuer.credential("github").expose(), "github")
        .await
        .unwrap();
    assert_eq!(credential.access_token().unwrap().expose(), "gho_asym_2");

    // Rotation without a failed request: add the second key, switch to it, remove the first.
    let second = PlatformSigningKey::generate();
    let second_file = public_key_file(keys_dir.path(), &second, false);
    let mut listed = platform_key_cli(&kh, "add", second_file.to_str().unwrap()).unwrap();
    listed.sort();
    let mut both = [first.key_id(), second.key_id()];
    both.sort();
    assert_eq!(listed, both);
    // A third key is refused while two are active.
    let third = PlatformSigningKey::generate();
    let third_file = public_key_file(keys_dir.path(), &third, false);
    let err = platform_key_cli(&kh, "add", third_file.to_str().unwrap()).unwrap_err();
    assert!(err.to_string().contains("remove one first"), "{err}");
    // The old key keeps working while the server picks the new one up.
    let started = Instant::now();
    while active_keys(&kh) < 2 {
        platform.health_signed().await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    let rotated = platform.with_auth(second.duplicate());
    rotated.health_signed().await.unwrap();
    let rotated_issuer = rotated.ticket_issuer().subject("user_test");
    // Tickets minted by the old key just before the switch stay valid until removal.
    let old_ticket = issuer.credential("github");
    agent
        .credential(old_ticket.expose(), "github")
        .await
        .unwrap();
    let listed = platform_key_cli(&kh, "remove", &first.key_id()).unwrap();
    assert_eq!(listed, [second.key_id()]);
    let started = Instant::now();
    while active_keys(&kh) > 1 {
        rotated.health_signed().await.unwrap();
        agent
            .credential(rotated_issuer.credential("github").expose(), "github")
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    rotated
        .storage_get(Collection::VaultConfig, "settings")
        .await
        .unwrap()
        .unwrap();
    // The last key cannot be removed (the platform would be locked out).
    let err = platform_key_cli(&kh, "remove", &second.key_id()).unwrap_err();
    assert!(err.to_string().contains("only platform key"), "{err}");
    // The removed key's envelopes and tickets are refused now.
    let e = platform.health_signed().await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AuthFailed));
    let e = agent
        .credential(issuer.credential("github").expose(), "github")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TicketInvalid));
    let (answer, _) = enveloped(&kh, &first, PATH_HEALTH, b"{}", now()).await;
    answer.assert_error(401, "auth_failed");

    // The rotation survives a restart.
    kh.restart().await;
    let rotated = kh.sdk_builder().platform(second.duplicate()).unwrap();
    rotated.health_signed().await.unwrap();
    assert_eq!(
        kh.sdk_builder()
            .platform(first.duplicate())
            .unwrap()
            .health_signed()
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::AuthFailed)
    );
}

#[tokio::test]
async fn envelope_and_scheme_refusals() {
    let keys_dir = tempfile::tempdir().unwrap();
    let mut kh = Keyholder::start().await;
    let key = PlatformSigningKey::generate();
    let code = issue_asymmetric_code(&kh, &public_key_file(keys_dir.path(), &key, false), false);
    // The exchange hands out no secret: webhook id, version, capabilities and signing key only.
    let exchanged = kh.exchange(&code).await;
    assert_eq!(exchanged.status, 200);
    let body = exchanged.json();
    let mut fields: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["capabilities", "signingKey", "version", "webhookId"],
        "{body}"
    );

    let ok_body = br#"{"probe":"r"}"#;
    let (answer, header) = enveloped(&kh, &key, PATH_HEALTH, ok_body, now()).await;
    answer.assert_ok();

    // Replayed nonce: the same envelope again (another request id) is refused...
    send(&kh, PATH_HEALTH, ok_body, &[(HEADER_ENVELOPE, &header)])
        .await
        .assert_error(401, "auth_failed");
    // ...also after a restart.
    let (answer, fresh) = enveloped(&kh, &key, PATH_HEALTH, ok_body, now()).await;
    assert_eq!(answer.status, 200);
    kh.restart().await;
    send(&kh, PATH_HEALTH, ok_body, &[(HEADER_ENVELOPE, &fresh)])
        .await
        .assert_error(401, "auth_failed");

    // Body swapped under a valid signature; another path; stale both ways; unknown key; forged.
    let header = sign_envelope(
        &key,
        now(),
        &new_envelope_nonce(),
        "POST",
        PATH_HEALTH,
        ok_body,
    );
    send(
        &kh,
        PATH_HEALTH,
        br#"{"probe":"x"}"#,
        &[(HEADER_ENVELOPE, &header)],
    )
    .await
    .assert_error(401, "auth_failed");
    send(&kh, PATH_STORAGE, ok_body, &[(HEADER_ENVELOPE, &header)])
        .await
        .assert_error(401, "auth_failed");
    for ts in [now() - 330, now() + 330] {
        let (answer, _) = enveloped(&kh, &key, PATH_HEALTH, ok_body, ts).await;
        answer.assert_error(401, "auth_failed");
        assert!(answer.json()["message"]
            .as_str()
            .unwrap()
            .contains("window"));
    }
    let stranger = PlatformSigningKey::generate();
    let (answer, _) = enveloped(&kh, &stranger, PATH_HEALTH, ok_body, now()).await;
    answer.assert_error(401, "auth_failed");
    assert_eq!(answer.json()["message"], "Unknown platform key");
    let forged = sign_envelope(
        &stranger,
        now(),
        &new_envelope_nonce(),
        "POST",
        PATH_HEALTH,
        ok_body,
    )
    .replace(&stranger.key_id(), &key.key_id());
    let answer = send(&kh, PATH_HEALTH, ok_body, &[(HEADER_ENVELOPE, &forged)]).await;
    answer.assert_error(401, "auth_failed");
    assert_eq!(answer.json()["message"], "Invalid signature");
    for bad in ["", "keyId=zz", &format!("{header},")] {
        send(&kh, PATH_HEALTH, ok_body, &[(HEADER_ENVELOPE, bad)])
            .await
            .assert_error(401, "auth_failed");
    }
    send(&kh, PATH_HEALTH, ok_body, &[])
        .await
        .assert_error(401, "auth_failed");
    // A refused envelope does not burn its nonce: a forger cannot block the platform's request.
    let nonce = new_envelope_nonce();
    let ts = now();
    let good = sign_envelope(&key, ts, &nonce, "POST", PATH_HEALTH, ok_body);
    let forged_same_nonce = sign_envelope(&stranger, ts, &nonce, "POST", PATH_HEALTH, ok_body)
        .replace(&stranger.key_id(), &key.key_id());
    send(
        &kh,
        PATH_HEALTH,
        ok_body,
        &[(HEADER_ENVELOPE, &forged_same_nonce)],
    )
    .await
    .assert_error(401, "auth_failed");
    assert_eq!(
        send(&kh, PATH_HEALTH, ok_body, &[(HEADER_ENVELOPE, &good)])
            .await
            .status,
        200
    );

    // HMAC headers and platform tickets are refused, even made with the very HMAC secret the
    // keyholder keeps in its data folder.
    let stored_secret = {
        let data = kh.data_args();
        keyholder::cli::session::block(async {
            let owner = keyholder::cli::session::Owner::open(&data).await?;
            Ok(
                keyholder::vault::keyring::load_current(owner.storage(), &owner.master)
                    .await?
                    .1,
            )
        })
        .unwrap()
    };
    let ts = now();
    let sig = signature_header_value(&stored_secret, ts, ok_body);
    let ts_text = ts.to_string();
    send(
        &kh,
        PATH_HEALTH,
        ok_body,
        &[(HEADER_SIGNATURE, &sig), (HEADER_TIMESTAMP, &ts_text)],
    )
    .await
    .assert_error(401, "auth_failed");
    // ...also next to a valid envelope (one scheme per request).
    let valid = sign_envelope(
        &key,
        now(),
        &new_envelope_nonce(),
        "POST",
        PATH_HEALTH,
        ok_body,
    );
    send(
        &kh,
        PATH_HEALTH,
        ok_body,
        &[
            (HEADER_ENVELOPE, &valid),
            (HEADER_SIGNATURE, &sig),
            (HEADER_TIMESTAMP, &ts_text),
        ],
    )
    .await
    .assert_error(401, "auth_failed");
    let n = now();
    let claims = |svc: &str, pur| TicketClaims::new("u", svc, pur, n, n + 60, random_hex(16));
    let hmac_ticket = encode_ticket(&stored_secret, &claims("github", Purpose::AgentCredential));
    kh.credential_with(&hmac_ticket, "github")
        .await
        .assert_error(401, "ticket_invalid");

    // kh2 tickets: valid (404: nothing stored), replayed, forged, expired, wrong purpose.
    let kh2 = encode_kh2_ticket(&key, &claims("github", Purpose::AgentCredential));
    kh.credential_with(&kh2, "github")
        .await
        .assert_error(404, "token_not_found");
    kh.credential_with(&kh2, "github")
        .await
        .assert_error(401, "ticket_invalid");
    let forged = encode_kh2_ticket(&stranger, &claims("github", Purpose::AgentCredential));
    kh.credential_with(&forged, "github")
        .await
        .assert_error(401, "ticket_invalid");
    let expired = encode_kh2_ticket(
        &key,
        &TicketClaims::new(
            "u",
            "github",
            Purpose::AgentCredential,
            n - 120,
            n - 60,
            random_hex(16),
        ),
    );
    kh.credential_with(&expired, "github")
        .await
        .assert_error(401, "ticket_expired");
    let store_ticket = encode_kh2_ticket(&key, &claims("github", Purpose::Store));
    kh.credential_with(&store_ticket, "github")
        .await
        .assert_error(401, "ticket_invalid");

    // A re-bind can switch the scheme back: HMAC works again and envelopes and kh2 tickets stop.
    let back = kh.issue_code(true);
    let answer = kh.exchange(&back.code).await;
    assert_eq!(answer.status, 200);
    let secret = HmacSecret::from_base64(answer.json()["hmacSecret"].as_str().unwrap()).unwrap();
    assert!(!secret.ct_eq(&stored_secret));
    kh.secret = Some(secret);
    assert_eq!(kh.signed(PATH_HEALTH, &json!({})).await.status, 200);
    let (answer, _) = enveloped(&kh, &key, PATH_HEALTH, ok_body, now()).await;
    answer.assert_error(401, "auth_failed");
    let kh2 = encode_kh2_ticket(&key, &claims("github", Purpose::AgentCredential));
    kh.credential_with(&kh2, "github")
        .await
        .assert_error(401, "ticket_invalid");
    assert_eq!(kh.credential("github").await.status, 404);
    // platform-key commands need an asymmetric binding.
    let err = platform_key_cli(
        &kh,
        "add",
        public_key_file(keys_dir.path(), &stranger, false)
            .to_str()
            .unwrap(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("not bound asymmetrically"),
        "{err}"
    );
    // And back again with an asymmetric re-bind (through the SDK).
    let code = issue_asymmetric_code(
        &kh,
        &public_key_file(keys_dir.path(), &stranger, true),
        true,
    );
    let platform = Platform::bind_with_key(&kh.base, &code, stranger.duplicate())
        .await
        .err();
    // Plain http is refused by the SDK's defaults; the builder with the opt-out binds.
    assert!(platform.is_some());
    let platform = kh
        .sdk_builder()
        .bind_with_key(&code, stranger.duplicate())
        .await
        .unwrap();
    platform.health_signed().await.unwrap();
    assert_eq!(kh.signed(PATH_HEALTH, &json!({})).await.status, 401);
}

#[tokio::test]
async fn checker_runs_its_matrix_over_an_asymmetric_binding() {
    let keys_dir = tempfile::tempdir().unwrap();
    let kh = Keyholder::start().await;
    let key = PlatformSigningKey::generate();
    let code = issue_asymmetric_code(&kh, &public_key_file(keys_dir.path(), &key, false), false);
    let mut options = CheckOptions::new(
        kh.base.clone(),
        CheckAuth::PlatformKey {
            key: Box::new(key.duplicate()),
            bind_code: Some(code.clone()),
        },
    );
    options.danger_allow_http = true;
    options.retry = fast_retry();
    options.timeout = Duration::from_secs(10);
    let report = check::run(options).await;
    let text = report.to_text();
    assert!(report.ok(), "{text}");
    // Without a removed key, that one check is left out.
    assert_eq!(
        report.checks.len(),
        check::MATRIX.len()
            + check::PROTOCOL_24_MATRIX.len()
            + check::WIRE_MATRIX.len()
            + check::ENVELOPE_MATRIX.len()
            - 1,
        "{text}"
    );
    assert!(!text.contains(&code), "{text}");

    // Rotate, remove the first key, and run again with the new key and the removed one.
    let second = PlatformSigningKey::generate();
    platform_key_cli(
        &kh,
        "add",
        public_key_file(keys_dir.path(), &second, false)
            .to_str()
            .unwrap(),
    )
    .unwrap();
    platform_key_cli(&kh, "remove", &key.key_id()).unwrap();
    within(Duration::from_secs(2), || {
        active_key_ids(&kh) == [second.key_id()]
    })
    .await;
    let mut options = CheckOptions::new(
        kh.base.clone(),
        CheckAuth::PlatformKey {
            key: Box::new(second.duplicate()),
            bind_code: None,
        },
    );
    options.danger_allow_http = true;
    options.retry = fast_retry();
    options.timeout = Duration::from_secs(10);
    options.removed_platform_key = Some(key.duplicate());
    let report = check::run(options).await;
    let text = report.to_text();
    assert!(report.ok(), "{text}");
    assert_eq!(
        report.checks.len(),
        check::MATRIX.len()
            + check::PROTOCOL_24_MATRIX.len()
            + check::WIRE_MATRIX.len()
            + check::ENVELOPE_MATRIX.len(),
        "{text}"
    );
    assert!(report.check("removed_platform_key").unwrap().passed);
}

/// Every 32-byte value that can be read out of the data folder (unwrapped key-ring entries and
/// pending re-bind secrets, settings, platform-key rows, and every 32-byte window of them), tried as
/// an Ed25519 seed, never yields a platform public key; and no platform private-key bytes (raw, base64,
/// hex) appear anywhere in the folder's files.
#[tokio::test]
async fn data_folder_holds_nothing_that_signs_as_the_platform() {
    let keys_dir = tempfile::tempdir().unwrap();
    let mut kh = Keyholder::start().await;
    let first = PlatformSigningKey::generate();
    let second = PlatformSigningKey::generate();
    let code = issue_asymmetric_code(&kh, &public_key_file(keys_dir.path(), &first, true), false);
    let platform = kh
        .sdk_builder()
        .bind_with_key(&code, first.duplicate())
        .await
        .unwrap();
    platform.health_signed().await.unwrap();
    platform_key_cli(
        &kh,
        "add",
        public_key_file(keys_dir.path(), &second, false)
            .to_str()
            .unwrap(),
    )
    .unwrap();
    let issuer = platform.ticket_issuer();
    kh.sdk_builder()
        .agent()
        .unwrap()
        .store(
            issuer.store("github").expose(),
            "github",
            &TokenData::new().secret("accessToken", "gho_folder"),
        )
        .await
        .unwrap();
    kh.stop().await;

    let platform_publics = [
        *first.public_key().as_bytes(),
        *second.public_key().as_bytes(),
    ];
    let signs_as_platform = |candidate: &[u8]| -> bool {
        candidate.windows(32).any(|w| {
            let seed: [u8; 32] = w.try_into().unwrap();
            let public = PlatformSigningKey::from_seed(&seed).public_key();
            platform_publics.contains(public.as_bytes())
        })
    };

    // 1. Everything the keyholder itself can decrypt or read as a key.
    let data = kh.data_args();
    let master = keyholder::cli::session::block(async {
        Ok(keyholder::cli::session::Owner::open(&data).await?.master)
    })
    .unwrap();
    let conn = rusqlite::Connection::open(data.data_dir.join("keyholder.db")).unwrap();
    let mut candidates: Vec<Vec<u8>> = Vec::new();
    let mut stmt = conn
        .prepare("SELECT kind, version, wrapped FROM keyring")
        .unwrap();
    let rows: Vec<(String, u32, Vec<u8>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(rows.len() >= 3, "{rows:?}");
    for (kind, version, wrapped) in &rows {
        let plain = master.unwrap_key(kind, *version, wrapped).unwrap();
        candidates.push(plain.to_vec());
        candidates.push(wrapped.clone());
    }
    let mut stmt = conn
        .prepare("SELECT code_hash, pending_secret, platform_key FROM bind_codes")
        .unwrap();
    let codes: Vec<CodeRow> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (hash, pending, platform_key) in codes {
        if let Some(wrapped) = pending {
            candidates.push(
                master
                    .unwrap_key(&format!("bind:{hash}"), 0, &wrapped)
                    .unwrap()
                    .to_vec(),
            );
        }
        candidates.extend(platform_key);
    }
    let mut stmt = conn
        .prepare("SELECT public_key FROM platform_keys")
        .unwrap();
    let stored_publics: Vec<Vec<u8>> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    // Only the two public keys are kept.
    assert_eq!(stored_publics.len(), 2);
    for public in &stored_publics {
        assert!(platform_publics
            .iter()
            .any(|p| p.as_slice() == public.as_slice()));
    }
    candidates.extend(stored_publics);
    let mut stmt = conn.prepare("SELECT value FROM settings").unwrap();
    let settings: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for value in settings {
        candidates.push(value.as_bytes().to_vec());
        if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(&value) {
            candidates.push(raw);
        }
        if let Ok(raw) = hex::decode(&value) {
            candidates.push(raw);
        }
    }
    for candidate in &candidates {
        assert!(
            !signs_as_platform(candidate),
            "a stored value signs as the platform"
        );
    }

    // 2. No platform private-key bytes in any file of the folder, in any common encoding.
    let mut needles: Vec<Vec<u8>> = Vec::new();
    for key in [&first, &second] {
        let seed = key.to_seed();
        needles.push(seed.to_vec());
        needles.push(
            base64::engine::general_purpose::STANDARD
                .encode(seed.as_slice())
                .into_bytes(),
        );
        needles.push(hex::encode(seed.as_slice()).into_bytes());
    }
    let mut files = 0;
    for entry in std::fs::read_dir(&kh.data_dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        files += 1;
        let bytes = std::fs::read(&path).unwrap();
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "platform private key material in {}",
                path.display()
            );
        }
    }
    assert!(files >= 2, "the database and the master key file");
}

/// Issue 17, items 5 and 7 in the asymmetric binding: the envelope's signed nonce and target
/// already make its signed bytes single-use on one endpoint; the body requestId must still equal
/// the header, and `kh2` tickets obey the same `iat` rules and overflow-free clock arithmetic.
#[tokio::test]
async fn envelope_body_request_id_and_kh2_ticket_times() {
    let keys_dir = tempfile::tempdir().unwrap();
    let kh = Keyholder::start().await;
    let key = PlatformSigningKey::generate();
    let code = issue_asymmetric_code(&kh, &public_key_file(keys_dir.path(), &key, false), false);
    assert_eq!(kh.exchange(&code).await.status, 200);
    // `send` puts a fresh random request id in the header.
    let body = br#"{"requestId":"req_not_the_header"}"#;
    let (answer, _) = enveloped(&kh, &key, PATH_HEALTH, body, now()).await;
    answer.assert_error(401, "auth_failed");
    assert_eq!(
        answer.json()["message"],
        "Body requestId does not match X-TokenVault-Request-Id"
    );
    let header = sign_envelope(
        &key,
        now(),
        &new_envelope_nonce(),
        "POST",
        PATH_HEALTH,
        body,
    );
    let matching = read(
        kh.http
            .post(kh.url(PATH_HEALTH))
            .header(HEADER_ENVELOPE, header)
            .header(HEADER_PLATFORM_REQUEST_ID, "req_not_the_header")
            .body(body.to_vec())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(matching.status, 200);

    let n = now();
    for (iat, exp) in [
        (n + 30 * 86_400, n + 30 * 86_400 + 60),
        (n + 100, n + 50),
        (n + 300, n + 3_900),
        (i64::MAX - 60, i64::MAX),
        (i64::MIN, i64::MAX),
    ] {
        let claims = TicketClaims::new(
            "user_test",
            "github",
            Purpose::AgentCredential,
            iat,
            exp,
            random_hex(16),
        );
        let ticket = encode_kh2_ticket(&key, &claims);
        kh.credential_with(&ticket, "github")
            .await
            .assert_error(401, "ticket_invalid");
    }
}
