//! Decrypt-and-sign minting: a Google service-account key and a GitHub App key sign RS256 JWTs that
//! local token endpoints verify with the public key; agents and the proxy get the minted token
//! (never the key), cached until shortly before it expires.

use keyholder_protocol::document::format_iso8601;
use keyholder_tests::upstream::{MockServer, Reply, TestRsa};
use keyholder_tests::*;
use serde_json::json;
use std::sync::Arc;

use crate::proxy::proxy_keyholder;

pub(crate) fn assert_no_key(answer: &Answer, pem: &str) {
    let text = String::from_utf8_lossy(&answer.body);
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    assert!(!text.contains(pem.lines().nth(1).unwrap()));
}

/// Google's token endpoint: checks the grant, the JWT signature and claims.
pub(crate) async fn google_endpoint(
    key: Arc<TestRsa>,
    email: &'static str,
    expires_in: i64,
) -> MockServer {
    MockServer::start(move |r| {
        let form = r.form();
        let assertion = form.get("assertion").cloned().unwrap_or_default();
        let Some(claims) = key.verify_jwt(&assertion) else {
            return Reply::json(400, json!({"error": "invalid_grant", "error_description": "bad signature"}));
        };
        let n = now();
        let ok = form.get("grant_type").map(String::as_str) == Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
            && claims["iss"] == email
            && claims["scope"] == "https://www.googleapis.com/auth/devstorage.read_only"
            && claims["aud"].as_str().is_some_and(|a| a.ends_with("/token"))
            && (claims["iat"].as_i64().unwrap() - n).abs() < 30
            && claims["exp"].as_i64().unwrap() > n;
        if !ok {
            return Reply::json(400, json!({"error": "invalid_grant", "claims": claims}));
        }
        Reply::json(200, json!({"access_token": format!("ya29.minted-{}", random_hex(4)), "expires_in": expires_in, "token_type": "Bearer"}))
    })
    .await
}

pub(crate) fn service_account(key: &TestRsa, token_uri: &str) -> String {
    json!({
        "type": "service_account", "project_id": "p", "private_key_id": "kid1",
        "private_key": key.private_pem(), "client_email": "sa@p.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": token_uri,
    })
    .to_string()
}

#[tokio::test]
async fn google_service_account_mints_and_caches() {
    let kh = proxy_keyholder(|_| {}).await;
    let key = Arc::new(TestRsa::generate());
    let google = google_endpoint(Arc::clone(&key), "sa@p.iam.gserviceaccount.com", 3600).await;
    let sa = service_account(&key, &google.url("/token"));
    // The owner allows the local token endpoint and API (the built-in ones are Google's own).
    let api = MockServer::ok().await;
    kh.egress("allow", "gcs", &[&google.origin(), &api.origin()], false)
        .await;
    let stored = kh
        .store("gcs", json!({"privateKeyData": sa, "tokenType": "service_account", "scopes": ["https://www.googleapis.com/auth/devstorage.read_only"]}))
        .await;
    assert_eq!(stored.status, 200);

    let first = kh.credential("gcs").await;
    first.assert_ok();
    let token = first.json()["token"].clone();
    let minted = token["accessToken"].as_str().unwrap().to_string();
    assert!(minted.starts_with("ya29.minted-"), "{token}");
    assert!(token.get("privateKeyData").is_none());
    assert_no_key(&first, &key.private_pem());
    assert!(token["expiryTime"].as_i64().unwrap() > now() * 1000);

    // Cached: the agent and the proxy get the same token without a second mint.
    let second = kh.credential("gcs").await;
    assert_eq!(second.json()["token"]["accessToken"], minted.as_str());
    assert_eq!(
        kh.proxy_get("gcs", &api.url("/storage/v1/b")).await.status,
        200
    );
    assert_eq!(
        api.requests()[0].header("authorization"),
        Some(format!("Bearer {minted}").as_str())
    );
    assert_eq!(google.count(), 1);
    assert!(!String::from_utf8_lossy(&api.requests()[0].body).contains("PRIVATE"));
}

#[tokio::test]
async fn short_lived_tokens_are_minted_again() {
    let kh = proxy_keyholder(|_| {}).await;
    let key = Arc::new(TestRsa::generate());
    // 30 s is inside the refresh margin: never served from the cache.
    let google = google_endpoint(Arc::clone(&key), "sa@p.iam.gserviceaccount.com", 30).await;
    kh.egress("allow", "gcs", &[&google.origin()], false).await;
    kh.egress("allow", "forged", &[&google.origin()], false)
        .await;
    kh.store("gcs", json!({"privateKeyData": service_account(&key, &google.url("/token")), "scope": "https://www.googleapis.com/auth/devstorage.read_only"}))
        .await;
    let a = kh.credential("gcs").await.json()["token"]["accessToken"].clone();
    let b = kh.credential("gcs").await.json()["token"]["accessToken"].clone();
    assert_ne!(a, b);
    assert_eq!(google.count(), 2);

    // A key the token endpoint cannot verify: provider_error, and nothing of the key in the answer.
    let other = TestRsa::generate();
    kh.store("forged", json!({"privateKeyData": service_account(&other, &google.url("/token")), "scope": "https://www.googleapis.com/auth/devstorage.read_only"}))
        .await;
    let refused = kh.credential("forged").await;
    refused.assert_error(502, "provider_error");
    assert_no_key(&refused, &other.private_pem());
}

#[tokio::test]
async fn github_app_installation_tokens_are_minted_and_cached() {
    let kh = proxy_keyholder(|_| {}).await;
    let key = Arc::new(TestRsa::generate());
    let verify = Arc::clone(&key);
    let github = MockServer::start(move |r| {
        let jwt = r.header("authorization").and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
        let Some(claims) = verify.verify_jwt(jwt) else {
            return Reply::json(401, json!({"message": "A JSON web token could not be decoded"}));
        };
        let n = now();
        let ok = r.method == "POST"
            && r.target == "/app/installations/678/access_tokens"
            && r.header("accept") == Some("application/vnd.github+json")
            && claims["iss"] == "12345"
            && claims["iat"].as_i64().unwrap() <= n
            && claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 600;
        if !ok {
            return Reply::json(403, json!({"message": "bad", "claims": claims}));
        }
        Reply::json(201, json!({"token": "ghs_installation_1", "expires_at": format_iso8601(n + 3600), "permissions": {"contents": "read"}}))
    })
    .await;
    // GitHub Enterprise-like: the owner allows the App's API host (minting and proxied calls).
    let api = MockServer::ok().await;
    kh.egress("allow", "gh-app", &[&github.origin(), &api.origin()], false)
        .await;
    let stored = kh
        .store("gh-app", json!({"tokenType": "GitHubApp", "appId": 12345, "installationId": "678", "apiUrl": github.origin(), "privateKeyData": key.private_pem()}))
        .await;
    assert_eq!(stored.status, 200);

    let answer = kh.credential("gh-app").await;
    answer.assert_ok();
    assert_eq!(answer.json()["token"]["accessToken"], "ghs_installation_1");
    assert_eq!(answer.json()["token"]["tokenType"], "GitHubApp");
    assert_no_key(&answer, &key.private_pem());

    let proxied = kh
        .proxy(
            "gh-app",
            json!({"url": api.url("/repos/o/r")}),
            json!({"Authorization": "token ${TOKEN}"}),
        )
        .await;
    assert_eq!(proxied.status, 200);
    assert_eq!(
        api.requests()[0].header("authorization"),
        Some("token ghs_installation_1")
    );
    assert_eq!(
        kh.credential("gh-app").await.json()["token"]["accessToken"],
        "ghs_installation_1"
    );
    assert_eq!(github.count(), 1, "cached until shortly before expiry");
}

#[tokio::test]
async fn token_endpoints_go_through_the_egress_guard() {
    // Guard fully on (default configuration).
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    let key = TestRsa::generate();
    let sink = MockServer::ok().await;
    kh.store(
        "meta",
        json!({"privateKeyData": service_account(&key, "http://169.254.169.254/token")}),
    )
    .await;
    kh.credential("meta")
        .await
        .assert_error(403, "egress_denied");
    kh.store("local", json!({"privateKeyData": service_account(&key, &format!("https://localhost:{}/token", sink.addr.port()))})).await;
    kh.credential("local")
        .await
        .assert_error(403, "egress_denied");
    kh.store("app", json!({"tokenType": "GitHubApp", "appId": "1", "installationId": "2", "apiUrl": format!("https://127.0.0.1:{}", sink.addr.port()), "privateKeyData": key.private_pem()})).await;
    kh.credential("app")
        .await
        .assert_error(403, "egress_denied");
    assert_eq!(sink.connections(), 0);
    let _ = Reply::text(200, "");
}
