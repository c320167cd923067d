//! Browser store, agent access and TOTP: the flows, every ticket refusal, the network rules, CORS
//! and the response signature on every answer.

use keyholder_protocol::paths::*;
use keyholder_protocol::response_sig::verify_response;
use keyholder_protocol::ticket::encode_ticket;
use keyholder_protocol::{HmacSecret, Purpose, TicketClaims};
use keyholder_tests::*;
use serde_json::json;

async fn bound() -> Keyholder {
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    kh
}

#[tokio::test]
async fn store_then_fetch_as_agent_and_owner() {
    let kh = bound().await;
    let stored = kh
        .store("github", json!({"accessToken":"ghp_live_1234","refreshToken":"ghr_5678","scope":"repo","expiresAt":"2030-01-01T00:00:00Z"}))
        .await;
    stored.assert_ok();
    let body = stored.json();
    assert_eq!(body["status"], "stored");
    assert_eq!(body["service"], "github");
    let meta = &body["meta"];
    assert_eq!(meta["hasRefreshToken"], true);
    assert_eq!(meta["tokenType"], "oauth");
    assert_eq!(meta["scope"], "repo");
    assert_eq!(meta["expiryTime"], 1_893_456_000_000i64);
    assert!(!meta.to_string().contains("ghp_live_1234"));

    let fetched = kh.credential("github").await;
    assert_eq!(fetched.status, 200);
    let token = &fetched.json()["token"];
    assert_eq!(token["accessToken"], "ghp_live_1234");
    assert_eq!(token["refreshToken"], "ghr_5678");
    assert_eq!(token["scope"], "repo");
    assert_eq!(fetched.header("cache-control").as_deref(), Some("no-store"));

    // The owner's reveal, by POST with a JSON body.
    let ticket = kh.ticket(Purpose::UserReveal, "github");
    let reveal = read(
        kh.http
            .post(kh.url(PATH_CREDENTIAL))
            .json(&json!({"ticket": ticket, "service": "github"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reveal.json()["token"]["accessToken"], "ghp_live_1234");

    // What the platform can read is ciphertext bound to the service.
    let raw = kh
        .storage(json!({"operation":"get","collection":"tokens","key":"github"}))
        .await
        .json();
    let text = raw.to_string();
    assert!(
        !text.contains("ghp_live_1234") && !text.contains("ghr_5678"),
        "{text}"
    );
    assert!(raw["data"]["fields"]["accessToken"]
        .as_str()
        .unwrap()
        .starts_with("kh1:"));

    // A ciphertext moved to another service does not decrypt there (a 4xx: not retried).
    kh.storage(json!({"operation":"set","collection":"tokens","key":"gitlab","data":raw["data"]}))
        .await;
    kh.credential("gitlab")
        .await
        .assert_error(422, "corrupt_document");
}

#[tokio::test]
async fn store_modes_and_bad_bodies() {
    let kh = bound().await;
    assert_eq!(
        kh.store("svc", json!({"accessToken":"one"})).await.status,
        200
    );
    let mut claims = kh.claims(Purpose::Store, "svc");
    claims.mode = Some("create".into());
    kh.store_with(
        &kh.ticket_from(&claims),
        "svc",
        json!({"accessToken":"two"}),
    )
    .await
    .assert_error(409, "already_exists");
    assert_eq!(
        kh.credential("svc").await.json()["token"]["accessToken"],
        "one"
    );
    // Overwrite is the default.
    assert_eq!(
        kh.store("svc", json!({"accessToken":"three"})).await.status,
        200
    );
    assert_eq!(
        kh.credential("svc").await.json()["token"]["accessToken"],
        "three"
    );

    kh.store("svc", json!({}))
        .await
        .assert_error(400, "invalid_request");
    kh.store("svc", json!({"accessToken": 5}))
        .await
        .assert_error(400, "invalid_request");
    let no_data = read(
        kh.http
            .post(kh.url(PATH_STORE))
            .json(&json!({"ticket": kh.ticket(Purpose::Store, "svc"), "service":"svc"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    no_data.assert_error(400, "invalid_request");
    let no_ticket = read(
        kh.http
            .post(kh.url(PATH_STORE))
            .json(&json!({"service":"svc","tokenData":{"a":"b"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    no_ticket.assert_error(400, "invalid_request");
    let big = json!({"accessToken": "x".repeat(100 * 1024)});
    kh.store("svc", big)
        .await
        .assert_error(413, "payload_too_large");
    kh.credential("nothing-here")
        .await
        .assert_error(404, "token_not_found");
}

#[tokio::test]
async fn every_ticket_refusal() {
    let kh = bound().await;
    kh.store("github", json!({"accessToken":"ghp_x"})).await;
    let secret = kh.secret.as_ref().unwrap();
    let n = now();
    let base = TicketClaims::new(
        "user_test",
        "github",
        Purpose::AgentCredential,
        n,
        n + 60,
        random_hex(16),
    );
    let with = |f: &dyn Fn(&mut TicketClaims)| {
        let mut c = base.clone();
        c.nonce = Some(random_hex(16));
        f(&mut c);
        encode_ticket(secret, &c)
    };
    let good = with(&|_| {});
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "forged (other secret)",
            encode_ticket(&HmacSecret::generate(), &base),
            "ticket_invalid",
        ),
        ("malformed", "not-a-ticket".into(), "ticket_invalid"),
        ("three parts", format!("{good}.x"), "ticket_invalid"),
        ("tampered payload", format!("x{good}"), "ticket_invalid"),
        (
            "expired",
            with(&|c| {
                c.iat = Some(n - 120);
                c.exp = Some(n - 1);
            }),
            "ticket_expired",
        ),
        ("no exp", with(&|c| c.exp = None), "ticket_expired"),
        ("missing nonce", with(&|c| c.nonce = None), "ticket_invalid"),
        (
            "empty nonce",
            with(&|c| c.nonce = Some(String::new())),
            "ticket_invalid",
        ),
        (
            "lifetime over the cap",
            with(&|c| {
                c.iat = Some(n);
                c.exp = Some(n + 7200);
            }),
            "ticket_invalid",
        ),
        (
            "wrong purpose",
            with(&|c| c.pur = "store".into()),
            "ticket_invalid",
        ),
        (
            "proxy purpose",
            with(&|c| c.pur = "proxy".into()),
            "ticket_invalid",
        ),
        (
            "unknown purpose",
            with(&|c| c.pur = "root".into()),
            "ticket_invalid",
        ),
        (
            "wrong service",
            with(&|c| c.svc = "slack".into()),
            "ticket_invalid",
        ),
    ];
    for (name, ticket, code) in cases {
        let answer = kh.credential_with(&ticket, "github").await;
        assert_eq!(
            answer.status,
            401,
            "{name}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.error_code(), code, "{name}");
    }
    // Good once, then replayed.
    assert_eq!(kh.credential_with(&good, "github").await.status, 200);
    let replay = kh.credential_with(&good, "github").await;
    replay.assert_error(401, "ticket_invalid");
    assert_eq!(replay.json()["message"], "Ticket already used");
    // A store ticket replayed.
    let store_ticket = kh.ticket(Purpose::Store, "github");
    assert_eq!(
        kh.store_with(&store_ticket, "github", json!({"accessToken":"a"}))
            .await
            .status,
        200
    );
    kh.store_with(&store_ticket, "github", json!({"accessToken":"b"}))
        .await
        .assert_error(401, "ticket_invalid");
}

#[tokio::test]
async fn platform_address_is_refused_on_agent_endpoints() {
    let kh = bound().await;
    kh.store("github", json!({"accessToken":"ghp_x"})).await;
    let ticket = kh.ticket(Purpose::AgentCredential, "github");
    // Through a trusted proxy (loopback is trusted by default) reporting the platform's address.
    let url = reqwest::Url::parse_with_params(
        &kh.url(PATH_CREDENTIAL),
        &[("ticket", ticket.as_str()), ("service", "github")],
    )
    .unwrap();
    let refused = read(
        kh.http
            .get(url.clone())
            .header("x-forwarded-for", "203.0.113.9, 34.12.35.243")
            .send()
            .await
            .unwrap(),
    )
    .await;
    refused.assert_error(403, "forbidden");
    let store = read(
        kh.http
            .post(kh.url(PATH_STORE))
            .header("x-forwarded-for", "34.12.35.243")
            .json(&json!({"ticket": kh.ticket(Purpose::Store, "github"), "service":"github","tokenData":{"accessToken":"evil"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    store.assert_error(403, "forbidden");
    // The refused ticket was not consumed; an agent elsewhere still gets through.
    let ok = read(
        kh.http
            .get(url)
            .header("x-forwarded-for", "198.51.100.7")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["token"]["accessToken"], "ghp_x");
    let garbage = read(
        kh.http
            .get(kh.url("/v1/credential?ticket=a.b&service=github"))
            .header("x-forwarded-for", "not-an-ip")
            .send()
            .await
            .unwrap(),
    )
    .await;
    garbage.assert_error(400, "invalid_request");
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let mut kh =
        Keyholder::start_with(|c| c.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()]).await;
    kh.bind().await;
    kh.store("github", json!({"accessToken":"ghp_x"})).await;
    let ticket = kh.ticket(Purpose::AgentCredential, "github");
    let url = reqwest::Url::parse_with_params(
        &kh.url(PATH_CREDENTIAL),
        &[("ticket", ticket.as_str()), ("service", "github")],
    )
    .unwrap();
    // The header claims the platform's address, but the peer is not a trusted proxy: the peer counts.
    let answer = read(
        kh.http
            .get(url)
            .header("x-forwarded-for", "34.12.35.243")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    // And a platform address configured as the peer itself is refused.
    let mut kh2 = Keyholder::start_with(|c| {
        c.trusted_proxies = vec![];
        c.platform_ips = vec!["127.0.0.1".parse().unwrap()];
    })
    .await;
    kh2.bind().await;
    kh2.credential("github")
        .await
        .assert_error(403, "forbidden");
}

#[tokio::test]
async fn cors_preflight_and_headers() {
    let kh = bound().await;
    let origin = "https://tokenvault.uk";
    for path in [PATH_STORE, PATH_CREDENTIAL] {
        let pre = read(
            kh.http
                .request(reqwest::Method::OPTIONS, kh.url(path))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "content-type")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(pre.status, 204, "{path}");
        assert_eq!(
            pre.header("access-control-allow-origin").as_deref(),
            Some(origin)
        );
        assert!(pre
            .header("access-control-allow-methods")
            .unwrap()
            .contains("POST"));
        assert!(pre
            .header("access-control-allow-headers")
            .unwrap()
            .to_lowercase()
            .contains("content-type"));
    }
    // Errors carry CORS headers too, so the browser can read them.
    let err = read(
        kh.http
            .post(kh.url(PATH_STORE))
            .header("origin", origin)
            .body("{")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(err.status, 400);
    assert_eq!(
        err.header("access-control-allow-origin").as_deref(),
        Some(origin)
    );
    // Signed platform endpoints answer no CORS.
    let storage = read(
        kh.http
            .post(kh.url(PATH_STORAGE))
            .header("origin", origin)
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(storage.header("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn totp_codes_without_revealing_the_secret() {
    let kh = bound().await;
    let secret_b32 = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";
    assert_eq!(
        kh.store("bank", json!({"tokenType":"TOTP","totpSecret":secret_b32}))
            .await
            .status,
        200
    );
    let ticket = kh.ticket(Purpose::TotpCode, "bank");
    let url = reqwest::Url::parse_with_params(
        &kh.url(PATH_TOTP_CODE),
        &[("ticket", ticket.as_str()), ("service", "bank")],
    )
    .unwrap();
    let answer = read(kh.http.get(url).send().await.unwrap()).await;
    answer.assert_ok();
    let body = answer.json();
    let bytes = totp_rs::Secret::Encoded(secret_b32.into())
        .to_bytes()
        .unwrap();
    let reference = totp_rs::TOTP::new_unchecked(
        totp_rs::Algorithm::SHA1,
        6,
        1,
        30,
        bytes,
        None,
        String::new(),
    );
    let t = now() as u64;
    let expected = [reference.generate(t), reference.generate(t - 1)];
    assert!(
        expected.contains(&body["code"].as_str().unwrap().to_string()),
        "{body}"
    );
    assert_eq!(body["digits"], 6);
    assert_eq!(body["period"], 30);
    assert!(!answer
        .body
        .windows(8)
        .any(|w| w == &secret_b32.as_bytes()[..8]));
    // otpauth URI with 8 digits.
    let uri = format!("otpauth://totp/Bank:me?secret={secret_b32}&digits=8&period=60&issuer=Bank");
    kh.store("bank2", json!({"tokenType":"TOTP","totpSecret":uri}))
        .await;
    let ticket = kh.ticket(Purpose::AgentCredential, "bank2");
    let answer = read(
        kh.http
            .post(kh.url(PATH_TOTP_CODE))
            .json(&json!({"ticket":ticket,"service":"bank2"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.json()["digits"], 8);
    assert_eq!(answer.json()["period"], 60);
    // A non-TOTP credential.
    kh.store("github", json!({"accessToken":"ghp_x"})).await;
    let ticket = kh.ticket(Purpose::TotpCode, "github");
    let answer = read(
        kh.http
            .post(kh.url(PATH_TOTP_CODE))
            .json(&json!({"ticket":ticket,"service":"github"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    answer.assert_error(400, "not_totp");
    // A store ticket is no TOTP ticket.
    let ticket = kh.ticket(Purpose::Store, "bank");
    let answer = read(
        kh.http
            .post(kh.url(PATH_TOTP_CODE))
            .json(&json!({"ticket":ticket,"service":"bank"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    answer.assert_error(401, "ticket_invalid");
}

/// Answers finished together share one signature (the batch form): each still verifies alone,
/// over its own request id, status and body, and not for another answer of the batch.
#[tokio::test]
async fn concurrent_answers_share_a_batch_signature_that_verifies_for_each() {
    let kh = bound().await;
    let identity = kh.identity().await;
    let key = identity.verifying_key().unwrap();
    kh.store("github", json!({"accessToken":"ghp_x"})).await;
    let mut batched = 0;
    for _round in 0..20 {
        let calls = (0..48).map(|_| {
            let target = format!(
                "{PATH_CREDENTIAL}?ticket={}&service=github",
                kh.ticket(Purpose::AgentCredential, "github")
            );
            let request = kh.http.get(kh.url(&target)).send();
            async move { (target, read(request.await.unwrap()).await) }
        });
        let answers = futures_util::future::join_all(calls).await;
        let mut by_signature = std::collections::HashMap::<String, Vec<usize>>::new();
        for (i, (target, answer)) in answers.iter().enumerate() {
            assert_eq!(answer.status, 200);
            let rid = answer.header("x-request-id").unwrap();
            let sig = answer.header("x-keyholder-signature").unwrap();
            let parsed =
                verify_response(&key, &sig, "GET", target, &rid, 200, &answer.body).unwrap();
            if let Some(batch) = parsed.batch {
                batched += 1;
                assert!(batch.size >= 2 && batch.index < batch.size);
                let raw = sig
                    .split(",sig=")
                    .nth(1)
                    .unwrap()
                    .split(',')
                    .next()
                    .unwrap();
                by_signature.entry(raw.to_string()).or_default().push(i);
            }
        }
        for members in by_signature.values().filter(|m| m.len() >= 2) {
            let (a, b) = (&answers[members[0]], &answers[members[1]]);
            let rid_b = b.1.header("x-request-id").unwrap();
            let sig_a = a.1.header("x-keyholder-signature").unwrap();
            assert!(verify_response(&key, &sig_a, "GET", &b.0, &rid_b, 200, &b.1.body).is_err());
        }
        if batched > 0 && by_signature.values().any(|m| m.len() >= 2) {
            return;
        }
    }
    panic!("48 concurrent answers never shared a signature in 20 rounds ({batched} batched)");
}

#[tokio::test]
async fn every_response_is_signed_by_the_identity_key() {
    let kh = bound().await;
    let identity = kh.identity().await;
    let key = identity.verifying_key().unwrap();
    kh.store("github", json!({"accessToken":"ghp_x"})).await;
    let ticket = kh.ticket(Purpose::AgentCredential, "github");
    let target = format!("{PATH_CREDENTIAL}?ticket={ticket}&service=github");
    let ok = read(kh.http.get(kh.url(&target)).send().await.unwrap()).await;
    let error = read(kh.http.get(kh.url(&target)).send().await.unwrap()).await;
    let not_found = read(kh.http.get(kh.url("/nowhere?x=1")).send().await.unwrap()).await;
    let head = read(kh.http.head(kh.url(PATH_HEALTH)).send().await.unwrap()).await;
    for (method, path, answer) in [
        ("GET", target.as_str(), &ok),
        ("GET", target.as_str(), &error),
        ("GET", "/nowhere?x=1", &not_found),
        ("HEAD", PATH_HEALTH, &head),
    ] {
        let rid = answer.header("x-request-id").expect("request id");
        let sig = answer.header("x-keyholder-signature").expect("signature");
        verify_response(&key, &sig, method, path, &rid, answer.status, &answer.body).unwrap();
        // The same signature does not hold for another status or body.
        assert!(verify_response(
            &key,
            &sig,
            method,
            path,
            &rid,
            answer.status + 1,
            &answer.body
        )
        .is_err());
        assert!(verify_response(&key, &sig, method, path, &rid, answer.status, b"other").is_err());
    }
    assert_eq!(error.status, 401);
    assert_eq!(
        error.json()["requestId"],
        error.header("x-request-id").unwrap()
    );
    assert!(head.body.is_empty());
    // A caller-supplied request id is echoed when well-formed.
    let echoed = read(
        kh.http
            .get(kh.url(PATH_HEALTH))
            .header("x-request-id", "trace-123")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(echoed.header("x-request-id").as_deref(), Some("trace-123"));
    let replaced = read(
        kh.http
            .get(kh.url(PATH_HEALTH))
            .header("x-request-id", "bad id")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_ne!(replaced.header("x-request-id").as_deref(), Some("bad id"));
}
