//! Upstream faults for `/v1/proxy` and the OAuth refresh: an upstream that hangs, resets, drips one
//! byte a second, sends an endless body or a huge header gets the documented 502/504 within the
//! configured timeout, the caps hold, and a control request's latency meanwhile stays low.

use std::time::{Duration, Instant};

use keyholder_tests::upstream::{Fault, FaultyServer};
use keyholder_tests::*;
use serde_json::json;

use crate::proxy::proxy_keyholder;

const TIMEOUT: Duration = Duration::from_secs(2);
const FAULTS: [Fault; 6] = [
    Fault::Hang,
    Fault::Reset,
    Fault::DripHead,
    Fault::DripBody,
    Fault::EndlessBody,
    Fault::HugeHeader,
];

fn expected(fault: Fault, timeout: &str, error: &str) -> (u16, String) {
    match fault {
        Fault::Hang | Fault::DripHead | Fault::DripBody => (504, timeout.into()),
        Fault::Reset | Fault::EndlessBody | Fault::HugeHeader | Fault::CloseOnReuse => {
            (502, error.into())
        }
    }
}

/// Credential fetches while `during` runs: sorted latencies in milliseconds.
async fn control_latency(kh: &Keyholder, until: Instant) -> Vec<f64> {
    let mut out = Vec::new();
    while Instant::now() < until {
        let t0 = Instant::now();
        let answer = kh.credential("github").await;
        assert_eq!(answer.status, 200);
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out.sort_by(f64::total_cmp);
    out
}

fn p99(sorted: &[f64]) -> f64 {
    sorted[((sorted.len() - 1) as f64 * 0.99).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_and_refresh_survive_misbehaving_upstreams() {
    let kh = proxy_keyholder(|c| {
        c.upstream_timeout = TIMEOUT;
        c.provider_timeout = TIMEOUT;
        c.upstream_idle_timeout = TIMEOUT;
        c.upstream_max_stream = Some(TIMEOUT);
    })
    .await;
    let stored = kh
        .store(
            "oauthsvc",
            json!({"accessToken": "old", "refreshToken": "r", "provider": "faulty"}),
        )
        .await;
    assert_eq!(stored.status, 200);
    let quiet = control_latency(&kh, Instant::now() + Duration::from_millis(600)).await;

    let mut report = Vec::new();
    let mut worst_p99: f64 = 0.0;
    for fault in FAULTS {
        let server = FaultyServer::start(fault).await;
        kh.oauth_set("faulty", &server.url("/token"), "client", "secret");
        let started = Instant::now();
        let control = control_latency(&kh, started + TIMEOUT + Duration::from_millis(500));
        // Four proxied calls and one refresh against the faulty server, all at once.
        let calls = futures_util::future::join_all((0..4).map(|_| async {
            let t0 = Instant::now();
            let a = kh.proxy_get("github", &server.url("/api")).await;
            (a, t0.elapsed())
        }));
        let refresh = async {
            let t0 = Instant::now();
            let a = kh
                .signed(
                    keyholder_protocol::paths::PATH_REFRESH_NOTIFY,
                    &json!({"requestId": format!("req_{}", random_hex(6)), "service": "oauthsvc", "reason": "expired"}),
                )
                .await;
            (a, t0.elapsed())
        };
        let (control, calls, (refreshed, refresh_took)) = tokio::join!(control, calls, refresh);
        let (status, code) = expected(fault, "upstream_timeout", "upstream_error");
        for (answer, took) in &calls {
            if matches!(fault, Fault::DripBody | Fault::EndlessBody) {
                // Streamed (issue 20): the head went on at once; the body is cut at the maximum
                // stream duration, without the signed end frame.
                assert_eq!(answer.status, 200, "{fault:?}");
                assert!(!answer
                    .body
                    .windows(16)
                    .any(|w| w == keyholder_protocol::response_stream::END_FRAME_PREFIX));
            } else {
                answer.assert_error(status, &code);
            }
            assert!(
                *took < TIMEOUT + Duration::from_secs(1),
                "{fault:?}: proxy took {took:?}"
            );
        }
        let (status, code) = expected(fault, "provider_timeout", "provider_error");
        refreshed.assert_error(status, &code);
        assert!(
            refresh_took < TIMEOUT + Duration::from_secs(1),
            "{fault:?}: refresh took {refresh_took:?}"
        );
        assert!(server.connections() > 0, "{fault:?}: never connected");
        worst_p99 = worst_p99.max(p99(&control));
        report.push(format!(
            "{fault:?}: proxy {} in {:.2} s, refresh {} in {:.2} s, control p99 {:.1} ms",
            calls[0].0.status,
            calls.iter().map(|c| c.1).max().unwrap().as_secs_f64(),
            refreshed.status,
            refresh_took.as_secs_f64(),
            p99(&control)
        ));
    }
    eprintln!(
        "upstream faults (timeouts and stream limit {TIMEOUT:?}; control p99 quiet {:.1} ms):\n  {}",
        p99(&quiet),
        report.join("\n  ")
    );
    assert!(
        worst_p99 < 250.0,
        "control latency p99 {worst_p99:.1} ms during upstream faults"
    );
}

/// A server that closes a kept-alive connection just as it is reused (the race every keep-alive
/// timeout causes now and then): an idempotent call is sent once more on a new connection and
/// succeeds; a POST, which the server might have applied, is not sent twice and gets the 502.
#[tokio::test]
async fn a_connection_closed_on_reuse_is_retried_for_idempotent_calls_only() {
    let kh = proxy_keyholder(|_| {}).await;
    let server = FaultyServer::start(Fault::CloseOnReuse).await;
    let url = server.url("/api");
    for _ in 0..3 {
        assert_eq!(kh.proxy_get("github", &url).await.status, 200);
    }
    // Calls 2 and 3 each met the closed connection and were answered on a new one.
    assert_eq!(server.connections(), 3);

    // The third call's connection is kept alive; a POST meets it closed and is not sent again.
    let post = || {
        kh.proxy(
            "github",
            json!({ "url": url, "method": "POST", "body": "e30=" }),
            json!({ "Authorization": "Bearer ${TOKEN}" }),
        )
    };
    post().await.assert_error(502, "upstream_error");
    assert_eq!(server.connections(), 3, "a POST was sent twice");
    assert_eq!(post().await.status, 200);
    assert_eq!(server.connections(), 4);
}
