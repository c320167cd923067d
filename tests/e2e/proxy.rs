//! `/v1/proxy` against real local upstreams: credential injection, method/body/status passthrough,
//! header hygiene both ways, CR/LF refusal, both authentications, timeouts and failures.

use std::time::{Duration, Instant};

use base64::Engine as _;
use keyholder_protocol::paths::*;
use keyholder_protocol::Purpose;
use keyholder_tests::upstream::{MockServer, Reply};
use keyholder_tests::*;
use serde_json::json;

pub const TOKEN: &str = "gho_proxy_secret_123";

/// A bound keyholder allowed to reach 127.0.0.1 upstreams, with a GitHub-like token stored and the
/// local upstreams allowed by the owner for it (these tests are about the proxy's mechanics; the
/// egress policy itself is tested on [`policy_keyholder`]).
pub async fn proxy_keyholder(adjust: impl FnOnce(&mut keyholder::Config)) -> Keyholder {
    let kh = policy_keyholder(adjust).await;
    kh.egress("allow", "github", &["127.0.0.1", "localhost"], false)
        .await;
    kh
}

/// [`proxy_keyholder`] with the default egress policy (mode `known`, nothing allowed).
pub async fn policy_keyholder(adjust: impl FnOnce(&mut keyholder::Config)) -> Keyholder {
    let mut kh = Keyholder::start_with(|c| {
        c.egress_allow_private = true;
        adjust(c);
    })
    .await;
    kh.bind().await;
    let stored = kh
        .store("github", json!({"accessToken": TOKEN, "scope": "repo"}))
        .await;
    assert_eq!(stored.status, 200);
    kh
}

#[tokio::test]
async fn injects_the_credential_and_passes_everything_through() {
    let kh = proxy_keyholder(|_| {}).await;
    let upstream = MockServer::start(|_| {
        Reply::json(201, json!({"created": true}))
            .header("X-RateLimit-Remaining", "42")
            .header("Connection", "X-Hop-Secret")
            .header("X-Hop-Secret", "must-not-pass")
            .header("Keep-Alive", "timeout=5")
            .header("Proxy-Authenticate", "Basic")
            .header("Upgrade", "h2c")
            .header("Set-Cookie", "a=b")
    })
    .await;
    let body = br#"{"title":"from the agent"}"#;
    let answer = kh
        .proxy(
            "github",
            json!({
                "url": upstream.url("/repos/o/r/issues?state=open"),
                "method": "post",
                "headers": {
                    "Content-Type": "application/json",
                    "X-Custom": "kept",
                    "Connection": "keep-alive, X-Drop-Me",
                    "X-Drop-Me": "1",
                    "Keep-Alive": "300",
                    "Proxy-Authorization": "Basic leak",
                    "TE": "trailers",
                    "Upgrade": "websocket",
                    "X-TokenVault-Signature": "sha256=leak",
                    "X-TokenVault-Ticket": "leak",
                },
                "body": base64::engine::general_purpose::STANDARD.encode(body),
            }),
            json!({"Authorization": "Bearer ${TOKEN}", "X-Api-Key": "key=${TOKEN};"}),
        )
        .await;
    assert_eq!(
        answer.status,
        201,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json(), json!({"created": true}));
    assert_eq!(answer.header("x-upstream-status").as_deref(), Some("201"));
    assert_eq!(
        answer.header("x-ratelimit-remaining").as_deref(),
        Some("42")
    );
    assert_eq!(answer.header("set-cookie").as_deref(), Some("a=b"));
    for hop in [
        "x-hop-secret",
        "keep-alive",
        "proxy-authenticate",
        "upgrade",
    ] {
        assert!(answer.header(hop).is_none(), "{hop} came back");
    }
    // The credential never comes back to the platform.
    assert!(!String::from_utf8_lossy(&answer.body).contains(TOKEN));

    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    let got = &seen[0];
    assert_eq!(got.method, "POST");
    assert_eq!(got.target, "/repos/o/r/issues?state=open");
    assert_eq!(got.body, body);
    assert_eq!(
        got.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(
        got.header("x-api-key"),
        Some(format!("key={TOKEN};").as_str())
    );
    assert_eq!(got.header("x-custom"), Some("kept"));
    assert_eq!(got.header("content-type"), Some("application/json"));
    for dropped in [
        "x-drop-me",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(got.header(dropped).is_none(), "{dropped} went upstream");
    }
    assert!(
        got.headers
            .iter()
            .all(|(n, _)| !n.starts_with("x-tokenvault-")),
        "{:?}",
        got.headers
    );
}

#[tokio::test]
async fn methods_and_statuses_pass_through() {
    let kh = proxy_keyholder(|_| {}).await;
    let upstream = MockServer::start(|r| match r.target.as_str() {
        "/missing" => Reply::json(404, json!({"message": "Not Found"})),
        "/broken" => Reply::text(500, "boom"),
        "/empty" => Reply::text(204, ""),
        _ => Reply::text(200, &format!("method={}", r.method)),
    })
    .await;
    for method in ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let a = kh
            .proxy(
                "github",
                json!({"url": upstream.url("/m"), "method": method}),
                json!({"Authorization": "token ${TOKEN}"}),
            )
            .await;
        assert_eq!(a.status, 200);
        assert_eq!(String::from_utf8_lossy(&a.body), format!("method={method}"));
    }
    // Method defaults to GET.
    let a = kh
        .proxy("github", json!({"url": upstream.url("/m")}), json!({}))
        .await;
    assert_eq!(String::from_utf8_lossy(&a.body), "method=GET");
    let head = kh
        .proxy(
            "github",
            json!({"url": upstream.url("/m"), "method": "HEAD"}),
            json!({}),
        )
        .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    for (path, status) in [("/missing", 404), ("/broken", 500), ("/empty", 204)] {
        let a = kh.proxy_get("github", &upstream.url(path)).await;
        assert_eq!(a.status, status);
        assert_eq!(a.header("x-upstream-status"), Some(status.to_string()));
    }
    let bad = kh
        .proxy(
            "github",
            json!({"url": upstream.url("/m"), "method": "CONNECT"}),
            json!({}),
        )
        .await;
    bad.assert_error(400, "invalid_request");
}

#[tokio::test]
async fn cr_lf_in_templates_or_results_is_refused_and_nothing_is_sent() {
    let kh = proxy_keyholder(|_| {}).await;
    kh.store("crlf", json!({"accessToken": "abc\r\nX-Evil: 1"}))
        .await;
    let upstream = MockServer::ok().await;
    for template in [
        "Bearer ${TOKEN}\r\nX-Evil: 1",
        "Bearer ${TOKEN}\n",
        "\rBearer",
    ] {
        kh.proxy(
            "github",
            json!({"url": upstream.url("/")}),
            json!({ "Authorization": template }),
        )
        .await
        .assert_error(400, "invalid_request");
    }
    kh.egress("allow", "crlf", &["127.0.0.1"], false).await;
    kh.proxy_get("crlf", &upstream.url("/"))
        .await
        .assert_error(400, "invalid_request");
    // Headers the platform may not template.
    for name in [
        "Host",
        "Connection",
        "Transfer-Encoding",
        "X-TokenVault-Signature",
    ] {
        kh.proxy(
            "github",
            json!({"url": upstream.url("/")}),
            json!({ name: "${TOKEN}" }),
        )
        .await
        .assert_error(400, "invalid_request");
    }
    assert_eq!(upstream.connections(), 0);
}

#[tokio::test]
async fn needs_both_the_platform_signature_and_a_proxy_ticket() {
    let kh = proxy_keyholder(|_| {}).await;
    let upstream = MockServer::ok().await;
    let body = |ticket: &str, service: &str| {
        json!({"ticket": ticket, "service": service, "upstream": {"url": upstream.url("/")},
               "headerTemplates": {"Authorization": "Bearer ${TOKEN}"}})
    };
    // A valid ticket without the platform's signature.
    let unsigned = read(
        kh.http
            .post(kh.url(PATH_PROXY))
            .json(&body(&kh.ticket(Purpose::Proxy, "github"), "github"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    unsigned.assert_error(401, "auth_failed");
    // Signed, but the ticket has the wrong purpose, service, or is missing.
    kh.signed(
        PATH_PROXY,
        &body(&kh.ticket(Purpose::AgentCredential, "github"), "github"),
    )
    .await
    .assert_error(401, "ticket_invalid");
    kh.signed(
        PATH_PROXY,
        &body(&kh.ticket(Purpose::Proxy, "gitlab"), "github"),
    )
    .await
    .assert_error(401, "ticket_invalid");
    kh.signed(
        PATH_PROXY,
        &json!({"service": "github", "upstream": {"url": upstream.url("/")}}),
    )
    .await
    .assert_error(400, "invalid_request");
    kh.signed(PATH_PROXY, &json!({"ticket": kh.ticket(Purpose::Proxy, "github"), "service": "github", "upstream": {}}))
        .await
        .assert_error(400, "invalid_request");
    // A replayed ticket.
    let ticket = kh.ticket(Purpose::Proxy, "github");
    assert_eq!(
        kh.signed(PATH_PROXY, &body(&ticket, "github")).await.status,
        200
    );
    kh.signed(PATH_PROXY, &body(&ticket, "github"))
        .await
        .assert_error(401, "ticket_invalid");
    // No credential, or one without an access token.
    kh.proxy_get("nothing", &upstream.url("/"))
        .await
        .assert_error(404, "token_not_found");
    kh.store("ssh", json!({"sshPrivateKey": "-----BEGIN OPENSSH-----"}))
        .await;
    kh.proxy_get("ssh", &upstream.url("/"))
        .await
        .assert_error(404, "token_not_found");
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn a_hanging_upstream_times_out_without_blocking_others() {
    let kh = proxy_keyholder(|c| c.upstream_timeout = Duration::from_secs(1)).await;
    let slow =
        MockServer::start(|_| Reply::text(200, "late").delayed(Duration::from_secs(5))).await;
    let fast = MockServer::ok().await;
    kh.egress("allow", "github", &[&slow.origin(), &fast.origin()], false)
        .await;
    let started = Instant::now();
    let slow_url = slow.url("/");
    let (slow_answer, fast_answer) = tokio::join!(kh.proxy_get("github", &slow_url), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let a = kh.proxy_get("github", &fast.url("/")).await;
        (a, t.elapsed())
    });
    slow_answer.assert_error(504, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(fast_answer.0.status, 200);
    assert!(
        fast_answer.1 < Duration::from_millis(900),
        "{:?}",
        fast_answer.1
    );
}

#[tokio::test]
async fn upstream_failures_are_502() {
    let kh = proxy_keyholder(|_| {}).await;
    kh.egress("allow", "github", &["127.0.0.1"], false).await;
    // Nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    kh.proxy_get("github", &format!("http://{closed}/"))
        .await
        .assert_error(502, "upstream_error");
}

/// The request body of `/v1/proxy` is read and verified whole before anything goes upstream (see
/// docs/streaming.md): a platform uploading slowly reaches the upstream only once its last byte
/// is in and the signature holds, and an upload past the 8 MiB cap without a declared length is
/// refused with 413 while it is still arriving, the upstream never contacted.
#[tokio::test]
async fn a_slow_upload_reaches_the_upstream_only_verified_and_an_endless_one_is_cut_at_the_cap() {
    use futures_util::StreamExt as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let kh = proxy_keyholder(|_| {}).await;
    let upstream = Arc::new(MockServer::ok().await);
    let payload = vec![b'p'; 200 * 1024];
    let request_id = format!("req_{}", random_hex(8));
    let raw = serde_json::to_vec(&json!({
        "ticket": kh.ticket(Purpose::Proxy, "github"),
        "service": "github",
        "upstream": {
            "url": upstream.url("/upload"),
            "method": "POST",
            "body": base64::engine::general_purpose::STANDARD.encode(&payload),
        },
        "headerTemplates": {"Authorization": "Bearer ${TOKEN}"},
        "requestId": request_id,
    }))
    .unwrap();
    let ts = now();
    let signature = keyholder_protocol::signing::signature_header_value(kh.secret(), ts, &raw);
    // Four pieces 300 ms apart; before the last one, how many connections the upstream had.
    let seen_before_last = Arc::new(AtomicUsize::new(usize::MAX));
    let pieces: Vec<Vec<u8>> = raw
        .chunks(raw.len().div_ceil(4))
        .map(<[u8]>::to_vec)
        .collect();
    let last = pieces.len() - 1;
    let (seen, counter) = (Arc::clone(&seen_before_last), Arc::clone(&upstream));
    let body =
        futures_util::stream::iter(pieces.into_iter().enumerate()).then(move |(i, piece)| {
            let (seen, counter) = (Arc::clone(&seen), Arc::clone(&counter));
            async move {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                if i == last {
                    seen.store(counter.connections(), Ordering::SeqCst);
                }
                Ok::<_, std::io::Error>(piece)
            }
        });
    let started = Instant::now();
    let answer = kh
        .http
        .post(kh.url(PATH_PROXY))
        .header("content-type", "application/json")
        .header(HEADER_SIGNATURE, &signature)
        .header(HEADER_TIMESTAMP, ts.to_string())
        .header(HEADER_PLATFORM_REQUEST_ID, &request_id)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer.status(),
        200,
        "{}",
        answer.text().await.unwrap_or_default()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the upload took its time"
    );
    assert_eq!(
        seen_before_last.load(Ordering::SeqCst),
        0,
        "nothing reached the upstream while the signed body was still arriving"
    );
    let sent = upstream.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].body, payload, "the whole body, decoded, once");

    // Endless: 1 MiB pieces with no declared length, past the 8 MiB cap.
    let quiet = MockServer::ok().await;
    let request_id = format!("req_{}", random_hex(8));
    let head = format!(
        r#"{{"ticket":"{}","service":"github","upstream":{{"url":"{}","method":"POST","body":""#,
        kh.ticket(Purpose::Proxy, "github"),
        quiet.url("/upload")
    );
    let sent_bytes = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&sent_bytes);
    let pieces =
        std::iter::once(head.into_bytes()).chain(std::iter::repeat_n(vec![b'A'; 1024 * 1024], 32));
    let body = futures_util::stream::iter(pieces).then(move |piece| {
        let counted = Arc::clone(&counted);
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            counted.fetch_add(piece.len(), Ordering::SeqCst);
            Ok::<_, std::io::Error>(piece)
        }
    });
    let ts = now();
    let answer = kh
        .http
        .post(kh.url(PATH_PROXY))
        .header("content-type", "application/json")
        .header(HEADER_SIGNATURE, "sha256=".to_string() + &"0".repeat(64))
        .header(HEADER_TIMESTAMP, ts.to_string())
        .header(HEADER_PLATFORM_REQUEST_ID, &request_id)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    // The keyholder answers 413 and closes while the upload goes on; the client sees the
    // answer, or (having had its connection closed mid-upload) an error. Either way the upload
    // stopped well short of its 32 MiB and the upstream heard nothing.
    if let Ok(answer) = answer {
        assert_eq!(answer.status(), 413);
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["error"], "payload_too_large");
    }
    assert!(
        sent_bytes.load(Ordering::SeqCst) < 16 * 1024 * 1024,
        "cut at the cap, not read to the end ({} bytes sent)",
        sent_bytes.load(Ordering::SeqCst)
    );
    assert_eq!(quiet.connections(), 0, "the upstream was never contacted");
}

/// Whether the replay mark of `request_id` is committed in the data folder's database, read on a
/// connection of its own (what survives a crash at this instant).
fn mark_committed(data_dir: &std::path::Path, request_id: &str) -> bool {
    let key = keyholder::storage::replay::mark_key(request_id).to_le_bytes();
    let conn = rusqlite::Connection::open_with_flags(
        data_dir.join("keyholder.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'replay_marks_packed_60s_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    tables.iter().any(|table| {
        conn.prepare(&format!("SELECT records FROM {table}"))
            .unwrap()
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(Result::unwrap)
            .any(|records| records.chunks_exact(8).any(|k| k == key))
    })
}

/// A hostile platform that could crash the keyholder (or find it crashed) right after the
/// upstream received a call must not be able to send the same signed call once more after the
/// restart: when the upstream receives a proxied call (the owner's credential on it), the call's
/// replay marks are already on disk. Checked by the upstream itself, on a connection of its own,
/// for every one of a series of calls, and the restart then refuses each replay while the upstream
/// sees each call once.
#[tokio::test]
async fn replay_marks_are_durable_before_the_upstream_receives_the_call() {
    let mut kh = proxy_keyholder(|_| {}).await;
    let data_dir = kh.data_dir.clone();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, bool)>::new()));
    let upstream = {
        let seen = std::sync::Arc::clone(&seen);
        MockServer::start(move |req| {
            let id = req.header("x-test-call").unwrap_or_default().to_string();
            let durable = mark_committed(&data_dir, &id);
            seen.lock().unwrap().push((id, durable));
            Reply::json(200, json!({"ok": true}))
        })
        .await
    };
    let mut sent = Vec::new();
    for i in 0..20 {
        let request_id = format!("req_durable_{i}_{}", random_hex(6));
        let body = json!({
            "ticket": kh.ticket(Purpose::Proxy, "github"),
            "service": "github",
            "upstream": {"url": upstream.url("/x"), "method": "POST", "headers": {"X-Test-Call": request_id}},
            "headerTemplates": {"Authorization": "Bearer ${TOKEN}"},
            "requestId": request_id,
        });
        let raw = serde_json::to_vec(&body).unwrap();
        let ts = now();
        kh.signed_raw(PATH_PROXY, &raw, ts, &request_id)
            .await
            .assert_ok();
        sent.push((raw, ts, request_id));
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 20);
    for (id, durable) in &seen {
        assert!(
            durable,
            "the upstream received {id} before its replay mark was committed"
        );
    }
    kh.restart().await;
    for (raw, ts, request_id) in &sent {
        kh.signed_raw(PATH_PROXY, raw, *ts, request_id)
            .await
            .assert_error(401, "auth_failed");
    }
    assert_eq!(upstream.count(), 20, "a replay reached the upstream");
}
