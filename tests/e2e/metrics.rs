//! Prometheus metrics: off by default; when on, a separate listener serves OpenMetrics text with
//! every family, labelled by route pattern (never a raw path or query), with plausible values.

use keyholder::config::validate_metrics_listen;
use keyholder_protocol::paths::*;
use keyholder_protocol::Purpose;
use keyholder_tests::upstream::{Fault, FaultyServer, MockServer, Reply};
use keyholder_tests::{now, random_hex, Keyholder};
use serde_json::json;

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_are_off_by_default() {
    let kh = Keyholder::start().await;
    let server = kh.server.as_ref().unwrap();
    assert!(server.metrics_addr.is_none());
    assert!(server.metrics_url().is_none());
    // And the webhook's own port has no metrics page.
    let r = kh.http.get(kh.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn metrics_listener_serves_every_family() {
    let mut kh =
        Keyholder::start_with(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    kh.bind().await;
    assert_eq!(
        kh.store("github", json!({"accessToken": "ghp_m"}))
            .await
            .status,
        200
    );
    assert_eq!(kh.credential("github").await.status, 200);
    // A replayed nonce, a forged ticket, a bad platform signature, an unknown path with a query.
    let ticket = kh.ticket(Purpose::AgentCredential, "github");
    assert_eq!(kh.credential_with(&ticket, "github").await.status, 200);
    kh.credential_with(&ticket, "github")
        .await
        .assert_error(401, "ticket_invalid");
    kh.credential_with(&format!("{ticket}00"), "github")
        .await
        .assert_error(401, "ticket_invalid");
    let forger = keyholder_protocol::HmacSecret::from_bytes([7; 32]);
    kh.signed_raw_with(
        &forger,
        PATH_HEALTH,
        b"{}",
        now(),
        &format!("req_{}", random_hex(8)),
    )
    .await
    .assert_error(401, "auth_failed");
    let secret_query = "ticket=do-not-label-me";
    kh.http
        .get(kh.url(&format!("/v1/nope?{secret_query}")))
        .send()
        .await
        .unwrap();

    let url = kh.server.as_ref().unwrap().metrics_url().unwrap();
    assert_ne!(url, kh.url("/metrics"), "a separate listener");
    let r = reqwest::get(&url).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    assert!(
        !text.contains("do-not-label-me") && !text.contains("/v1/nope"),
        "{text}"
    );

    let requests = |route: &str, method: &str, status: u16| {
        value(
            &text,
            &format!(
                "keyholder_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}}"
            ),
        )
    };
    assert_eq!(requests(PATH_STORE, "POST", 200), 1.0);
    assert_eq!(requests(PATH_CREDENTIAL, "GET", 200), 2.0);
    assert_eq!(requests(PATH_CREDENTIAL, "GET", 401), 2.0);
    assert_eq!(requests(PATH_EXCHANGE, "POST", 200), 1.0);
    assert_eq!(requests("unmatched", "GET", 404), 1.0);
    let count = value(
        &text,
        &format!("keyholder_http_request_duration_seconds_count{{route=\"{PATH_CREDENTIAL}\"}}"),
    );
    assert_eq!(count, 4.0);
    let sum = value(
        &text,
        &format!("keyholder_http_request_duration_seconds_sum{{route=\"{PATH_CREDENTIAL}\"}}"),
    );
    assert!(sum > 0.0 && sum < 30.0, "{sum}");
    assert_eq!(
        value(&text, "keyholder_replay_refusals_total{kind=\"nonce\"}"),
        1.0
    );
    assert_eq!(value(&text, "keyholder_ticket_failures_total"), 1.0);
    assert_eq!(value(&text, "keyholder_signature_failures_total"), 1.0);
    assert_eq!(value(&text, "keyholder_egress_denials_total"), 0.0);
    assert_eq!(value(&text, "keyholder_upstream_errors_total"), 0.0);
    assert_eq!(
        value(&text, "keyholder_upstream_duration_seconds_count"),
        0.0
    );
    assert_eq!(value(&text, "keyholder_http_server_errors_total"), 0.0);
    // Writes so far: the exchange, the store, three ticket nonces, ... each one committed.
    let commits = value(&text, "keyholder_db_commit_duration_seconds_count");
    let jobs = value(&text, "keyholder_db_commit_batch_size_sum");
    assert!(
        commits >= 3.0 && jobs >= commits,
        "{commits} commits, {jobs} jobs"
    );
    assert!(value(&text, "keyholder_db_commit_duration_seconds_sum") > 0.0);

    kh.stop().await;
}

/// The upstream metrics count real outbound calls where they happen: a refused connection, a
/// timeout and a 5xx answer through `/v1/proxy`, and a token endpoint failing an OAuth refresh,
/// are errors; a good answer is timed but no error; an egress refusal (nothing sent) is neither.
#[tokio::test]
async fn upstream_failures_are_counted_where_the_calls_happen() {
    let kh = crate::proxy::proxy_keyholder(|c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        c.upstream_timeout = std::time::Duration::from_secs(1);
        c.provider_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let url = kh.server.as_ref().unwrap().metrics_url().unwrap();
    let metric = |series: &'static str| {
        let url = url.clone();
        async move {
            value(
                &reqwest::get(&url).await.unwrap().text().await.unwrap(),
                series,
            )
        }
    };
    const ERRORS: &str = "keyholder_upstream_errors_total";
    const TIMED: &str = "keyholder_upstream_duration_seconds_count";
    assert_eq!((metric(ERRORS).await, metric(TIMED).await), (0.0, 0.0));

    let good = MockServer::ok().await;
    assert_eq!(kh.proxy_get("github", &good.url("/ok")).await.status, 200);
    assert_eq!((metric(ERRORS).await, metric(TIMED).await), (0.0, 1.0));

    // Nothing listens on a port just closed: the connection is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    kh.proxy_get("github", &format!("http://127.0.0.1:{port}/x"))
        .await
        .assert_error(502, "upstream_error");
    assert_eq!((metric(ERRORS).await, metric(TIMED).await), (1.0, 2.0));

    let hang = FaultyServer::start(Fault::Hang).await;
    kh.proxy_get("github", &hang.url("/x"))
        .await
        .assert_error(504, "upstream_timeout");
    assert_eq!((metric(ERRORS).await, metric(TIMED).await), (2.0, 3.0));

    let failing = MockServer::start(|_| Reply::text(503, "down")).await;
    let answer = kh.proxy_get("github", &failing.url("/x")).await;
    assert_eq!(answer.header("x-upstream-status").as_deref(), Some("503"));
    assert_eq!((metric(ERRORS).await, metric(TIMED).await), (3.0, 4.0));

    // The token endpoint of an OAuth refresh answers 500.
    let provider = MockServer::start(|_| Reply::json(500, json!({"error": "server_error"}))).await;
    kh.oauth_set("prov", &provider.url("/token"), "client", "secret");
    let stored = kh
        .store(
            "oauthsvc",
            json!({"accessToken": "old", "refreshToken": "r", "provider": "prov"}),
        )
        .await;
    assert_eq!(stored.status, 200);
    let refreshed = kh
        .signed(
            PATH_REFRESH_NOTIFY,
            &json!({"requestId": format!("req_{}", random_hex(6)), "service": "oauthsvc", "reason": "expired"}),
        )
        .await;
    assert_eq!(refreshed.json()["status"], "refresh_failed");
    assert_eq!(provider.count(), 1);
    assert_eq!((metric(ERRORS).await, metric(TIMED).await), (4.0, 5.0));

    // Refused by the egress policy before any call: a denial, not an upstream error.
    kh.proxy_get("github", "https://elsewhere.example/x")
        .await
        .assert_error(403, "egress_denied");
    assert_eq!(metric("keyholder_egress_denials_total").await, 1.0);
    assert_eq!((metric(ERRORS).await, metric(TIMED).await), (4.0, 5.0));
}

#[test]
fn metrics_listen_is_loopback_unless_made_public() {
    assert!(validate_metrics_listen("127.0.0.1:9090", false).is_ok());
    assert!(validate_metrics_listen("[::1]:9090", false).is_ok());
    let err = validate_metrics_listen("0.0.0.0:9090", false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--metrics-listen / KEYHOLDER_METRICS_LISTEN")
            && err.contains("--metrics-public"),
        "{err}"
    );
    assert!(validate_metrics_listen("0.0.0.0:9090", true).is_ok());
    assert!(validate_metrics_listen("nonsense", true).is_err());
}
