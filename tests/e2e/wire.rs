//! The wire itself, attacked as a hostile platform (or whoever captured its traffic) would: signed
//! requests replayed with a new request id or on another endpoint, percent-encoded and other
//! non-canonical spellings of paths, and tickets whose time claims are in the future, inverted or
//! extreme (issue 17, items 5-7).

use std::time::Duration;

use keyholder_protocol::paths::*;
use keyholder_protocol::{Purpose, TicketClaims};
use keyholder_tests::upstream::MockServer;
use keyholder_tests::*;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::proxy::proxy_keyholder;

const TOKEN: &str = "gho_proxy_secret_123";

/// One HTTP/1.1 request with the request target exactly as given (a client library would
/// normalise dot segments and the like), answered and closed.
async fn raw_http(
    kh: &Keyholder,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(kh.addr()).await.unwrap();
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut headers = reqwest::header::HeaderMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            headers.append(
                reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
                value.trim().parse().unwrap(),
            );
        }
    }
    Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn signed_headers(
    kh: &Keyholder,
    ts: i64,
    body: &[u8],
    request_id: &str,
) -> Vec<(&'static str, String)> {
    let secret = kh.secret.as_ref().unwrap();
    vec![
        ("content-type", "application/json".into()),
        (
            HEADER_SIGNATURE,
            keyholder_protocol::signing::signature_header_value(secret, ts, body),
        ),
        (HEADER_TIMESTAMP, ts.to_string()),
        (HEADER_PLATFORM_REQUEST_ID, request_id.to_string()),
    ]
}

/// The audit trail as the owner lists it.
async fn audit(kh: &Keyholder) -> Vec<keyholder::audit::AuditEntry> {
    kh.audit_entries(None).await
}

// ---------------------------------------------------------------- item 5: replays in the window

#[tokio::test]
async fn a_body_request_id_must_equal_the_header_and_a_forgery_burns_neither() {
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    let id = format!("req_{}", random_hex(8));
    let body = json!({"operation":"list","collection":"tokens","requestId": id});
    let raw = serde_json::to_vec(&body).unwrap();
    // A forged request with a mismatching id: refused for its signature, first.
    let forged = kh
        .signed_raw_with(
            &keyholder_protocol::HmacSecret::generate(),
            PATH_STORAGE,
            &raw,
            now(),
            "req_other",
        )
        .await;
    forged.assert_error(401, "auth_failed");
    assert_eq!(forged.json()["message"], "Invalid signature");
    // The platform's own bytes under another request id header: refused...
    let other = format!("req_{}", random_hex(8));
    let mismatch = kh.signed_raw(PATH_STORAGE, &raw, now(), &other).await;
    mismatch.assert_error(401, "auth_failed");
    assert_eq!(
        mismatch.json()["message"],
        "Body requestId does not match X-TokenVault-Request-Id"
    );
    // ...without using up either id or the signed bytes: the genuine request still passes.
    let ts = now();
    let genuine = kh.signed_raw(PATH_STORAGE, &raw, ts, &id).await;
    genuine.assert_ok();
    assert_eq!(genuine.json()["requestId"], id.as_str());
    let fresh = kh
        .signed(
            PATH_STORAGE,
            &json!({"operation":"list","collection":"tokens","requestId": other}),
        )
        .await;
    assert_eq!(fresh.status, 200);
    // A body requestId that is not a string, or given twice, matches no header.
    for raw in [
        r#"{"operation":"list","collection":"tokens","requestId":7}"#.to_string(),
        r#"{"operation":"list","collection":"tokens","requestId":null}"#.to_string(),
        format!(
            r#"{{"requestId":"{id}","operation":"list","collection":"tokens","requestId":"x"}}"#
        ),
    ] {
        let id = format!("req_{}", random_hex(8));
        kh.signed_raw(PATH_STORAGE, raw.as_bytes(), now(), &id)
            .await
            .assert_error(401, "auth_failed");
    }
}

#[tokio::test]
async fn the_same_signed_bytes_are_accepted_once_with_any_request_id_on_any_endpoint() {
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    // The platform sets a document; later it changes it. An attacker who captured the first
    // call replays its bytes (no body requestId) with a fresh request id to roll the change back.
    let first = br#"{"operation":"set","collection":"proxy_configs","key":"p1","data":{"url":"https://one.example"}}"#;
    let ts = now();
    let set = kh
        .signed_raw(PATH_STORAGE, first, ts, &format!("req_{}", random_hex(8)))
        .await;
    set.assert_ok();
    let second = kh
        .storage(json!({"operation":"set","collection":"proxy_configs","key":"p1","data":{"url":"https://two.example"}}))
        .await;
    assert_eq!(second.status, 200);
    let replay = kh
        .signed_raw(PATH_STORAGE, first, ts, &format!("req_{}", random_hex(8)))
        .await;
    replay.assert_error(401, "auth_failed");
    assert_eq!(
        replay.json()["message"],
        "Replayed request: these signed bytes were already accepted"
    );
    let got = kh
        .storage(json!({"operation":"get","collection":"proxy_configs","key":"p1"}))
        .await;
    assert_eq!(
        got.json()["data"]["url"],
        "https://two.example",
        "not rolled back"
    );

    // The same signed bytes on another signed endpoint: refused too.
    let elsewhere = kh
        .signed_raw(PATH_HEALTH, first, ts, &format!("req_{}", random_hex(8)))
        .await;
    elsewhere.assert_error(401, "auth_failed");
    // And the other way round: bytes first accepted by the signed health check, then sent to
    // storage.
    let probe = br#"{"operation":"list","collection":"tokens"}"#;
    // Its own timestamp: `ts` stays the first call's, replayed after the restart below.
    let probe_ts = now();
    let health = kh
        .signed_raw(
            PATH_HEALTH,
            probe,
            probe_ts,
            &format!("req_{}", random_hex(8)),
        )
        .await;
    assert_eq!(health.status, 200);
    kh.signed_raw(
        PATH_STORAGE,
        probe,
        probe_ts,
        &format!("req_{}", random_hex(8)),
    )
    .await
    .assert_error(401, "auth_failed");

    // Remembered durably: still refused after a restart (within the window).
    kh.restart().await;
    let after = kh
        .signed_raw(PATH_STORAGE, first, ts, &format!("req_{}", random_hex(8)))
        .await;
    after.assert_error(401, "auth_failed");
    assert_eq!(
        after.json()["message"],
        "Replayed request: these signed bytes were already accepted"
    );
    // A new signature (same body, a new timestamp) is a new request.
    let again = kh
        .signed_raw(
            PATH_STORAGE,
            first,
            now() + 1,
            &format!("req_{}", random_hex(8)),
        )
        .await;
    assert_eq!(again.status, 200);
}

// ---------------------------------------------------------------- item 6: non-canonical paths

fn count_requests(metrics: &str, route: &str, status: u16) -> u64 {
    metrics
        .lines()
        .filter(|l| l.contains("http_requests_total{"))
        .filter(|l| {
            l.contains(&format!("route=\"{route}\"")) && l.contains(&format!("status=\"{status}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn percent_encoded_and_non_canonical_paths_are_refused_before_routing() {
    let kh = proxy_keyholder(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let upstream = MockServer::ok().await;
    kh.egress("allow", "github", &[&upstream.origin()], false)
        .await;
    let forms = [
        "/v1/%63redential",
        "/%761/credential",
        "/v1/credentia%6C",
        "/v1/%63%72%65%64%65%6e%74%69%61%6c",
        "//v1/credential",
        "/v1//credential",
        "/v1/./credential",
        "/v1/x/../credential",
        "/v1/credential/",
    ];
    let mut tickets = Vec::new();
    for form in forms {
        let ticket = kh.ticket(Purpose::AgentCredential, "github");
        let target = format!("{form}?ticket={ticket}&service=github");
        let answer = raw_http(
            &kh,
            "GET",
            &target,
            &[("origin", "https://tokenvault.uk".into())],
            b"",
        )
        .await;
        answer.assert_error(400, "invalid_request");
        assert!(
            !String::from_utf8_lossy(&answer.body).contains(TOKEN),
            "{form}"
        );
        assert!(
            answer.json()["requestId"].is_string(),
            "{form}: a JSON error with the request id"
        );
        tickets.push(ticket);
    }
    // The refused calls used nothing up: each ticket still works once on the canonical path.
    for ticket in &tickets {
        let answer = kh.credential_with(ticket, "github").await;
        answer.assert_ok();
        assert_eq!(answer.json()["token"]["accessToken"], TOKEN);
    }

    // The signed proxy call under `/v1/%70roxy` (the HMAC does not cover the path): refused, and
    // nothing reaches the upstream; the identical request on the canonical path is served.
    let ticket = kh.ticket(Purpose::Proxy, "github");
    let id = format!("req_{}", random_hex(8));
    let body = serde_json::to_vec(&json!({
        "ticket": ticket, "service": "github", "requestId": id,
        "upstream": {"url": upstream.url("/attack"), "method": "GET"},
        "headerTemplates": {"Authorization": "Bearer ${TOKEN}"},
    }))
    .unwrap();
    let ts = now();
    for form in ["/v1/%70roxy", "/%761/proxy", "/v1/./proxy"] {
        let answer = raw_http(
            &kh,
            "POST",
            form,
            &signed_headers(&kh, ts, &body, &id),
            &body,
        )
        .await;
        answer.assert_error(400, "invalid_request");
    }
    assert_eq!(upstream.count(), 0, "nothing reached the upstream");
    let served = raw_http(
        &kh,
        "POST",
        PATH_PROXY,
        &signed_headers(&kh, ts, &body, &id),
        &body,
    )
    .await;
    served.assert_ok();
    assert_eq!(upstream.count(), 1);

    // Every use that was served is in the audit trail, under the canonical endpoint.
    let entries = audit(&kh).await;
    let used: Vec<_> = entries
        .iter()
        .filter(|e| e.event.result == "ok")
        .map(|e| e.event.endpoint.as_str())
        .collect();
    assert_eq!(
        used.iter().filter(|e| **e == PATH_CREDENTIAL).count(),
        tickets.len(),
        "{used:?}"
    );
    assert_eq!(
        used.iter().filter(|e| **e == PATH_PROXY).count(),
        1,
        "{used:?}"
    );
    assert!(entries.iter().all(|e| !e.event.endpoint.contains('%')));

    // And the metrics count the refusals as such, and only the served calls as uses.
    let url = kh.server.as_ref().unwrap().metrics_url().unwrap();
    let metrics = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert_eq!(
        count_requests(&metrics, PATH_CREDENTIAL, 200),
        tickets.len() as u64,
        "{metrics}"
    );
    assert_eq!(count_requests(&metrics, PATH_PROXY, 200), 1);
    assert_eq!(
        count_requests(&metrics, "unmatched", 400),
        (forms.len() + 3) as u64
    );
}

// ---------------------------------------------------------------- item 7: ticket time claims

fn claims_at(kh: &Keyholder, iat: Option<i64>, exp: Option<i64>) -> TicketClaims {
    let mut claims = kh.claims(Purpose::AgentCredential, "github");
    claims.iat = iat;
    claims.exp = exp;
    claims
}

#[tokio::test]
async fn ticket_iat_rules_and_the_lifetime_from_now() {
    let kh = proxy_keyholder(|_| {}).await;
    let n = now();
    const DAY: i64 = 86_400;
    let refused = [
        (
            "iat and exp 30 days ahead",
            Some(n + 30 * DAY),
            Some(n + 30 * DAY + 60),
        ),
        ("iat in the future", Some(n + 3_600), Some(n + 3_660)),
        ("iat after exp", Some(n + 100), Some(n + 50)),
        (
            "iat at the skew limit, exp beyond the cap from now",
            Some(n + 300),
            Some(n + 3_900),
        ),
        (
            "old iat, exp far beyond the cap",
            Some(n - 30 * DAY),
            Some(n + 30 * DAY),
        ),
    ];
    for (what, iat, exp) in refused {
        let ticket = kh.ticket_from(&claims_at(&kh, iat, exp));
        let answer = kh.credential_with(&ticket, "github").await;
        answer.assert_error(401, "ticket_invalid");
        assert!(
            !String::from_utf8_lossy(&answer.body).contains(TOKEN),
            "{what}"
        );
    }
    // Within the rules: served.
    for (iat, exp) in [
        (Some(n), Some(n + 3_600)),
        (Some(n + 200), Some(n + 600)),
        (None, Some(n + 60)),
    ] {
        let ticket = kh.ticket_from(&claims_at(&kh, iat, exp));
        assert_eq!(kh.credential_with(&ticket, "github").await.status, 200);
    }
}

/// Tickets with extreme time claims, as raw JSON (some do not fit `TicketClaims`).
fn extreme_tickets(kh: &Keyholder) -> Vec<String> {
    let n = now();
    let max = i64::MAX;
    let min = i64::MIN;
    let payloads = [
        format!(r#"{{"iat":{},"exp":{max}}}"#, max - 60),
        format!(r#"{{"iat":{n},"exp":{max}}}"#),
        format!(r#"{{"iat":{min},"exp":{max}}}"#),
        format!(r#"{{"iat":{max},"exp":{max}}}"#),
        format!(r#"{{"iat":{min},"exp":{min}}}"#),
        format!(r#"{{"exp":{max}}}"#),
        format!(r#"{{"iat":{n},"exp":18446744073709551615}}"#),
        r#"{"iat":-1,"exp":-1}"#.to_string(),
    ];
    payloads
        .iter()
        .map(|times| {
            let claims = format!(
                r#"{{"sub":"user_test","svc":"github","pur":"agent_credential","nonce":"{}",{}"#,
                random_hex(16),
                &times[1..]
            );
            use base64::Engine as _;
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims);
            let sig = hex::encode(hmac_sha256(kh, payload.as_bytes()));
            format!("{payload}.{sig}")
        })
        .collect()
}

fn hmac_sha256(kh: &Keyholder, message: &[u8]) -> [u8; 32] {
    use hmac::Mac as _;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(kh.secret.as_ref().unwrap().expose()).unwrap();
    mac.update(message);
    mac.finalize().into_bytes().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_ticket_times_are_refused_while_legitimate_traffic_runs_and_purge_keeps_working() {
    let kh = proxy_keyholder(|_| {}).await;
    let legit: Vec<String> = (0..400)
        .map(|_| kh.ticket(Purpose::AgentCredential, "github"))
        .collect();
    let extreme = extreme_tickets(&kh);
    // 400 legitimate requests, with a round of extreme tickets after every 20 of them, at once.
    let mut calls = Vec::new();
    for (i, ticket) in legit.iter().enumerate() {
        calls.push((true, ticket.clone()));
        if i % 20 == 0 {
            calls.extend(extreme.iter().map(|t| (false, t.clone())));
        }
    }
    let answers = futures_util::future::join_all(calls.iter().map(|(legit, ticket)| {
        let kh = &kh;
        async move { (*legit, kh.credential_with(ticket, "github").await) }
    }))
    .await;
    let mut served = 0;
    for (legit, answer) in &answers {
        if *legit {
            answer.assert_ok();
            served += 1;
        } else {
            assert_eq!(
                answer.status,
                401,
                "{}",
                String::from_utf8_lossy(&answer.body)
            );
            assert!(
                ["ticket_invalid", "ticket_expired"].contains(&answer.error_code().as_str()),
                "{}",
                answer.error_code()
            );
            assert!(!String::from_utf8_lossy(&answer.body).contains(TOKEN));
        }
    }
    assert_eq!(served, 400);
    // The replay purge (every minute in the server) works, and traffic goes on after it.
    let replay = &kh.server.as_ref().unwrap().state.replay;
    replay.purge_expired().await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(kh.credential("github").await.status, 200);
    replay.purge_expired().await.unwrap();
}

// ---------------------------------------------------------------- item 9: corrupt documents

#[tokio::test]
async fn corrupt_documents_the_platform_wrote_answer_422_on_every_path() {
    let kh = proxy_keyholder(|c| c.enable_tv_refresh = true).await;
    let upstream = MockServer::ok().await;
    kh.egress("allow", "github", &[&upstream.origin()], false)
        .await;
    // A genuine sealed document of `github`, to move under another name.
    let genuine = kh
        .storage(json!({"operation":"get","collection":"tokens","key":"github"}))
        .await
        .json()["data"]
        .clone();
    let random_v1 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([7u8; 40])
    };
    let corrupt = [
        (
            "bad-base64",
            json!({"v":1,"alg":"AES-256-GCM","fields":{"accessToken":"!!not base64!!"},"meta":{}}),
        ),
        (
            "fields-not-object",
            json!({"v":1,"alg":"AES-256-GCM","fields":"accessToken","meta":{}}),
        ),
        (
            "field-not-string",
            json!({"v":1,"alg":"AES-256-GCM","fields":{"accessToken":[1,2]},"meta":{}}),
        ),
        (
            "undecryptable-v1",
            json!({"v":1,"alg":"AES-256-GCM","fields":{"accessToken":random_v1},"meta":{}}),
        ),
        ("moved-ciphertext", genuine),
        (
            "unknown-version",
            json!({"v":99,"alg":"AES-256-GCM","fields":{},"meta":{}}),
        ),
    ];
    for (service, doc) in &corrupt {
        let set = kh
            .storage(json!({"operation":"set","collection":"tokens","key":service,"data":doc}))
            .await;
        assert_eq!(set.status, 200);
    }
    for (service, _) in &corrupt {
        let credential = kh.credential(service).await;
        credential.assert_error(422, "corrupt_document");
        let ticket = kh.ticket(Purpose::TotpCode, service);
        let totp = read(
            kh.http
                .get(kh.url(PATH_TOTP_CODE))
                .query(&[("ticket", ticket.as_str()), ("service", service)])
                .send()
                .await
                .unwrap(),
        )
        .await;
        totp.assert_error(422, "corrupt_document");
        kh.proxy_get(service, &upstream.url("/corrupt"))
            .await
            .assert_error(422, "corrupt_document");
        kh.signed(
            PATH_REFRESH_NOTIFY,
            &json!({"service": service, "reason": "expired"}),
        )
        .await
        .assert_error(422, "corrupt_document");
        kh.signed(PATH_REFRESH, &json!({"action": "get", "service": service}))
            .await
            .assert_error(422, "corrupt_document");
    }
    assert_eq!(
        upstream.count(),
        0,
        "nothing was sent for a corrupt document"
    );
}

// ---------------------------------------------------------------- item 9: the audit trail

#[tokio::test]
async fn audit_list_escapes_what_the_platform_put_in_a_ticket() {
    let kh = proxy_keyholder(|_| {}).await;
    let hostile = "\u{1b}]0;owned\u{7}\u{1b}[2J\r\nresult=ok agent=\u{202e}gnp.exe\u{9b}1m\u{7f}\\";
    let mut claims = kh.claims(Purpose::AgentCredential, "github");
    claims.aid = Some(hostile.into());
    claims.pid = Some("p\u{85}id".into());
    let ticket = kh.ticket_from(&claims);
    assert_eq!(kh.credential_with(&ticket, "github").await.status, 200);
    let entries = audit(&kh).await;
    let entry = entries
        .iter()
        .find(|e| e.event.agent_id == hostile)
        .expect("the use is recorded as it was");
    let unsafe_char = |c: char| {
        c.is_control()
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    };
    let line = keyholder::cli::audit::audit_line(entry);
    assert!(!line.chars().any(unsafe_char), "{line:?}");
    assert!(line.contains(r"agent=\u{1b}]0;owned\u{7}\u{1b}[2J\u{d}\u{a}result=ok\u{20}agent=\u{202e}gnp.exe\u{9b}1m\u{7f}\\ "), "{line}");
    assert!(line.contains(r"proxy=p\u{85}id "), "{line}");
    assert_eq!(
        line.matches(" agent=").count(),
        1,
        "no field can pose as another: {line}"
    );
    let json = keyholder::cli::audit::audit_json_line(entry).unwrap();
    assert!(!json.chars().any(unsafe_char), "{json:?}");
    let back: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        back["agentId"].as_str(),
        Some(hostile),
        "the same string in JSON"
    );
}

#[tokio::test]
async fn a_service_name_from_an_unverified_ticket_is_not_recorded() {
    let kh = proxy_keyholder(|_| {}).await;
    // Forged (another secret), malformed, and expired-but-signed: no verified service.
    let forged = keyholder_protocol::ticket::encode_ticket(
        &keyholder_protocol::HmacSecret::generate(),
        &kh.claims(Purpose::AgentCredential, "github"),
    );
    kh.credential_with(&forged, "github")
        .await
        .assert_error(401, "ticket_invalid");
    kh.credential_with("not.a-ticket", "github")
        .await
        .assert_error(401, "ticket_invalid");
    // Signed by the platform but for another service: recorded under the service it names.
    let other = kh.ticket(Purpose::AgentCredential, "gitlab");
    kh.credential_with(&other, "github")
        .await
        .assert_error(401, "ticket_invalid");
    let used = kh.ticket(Purpose::AgentCredential, "github");
    assert_eq!(kh.credential_with(&used, "github").await.status, 200);
    let entries = audit(&kh).await;
    let credential: Vec<_> = entries
        .iter()
        .filter(|e| e.event.endpoint == PATH_CREDENTIAL)
        .map(|e| (e.event.service.as_str(), e.event.result.as_str()))
        .collect();
    assert_eq!(
        credential,
        [
            ("", "ticket_invalid"),
            ("", "ticket_invalid"),
            ("gitlab", "ticket_invalid"),
            ("github", "ok")
        ],
        "{entries:#?}"
    );
}

#[tokio::test]
async fn health_answers_cors_for_the_public_get_only() {
    let kh = proxy_keyholder(|_| {}).await;
    let origin = "https://tokenvault.uk";
    let allowed = |a: &Answer| a.header("access-control-allow-origin");
    let get = read(
        kh.http
            .get(kh.url(PATH_HEALTH))
            .header("origin", origin)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(get.status, 200);
    assert_eq!(allowed(&get).as_deref(), Some(origin));
    let head = read(
        kh.http
            .head(kh.url(PATH_HEALTH))
            .header("origin", origin)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(head.status, 200);
    assert!(allowed(&head).is_none(), "HEAD answers no CORS");
    // The signed POST, valid or not, answers no CORS either.
    for answer in [
        kh.signed(PATH_HEALTH, &json!({})).await,
        read(
            kh.http
                .post(kh.url(PATH_HEALTH))
                .header("origin", origin)
                .body("{}")
                .send()
                .await
                .unwrap(),
        )
        .await,
    ] {
        assert!(allowed(&answer).is_none(), "{}", answer.status);
    }
    let raw = br#"{"requestId":"req_cors_1"}"#;
    let mut headers = signed_headers(&kh, now(), raw, "req_cors_1");
    headers.push(("origin", origin.into()));
    let signed = raw_http(&kh, "POST", PATH_HEALTH, &headers, raw).await;
    assert_eq!(signed.status, 200);
    assert!(allowed(&signed).is_none());
    // The preflight offers GET only.
    let pre = read(
        kh.http
            .request(reqwest::Method::OPTIONS, kh.url(PATH_HEALTH))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(pre.status, 204);
    let methods = pre.header("access-control-allow-methods").unwrap();
    assert!(!methods.contains("POST"), "{methods}");
    assert!(methods.contains("GET"), "{methods}");
}
