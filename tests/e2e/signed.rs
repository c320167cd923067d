//! Signed platform calls: every refusal of PROTOCOL.md 2.1, in order, and the size limits.

use keyholder_protocol::paths::*;
use keyholder_protocol::signing::signature_header_value;
use keyholder_protocol::HmacSecret;
use keyholder_tests::*;

async fn post(kh: &Keyholder, headers: &[(&str, String)], body: &[u8]) -> Answer {
    let mut req = kh.http.post(kh.url(PATH_HEALTH)).body(body.to_vec());
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    read(req.send().await.unwrap()).await
}

#[tokio::test]
async fn platform_signature_refusals() {
    let mut kh = Keyholder::start().await;
    let secret = kh.bind().await;
    // No body requestId: the header's must equal it where there is one.
    let body = br#"{"probe":"x"}"#;
    let ts = now();
    let good_sig = signature_header_value(&secret, ts, body);
    let rid = || format!("req_{}", random_hex(8));

    // The good request passes.
    let ok = post(
        &kh,
        &[
            (HEADER_SIGNATURE, good_sig.clone()),
            (HEADER_TIMESTAMP, ts.to_string()),
            (HEADER_PLATFORM_REQUEST_ID, rid()),
        ],
        body,
    )
    .await;
    assert_eq!(ok.status, 200);

    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "no signature",
            vec![
                (HEADER_TIMESTAMP, ts.to_string()),
                (HEADER_PLATFORM_REQUEST_ID, rid()),
            ],
        ),
        (
            "no sha256= prefix",
            vec![
                (
                    HEADER_SIGNATURE,
                    good_sig.trim_start_matches("sha256=").to_string(),
                ),
                (HEADER_TIMESTAMP, ts.to_string()),
                (HEADER_PLATFORM_REQUEST_ID, rid()),
            ],
        ),
        (
            "no timestamp",
            vec![
                (HEADER_SIGNATURE, good_sig.clone()),
                (HEADER_PLATFORM_REQUEST_ID, rid()),
            ],
        ),
        (
            "timestamp not an integer",
            vec![
                (HEADER_SIGNATURE, good_sig.clone()),
                (HEADER_TIMESTAMP, format!("{ts}.5")),
                (HEADER_PLATFORM_REQUEST_ID, rid()),
            ],
        ),
        (
            "stale",
            vec![
                (
                    HEADER_SIGNATURE,
                    signature_header_value(&secret, ts - 330, body),
                ),
                (HEADER_TIMESTAMP, (ts - 330).to_string()),
                (HEADER_PLATFORM_REQUEST_ID, rid()),
            ],
        ),
        (
            "future",
            vec![
                (
                    HEADER_SIGNATURE,
                    signature_header_value(&secret, ts + 330, body),
                ),
                (HEADER_TIMESTAMP, (ts + 330).to_string()),
                (HEADER_PLATFORM_REQUEST_ID, rid()),
            ],
        ),
        (
            "forged (other secret)",
            vec![
                (
                    HEADER_SIGNATURE,
                    signature_header_value(&HmacSecret::generate(), ts, body),
                ),
                (HEADER_TIMESTAMP, ts.to_string()),
                (HEADER_PLATFORM_REQUEST_ID, rid()),
            ],
        ),
        (
            "signature of another timestamp",
            vec![
                (
                    HEADER_SIGNATURE,
                    signature_header_value(&secret, ts - 1, body),
                ),
                (HEADER_TIMESTAMP, ts.to_string()),
                (HEADER_PLATFORM_REQUEST_ID, rid()),
            ],
        ),
        (
            "no request id",
            vec![
                (HEADER_SIGNATURE, good_sig.clone()),
                (HEADER_TIMESTAMP, ts.to_string()),
            ],
        ),
        (
            "malformed request id",
            vec![
                (HEADER_SIGNATURE, good_sig.clone()),
                (HEADER_TIMESTAMP, ts.to_string()),
                (HEADER_PLATFORM_REQUEST_ID, "has space".into()),
            ],
        ),
    ];
    for (name, headers) in cases {
        let answer = post(&kh, &headers, body).await;
        assert_eq!(
            answer.status,
            401,
            "{name}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.error_code(), "auth_failed", "{name}");
    }
    // A body changed under a valid signature.
    let tampered = post(
        &kh,
        &[
            (HEADER_SIGNATURE, good_sig.clone()),
            (HEADER_TIMESTAMP, ts.to_string()),
            (HEADER_PLATFORM_REQUEST_ID, rid()),
        ],
        br#"{"probe":"y"}"#,
    )
    .await;
    tampered.assert_error(401, "auth_failed");
}

#[tokio::test]
async fn request_ids_are_single_use_but_forgeries_burn_nothing() {
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    let raw = br#"{"operation":"list","collection":"tokens"}"#;
    let id = format!("req_{}", random_hex(8));
    // A forged request with this id is refused and does not consume it.
    let forged = kh
        .signed_raw_with(&HmacSecret::generate(), PATH_STORAGE, raw, now(), &id)
        .await;
    forged.assert_error(401, "auth_failed");
    let first = kh.signed_raw(PATH_STORAGE, raw, now(), &id).await;
    first.assert_ok();
    let replay = kh.signed_raw(PATH_STORAGE, raw, now(), &id).await;
    replay.assert_error(401, "auth_failed");
    assert_eq!(replay.json()["message"], "Duplicate request ID");
}

#[tokio::test]
async fn bad_bodies_get_clear_4xx_errors() {
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    let rid = || format!("req_{}", random_hex(8));
    // Not JSON, not UTF-8, deeply nested, wrong shape, unknown operation.
    let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    for raw in [
        b"{not json".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x80],
        nested.into_bytes(),
        br#"{"operation":"get"}"#.to_vec(),
        br#"{"operation":"explode","collection":"tokens"}"#.to_vec(),
        br#"{"operation":"get","collection":"secrets","key":"k"}"#.to_vec(),
        br#"{"operation":"set","collection":"tokens","key":"k","data":"string"}"#.to_vec(),
        br#"{"operation":"list","collection":"tokens"} trailing"#.to_vec(),
    ] {
        let answer = kh.signed_raw(PATH_STORAGE, &raw, now(), &rid()).await;
        answer.assert_error(400, "invalid_request");
    }
    // Oversized: refused before the body is read.
    let big = vec![b' '; 2 * 1024 * 1024];
    let answer = kh.signed_raw(PATH_STORAGE, &big, now(), &rid()).await;
    answer.assert_error(413, "payload_too_large");
}
