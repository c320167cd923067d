//! The `keyholder-client` SDK and the `keyholder-check` matrix against the real keyholder in process:
//! bind, storage with pagination, tickets, agent store/fetch/TOTP, identity pinning, typed errors,
//! retries, and the checker's verdicts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::TryStreamExt as _;
use keyholder_check::{self as check, CheckAuth, CheckOptions};
use keyholder_client::{ClientBuilder, Error, IdentityPin, Platform, StoreMode, TokenData};
use keyholder_protocol::wire::{Collection, ListOptions};
use keyholder_protocol::{ErrorCode, HmacSecret, IdentityKey, Purpose};
use keyholder_tests::*;
use serde_json::{json, Map, Value};

async fn bound_platform(kh: &Keyholder) -> Platform {
    let code = kh.issue_code(false);
    kh.sdk_builder().bind(&code.code).await.unwrap()
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

#[tokio::test]
async fn sdk_binds_stores_fetches_and_pages() {
    let kh = Keyholder::start().await;
    let platform = bound_platform(&kh).await;
    let info = platform.exchange_info().unwrap();
    assert!(info.capabilities.contains(&"storage".to_owned()));
    // Trust on first use: the announced identity is pinned from then on.
    assert!(info.signing_key.is_some());
    assert!(platform.auth().hmac_secret().is_some());

    let public = platform.health().await.unwrap();
    let signed = platform.health_signed().await.unwrap();
    assert_eq!(public.status, "healthy");
    assert_eq!(signed.capabilities, info.capabilities);

    // Storage: write five, page through them two at a time.
    for i in 0..5 {
        platform
            .storage_set(
                Collection::ProxyConfigs,
                &format!("cfg{i}"),
                &object(json!({"meta": {"n": i}, "url": "https://api.example"})),
            )
            .await
            .unwrap();
    }
    let got = platform
        .storage_get(Collection::ProxyConfigs, "cfg3")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got["meta"]["n"], 3);
    assert_eq!(
        platform
            .storage_get(Collection::ProxyConfigs, "missing")
            .await
            .unwrap(),
        None
    );
    let options = ListOptions {
        limit: Some(2),
        ..Default::default()
    };
    let pages: Vec<_> = platform
        .list_pages(Collection::ProxyConfigs, options.clone())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(pages.len(), 3);
    assert_eq!(pages[0].pagination.as_ref().unwrap().total_count, 5);
    let all = platform
        .list_all(Collection::ProxyConfigs, options.clone())
        .await
        .unwrap();
    let keys: Vec<&str> = all.iter().map(|i| i["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["cfg0", "cfg1", "cfg2", "cfg3", "cfg4"]);
    let batch = platform
        .storage_list_batch(&[Collection::ProxyConfigs, Collection::Tokens], &options)
        .await
        .unwrap();
    assert_eq!(batch["proxy_configs"].items.len(), 2);
    assert!(batch.contains_key("tokens"));
    platform
        .storage_delete(Collection::ProxyConfigs, "cfg3")
        .await
        .unwrap();
    assert_eq!(
        platform
            .list_all(Collection::ProxyConfigs, ListOptions::default())
            .await
            .unwrap()
            .len(),
        4
    );

    // Agent side: the browser's store, the agent's fetch (direct and by redirect), TOTP.
    let issuer = platform.ticket_issuer().subject("user_test");
    let agent = kh.sdk_builder().agent().unwrap();
    let data = TokenData::new()
        .secret("accessToken", "ghp_sdk_1234")
        .secret("refreshToken", "ghr_sdk_5678")
        .field("scope", "repo");
    let stored = agent
        .store(issuer.store("github").expose(), "github", &data)
        .await
        .unwrap();
    assert_eq!(stored.status, "stored");
    assert_eq!(stored.meta["hasRefreshToken"], true);
    let create = issuer
        .ticket(Purpose::Store, "github")
        .mode(StoreMode::Create)
        .mint();
    let err = agent
        .store(create.expose(), "github", &data)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyExists));

    let credential = agent
        .credential(issuer.credential("github").expose(), "github")
        .await
        .unwrap();
    assert_eq!(credential.access_token().unwrap().expose(), "ghp_sdk_1234");
    assert_eq!(credential.refresh_token().unwrap().expose(), "ghr_sdk_5678");
    assert_eq!(credential.get("scope").unwrap().expose(), "repo");
    assert!(!format!("{credential:?}").contains("ghp_sdk_1234"));

    let ticket = issuer.credential("github");
    let location = reqwest::Url::parse_with_params(
        &kh.url("/v1/credential"),
        &[("ticket", ticket.expose()), ("service", "github")],
    )
    .unwrap();
    let again = agent
        .credential_from_redirect(location.as_str())
        .await
        .unwrap();
    assert_eq!(again.access_token().unwrap().expose(), "ghp_sdk_1234");
    let elsewhere = location.as_str().replace("127.0.0.1", "localhost");
    assert!(matches!(
        agent.credential_from_redirect(&elsewhere).await,
        Err(Error::Config(_))
    ));

    agent
        .store(
            issuer.store("otp").expose(),
            "otp",
            &TokenData::new()
                .secret("totpSecret", "JBSWY3DPEHPK3PXP")
                .field("tokenType", "TOTP"),
        )
        .await
        .unwrap();
    let code = agent
        .totp_code(issuer.totp("otp").expose(), "otp")
        .await
        .unwrap();
    assert_eq!(code.code.expose().len(), 6);
    assert_eq!(code.period, 30);
    let not_totp = agent
        .totp_code(issuer.totp("github").expose(), "github")
        .await
        .unwrap_err();
    assert_eq!(not_totp.code(), Some(ErrorCode::NotTotp));
}

#[tokio::test]
async fn typed_errors_keep_status_code_and_request_id_and_no_secret() {
    let kh = Keyholder::start().await;
    let platform = bound_platform(&kh).await;
    let agent = kh.sdk_builder().agent().unwrap();
    let issuer = platform.ticket_issuer();

    // Replayed nonce: the first use finds nothing, the second is refused.
    let ticket = issuer.credential("nothing");
    let first = agent
        .credential(ticket.expose(), "nothing")
        .await
        .unwrap_err();
    assert_eq!(first.code(), Some(ErrorCode::TokenNotFound));
    let second = agent
        .credential(ticket.expose(), "nothing")
        .await
        .unwrap_err();
    assert_eq!(second.status(), Some(401));
    assert_eq!(second.code(), Some(ErrorCode::TicketInvalid));
    let id = second.request_id().unwrap();
    assert!(id.starts_with("kh_"), "{id}");
    for text in [format!("{second:?}"), second.to_string()] {
        assert!(!text.contains(ticket.expose()), "{text}");
    }

    // A platform with the wrong secret: 401 auth_failed, not retried.
    let forged = kh.sdk_builder().platform(HmacSecret::generate()).unwrap();
    let e = forged.health_signed().await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AuthFailed));

    // A bind code works once.
    let code = kh.issue_code(true);
    kh.sdk_builder().bind(&code.code).await.unwrap();
    let reuse = kh.sdk_builder().bind(&code.code).await.unwrap_err();
    assert_eq!(reuse.code(), Some(ErrorCode::CodeUsed));
    // ...and the rebind replaced the secret the first platform had.
    assert_eq!(
        platform.health_signed().await.unwrap_err().code(),
        Some(ErrorCode::AuthFailed)
    );

    // Plain http without the opt-out is refused before any request.
    assert!(matches!(
        ClientBuilder::new(kh.base.clone()).agent(),
        Err(Error::Config(_))
    ));
}

#[tokio::test]
async fn identity_pinning() {
    let mut kh = Keyholder::start().await;
    let secret = kh.bind().await;
    let answer = read(kh.http.get(kh.url("/v1/identity")).send().await.unwrap()).await;
    let doc: keyholder_protocol::IdentityDocument = serde_json::from_value(answer.json()).unwrap();
    let same = || HmacSecret::from_bytes(*secret.expose());

    // Pinned by key id (resolved through /v1/identity) and by document: every answer verifies.
    for pin in [
        IdentityPin::key_id(&doc.key_id).unwrap(),
        IdentityPin::document(&doc).unwrap(),
    ] {
        let platform = kh.sdk_builder().pin_identity(pin).platform(same()).unwrap();
        platform.health_signed().await.unwrap();
        // Error answers are signed too.
        let e = platform
            .storage_get(Collection::Tokens, "")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidRequest));
    }

    // A wrong public key: every answer is refused.
    let wrong = IdentityPin::public_key(IdentityKey::generate().verifying_key());
    let platform = kh
        .sdk_builder()
        .pin_identity(wrong.clone())
        .platform(same())
        .unwrap();
    assert!(matches!(
        platform.health().await,
        Err(Error::ResponseSignature { .. })
    ));
    // A wrong key id: the identity document does not match.
    let platform = kh
        .sdk_builder()
        .pin_identity(IdentityPin::key_id("0000000000000000").unwrap())
        .platform(same())
        .unwrap();
    assert!(matches!(
        platform.health().await,
        Err(Error::IdentityMismatch { .. })
    ));
    // A bind whose announced identity is not the pinned one fails.
    let code = kh.issue_code(true);
    let e = kh
        .sdk_builder()
        .pin_identity(wrong)
        .bind(&code.code)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ResponseSignature { .. } | Error::IdentityMismatch { .. }
        ),
        "{e:?}"
    );
}

/// A loopback server that answers every request with `status` and records the request ids it saw.
async fn counting_server(status: u16) -> (String, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = vec![0u8; 8192];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let text = String::from_utf8_lossy(&buf[..n]).to_lowercase();
            let id = text
                .lines()
                .find_map(|l| l.strip_prefix("x-tokenvault-request-id: "))
                .unwrap_or("")
                .trim()
                .to_owned();
            log.lock().unwrap().push(id);
            let body = r#"{"error":"internal_error","message":"boom"}"#;
            let answer = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    (url, seen)
}

#[tokio::test]
async fn retries_follow_the_platform_policy() {
    let (url, seen) = counting_server(503).await;
    let platform = ClientBuilder::new(url)
        .danger_allow_http()
        .retry(fast_retry())
        .platform(HmacSecret::generate())
        .unwrap();
    let e = platform.health_signed().await.unwrap_err();
    assert_eq!(e.status(), Some(503));
    let ids = seen.lock().unwrap().clone();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    assert_eq!(e.request_id(), Some(ids[2].as_str()));

    let (url, seen) = counting_server(400).await;
    let platform = ClientBuilder::new(url)
        .danger_allow_http()
        .retry(fast_retry())
        .platform(HmacSecret::generate())
        .unwrap();
    assert_eq!(
        platform.health_signed().await.unwrap_err().status(),
        Some(400)
    );
    assert_eq!(seen.lock().unwrap().len(), 1);

    // A single-use ticket call is not repeated after a 5xx.
    let (url, seen) = counting_server(500).await;
    let agent = ClientBuilder::new(url)
        .danger_allow_http()
        .retry(fast_retry())
        .agent()
        .unwrap();
    assert!(agent.credential("t.s", "svc").await.is_err());
    assert_eq!(seen.lock().unwrap().len(), 1);
}

fn options(kh: &Keyholder, auth: CheckAuth) -> CheckOptions {
    let mut options = CheckOptions::new(kh.base.clone(), auth);
    options.danger_allow_http = true;
    options.retry = fast_retry();
    options.timeout = Duration::from_secs(10);
    options
}

/// Every check of the matrix passes against our keyholder (the unsigned-proxy probe included).
fn assert_all_pass(report: &check::Report) {
    let text = report.to_text();
    assert_eq!(
        report.checks.len(),
        check::MATRIX.len() + check::PROTOCOL_24_MATRIX.len() + check::WIRE_MATRIX.len(),
        "{text}"
    );
    for c in &report.checks {
        assert!(c.passed, "{}: {}\n{text}", c.name, c.detail);
        assert!(!c.exchanges.is_empty(), "{}", c.name);
    }
    assert!(report.ok(), "{text}");
    assert!(text.ends_with(&format!("{} passed, 0 failed\n", report.passed)));
    assert!(
        text.contains("The webhook speaks protocol 2.4.0\n"),
        "{text}"
    );
}

/// With `--stream-service` the checker verifies a streamed proxy answer end to end (pinned to the
/// identity the exchange announced).
#[tokio::test]
async fn checker_verifies_a_streamed_answer_from_our_keyholder() {
    let kh = Keyholder::start_with(|c| c.egress_allow_private = true).await;
    kh.egress("allow", "keyholder-check-stream", &["127.0.0.1"], false)
        .await;
    let code = kh.issue_code(false);
    let mut options = options(&kh, CheckAuth::BindCode(code.code.clone()));
    options.stream_service = Some("keyholder-check-stream".into());
    let report = check::run(options).await;
    let text = report.to_text();
    assert!(report.ok(), "{text}");
    let streamed = report.check("streamed_answer").unwrap();
    assert!(streamed.passed, "{text}");
    assert!(text.contains("PASS streaming/streamed_answer"), "{text}");
}

#[tokio::test]
async fn checker_passes_against_our_keyholder() {
    let kh = Keyholder::start().await;
    let code = kh.issue_code(false);
    let report = check::run(options(&kh, CheckAuth::BindCode(code.code.clone()))).await;
    assert_all_pass(&report);
    let text = report.to_text();
    // Tickets and the bind code never appear in the report.
    assert!(!text.contains(&code.code), "{text}");
    assert!(text.contains("ticket=<masked>"), "{text}");
    let json = report.to_json();
    assert_eq!(
        json["checks"].as_array().unwrap().len(),
        check::MATRIX.len() + check::PROTOCOL_24_MATRIX.len() + check::WIRE_MATRIX.len()
    );
    assert_eq!(json["protocol_version"], "2.4.0");
    assert_eq!(json["passed"], report.passed);

    // With the secret of an already-bound keyholder (the checker's own bind above gave it).
    let mut kh2 = Keyholder::start().await;
    let secret = kh2.bind().await;
    let report = check::run(options(&kh2, CheckAuth::Secret(secret))).await;
    assert_all_pass(&report);
    // Nothing the checker wrote is left behind.
    let left = kh2
        .storage(json!({"operation":"list","collection":"vault_config"}))
        .await
        .json();
    assert_eq!(left["items"], json!([]), "{left}");
    let left = kh2
        .storage(json!({"operation":"list","collection":"tokens"}))
        .await
        .json();
    assert_eq!(left["items"], json!([]), "{left}");
}

#[tokio::test]
async fn checker_fails_with_a_wrong_pinned_identity() {
    let mut kh = Keyholder::start().await;
    let secret = kh.bind().await;
    let mut opts = options(&kh, CheckAuth::Secret(secret));
    opts.pin = Some(IdentityPin::public_key(
        IdentityKey::generate().verifying_key(),
    ));
    let report = check::run(opts).await;
    assert!(!report.ok());
    assert_eq!(report.passed, 0, "{}", report.to_text());

    let code = kh.issue_code(true);
    let mut opts = options(&kh, CheckAuth::BindCode(code.code));
    opts.pin = Some(IdentityPin::key_id("0123456789abcdef").unwrap());
    let report = check::run(opts).await;
    assert!(!report.ok());
    assert_eq!(report.checks[0].group, "setup", "{}", report.to_text());
}
