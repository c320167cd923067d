//! OAuth refresh: `/v1/refresh-notify` with the owner's client (preferred), the platform's hint only
//! when trusted and never to a changed token URL, every meta field kept; tv-refresh off and on.

use std::time::Duration;

use keyholder_protocol::paths::*;
use keyholder_tests::upstream::{MockServer, Reply};
use keyholder_tests::*;
use serde_json::{json, Value};

/// A token endpoint that checks the form fields and the GitHub Accept header.
pub(crate) async fn token_endpoint(
    client_id: &'static str,
    secret: &'static str,
    refresh: &'static str,
    answer: Value,
) -> MockServer {
    MockServer::start(move |r| {
        let form = r.form();
        let ok = r.method == "POST"
            && r.header("content-type") == Some("application/x-www-form-urlencoded")
            && r.header("accept") == Some("application/json")
            && form.get("grant_type").map(String::as_str) == Some("refresh_token")
            && form.get("client_id").map(String::as_str) == Some(client_id)
            && form.get("client_secret").map(String::as_str) == Some(secret)
            && form.get("refresh_token").map(String::as_str) == Some(refresh);
        if ok {
            Reply::json(200, answer.clone())
        } else {
            Reply::json(
                400,
                json!({"error": "invalid_grant", "error_description": "bad form"}),
            )
        }
    })
    .await
}

async fn keyholder_with_token(adjust: impl FnOnce(&mut keyholder::Config)) -> Keyholder {
    let mut kh = Keyholder::start_with(|c| {
        c.egress_allow_private = true;
        adjust(c);
    })
    .await;
    kh.bind().await;
    let stored = kh
        .store(
            "github",
            json!({
                "accessToken": "gho_old", "refreshToken": "ghr_old", "provider": "github",
                "scope": "repo", "team": "platform", "serviceName": "GitHub (work)",
                "expiresAt": "2020-01-01T00:00:00Z",
            }),
        )
        .await;
    assert_eq!(stored.status, 200);
    kh
}

async fn notify(kh: &Keyholder, service: &str, hint: Value) -> Answer {
    kh.signed(
        PATH_REFRESH_NOTIFY,
        &json!({"requestId": format!("req_refresh_{}", random_hex(6)), "service": service, "reason": "expired", "refreshHint": hint}),
    )
    .await
}

fn meta_of(kh_answer: &Answer) -> Value {
    kh_answer.json()["token"].clone()
}

#[tokio::test]
async fn refresh_with_the_owners_client_keeps_every_meta_field() {
    let kh = keyholder_with_token(|_| {}).await;
    let before = kh.credential("github").await;
    let provider = token_endpoint(
        "owner-client",
        "owner-secret",
        "ghr_old",
        json!({"access_token": "gho_new", "expires_in": 7200, "token_type": "bearer"}),
    )
    .await;
    kh.oauth_set(
        "github",
        &provider.url("/login/oauth/access_token"),
        "owner-client",
        "owner-secret",
    );
    // The platform's hint points elsewhere; the owner's client wins even when trust is off.
    let platform = MockServer::ok().await;
    let answer = notify(&kh, "github", json!({"provider": "github", "tokenUrl": platform.url("/token"), "clientId": "p", "clientSecret": "platform-secret"})).await;
    answer.assert_ok();
    let body = answer.json();
    assert_eq!(body["status"], "refreshed", "{body}");
    assert!(body["requestId"]
        .as_str()
        .is_some_and(|id| id.starts_with("req_refresh_")));
    let new_expiry =
        keyholder_protocol::document::parse_iso8601(body["newExpiresAt"].as_str().unwrap())
            .unwrap();
    assert!((new_expiry - (now() + 7200)).abs() < 30);
    assert_eq!(provider.count(), 1);
    assert_eq!(platform.connections(), 0);
    assert!(!answer.body.windows(7).any(|w| w == b"gho_new"));

    let after = meta_of(&kh.credential("github").await);
    assert_eq!(after["accessToken"], "gho_new");
    assert_eq!(
        after["refreshToken"], "ghr_old",
        "kept when the provider sends none"
    );
    let before = meta_of(&before);
    for field in [
        "provider",
        "scope",
        "team",
        "serviceName",
        "tokenType",
        "createdAt",
        "hasRefreshToken",
    ] {
        assert_eq!(after[field], before[field], "{field}");
    }
    assert_eq!(after["expiryTime"], json!(new_expiry * 1000));
}

#[tokio::test]
async fn refresh_statuses() {
    let kh = keyholder_with_token(|_| {}).await;
    assert_eq!(
        notify(&kh, "nothing", json!({})).await.json()["status"],
        "no_token"
    );
    kh.store("plain", json!({"accessToken": "a"})).await;
    assert_eq!(
        notify(&kh, "plain", json!({})).await.json()["status"],
        "no_refresh_token"
    );

    // No local client and trust off: the platform's hint is not used.
    let platform = token_endpoint(
        "p",
        "platform-secret",
        "ghr_old",
        json!({"access_token": "x"}),
    )
    .await;
    let a = notify(&kh, "github", json!({"provider": "github", "tokenUrl": platform.url("/token"), "clientId": "p", "clientSecret": "platform-secret"})).await;
    assert_eq!(a.json()["status"], "acknowledged");
    assert_eq!(platform.connections(), 0);

    // The provider refuses: refresh_failed with its error code, the credential untouched.
    let refusing = token_endpoint("c", "s", "not-this-one", json!({})).await;
    kh.oauth_set("github", &refusing.url("/token"), "c", "s");
    let a = notify(&kh, "github", json!({})).await;
    let body = a.json();
    assert_eq!(body["status"], "refresh_failed");
    assert!(
        body["message"].as_str().unwrap().contains("invalid_grant"),
        "{body}"
    );
    assert_eq!(
        meta_of(&kh.credential("github").await)["accessToken"],
        "gho_old"
    );

    // The provider rotates the refresh token: the new one is stored.
    let rotating = token_endpoint(
        "c",
        "s",
        "ghr_old",
        json!({"access_token": "gho_2", "refresh_token": "ghr_2", "expires_in": "60"}),
    )
    .await;
    kh.oauth_set("github", &rotating.url("/token"), "c", "s");
    assert_eq!(
        notify(&kh, "github", json!({})).await.json()["status"],
        "refreshed"
    );
    let token = meta_of(&kh.credential("github").await);
    assert_eq!(token["accessToken"], "gho_2");
    assert_eq!(token["refreshToken"], "ghr_2");
}

#[tokio::test]
async fn platform_secret_only_when_trusted_and_never_to_a_new_token_url() {
    let kh = keyholder_with_token(|c| c.oauth_trust_platform_secret = true).await;
    // A platform-chosen token URL is under the egress policy: the owner allows the local hosts
    // here, so what this test sees is the token-URL pin (refusals by the policy: issue17.rs).
    kh.egress("allow", "github", &["127.0.0.1"], false).await;
    let first = token_endpoint(
        "platform-client",
        "platform-secret",
        "ghr_old",
        json!({"access_token": "gho_p1", "refresh_token": "ghr_p1"}),
    )
    .await;
    let hint = |url: String| json!({"provider": "github", "tokenUrl": url, "clientId": "platform-client", "clientSecret": "platform-secret"});
    let a = notify(&kh, "github", hint(first.url("/token"))).await;
    assert_eq!(a.json()["status"], "refreshed", "{}", a.json());
    assert_eq!(
        kh.egress("show", "github", &[], false).await.token_url,
        Some(first.url("/token"))
    );

    // The platform now points the refresh token at another host: refused, nothing sent.
    let evil = token_endpoint(
        "platform-client",
        "platform-secret",
        "ghr_p1",
        json!({"access_token": "stolen"}),
    )
    .await;
    notify(&kh, "github", hint(evil.url("/token")))
        .await
        .assert_error(403, "egress_denied");
    assert_eq!(evil.connections(), 0);
    // Another path on the same host is a different token URL, too.
    notify(&kh, "github", hint(first.url("/other")))
        .await
        .assert_error(403, "egress_denied");

    // The pinned one keeps working; the owner can reset the pin.
    let again = token_endpoint(
        "platform-client",
        "platform-secret",
        "ghr_p1",
        json!({"access_token": "gho_p2"}),
    )
    .await;
    kh.egress("reset", "github", &[], false).await;
    kh.egress("allow", "github", &["127.0.0.1"], false).await;
    assert_eq!(
        notify(&kh, "github", hint(again.url("/token")))
            .await
            .json()["status"],
        "refreshed"
    );
    assert_eq!(
        meta_of(&kh.credential("github").await)["accessToken"],
        "gho_p2"
    );
}

#[tokio::test]
async fn provider_timeout_and_guard() {
    let kh = keyholder_with_token(|c| c.provider_timeout = Duration::from_secs(1)).await;
    let slow = MockServer::start(|_| {
        Reply::json(200, json!({"access_token": "late"})).delayed(Duration::from_secs(4))
    })
    .await;
    kh.oauth_set("github", &slow.url("/token"), "c", "s");
    notify(&kh, "github", json!({}))
        .await
        .assert_error(504, "provider_timeout");
    kh.oauth_set("github", "http://169.254.169.254/token", "c", "s");
    notify(&kh, "github", json!({}))
        .await
        .assert_error(403, "egress_denied");
}

#[tokio::test]
async fn tv_refresh_is_refused_unless_enabled() {
    let kh = keyholder_with_token(|_| {}).await;
    let health = kh.signed(PATH_HEALTH, &json!({})).await.json();
    assert!(!health["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("tv-refresh")));
    let a = kh
        .signed(PATH_REFRESH, &json!({"action": "get", "service": "github"}))
        .await;
    a.assert_error(403, "forbidden");
    assert!(!String::from_utf8_lossy(&a.body).contains("ghr_old"));
    kh.signed(
        PATH_REFRESH,
        &json!({"action": "update", "service": "github", "tokens": {"accessToken": "x"}}),
    )
    .await
    .assert_error(403, "forbidden");
    assert_eq!(
        meta_of(&kh.credential("github").await)["accessToken"],
        "gho_old"
    );
}

#[tokio::test]
async fn tv_refresh_get_and_update_when_enabled() {
    let kh = keyholder_with_token(|c| c.enable_tv_refresh = true).await;
    let health = read(kh.http.get(kh.url(PATH_HEALTH)).send().await.unwrap())
        .await
        .json();
    assert!(health["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("tv-refresh")));
    let got = kh
        .signed(
            PATH_REFRESH,
            &json!({"requestId": "r1", "action": "get", "service": "github"}),
        )
        .await
        .json();
    assert_eq!(got["status"], "ok");
    assert_eq!(got["refreshToken"], "ghr_old");
    assert_eq!(got["meta"]["team"], "platform");
    assert!(got["meta"].get("accessToken").is_none());
    assert_eq!(
        kh.signed(
            PATH_REFRESH,
            &json!({"action": "get", "service": "nothing"})
        )
        .await
        .json()["status"],
        "no_token"
    );

    let expiry_ms = (now() + 3000) * 1000;
    let updated = kh
        .signed(PATH_REFRESH, &json!({"action": "update", "service": "github", "tokens": {"accessToken": "gho_tv", "refreshToken": "ghr_tv", "expiryTime": expiry_ms}}))
        .await;
    let text = String::from_utf8_lossy(&updated.body).to_string();
    assert_eq!(updated.json()["status"], "updated", "{text}");
    assert!(
        !text.contains("gho_tv") && !text.contains("ghr_tv"),
        "tokens echoed: {text}"
    );
    assert_eq!(
        keyholder_protocol::document::parse_iso8601(
            updated.json()["newExpiresAt"].as_str().unwrap()
        ),
        Some(expiry_ms / 1000)
    );
    let token = meta_of(&kh.credential("github").await);
    assert_eq!(token["accessToken"], "gho_tv");
    assert_eq!(token["refreshToken"], "ghr_tv");
    assert_eq!(token["team"], "platform");
    assert_eq!(token["expiryTime"], json!(expiry_ms));
    kh.signed(
        PATH_REFRESH,
        &json!({"action": "rotate", "service": "github"}),
    )
    .await
    .assert_error(400, "invalid_request");
}
