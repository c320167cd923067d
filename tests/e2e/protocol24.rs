//! Protocol 2.4.0 (issue 18, PROTOCOL.md §7) against a running server: version and capabilities,
//! ticket constraints (`stale_creation`, store `mode`/`cid`), `totpUri` sealed at store, on read, at
//! start and by `/v1/admin/migrate`, TOTP codes on the credential path, and the per-address limit.
//! Every refusal is made the way a hostile platform (or its script in the browser) would make it.

use keyholder_protocol::paths::*;
use keyholder_protocol::{HmacSecret, Purpose, TicketClaims};
use keyholder_tests::upstream::{MockServer, Reply};
use keyholder_tests::*;
use serde_json::{json, Value};

const SEED: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

fn link(seed: &str) -> String {
    format!("otpauth://totp/Bank:alice%40example.com?secret={seed}&issuer=Bank&digits=8&period=60&algorithm=SHA256")
}

async fn bound() -> Keyholder {
    let mut kh = Keyholder::start_with(|c| c.egress_allow_private = true).await;
    kh.bind().await;
    kh
}

/// True when `text` holds the seed in any case, or any otpauth link.
fn leaks_seed(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains(&SEED.to_ascii_lowercase()[..16]) || lower.contains("otpauth")
}

/// The codes a `digits`/`period` TOTP of `seed` may show around now (either side of a step).
fn expected_codes(
    seed: &str,
    algorithm: totp_rs::Algorithm,
    digits: usize,
    period: u64,
) -> Vec<String> {
    let bytes = totp_rs::Secret::Encoded(seed.into()).to_bytes().unwrap();
    let totp =
        totp_rs::TOTP::new_unchecked(algorithm, digits, 1, period, bytes, None, String::new());
    let t = now() as u64;
    vec![totp.generate(t - 1), totp.generate(t), totp.generate(t + 1)]
}

async fn get_with_claims(kh: &Keyholder, path: &str, claims: &TicketClaims) -> Answer {
    let ticket = kh.ticket_from(claims);
    let url = reqwest::Url::parse_with_params(
        &kh.url(path),
        &[
            ("ticket", ticket.as_str()),
            ("service", claims.svc.as_str()),
        ],
    )
    .unwrap();
    read(kh.http.get(url).send().await.unwrap()).await
}

fn with_cid(mut claims: TicketClaims, cid: Value) -> TicketClaims {
    claims.cid = Some(cid);
    claims
}

#[tokio::test]
async fn version_and_capabilities_in_canonical_order() {
    let mut kh = Keyholder::start().await;
    let code = kh.issue_code(false);
    let exchange = kh.exchange(&code.code).await;
    let body = exchange.json();
    assert_eq!(body["version"], "2.4.0");
    let expected = json!([
        "store",
        "credential",
        "proxy",
        "refresh",
        "storage",
        "totp",
        "ticketConstraints"
    ]);
    assert_eq!(body["capabilities"], expected);
    kh.secret = Some(HmacSecret::from_base64(body["hmacSecret"].as_str().unwrap()).unwrap());
    let public = read(kh.http.get(kh.url(PATH_HEALTH)).send().await.unwrap()).await;
    assert_eq!(public.json()["version"], "2.4.0");
    assert_eq!(public.json()["capabilities"], expected);
    let signed = kh.signed(PATH_HEALTH, &json!({})).await;
    assert_eq!(signed.json()["capabilities"], expected);

    // tv-refresh only when the owner enables it, in its canonical place.
    let kh = Keyholder::start_with(|c| c.enable_tv_refresh = true).await;
    let health = read(kh.http.get(kh.url(PATH_HEALTH)).send().await.unwrap()).await;
    assert_eq!(
        health.json()["capabilities"],
        json!([
            "store",
            "credential",
            "proxy",
            "refresh",
            "tv-refresh",
            "storage",
            "totp",
            "ticketConstraints"
        ])
    );
}

#[tokio::test]
async fn stale_creation_refuses_credential_totp_and_proxy_tickets() {
    let kh = bound().await;
    let store = with_cid(kh.claims(Purpose::Store, "github"), json!("c1"));
    let stored = kh
        .store_with(
            &kh.ticket_from(&store),
            "github",
            json!({"accessToken": "ghp_c1_secret"}),
        )
        .await;
    stored.assert_ok();
    assert_eq!(stored.json()["meta"]["creationId"], "c1");

    // Credential path: another cid, an empty one, a number, all refused; the right one answers.
    for cid in [json!("other"), json!(""), json!(1), json!(["c1"])] {
        let claims = with_cid(kh.claims(Purpose::AgentCredential, "github"), cid.clone());
        let answer = get_with_claims(&kh, PATH_CREDENTIAL, &claims).await;
        answer.assert_error(409, "stale_creation");
        assert_eq!(
            answer.json()["message"],
            "Token was replaced since this ticket was issued"
        );
        assert!(
            !String::from_utf8_lossy(&answer.body).contains("ghp_c1_secret"),
            "{cid}"
        );
    }
    let claims = with_cid(kh.claims(Purpose::UserReveal, "github"), json!("c1"));
    let answer = get_with_claims(&kh, PATH_CREDENTIAL, &claims).await;
    assert_eq!(answer.json()["token"]["accessToken"], "ghp_c1_secret");
    // A ticket without cid keeps the old behaviour.
    assert_eq!(kh.credential("github").await.status, 200);

    // A token without a creationId fails a ticket that carries one.
    kh.store("plain", json!({"accessToken": "ghp_plain"})).await;
    let claims = with_cid(kh.claims(Purpose::AgentCredential, "plain"), json!("c1"));
    get_with_claims(&kh, PATH_CREDENTIAL, &claims)
        .await
        .assert_error(409, "stale_creation");
    // So does a plaintext document the platform wrote with a top-level creationId of its own.
    kh.storage(json!({"operation":"set","collection":"tokens","key":"flat",
        "data":{"accessToken":"flat_secret","creationId":"f1"}}))
        .await;
    let claims = with_cid(kh.claims(Purpose::AgentCredential, "flat"), json!("f2"));
    get_with_claims(&kh, PATH_CREDENTIAL, &claims)
        .await
        .assert_error(409, "stale_creation");
    let claims = with_cid(kh.claims(Purpose::AgentCredential, "flat"), json!("f1"));
    assert_eq!(
        get_with_claims(&kh, PATH_CREDENTIAL, &claims).await.json()["token"]["accessToken"],
        "flat_secret"
    );

    // TOTP-code path.
    let totp = with_cid(kh.claims(Purpose::Store, "bank"), json!("t1"));
    kh.store_with(
        &kh.ticket_from(&totp),
        "bank",
        json!({"totpSecret": SEED, "tokenType": "TOTP"}),
    )
    .await;
    for purpose in [
        Purpose::TotpCode,
        Purpose::AgentCredential,
        Purpose::UserReveal,
    ] {
        let claims = with_cid(kh.claims(purpose, "bank"), json!("t0"));
        get_with_claims(&kh, PATH_TOTP_CODE, &claims)
            .await
            .assert_error(409, "stale_creation");
    }
    let claims = with_cid(kh.claims(Purpose::TotpCode, "bank"), json!("t1"));
    assert_eq!(
        get_with_claims(&kh, PATH_TOTP_CODE, &claims).await.status,
        200
    );

    // Proxy path: refused before any upstream call.
    let upstream = MockServer::start(|_| Reply::json(200, json!({"ok": true}))).await;
    kh.egress("allow", "github", &["127.0.0.1"], false).await;
    let proxy = |cid: &str| {
        let claims = with_cid(kh.claims(Purpose::Proxy, "github"), json!(cid));
        json!({
            "ticket": kh.ticket_from(&claims),
            "service": "github",
            "upstream": {"url": upstream.url("/user"), "method": "GET"},
            "headerTemplates": {"Authorization": "Bearer ${TOKEN}"},
            "requestId": format!("req_{}", random_hex(8)),
        })
    };
    kh.signed(PATH_PROXY, &proxy("stale"))
        .await
        .assert_error(409, "stale_creation");
    assert_eq!(
        upstream.count(),
        0,
        "the upstream was called for a stale ticket"
    );
    let ok = kh.signed(PATH_PROXY, &proxy("c1")).await;
    ok.assert_ok();
    assert_eq!(upstream.count(), 1);
    assert_eq!(
        upstream.requests()[0].header("authorization"),
        Some("Bearer ghp_c1_secret")
    );
}

#[tokio::test]
async fn store_constraints_and_creation_id() {
    let kh = bound().await;
    // A bad mode or cid is a 400, and nothing is stored.
    for (mode, cid) in [
        (Some(json!("replace")), None),
        (Some(json!("Create")), None),
        (Some(json!(1)), None),
        (None, Some(json!(""))),
        (None, Some(json!(5))),
        (None, Some(json!({"id": "x"}))),
    ] {
        let mut claims = kh.claims(Purpose::Store, "svc");
        claims.mode = mode.clone();
        claims.cid = cid.clone();
        kh.store_with(
            &kh.ticket_from(&claims),
            "svc",
            json!({"accessToken": "nope"}),
        )
        .await
        .assert_error(400, "invalid_request");
        kh.credential("svc")
            .await
            .assert_error(404, "token_not_found");
    }

    // First store (create) with cid c1; the browser's own creationId is ignored.
    let mut claims = with_cid(kh.claims(Purpose::Store, "svc"), json!("c1"));
    claims.mode = Some(json!("create"));
    let first = kh
        .store_with(
            &kh.ticket_from(&claims),
            "svc",
            json!({"accessToken": "one", "creationId": "forged"}),
        )
        .await;
    first.assert_ok();
    let first_meta = first.json()["meta"].clone();
    assert_eq!(first_meta["creationId"], "c1");
    // mode: create over it is a 409, and the token stays.
    let mut again = with_cid(kh.claims(Purpose::Store, "svc"), json!("c9"));
    again.mode = Some(json!("create"));
    kh.store_with(
        &kh.ticket_from(&again),
        "svc",
        json!({"accessToken": "two"}),
    )
    .await
    .assert_error(409, "already_exists");
    assert_eq!(
        kh.credential("svc").await.json()["token"]["accessToken"],
        "one"
    );

    // Overwrite with cid c2 a second later: createdAt kept, updatedAt set, creationId c2.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let mut over = with_cid(kh.claims(Purpose::Store, "svc"), json!("c2"));
    over.mode = Some(json!("overwrite"));
    let second = kh
        .store_with(&kh.ticket_from(&over), "svc", json!({"accessToken": "two"}))
        .await;
    let meta = second.json()["meta"].clone();
    assert_eq!(meta["creationId"], "c2");
    assert_eq!(meta["createdAt"], first_meta["createdAt"]);
    assert_ne!(meta["updatedAt"], first_meta["updatedAt"]);
    let old = with_cid(kh.claims(Purpose::AgentCredential, "svc"), json!("c1"));
    get_with_claims(&kh, PATH_CREDENTIAL, &old)
        .await
        .assert_error(409, "stale_creation");

    // An overwrite whose ticket has no cid leaves the token without one.
    let third = kh
        .store(
            "svc",
            json!({"accessToken": "three", "creationId": "forged"}),
        )
        .await;
    assert!(
        third.json()["meta"].get("creationId").is_none(),
        "{}",
        third.json()
    );
    let stored = kh
        .storage(json!({"operation":"get","collection":"tokens","key":"svc"}))
        .await
        .json();
    assert!(stored["data"]["meta"].get("creationId").is_none());
    assert_eq!(stored["data"]["meta"]["createdAt"], first_meta["createdAt"]);
    let claims = with_cid(kh.claims(Purpose::AgentCredential, "svc"), json!("c2"));
    get_with_claims(&kh, PATH_CREDENTIAL, &claims)
        .await
        .assert_error(409, "stale_creation");
}

#[tokio::test]
async fn totp_uri_is_sealed_at_store_and_codes_replace_the_seed() {
    let kh = bound().await;
    // The seed in lower case: the sealed one is normalised to upper case.
    let stored = kh
        .store(
            "bank",
            json!({"totpUri": link(&SEED.to_ascii_lowercase()), "note": "n"}),
        )
        .await;
    stored.assert_ok();
    assert!(
        !leaks_seed(&String::from_utf8_lossy(&stored.body)),
        "store answer leaks"
    );
    let meta = stored.json()["meta"].clone();
    assert_eq!(meta["tokenType"], "TOTP");
    assert_eq!(meta["hasTotpSecret"], true);
    assert_eq!(meta["totpIssuer"], "Bank");
    assert_eq!(meta["totpAccountName"], "alice@example.com");
    assert_eq!(meta["totpAlgorithm"], "SHA256");
    assert_eq!(meta["totpDigits"], 8);
    assert_eq!(meta["totpPeriod"], 60);
    assert!(meta.get("totpUri").is_none());

    // Nothing the platform can read holds the seed or the link.
    for request in [
        json!({"operation":"get","collection":"tokens","key":"bank"}),
        json!({"operation":"list","collection":"tokens"}),
        json!({"operation":"list_batch","collections":["tokens"]}),
    ] {
        let answer = kh.storage(request.clone()).await;
        assert_eq!(answer.status, 200);
        assert!(
            !leaks_seed(&String::from_utf8_lossy(&answer.body)),
            "{request}"
        );
    }
    let doc = kh
        .storage(json!({"operation":"get","collection":"tokens","key":"bank"}))
        .await
        .json();
    assert!(doc["data"]["fields"]["totpSecret"]
        .as_str()
        .unwrap()
        .starts_with("kh1:"));
    // Nor the database itself (and its write-ahead log), in plain text.
    for file in ["keyholder.db", "keyholder.db-wal"] {
        if let Ok(bytes) = std::fs::read(kh.data_dir.join(file)) {
            assert!(!leaks_seed(&String::from_utf8_lossy(&bytes)), "{file}");
        }
    }

    // /v1/credential answers with the current code, never the seed.
    let expected = expected_codes(SEED, totp_rs::Algorithm::SHA256, 8, 60);
    for purpose in [Purpose::AgentCredential, Purpose::UserReveal] {
        let claims = kh.claims(purpose, "bank");
        let answer = get_with_claims(&kh, PATH_CREDENTIAL, &claims).await;
        assert_eq!(answer.status, 200);
        assert!(!leaks_seed(&String::from_utf8_lossy(&answer.body)));
        let token = answer.json()["token"].clone();
        assert!(
            expected.contains(&token["accessToken"].as_str().unwrap().to_string()),
            "{token}"
        );
        assert_eq!(token["tokenType"], "TOTP");
        assert_eq!(token["serviceName"], "bank");
        assert_eq!(token["digits"], 8);
        assert_eq!(token["period"], 60);
        assert_eq!(token["totpGenerated"], true);
        let remaining = token["remainingSeconds"].as_u64().unwrap();
        assert!((1..=60).contains(&remaining));
        assert!(token.get("totpSecret").is_none());
    }
    // /v1/totp-code with the link's parameters, for every accepted purpose.
    for purpose in [
        Purpose::TotpCode,
        Purpose::AgentCredential,
        Purpose::UserReveal,
    ] {
        let answer = get_with_claims(&kh, PATH_TOTP_CODE, &kh.claims(purpose, "bank")).await;
        let body = answer.json();
        assert!(
            expected.contains(&body["code"].as_str().unwrap().to_string()),
            "{body}"
        );
        assert_eq!(
            (body["digits"].clone(), body["period"].clone()),
            (json!(8), json!(60))
        );
    }
    // ... but not from the platform's address.
    let ticket = kh.ticket(Purpose::TotpCode, "bank");
    let url = reqwest::Url::parse_with_params(
        &kh.url(PATH_TOTP_CODE),
        &[("ticket", ticket.as_str()), ("service", "bank")],
    )
    .unwrap();
    read(
        kh.http
            .get(url)
            .header("X-Forwarded-For", PLATFORM_EGRESS_IP)
            .send()
            .await
            .unwrap(),
    )
    .await
    .assert_error(403, "forbidden");
}

#[tokio::test]
async fn malformed_totp_links_are_refused_and_nothing_is_stored() {
    let kh = bound().await;
    let bad = [
        json!({"totpUri": format!("https://totp/a?secret={SEED}")}),
        json!({"totpUri": format!("otpauth://hotp/a?secret={SEED}&counter=1")}),
        json!({"totpUri": "otpauth://totp/a?secret=JBSW1!"}),
        json!({"totpUri": format!("otpauth://totp/a?secret={SEED}&digits=5")}),
        json!({"totpUri": format!("otpauth://totp/a?secret={SEED}&digits=9")}),
        json!({"totpUri": format!("otpauth://totp/a?secret={SEED}&period=0")}),
        json!({"totpUri": format!("otpauth://totp/a?secret={SEED}&period=3601")}),
        json!({"totpUri": format!("otpauth://totp/a?secret={SEED}&algorithm=MD5")}),
        json!({"totpUri": format!("otpauth://totp/a?secret={SEED}&x={}", "y".repeat(3000))}),
        json!({"totpUri": 7}),
        json!({"totpUri": link(SEED), "totpSecret": SEED}),
    ];
    for token_data in bad {
        let answer = kh.store("bank", token_data.clone()).await;
        answer.assert_error(400, "invalid_request");
        // The message names the problem, never the link or its seed.
        assert!(
            !answer.json()["message"]
                .to_string()
                .to_ascii_lowercase()
                .contains("jbswy3dp"),
            "{}",
            answer.json()
        );
        kh.credential("bank")
            .await
            .assert_error(404, "token_not_found");
        let got = kh
            .storage(json!({"operation":"get","collection":"tokens","key":"bank"}))
            .await;
        assert_eq!(got.json()["data"], Value::Null, "{token_data}");
    }
    // A malformed link over an existing token leaves that token as it was.
    kh.store("bank", json!({"totpSecret": SEED, "tokenType": "TOTP"}))
        .await;
    let before = kh
        .storage(json!({"operation":"get","collection":"tokens","key":"bank"}))
        .await
        .json();
    kh.store("bank", json!({"totpUri": "otpauth://totp/a?secret=A"}))
        .await
        .assert_error(400, "invalid_request");
    let after = kh
        .storage(json!({"operation":"get","collection":"tokens","key":"bank"}))
        .await
        .json();
    assert_eq!(before["data"], after["data"]);
}

/// A platform-written document with the link in meta (the shape the previous release stored):
/// sealed on first read, and by `/v1/admin/migrate`, which answers counts only.
#[tokio::test]
async fn stored_links_are_sealed_on_read_and_by_admin_migrate() {
    let kh = bound().await;
    // Today's store of an ordinary token, then the link added to its meta the way the previous
    // release kept it.
    kh.store(
        "bank",
        json!({"accessToken": "at_bank", "tokenType": "TOTP"}),
    )
    .await;
    let mut doc = kh
        .storage(json!({"operation":"get","collection":"tokens","key":"bank"}))
        .await
        .json()["data"]
        .clone();
    doc["meta"]["totpUri"] = json!(link(SEED));
    doc["meta"]["creationId"] = json!("c1");
    let mut malformed = doc.clone();
    malformed["meta"]["totpUri"] = json!(format!("otpauth://totp/a?secret={SEED}&digits=5"));
    for (key, data) in [
        ("bank", doc.clone()),
        ("broken", malformed),
        ("flat", json!({"totpUri": link(SEED), "tokenType": "TOTP"})),
        ("other", json!({"accessToken": "x"})),
    ] {
        let set = kh
            .storage(json!({"operation":"set","collection":"tokens","key":key,"data":data}))
            .await;
        assert_eq!(set.status, 200);
    }

    // Unsigned or forged: refused, nothing swept.
    let forged = HmacSecret::from_bytes([9u8; 32]);
    let raw = br#"{"requestId":"req_forged_1"}"#;
    kh.signed_raw_with(&forged, PATH_ADMIN_MIGRATE, raw, now(), "req_forged_1")
        .await
        .assert_error(401, "auth_failed");
    let unsigned = read(
        kh.http
            .post(kh.url(PATH_ADMIN_MIGRATE))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    unsigned.assert_error(401, "auth_failed");
    let rows = |key: &str| -> String {
        let conn = rusqlite::Connection::open(kh.data_dir.join("keyholder.db")).unwrap();
        conn.query_row(
            "SELECT doc FROM documents WHERE collection = 'tokens' AND key = ?1",
            [key],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert!(rows("bank").contains("otpauth"));

    // First read of one of them seals it, in the answer and in the database.
    let got = kh
        .storage(json!({"operation":"get","collection":"tokens","key":"flat"}))
        .await;
    assert!(
        !leaks_seed(&String::from_utf8_lossy(&got.body)),
        "{}",
        got.json()
    );
    assert!(got.json()["data"]["fields"]["totpSecret"]
        .as_str()
        .unwrap()
        .starts_with("kh1:"));
    assert!(!leaks_seed(&rows("flat")));

    // The sweep: four scanned; bank sealed (flat was, on its read), broken failed.
    let swept = kh
        .signed(PATH_ADMIN_MIGRATE, &json!({"requestId": "req_migrate_1"}))
        .await;
    swept.assert_ok();
    assert_eq!(
        swept.json(),
        json!({"status": "ok", "totp": {"scanned": 4, "migrated": 1, "failed": 1}})
    );
    assert!(!leaks_seed(&rows("bank")));
    assert!(
        rows("broken").contains("otpauth"),
        "a link that cannot be sealed stays on disk"
    );
    // Run again: nothing left to do but the broken one.
    let again = kh.signed(PATH_ADMIN_MIGRATE, &json!({})).await;
    assert_eq!(
        again.json()["totp"],
        json!({"scanned": 4, "migrated": 0, "failed": 1})
    );

    // The sealed document keeps its creationId and createdAt, answers codes, and the broken one's
    // link is left out of every answer.
    let bank = kh
        .storage(json!({"operation":"get","collection":"tokens","key":"bank"}))
        .await
        .json()["data"]
        .clone();
    assert_eq!(bank["meta"]["creationId"], "c1");
    assert_eq!(bank["meta"]["createdAt"], doc["meta"]["createdAt"]);
    assert_eq!(bank["meta"]["totpDigits"], 8);
    let claims = with_cid(kh.claims(Purpose::AgentCredential, "bank"), json!("c1"));
    let token = get_with_claims(&kh, PATH_CREDENTIAL, &claims).await.json()["token"].clone();
    assert!(expected_codes(SEED, totp_rs::Algorithm::SHA256, 8, 60)
        .contains(&token["accessToken"].as_str().unwrap().to_string()));
    for request in [
        json!({"operation":"get","collection":"tokens","key":"broken"}),
        json!({"operation":"list","collection":"tokens"}),
        json!({"operation":"list_batch","collections":["tokens","audit"]}),
    ] {
        let answer = kh.storage(request.clone()).await;
        assert!(
            !leaks_seed(&String::from_utf8_lossy(&answer.body)),
            "{request}"
        );
    }
    let broken = kh.credential("broken").await;
    assert!(!leaks_seed(&String::from_utf8_lossy(&broken.body)));
}

/// The data folder of the previous release (`tests/fixtures/data-2.2.0-totp-uri`, written by the
/// pre-2.4.0 binary, which kept the link in meta) is upgraded when today's server starts on it.
#[tokio::test]
async fn data_folder_of_the_previous_release_is_upgraded_at_start() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data-2.2.0-totp-uri");
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for file in ["keyholder.db", "master.key"] {
        std::fs::copy(fixture.join(file), data.join(file)).unwrap();
    }
    let before: String = rusqlite::Connection::open(data.join("keyholder.db"))
        .unwrap()
        .query_row(
            "SELECT doc FROM documents WHERE collection = 'tokens' AND key = 'bank'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        before.contains("otpauth://totp/") && before.contains(SEED),
        "fixture as made"
    );

    let mut kh = Keyholder::start_config(Keyholder::config_in(&data)).await;
    let secret = std::fs::read_to_string(fixture.join("hmac_secret.b64")).unwrap();
    kh.secret = Some(HmacSecret::from_base64(secret.trim()).unwrap());
    // Sealed at start, before any read.
    let after: String = rusqlite::Connection::open(data.join("keyholder.db"))
        .unwrap()
        .query_row(
            "SELECT doc FROM documents WHERE collection = 'tokens' AND key = 'bank'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!leaks_seed(&after), "{after}");
    let after: Value = serde_json::from_str(&after).unwrap();
    assert!(after["fields"]["totpSecret"]
        .as_str()
        .unwrap()
        .starts_with("kh1:"));
    assert_eq!(after["meta"]["totpIssuer"], "Bank");
    assert_eq!(after["meta"]["hasTotpSecret"], true);
    // Nothing the platform reads holds it, the code works, the other token is untouched.
    for request in [
        json!({"operation":"get","collection":"tokens","key":"bank"}),
        json!({"operation":"list","collection":"tokens"}),
    ] {
        let answer = kh.storage(request).await;
        assert_eq!(answer.status, 200);
        assert!(!leaks_seed(&String::from_utf8_lossy(&answer.body)));
    }
    let token = kh.credential("bank").await.json()["token"].clone();
    assert!(
        expected_codes(SEED, totp_rs::Algorithm::SHA1, 8, 60)
            .contains(&token["accessToken"].as_str().unwrap().to_string()),
        "{token}"
    );
    assert_eq!(
        kh.credential("github").await.json()["token"]["accessToken"],
        "ghp_fixture_token"
    );
    let migrate = kh.signed(PATH_ADMIN_MIGRATE, &json!({})).await;
    assert_eq!(
        migrate.json()["totp"],
        json!({"scanned": 2, "migrated": 0, "failed": 0})
    );
    kh.stop().await;
}

#[tokio::test]
async fn per_address_rate_limit_answers_429_with_retry_after() {
    let mut kh = Keyholder::start_with(|c| c.rate_limit_per_ip = Some(3)).await;
    kh.bind().await; // one request
    let health = || async { read(kh.http.get(kh.url(PATH_HEALTH)).send().await.unwrap()).await };
    assert_eq!(health().await.status, 200);
    assert_eq!(health().await.status, 200);
    let limited = health().await;
    limited.assert_error(429, "rate_limited");
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(limited.header("x-keyholder-signature").is_some());
    // Every route, preflights and unknown paths included.
    let preflight = read(
        kh.http
            .request(reqwest::Method::OPTIONS, kh.url(PATH_STORE))
            .header("Origin", "https://tokenvault.uk")
            .send()
            .await
            .unwrap(),
    )
    .await;
    preflight.assert_error(429, "rate_limited");
    let store = kh.store("svc", json!({"accessToken": "x"})).await;
    store.assert_error(429, "rate_limited");
    read(kh.http.get(kh.url("/nope")).send().await.unwrap())
        .await
        .assert_error(429, "rate_limited");
    // Another client behind the trusted proxy (loopback) has its own allowance.
    let other = read(
        kh.http
            .get(kh.url(PATH_HEALTH))
            .header("X-Forwarded-For", "198.51.100.7")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(other.status, 200);

    // Without the flag there is no limit.
    let kh = Keyholder::start().await;
    for _ in 0..20 {
        assert_eq!(
            read(kh.http.get(kh.url(PATH_HEALTH)).send().await.unwrap())
                .await
                .status,
            200
        );
    }
}

/// `keyholder import-reference`: the reference webhook keeps `totpUri` in meta; the import seals it
/// (a link that cannot be sealed stops the import, naming the document, with nothing imported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_reference_seals_totp_links() {
    use keyholder_protocol::document::encrypt_platform_v1_field;
    use keyholder_protocol::DataKey;

    let reference_key = DataKey::generate();
    let reference_secret = HmacSecret::generate();
    let key_file = json!({
        "webhook_id": "wh_reference24",
        "encryption_key": reference_key.to_base64().as_str(),
        "hmac_secret": reference_secret.to_base64().as_str(),
        "hmac_secret_hash": reference_secret.sha256_hex(),
        "tokenvault_origin": "https://tokenvault.uk",
        "is_configured": true,
    });
    let bank = json!({
        "v": 1, "alg": "AES-256-GCM",
        "fields": {"accessToken": encrypt_platform_v1_field(&reference_key, b"at_reference")},
        "meta": {"serviceName": "bank", "tokenType": "TOTP", "totpUri": link(SEED),
                 "createdAt": "2024-01-01T00:00:00Z", "creationId": "ref_c1"}
    });
    let files = tempfile::tempdir().unwrap();
    let store_file = files.path().join("tokenvault_store.json");
    let kv_file = files.path().join("tokenvault_kv_store.json");
    std::fs::write(&store_file, key_file.to_string()).unwrap();
    let import = |kh: &Keyholder, collections: Value| {
        std::fs::write(&kv_file, collections.to_string()).unwrap();
        let args = keyholder::cli::import_reference::ImportReferenceArgs {
            data: kh.data_args(),
            store: store_file.clone(),
            kv: kv_file.clone(),
            force: false,
        };
        std::thread::spawn(move || keyholder::cli::import_reference::import_reference(&args))
            .join()
            .unwrap()
    };

    let mut kh = Keyholder::start().await;
    let mut broken = bank.clone();
    broken["meta"]["totpUri"] = json!("otpauth://hotp/x?secret=JBSWY3DP&counter=1");
    let err = import(
        &kh,
        json!({"tokens": {"bank": bank.clone(), "broken": broken}}),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tokens/broken") && !err.contains("JBSWY3DP"),
        "{err}"
    );

    let report = import(&kh, json!({"tokens": {"bank": bank}})).unwrap();
    assert_eq!(report.totp_links_sealed, 1);
    let row: String = rusqlite::Connection::open(kh.data_dir.join("keyholder.db"))
        .unwrap()
        .query_row(
            "SELECT doc FROM documents WHERE collection = 'tokens' AND key = 'bank'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!leaks_seed(&row), "{row}");
    let row: Value = serde_json::from_str(&row).unwrap();
    assert_eq!(row["meta"]["creationId"], "ref_c1");
    assert_eq!(row["meta"]["createdAt"], "2024-01-01T00:00:00Z");
    assert!(row["fields"]["totpSecret"]
        .as_str()
        .unwrap()
        .starts_with("kh1:"));

    // The platform of the reference keeps working, and gets codes.
    kh.secret = Some(HmacSecret::from_bytes(*reference_secret.expose()));
    let state = kh.server.as_ref().unwrap().state.clone();
    for _ in 0..40 {
        if state.keys.binding().bound {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let token = kh.credential("bank").await.json()["token"].clone();
    assert!(
        expected_codes(SEED, totp_rs::Algorithm::SHA256, 8, 60)
            .contains(&token["accessToken"].as_str().unwrap().to_string()),
        "{token}"
    );
}

/// `keyholder-check` names a webhook that still speaks 2.2.0 as such, and says what it lacks. The
/// webhook here is a loopback stand-in answering health the way the previous release did.
#[tokio::test]
async fn checker_reports_a_2_2_0_webhook_as_such() {
    use keyholder_check::{self as check, CheckAuth, CheckOptions};
    let old = MockServer::start(|r| {
        if r.target == PATH_HEALTH {
            Reply::json(
                200,
                json!({"status":"healthy","version":"2.2.0","keyConfigured":true,
                       "capabilities":["storage","credential","proxy","refresh","store"],
                       "uptime":1,"tokenCount":0}),
            )
        } else {
            Reply::json(404, json!({"error":"not_found","message":"no"}))
        }
    })
    .await;
    let mut options = CheckOptions::new(old.url(""), CheckAuth::Secret(HmacSecret::generate()));
    options.danger_allow_http = true;
    options.retry = fast_retry();
    options.timeout = std::time::Duration::from_secs(5);
    let report = check::run(options).await;
    let text = report.to_text();
    assert_eq!(report.protocol_version.as_deref(), Some("2.2.0"));
    assert!(
        text.contains("The webhook speaks protocol 2.2.0, not 2.4.0"),
        "{text}"
    );
    let version = report.check("version_2_4_0").unwrap();
    assert!(
        !version.passed && version.detail.contains("2.2.0"),
        "{text}"
    );
    let caps = report.check("capabilities_2_4_0").unwrap();
    assert!(!caps.passed, "{text}");
    assert!(
        caps.detail.contains("totp") && caps.detail.contains("ticketConstraints"),
        "{text}"
    );
    for name in [
        "stale_creation",
        "store_constraints",
        "totp_uri_sealed",
        "totp_code_on_credential",
    ] {
        assert!(!report.check(name).unwrap().passed, "{name}: {text}");
    }
    assert!(!report.ok());
}

/// While the owner has sealed the keyholder nothing is decrypted or rewritten: a stored link is left
/// out of what the platform reads, `/v1/admin/migrate` answers `503 sealed`; after unseal the next
/// read seals it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_keyholder_leaves_links_out_and_seals_them_after_unseal() {
    use keyholder::cli::data_folder::OwnerArgs;
    let kh = bound().await;
    kh.storage(json!({"operation":"set","collection":"tokens","key":"bank",
        "data":{"meta":{"totpUri": link(SEED), "tokenType": "TOTP"}}}))
        .await;
    let args = OwnerArgs {
        data: kh.data_args(),
        json: false,
    };
    let seal = |sealed: bool| {
        let args = args.clone();
        std::thread::spawn(move || keyholder::cli::seal::set_sealed(&args, sealed))
            .join()
            .unwrap()
            .unwrap()
    };
    let state = kh.server.as_ref().unwrap().state.clone();
    seal(true);
    state.reload.follow_owner_changes().await.unwrap();
    assert!(state.keys.is_sealed());
    let got = kh
        .storage(json!({"operation":"get","collection":"tokens","key":"bank"}))
        .await;
    assert_eq!(got.status, 200);
    assert!(
        !leaks_seed(&String::from_utf8_lossy(&got.body)),
        "{}",
        got.json()
    );
    let list = kh
        .storage(json!({"operation":"list","collection":"tokens"}))
        .await;
    assert!(!leaks_seed(&String::from_utf8_lossy(&list.body)));
    kh.signed(PATH_ADMIN_MIGRATE, &json!({}))
        .await
        .assert_error(503, "sealed");

    seal(false);
    state.reload.follow_owner_changes().await.unwrap();
    assert!(!state.keys.is_sealed());
    // The redacted answer was not cached: the first read after unseal seals the link on disk.
    let got = kh
        .storage(json!({"operation":"get","collection":"tokens","key":"bank"}))
        .await
        .json();
    assert!(
        got["data"]["fields"]["totpSecret"]
            .as_str()
            .unwrap()
            .starts_with("kh1:"),
        "{got}"
    );
    let swept = kh.signed(PATH_ADMIN_MIGRATE, &json!({})).await;
    assert_eq!(
        swept.json()["totp"],
        json!({"scanned": 1, "migrated": 0, "failed": 0})
    );
    let token = kh.credential("bank").await.json()["token"].clone();
    assert_eq!(token["totpGenerated"], true);
}
