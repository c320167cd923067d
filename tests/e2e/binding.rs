//! Binding: bind codes only from the owner, one-time exchange, refusals, re-bind.

use keyholder_protocol::paths::*;
use keyholder_protocol::response_sig::verify_response;
use keyholder_protocol::{HmacSecret, IdentityDocument, Purpose};
use keyholder_tests::*;
use serde_json::json;

#[tokio::test]
async fn unbound_keyholder_refuses_everything_but_health() {
    let kh = Keyholder::start().await;
    let health = read(kh.http.get(kh.url(PATH_HEALTH)).send().await.unwrap()).await;
    assert_eq!(health.status, 200);
    let signed = read(
        kh.http
            .post(kh.url(PATH_STORAGE))
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    signed.assert_error(403, "setup_required");
    let cred = read(
        kh.http
            .get(kh.url("/v1/credential?ticket=a.b&service=github"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    cred.assert_error(403, "setup_required");
}

#[tokio::test]
async fn exchange_hands_over_the_secret_once() {
    let kh = Keyholder::start().await;
    let issued = kh.issue_code(false);
    assert_eq!(issued.expires_in, 300);
    let answer = kh.exchange(&issued.code).await;
    assert_eq!(answer.status, 200);
    let body = answer.json();
    let secret = HmacSecret::from_base64(body["hmacSecret"].as_str().unwrap()).unwrap();
    // The registration link carried the secret's hash, so the platform can check it.
    assert!(issued
        .registration_url
        .contains(&format!("hmac_hash={}", secret.sha256_hex())));
    assert!(issued
        .registration_url
        .starts_with("https://tokenvault.uk/vault/webhook-bind?code="));
    assert_eq!(body["version"], "2.4.0");
    assert!(body["webhookId"].as_str().unwrap().starts_with("wh_"));
    // Capabilities equal those of health.
    let health = read(kh.http.get(kh.url(PATH_HEALTH)).send().await.unwrap())
        .await
        .json();
    assert_eq!(body["capabilities"], health["capabilities"]);
    // The signing key is the identity that signs responses.
    let identity: IdentityDocument = serde_json::from_value(body["signingKey"].clone()).unwrap();
    let key = identity.verifying_key().unwrap();
    let sig = answer.header("x-keyholder-signature").unwrap();
    let rid = answer.header("x-request-id").unwrap();
    verify_response(&key, &sig, "POST", PATH_EXCHANGE, &rid, 200, &answer.body).unwrap();
    let published = kh.identity().await;
    assert_eq!(published, identity);

    // The same code again: used.
    kh.exchange(&issued.code)
        .await
        .assert_error(410, "code_used");
    // Unknown code: expired.
    kh.exchange(&uuid::Uuid::new_v4().to_string())
        .await
        .assert_error(410, "code_expired");
    // Missing code and bad JSON: invalid.
    let missing = read(
        kh.http
            .post(kh.url(PATH_EXCHANGE))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    missing.assert_error(400, "invalid_request");
    let bad = read(
        kh.http
            .post(kh.url(PATH_EXCHANGE))
            .body("{nope")
            .send()
            .await
            .unwrap(),
    )
    .await;
    bad.assert_error(400, "invalid_request");
}

#[tokio::test]
async fn a_bound_keyholder_issues_no_plain_codes_and_refuses_stale_ones() {
    let mut kh = Keyholder::start().await;
    let early = kh.issue_code(false);
    kh.bind().await;
    // A plain code issued before binding cannot re-bind it.
    kh.exchange(&early.code)
        .await
        .assert_error(403, "forbidden");
    let args = keyholder::cli::bind::BindArgs {
        data: kh.data_args(),
        public_url: None,
        frontend_url: DEFAULT_FRONTEND.into(),
        rebind: false,
        platform_key: None,
        json: false,
    };
    let err = keyholder::cli::bind::bind(&args)
        .expect_err("refused once bound")
        .to_string();
    assert!(err.contains("--rebind"), "{err}");
}

#[tokio::test]
async fn an_expired_code_is_refused() {
    let kh = Keyholder::start().await;
    let issued = kh.issue_code(false);
    let conn = rusqlite::Connection::open(kh.data_dir.join("keyholder.db")).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    conn.execute("UPDATE bind_codes SET expires_at = expires_at - 301", [])
        .unwrap();
    kh.exchange(&issued.code)
        .await
        .assert_error(410, "code_expired");
}

#[tokio::test]
async fn rebind_replaces_the_secret_at_exchange() {
    let mut kh = Keyholder::start().await;
    let old = kh.bind().await;
    assert_eq!(kh.signed(PATH_HEALTH, &json!({})).await.status, 200);
    let issued = kh.issue_code(true);
    assert!(issued.rebind);
    // Until the exchange, the old secret keeps working.
    assert_eq!(kh.signed(PATH_HEALTH, &json!({})).await.status, 200);
    let answer = kh.exchange(&issued.code).await;
    assert_eq!(answer.status, 200);
    let new = HmacSecret::from_base64(answer.json()["hmacSecret"].as_str().unwrap()).unwrap();
    assert!(!new.ct_eq(&old));
    assert!(issued.registration_url.contains(&new.sha256_hex()));
    // The old secret now fails, for signed calls and for tickets.
    kh.signed(PATH_HEALTH, &json!({}))
        .await
        .assert_error(401, "auth_failed");
    let old_ticket = kh.ticket(Purpose::AgentCredential, "github");
    kh.secret = Some(HmacSecret::from_bytes(*new.expose()));
    assert_eq!(kh.signed(PATH_HEALTH, &json!({})).await.status, 200);
    kh.credential_with(&old_ticket, "github")
        .await
        .assert_error(401, "ticket_invalid");
}

#[tokio::test]
async fn bind_page_shows_the_link_only_for_a_live_code() {
    let kh = Keyholder::start().await;
    let page = read(kh.http.get(kh.url(PATH_BIND)).send().await.unwrap()).await;
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body.clone()).unwrap();
    assert!(html.contains("Not bound yet"));
    assert!(!html.contains("webhook-bind"));
    let issued = kh.issue_code(false);
    let page = read(
        kh.http
            .get(kh.url(&format!("/bind?code={}", issued.code)))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("webhook-bind?code="), "{html}");
    assert!(html.contains(&issued.code));
    let wrong = read(
        kh.http
            .get(kh.url(&format!("/bind?code={}", uuid::Uuid::new_v4())))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let html = String::from_utf8(wrong.body).unwrap();
    assert!(!html.contains("webhook-bind"));
    assert!(html.contains("unknown, used or expired"));
}
