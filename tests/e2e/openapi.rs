//! `docs/openapi.json` cannot drift from the server: every documented path and method is served
//! (never 404/405), every other method on a documented path is `405` with an `Allow` header listing
//! exactly the documented methods, every route of the endpoint table (`http::endpoints`) is
//! documented with the methods the table gives it, and unknown paths are `404 not_found`.

use std::collections::{BTreeMap, BTreeSet};

use keyholder_tests::*;
use serde_json::Value;

const SPEC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"));
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
];

/// Every route of the server's endpoint table, with the methods it says it serves (its `Allow`).
fn registered_routes() -> BTreeMap<String, BTreeSet<String>> {
    keyholder::http::endpoints::ENDPOINTS
        .iter()
        .map(|e| {
            let methods = e.allow().split(", ").map(str::to_string).collect();
            (e.route.to_string(), methods)
        })
        .collect()
}

#[tokio::test]
async fn openapi_describes_exactly_the_served_routes() {
    let spec: Value = serde_json::from_str(SPEC).unwrap();
    let paths = spec["paths"].as_object().unwrap();
    let documented: BTreeMap<String, BTreeSet<String>> = paths
        .iter()
        .map(|(path, ops)| {
            let methods = ops.as_object().unwrap().keys().map(|m| m.to_uppercase());
            (path.clone(), methods.collect())
        })
        .collect();
    assert_eq!(
        documented,
        registered_routes(),
        "docs/openapi.json paths and methods vs http::endpoints::ENDPOINTS"
    );

    let mut kh = Keyholder::start().await;
    kh.bind().await;
    let client = reqwest::Client::new();
    for (path, ops) in paths {
        let allowed: BTreeSet<String> = ops
            .as_object()
            .unwrap()
            .keys()
            .map(|m| m.to_uppercase())
            .collect();
        for method in METHODS {
            let answer = read(
                client
                    .request(method.parse().unwrap(), kh.url(path))
                    .header("content-type", "application/json")
                    .header("origin", "https://tokenvault.uk")
                    .body(if method == "POST" { "{}" } else { "" })
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            let code = serde_json::from_slice::<Value>(&answer.body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string));
            if allowed.contains(method) {
                assert!(
                    answer.status != 405 && code.as_deref() != Some("not_found"),
                    "{method} {path} is documented but answered {} {code:?}",
                    answer.status
                );
            } else {
                assert_eq!(
                    answer.status, 405,
                    "{method} {path} is served but not documented"
                );
                let allow: BTreeSet<String> = answer
                    .header("allow")
                    .unwrap_or_else(|| panic!("405 without Allow on {path}"))
                    .split(',')
                    .map(|m| m.trim().to_string())
                    .collect();
                assert_eq!(allow, allowed, "Allow of {path} vs the documented methods");
            }
        }
    }
    for unknown in [
        "/",
        "/v1",
        "/v1/unknown",
        "/v2/health",
        "/v1/health/extra",
        "/bind/x",
    ] {
        let answer = read(client.get(kh.url(unknown)).send().await.unwrap()).await;
        answer.assert_error(404, "not_found");
    }
}
