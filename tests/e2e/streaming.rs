//! Streamed `/v1/proxy` answers (issue 20): events reach the platform as the upstream sends them,
//! the credential is redacted across chunk boundaries, the upstream's headers pass through, the
//! head timeout does not cap a stream that keeps delivering, a silent stream ends at the idle
//! timeout, a platform going away ends the upstream call, and every stream verifies (and a cut
//! one fails) with the streamed signature form.

use std::time::{Duration, Instant};

use keyholder_protocol::response_sig::ResponseSigError;
use keyholder_protocol::response_stream::StreamVerifier;
use keyholder_tests::upstream::StreamingServer;
use keyholder_tests::*;
use serde_json::json;

use crate::proxy::{proxy_keyholder, TOKEN};

fn sse(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

async fn identity(kh: &Keyholder) -> ed25519_dalek::VerifyingKey {
    let answer = read(kh.http.get(kh.url("/v1/identity")).send().await.unwrap()).await;
    let doc: keyholder_protocol::IdentityDocument = serde_json::from_value(answer.json()).unwrap();
    doc.verifying_key().unwrap()
}

/// Reads a streamed answer chunk by chunk through the verifier: (arrival time of each piece of
/// released body since `t0`, the body, the verifier's verdict).
async fn read_verified(
    kh: &Keyholder,
    mut response: reqwest::Response,
    request_id: &str,
    t0: Instant,
) -> (
    Vec<(Duration, Vec<u8>)>,
    Vec<u8>,
    Result<(), ResponseSigError>,
) {
    let key = identity(kh).await;
    let header = response
        .headers()
        .get("x-keyholder-signature")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let mut verifier = StreamVerifier::new(
        &key,
        &header,
        "POST",
        "/v1/proxy",
        request_id,
        response.status().as_u16(),
    )
    .expect("the head verifies at once");
    let mut arrivals = Vec::new();
    let mut received = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                arrivals.push((t0.elapsed(), chunk.to_vec()));
                received.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(_) => break,
        }
    }
    let mut body = Vec::new();
    verifier.push(&received, &mut body);
    (arrivals, body, verifier.finish())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_as_sent_redacted_across_chunks_and_verify() {
    let kh = proxy_keyholder(|_| {}).await;
    let step = Duration::from_millis(300);
    let (a, b) = TOKEN.split_at(9);
    let upstream = StreamingServer::start(
        200,
        &[
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("Mcp-Session-Id", "session-1"),
        ],
        vec![
            (Duration::ZERO, sse("event: message\ndata: first\n\n")),
            (step, sse(&format!("data: echo {a}"))),
            (step, sse(&format!("{b} end\n\n"))),
            (step, sse("data: fourth\n\n")),
            (step, sse("data: last\n\n")),
        ],
    )
    .await;
    let t0 = Instant::now();
    let (response, request_id) = kh
        .proxy_streaming(
            "github",
            json!({"url": upstream.url("/mcp"), "method": "GET", "headers": {"Accept": "text/event-stream"}}),
            json!({"Authorization": "Bearer ${TOKEN}"}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let head_at = t0.elapsed();
    let h = |n: &str| {
        response
            .headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(h("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(
        h("cache-control").as_deref(),
        Some("no-cache"),
        "the upstream's, not ours"
    );
    assert_eq!(h("mcp-session-id").as_deref(), Some("session-1"));
    assert_eq!(h("x-content-type-options").as_deref(), Some("nosniff"));
    assert_eq!(h("x-upstream-status").as_deref(), Some("200"));
    assert!(h("content-length").is_none());
    assert!(
        head_at < Duration::from_millis(250),
        "head after {head_at:?}"
    );
    let (arrivals, body, verdict) = read_verified(&kh, response, &request_id, t0).await;
    verdict.expect("the whole stream verifies");
    // The first event came long before the upstream finished (4 steps later).
    let first = arrivals
        .iter()
        .find(|(_, c)| contains(c, b"data: first"))
        .unwrap()
        .0;
    let last = arrivals.last().unwrap().0;
    assert!(
        first < Duration::from_millis(250),
        "first event after {first:?}"
    );
    assert!(last >= step * 4, "stream ended after {last:?}");
    let text = String::from_utf8(body).unwrap();
    assert_eq!(
        text,
        "event: message\ndata: first\n\ndata: echo [REDACTED] end\n\ndata: fourth\n\ndata: last\n\n"
    );
    // The upstream got the credential; nothing of it came back.
    assert!(upstream.requests.lock().unwrap()[0].contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_the_head_timeout_and_a_silent_one_ends_at_the_idle_timeout() {
    let kh = proxy_keyholder(|c| {
        c.upstream_timeout = Duration::from_secs(1);
        c.upstream_idle_timeout = Duration::from_secs(1);
    })
    .await;
    // Delivering every 400 ms for 2.4 s: longer than the head timeout, never idle for 1 s.
    let pieces = (0..7)
        .map(|i| (Duration::from_millis(400), sse(&format!("data: {i}\n\n"))))
        .collect();
    let busy = StreamingServer::start(200, &[("Content-Type", "text/event-stream")], pieces).await;
    let t0 = Instant::now();
    let (response, rid) = kh
        .proxy_streaming(
            "github",
            json!({"url": busy.url("/"), "method": "GET"}),
            json!({}),
        )
        .await;
    let (_, body, verdict) = read_verified(&kh, response, &rid, t0).await;
    verdict.unwrap();
    assert!(t0.elapsed() > Duration::from_millis(2400));
    assert!(String::from_utf8(body).unwrap().ends_with("data: 6\n\n"));

    // One event, then 5 s of silence: cut after the idle second, without a valid end frame.
    let silent = StreamingServer::start(
        200,
        &[("Content-Type", "text/event-stream")],
        vec![
            (Duration::ZERO, sse("data: hello\n\n")),
            (Duration::from_secs(5), sse("data: late\n\n")),
        ],
    )
    .await;
    let t0 = Instant::now();
    let (response, rid) = kh
        .proxy_streaming(
            "github",
            json!({"url": silent.url("/"), "method": "GET"}),
            json!({}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let (_, body, verdict) = read_verified(&kh, response, &rid, t0).await;
    let took = t0.elapsed();
    assert!(verdict.is_err(), "a cut stream must not verify");
    assert!(!contains(&body, b"late"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maximum_stream_duration_cuts_an_endless_stream() {
    let kh = proxy_keyholder(|c| c.upstream_max_stream = Some(Duration::from_secs(1))).await;
    let pieces = (0..100)
        .map(|_| (Duration::from_millis(100), sse("data: tick\n\n")))
        .collect();
    let upstream =
        StreamingServer::start(200, &[("Content-Type", "text/event-stream")], pieces).await;
    let t0 = Instant::now();
    let (response, rid) = kh
        .proxy_streaming(
            "github",
            json!({"url": upstream.url("/"), "method": "GET"}),
            json!({}),
        )
        .await;
    let (arrivals, _, verdict) = read_verified(&kh, response, &rid, t0).await;
    assert!(verdict.is_err());
    let received: Vec<u8> = arrivals.into_iter().flat_map(|(_, c)| c).collect();
    assert!(contains(&received, b"data: tick\n\n"));
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_going_away_ends_the_upstream_call() {
    let kh = proxy_keyholder(|_| {}).await;
    let pieces = (0..200)
        .map(|_| (Duration::from_millis(50), vec![b'x'; 1024]))
        .collect();
    let upstream =
        StreamingServer::start(200, &[("Content-Type", "application/octet-stream")], pieces).await;
    let (mut response, _) = kh
        .proxy_streaming(
            "github",
            json!({"url": upstream.url("/big"), "method": "GET"}),
            json!({}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.chunk().await.unwrap().is_some());
    drop(response);
    let t0 = Instant::now();
    while !upstream
        .client_gone
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "the upstream call went on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_verifies_a_streamed_answer_and_strips_its_frame() {
    let kh = proxy_keyholder(|_| {}).await;
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let pieces = body
        .chunks(50_000)
        .map(|c| (Duration::from_millis(10), c.to_vec()))
        .collect();
    let upstream =
        StreamingServer::start(200, &[("Content-Type", "application/octet-stream")], pieces).await;
    let answer = read(kh.http.get(kh.url("/v1/identity")).send().await.unwrap()).await;
    let doc: keyholder_protocol::IdentityDocument = serde_json::from_value(answer.json()).unwrap();
    let platform = kh
        .sdk_builder()
        .pin_identity(keyholder_client::IdentityPin::document(&doc).unwrap())
        .platform(keyholder_protocol::HmacSecret::from_bytes(
            *kh.secret.as_ref().unwrap().expose(),
        ))
        .unwrap();
    let ticket = kh.ticket(keyholder_protocol::Purpose::Proxy, "github");
    let got = platform
        .proxy(
            &ticket,
            "github",
            &keyholder_client::ProxyCall::new(upstream.url("/file")),
        )
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(
        got.body.as_ref(),
        body.as_slice(),
        "the body, without the end frame"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_timed_out_at_the_upstream_is_not_sent_again() {
    let kh = proxy_keyholder(|c| c.upstream_timeout = Duration::from_secs(1)).await;
    // Reads the request, never answers: the head timeout ends the call.
    let server =
        keyholder_tests::upstream::FaultyServer::start(keyholder_tests::upstream::Fault::Hang)
            .await;
    for method in ["POST", "GET"] {
        let before = server.connections();
        let t0 = Instant::now();
        let answer = kh
            .proxy(
                "github",
                json!({"url": server.url("/tools/call"), "method": method, "body": "e30="}),
                json!({}),
            )
            .await;
        answer.assert_error(504, "upstream_timeout");
        assert!(t0.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            server.connections() - before,
            1,
            "{method} was sent once only"
        );
    }
}
