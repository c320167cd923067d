//! What a release tells about itself: `/v1/health` (public GET and signed POST) carries the server's
//! own version as `keyholderVersion` next to the protocol's `version`, the SDK reads it, and
//! `docs/openapi.json` documents every field the health answer has.

use keyholder_protocol::paths::{PATH_HEALTH, PROTOCOL_VERSION};
use keyholder_tests::*;
use serde_json::{json, Value};

const SPEC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"));

fn assert_versions(health: &Value) {
    assert_eq!(
        health["keyholderVersion"],
        keyholder::build_info::VERSION,
        "{health}"
    );
    // `version` stays the protocol's, not the server's.
    assert_eq!(health["version"], PROTOCOL_VERSION, "{health}");
}

#[tokio::test]
async fn health_carries_the_keyholder_version() {
    // The package version the server reports is the workspace's (which this crate shares).
    assert_eq!(keyholder::build_info::VERSION, env!("CARGO_PKG_VERSION"));
    let mut kh = Keyholder::start().await;
    // Before binding, on the public GET.
    let public = read(kh.http.get(kh.url(PATH_HEALTH)).send().await.unwrap()).await;
    assert_eq!(public.status, 200);
    assert_versions(&public.json());

    let secret = kh.bind().await;
    let public = read(kh.http.get(kh.url(PATH_HEALTH)).send().await.unwrap()).await;
    assert_versions(&public.json());
    let signed = kh.signed(PATH_HEALTH, &json!({})).await;
    assert_eq!(signed.status, 200);
    assert_versions(&signed.json());

    // The SDK decodes it on both paths.
    let platform = kh.sdk_builder().platform(secret).unwrap();
    let health = platform.health().await.unwrap();
    assert_eq!(
        health.keyholder_version.as_deref(),
        Some(keyholder::build_info::VERSION)
    );
    let health = platform.health_signed().await.unwrap();
    assert_eq!(
        health.keyholder_version.as_deref(),
        Some(keyholder::build_info::VERSION)
    );
    assert_eq!(health.version, PROTOCOL_VERSION);
}

#[tokio::test]
async fn openapi_documents_every_health_field() {
    let spec: Value = serde_json::from_str(SPEC).unwrap();
    let properties = spec["components"]["schemas"]["Health"]["properties"]
        .as_object()
        .unwrap();
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    let public = read(kh.http.get(kh.url(PATH_HEALTH)).send().await.unwrap()).await;
    let signed = kh.signed(PATH_HEALTH, &json!({})).await;
    for answer in [public, signed] {
        let body = answer.json();
        for field in body.as_object().unwrap().keys() {
            assert!(
                properties.contains_key(field),
                "health field {field} is not in docs/openapi.json's Health schema"
            );
        }
    }
    assert_eq!(properties["keyholderVersion"]["type"], "string");
}
